"""Multi-process runs under torchrun and accelerate launch (gloo on CPU), plain, under DeepSpeed ZeRO-2 and under FSDP2:
the trainer (2 processes × batch 2 against 1 process × batch 4), resuming, the example script and the whole
``compress`` job."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import torch

from hf_whisper_kdq.config import DistillQuantArguments
from hf_whisper_kdq.sharding import check_sharding

SCRIPT = Path(__file__).parent / "scripts" / "ddp_train.py"


EXAMPLES = Path(__file__).parents[1] / "examples"


def _run(
    command: list[str],
    cwd: Path,
    *,
    extra_args: dict | None = None,
    expect_failure: bool = False,
    fsdp: bool = False,
    env: dict | None = None,
) -> subprocess.CompletedProcess:
    # DS_ACCELERATOR: DeepSpeed's CPU accelerator (gloo without oneCCL). PYTHONFAULTHANDLER: a process killed by a
    # signal (a rare SIGABRT inside gloo's threads has been seen on loaded machines) prints where its threads were.
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONFAULTHANDLER="1", **(env or {}))
    if extra_args:
        env["KDQ_TEST_EXTRA_ARGS"] = json.dumps(extra_args)
    if fsdp or (extra_args and extra_args.get("fsdp")):  # accelerate runs FSDP on accelerators only: lifted for CPUs
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(FSDP_ON_CPU), env.get("PYTHONPATH")]))
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)
    if not expect_failure and result.returncode != 0 and _aborted_outside_python(result.stderr):
        # gloo's own threads abort now and then on a loaded machine (no Python frame on any thread: nothing of ours
        # was running); the same launch once more tells that from a crash of ours, which fails again.
        result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)
    assert (result.returncode != 0) == expect_failure, _failure_excerpt(result.stderr)
    return result


def _aborted_outside_python(stderr: str) -> bool:
    """Whether a process died of SIGABRT with faulthandler finding no Python frame on its threads."""
    fatal = stderr.find("Fatal Python error: Aborted")
    report = stderr[fatal : stderr.find("Extension modules", fatal)] if fatal >= 0 else ""
    return bool(report) and "File " not in report and "<no Python frame>" in report


def _failure_excerpt(stderr: str) -> str:
    """The end of a launch's stderr and, where a process died of a signal, the start of faulthandler's report (the
    threads' stacks come before its long list of extension modules, which alone would fill the end)."""
    fatal = stderr.find("Fatal Python error")
    head = stderr[fatal : fatal + 3000] + "\n[...]\n" if fatal >= 0 else ""
    return head + stderr[-3000:]


# Two processes on this machine, the way users launch them. `accelerate launch --cpu` would start one process (it
# expects mpirun for several CPU processes); --multi_gpu starts them through torchrun's launcher, and with no GPU the
# Trainer picks gloo.
LAUNCHERS = {
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
    "accelerate": [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ],
}
NO_PYTHON = {"torchrun": "--no-python", "accelerate": "--no_python"}
SHARDING = {
    "zero2": {"deepspeed": str(EXAMPLES / "deepspeed_zero2.json")},
    "fsdp2": {"fsdp": True, "fsdp_config": str(EXAMPLES / "fsdp2.json")},
}
FSDP_ON_CPU = Path(__file__).parent / "scripts" / "fsdp_on_cpu"
FSDP_FLAGS = ["--fsdp", "--fsdp_config", SHARDING["fsdp2"]["fsdp_config"]]  # the same, as command-line flags


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """``one_process(student="")``: the result of the script in one plain process with batch 4 (the global batch of
    2 processes × 2), the baseline of the multi-process runs; run once per student for the whole module."""
    results = {}

    def result(student: str = "") -> dict:
        if student not in results:
            folder = tmp_path_factory.mktemp(f"one-process-{student or 'copy'}")
            _run([sys.executable, str(SCRIPT), str(folder / "out"), "4"], folder, env={"KDQ_TEST_STUDENT": student})
            results[student] = torch.load(folder / "out" / "result.pt")
        return results[student]

    return result


@pytest.mark.parametrize("launcher", [*LAUNCHERS, "torchrun+zero2", "torchrun+fsdp2", "torchrun+fsdp2+narrow"])
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path, one_process, launcher):
    # "+narrow": a student half the teacher's width, whose adapters FSDP shards like any weight.
    launcher, _, sharding = launcher.partition("+")
    sharding, _, student = sharding.partition("+")
    if sharding == "zero2":
        pytest.importorskip("deepspeed")
    _run(
        [*LAUNCHERS[launcher], str(SCRIPT), str(tmp_path / "two"), "2"],
        tmp_path,
        extra_args=SHARDING.get(sharding),
        env={"KDQ_TEST_STUDENT": student},
    )
    one, two = one_process(student), torch.load(tmp_path / "two" / "result.pt")

    assert one["plan"] == two["plan"]  # the selection is deterministic: every rank holds the same plan
    rank_plans = [(tmp_path / "two" / f"plan_rank{rank}.json").read_text() for rank in (0, 1)]
    assert rank_plans[0] == rank_plans[1]  # bits, distilled layers, matching and every q_l / d_l, exactly
    assert len({bits for _, bits, _ in one["plan"]}) > 1  # the budget makes the allocation a real choice
    assert len(one["losses"]) == 4
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-5)
    # Gradient norms (before clipping) check the loss normalization across processes: Adam would hide a wrong scale.
    assert two["grad_norms"] == pytest.approx(one["grad_norms"], rel=1e-4)
    # Evaluation after training (generation on each process's rows, then gathered) uses the same trained weights.
    assert two["test_loss"] == pytest.approx(one["test_loss"], rel=1e-5)
    assert torch.equal(two["generated"], one["generated"])
    assert two["synced_gpus"] == (["True"] if sharding == "fsdp2" else ["False"])
    # Under FSDP, `whole_student` gathered the shards into a whole copy: every weight is there, whole.
    assert two["weights"].keys() == one["weights"].keys()
    assert two["specs"] == one["specs"]  # the plan's bits on every fake-quant layer
    if student == "narrow":  # its budget keeps a quantizable layer in float: the copy kept its clipping ratios too
        kept_float = [name for name, spec in one["specs"].items() if spec == "None"]
        assert kept_float and all(f"{name}.weight_clip" in two["weights"] for name in kept_float)
    assert any(name.startswith("kdq_adapters.") for name in one["weights"]) == (student == "narrow")
    for name, weight in one["weights"].items():
        # Learnable clipping ratios get tiny LSQ gradients, which Adam normalizes to full-size steps, so summation
        # order differences between 1 and 2 processes show there (observed ≤ 1.5e-3 after 4 steps at lr 1e-3) and,
        # through the quantization grid they move, in the quantized weights (observed ≤ 2.5e-4); float weights agree
        # to rounding.
        tolerance = 5e-3 if name.endswith("weight_clip") else 1e-3
        torch.testing.assert_close(two["weights"][name], weight, atol=tolerance, rtol=0)


