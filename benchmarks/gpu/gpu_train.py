"""Trained rows of the results table on one GPU, from the inputs that gpu_pack_inputs.py built.

    python benchmarks/gpu/gpu_train.py --inputs /tmp/kdq_inputs/inputs --output $OUT      # on the GPU (gpu_session.sh)
    python benchmarks/gpu/gpu_train.py --score OUT/pending/kdq-d2-u4-gpu.json            # here, only if work was deferred
    python benchmarks/results_table.py --merge                                       # the table, GPU rows included
    python benchmarks/gpu/gpu_train.py --inputs DIR --device cpu --smoke --output DIR2    # a CPU check of the script

Each ``--rows`` entry is a trained row of ``results_table.py`` (``--list`` there), trained as that script trains
it (``DistillQuantTrainer`` on a ``build_student`` spaced student, the row's quantization targets, bits, budget,
selection and loss weights, compress's training defaults) with what a GPU allows: bf16, a larger batch
(``--train_batch_size``), more steps (``--train_steps``) and data-loader workers. The rows share ``--max_minutes``
of training wall time equally; a row stops at its step count or its share of the time, whichever comes first
(the linear learning-rate schedule is set for ``--train_steps``: the row JSON says when the clock stopped it).
``teacher`` and ``tiny.en`` are reference rows: the packed model evaluated the same way.

Evaluation: ``evaluate_model`` on the packed ``dev.jsonl`` features (greedy, at most ``--max_new_tokens`` tokens)
of the student with its quantization baked in (``results_runners.inference_copy``), in fp32 on the GPU. Those
features are fp16 (see gpu_pack_inputs.py), the CPU rows' are fp32: the ``teacher`` row measures what that changes.
Each row is written in results_table's row format to ``OUTPUT/rows/<row>-gpu.json`` with its evaluation report
(transcripts included), steps/s, median step time and peak GPU memory; its RTF is left out of the table's CPU-RTF
column (the GPU decode time is in ``evaluation.gpu_rtf``).

Degrading: when the GPU lacks what scoring (jiwer, opencc, cn2an) or the packed checkpoint (compressed-tensors)
needs, the row goes to ``OUTPUT/pending/`` with its transcripts and plan; ``--score`` completes it here (scores
from the transcripts; sizes from the plan, which fixes the packed file's bytes whatever the weights) and writes it
to ``--output``/rows/ (default: results_table.py's), where ``results_table.py --merge`` finds it.
"""

from __future__ import annotations

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
from dataclasses import dataclass, field
from pathlib import Path

import gpu_pack_inputs  # puts the CPU benchmarks (results_table, step_time) on the path
import results_runners
import results_table
import torch
from step_time import StepTimer
from transformers import HfArgumentParser, TrainerCallback

logger = logging.getLogger("gpu_train")
REFERENCE_MODELS = {"teacher": "teacher", "tiny.en": "tiny"}  # reference row -> its folder in the inputs
TRAINING_KEYS = results_runners.TRAINING_KEYS | {"bf16", "dataloader_num_workers"}


