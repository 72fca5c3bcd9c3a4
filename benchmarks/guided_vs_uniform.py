"""Guided bit allocation against uniform round-to-nearest at the same bytes, on real whisper-base (issue 15, Evidence).

    python benchmarks/guided_vs_uniform.py                          # 32 dev utterances per language, before training
    python benchmarks/guided_vs_uniform.py --per_language 8         # a quick run
    python benchmarks/guided_vs_uniform.py --train_steps 40         # adds rows after a short CPU training

Every row is teacher-forced on the reference transcripts of the dev utterances (English LJSpeech and Mandarin
AISHELL rows of ``dev.jsonl``): KL(teacher ‖ student) in nats per label token and the share of label positions where
the student's most likely token is the teacher's (top-1 agreement), per language. The student is whisper-base itself
with ``--quant_targets`` fake-quantized and its encoder frozen (the teacher's encoder outputs are computed once).

* ``uniform intB``: every targeted unit at B bits, round-to-nearest (per-group scales of 32, no clipping).
* ``guided (output_kl)``: the plan of ``LayerSelectionCallback.select`` (the library's default selection) under a
  size budget equal to the bytes of ``uniform intB`` (or, for a fractional ``--budgets`` entry, between two of them), measured on probe batches of the *training* manifests
  (``train_en.jsonl`` + ``train_zh.jsonl``), never on the dev rows scored here.
* ``guided (local_error)``: the previous rule (``selection_cost="local_error"``) at the same budget.
* With ``--train_steps N``: the uniform int3 student and the guided plan at its budget after N steps of
  ``DistillQuantTrainer`` on the training manifests (default losses and arguments otherwise).

Bytes are the plan's accounting (``size_budget_accounting="paper"``: the embedding at its bits, as the CTranslate2
export stores it; fp16 for what stays float).
"""

from __future__ import annotations

import copy
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import concatenate_datasets
from transformers import HfArgumentParser
from transformers.models.whisper.modeling_whisper import shift_tokens_right

from hf_whisper_kdq import (
    DistillQuantArguments,
    DistillQuantTrainer,
    LayerSelectionCallback,
    WhisperDataCollator,
    load_manifest,
    load_whisper,
    prepare_dataset,
)
from hf_whisper_kdq.export import save_compressed
from hf_whisper_kdq.losses import IGNORE_INDEX
from hf_whisper_kdq.quant import FLOAT_BITS, prepare_qat
from hf_whisper_kdq.selection import fixed_bytes, plan_shapes, plan_size, starting_plan

SPEECH = Path(__file__).resolve().parents[2] / "shared" / "data" / "speech"
LANGUAGES = ("en", "zh")


def rows(manifest: Path, language: str, count: int, processor):
    dataset = load_manifest(manifest, languages=[language], limit=None)
    dataset = dataset.select(range(min(count, len(dataset))))
    prepared, _ = prepare_dataset(dataset, processor)
    return prepared


class DevSet:
    """Dev batches with the teacher's encoder states and its logits at the label positions, computed once."""

    def __init__(self, teacher, processor, per_language: int, batch_size: int):
        collate = WhisperDataCollator(processor, teacher.config.decoder_start_token_id)
        self.batches = {}
        config = teacher.config
        for language in LANGUAGES:
            data = rows(SPEECH / "dev.jsonl", language, per_language, processor)
            self.batches[language] = []
            for start in range(0, len(data), batch_size):
                batch = collate([data[i] for i in range(start, min(start + batch_size, len(data)))])
                labels = batch["labels"]
                inputs = shift_tokens_right(labels, config.pad_token_id, config.decoder_start_token_id)
                with torch.no_grad():
                    states = teacher.get_encoder()(batch["input_features"]).last_hidden_state
                    logits = teacher(encoder_outputs=(states,), decoder_input_ids=inputs).logits
                mask = labels.ne(IGNORE_INDEX)
                self.batches[language].append((states, inputs, mask, logits[mask].log_softmax(-1)))

    @torch.no_grad()
    def score(self, model) -> dict[str, float]:
        """KL(teacher ‖ model) in nats per label token and top-1 agreement, per language."""
        model.eval()
        scores = {}
        for language, batches in self.batches.items():
            kl, agree, tokens = 0.0, 0, 0
            for states, inputs, mask, teacher in batches:
                student = model(encoder_outputs=(states,), decoder_input_ids=inputs).logits[mask].log_softmax(-1)
                kl += (teacher.exp() * (teacher - student)).sum().item()
                agree += int((student.argmax(-1) == teacher.argmax(-1)).sum())
                tokens += int(mask.sum())
            scores[f"kl_{language}"] = kl / tokens
            scores[f"top1_{language}"] = agree / tokens
        return scores


