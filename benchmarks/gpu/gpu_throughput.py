"""Training throughput of Whisper-KDQ on one GPU (steps/s, peak memory, ratios) and a resume check.

    python benchmarks/gpu/gpu_throughput.py --output $OUT/throughput.json        # on the GPU (gpu_session.sh)
    python benchmarks/gpu/gpu_throughput.py --device cpu --smoke --output /tmp/throughput.json   # a CPU check

Random weights with real Whisper shapes (step time does not depend on the values). ``--pairs`` lists teacher
shape : student decoder layers; the default ``small:2,base:2`` is

* a whisper-small-shaped teacher (d_model 768, 12 + 12 layers, 12 heads, FFN 3072, vocabulary 51,865) and a
  base-level student: its spaced copy with 2 decoder layers, quantized;
* a whisper-base-shaped teacher and a tiny-level student, likewise.

Each pair runs step_time.py's comparison on the same student and batches, bf16 by default: a plain
``Seq2SeqTrainer`` fine-tune (encoder trainable, and frozen) and ``DistillQuantTrainer`` without and with encoder
sharing (frozen student encoder equal to the teacher's: one encoder pass for both). Printed and written as ratios
(kdq/plain, kdq_shared/plain, kdq_shared/plain_frozen, kdq_shared/kdq) beside each run's steps/s and peak
allocated GPU memory.

Resume check, on the last pair's shapes: guided KDQ (bits from {2, 4, 8} under a budget of the uniform-int3 size,
dynamic layer matching, re-selection every 2 steps) trains ``--resume_steps`` steps with a checkpoint every
``--resume_save``; a fresh trainer then resumes from the first checkpoint and trains to the end. Its final weights,
per-step losses and plan are compared with the uninterrupted run's (deterministic algorithms on, for both).
"""

from __future__ import annotations

import os

# cuBLAS's deterministic workspace setting, read when cuBLAS starts: the resume check runs with deterministic
# algorithms, which refuse cuBLAS calls without it.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import datetime as dt  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

# The CPU benchmarks this GPU tooling builds on (results_table, step_time) live one folder up.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import results_runners  # noqa: E402
import results_table  # noqa: E402
import torch  # noqa: E402
from step_time import (
    SHAPES,
    RandomSpeech,
    Workload,
    collate,
    compare,
    device_name,
    print_ratios,  # noqa: E402
    random_teacher,
    release,
    run,
)
from transformers import HfArgumentParser, TrainerCallback  # noqa: E402


@dataclass
class ThroughputArguments:
    """What to measure on the GPU (``HfArgumentParser``: ``--help`` lists every field)."""

    pairs: str = field(
        default="small:2,base:2",
        metadata={"help": f"comma-separated TEACHER_SHAPE:STUDENT_DECODER_LAYERS (shapes: {', '.join(SHAPES)})"},
    )
    batch_size: int = field(default=32, metadata={"help": "rows per optimizer step"})
    label_tokens: int = field(default=24, metadata={"help": "text tokens per label row"})
    steps: int = field(default=10, metadata={"help": "timed optimizer steps per run"})
    warmup: int = field(default=2, metadata={"help": "untimed steps before them (kernel choice, allocation)"})
    bf16: bool = field(default=True, metadata={"help": "bf16 mixed precision (--no-bf16: fp32)"})
    device: str = field(
        default="auto", metadata={"help": "where to train: auto (the GPU when there is one), cuda or cpu"}
    )
    resume_steps: int = field(default=6, metadata={"help": "steps of the resume check's runs"})
    resume_save: int = field(
        default=3, metadata={"help": "checkpoint interval of the resume check; it resumes from the first checkpoint"}
    )
    profile: int = field(
        default=0,
        metadata={
            "help": "also profile this many steps of the last pair's kdq run (after the warmup) and write the "
            "operators that took the most device time next to --output (<output>.profile.txt)"
        },
    )
    smoke: bool = field(
        default=False, metadata={"help": "a CPU check: the micro shape, batch 2, 1 timed step, a 4-step resume check"}
    )
    output: str | None = field(default=None, metadata={"help": "write the results as JSON to this file"})
    pair_list: list = field(init=False, default_factory=list)

    def __post_init__(self):
        if self.device not in ("auto", "cuda", "cpu"):
            raise ValueError(f"--device {self.device!r}: choose auto, cuda or cpu")
        if self.smoke:
            self.pairs, self.batch_size, self.steps, self.warmup = "micro:1", 2, 1, 1
            self.profile = min(self.profile, 1)
            self.resume_steps, self.resume_save = 4, 2
        try:
            self.pair_list = [(shape, int(layers)) for shape, layers in (p.split(":") for p in self.pairs.split(","))]
        except ValueError:
            raise ValueError(
                f"--pairs {self.pairs!r}: give TEACHER_SHAPE:DECODER_LAYERS items, e.g. small:2,base:2"
            ) from None
        if unknown := [shape for shape, _ in self.pair_list if shape not in SHAPES]:
            raise ValueError(f"unknown shape(s) {unknown}: choose from {', '.join(SHAPES)}")
        if not 0 < self.resume_save < self.resume_steps:
            raise ValueError("--resume_save must be between 0 and --resume_steps (exclusive)")


