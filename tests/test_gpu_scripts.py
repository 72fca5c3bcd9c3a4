"""CPU smoke runs of the GPU scripts (benchmarks/gpu/), each in a subprocess as the device would run it, on a tiny
random Whisper with a 1 s input window; and the pieces of gpu_pack_inputs.py round-tripping bit-exactly."""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from hf_whisper_kdq import save_whisper

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
GPU_TOOLS = BENCHMARKS / "gpu"  # the transport and GPU-side scripts, apart from the CPU benchmarks
sys.path[:0] = [str(GPU_TOOLS), str(BENCHMARKS)]

import gpu_pack_inputs  # noqa: E402
import gpu_train  # noqa: E402
import results_runners  # noqa: E402
import results_table  # noqa: E402
from step_time import KINDS  # noqa: E402

PIECE_MB = 1.0


def run_script(script: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    # One thread: micro models gain nothing from more, and on 2 busy cores OpenMP barriers cost seconds.
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    done = subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        env=environment,
        timeout=300,
    )
    assert done.returncode == 0, f"{script.name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def throughput(tmp_path_factory):
    """gpu_throughput.py's smoke run, started first: it runs beside the packing and training tests."""
    output = tmp_path_factory.mktemp("throughput") / "throughput.json"
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [
            sys.executable,
            str(GPU_TOOLS / "gpu_throughput.py"),
            "--device",
            "cpu",
            "--smoke",
            "--profile",
            "1",
            "--output",
            str(output),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=environment,
    )
    yield process, output
    if process.poll() is None:
        process.kill()


@pytest.fixture(scope="module")
def packed(tmp_path_factory, _short_window_whisper_session, throughput):
    """A smoke pack of a tiny teacher whose feature extractor and encoder take 1 s (100 frames) of audio."""
    root = tmp_path_factory.mktemp("gpu_pack")
    teacher = save_whisper(*_short_window_whisper_session, root / "teacher")
    run_script(
        GPU_TOOLS / "gpu_pack_inputs.py",
        "--smoke",
        "--teacher",
        str(teacher),
        "--output",
        str(root / "pack"),
        "--no-wheels",
        "--piece_mb",
        str(PIECE_MB),
    )
    return root / "pack"


def test_pack_lists_every_piece_once_within_the_piece_size(packed):
    listing = json.loads((packed / "pieces" / gpu_pack_inputs.PIECES_FILE).read_text())
    pieces = listing["archive"]["pieces"]
    assert len(pieces) > 1 and all(p["bytes"] <= PIECE_MB * 1e6 for p in pieces)
    assert sum(p["bytes"] for p in pieces) == listing["archive"]["bytes"]
    carried = [name for call in listing["calls"] for name in call]
    assert sorted(carried) == sorted([gpu_pack_inputs.PIECES_FILE] + [p["name"] for p in pieces])
    manifest = gpu_pack_inputs.read_manifest(packed / "inputs")
    assert manifest["smoke"] and (manifest["features"]["mels"], manifest["features"]["frames"]) == (80, 100)
    assert manifest["splits"]["train"]["n_rows"] == 6
    assert manifest["splits"]["eval"]["corpora"] == {"smoke-en": 3, "smoke-zh": 3}


def test_reassemble_round_trips_bit_exactly(packed, tmp_path):
    run_script(
        GPU_TOOLS / "gpu_pack_inputs.py", "--reassemble", str(packed / "pieces"), "--into", str(tmp_path / "inputs")
    )
    comparison = filecmp.dircmp(packed / "inputs", tmp_path / "inputs")
    files = [path.relative_to(packed / "inputs") for path in (packed / "inputs").rglob("*") if path.is_file()]
    assert files and not comparison.left_only and not comparison.right_only
    _, mismatch, errors = filecmp.cmpfiles(packed / "inputs", tmp_path / "inputs", files, shallow=False)
    assert not mismatch and not errors


