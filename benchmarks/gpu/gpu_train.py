"""Trained rows of the results table on one GPU, from the inputs that gpu_pack_inputs.py built.

    python benchmarks/gpu_train.py --inputs /tmp/kdq_inputs/inputs --output $OUT      # on the GPU (gpu_session.sh)
    python benchmarks/gpu_train.py --score OUT/pending/kdq-d2-u4-gpu.json            # here, only if work was deferred
    python benchmarks/results_table.py --merge                                       # the table, GPU rows included
    python benchmarks/gpu_train.py --inputs DIR --device cpu --smoke --output DIR2    # a CPU check of the script

Each ``--rows`` entry is a trained row of ``results_table.py`` (``--list`` there), trained as that script trains
it (``DistillQuantTrainer`` on a ``build_student`` spaced student, the row's quantization targets, bits, budget,
selection and loss weights, compress's training defaults) with what a GPU allows: bf16, a larger batch
(``--train_batch_size``), more steps (``--train_steps``) and data-loader workers. The rows share ``--max_minutes``
of training wall time equally; a row stops at its step count or its share of the time, whichever comes first
(the linear learning-rate schedule is set for ``--train_steps``: the row JSON says when the clock stopped it).
``teacher`` and ``tiny.en`` are reference rows: the packed model evaluated the same way.

Evaluation: greedy decoding (at most ``--max_new_tokens`` tokens) of the packed ``dev.jsonl`` features by the
student with its quantization baked in (``results_table.inference_copy``), in fp32 on the GPU. Those features are
fp16 (see gpu_pack_inputs.py), the CPU rows' are fp32: the ``teacher`` row measures what that changes. WER/CER are
scored with ``scoring.score`` per corpus, as ``evaluate_model`` does. Each row is written in results_table's row
format to ``OUTPUT/rows/<row>-gpu.json`` with its transcripts, steps/s, median step time and peak GPU memory; its
RTF is left out of the table's CPU-RTF column (the GPU decode time is in ``evaluation.gpu_rtf``).

Degrading: when the GPU lacks what scoring (jiwer, opencc, cn2an) or the packed checkpoint (compressed-tensors)
needs, the row goes to ``OUTPUT/pending/`` with its transcripts and plan; ``--score`` completes it here (scores
from the transcripts; sizes from the plan, which fixes the packed file's bytes whatever the weights) and writes it
to ``--output``/rows/ (default: results_table.py's), where ``results_table.py --merge`` finds it.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import gc
import json
import logging
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import gpu_pack_inputs
import results_table
import torch
from step_time import StepTimer
from transformers import TrainerCallback

logger = logging.getLogger("gpu_train")
REFERENCE_MODELS = {"teacher": "teacher", "tiny.en": "tiny"}  # reference row -> its folder in the inputs
TRAINING_KEYS = results_table.TRAINING_KEYS | {"bf16", "dataloader_num_workers"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inputs", help="the inputs folder of gpu_pack_inputs.py (reassembled on the GPU)")
    parser.add_argument(
        "--rows",
        default="kdq-d2-u4",
        help="comma-separated trained rows of results_table.py and reference rows (teacher, tiny.en)",
    )
    parser.add_argument(
        "--output",
        default=str(results_table.DEFAULT_OUTPUT),
        help="folder of rows/ (complete rows) and pending/ (default: %(default)s; $OUT on the GPU)",
    )
    parser.add_argument("--train_steps", type=int, default=2000, help="optimizer steps per trained row at most")
    parser.add_argument("--train_batch_size", type=int, default=32, help="per-device training batch size")
    parser.add_argument("--learning_rate", type=float, default=1e-4, help="peak learning rate (results_table's)")
    parser.add_argument(
        "--max_minutes",
        type=float,
        default=8.0,
        help="training wall time of all rows together, shared equally (default: %(default)s)",
    )
    parser.add_argument("--batch_size", type=int, default=64, help="evaluation batch size")
    parser.add_argument(
        "--max_new_tokens",
        type=int,
        default=128,
        help="decoded tokens per utterance at most (results_table's cap; dev.jsonl needs ≤ 38)",
    )
    parser.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="bf16 mixed-precision training (default: on)",
    )
    parser.add_argument(
        "--device",
        choices=("auto", "cuda", "cpu"),
        default="auto",
        help="where to train and decode (auto: the GPU when there is one)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=4,
        help="data-loader worker processes (rebuilding 30 s feature windows keeps one core busy)",
    )
    parser.add_argument(
        "--encoder_cache",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="the on-disk encoder-output cache of rows with a shared encoder (default: off: on a "
        "GPU the encoder pass costs less than reading its output back)",
    )
    parser.add_argument("--seed", type=int, default=0, help="training seed")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a CPU check: 2 steps of batch 2 per row, 8 decoded tokens, no loader workers",
    )
    parser.add_argument(
        "--score",
        nargs="+",
        metavar="FILE",
        help="complete these pending row JSONs here (scores, sizes) and write them to OUTPUT/rows/",
    )
    parser.add_argument(
        "--teacher", default=None, help="with --score: the teacher source to rebuild sizes from (default: the row's)"
    )
    args = parser.parse_args(argv)
    if not args.score and not args.inputs:
        parser.error("give --inputs (a folder of gpu_pack_inputs.py), or --score FILE")
    args.row_names = [name.strip() for name in args.rows.split(",") if name.strip()]
    for name in args.row_names:
        if name not in REFERENCE_MODELS and results_table.ROWS.get(name, {}).get("kind") not in ("train", "ptq"):
            runnable = [n for n, row in results_table.ROWS.items() if row["kind"] in ("train", "ptq")]
            parser.error(f"unknown row {name!r}: choose from {', '.join([*runnable, *REFERENCE_MODELS])}")
    if args.smoke:
        args.train_steps, args.train_batch_size, args.max_new_tokens, args.workers = 2, 2, 8, 0
    if min(args.train_steps, args.train_batch_size, args.batch_size, args.max_new_tokens) < 1 or args.max_minutes <= 0:
        parser.error("steps, batch sizes and --max_new_tokens must be >= 1 and --max_minutes > 0")
    return args


class WallBudget(TrainerCallback):
    """Stops training once ``seconds`` of wall time have passed since it began."""

    def __init__(self, seconds: float):
        self.seconds, self.stopped, self._start = seconds, False, None

    def on_train_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if time.perf_counter() - self._start >= self.seconds:
            control.should_training_stop = self.stopped = True


class Inputs:
    """The packed inputs, loaded once: teacher (fp32), processor, speech splits and the teacher's sizes."""

    def __init__(self, folder: Path, device: str):
        from hf_whisper_kdq import load_whisper
        from hf_whisper_kdq.evaluation import weight_files

        self.folder, self.device = folder, device
        self.manifest = gpu_pack_inputs.read_manifest(folder)
        self.speech = gpu_pack_inputs.read_speech(folder)
        self.teacher, self.processor = load_whisper(folder / "teacher")
        self.teacher_sizes = {
            "fp16_bytes_on_disk": sum(path.stat().st_size for path in weight_files(folder / "teacher")),
            "fp16_parameter_bytes": 2 * results_table.n_parameters(self.teacher),
        }

    def reference(self, name: str):
        from hf_whisper_kdq import load_whisper

        if name == "teacher":
            return self.teacher, self.processor
        if not self.manifest.get("tiny"):
            raise ValueError("the inputs hold no tiny model: pack them with gpu_pack_inputs.py --tiny ...")
        return load_whisper(self.folder / REFERENCE_MODELS[name])


