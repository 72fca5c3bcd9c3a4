"""File size, accuracy and CPU speed of one Whisper model exported to whisper.cpp in each file type (run by
pywhispercpp), to faster-whisper (CTranslate2 int8) and, with ``--onnx``, to ONNX Runtime, beside the transformers model
itself.

    python benchmarks/whisper_cpp_ftypes.py                                   # whisper-base, 40 LJSpeech (en)
    python benchmarks/whisper_cpp_ftypes.py openai/whisper-tiny.en --ftypes q8_0,q4_0 --limit 10
    python benchmarks/whisper_cpp_ftypes.py ./my-student --keep ./ggml --json results.json
    python benchmarks/whisper_cpp_ftypes.py --corpus aishell1-sample --language zh --ftypes q4_0   # Mandarin, CER
    python benchmarks/whisper_cpp_ftypes.py kdq-output --ftypes q4_0 --onnx         # + the ONNX export's own codes
    python benchmarks/whisper_cpp_ftypes.py --ftypes q4_0 --onnx --onnx_quantize int4-g32   # + naive int4 ONNX

The model is loaded once (``sources.load_whisper``) and written with ``export.ggml.export_whisper_cpp`` in each
``--ftypes``; every file decodes the same utterances greedily with ``--threads`` threads
(``transcribe_whisper_cpp``), one utterance off the clock first, and is scored by ``scoring.score``. The
transformers model itself (float32, batched) is the reference row (``--no_transformers`` skips it), and the model's
own CTranslate2 int8 export, decoded by faster-whisper with ``compute_type="int8"``, another (``--no_faster_whisper``). Speed is given
as CPU seconds of this process per audio second (all of whisper.cpp's threads count), which a busy machine changes
less than wall time; wall time is reported too. The ONNX row is ``export.onnx.export_onnx`` of ``--model`` itself (so
a compressed folder's packed codes are exported exactly, a float model at ``--onnx_quantize`` or in float16), decoded
by ``evaluation_onnx.OnnxWhisper`` with ``--threads`` intra-op threads; its size is the two graphs' bytes.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import HfArgumentParser

from hf_whisper_kdq.data import load_manifest
from hf_whisper_kdq.evaluation import audio_values, transcribe
from hf_whisper_kdq.export.ggml import FTYPES, export_whisper_cpp, load_whisper_cpp, transcribe_whisper_cpp
from hf_whisper_kdq.scoring import CER_LANGUAGES, score
from hf_whisper_kdq.sources import load_whisper

DEFAULT_MANIFEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "speech" / "dev.jsonl"


@dataclass
class FtypeArguments:
    """What to export and score (``HfArgumentParser``; a leading bare word is ``--model``)."""

    model: str = field(default="openai/whisper-base", metadata={"help": "any sources.load_whisper source"})
    manifest: str = field(default=str(DEFAULT_MANIFEST), metadata={"help": "JSONL manifest"})
    corpus: str = field(default="ljspeech", metadata={"help": "corpus to keep"})
    language: str = field(default="en", metadata={"help": "language of the rows to keep"})
    limit: int = field(default=40, metadata={"help": "utterances"})
    ftypes: str = field(default=",".join(FTYPES), metadata={"help": "comma-separated file types"})
    threads: int = field(default=2, metadata={"help": "CPU threads of each engine"})
    keep: str | None = field(default=None, metadata={"help": "keep the ggml files in this folder (None: a temp one)"})
    no_transformers: bool = field(default=False, metadata={"help": "skip the transformers reference row"})
    no_faster_whisper: bool = field(default=False, metadata={"help": "skip the faster-whisper (CTranslate2) int8 row"})
    onnx: bool = field(default=False, metadata={"help": "add the ONNX Runtime export's row"})
    onnx_quantize: str | None = field(
        default=None, metadata={"help": "quantize a float model on ONNX export to this spec, e.g. int4-g32"}
    )
    json: str | None = field(default=None, metadata={"help": "write the rows to this JSON file"})


def parse_args(argv=None) -> FtypeArguments:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-"):
        argv = ["--model", *argv]  # the model may come first, without its flag
    (args,) = HfArgumentParser(FtypeArguments, description=__doc__).parse_args_into_dataclasses(args=argv)
    return args


def _timed(decode) -> tuple[list[str], float, float]:
    cpu, wall = time.process_time(), time.perf_counter()
    texts = decode()
    return texts, time.process_time() - cpu, time.perf_counter() - wall


def _row(name: str, size: int | None, references, texts, cpu: float, wall: float, audio_seconds: float, language: str):
    scores = score(references, texts, language)
    return {
        "format": name,
        "file_bytes": size,
        "metric": scores["metric"],
        "error_rate": scores[scores["metric"]],
        "cpu_seconds_per_audio_second": cpu / audio_seconds,
        "wall_seconds_per_audio_second": wall / audio_seconds,
    }


def _print_row(row: dict) -> None:
    size = "" if row["file_bytes"] is None else f"{row['file_bytes'] / 1e6:.1f}"
    print(
        f"{row['format']:<22} {size:>8} {row['error_rate']:>7.1%} {row['cpu_seconds_per_audio_second']:>16.3f} "
        f"{row['wall_seconds_per_audio_second']:>17.3f}",
        flush=True,
    )


def run(args: FtypeArguments) -> list[dict]:
    torch.set_num_threads(args.threads)
    dataset = load_manifest(args.manifest, languages=[args.language], corpora=[args.corpus], limit=args.limit)
    if len(dataset) == 0:
        raise SystemExit(f"no rows selected from {args.manifest}: check --corpus / --language")
    audios, references = audio_values(dataset), list(dataset["text"])
    audio_seconds = float(sum(dataset["duration"]))
    model, processor = load_whisper(args.model)
    rows = []
    if not args.no_transformers:
        transcribe(model, processor, audios[:1], languages=args.language, progress=False)  # warm-up, off the clock
        texts, cpu, wall = _timed(lambda: transcribe(model, processor, audios, languages=args.language, progress=False))
        rows.append(_row("transformers float32", None, references, texts, cpu, wall, audio_seconds, args.language))
        _print_row(rows[-1])
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(args.keep or scratch)
        for ftype in filter(None, args.ftypes.split(",")):
            path = export_whisper_cpp(model, processor, folder / f"ggml-{ftype}.bin", ftype=ftype, overwrite=True)
            whisper = load_whisper_cpp(path, n_threads=args.threads)
            transcribe_whisper_cpp(whisper, audios[:1], args.language)  # warm-up, off the clock
            texts, cpu, wall = _timed(lambda whisper=whisper: transcribe_whisper_cpp(whisper, audios, args.language))
            size = path.stat().st_size
            rows.append(_row(f"whisper.cpp {ftype}", size, references, texts, cpu, wall, audio_seconds, args.language))
            _print_row(rows[-1])
        if not args.no_faster_whisper:
            ct2_folder = folder / "ctranslate2"
            rows.append(_faster_whisper_row(model, processor, args, ct2_folder, audios, references, audio_seconds))
            _print_row(rows[-1])
        if args.onnx:
            rows.append(_onnx_row(args, folder / "onnx", audios, references, audio_seconds))
            _print_row(rows[-1])
    return rows


def _faster_whisper_row(
    model, processor, args: FtypeArguments, folder: Path, audios, references, audio_seconds: float
) -> dict:
    from faster_whisper import WhisperModel

    from hf_whisper_kdq.evaluation_ctranslate2 import transcribe_faster_whisper
    from hf_whisper_kdq.export.ctranslate2 import export_ctranslate2

    export_ctranslate2(model, processor, folder, quantization="int8", overwrite=True)
    whisper = WhisperModel(str(folder), device="cpu", compute_type="int8", cpu_threads=args.threads)
    transcribe_faster_whisper(whisper, audios[:1], args.language)  # warm-up, off the clock
    texts, cpu, wall = _timed(lambda: transcribe_faster_whisper(whisper, audios, args.language))
    size = (folder / "model.bin").stat().st_size
    return _row("faster-whisper int8", size, references, texts, cpu, wall, audio_seconds, args.language)


def _onnx_row(args: FtypeArguments, folder: Path, audios, references, audio_seconds: float) -> dict:
    from hf_whisper_kdq.evaluation_onnx import OnnxWhisper
    from hf_whisper_kdq.export.onnx import export_onnx, onnx_file_bytes

    export_onnx(args.model, None, folder, quantize=args.onnx_quantize, overwrite=True)
    whisper = OnnxWhisper(folder, threads=args.threads)
    whisper.transcribe(audios[:1], args.language)  # warm-up, off the clock
    texts, cpu, wall = _timed(lambda: whisper.transcribe(audios, args.language))
    name = f"onnxruntime {args.onnx_quantize or 'codes/fp16'}"
    return _row(name, onnx_file_bytes(folder), references, texts, cpu, wall, audio_seconds, args.language)


def main(argv=None) -> None:
    args = parse_args(argv)
    print(f"{args.model}, {args.limit} {args.corpus} ({args.language}) utterances, {args.threads} threads")
    metric = "CER" if args.language in CER_LANGUAGES else "WER"
    print(f"{'format':<22} {'file MB':>8} {metric:>7} {'CPU s / audio s':>16} {'wall s / audio s':>17}", flush=True)
    rows = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