@dataclass
class BenchmarkArguments:
    """What to compare (``HfArgumentParser``: ``--help`` lists every field)."""

    teacher: str = field(default="openai/whisper-base", metadata={"help": "any sources.load_whisper source"})
    per_language: int = field(default=32, metadata={"help": "dev utterances per language"})
    train_per_language: int = field(default=200, metadata={"help": "training rows per language"})
    budgets: str = field(
        default="4,3",
        metadata={
            "help": "uniform bit widths whose bytes are the budgets; a fraction (3.5) is that share of the way "
            "between the two uniform sizes around it"
        },
    )
    quant_targets: str = field(default="decoder,embedding", metadata={"help": "what is quantized"})
    bit_choices: str = field(default="2,3,4,8", metadata={"help": "as the issue's kdq-base-decemb-u3 row"})
    batch_size: int = field(default=8, metadata={"help": "training and scoring batch size"})
    probe_batches: int = field(default=2, metadata={"help": "selection probe batches"})
    train_steps: int = field(default=0, metadata={"help": "also train uniform and guided at int3 bytes"})
    learning_rate: float = field(default=1e-5, metadata={"help": "training learning rate"})
    threads: int = field(default=2, metadata={"help": "CPU threads"})
    save_dir: str | None = field(
        default=None,
        metadata={
            "help": "write every uniform and trained student there as a packed folder, to score it by generation "
            "with `hf-whisper-kdq evaluate`"
        },
    )


def arguments(output_dir: str, options, **overrides) -> DistillQuantArguments:
    values = dict(
        output_dir=output_dir,
        per_device_train_batch_size=options.batch_size,
        report_to="none",
        use_cpu=True,
        remove_unused_columns=False,
        quant_targets=options.quant_targets,
        quant_bit_choices=options.bit_choices,
        size_budget_accounting="paper",
        freeze_encoder=True,
        selection_probe_batches=options.probe_batches,
        encoder_cache_dir=str(Path(output_dir) / "cache"),
        max_steps=max(options.train_steps, 1),
        learning_rate=options.learning_rate,
        logging_steps=10,
        save_strategy="no",
        dataloader_num_workers=0,
        seed=0,
    )
    return DistillQuantArguments(**{**values, **overrides})


def uniform_student(teacher, options, bits: int, processor=None):
    """whisper-base with every targeted unit at ``bits`` (round-to-nearest), and its size in bytes; written as a
    packed folder under ``--save_dir`` when a processor is given."""
    student = copy.deepcopy(teacher)
    plan = starting_plan(student, teacher, arguments(tempfile.mkdtemp(), options, learnable_clipping=False))
    for unit in plan.units:
        if unit.modules:
            unit.bits = bits
    prepare_qat(student, plan.module_specs())
    shapes = plan_shapes(student, plan)
    if options.save_dir and processor is not None:
        folder = Path(options.save_dir) / f"uniform-int{bits}-RTN"
        print(f"saved {save_compressed(student, processor, folder, plan=plan, overwrite=True).folder}", flush=True)
    return student, plan_size(plan, shapes, fixed_bytes=fixed_bytes(student, plan, shapes))


def guided_trainer(teacher, train, collate, options, budget: int, folder: str, **overrides):
    args = arguments(folder, options, size_budget_mb=(budget + 0.5) / 1e6, **overrides)
    return DistillQuantTrainer(
        model=copy.deepcopy(teacher), teacher_model=teacher, args=args, train_dataset=train, data_collator=collate
    )