# ---- training --------------------------------------------------------------------------------------------------------
def training_arguments(row: dict, cli: argparse.Namespace, student, output_dir: Path):
    """The arguments results_table.run_training gives ``row``, with this script's steps, batch, bf16 and loaders."""
    extra = [
        "--bf16",
        str(cli.bf16).lower(),
        "--dataloader_num_workers",
        str(cli.workers),
        "--use_cpu",
        str(cli.device == "cpu").lower(),
        "--cache_encoder_outputs",
        str(cli.encoder_cache).lower(),
        "--encoder_cache_dir",
        str(output_dir / "encoder_cache"),
    ]
    return results_table.training_arguments(
        row,
        student,
        output_dir,
        steps=cli.train_steps,
        batch_size=cli.train_batch_size,
        learning_rate=cli.learning_rate,
        seed=cli.seed,
        extra=extra,
    )


def row_sizes(student, processor, plan, teacher_sizes: dict, folder: Path) -> dict:
    """results_table's sizes of a trained row: its packed checkpoint, or fp16 for a float student."""
    if plan.module_specs():
        return results_table.packed_sizes(student, processor, teacher_sizes, folder, plan=plan)
    return results_table.float_sizes(results_table.inference_copy(student), processor, teacher_sizes)


def train_row(name: str, cli, inputs: Inputs, scratch: Path, budget_seconds: float, result: dict, timer):
    """Train one row as results_table.run_training does; fills result's training, plan, model and sizes entries
    and returns (the student with its quantization baked in, for decoding, its processor)."""
    from hf_whisper_kdq import DistillQuantTrainer, WhisperDataCollator, build_student

    row = results_table.ROWS[name]
    teacher, processor = inputs.teacher, inputs.processor
    student = build_student(teacher, decoder_layers=row["decoder_layers"])
    arguments = training_arguments(row, cli, student, scratch / "trainer")
    steps, budget = StepTimer(), WallBudget(budget_seconds)
    trainer = DistillQuantTrainer(
        model=student,
        teacher_model=teacher,
        args=arguments,
        train_dataset=inputs.speech["train"],
        data_collator=WhisperDataCollator(processor, decoder_start_token_id=student.config.decoder_start_token_id),
        processing_class=processor,
        callbacks=[steps, budget],
    )
    gpu = inputs.device == "cuda"
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    with timer(f"{name}: train"):
        output = trainer.train()
    state, runtime = trainer.state, output.metrics.get("train_runtime")
    train_split = inputs.manifest["splits"]["train"]
    result["model"] = (
        f"student of {result['teacher']}: {student.config.encoder_layers} encoder / "
        f"{student.config.decoder_layers} decoder layers"
    )
    result["training"] = {
        "train_steps": state.global_step,
        "planned_steps": cli.train_steps,
        "batch_size": cli.train_batch_size,
        "learning_rate": cli.learning_rate,
        "bf16": cli.bf16,
        "rows": train_split["n_rows"],
        "corpora": train_split["corpora"],
        "preparation": train_split.get("preparation"),
        "budget_seconds": budget_seconds,
        "stopped_by_budget": budget.stopped,
        "train_runtime_s": runtime,
        "steps_per_second": state.global_step / runtime if runtime else None,
        "median_step_seconds": statistics.median(steps.times) if steps.times else None,
        "peak_gpu_memory_bytes": torch.cuda.max_memory_allocated() if gpu else None,
        "final_train_loss": output.training_loss,
        "log_history": state.log_history,
        "arguments": {k: v for k, v in arguments.to_dict().items() if k in TRAINING_KEYS},
    }
    if budget.stopped:
        logger.warning(
            "%s: stopped by its %.0f s budget after %d of %d steps",
            name,
            budget_seconds,
            state.global_step,
            cli.train_steps,
        )
    student = trainer.accelerator.unwrap_model(trainer.model).cpu().eval()
    plan = trainer.plan
    result["plan"], result["plan_summary"] = plan.to_dict(), plan.summary()
    del trainer
    try:
        with timer(f"{name}: sizes (save_compressed)"):
            result["sizes"] = row_sizes(student, processor, plan, inputs.teacher_sizes, scratch / "compressed")
    except ImportError as error:  # compressed-tensors absent: --score rebuilds the sizes from the plan
        result["pending"]["sizes"] = str(error)
    return results_table.inference_copy(student), processor


