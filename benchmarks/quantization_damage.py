"""Which part of a trained quantized student costs its error: each part put back to the teacher's float weights in
turn (the encoder, the token embedding, the decoder's layers), then the teacher's decoder quantized post-training
(round-to-nearest, this package's GPTQ; with the token embedding too) under the student's own encoder and embedding.
Each variant transcribes the same rows of a manifest (every ``--every``-th row of ``--languages``) and is scored.

    python benchmarks/quantization_damage.py kdq-int4-s1/compressed --manifest ../shared/data/speech/dev.jsonl \\
        --languages zh --every 3 --output_json damage.json

The GPTQ variants calibrate as the trainer does (``calibration.gptq_layers``, block after block, no clipping) on the
first rows of each ``--calibration`` manifest, never on the scored ones. What the numbers said for the default int4
recipe: benchmarks/README.md, "GPTQ start of the decoder".
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
from encoder_gptq_error import SPEECH, batches

from hf_whisper_kdq import load_whisper
from hf_whisper_kdq.calibration import gptq_layers
from hf_whisper_kdq.data import load_manifest
from hf_whisper_kdq.evaluation import evaluate_model
from hf_whisper_kdq.quant import QuantSpec, default_quant_targets, prepare_qat

EMBEDDING = ("model.decoder.embed_tokens.weight", "proj_out.weight")
PARTS = {
    "encoder": lambda key: key.startswith("model.encoder."),
    "embedding": lambda key: key in EMBEDDING,
    "decoder_layers": lambda key: key.startswith("model.decoder.") and key not in EMBEDDING,
}


def with_teacher_part(student, teacher, *parts: str):
    """A copy of ``student`` holding the teacher's float weights wherever one of ``PARTS[part]`` says."""
    model = copy.deepcopy(student)
    state, teacher_state = model.state_dict(), teacher.state_dict()
    taken = [PARTS[part] for part in parts]
    model.load_state_dict(
        {key: teacher_state[key] if any(part(key) for part in taken) else value for key, value in state.items()}
    )
    model.tie_weights()
    return model


def post_training_decoder(student, teacher, spec: QuantSpec, calibration, *, gptq: bool, embedding: bool):
    """The student with the teacher's decoder (and embedding) quantized post-training at ``spec``: GPTQ's codes on
    ``calibration``, or round-to-nearest with every group's scale from its largest weight."""
    model = with_teacher_part(student, teacher, "decoder_layers", *(["embedding"] if embedding else []))
    names = default_quant_targets(model, encoder=False, embedding=embedding)
    prepare_qat(model, dict.fromkeys(names, spec))
    if gptq:
        linears = [name for name in names if not name.endswith("embed_tokens")]
        gptq_layers(model, linears + (["proj_out"] if embedding else []), calibration)
    return model.eval()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("student", type=Path, help="a packed student folder (compress's compressed/)")
    parser.add_argument("--teacher", default="openai/whisper-base")
    parser.add_argument("--manifest", type=Path, default=SPEECH / "dev.jsonl")
    parser.add_argument("--languages", default="zh", help="comma-separated languages of the manifest to score")
    parser.add_argument("--every", type=int, default=3, help="score every n-th row of those languages")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group_size", type=int, default=32)
    parser.add_argument(
        "--calibration",
        default="train_en.jsonl:32,train_zh.jsonl:16,synth_zh.jsonl:16",
        help="manifest:rows,... (the first rows of each, in --speech) for the GPTQ variants",
    )
    parser.add_argument("--speech", type=Path, default=SPEECH)
    parser.add_argument("--max_new_tokens", type=int, default=444)
    parser.add_argument("--output_json", type=Path)
    args = parser.parse_args(argv)

    teacher, processor = load_whisper(args.teacher)
    student, _ = load_whisper(args.student)
    teacher, student = teacher.float().eval(), student.float().eval()
    rows = load_manifest(args.manifest, languages=args.languages.split(","))
    rows = rows.select(range(0, len(rows), args.every))
    calibration = []
    for entry in args.calibration.split(","):
        manifest, _, count = entry.partition(":")
        calibration += batches(teacher, processor, args.speech / manifest, 0, int(count))
    spec = QuantSpec(args.bits, "per_group", args.group_size, learnable_clipping=True)
    variants = {
        "student as trained": lambda: student,
        "float encoder (the teacher's)": lambda: with_teacher_part(student, teacher, "encoder"),
        "float token embedding (the teacher's)": lambda: with_teacher_part(student, teacher, "embedding"),
        "float decoder layers (the teacher's)": lambda: with_teacher_part(student, teacher, "decoder_layers"),
        "teacher's decoder layers, round-to-nearest": lambda: post_training_decoder(
            student, teacher, spec, calibration, gptq=False, embedding=False
        ),
        "teacher's decoder layers, GPTQ": lambda: post_training_decoder(
            student, teacher, spec, calibration, gptq=True, embedding=False
        ),
        "teacher's decoder layers and embedding, GPTQ": lambda: post_training_decoder(
            student, teacher, spec, calibration, gptq=True, embedding=True
        ),
        "teacher": lambda: teacher,
    }
    results = {"student": str(args.student), "rows": len(rows), "spec": str(spec), "variants": {}}
    for name, build in variants.items():
        with torch.no_grad():
            report = evaluate_model(build(), processor, rows, max_new_tokens=args.max_new_tokens, progress=False)
        corpora = report.to_dict(per_utterance=False)["corpora"]
        results["variants"][name] = [
            {key: corpus[key] for key in ("corpus", "error_rate", "substitutions", "deletions", "insertions")}
            for corpus in corpora
        ]
        print(name, *(f"{c['corpus']} {100 * c['error_rate']:.2f}%" for c in corpora), flush=True)
        if args.output_json:
            args.output_json.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