@pytest.mark.parametrize("launcher", [*LAUNCHERS, "torchrun+fsdp2"])
def test_compress_on_two_processes_writes_and_pushes_once(tmp_path, short_window_whisper, monkeypatch, launcher):
    """The whole ``compress`` job on 2 processes: one export, one card, one summary, one commit to the (stand-in) Hub."""
    pytest.importorskip("piper")
    from hub_standin import HubStandIn

    from hf_whisper_kdq.sources import save_whisper

    model, processor = short_window_whisper
    teacher = save_whisper(model, processor, tmp_path / "teacher")
    output = tmp_path / "run"
    launcher, _, sharding = launcher.partition("+")
    command = [
        *LAUNCHERS[launcher],
        NO_PYTHON[launcher],
        str(Path(sys.executable).parent / "hf-whisper-kdq"),
        "compress",
        str(teacher),
        "--level",
        "smoke",
        "--output_dir",
        str(output),
        "--synthetic_prompts",
        "4",
        "--max_eval_samples",
        "2",
        "--max_steps",
        "2",
        "--per_device_train_batch_size",
        "1",
        "--decoder_layers",
        "1",
        "--eval_max_new_tokens",
        "8",
        "--ctranslate2_quantization",
        "none",
        "--evaluate_teacher",
        "false",
        "--ddp_backend",
        "gloo",
        "--disable_tqdm",
        "true",
        "--logging_steps",
        "1",
        "--push_to_hub",
        "--hub_model_id",
        "kdq-org/tiny-kdq",
    ]
    with HubStandIn(lifetime=600) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        monkeypatch.setenv("HF_TOKEN", "hf_" + "x" * 34)
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        fsdp = FSDP_FLAGS if sharding == "fsdp2" else []
        _run(command + fsdp, tmp_path, fsdp=bool(fsdp))
    assert hub.unexpected == []
    assert len(hub.created) == 1 and len(hub.commits) == 1  # the main process alone pushes
    assert "model.safetensors" in hub.commits[0]["files"] and "README.md" in hub.commits[0]["files"]
    summary = json.loads((output / "compress_summary.json").read_text())
    assert summary["processes"] == 2
    assert (
        len([entry for entry in summary["training_log"] if "loss" in entry]) == 2
    )  # 2 optimizer steps, each over both processes' batches
    # No leftovers of a second writer: staging folders of atomic writes would start with a dot.
    assert sorted(p.name for p in output.iterdir() if p.name.startswith(".")) == []