def ptq_row(name: str, row: dict, inputs: Inputs, scratch: Path, result: dict, timer):
    """A naive-PTQ row as results_table.run_ptq builds it; fills result's model and sizes entries and returns (the
    model with its quantization baked in, for decoding, its processor)."""
    model = results_table.ptq_model(inputs.teacher, row["specs"])
    result["model"] = f"{result['teacher']} + round-to-nearest {row['specs']}"
    try:
        with timer(f"{name}: sizes (save_compressed)"):
            result["sizes"] = results_table.packed_sizes(
                model, inputs.processor, inputs.teacher_sizes, scratch / "compressed"
            )
    except ImportError as error:  # compressed-tensors absent: --score rebuilds the sizes
        result["pending"]["sizes"] = str(error)
    return results_table.inference_copy(model), inputs.processor


# ---- evaluation ------------------------------------------------------------------------------------------------------
def transcribe(
    model, processor, split, *, english_only: bool, batch_size: int, max_new_tokens: int, device: str
) -> tuple[list[dict], list[dict]]:
    """Greedy transcripts of the eval split, grouped by (corpus, language) as evaluate_model groups them:
    (per-corpus entries with audio and decode seconds, per-utterance entries with reference and hypothesis)."""
    groups: dict[tuple[str, str], list[int]] = {}
    for i, meta in enumerate(split.rows):
        if not english_only or meta["language"] == "en":
            groups.setdefault((meta["corpus"], meta["language"]), []).append(i)
    multilingual = bool(model.generation_config.is_multilingual)
    model = model.to(device).eval()
    corpora, utterances = [], []
    with torch.inference_mode():
        for (corpus, language), indices in groups.items():
            if device == "cuda":
                torch.cuda.synchronize()
            start, texts = time.perf_counter(), []
            for first in range(0, len(indices), batch_size):
                batch = indices[first : first + batch_size]
                features = torch.stack([split.features_of(i) for i in batch]).to(device)
                options = {"language": language, "task": "transcribe"} if multilingual else {}
                output = model.generate(
                    input_features=features, max_new_tokens=max_new_tokens, num_beams=1, do_sample=False, **options
                )
                texts += [text.strip() for text in processor.batch_decode(output, skip_special_tokens=True)]
            if device == "cuda":
                torch.cuda.synchronize()
            corpora.append(
                {
                    "corpus": corpus,
                    "language": language,
                    "n_utterances": len(indices),
                    "audio_seconds": sum(split.rows[i]["duration"] for i in indices),
                    "decode_seconds": time.perf_counter() - start,
                }
            )
            utterances += [
                {
                    "id": split.rows[i]["id"],
                    "corpus": corpus,
                    "language": language,
                    "reference": split.rows[i]["text"],
                    "hypothesis": text,
                }
                for i, text in zip(indices, texts)
            ]
    return corpora, utterances