@dataclass
class GpuTrainArguments:
    """What to train and evaluate on the GPU, or which deferred rows to finish here (``HfArgumentParser``)."""

    inputs: str | None = field(
        default=None, metadata={"help": "the inputs folder of gpu_pack_inputs.py (reassembled on the GPU)"}
    )
    rows: str = field(
        default="kdq-d2-u4",
        metadata={"help": "comma-separated trained rows of results_table.py and reference rows (teacher, tiny.en)"},
    )
    output: str = field(
        default=str(results_table.DEFAULT_OUTPUT),
        metadata={"help": "folder of rows/ (complete rows) and pending/ ($OUT on the GPU)"},
    )
    train_steps: int = field(default=2000, metadata={"help": "optimizer steps per trained row at most"})
    train_batch_size: int = field(default=32, metadata={"help": "per-device training batch size"})
    learning_rate: float = field(default=1e-4, metadata={"help": "peak learning rate (results_table's)"})
    max_minutes: float = field(
        default=8.0, metadata={"help": "training wall time of all rows together, shared equally"}
    )
    batch_size: int = field(default=64, metadata={"help": "evaluation batch size"})
    max_new_tokens: int = field(
        default=128,
        metadata={"help": "decoded tokens per utterance at most (results_table's cap; dev.jsonl needs ≤ 38)"},
    )
    bf16: bool = field(default=True, metadata={"help": "bf16 mixed-precision training (--no-bf16: fp32)"})
    device: str = field(
        default="auto", metadata={"help": "where to train and decode: auto (the GPU when there is one), cuda or cpu"}
    )
    workers: int = field(
        default=4,
        metadata={"help": "data-loader worker processes (rebuilding 30 s feature windows keeps one core busy)"},
    )
    encoder_cache: bool = field(
        default=False,
        metadata={
            "help": "the on-disk encoder-output cache of rows with a shared encoder (default: off: on a GPU the "
            "encoder pass costs less than reading its output back)"
        },
    )
    seed: int = field(default=0, metadata={"help": "training seed"})
    smoke: bool = field(
        default=False, metadata={"help": "a CPU check: 2 steps of batch 2 per row, 8 decoded tokens, no loader workers"}
    )
    score: list[str] | None = field(
        default=None,
        metadata={"help": "complete these pending row JSONs here (scores, sizes) and write them to OUTPUT/rows/"},
    )
    teacher: str | None = field(
        default=None, metadata={"help": "with --score: the teacher source to rebuild sizes from (default: the row's)"}
    )
    row_names: list[str] = field(init=False, default_factory=list)

    def __post_init__(self):
        if not self.score and not self.inputs:
            raise ValueError("give --inputs (a folder of gpu_pack_inputs.py), or --score FILE")
        if self.device not in ("auto", "cuda", "cpu"):
            raise ValueError(f"--device {self.device!r}: choose auto, cuda or cpu")
        self.row_names = [name.strip() for name in self.rows.split(",") if name.strip()]
        for name in self.row_names:
            if name not in REFERENCE_MODELS and results_table.ROWS.get(name, {}).get("kind") not in ("train", "ptq"):
                runnable = [n for n, row in results_table.ROWS.items() if row["kind"] in ("train", "ptq")]
                raise ValueError(f"unknown row {name!r}: choose from {', '.join([*runnable, *REFERENCE_MODELS])}")
        if self.smoke:
            self.train_steps, self.train_batch_size, self.max_new_tokens, self.workers = 2, 2, 8, 0
        if min(self.train_steps, self.train_batch_size, self.batch_size, self.max_new_tokens) < 1:
            raise ValueError("steps, batch sizes and --max_new_tokens must be >= 1")
        if self.max_minutes <= 0:
            raise ValueError("--max_minutes must be > 0")


def parse_args(argv=None) -> GpuTrainArguments:
    (args,) = HfArgumentParser(GpuTrainArguments, description=__doc__).parse_args_into_dataclasses(args=argv)
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
            "fp16_parameter_bytes": 2 * results_runners.n_parameters(self.teacher),
        }

    def reference(self, name: str):
        from hf_whisper_kdq import load_whisper

        if name == "teacher":
            return self.teacher, self.processor
        if not self.manifest.get("tiny"):
            raise ValueError("the inputs hold no tiny model: pack them with gpu_pack_inputs.py --tiny ...")
        return load_whisper(self.folder / REFERENCE_MODELS[name])


# ---- training --------------------------------------------------------------------------------------------------------
def training_arguments(row: dict, cli: GpuTrainArguments, student, output_dir: Path):
    """The arguments results_runners.run_training gives ``row``, with this script's steps, batch, bf16 and loaders."""
    extra = dict(
        bf16=cli.bf16,
        dataloader_num_workers=cli.workers,
        use_cpu=cli.device == "cpu",
        cache_encoder_outputs=cli.encoder_cache,
        encoder_cache_dir=str(output_dir / "encoder_cache"),
    )
    return results_runners.training_arguments(
        row,
        student,
        output_dir,
        steps=cli.train_steps,
        batch_size=cli.train_batch_size,
        learning_rate=cli.learning_rate,
        seed=cli.seed,
        **extra,
    )


def row_sizes(student, processor, plan, teacher_sizes: dict, folder: Path) -> dict:
    """results_table's sizes of a trained row: its packed checkpoint, or fp16 for a float student."""
    if plan.module_specs():
        return results_runners.packed_sizes(student, processor, teacher_sizes, folder, plan=plan)
    return results_runners.float_sizes(results_runners.inference_copy(student), processor, teacher_sizes)