def parse_args(argv=None) -> ThroughputArguments:
    (args,) = HfArgumentParser(ThroughputArguments, description=__doc__).parse_args_into_dataclasses(args=argv)
    return args


class ProfileSteps(TrainerCallback):
    """torch.profiler over ``steps`` optimizer steps after the first ``skip`` ones: where a KDQ step spends its
    time (the kdq/plain ratio alone does not say)."""

    def __init__(self, skip: int, steps: int):
        self.skip, self.steps, self.table = skip, steps, None
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.profiler = torch.profiler.profile(activities=activities, record_shapes=True)

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.skip:
            self.profiler.start()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.skip + self.steps:
            self.profiler.stop()
            sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
            self.table = self.profiler.key_averages(group_by_input_shape=True).table(sort_by=sort, row_limit=40)


def resume_check(shape: str, decoder_layers: int, work: Workload, steps: int, save_every: int) -> dict:
    """Uninterrupted guided KDQ against the same run resumed from its first checkpoint."""
    from hf_whisper_kdq import DistillQuantArguments, DistillQuantTrainer, build_student

    teacher = random_teacher(shape)
    # Four steps per epoch: the first checkpoint falls inside an epoch, so resuming must skip the seen batches.
    data = RandomSpeech(teacher.config, work.batch_size * 4, work.label_tokens)

    def train(output_dir: str, resume: str | None = None) -> dict:
        student = build_student(teacher, decoder_layers=decoder_layers)
        args = DistillQuantArguments(
            output_dir=output_dir,
            per_device_train_batch_size=work.batch_size,
            max_steps=steps,
            learning_rate=1e-4,
            warmup_steps=1,
            logging_steps=1,
            save_strategy="steps",
            save_steps=save_every,
            seed=0,
            bf16=work.bf16,
            use_cpu=work.use_cpu,
            report_to="none",
            disable_tqdm=True,
            dataloader_num_workers=0,
            remove_unused_columns=False,
            quant_targets="encoder,decoder",
            quant_bit_choices="2,4,8",
            size_budget_mb=results_runners.uniform_budget_mb(student, "encoder,decoder", 3),
            layer_matching="dynamic",
            selection_interval=2,
            num_distill_layers=min(2, decoder_layers),
            selection_probe_batches=1,
            cache_encoder_outputs=False,
        )
        trainer = DistillQuantTrainer(
            model=student, teacher_model=teacher, args=args, train_dataset=data, data_collator=collate
        )
        trainer.train(resume_from_checkpoint=resume)
        model = trainer.accelerator.unwrap_model(trainer.model)
        result = {
            "weights": {k: v.detach().float().cpu() for k, v in model.state_dict().items()},
            "losses": {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e},
            "decisions": [
                (u["name"], u["bits"], u["distilled"], u["teacher_layer"]) for u in trainer.plan.to_dict()["units"]
            ],
            "step": trainer.state.global_step,
        }
        del trainer
        release(student)
        release(teacher)
        return result

    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with tempfile.TemporaryDirectory() as first, tempfile.TemporaryDirectory() as second:
            whole = train(first)
            resumed = train(second, resume=str(Path(first) / f"checkpoint-{save_every}"))
    finally:
        torch.use_deterministic_algorithms(deterministic)
    same_keys = whole["weights"].keys() == resumed["weights"].keys()
    weight_diff = (
        max((whole["weights"][k] - resumed["weights"][k]).abs().max().item() for k in whole["weights"])
        if same_keys
        else None
    )
    after = [s for s in whole["losses"] if s > save_every and s in resumed["losses"]]
    return {
        "teacher": shape,
        "decoder_layers": decoder_layers,
        "steps": steps,
        "resumed_from_step": save_every,
        "final_step_uninterrupted": whole["step"],
        "final_step_resumed": resumed["step"],
        "same_keys": same_keys,
        "max_abs_weight_diff": weight_diff,
        "bitwise_equal": weight_diff == 0.0,
        "max_loss_diff_after_resume": max(
            (abs(whole["losses"][s] - resumed["losses"][s]) for s in after), default=None
        ),
        "steps_compared": after,
        "plan_decisions_equal": whole["decisions"] == resumed["decisions"],
    }