def score_evaluation(evaluation: dict) -> None:
    """Fill ``evaluation["scores"]`` (results_table's per-corpus entries) and the per-utterance error counts from
    the transcripts, with ``scoring.score`` per corpus as ``evaluate_model`` scores."""
    from hf_whisper_kdq.scoring import score

    scores = {}
    for corpus in evaluation["corpora"]:
        rows = [u for u in evaluation["utterances"] if u["corpus"] == corpus["corpus"]]
        result = score(
            [u["reference"] for u in rows], [u["hypothesis"] for u in rows], corpus["language"], per_utterance=True
        )
        for row, record in zip(rows, result.pop("utterances")):
            row.update(record)
        audio, decode = corpus["audio_seconds"], corpus["decode_seconds"]
        scores[corpus["corpus"]] = {
            "metric": result["metric"],
            "error_rate": result[result["metric"]],
            "n_utterances": corpus["n_utterances"],
            "audio_seconds": audio,
            "decode_seconds": decode,
            "rtf": decode / audio if audio else None,
        }
    evaluation["scores"] = scores


def evaluate(name: str, model, processor, cli, inputs: Inputs, result: dict, timer) -> None:
    english_only = not getattr(model.generation_config, "is_multilingual", True)
    with timer(f"{name}: evaluate"):
        corpora, utterances = transcribe(
            model,
            processor,
            inputs.speech["eval"],
            english_only=english_only,
            batch_size=cli.batch_size,
            max_new_tokens=cli.max_new_tokens,
            device=inputs.device,
        )
    audio, decode = sum(c["audio_seconds"] for c in corpora), sum(c["decode_seconds"] for c in corpora)
    device = torch.cuda.get_device_name() if inputs.device == "cuda" else "cpu"
    # "rtf" is the table's CPU real-time factor column: a GPU's decode time does not belong there.
    result["evaluation"] = {
        "english_only": english_only,
        "scores": None,
        "rtf": None,
        "gpu_rtf": decode / audio if audio else None,
        "n_utterances": len(utterances),
        "audio_seconds": audio,
        "decode_seconds": decode,
        "batch_size": cli.batch_size,
        "num_beams": 1,
        "dtype": "float32",
        "device": device,
        "max_new_tokens": cli.max_new_tokens,
        "features": "fp16 log-mel packed by gpu_pack_inputs.py",
        "corpora": corpora,
        "utterances": utterances,
    }
    try:
        score_evaluation(result["evaluation"])
    except ImportError as error:  # jiwer / opencc / cn2an absent: --score scores the transcripts here
        result["pending"]["scores"] = str(error)


