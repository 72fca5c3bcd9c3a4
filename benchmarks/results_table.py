"""The results table: size on disk, error rates and speed of Whisper-KDQ against its baselines, on real speech.

    python benchmarks/results_table.py --list                                   # the rows and what each does
    python benchmarks/results_table.py --rows teacher,tiny.en,ptq-int8 --eval_limit 30
    python benchmarks/results_table.py --rows kdq-d2-u4 --train_steps 2000      # one row per invocation is fine
    python benchmarks/results_table.py --merge                                  # table + figure from every row

Each row is computed, written to ``OUTPUT/rows/<row>.json`` (with the command, machine and date), and then every
row JSON under OUTPUT is merged into ``OUTPUT/results.md``, ``OUTPUT/results.json`` and the figure
``OUTPUT/wer_vs_bytes.png`` (LJSpeech WER and AISHELL CER against bytes on disk, one panel each, via
``figures.plot_size_vs_error``); the table is printed at the end. ``--merge`` only merges.

Data (``../shared/data/speech``; the script exits cleanly with a message when it is absent): ``dev.jsonl`` is the
evaluation set (LJSpeech, English, WER; AISHELL-1, Mandarin, CER), the first ``--eval_limit`` utterances of each
corpus. Trained rows learn from the first ``--train_rows`` LibriSpeech utterances of ``unlabeled.jsonl``, labelled
by the teacher (``labelling.pseudo_label``; labels cached in ``OUTPUT/cache``), plus ``--synthetic_rows``
synthetic utterances (``synthesis``), assembled by ``compress.training_data``; with ``--train_manifest`` (e.g.
``train_en.jsonl,train_zh.jsonl,synth_zh.jsonl --train_weights 2,1,1``) they learn from that mixture instead.

Columns:

* bytes on disk: the weights file(s) of the row's checkpoint: an fp16 ``model.safetensors`` for the references and
  the float (distillation-only) student, the packed compressed-tensors ``model.safetensors`` written by
  ``export.save_compressed`` for quantized rows. The token embedding is packed there when every quantized layer has
  one width (PTQ rows, uniform plans), else stored as its dequantized fp16 table, whatever its planned bits.
  GPTQ rows (kind ``gptq``) store GPTQ's codes in the layout of the round-to-nearest row with the same specs
  (``save_compressed(codes=...)``), so their bytes equal that row's; they are evaluated from that folder, loaded
  as a user loads it.
* ratio to teacher fp16: the teacher's fp16 weights file / this row's bytes on disk (> 1: smaller).
* paper accounting ratio: teacher fp16 bytes (2 per parameter) / the paper's size model of the row
  (``compression_report.json``'s ``paper_accounting.planned_bytes``: quantized weights at their planned bits incl.
  the embedding, scales at 2 bytes, the rest fp16).
* WER LJSpeech / CER AISHELL: ``evaluation.evaluate_model`` (greedy, fp32 on CPU, normalized as in the Whisper
  paper); English-only models are not run on AISHELL.
* CPU real-time factor (transformers): decode seconds / audio seconds of that evaluation, over all evaluated audio.
  Quantized rows are evaluated with their quantization baked in (``quant.convert_qat``: the same values as the
  exported file, in fp32), so the RTF is that of an fp32 model of the same shape, not of integer kernels.
* CT2 int8 RTF: the row exported with ``export.ctranslate2.export_ctranslate2(quantization="int8")`` (embedding
  included in int8; 2/3/4-bit layers become int8 codes of their dequantized values) and decoded by
  ``evaluate_faster_whisper``, one utterance at a time (``--no-ct2`` skips it). Its size and error rates are in a
  second table.
* ``--ggml TYPE``: the row also written as a whisper.cpp file (``export.ggml.export_whisper_cpp``) and decoded by
  whisper.cpp (``evaluate_whisper_cpp``) on the same utterances and threads: a third table gives the bytes on disk of
  each format (HF folder, whisper.cpp file, CT2 int8) and the real-time factor of each runtime.

Timings depend on the machine and on what else runs on it: the row JSON records CPU count, torch threads and the
load average before and after.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import platform
import shlex
import shutil
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch
from results_merge import merge
from results_rows import PRESETS, ROWS
from results_runners import RUNNERS, Context, evaluation_entry, sizes_from_report
from transformers import HfArgumentParser

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "speech"
DEFAULT_OUTPUT = ROOT / "benchmarks" / "results"

logger = logging.getLogger("results_table")


# ---- command line ----------------------------------------------------------------------------------------------------
@dataclass
class TableArguments:
    """What to compute and how (``HfArgumentParser``: ``--help`` lists every field)."""

    rows: str | None = field(
        default=None,
        metadata={"help": f"comma-separated rows and presets ({', '.join(PRESETS)}) to compute; see --list"},
    )
    list_rows: bool = field(default=False, metadata={"help": "list the rows and exit", "aliases": ["--list"]})
    merge: bool = field(default=False, metadata={"help": "compute nothing: merge the row JSONs into the table"})
    compress_runs: str | None = field(
        default=None,
        metadata={
            "help": "compute nothing: add rows from `hf-whisper-kdq compress` output folders, NAME=FOLDER or "
            "NAME=FOLDER:EVAL.json (a report of `hf-whisper-kdq evaluate --output_json` on the compressed folder; "
            "default: the run's own compressed/eval_report.json), comma-separated; then merge"
        },
    )
    eval_limit: int | None = field(default=None, metadata={"help": "utterances per corpus (default: all)"})
    train_steps: int = field(default=300, metadata={"help": "optimizer steps of trained rows"})
    train_rows: int | None = field(
        default=None,
        metadata={"help": "teacher-labelled LibriSpeech utterances for training (default: all of unlabeled.jsonl)"},
    )
    train_manifest: str | None = field(
        default=None,
        metadata={
            "help": "comma-separated training manifests (names relative to --data, e.g. train_en.jsonl,train_zh.jsonl,"
            "synth_zh.jsonl), mixed by hf_whisper_kdq.mixture in the shares of --train_weights; replaces the "
            "teacher-labelled LibriSpeech rows"
        },
    )
    train_weights: str | None = field(
        default=None, metadata={"help": "weights of the --train_manifest sources, e.g. 2,1,1 (default: concatenated)"}
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "cap on training rows (of the mixture, in its shares)"}
    )
    synthetic_rows: int = field(default=120, metadata={"help": "synthetic training utterances (0: none)"})
    synthetic_text: str | None = field(
        default=None,
        metadata={
            "help": "id<TAB>text file to synthesize them from (default: the package's embedded prompts, of which 187 "
            "are for training; e.g. ../shared/data/text/ljspeech_prompts.tsv for more)"
        },
    )
    train_batch_size: int = field(default=8, metadata={"help": "per-device training batch size"})
    learning_rate: float = field(default=1e-4, metadata={"help": "peak learning rate of trained rows"})
    batch_size: int = field(default=16, metadata={"help": "transformers evaluation batch size"})
    max_new_tokens: int = field(
        default=128,
        metadata={
            "help": "cap on decoded tokens per utterance in evaluations (the longest dev.jsonl reference is 38 "
            "tokens): bounds the time a degenerate student spends repeating itself up to Whisper's 448 positions"
        },
    )
    teacher: str = field(default="openai/whisper-base", metadata={"help": "any sources.load_whisper source"})
    tiny: str = field(default="openai/whisper-tiny.en", metadata={"help": "the original small model of row tiny.en"})
    data: str = field(default=str(DEFAULT_DATA), metadata={"help": "folder with dev.jsonl and unlabeled.jsonl"})
    output: str = field(default=str(DEFAULT_OUTPUT), metadata={"help": "results folder"})
    threads: int = field(
        default_factory=torch.get_num_threads, metadata={"help": "CPU threads for torch and CTranslate2 (torch's)"}
    )
    ct2: bool = field(
        default=True, metadata={"help": "also export to CTranslate2 int8 and time faster-whisper (--no-ct2: not)"}
    )
    ggml: str | None = field(
        default=None,
        metadata={
            "help": "also write each row as a whisper.cpp file of this type (f16, q8_0, q5_0, q4_0, q3_K, or auto: "
            "the type of a ggml-trained student's own codes; codes of another grid are re-quantized with ggml's "
            "rule) and score and time it with "
            "whisper.cpp, one utterance at a time on --threads threads (default: not; a full dev set takes whisper.cpp "
            "~100 min on one core)"
        },
    )
    keep_exports: bool = field(
        default=False,
        metadata={"help": "keep each row's exported checkpoints under OUTPUT/<row>/ (default: deleted once measured)"},
    )
    seed: int = field(default=0, metadata={"help": "training seed"})
    bf16: bool = field(
        default=False,
        metadata={
            "help": "train in bf16 CPU autocast (only worth it where the CPU has native bf16: AVX512-BF16 or AMX)"
        },
    )
    llmcompressor_python: str = field(
        default=str(ROOT.parent / "venv-llmc" / "bin" / "python"),
        metadata={"help": "python of the llm-compressor venv that runs the GPTQ rows (see gptq_baseline.py)"},
    )
    calibration_manifests: str = field(
        default="train_en.jsonl,train_zh.jsonl",
        metadata={"help": "comma-separated manifests under --data whose audio and transcripts calibrate GPTQ"},
    )
    calibration_rows: int = field(default=128, metadata={"help": "GPTQ calibration utterances from each manifest"})
    row_names: list[str] = field(init=False, default_factory=list)

    def __post_init__(self):
        if self.list_rows:
            return
        if not self.merge and not self.rows and not self.compress_runs:
            raise ValueError("give --rows (see --list), --compress_runs, or --merge to only rebuild the table")
        positive = (
            "eval_limit",
            "max_new_tokens",
            "train_steps",
            "train_rows",
            "max_train_samples",
            "train_batch_size",
            "batch_size",
            "calibration_rows",
        )
        for name in (*positive, "threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name} must be >= 1")
        if self.synthetic_rows < 0:
            raise ValueError("--synthetic_rows must be >= 0 (0: no synthetic speech)")
        if self.ggml is not None:
            from hf_whisper_kdq.export.ggml import FTYPES

            if self.ggml not in (*FTYPES, "auto"):
                raise ValueError(f"--ggml {self.ggml!r}: give one of {', '.join(FTYPES)} or auto")
        self.row_names = expand_rows(self.rows) if self.rows and not self.merge else []
        for entry in (self.compress_runs or "").split(","):
            if entry and "=" not in entry:
                raise ValueError(f"--compress_runs {entry!r}: give NAME=FOLDER or NAME=FOLDER:EVAL.json")


def parse_args(argv=None) -> TableArguments:
    (args,) = HfArgumentParser(TableArguments, description=__doc__).parse_args_into_dataclasses(args=argv)
    return args


def expand_rows(text: str) -> list[str]:
    names: list[str] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        if item not in PRESETS and item not in ROWS:
            raise ValueError(f"unknown row {item!r}: choose from {', '.join(ROWS)} or a preset ({', '.join(PRESETS)})")
        names += PRESETS.get(item, [item])
    return list(dict.fromkeys(names))


def machine_info(threads: int) -> dict:
    import transformers

    cpu_model = None
    try:
        cpu_model = next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            None,
        )
    except OSError:
        pass
    info = {
        "cpu_count": os.cpu_count(),
        "cpus_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": cpu_model,
        "torch_threads": threads,
        "cuda": torch.cuda.is_available(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    try:
        import ctranslate2

        info["ctranslate2"] = ctranslate2.__version__
    except ImportError:
        info["ctranslate2"] = None
    return info


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def run_row(ctx: Context, name: str, command: str, machine: dict) -> Path:
    row = ROWS[name]
    row_dir = ctx.output / name
    row_dir.mkdir(parents=True, exist_ok=True)
    started, load_before, clock = dt.datetime.now(dt.UTC), load_average(), time.perf_counter()
    phases_before = dict(ctx.timer.seconds)
    result = {
        "row": name,
        "method": row["method"],
        "description": row["description"],
        "kind": row["kind"],
        "config": {k: v for k, v in row.items() if k not in ("method", "description", "kind")},
        "teacher": ctx.args.teacher,
        "training": None,
        "plan": None,
    }
    try:
        RUNNERS[row["kind"]](ctx, name, row, row_dir, result)
    finally:
        if not ctx.args.keep_exports:
            for sub in ("compressed", "ctranslate2-int8", "trainer"):
                shutil.rmtree(row_dir / sub, ignore_errors=True)
    result["eval_limit_per_corpus"] = ctx.args.eval_limit
    result["smoke"] = ctx.args.eval_limit is not None or (row["kind"] == "train" and ctx.args.train_steps < 1000)
    result["phase_seconds"] = {k: round(v, 1) for k, v in ctx.timer.seconds.items() if phases_before.get(k) != v}
    result["wall_seconds"] = round(time.perf_counter() - clock, 1)
    result["command"] = command
    result["machine"] = {**machine, "load_average_before": load_before, "load_average_after": load_average()}
    result["date"] = started.isoformat(timespec="seconds")
    path = ctx.output / "rows" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    logger.info("%s done in %.0f s: %s", name, result["wall_seconds"], path)
    return path


def compress_run_row(ctx: Context, name: str, folder: Path, eval_json: Path | None, machine: dict) -> dict:
    """A row of the table from an `hf-whisper-kdq compress` output folder: the sizes of its packed folder, the
    evaluation of its compressed model (``eval_json``, else the run's own), its training as compress recorded it."""
    from hf_whisper_kdq.evaluation import EvaluationReport
    from hf_whisper_kdq.export import CompressionReport

    summary = json.loads((folder / "compress_summary.json").read_text(encoding="utf-8"))
    arguments = summary["arguments"]
    compress, training = arguments.get("compress", {}), arguments.get("training", {})
    if compress.get("teacher") != ctx.args.teacher:
        raise ValueError(
            f"{folder} was compressed from {compress.get('teacher')}, the table's ratios are against --teacher "
            f"{ctx.args.teacher}: pass --teacher {compress.get('teacher')}"
        )
    if eval_json is None:
        evaluations = json.loads((folder / "compressed" / "eval_report.json").read_text(encoding="utf-8"))
        report = EvaluationReport.from_dict(evaluations["compressed"])
    else:
        report = EvaluationReport.load_json(eval_json)
    training_log = summary.get("training_log") or []
    return {
        "row": name,
        "method": "KDQ (hf-whisper-kdq compress)",
        "description": f"`hf-whisper-kdq compress --level {compress.get('level', '?')}` output {folder.name}, "
        f"{training.get('max_steps')} steps, seed {training.get('seed')}",
        "kind": "compress-run",
        "teacher": compress.get("teacher"),
        "sizes": sizes_from_report(CompressionReport.load(folder / "compressed"), ctx.teacher_sizes()),
        "evaluation": evaluation_entry(report, english_only=False),
        "ct2": None,
        "ggml": None,
        "training": {
            "train_steps": training.get("max_steps"),
            "batch_size": training.get("per_device_train_batch_size"),
            "learning_rate": training.get("learning_rate"),
            "seed": training.get("seed"),
            "rows": compress.get("max_train_samples"),
            "corpora": compress.get("train_manifest"),
            "train_runtime_s": next((e["train_runtime"] for e in training_log if "train_runtime" in e), None),
        },
        "plan": summary.get("plan"),
        "phase_seconds": summary.get("phase_seconds"),
        "eval_limit_per_corpus": None,
        "smoke": False,
        "machine": {**machine, "torch_threads": None, "load_average_before": None},
        "date": dt.datetime.fromtimestamp((folder / "compress_summary.json").stat().st_mtime, dt.UTC).isoformat(
            timespec="seconds"
        ),
    }


def add_compress_runs(ctx: Context, text: str, machine: dict) -> None:
    for entry in filter(None, text.split(",")):
        name, _, location = entry.partition("=")
        folder, _, eval_json = location.partition(":")
        row = compress_run_row(ctx, name, Path(folder), Path(eval_json) if eval_json else None, machine)
        path = ctx.output / "rows" / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(row, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
        logger.info("row %s from %s: %s", name, folder, path)


# ---- main ------------------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for noisy in ("transformers", "datasets", "httpx", "urllib3", "faster_whisper"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args = parse_args(argv)
    if args.list_rows:
        for name, row in ROWS.items():
            print(f"{name:20s} {row['method']:18s} {row['description']}")
        print("presets: " + "; ".join(f"{k} = {','.join(v)}" for k, v in PRESETS.items()))
        return 0
    output = Path(args.output)
    if args.merge:
        merge(output)
        return 0
    if args.compress_runs:
        add_compress_runs(Context(args), args.compress_runs, machine_info(args.threads))
        if not args.row_names:
            merge(output)
            return 0
    data = Path(args.data)
    kinds = {ROWS[n]["kind"] for n in args.row_names}
    needed = ["dev.jsonl"] + (["unlabeled.jsonl"] if "train" in kinds else [])
    needed += args.calibration_manifests.split(",") if "gptq" in kinds else []
    if missing := [name for name in needed if not (data / name).is_file()]:
        print(
            f"skipping: the shared speech data is absent ({', '.join(str(data / m) for m in missing)} not found); "
            "pass --data to point at a folder with dev.jsonl, unlabeled.jsonl and the calibration manifests"
        )
        return 0
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    command = shlex.join(["python", *sys.argv] if argv is None else ["results_table.py", *argv])
    machine = machine_info(args.threads)
    ctx = Context(args)
    failed = []
    for name in args.row_names:
        logger.info("── row %s: %s", name, ROWS[name]["description"])
        try:
            run_row(ctx, name, command, machine)
        except Exception:
            failed.append(name)
            logger.error("row %s failed:\n%s", name, traceback.format_exc())
    merge(output)
    if failed:
        print(f"\nFAILED rows (no JSON written): {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
