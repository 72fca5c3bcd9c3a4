"""Accuracy and speed of one Whisper model under transformers (PyTorch) and under CTranslate2 via faster-whisper.

    python benchmarks/ctranslate2_vs_transformers.py                                  # whisper-tiny.en, 40 LJSpeech
    python benchmarks/ctranslate2_vs_transformers.py --limit 20 --json results.json
    python benchmarks/ctranslate2_vs_transformers.py openai/whisper-base --corpora aishell --languages zh
    python benchmarks/ctranslate2_vs_transformers.py ./my-student --quantization int8_float32 --ct2_dir ./my-student-ct2

The model is loaded once (``sources.load_whisper``: a Hub id, an offline pack, an HF / CTranslate2 folder, an
OpenAI .pt) and exported from memory with ``export.ctranslate2.export_ctranslate2``, so both engines hold the
same weights. Transformers runs ``evaluation.evaluate_model`` (float32, batched); CTranslate2 runs
``evaluate_faster_whisper`` (one utterance at a time). Both decode greedily (``--num_beams``), get the same number
of CPU threads (``--threads``), decode one utterance off the clock first, and are scored by ``scoring.score``.
RTF = decode seconds / audio seconds (lower is faster). Timings depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import HfArgumentParser

from hf_whisper_kdq.data import load_manifest
from hf_whisper_kdq.evaluation import evaluate_model
from hf_whisper_kdq.evaluation_ctranslate2 import evaluate_faster_whisper
from hf_whisper_kdq.export.ctranslate2 import QUANTIZATIONS, export_ctranslate2
from hf_whisper_kdq.sources import load_whisper

DEFAULT_MANIFEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "speech" / "dev.jsonl"


def _split(value: str | None) -> list[str] | None:
    items = [item.strip() for item in (value or "").split(",") if item.strip()]
    return items or None


@dataclass
class BenchmarkArguments:
    """What to compare (``HfArgumentParser``: ``--help`` lists every field; a leading bare word is ``--model``)."""

    model: str = field(default="openai/whisper-tiny.en", metadata={"help": "any sources.load_whisper source"})
    manifest: str = field(default=str(DEFAULT_MANIFEST), metadata={"help": "JSONL manifest"})
    corpora: str = field(default="ljspeech", metadata={"help": "comma-separated corpora to keep; '' for all"})
    languages: str | None = field(default=None, metadata={"help": "comma-separated language codes to keep (None: all)"})
    limit: int = field(default=40, metadata={"help": "utterances"})
    batch_size: int = field(default=8, metadata={"help": "transformers batch size"})
    num_beams: int = field(default=1, metadata={"help": "1: greedy (both engines)"})
    quantization: str = field(default="int8", metadata={"help": "CTranslate2 weight type", "choices": QUANTIZATIONS})
    compute_type: str = field(
        default="default", metadata={"help": "faster-whisper compute type ('default': the weights')"}
    )
    threads: int = field(
        default=torch.get_num_threads(), metadata={"help": "CPU threads for both engines (torch's number)"}
    )
    ct2_dir: str | None = field(
        default=None, metadata={"help": "keep the CTranslate2 export here (None: a temporary folder)"}
    )
    json: str | None = field(default=None, metadata={"help": "write both reports and the ratios to this JSON file"})


def parse_args(argv=None) -> BenchmarkArguments:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-"):
        argv = ["--model", *argv]  # the model may come first, without its flag, as in the examples above
    (args,) = HfArgumentParser(BenchmarkArguments, description=__doc__).parse_args_into_dataclasses(args=argv)
    return args


def run(args: BenchmarkArguments) -> dict:
    torch.set_num_threads(args.threads)
    dataset = load_manifest(
        args.manifest, languages=_split(args.languages), corpora=_split(args.corpora), limit=args.limit
    )
    if len(dataset) == 0:
        raise SystemExit(f"no rows selected from {args.manifest}: check --corpora / --languages")
    model, processor = load_whisper(args.model)
    transformers_report = evaluate_model(
        model, processor, dataset, batch_size=args.batch_size, num_beams=args.num_beams, progress=False
    )
    with tempfile.TemporaryDirectory() as scratch:
        folder = export_ctranslate2(
            model,
            processor,
            args.ct2_dir or Path(scratch) / "ct2",
            quantization=args.quantization,
            overwrite=args.ct2_dir is None,
        )
        ct2_report = evaluate_faster_whisper(
            folder, dataset, beam_size=args.num_beams, compute_type=args.compute_type, cpu_threads=args.threads
        )
    reports = {"transformers": transformers_report, "ctranslate2": ct2_report}
    rows = [
        {
            "engine": engine,
            "dtype": report.dtype,
            "language": code,
            "metric": entry["metric"],
            "error_rate": entry["pooled"],
            "n_utterances": entry["n_utterances"],
            "audio_seconds": entry["audio_seconds"],
            "decode_seconds": entry["decode_seconds"],
            "rtf": entry["rtf"],
            "size_mib": report.model_size_bytes / 2**20,
        }
        for engine, report in reports.items()
        for code, entry in report.languages.items()
    ]
    reference, ct2 = transformers_report, ct2_report
    ratios = {
        "speedup (transformers RTF / ctranslate2 RTF)": reference.rtf / ct2.rtf,
        "size ratio (transformers / ctranslate2)": reference.model_size_bytes / ct2.model_size_bytes,
    }
    for code, entry in ct2.languages.items():
        change = 100 * (entry["pooled"] - reference.languages[code]["pooled"])
        ratios[f"{entry['metric'].upper()} {code} change (ctranslate2 - transformers, points)"] = change
    return {
        "model": args.model,
        "manifest": args.manifest,
        "threads": args.threads,
        "batch_size": args.batch_size,
        "num_beams": args.num_beams,
        "quantization": args.quantization,
        "rows": rows,
        "ratios": ratios,
        "reports": {engine: report.to_dict(per_utterance=True) for engine, report in reports.items()},
    }


def markdown(result: dict) -> str:
    lines = [
        f"model {result['model']} (CTranslate2 weights {result['quantization']}), {result['threads']} CPU "
        f"threads, beams {result['num_beams']}; transformers batch {result['batch_size']}, faster-whisper one "
        "at a time",
        "",
        "| engine | dtype | metric | error rate | utterances | audio s | decode s | RTF | weights MiB |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['engine']} | {row['dtype']} | {row['metric'].upper()} ({row['language']}) | "
            f"{100 * row['error_rate']:.2f}% | {row['n_utterances']} | {row['audio_seconds']:.1f} | "
            f"{row['decode_seconds']:.1f} | {row['rtf']:.3f} | {row['size_mib']:.1f} |"
        )
    lines.append("")
    lines += [
        f"- {name}: {value:+.2f}" if "points" in name else f"- {name}: {value:.2f}x"
        for name, value in result["ratios"].items()
    ]
    return "\n".join(lines)


def main(argv=None) -> None:
    logging.basicConfig(level=logging.WARNING)
    args = parse_args(argv)
    result = run(args)
    print(markdown(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"written to {args.json}")


if __name__ == "__main__":
    main()