# ---- rows ------------------------------------------------------------------------------------------------------------
def write_row(result: dict, output: Path) -> Path:
    """Complete rows go to OUTPUT/rows/ (what results_table --merge reads), others to OUTPUT/pending/."""
    path = output / ("pending" if result["pending"] else "rows") / f"{result['row']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    return path


def run_row(name: str, cli, inputs: Inputs, budget_seconds: float, machine: dict, command: str) -> Path:
    from hf_whisper_kdq.compress import PhaseTimer

    timer = PhaseTimer()
    reference = name in REFERENCE_MODELS
    row = (
        {"method": "reference", "kind": "reference", "description": f"{name}, fp16 on disk"}
        if reference
        else results_table.ROWS[name]
    )
    started, clock = dt.datetime.now(dt.UTC), time.perf_counter()
    manifest = inputs.manifest
    where = "a GPU" if inputs.device == "cuda" else "the CPU"
    result = {
        "row": f"{name}-gpu",
        "method": row["method"],
        "kind": row["kind"],
        "description": f"{row['description']} — on {where} ({'bf16, ' if cli.bf16 and row['kind'] == 'train' else ''}"
        f"fp16 features)",
        "config": {k: v for k, v in row.items() if k not in ("method", "description", "kind")},
        "teacher": manifest["teacher"]["source"],
        "teacher_sizes": inputs.teacher_sizes,
        "training": None,
        "plan": None,
        "ct2": None,
        "pending": {},
    }
    load_before = results_table.load_average()
    with tempfile.TemporaryDirectory(prefix=f"{name}-") as scratch:
        if reference:
            model, processor = inputs.reference(name)
            result["model"] = manifest[REFERENCE_MODELS[name]]["source"]
            result["sizes"] = results_table.float_sizes(model, processor, inputs.teacher_sizes)
            model = copy.deepcopy(model).float()
        elif row["kind"] == "ptq":
            model, processor = ptq_row(name, row, inputs, Path(scratch), result, timer)
        else:
            model, processor = train_row(name, cli, inputs, Path(scratch), budget_seconds, result, timer)
        evaluate(name, model, processor, cli, inputs, result, timer)
    del model
    gc.collect()
    if inputs.device == "cuda":
        torch.cuda.empty_cache()
    steps = (result["training"] or {}).get("train_steps")
    result["eval_limit_per_corpus"] = manifest.get("eval_limit_per_corpus")
    result["smoke"] = bool(
        cli.smoke
        or manifest.get("smoke")
        or manifest.get("eval_limit_per_corpus")
        or (steps is not None and steps < 1000)
    )
    result["phase_seconds"] = {k: round(v, 1) for k, v in timer.seconds.items()}
    result["wall_seconds"] = round(time.perf_counter() - clock, 1)
    result["command"] = command
    result["machine"] = {
        **machine,
        "load_average_before": load_before,
        "load_average_after": results_table.load_average(),
    }
    result["date"] = started.isoformat(timespec="seconds")
    return write_row(result, Path(cli.output))