def train_row(name: str, cli, inputs: Inputs, scratch: Path, budget_seconds: float, result: dict, timer):
    """Train one row as results_runners.run_training does; fills result's training, plan, model and sizes entries
    and returns (the student with its quantization baked in, for decoding, its processor)."""
    from hf_whisper_kdq import build_student
    from hf_whisper_kdq.compress import train_student

    row = results_table.ROWS[name]
    teacher, processor = inputs.teacher, inputs.processor
    student = build_student(teacher, decoder_layers=row["decoder_layers"])
    arguments = training_arguments(row, cli, student, scratch / "trainer")
    steps, budget = StepTimer(), WallBudget(budget_seconds)
    gpu = inputs.device == "cuda"
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    with timer(f"{name}: train"):
        trainer = train_student(
            student, teacher, processor, inputs.speech["train"], arguments, callbacks=[steps, budget]
        )
    state, output = trainer.state, trainer.state.log_history[-1]  # the Trainer logs its run's totals last
    runtime = output.get("train_runtime")
    train_split = inputs.manifest["splits"]["train"]
    result["model"] = results_runners.student_description(result["teacher"], student)
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
        "final_train_loss": output.get("train_loss"),
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
    student = trainer.whole_student().cpu().eval()
    plan = trainer.plan
    result["plan"], result["plan_summary"] = plan.to_dict(), plan.summary()
    del trainer
    try:
        with timer(f"{name}: sizes (save_compressed)"):
            result["sizes"] = row_sizes(student, processor, plan, inputs.teacher_sizes, scratch / "compressed")
    except ImportError as error:  # compressed-tensors absent: --score rebuilds the sizes from the plan
        result["pending"]["sizes"] = str(error)
    return results_runners.inference_copy(student), processor


def ptq_row(name: str, row: dict, inputs: Inputs, scratch: Path, result: dict, timer):
    """A naive-PTQ row as results_runners.run_ptq builds it; fills result's model and sizes entries and returns (the
    model with its quantization baked in, for decoding, its processor)."""
    model = results_runners.ptq_model(inputs.teacher, row["specs"])
    result["model"] = f"{result['teacher']} + round-to-nearest {row['specs']}"
    try:
        with timer(f"{name}: sizes (save_compressed)"):
            result["sizes"] = results_runners.packed_sizes(
                model, inputs.processor, inputs.teacher_sizes, scratch / "compressed"
            )
    except ImportError as error:  # compressed-tensors absent: --score rebuilds the sizes
        result["pending"]["sizes"] = str(error)
    return results_runners.inference_copy(model), inputs.processor


# ---- evaluation ------------------------------------------------------------------------------------------------------
class PackedFeatures:
    """``features[i]``: the packed log-mel features of the i-th evaluated row, unpacked when decoded."""

    def __init__(self, split, indices: list[int]):
        self.split, self.indices = split, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.split.features_of(self.indices[i])


def evaluate(name: str, model, processor, cli, inputs: Inputs, result: dict, timer) -> None:
    """``evaluate_model`` on the packed eval split's features; scored here when the scoring dependencies are
    installed, else left to ``--score`` (the transcripts are in the row)."""
    from datasets import Dataset

    from hf_whisper_kdq.evaluation import evaluate_model

    english_only = not getattr(model.generation_config, "is_multilingual", True)
    split = inputs.speech["eval"]
    indices = [i for i, row in enumerate(split.rows) if not english_only or row["language"] == "en"]
    with timer(f"{name}: evaluate"):
        report = evaluate_model(
            model.to(inputs.device).eval(),
            processor,
            Dataset.from_list([split.rows[i] for i in indices]),
            features=PackedFeatures(split, indices),
            batch_size=cli.batch_size,
            max_new_tokens=cli.max_new_tokens,
            progress=False,
            score=False,
        )
    device = torch.cuda.get_device_name() if inputs.device == "cuda" else "cpu"
    # "rtf" is the table's CPU real-time factor column: a GPU's decode time does not belong there.
    result["evaluation"] = {
        "english_only": english_only,
        "scores": None,
        "rtf": None,
        "gpu_rtf": report.rtf,
        "n_utterances": report.n_utterances,
        "audio_seconds": report.audio_seconds,
        "decode_seconds": report.decode_seconds,
        "batch_size": cli.batch_size,
        "num_beams": 1,
        "dtype": "float32",
        "device": device,
        "max_new_tokens": cli.max_new_tokens,
        "features": "fp16 log-mel packed by gpu_pack_inputs.py",
        "report": report.to_dict(per_utterance=True),
    }
    try:
        score_evaluation(result["evaluation"])
    except ImportError as error:  # jiwer / opencc / cn2an absent: --score scores the transcripts here
        result["pending"]["scores"] = str(error)


def score_evaluation(evaluation: dict) -> None:
    """Score the row's transcripts (``EvaluationReport.score_transcripts``) into results_table's entries."""
    from hf_whisper_kdq.evaluation import EvaluationReport

    report = EvaluationReport.from_dict(evaluation["report"]).score_transcripts()
    evaluation["report"], evaluation["scores"] = report.to_dict(per_utterance=True), results_runners.scores(report)


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
            result["sizes"] = results_runners.float_sizes(model, processor, inputs.teacher_sizes)
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
                model = results_runners.ptq_model(teacher, result["config"]["specs"])
                result["sizes"] = results_runners.packed_sizes(
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
