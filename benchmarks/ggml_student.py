"""A KDQ student trained on whisper.cpp's own blocks, written as a whisper.cpp file and scored by whisper.cpp.

    OMP_NUM_THREADS=1 python benchmarks/ggml_student.py --level int3 --quant_format ggml --quant_bit_choices 3 \
        --train_manifest $D/train_en.jsonl,$D/train_zh.jsonl,$D/synth_zh.jsonl --train_weights 2,1,1 \
        --max_train_samples 240 --eval_manifest $D/dev.jsonl --seed 42 --output_dir kdq-q3k-s42

For the file types the packed Hugging Face folder cannot hold (the k-quants q3_K and q2_K: their sub-block scales
are 6- or 4-bit multiples of a super-block scale), which ``compress`` therefore refuses. The arguments are
``compress``'s (``--level`` and the training defaults included) and so is the training path
(``compress.training_data`` / ``train_student``); the student is written with ``export_whisper_cpp(...,
ftype="auto")`` (its own codes, checked) to ``OUTPUT_DIR/ggml-model.bin`` and, with ``--eval_manifest``, scored by
``export.ggml.evaluate_whisper_cpp`` with as many threads as torch uses (with whisper.cpp's own temperature fallback
unless ``--eval_temperature_fallback false``). ``OUTPUT_DIR/ggml_student.json`` holds the report, the phase times
and the arguments. Pass ``--quant_bit_choices`` (3 for q3_K, 2 for q2_K): with ``--quant_format ggml`` compress's
defaults are 4,8 whatever the level. compress's evaluation, export and push flags (``--evaluate_teacher``,
``--ctranslate2_quantization``, ``--push_to_hub``, ``--spec_augment``) do not apply here.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

import torch
from transformers import HfArgumentParser

from hf_whisper_kdq.compress import (
    CompressArguments,
    PhaseTimer,
    apply_level,
    evaluation_data,
    teacher_and_student,
    train_student,
    training_data,
    with_training_defaults,
)
from hf_whisper_kdq.config import DistillQuantArguments
from hf_whisper_kdq.data import prepare_dataset
from hf_whisper_kdq.export.ggml import evaluate_whisper_cpp, export_whisper_cpp, read_file_type
from hf_whisper_kdq.files import atomic_write_text


def main(argv: list[str] | None = None) -> dict:
    argv = with_training_defaults(list(sys.argv[1:] if argv is None else argv))
    parser = HfArgumentParser((CompressArguments, DistillQuantArguments), description=__doc__)
    compress, args = parser.parse_args_into_dataclasses(args=argv)
    if args.quant_format != "ggml":
        raise ValueError("this script trains for a whisper.cpp file: pass --quant_format ggml")
    decoder_layers, args = apply_level(compress, args)
    output = Path(args.output_dir)
    timer = PhaseTimer()
    with timer("load teacher"):
        teacher, processor, student = teacher_and_student(compress, decoder_layers)
    train = training_data(compress, teacher, processor, timer=timer, output_dir=args.output_dir, seed=args.seed)
    with timer("features and labels"):
        train_features, _ = prepare_dataset(
            train, processor, multilingual=bool(teacher.generation_config.is_multilingual)
        )
    trainer = train_student(student, teacher, processor, train_features, args, timer=timer)
    with timer("export whisper.cpp file"):
        path = export_whisper_cpp(
            trainer.whole_student(), processor, output / "ggml-model.bin", ftype="auto", overwrite=True
        )
    summary = {"file": str(path), "file_type": read_file_type(path), "file_bytes": path.stat().st_size}
    if compress.eval_manifest:
        with timer("evaluate"):
            report = evaluate_whisper_cpp(
                path,
                evaluation_data(compress),
                n_threads=torch.get_num_threads(),
                temperature_fallback=compress.eval_temperature_fallback,
            )
        print(report.summary_table())
        summary["evaluation"] = report.to_dict(per_utterance=False)
    summary |= {
        "phase_seconds": timer.seconds,
        "training_log": trainer.state.log_history,
        "plan": trainer.plan.to_dict(),
        "arguments": {"compress": asdict(compress), "training": args.to_dict()},
    }
    atomic_write_text(
        output / "ggml_student.json", json.dumps(summary, indent=2, ensure_ascii=False, default=str) + "\n"
    )
    print(f"{path}: {summary['file_type']}, {summary['file_bytes'] / 1e6:.2f} MB; phases {timer.seconds}")
    return summary


if __name__ == "__main__":
    main()