def summary(path: Path) -> str:
    result = json.loads(path.read_text(encoding="utf-8"))
    scores = result["evaluation"]["scores"] or {}
    rates = ", ".join(f"{corpus} {e['metric'].upper()} {100 * e['error_rate']:.1f}%" for corpus, e in scores.items())
    line = f"{result['row']}: {rates or 'scores pending (--score here)'}"
    if training := result.get("training"):
        memory = training["peak_gpu_memory_bytes"]
        line += (
            f"; {training['train_steps']} steps × batch {training['batch_size']}, "
            f"{training['steps_per_second'] or 0:.2f} steps/s"
            + ("" if memory is None else f", peak {memory / 2**30:.1f} GiB")
            + (" (stopped by the time budget)" if training["stopped_by_budget"] else "")
        )
    return f"{line} → {path}"


# ---- --score: finish pending rows on the CPU -------------------------------------------------------------------------
def complete(path: Path, cli) -> Path:
    from hf_whisper_kdq import build_student, load_whisper
    from hf_whisper_kdq.quant import prepare_qat
    from hf_whisper_kdq.selection import KDQPlan

    result = json.loads(path.read_text(encoding="utf-8"))
    pending = result.get("pending") or {}
    if "scores" in pending:
        score_evaluation(result["evaluation"])
    if "sizes" in pending:
        # The packed file's bytes follow from the shapes and the planned bits alone: any student of the same
        # architecture prepared with the row's plan writes a file of the same size.
        teacher, processor = load_whisper(cli.teacher or result["teacher"])
        with tempfile.TemporaryDirectory() as scratch:
            if result["kind"] == "ptq":
                model = results_table.ptq_model(teacher, result["config"]["specs"])
                result["sizes"] = results_table.packed_sizes(
                    model, processor, result["teacher_sizes"], Path(scratch) / "packed"
                )
            else:
                student = build_student(teacher, decoder_layers=result["config"]["decoder_layers"])
                plan = KDQPlan.from_dict(result["plan"])
                prepare_qat(student, plan.module_specs())
                result["sizes"] = row_sizes(student, processor, plan, result["teacher_sizes"], Path(scratch) / "packed")
        result["sizes"]["source"] = "rebuilt on the CPU from the plan by gpu_train.py --score"
    result["completed_by_score"] = sorted(pending)
    result["pending"] = {}
    return write_row(result, Path(cli.output))


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for noisy in ("transformers", "datasets", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    cli = parse_args(argv)
    if cli.score:
        for file in cli.score:
            print(summary(complete(Path(file), cli)))
        return 0
    cli.device = cli.device if cli.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(cli.seed)
    command = shlex.join(["python", *sys.argv] if argv is None else ["gpu_train.py", *argv])
    machine = results_table.machine_info(torch.get_num_threads())
    if cli.device == "cuda":
        machine["gpu"] = torch.cuda.get_device_name()
    inputs = Inputs(Path(cli.inputs), cli.device)
    trained = [name for name in cli.row_names if results_table.ROWS.get(name, {}).get("kind") == "train"]
    budget = cli.max_minutes * 60 / max(1, len(trained))
    failed = []
    for name in cli.row_names:
        # One row's crash must not cost the others: a device call is minutes of a 15-minute allowance.
        try:
            print(summary(run_row(name, cli, inputs, budget, machine, command)), flush=True)
        except Exception:  # noqa: BLE001 - reported below, the run exits 1
            logger.exception("%s failed; going on with the other rows", name)
            failed.append(name)
    if failed:
        print(f"failed rows: {', '.join(failed)}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