def main(argv=None) -> int:
    cli = parse_args(argv)
    device = cli.device if cli.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    work = Workload(
        batch_size=cli.batch_size,
        label_tokens=cli.label_tokens,
        steps=cli.steps,
        warmup=cli.warmup,
        bf16=cli.bf16,
        use_cpu=device == "cpu",
    )
    started, clock = dt.datetime.now(dt.UTC), time.perf_counter()
    pairs = []
    for shape, layers in cli.pair_list:
        work.decoder_layers = layers
        print(
            f"── {shape} teacher → {layers}-decoder-layer student, batch {work.batch_size}, "
            f"{'bf16' if work.bf16 else 'fp32'}, {device_name(work)}",
            flush=True,
        )
        result = compare(random_teacher(shape), work)
        print_ratios(result["ratios"])
        pairs.append({"teacher": shape, "decoder_layers": layers, **result})
    shape, layers = cli.pair_list[-1]
    work.decoder_layers = layers
    if cli.profile:
        profiler = ProfileSteps(skip=work.warmup, steps=cli.profile)
        profiled = Workload(**{**asdict(work), "steps": cli.profile})
        run("kdq", random_teacher(shape), profiled, extra_callbacks=(profiler,))
        print(f"── profile of {cli.profile} kdq steps ({shape} teacher → {layers} decoder layers)\n{profiler.table}")
        if cli.output:
            Path(cli.output).parent.mkdir(parents=True, exist_ok=True)
            Path(f"{cli.output}.profile.txt").write_text(profiler.table + "\n")
    print(
        f"── resume check: {shape} teacher → {layers} decoder layers, {cli.resume_steps} steps, resumed from "
        f"checkpoint-{cli.resume_save}",
        flush=True,
    )
    resume = resume_check(shape, layers, work, cli.resume_steps, cli.resume_save)
    print(json.dumps(resume, indent=1))
    command = shlex.join(["python", *sys.argv] if argv is None else ["gpu_throughput.py", *argv])
    report = {
        "device": device_name(work),
        "machine": results_table.machine_info(torch.get_num_threads()),
        "workload": {k: v for k, v in asdict(work).items() if k != "decoder_layers"},
        "pairs": pairs,
        "resume": resume,
        "date": started.isoformat(timespec="seconds"),
        "wall_seconds": round(time.perf_counter() - clock, 1),
        "command": command,
    }
    if cli.output:
        Path(cli.output).parent.mkdir(parents=True, exist_ok=True)
        Path(cli.output).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
