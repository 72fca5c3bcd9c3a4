"""Bytes on disk of round-to-nearest packed exports of whisper-base, and their error rates when loaded the way a
user loads them (plain ``WhisperForConditionalGeneration.from_pretrained(folder)``, no import of this package's
quantizer in the model).

    python benchmarks/packed_folder.py --specs int4-g32,int4-g128,int3-g32 --eval_rows 40

Each spec quantizes every linear of the encoder and decoder and the token embedding (one integer width, so the
export takes transformers' dense load path and stores the embedding packed: see ``hf_whisper_kdq.export.compressed``).
``--eval_rows N`` scores the first N LJSpeech and the first N AISHELL rows of ``../shared/data/speech/dev.jsonl``
(greedy), also for the fp16 teacher; 0 skips scoring. Prints one table row per model.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser, WhisperForConditionalGeneration

from hf_whisper_kdq import evaluate_model, load_manifest, load_whisper
from hf_whisper_kdq.export import save_compressed
from hf_whisper_kdq.quant import default_quant_targets, prepare_qat
from hf_whisper_kdq.sources import save_whisper

EMBEDDING = "model.decoder.embed_tokens"


@dataclass
class PackedFolderArguments:
    specs: str = field(default="int4-g32,int4-g128,int3-g32", metadata={"help": "Comma-separated quant specs."})
    teacher: str = field(default="openai/whisper-base", metadata={"help": "Model to quantize (load_whisper name)."})
    eval_rows: int = field(default=40, metadata={"help": "Dev rows per corpus to score (0: sizes only)."})
    manifest: str = field(default="../shared/data/speech/dev.jsonl", metadata={"help": "Evaluation manifest."})
    output_dir: str | None = field(default=None, metadata={"help": "Keep the folders here (default: temporary)."})


def _scores(folder: Path, processor, args: PackedFolderArguments) -> str:
    if not args.eval_rows:
        return "–"
    model = WhisperForConditionalGeneration.from_pretrained(folder).eval()
    cells = []
    for corpus in ("ljspeech", "aishell1-sample"):
        rows = load_manifest(args.manifest, corpora=[corpus], limit=None).select(range(args.eval_rows))
        report = evaluate_model(model, processor, rows, progress=False)
        (entry,) = report.corpora
        cells.append(f"{100 * entry['error_rate']:.1f}%")
    return " / ".join(cells)


def main() -> None:
    (args,) = HfArgumentParser(PackedFolderArguments).parse_args_into_dataclasses()
    root = Path(args.output_dir or tempfile.mkdtemp(prefix="packed-folder-"))
    _, processor = load_whisper(args.teacher)
    print("| model | model.safetensors | all files | embedding | WER LJSpeech / CER AISHELL |")
    print("|---|---:|---:|---|---|")
    teacher_folder = save_whisper(load_whisper(args.teacher)[0].half(), processor, root / "teacher-fp16")
    sizes = [p.stat().st_size for p in teacher_folder.iterdir() if p.is_file()]
    weights = (teacher_folder / "model.safetensors").stat().st_size
    print(
        f"| teacher (fp16 weights) | {weights / 1e6:.1f} MB | {sum(sizes) / 1e6:.1f} MB | fp16 | "
        f"{_scores(teacher_folder, processor, args)} |"
    )
    for spec in args.specs.split(","):
        model = load_whisper(args.teacher)[0]
        prepare_qat(model, dict.fromkeys([*default_quant_targets(model), EMBEDDING], spec))
        report = save_compressed(model, processor, root / spec, overwrite=True)
        embedding = "packed" if report.embedding_quantized else "fp16"
        print(
            f"| RTN {spec} | {report.weights_bytes / 1e6:.1f} MB | {report.total_bytes / 1e6:.1f} MB | {embedding} | "
            f"{_scores(report.folder, processor, args)} |"
        )


if __name__ == "__main__":
    main()
