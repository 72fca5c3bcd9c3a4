"""KDQ on a GPTQ encoder: compress's int4 / int3 recipe with the frozen encoder quantized by GPTQ (llm-compressor)
instead of the output-error clip, the decoder and embedding trained with KDQ as the recipe trains them.

    OMP_NUM_THREADS=1 python benchmarks/gptq_init_kdq.py --level int4 \\
        --train_manifest $D/train_en.jsonl,$D/train_zh.jsonl,$D/synth_zh.jsonl --train_weights 2,1,1 \\
        --max_train_samples 240 --seed 42 --output_dir kdq-gptqenc-int4-s42 --gptq_cache benchmarks/results/cache
    hf-whisper-kdq evaluate kdq-gptqenc-int4-s42/compressed --manifest $D/dev.jsonl

Why: on the full dev set GPTQ (the linears; the tied embedding round-to-nearest) is the strongest post-training
row at the int4 size, and the recipe's student starts from the weaker output-error clip. The encoder's GPTQ codes are
exact: its weights are set to GPTQ's dequantized values and it trains without fake quantization (frozen: they never
change), so the packed folder, written with ``save_compressed(codes=...)``, holds GPTQ's codes and decodes as the
trained student did. GPTQ runs once per setting through ``gptq_baseline.gptq_codes`` (llm-compressor in its own
venv, calibration on ``--calibration_rows`` rows of each ``--calibration_manifests``), cached under
``--gptq_cache`` (results_table.py's cache: its GPTQ rows' runs are reused). The arguments are ``compress``'s
(``--level`` and the training defaults included) and so is the training path (``training_data``/``train_student``).
"""

from __future__ import annotations

import copy
import json
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from gptq_baseline import gptq_codes
from transformers import HfArgumentParser

from hf_whisper_kdq.compress import (
    CompressArguments,
    PhaseTimer,
    apply_level,
    teacher_and_student,
    train_student,
    training_data,
    with_training_defaults,
)
from hf_whisper_kdq.config import DistillQuantArguments
from hf_whisper_kdq.data import prepare_dataset
from hf_whisper_kdq.export import save_compressed
from hf_whisper_kdq.files import atomic_write_text
from hf_whisper_kdq.quant import QuantSpec, default_quant_targets, prepare_qat
from hf_whisper_kdq.selection import fp16_bytes

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class GPTQArguments:
    llmcompressor_python: str = field(
        default=str(ROOT.parent / "venv-llmc" / "bin" / "python"),
        metadata={"help": "python of the llm-compressor venv (see gptq_baseline.py for how to make it)"},
    )
    calibration_manifests: str = field(
        default=str(ROOT.parent / "shared" / "data" / "speech" / "train_en.jsonl")
        + ","
        + str(ROOT.parent / "shared" / "data" / "speech" / "train_zh.jsonl"),
        metadata={"help": "comma-separated manifests whose audio and transcripts calibrate GPTQ"},
    )
    calibration_rows: int = field(default=32, metadata={"help": "GPTQ calibration utterances from each manifest"})
    decoder_from_gptq: bool = field(
        default=False,
        metadata={
            "help": "also start the decoder's linears from GPTQ's dequantized values (they still train and are "
            "re-rounded by the recipe's fake quantization; default: the teacher's weights)"
        },
    )
    gptq_cache: str = field(
        default=str(ROOT / "benchmarks" / "results" / "cache"),
        metadata={"help": "folder of GPTQ runs (results_table.py's OUTPUT/cache: runs of the same setting are reused)"},
    )


def recipe_spec(args: DistillQuantArguments) -> QuantSpec:
    """The one width of a ``--level int4`` / ``int3`` run, in groups of ``quant_group_size``."""
    choices = [c for c in args.quant_bit_choices.split(",") if c.strip() != "float"]
    if len(choices) != 1 or args.quant_granularity != "per_group":
        raise ValueError("train one width in groups (--level int4 or int3): the encoder's GPTQ codes have one layout")
    return QuantSpec(int(choices[0]), "per_group", args.quant_group_size)


def main(argv: list[str] | None = None) -> dict:
    argv = with_training_defaults(list(sys.argv[1:] if argv is None else argv))
    parser = HfArgumentParser((CompressArguments, DistillQuantArguments, GPTQArguments), description=__doc__)
    compress, args, gptq = parser.parse_args_into_dataclasses(args=argv)
    decoder_layers, args = apply_level(compress, args)
    spec = recipe_spec(args)
    targets = set(args.quant_targets.split(","))
    if "encoder" not in targets or not args.freeze_encoder:
        raise ValueError("the GPTQ encoder is frozen and quantized: keep the recipe's --freeze_encoder true")
    output = Path(args.output_dir)
    timer = PhaseTimer()
    with timer("load teacher"):
        teacher, processor, student = teacher_and_student(compress, decoder_layers)
    with timer("GPTQ (llm-compressor)"):
        codes, gptq_run = gptq_codes(
            gptq.llmcompressor_python,
            teacher,
            processor,
            ["encoder", "decoder", "embedding"],  # the gptq-*-int*g32 rows' run, reused from the cache
            bits=spec.bits,
            group_size=spec.group_size,
            manifests=[Path(p) for p in gptq.calibration_manifests.split(",") if p.strip()],
            calibration_rows=gptq.calibration_rows,
            cache=Path(gptq.gptq_cache),
            threads=1,
        )
    encoder = default_quant_targets(student, decoder=False)
    encoder_codes = {name: codes[name] for name in encoder}
    starts = encoder + (default_quant_targets(student, encoder=False) if gptq.decoder_from_gptq else [])
    for name in starts:
        student.get_submodule(name).weight.data.copy_(codes[name].dequantize(torch.float32))
    # The encoder trains in float: its weights are GPTQ's values, frozen; only decoder and embedding fake-quantize
    # (so the package's own GPTQ, --level int4's default, has no encoder to quantize here).
    args = replace(
        args, quant_targets=",".join(sorted(targets - {"encoder"})), frozen_encoder_quantizer="round_to_nearest"
    )
    train = training_data(compress, teacher, processor, timer=timer, output_dir=args.output_dir, seed=args.seed)
    with timer("features and labels"):
        train_features, _ = prepare_dataset(
            train, processor, multilingual=bool(teacher.generation_config.is_multilingual)
        )
    trainer = train_student(student, teacher, processor, train_features, args, timer=timer)
    with timer("export"):
        packed = copy.deepcopy(trainer.whole_student())
        prepare_qat(packed, dict.fromkeys(encoder, spec))
        report = save_compressed(
            packed,
            processor,
            output / "compressed",
            teacher_fp16_bytes=fp16_bytes(teacher),
            codes=encoder_codes,
            overwrite=True,
        )
    summary = {
        "folder": str(report.folder),
        "weights_bytes": report.weights_bytes,
        "encoder": f"GPTQ {spec} codes (llm-compressor), frozen",
        "gptq": gptq_run,
        "phase_seconds": timer.seconds,
        "training_log": trainer.state.log_history,
        "plan": trainer.plan.to_dict(),
        "arguments": {"compress": asdict(compress), "training": args.to_dict(), "gptq": asdict(gptq)},
    }
    atomic_write_text(
        output / "gptq_init_kdq.json", json.dumps(summary, indent=2, ensure_ascii=False, default=str) + "\n"
    )
    print(f"{report.folder}: {report.weights_bytes / 1e6:.2f} MB of weights; phases {timer.seconds}")
    return summary


if __name__ == "__main__":
    main()
