"""Distil + quantize whisper-base into a 2-decoder-layer student, the way a user script would.

    python examples/distill_whisper_base.py --output_dir runs/base-kdq --max_steps 200 --size_budget_mb 70 \
        --quant_targets decoder,embedding --freeze_encoder true --per_device_train_batch_size 8 \
        [--predict_with_generate true --generation_max_length 128] [--unlabeled_manifest ../shared/data/speech/unlabeled.jsonl]

Teacher: whisper-base (offline PyPI pack when the Hub is out of reach). Student: all 6 encoder layers (frozen,
shared with the teacher) and 2 of the 6 decoder layers, quantized under the size budget. Training data:
speech synthesized offline from the package's own English prompts, plus unlabeled audio pseudo-labelled by
the teacher when a manifest is given. Evaluation: a held-out synthetic split (a smoke check, not a result) and,
when given, a real manifest (``--eval_manifest``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import HfArgumentParser

from hf_whisper_kdq import DistillQuantArguments, build_student, load_whisper, make_compute_metrics
from hf_whisper_kdq.compress import CompressArguments, train_student, training_data
from hf_whisper_kdq.data import load_manifest, prepare_dataset
from hf_whisper_kdq.evaluation import evaluate_model
from hf_whisper_kdq.sharding import end_distributed_process
from hf_whisper_kdq.synthesis import default_prompts, synthesize_dataset


@dataclass
class ScriptArguments:
    teacher: str = field(default="openai/whisper-base", metadata={"help": "Teacher model (any load_whisper source)."})
    decoder_layers: int = field(default=2, metadata={"help": "Decoder layers the student keeps."})
    synthetic_prompts: int = field(default=120, metadata={"help": "How many embedded prompts to synthesize."})
    unlabeled_manifest: str | None = field(default=None, metadata={"help": "JSONL of unlabeled audio to pseudo-label."})
    eval_manifest: str | None = field(default=None, metadata={"help": "JSONL with transcripts to evaluate on."})


def main() -> None:
    script, args = HfArgumentParser((ScriptArguments, DistillQuantArguments)).parse_args_into_dataclasses()
    teacher, processor = load_whisper(script.teacher)
    student = build_student(teacher, decoder_layers=script.decoder_layers)

    # The training data of `hf-whisper-kdq compress`. Under torchrun / accelerate launch the main process synthesizes
    # and labels first; the others then read the synthesis cache and the labels kept in the output folder.
    data = CompressArguments(
        teacher=script.teacher,
        level="none",
        synthetic_prompts=script.synthetic_prompts,
        unlabeled_manifest=script.unlabeled_manifest,
    )
    with args.main_process_first(desc="training data"):
        train = training_data(data, teacher, processor, output_dir=args.output_dir)
        held_out = synthesize_dataset(default_prompts("eval"))
        multilingual = teacher.generation_config.is_multilingual
        train_features, train_report = prepare_dataset(train, processor, multilingual=multilingual)
        eval_features, _ = prepare_dataset(held_out, processor, multilingual=multilingual)
        print(train_report.summary())

    trainer = train_student(
        student,
        teacher,
        processor,
        train_features,
        args,
        eval_dataset=eval_features,
        # WER needs generated transcripts: only with --predict_with_generate (slower evaluation).
        compute_metrics=make_compute_metrics(processor, language="en") if args.predict_with_generate else None,
    )
    metrics = trainer.evaluate()  # every process evaluates its share of the held-out split
    student = trainer.whole_student()  # on every process: under FSDP it gathers the shards onto the main one
    if trainer.is_world_process_zero():
        print(trainer.plan.summary())
        print("held-out synthetic speech (smoke check, not a result):", metrics)
        if script.eval_manifest:
            report = evaluate_model(student.eval(), processor, load_manifest(script.eval_manifest))
            print(report.summary_table())
    trainer.accelerator.end_training()  # closes the trackers (--report_to)
    end_distributed_process()  # under a multi-process launch: ends without gloo's teardown abort


if __name__ == "__main__":
    main()