def _trainer_sharded_by(tmp_path, **sharding) -> SimpleNamespace:
    """What ``check_sharding`` reads of a trainer built with these sharding arguments: accelerate's own plugins,
    built from the arguments as the Trainer builds them. (A real trainer under FSDP or DeepSpeed needs a process
    group, and the refusals come before anything uses one.) The arguments write settings to os.environ."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    args = DistillQuantArguments(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, **sharding)
    fsdp = FullyShardedDataParallelPlugin(**args.fsdp_plugin_args) if args.fsdp_plugin_args else None
    deepspeed = args.deepspeed_plugin if args.deepspeed else None
    return SimpleNamespace(
        args=args,
        is_fsdp_enabled=fsdp is not None,
        is_deepspeed_enabled=deepspeed is not None,
        accelerator=SimpleNamespace(state=SimpleNamespace(fsdp_plugin=fsdp, deepspeed_plugin=deepspeed)),
    )


@mock.patch.dict(os.environ)
def test_zero3_is_refused_with_the_alternative(tmp_path):
    pytest.importorskip("deepspeed")
    zero3 = {**json.loads(Path(SHARDING["zero2"]["deepspeed"]).read_text()), "zero_optimization": {"stage": 3}}
    with pytest.raises(NotImplementedError, match=r"ZeRO-3 shards the student's weights.*use ZeRO stage 1 or 2"):
        check_sharding(_trainer_sharded_by(tmp_path, deepspeed=zero3))
    check_sharding(_trainer_sharded_by(tmp_path, **SHARDING["zero2"]))  # the alternative named


@mock.patch.dict(os.environ)
def test_a_deepspeed_optimizer_section_is_refused_with_learnable_clipping(tmp_path):
    # DeepSpeed would build that optimizer itself: the clipping ratios' own learning rate would be lost.
    pytest.importorskip("deepspeed")
    config = json.loads(Path(SHARDING["zero2"]["deepspeed"]).read_text())
    config["optimizer"] = {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto"}}
    with pytest.raises(ValueError, match=r'"optimizer" section.*clip_learning_rate.*Remove the "optimizer" section'):
        check_sharding(_trainer_sharded_by(tmp_path, deepspeed=config, learnable_clipping=True))
    check_sharding(_trainer_sharded_by(tmp_path, deepspeed=config, learnable_clipping=False))
    check_sharding(_trainer_sharded_by(tmp_path, **SHARDING["zero2"], learnable_clipping=True))


def test_fsdp_with_bf16_mixed_precision_trains_like_fp32(tmp_path, one_process):
    # FSDP's mixed-precision policy hands the fake quantization bf16 copies of the weights (fp32 masters are kept).
    _run(
        [*LAUNCHERS["torchrun"], str(SCRIPT), str(tmp_path / "bf16"), "2"],
        tmp_path,
        extra_args={**SHARDING["fsdp2"], "bf16": True},
    )
    fp32, bf16 = one_process(), torch.load(tmp_path / "bf16" / "result.pt")
    # bf16 arithmetic did run: fp32 on 2 processes differs from 1 process by ~1e-7 relative, bf16 by ~1e-4.
    assert max(abs(b - f) / f for b, f in zip(bf16["losses"], fp32["losses"])) > 1e-5
    # Up to 1.2e-3 measured since the signed-scale grid (2026-12-04; 1e-3 held before): bf16 rounding moves codes.
    assert bf16["losses"] == pytest.approx(fp32["losses"], rel=2e-3)
    assert bf16["test_loss"] == pytest.approx(fp32["test_loss"], rel=2e-3)
    assert {weight.dtype for weight in bf16["weights"].values()} == {torch.float32}


def test_fsdp_run_resumed_from_its_checkpoint_equals_the_uninterrupted_run(tmp_path):
    # FSDP checkpoints hold accelerate's own model and optimizer files beside model.safetensors; resuming reads them
    # (torch.load with weights_only=True), the plan, the clipping ratios and the RNG states.
    saving = {**SHARDING["fsdp2"], "save_strategy": "steps", "save_steps": 2}
    command = [*LAUNCHERS["torchrun"], str(SCRIPT)]
    _run([*command, str(tmp_path / "whole"), "2"], tmp_path, extra_args=saving)
    assert (tmp_path / "whole" / "checkpoint-2" / "pytorch_model_fsdp.bin").is_file()
    _run(
        [*command, str(tmp_path / "resumed"), "2"],
        tmp_path,
        extra_args=saving,
        env={"KDQ_TEST_RESUME_FROM": str(tmp_path / "whole" / "checkpoint-2")},
    )
    whole, resumed = (torch.load(tmp_path / name / "result.pt") for name in ("whole", "resumed"))
    assert resumed["losses"] == whole["losses"] and resumed["grad_norms"] == whole["grad_norms"]
    assert resumed["plan"] == whole["plan"] and resumed["test_loss"] == whole["test_loss"]
    for name, weight in whole["weights"].items():
        assert torch.equal(resumed["weights"][name], weight), name


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a GPU: accelerate's own FSDP set-up, without the CPU lift"
)
def test_fsdp_on_a_gpu_matches_training_without_it(tmp_path):
    # One process (the lent GPU machines have one GPU): FSDP's wrapping, gathers and state-dict paths as on a cluster.
    gpu = {"use_cpu": False}
    _run([sys.executable, str(SCRIPT), str(tmp_path / "one"), "4"], tmp_path, extra_args=gpu)
    one_gpu_process = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    _run(
        [*one_gpu_process, str(SCRIPT), str(tmp_path / "fsdp"), "4"], tmp_path, extra_args={**gpu, **SHARDING["fsdp2"]}
    )
    one, fsdp = (torch.load(tmp_path / name / "result.pt") for name in ("one", "fsdp"))
    assert fsdp["plan"] == one["plan"] and fsdp["specs"] == one["specs"]
    assert fsdp["losses"] == pytest.approx(one["losses"], rel=1e-4)
    assert fsdp["test_loss"] == pytest.approx(one["test_loss"], rel=1e-4)
    assert fsdp["synced_gpus"] == ["True"] and fsdp["weights"].keys() == one["weights"].keys()


@mock.patch.dict(os.environ)
def test_fsdp_reading_whole_weights_outside_the_forward_is_refused(tmp_path):
    with pytest.raises(NotImplementedError, match="quant_weight > 0 .* set quant_weight=0 .* under FSDP"):
        check_sharding(_trainer_sharded_by(tmp_path, **SHARDING["fsdp2"], quant_weight=0.1))
    check_sharding(_trainer_sharded_by(tmp_path, **SHARDING["fsdp2"], quant_weight=0))


def test_fsdp_version_1_is_refused_with_version_2():
    # accelerate builds an FSDP1 plugin only on GPUs (on CPUs it stops first, "no available devices"), so this checks
    # the guard itself on a trainer-shaped stand-in.
    plugin = SimpleNamespace(fsdp_version=1)
    trainer = SimpleNamespace(
        is_fsdp_enabled=True,
        is_deepspeed_enabled=False,
        accelerator=SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin)),
    )
    with pytest.raises(NotImplementedError, match=r"FSDP version 1 .* use FSDP version 2 .*examples/fsdp2.json"):
        check_sharding(trainer)


@pytest.mark.parametrize("launcher", [*LAUNCHERS, "torchrun+fsdp2"])
def test_example_script_runs_on_two_processes_and_reports_once(tmp_path, short_window_whisper, launcher):
    pytest.importorskip("piper")
    launcher, _, sharding = launcher.partition("+")
    from hf_whisper_kdq.sources import save_whisper

    model, processor = short_window_whisper
    teacher = save_whisper(model, processor, tmp_path / "teacher")
    command = [
        *LAUNCHERS[launcher],
        str(EXAMPLES / "distill_whisper_base.py"),
        "--teacher",
        str(teacher),
        "--decoder_layers",
        "1",
        "--synthetic_prompts",
        "4",
        "--output_dir",
        str(tmp_path / "out"),
        "--max_steps",
        "2",
        "--per_device_train_batch_size",
        "1",
        "--per_device_eval_batch_size",
        "2",
        "--report_to",
        "none",
        "--ddp_backend",
        "gloo",
        "--disable_tqdm",
        "true",
    ]
    fsdp = FSDP_FLAGS if sharding == "fsdp2" else []
    result = _run(command + fsdp, tmp_path, fsdp=bool(fsdp))
    assert result.stdout.count("KDQ plan at step") == 1  # the main process alone reports
    assert "eval_loss_kd" in result.stdout


def test_a_loss_diverging_on_one_process_stops_every_process(tmp_path):
    """Alone, the diverged process would stop and the other would wait for it until the launcher's timeout."""
    command = [*LAUNCHERS["torchrun"], str(SCRIPT), str(tmp_path / "out"), "2"]
    result = _run(command, tmp_path, env={"KDQ_TEST_POISON_TEACHER": "1:3"}, expect_failure=True)
    assert re.search(r"\[rank1\]:.*non-finite at step 3 in term\(s\) kd", result.stderr)
    assert re.search(r"\[rank0\]:.*non-finite at step 3 in another process", result.stderr)