def selection(trainer) -> LayerSelectionCallback:
    return next(c for c in trainer.callback_handler.callbacks if isinstance(c, LayerSelectionCallback))


def bits_text(plan) -> str:
    return " ".join(
        f"{u.name.replace('decoder.', 'd').replace('encoder.', 'e').replace('embedding', 'emb')}:"
        f"{'f' if u.bits >= FLOAT_BITS else u.bits}"
        for u in plan.units
        if u.modules
    )


def main() -> None:
    (options,) = HfArgumentParser(BenchmarkArguments, description=__doc__).parse_args_into_dataclasses()
    torch.set_num_threads(options.threads)
    torch.manual_seed(0)
    started = time.time()

    teacher, processor = load_whisper(options.teacher)
    teacher.eval()
    dev = DevSet(teacher, processor, options.per_language, options.batch_size)
    train = concatenate_datasets(
        [rows(SPEECH / f"train_{lang}.jsonl", lang, options.train_per_language, processor) for lang in LANGUAGES]
    )
    collate = WhisperDataCollator(processor, teacher.config.decoder_start_token_id)
    table = []

    def record(name: str, size: int, model, plan_text: str = "") -> None:
        scores = dev.score(model)
        table.append((name, size, scores, plan_text))
        print(f"[{time.time() - started:6.0f} s] {name}: {size / 1e6:.2f} MB {scores} {plan_text}", flush=True)

    record("teacher (fp16)", 2 * sum(p.numel() for p in teacher.parameters()), teacher)
    with tempfile.TemporaryDirectory() as folder:
        for average in (float(b) for b in options.budgets.split(",")):
            low, high = math.floor(average), math.ceil(average)
            student, size = uniform_student(teacher, options, low, processor)
            if not any(name == f"uniform int{low} (RTN)" for name, *_ in table):
                record(f"uniform int{low} (RTN)", size, student)
            del student
            if low != high:  # between two uniform sizes: the guided plans against the lower uniform row
                size += round((average - low) * (uniform_student(teacher, options, high)[1] - size))
            for cost in ("output_kl", "local_error"):
                trainer = guided_trainer(teacher, train, collate, options, size, folder, selection_cost=cost)
                plan = selection(trainer).select(step=0)
                record(f"guided ({cost}) at {average:g}-bit bytes", plan.size_bytes, trainer.model, bits_text(plan))
                print(plan.summary(), flush=True)
                del trainer
        if options.train_steps:
            bits = 3
            _, size = uniform_student(teacher, options, bits)
            runs = {
                f"uniform int{bits}, {options.train_steps} steps": dict(quant_bit_choices=str(bits)),
                f"guided (output_kl) at int{bits} bytes, {options.train_steps} steps": dict(
                    size_budget_mb=(size + 0.5) / 1e6
                ),
            }
            for name, overrides in runs.items():
                trainer = DistillQuantTrainer(
                    model=copy.deepcopy(teacher),
                    teacher_model=teacher,
                    args=arguments(folder, options, **overrides),
                    train_dataset=train,
                    data_collator=collate,
                    processing_class=processor,
                )
                trainer.train()
                record(name, trainer.plan.size_bytes, trainer.model, bits_text(trainer.plan))
                if options.save_dir:
                    saved = trainer.save_compressed(
                        Path(options.save_dir) / name.split(",")[0].replace(" ", "-"), overwrite=True
                    )
                    print(f"saved {saved.folder}", flush=True)
                del trainer

    print(f"\n{options.per_language} dev utterances per language, {time.time() - started:.0f} s\n")
    print("| student | MB | KL en | KL zh | top-1 en | top-1 zh | bits |")
    print("|---|---|---|---|---|---|---|")
    for name, size, scores, plan_text in table:
        print(
            f"| {name} | {size / 1e6:.2f} | {scores['kl_en']:.3f} | {scores['kl_zh']:.3f} | "
            f"{100 * scores['top1_en']:.1f}% | {100 * scores['top1_zh']:.1f}% | {plan_text} |"
        )


if __name__ == "__main__":
    main()
