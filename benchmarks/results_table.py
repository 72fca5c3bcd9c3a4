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

Timings depend on the machine and on what else runs on it: the row JSON records CPU count, torch threads and the
load average before and after.
"""

from __future__ import annotations

import copy
import datetime as dt
import gc
import json
import logging
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from results_merge import merge
from results_rows import PRESETS, ROWS
from transformers import HfArgumentParser

if TYPE_CHECKING:
    from hf_whisper_kdq.export import CompressionReport

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "speech"
DEFAULT_OUTPUT = ROOT / "benchmarks" / "results"
GROUP_SIZE = 32  # DistillQuantArguments.quant_group_size default; used by the uniform budgets and PTQ specs

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


# ---- shared state ----------------------------------------------------------------------------------------------------
class Context:
    """What rows share within one invocation: the teacher, the evaluation sets, the training data."""

    def __init__(self, args: TableArguments):
        from hf_whisper_kdq.compress import PhaseTimer

        self.args = args
        self.data = Path(args.data)
        self.output = Path(args.output)
        self.cache = self.output / "cache"
        self.cache.mkdir(parents=True, exist_ok=True)
        self._teacher = None
        self._eval_sets: dict[bool, object] = {}
        self._train = None
        self.timer = PhaseTimer()

    def teacher(self):
        """(model fp32, processor), loaded once; rows work on copies."""
        if self._teacher is None:
            from hf_whisper_kdq import load_whisper

            with self.timer("load teacher"):
                self._teacher = load_whisper(self.args.teacher)
        return self._teacher

    def eval_set(self, english_only: bool):
        """The first ``eval_limit`` utterances of each corpus of dev.jsonl (English ones only if asked)."""
        if english_only not in self._eval_sets:
            from datasets import concatenate_datasets

            from hf_whisper_kdq import load_manifest

            manifest = self.data / "dev.jsonl"
            corpora = {}
            for line in manifest.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    row = json.loads(line)
                    corpora.setdefault(row.get("corpus"), row.get("language"))
            parts = [
                load_manifest(manifest, corpora=[corpus], limit=self.args.eval_limit)
                for corpus, language in corpora.items()
                if not english_only or language == "en"
            ]
            self._eval_sets[english_only] = concatenate_datasets(parts) if len(parts) > 1 else parts[0]
        return self._eval_sets[english_only]

    def teacher_sizes(self) -> dict:
        """The teacher's fp16 weights file on disk and its fp16 parameter bytes, measured once per teacher."""
        path = self.cache / "teacher_sizes.json"
        known = json.loads(path.read_text()) if path.is_file() else {}
        if self.args.teacher not in known:
            model, processor = self.teacher()
            known[self.args.teacher] = {
                "fp16_bytes_on_disk": fp16_weights_bytes(model, processor),
                "fp16_parameter_bytes": 2 * n_parameters(model),
            }
            path.write_text(json.dumps(known, indent=2) + "\n")
        return known[self.args.teacher]

    def training_data(self):
        """The --train_manifest mixture, else teacher-labelled LibriSpeech (labels cached); + synthetic speech; via
        compress.training_data."""
        if self._train is None:
            from hf_whisper_kdq import load_manifest
            from hf_whisper_kdq.compress import CompressArguments, training_data

            if self.args.train_manifest:
                names = [name.strip() for name in self.args.train_manifest.split(",") if name.strip()]
                manifests = ",".join(str(self.data / name) for name in names)
            else:
                manifests = str(self.labelled_manifest())
            compress = CompressArguments(
                teacher=self.args.teacher,
                level="none",
                train_manifest=manifests,
                train_weights=self.args.train_weights,
                max_train_samples=self.args.max_train_samples,
                synthetic_prompts=self.args.synthetic_rows,
                synthetic_text=self.args.synthetic_text,
            )
            model, processor = self.teacher()
            if not self.args.train_manifest and len(load_manifest(manifests)) == 0 and not compress.synthetic_prompts:
                raise ValueError("no training data: every teacher label was empty and --synthetic_rows is 0")
            self._train = training_data(compress, model, processor, timer=self.timer)
        return self._train

    def labelled_manifest(self) -> Path:
        """A manifest of the first ``train_rows`` unlabeled utterances with the teacher's transcripts as text."""
        from hf_whisper_kdq import load_manifest
        from hf_whisper_kdq.labelling import pseudo_label

        unlabeled = load_manifest(self.data / "unlabeled.jsonl", limit=self.args.train_rows)
        slug = safe_name(self.args.teacher)
        cache_path = self.cache / f"labels-{slug}.json"  # {id: teacher transcript, or null when it was empty}
        labels = json.loads(cache_path.read_text(encoding="utf-8")) if cache_path.is_file() else {}
        todo = [i for i, row_id in enumerate(unlabeled["id"]) if row_id not in labels]
        if todo:
            model, processor = self.teacher()
            with self.timer(f"label {len(todo)} utterances with the teacher"):
                labelled, report = pseudo_label(
                    unlabeled.select(todo), model, processor, batch_size=self.args.batch_size, progress=False
                )
            logger.info("%s", report.summary())
            got = dict(zip(labelled["id"], labelled["text"]))
            for i in todo:
                labels[unlabeled[i]["id"]] = got.get(unlabeled[i]["id"])
            cache_path.write_text(json.dumps(labels, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        manifest = self.cache / f"train-{slug}-{len(unlabeled)}.jsonl"
        with manifest.open("w", encoding="utf-8") as file:
            for row in unlabeled:
                if labels.get(row["id"]):
                    entry = {key: row[key] for key in ("id", "corpus", "language", "duration")}
                    file.write(
                        json.dumps(
                            {**entry, "audio": row["audio"]["path"], "text": labels[row["id"]]}, ensure_ascii=False
                        )
                        + "\n"
                    )
        return manifest


def safe_name(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-._" else "--" for ch in text).strip("-.") or "model"


def n_parameters(model) -> int:
    from hf_whisper_kdq.adapters import ADAPTERS_ATTRIBUTE

    return sum(p.numel() for name, p in model.named_parameters() if not name.startswith(f"{ADAPTERS_ATTRIBUTE}."))


def fp16_weights_bytes(model, processor) -> int:
    """Bytes of the weight files of an fp16 HF copy of ``model`` (save_whisper in a temporary folder)."""
    from hf_whisper_kdq import save_whisper
    from hf_whisper_kdq.evaluation import weight_files

    with tempfile.TemporaryDirectory() as scratch:
        folder = save_whisper(copy.deepcopy(model).half(), processor, Path(scratch) / "fp16")
        return sum(path.stat().st_size for path in weight_files(folder))


def inference_copy(model):
    """A plain fp32 model for decoding: fake-quant wrappers baked in (convert_qat), training adapters dropped."""
    from hf_whisper_kdq.adapters import strip_training_only

    plain = copy.deepcopy(model).cpu()
    strip_training_only(plain)
    return plain.float().eval()


# ---- measuring one model ---------------------------------------------------------------------------------------------
def scores(report) -> dict:
    keys = ("metric", "error_rate", "n_utterances", "audio_seconds", "decode_seconds", "rtf")
    return {entry["corpus"]: {key: entry[key] for key in keys} for entry in report.corpora}


def evaluation_entry(report, english_only: bool) -> dict:
    """A row JSON's ``evaluation``: an ``EvaluationReport``'s scores per corpus and its costs."""
    return {
        "english_only": english_only,
        "scores": scores(report),
        "rtf": report.rtf,
        "n_utterances": report.n_utterances,
        "audio_seconds": report.audio_seconds,
        "batch_size": report.batch_size,
        "num_beams": report.num_beams,
        "dtype": report.dtype,
    }


def measure(ctx: Context, name: str, model, processor, row_dir: Path, result: dict) -> None:
    """Transformers evaluation of ``model`` (QAT wrappers baked in), then the optional CTranslate2 int8 run."""
    from hf_whisper_kdq import evaluate_model

    english_only = not getattr(model.generation_config, "is_multilingual", True)
    dataset = ctx.eval_set(english_only)
    plain = inference_copy(model)
    with ctx.timer(f"{name}: evaluate (transformers)"):
        report = evaluate_model(
            plain,
            processor,
            dataset,
            batch_size=ctx.args.batch_size,
            max_new_tokens=ctx.args.max_new_tokens,
            progress=False,
        )
    del plain
    gc.collect()
    report.save_json(row_dir / "eval_transformers.json", per_utterance=True)
    result["evaluation"] = {**evaluation_entry(report, english_only), "max_new_tokens": ctx.args.max_new_tokens}
    result["ct2"] = None
    if ctx.args.ct2:
        from hf_whisper_kdq.evaluation import weight_files
        from hf_whisper_kdq.evaluation_ctranslate2 import evaluate_faster_whisper
        from hf_whisper_kdq.export.ctranslate2 import export_ctranslate2

        with ctx.timer(f"{name}: CTranslate2 int8 export + evaluate"):
            folder = export_ctranslate2(
                model, processor, row_dir / "ctranslate2-int8", quantization="int8", overwrite=True
            )
            ct2 = evaluate_faster_whisper(
                folder, dataset, cpu_threads=ctx.args.threads, max_new_tokens=ctx.args.max_new_tokens
            )
        ct2.save_json(row_dir / "eval_ct2.json", per_utterance=True)
        result["ct2"] = {
            "quantization": "int8",
            "compute_type": ct2.dtype,
            "rtf": ct2.rtf,
            "scores": scores(ct2),
            "bytes_on_disk": sum(path.stat().st_size for path in weight_files(folder)),
        }


def sizes_from_report(report: CompressionReport, teacher: dict) -> dict:
    planned = report.paper_accounting["planned_bytes"]
    return {
        "bytes_on_disk": report.weights_bytes,
        "all_files_bytes": report.total_bytes,
        "paper_bytes": planned,
        "paper_as_stored_bytes": report.paper_accounting["as_stored_bytes"],
        "ratio_to_teacher_fp16": teacher["fp16_bytes_on_disk"] / report.weights_bytes,
        "paper_ratio": teacher["fp16_parameter_bytes"] / planned,
        "embedding_quantized_on_disk": report.embedding_quantized,
        "embedding_planned_bits": report.embedding_planned_bits,
        "embedding_reason": report.embedding_reason,
        "per_layer_bits": report.per_layer_bits,
        "planned_bits": sorted({m["planned_bits"] for m in report.modules.values()}),
    }


def float_sizes(model, processor, teacher: dict) -> dict:
    on_disk = fp16_weights_bytes(model, processor)
    paper = 2 * n_parameters(model)
    return {
        "bytes_on_disk": on_disk,
        "paper_bytes": paper,
        "stored": "fp16 safetensors (save_whisper)",
        "ratio_to_teacher_fp16": teacher["fp16_bytes_on_disk"] / on_disk,
        "paper_ratio": teacher["fp16_parameter_bytes"] / paper,
    }


# ---- the three kinds of rows -----------------------------------------------------------------------------------------
def run_reference(ctx: Context, name: str, row: dict, row_dir: Path, result: dict) -> None:
    from hf_whisper_kdq import load_whisper

    teacher_sizes = ctx.teacher_sizes()
    if row["model"] == "teacher":
        model, processor = ctx.teacher()
        source = ctx.args.teacher
    else:
        source = ctx.args.tiny
        with ctx.timer(f"{name}: load"):
            model, processor = load_whisper(source)
    result["model"] = source
    result["sizes"] = float_sizes(model, processor, teacher_sizes)
    measure(ctx, name, model, processor, row_dir, result)


def ptq_model(teacher, component_specs: dict[str, str]):
    """A copy of ``teacher`` with round-to-nearest fake quantization: one spec (``"int4-g32"``…) per component
    (``encoder`` / ``decoder`` / ``embedding``); components left out stay float."""
    from hf_whisper_kdq.quant import default_quant_targets, prepare_qat

    model = copy.deepcopy(teacher)
    specs = {}
    for component, spec in component_specs.items():
        targets = default_quant_targets(
            model, encoder=component == "encoder", decoder=component == "decoder", embedding=component == "embedding"
        )
        specs.update(dict.fromkeys(targets, spec))
    prepare_qat(model, specs)  # the tied proj_out follows the embedding
    return model


def packed_sizes(model, processor, teacher_sizes: dict, folder: Path, plan=None, codes=None) -> dict:
    """The table's sizes of a quantized row (PTQ, GPTQ's ``codes``, or trained with its ``plan``), from its packed
    checkpoint."""
    from hf_whisper_kdq import save_compressed

    report = save_compressed(
        model,
        processor,
        folder,
        plan=plan,
        teacher_fp16_bytes=teacher_sizes["fp16_parameter_bytes"],
        overwrite=True,
        codes=codes,
    )
    return sizes_from_report(report, teacher_sizes)


def calibration_batches(ctx: Context, batch_size: int = 8) -> list[dict]:
    """The GPTQ calibration utterances (``--calibration_manifests``, ``--calibration_rows`` each) as training
    batches: what the output-error clip search weighs the weights' errors with."""
    from datasets import concatenate_datasets

    from hf_whisper_kdq import WhisperDataCollator, load_manifest, prepare_dataset

    teacher, processor = ctx.teacher()
    names = [part.strip() for part in ctx.args.calibration_manifests.split(",") if part.strip()]
    rows = concatenate_datasets([load_manifest(ctx.data / n, limit=ctx.args.calibration_rows) for n in names])
    prepared, _ = prepare_dataset(rows, processor, multilingual=True)
    collate = WhisperDataCollator(processor, teacher.config.decoder_start_token_id)
    return [
        collate(list(prepared.select(range(i, min(i + batch_size, len(prepared))))))
        for i in range(0, len(prepared), batch_size)
    ]


def clip_on_inputs(ctx: Context, model) -> None:
    """Search ``model``'s clipping ratios for least expected output error on the calibration audio, as training
    does before its first step (``calibration.calibrate_clipping`` on a one-width plan of the prepared layers)."""
    from hf_whisper_kdq.calibration import calibrate_clipping
    from hf_whisper_kdq.quant import quant_specs
    from hf_whisper_kdq.selection import initial_plan

    specs = {name: spec for name, spec in quant_specs(model).items() if spec is not None and name != "proj_out"}
    (spec,) = set(specs.values())
    config = model.config
    layers = {"encoder": list(range(config.encoder_layers)), "decoder": list(range(config.decoder_layers))}
    plan = initial_plan(
        list(specs),
        layers,
        bits=spec.bits,
        granularity=spec.granularity,
        group_size=spec.group_size,
        learnable_clipping=True,
    )
    calibrate_clipping(model, plan, calibration_batches(ctx))


def run_ptq(ctx: Context, name: str, row: dict, row_dir: Path, result: dict) -> None:
    teacher, processor = ctx.teacher()
    model = ptq_model(teacher, row["specs"])
    if row.get("clip_search") == "inputs":
        with ctx.timer(f"{name}: clip search on the calibration audio"):
            clip_on_inputs(ctx, model)
    result["model"] = f"{ctx.args.teacher} + round-to-nearest {row['specs']}"
    with ctx.timer(f"{name}: save_compressed"):
        result["sizes"] = packed_sizes(model, processor, ctx.teacher_sizes(), row_dir / "compressed")
    measure(ctx, name, model, processor, row_dir, result)


def run_gptq(ctx: Context, name: str, row: dict, row_dir: Path, result: dict) -> None:
    """GPTQ's codes (llm-compressor in its venv, gptq_baseline.py) in the packed layout of the RTN row with the same
    specs, evaluated from the folder as a user loads it (plain from_pretrained: weights unpacked to fp32)."""
    from gptq_baseline import TIED_HEAD, gptq_codes

    from hf_whisper_kdq import load_whisper
    from hf_whisper_kdq.quant import QuantSpec

    teacher, processor = ctx.teacher()
    (spec,) = {QuantSpec.parse(text) for text in row["specs"].values()}  # one layout: one GPTQ run
    manifests = [ctx.data / part.strip() for part in ctx.args.calibration_manifests.split(",") if part.strip()]
    with ctx.timer(f"{name}: GPTQ (llm-compressor)"):
        codes, result["gptq"] = gptq_codes(
            ctx.args.llmcompressor_python,
            teacher,
            processor,
            list(row["specs"]),
            bits=spec.bits,
            group_size=spec.group_size,
            manifests=manifests,
            calibration_rows=ctx.args.calibration_rows,
            cache=ctx.cache,
            threads=ctx.args.threads,
        )
    if row.get("tied_embedding") == "rtn":
        codes.pop(TIED_HEAD, None)
    result["model"] = f"{ctx.args.teacher} + GPTQ (llm-compressor) {row['specs']}"
    folder = row_dir / "compressed"
    with ctx.timer(f"{name}: save_compressed"):
        model = ptq_model(teacher, row["specs"])  # the layout; its round-to-nearest codes give way to GPTQ's
        result["sizes"] = packed_sizes(model, processor, ctx.teacher_sizes(), folder, codes=codes)
    loaded, _ = load_whisper(folder)
    measure(ctx, name, loaded, processor, row_dir, result)


def uniform_budget_mb(student, targets: str, bits: int) -> float:
    """Paper-accounting MB of ``student`` with every targeted layer at ``bits`` (per group of 32), plus one byte."""
    from hf_whisper_kdq.quant import default_quant_targets, quantized_size_bytes

    chosen = set(targets.split(","))
    names = default_quant_targets(
        student, encoder="encoder" in chosen, decoder="decoder" in chosen, embedding="embedding" in chosen
    )
    size = quantized_size_bytes(student, dict.fromkeys(names, f"int{bits}-g{GROUP_SIZE}"))
    return (size + 1) / 1e6


def quantizes_encoder(row: dict) -> bool:
    return "encoder" in row["quant_targets"].split(",") and row["bits"] != "float"


def student_description(teacher: str, student) -> str:
    return f"student of {teacher}: {student.config.encoder_layers} encoder / {student.config.decoder_layers} decoder layers"


def training_arguments(
    row: dict,
    student,
    output_dir: Path,
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    **extra,
):
    """The DistillQuantArguments of a trained row (compress's training defaults for the rest); ``extra`` adds or
    overrides fields (the GPU script's bf16, loaders, device)."""
    from dataclasses import replace

    from transformers import HfArgumentParser

    from hf_whisper_kdq import DistillQuantArguments
    from hf_whisper_kdq.compress import with_training_defaults

    fields = dict(
        output_dir=str(output_dir),
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        learning_rate=row.get("learning_rate", learning_rate),
        warmup_steps=row.get("warmup_steps", min(10, steps // 10)),
        seed=seed,
        logging_steps=max(1, min(10, steps // 5)),
        disable_tqdm=True,
        quant_targets=row["quant_targets"],
        quant_bit_choices=row["bits"],
        quant_group_size=GROUP_SIZE,
        quant_granularity="per_group",
        kd_weight=row.get("kd_weight", 1.0),
        hidden_weight=row.get("hidden_weight", 1.0),
        hidden_loss_scale=row.get("hidden_loss_scale", "absolute"),
        # compress freezes the encoder by default, which means round-to-nearest for a quantized one (its clipping
        # frozen too): a row that quantizes the encoder trains it, as the method does.
        freeze_encoder=row.get("freeze_encoder", not quantizes_encoder(row)),
    )
    if row["guided"]:
        # Re-planning late undid training on the GPU (loss 0.57 → 2.38 after the re-plan at step 250 of 500):
        # the second half keeps the plan of the first.
        fields.update(layer_matching="dynamic_monotone", selection_interval=max(1, steps // 4), selection_until=0.5)
    else:
        fields.update(layer_matching="static", selection_interval=0)
    if row["budget"]:
        bits = int(row["budget"].split(":")[1])
        fields["size_budget_mb"] = round(uniform_budget_mb(student, row["quant_targets"], bits), 6)
    # The rows' budgets are paper-accounting sizes: compress's defaults under --level smoke (the paper's accounting),
    # each row then setting its own layout.
    compress_defaults = with_training_defaults(["--level", "smoke"])[2:]
    (defaults,) = HfArgumentParser(DistillQuantArguments).parse_args_into_dataclasses(args=compress_defaults)
    return replace(defaults, **fields, **extra)


def run_training(ctx: Context, name: str, row: dict, row_dir: Path, result: dict) -> None:
    from hf_whisper_kdq import build_student, prepare_dataset
    from hf_whisper_kdq.compress import train_student

    args = ctx.args
    teacher, processor = ctx.teacher()
    teacher_sizes = ctx.teacher_sizes()
    train = ctx.training_data()
    student = build_student(teacher, decoder_layers=row["decoder_layers"])
    training_args = training_arguments(
        row,
        student,
        row_dir / "trainer",
        steps=args.train_steps,
        batch_size=args.train_batch_size,
        learning_rate=args.learning_rate,
        seed=args.seed,
        **({"bf16": True, "use_cpu": True} if args.bf16 else {}),
    )
    with ctx.timer(f"{name}: features and labels"):
        multilingual = bool(teacher.generation_config.is_multilingual)
        features, preparation = prepare_dataset(train, processor, multilingual=multilingual)
    with ctx.timer(f"{name}: train"):
        trainer = train_student(student, teacher, processor, features, training_args)
    student = trainer.whole_student().eval()
    plan, output = trainer.plan, trainer.state.log_history[-1]  # the Trainer logs its run's totals last
    logger.info("%s plan:\n%s", name, plan.summary())
    result["model"] = student_description(args.teacher, student)
    result["training"] = {
        "train_steps": args.train_steps,
        "batch_size": args.train_batch_size,
        "learning_rate": args.learning_rate,
        "rows": len(features),
        "corpora": dict(Counter(features["corpus"])),
        "preparation": preparation.summary(),
        "train_runtime_s": output.get("train_runtime"),
        "final_train_loss": output.get("train_loss"),
        "log_history": trainer.state.log_history,
        "arguments": {k: v for k, v in training_args.to_dict().items() if k in TRAINING_KEYS},
    }
    result["plan"] = plan.to_dict()
    result["plan_summary"] = plan.summary()
    if plan.module_specs():
        with ctx.timer(f"{name}: save_compressed"):
            result["sizes"] = packed_sizes(student, processor, teacher_sizes, row_dir / "compressed", plan=plan)
    else:  # distillation only: a float student
        result["sizes"] = float_sizes(inference_copy(student), processor, teacher_sizes)
    measure(ctx, name, student, processor, row_dir, result)
    del trainer
    gc.collect()


TRAINING_KEYS = {
    "max_steps",
    "per_device_train_batch_size",
    "learning_rate",
    "warmup_steps",
    "seed",
    "ce_weight",
    "kd_weight",
    "hidden_weight",
    "quant_weight",
    "kd_temperature",
    "layer_matching",
    "quant_bit_choices",
    "quant_granularity",
    "quant_group_size",
    "learnable_clipping",
    "quant_targets",
    "size_budget_mb",
    "num_distill_layers",
    "selection_interval",
    "selection_until",
    "selection_probe_batches",
    "freeze_encoder",
    "bf16",
}


RUNNERS = {"reference": run_reference, "ptq": run_ptq, "gptq": run_gptq, "train": run_training}


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