def test_reassemble_refuses_corrupted_and_missing_pieces(packed, tmp_path, capsys):
    pieces = tmp_path / "pieces"
    shutil.copytree(packed / "pieces", pieces)
    corrupted = pieces / "inputs.tar.001"
    data = bytearray(corrupted.read_bytes())
    data[len(data) // 2] ^= 1
    corrupted.write_bytes(bytes(data))
    (pieces / "inputs.tar.000").unlink()
    assert gpu_pack_inputs.main(["--reassemble", str(pieces), "--into", str(tmp_path / "inputs")]) == 2
    message = capsys.readouterr().err
    assert "missing ['inputs.tar.000']" in message and "corrupted (size or SHA-256) ['inputs.tar.001']" in message
    assert not (tmp_path / "inputs").exists()


def test_trimmed_features_restore_exactly():
    generator = torch.Generator().manual_seed(0)
    speech = torch.randn(80, 40, generator=generator)
    padded = torch.cat([speech, torch.full((80, 60), -0.5)], dim=1)  # a log-mel window padded past its audio
    unpadded = torch.randn(80, 100, generator=generator)  # nothing to trim
    writer = gpu_pack_inputs.SplitWriter("eval")
    for features in (padded, unpadded):
        writer.add(features, {"id": "x"})
    assert writer.frames == [40, 99]
    split = gpu_pack_inputs.PackedSplit(writer.tensors(), "eval", writer.rows, 100)
    for i, features in enumerate((padded, unpadded)):
        assert torch.equal(split.features_of(i), features.half().float())


def test_train_smoke_defers_what_it_cannot_do_and_score_completes_it(packed, tmp_path):
    # A GPU image without opencc (Mandarin scoring) and compressed-tensors (the packed checkpoint's sizes).
    blocked = tmp_path / "blocked"
    for module in ("opencc", "compressed_tensors"):
        (blocked / module).mkdir(parents=True)
        (blocked / module / "__init__.py").write_text(f"raise ImportError('{module} is not installed here')\n")
    path = os.pathsep.join([str(blocked), os.environ.get("PYTHONPATH", "")])
    run_script(
        GPU_TOOLS / "gpu_train.py",
        "--inputs",
        str(packed / "inputs"),
        "--device",
        "cpu",
        "--smoke",
        "--output",
        str(tmp_path / "gpu"),
        "--rows",
        "kdq-d2-u4,ptq-decemb-int3g32",
        env={"PYTHONPATH": path},
    )
    pending = tmp_path / "gpu" / "pending" / "kdq-d2-u4-gpu.json"
    row = json.loads(pending.read_text())
    assert set(row["pending"]) == {"scores", "sizes"}
    training = row["training"]
    assert training["train_steps"] == 2 and training["steps_per_second"] > 0 and training["median_step_seconds"] > 0
    assert "peak_gpu_memory_bytes" in training and row["plan"]["units"]
    utterances = row["evaluation"]["report"]["utterances"]
    assert len(utterances) == 6 and all("hypothesis" in u and u["reference"] for u in utterances)

    assert gpu_train.main(["--score", str(pending), "--output", str(tmp_path / "table")]) == 0
    done = json.loads((tmp_path / "table" / "rows" / "kdq-d2-u4-gpu.json").read_text())
    assert not done["pending"] and done["completed_by_score"] == ["scores", "sizes"]
    assert {c: s["metric"] for c, s in done["evaluation"]["scores"].items()} == {"smoke-en": "wer", "smoke-zh": "cer"}
    assert done["sizes"]["bytes_on_disk"] > 0 and done["sizes"]["paper_ratio"] > 1
    assert "kdq-d2-u4-gpu" in results_table.merge(tmp_path / "table")

    # A naive-PTQ row: no training, the teacher quantized as results_table quantizes it, completed the same way.
    pending_ptq = tmp_path / "gpu" / "pending" / "ptq-decemb-int3g32-gpu.json"
    row = json.loads(pending_ptq.read_text())
    assert set(row["pending"]) == {"scores", "sizes"} and row["training"] is None and row["kind"] == "ptq"
    assert gpu_train.main(["--score", str(pending_ptq), "--output", str(tmp_path / "table")]) == 0
    done = json.loads((tmp_path / "table" / "rows" / "ptq-decemb-int3g32-gpu.json").read_text())
    assert not done["pending"] and done["sizes"]["paper_ratio"] > 1
    assert done["sizes"]["per_layer_bits"]["decoder.0"] == 3 and done["sizes"]["per_layer_bits"]["encoder.0"] == 16
    assert "ptq-decemb-int3g32-gpu" in results_table.merge(tmp_path / "table")


def test_session_train_step_brings_the_rows_back_as_one_archive(packed, tmp_path):
    # The device tool returns at most 8 files per call: gpu_session.sh must bundle the rows, however many.
    site, out = tmp_path / "site", tmp_path / "out"
    site.mkdir()
    (site / ".installed").touch()  # no wheels to install here
    environment = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "KDQ_CARRY": str(packed / "pieces"),
        "KDQ_ROOT": str(tmp_path / "root"),
        "KDQ_SITE": str(site),
        "OUT": str(out),
        "KDQ_TRAIN_ARGS": "--device cpu --smoke --rows teacher,ptq-decemb-int3g32",
    }
    done = subprocess.run(
        ["bash", str(GPU_TOOLS / "gpu_session.sh"), "train"],
        cwd=BENCHMARKS.parent,
        capture_output=True,
        text=True,
        env=environment,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["rows.tar.gz", "train.log"]
    with tarfile.open(out / "rows.tar.gz") as archive:
        names = {Path(name).as_posix().removeprefix("./") for name in archive.getnames()}
    assert {"rows/teacher-gpu.json", "rows/ptq-decemb-int3g32-gpu.json"} <= names


def test_throughput_smoke_reports_ratios_memory_and_resume(throughput):
    process, output = throughput
    log, _ = process.communicate(timeout=300)
    assert process.returncode == 0, log[-3000:]
    report = json.loads(output.read_text())
    (pair,) = report["pairs"]
    assert set(pair["runs"]) == set(KINDS)
    for run in pair["runs"].values():
        assert run["steps_per_s"] > 0 and run["timed_steps"] == 1 and "peak_memory_bytes" in run
    assert set(pair["ratios"]) == {"kdq/plain", "kdq_shared/plain", "kdq_shared/plain_frozen", "kdq_shared/kdq"}
    resume = report["resume"]
    assert resume["final_step_resumed"] == resume["final_step_uninterrupted"] == 4 and resume["same_keys"]
    assert resume["plan_decisions_equal"] and resume["steps_compared"] == [3, 4]
    assert resume["max_abs_weight_diff"] is not None
    assert "aten::" in Path(f"{output}.profile.txt").read_text()  # the operators of one profiled kdq step


def test_step_time_runs_only_the_runs_asked_for(tmp_path):
    output = tmp_path / "step.json"
    run_script(
        BENCHMARKS / "step_time.py",
        "--teacher",
        "micro",
        "--batch_size",
        "2",
        "--steps",
        "1",
        "--runs",
        "kdq_shared,kdq_cached",
        "--json",
        str(output),
    )
    report = json.loads(output.read_text())
    assert list(report["runs"]) == ["kdq_shared", "kdq_cached"]
    assert list(report["ratios"]) == ["kdq_cached/kdq_shared"] and report["ratios"]["kdq_cached/kdq_shared"] > 0


def test_rows_that_quantize_the_encoder_train_it(tmp_path, micro_whisper):
    """compress freezes the encoder by default; a frozen quantized encoder is round-to-nearest, which is not the
    method: the table's rows that quantize the encoder unfreeze it, the others keep it frozen and shared."""
    student = micro_whisper()
    for name, row in results_table.ROWS.items():
        if row["kind"] != "train":
            continue
        args = results_runners.training_arguments(
            row, student, tmp_path, steps=4, batch_size=2, learning_rate=1e-4, seed=0
        )
        expected = row.get("freeze_encoder", not results_runners.quantizes_encoder(row))  # the recipe's: frozen
        assert args.freeze_encoder == expected, name
    assert results_runners.training_arguments(
        results_table.ROWS["distill-d2"], student, tmp_path, steps=4, batch_size=2, learning_rate=1e-4, seed=0
    ).freeze_encoder  # float: encoder frozen, shared
    assert not results_runners.training_arguments(
        results_table.ROWS["kdq-d2-u4"], student, tmp_path, steps=4, batch_size=2, learning_rate=1e-4, seed=0
    ).freeze_encoder


def test_the_recipe_rows_train_as_compress_levels_do(tmp_path, micro_whisper):
    """One training path: kdq-recipe-intB trains with the arguments `compress --level intB` resolves to."""
    from transformers import HfArgumentParser

    from hf_whisper_kdq.compress import with_training_defaults
    from hf_whisper_kdq.config import DistillQuantArguments

    student = micro_whisper()
    keys = ("quant_targets", "quant_bit_choices", "freeze_encoder", "learning_rate", "warmup_steps", "layer_matching")
    keys += (
        "selection_interval",
        "quant_group_size",
        "size_budget_mb",
        "size_budget_ratio",
        "kd_weight",
        "hidden_weight",
    )
    for bits in (3, 4):
        row = results_table.ROWS[f"kdq-recipe-int{bits}"]
        ours = results_runners.training_arguments(
            row, student, tmp_path, steps=30, batch_size=8, learning_rate=1e-4, seed=0
        )
        argv = with_training_defaults(["--level", f"int{bits}", "--output_dir", str(tmp_path)])[2:]
        (compress,) = HfArgumentParser(DistillQuantArguments).parse_args_into_dataclasses(args=argv)
        assert {k: getattr(ours, k) for k in keys} == {k: getattr(compress, k) for k in keys}, bits
