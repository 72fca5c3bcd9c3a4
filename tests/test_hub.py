"""push_compressed against a local stand-in of the Hub API (``hub_standin.HubStandIn``): the real
huggingface_hub client, no network."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants
import pytest
from hub_standin import HubStandIn
from huggingface_hub import ModelCard

from hf_whisper_kdq.card import write_model_card
from hf_whisper_kdq.hub import MissingTokenError, PushError, files_to_upload, push_compressed
from hf_whisper_kdq.selection import KDQPlan, UnitPlan

TOKEN = "hf_StandInTestToken0123456789abcdefXYZ"
REPO = "kdq-org/whisper-tiny-kdq"


# ---- fixtures ------------------------------------------------------------------------------------------------


def make_plan() -> KDQPlan:
    units = [
        UnitPlan(
            f"encoder.{i}",
            "encoder",
            i,
            [f"model.encoder.layers.{i}.fc1"],
            b,
            distilled=i == 1,
            teacher_layer=2 * i + 1,
            quant_loss={b: 0.01 * (i + 1)},
            distill_loss=0.1,
        )
        for i, b in enumerate((4, 8))
    ]
    units.append(UnitPlan("decoder.0", "decoder", 0, ["model.decoder.layers.0.fc1"], 2, True, 3, {2: 0.2}, 0.3))
    return KDQPlan(units, "per_group", 32, True, step=10)


@pytest.fixture
def checkpoint(tmp_path) -> tuple[Path, list[str]]:
    """A compressed checkpoint folder with card and figure, plus training leftovers that must not be pushed."""
    folder = tmp_path / "whisper-tiny-kdq"
    for name, content in {
        "model.safetensors": b"\x00weights" * 64,
        "config.json": b'{"model_type": "whisper"}',
        "generation_config.json": b"{}",
        "tokenizer.json": b'{"version": "1.0"}',
        "compression_report.json": b"{}",
        "ctranslate2/model.bin": b"ct2" * 100,
        "ctranslate2/config.json": b"{}",
        # left out:
        "optimizer.pt": b"x",
        "scheduler.pt": b"x",
        "rng_state_0.pth": b"x",
        "trainer_state.json": b"{}",
        "training_args.bin": b"x",
        "checkpoint-500/model.safetensors": b"x",
        "teacher/model.safetensors": b"x",
        "runs/events.out.tfevents.1": b"x",
        "extra.pt": b"x",
        ".hf_whisper_kdq_complete": b"",
        ".cache/huggingface/upload.lock": b"x",
        "__pycache__/x.pyc": b"x",
    }.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(content)
    outside = tmp_path / "secret.txt"
    outside.write_text("outside the folder")
    (folder / "linked.txt").symlink_to(outside)
    (folder / "linked_dir").symlink_to(tmp_path, target_is_directory=True)
    write_model_card(
        folder,
        plan=make_plan(),
        compression_report={"total_bytes": 800},
        eval_results={"compressed": [{"corpus": "dev", "language": "en", "error_rate": 0.2}]},
        teacher_id="openai/whisper-small",
        repo_id=REPO,
    )
    expected = sorted(
        [
            "README.md",
            "kdq_plan.png",
            "model.safetensors",
            "config.json",
            "generation_config.json",
            "tokenizer.json",
            "compression_report.json",
            "ctranslate2/model.bin",
            "ctranslate2/config.json",
        ]
    )
    return folder, expected


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    return {
        p.relative_to(folder).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


@pytest.fixture
def online(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)


# ---- tests ---------------------------------------------------------------------------------------------------


def test_files_to_upload_is_the_checkpoint_only(checkpoint):
    folder, expected = checkpoint
    assert files_to_upload(folder) == expected


def test_push_one_commit_with_exact_files(checkpoint, online, caplog):
    folder, expected = checkpoint
    before = snapshot(folder)
    caplog.set_level(logging.DEBUG)
    with HubStandIn() as hub:
        info = push_compressed(folder, REPO, private=True, endpoint=hub.endpoint)
    assert hub.unexpected == []
    assert hub.created == [
        {"name": "whisper-tiny-kdq", "organization": "kdq-org", "visibility": "private", "type": "model"}
    ]
    assert [(r["method"], r["path"].replace(f"/api/models/{REPO}/", "")) for r in hub.requests] == [
        ("POST", "/api/repos/create"),
        ("POST", "/api/validate-yaml"),
        ("POST", "preupload/main"),
        ("POST", "commit/main"),
    ]
    assert sorted(hub.preuploaded) == expected
    assert len(hub.commits) == 1
    commit = hub.commits[0]
    assert commit["repo"] == REPO and commit["revision"] == "main" and not commit["create_pr"]
    assert sorted(commit["files"]) == expected
    for name in expected:
        assert commit["files"][name] == (folder / name).read_bytes(), name
    readme = commit["files"]["README.md"].decode()
    card = ModelCard(readme)
    assert card.data.base_model == "openai/whisper-small" and card.data.eval_results[0].metric_value == 20.0
    assert "kdq_plan.png" in readme and commit["files"]["kdq_plan.png"].startswith(b"\x89PNG")
    assert info.oid and info.commit_url.startswith(hub.endpoint)
    assert all(r["authorization"] == f"Bearer {TOKEN}" for r in hub.requests)
    assert TOKEN not in caplog.text and TOKEN not in repr(info)
    assert snapshot(folder) == before


def test_push_to_branch_as_pull_request(checkpoint, online):
    folder, expected = checkpoint
    with HubStandIn() as hub:
        info = push_compressed(folder, REPO, revision="v1", endpoint=hub.endpoint, commit_message="KDQ v1")
        pr = push_compressed(folder, REPO, create_pr=True, endpoint=hub.endpoint)
    assert hub.unexpected == [] and hub.branches == ["v1"]
    assert [c["revision"] for c in hub.commits] == ["v1", "main"]
    assert hub.commits[0]["header"]["summary"] == "KDQ v1" and hub.commits[1]["create_pr"]
    assert info.commit_url and pr.pr_url.endswith("/discussions/1")


@pytest.mark.parametrize("forbid", ["create", "commit"])
def test_forbidden_push_says_why_and_leaves_folder(checkpoint, online, forbid):
    folder, _ = checkpoint
    before = snapshot(folder)
    with HubStandIn(forbid=forbid) as hub:
        with pytest.raises(PushError) as caught:
            push_compressed(folder, REPO, endpoint=hub.endpoint)
    message = str(caught.value)
    assert REPO in message and "403" in message and "write access" in message
    assert ("create the repo" if forbid == "create" else "commit the files") in message
    assert TOKEN not in message
    assert hub.commits == []
    assert snapshot(folder) == before


def test_missing_token_is_a_clear_error(checkpoint, monkeypatch, tmp_path):
    folder, _ = checkpoint
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    with HubStandIn() as hub:
        with pytest.raises(MissingTokenError, match=r"huggingface-cli login.*HF_TOKEN"):
            push_compressed(folder, REPO, endpoint=hub.endpoint)
    assert hub.requests == []


def test_refuses_folder_without_card_or_with_the_token(tmp_path, online):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"w")
    with pytest.raises(PushError, match="README.md"):
        push_compressed(folder, REPO, endpoint="http://127.0.0.1:9")
    (folder / "README.md").write_text(f"token: {TOKEN}\n")
    with pytest.raises(PushError, match="contains your Hugging Face token") as caught:
        push_compressed(folder, REPO, endpoint="http://127.0.0.1:9")
    assert TOKEN not in str(caught.value)


def test_unreachable_hub_and_local_path_warning(checkpoint, online, caplog):
    folder, _ = checkpoint
    (folder / "config.json").write_text(json.dumps({"_name_or_path": str(folder.resolve())}))
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"
    with pytest.raises(PushError, match=rf"{REPO} failed while trying to create the repo: Hub unreachable"):
        push_compressed(folder, REPO, endpoint=closed)
    assert "config.json mentions a local path" in caplog.text


def test_bitsandbytes_kernel_probe_is_kept_apart_from_unexpected_requests(tmp_path):
    """bitsandbytes' import (via peft, via transformers' Trainer) asks the Hub for a CPU kernel on AVX512-BF16 CPUs;
    the stand-in must file that probe apart, or every push test fails on such a CI machine. The probe is the real
    call bitsandbytes makes (kernels.get_kernel), in a fresh process so that HF_ENDPOINT is read at import."""
    pytest.importorskip("kernels")
    probe = "from kernels import get_kernel; get_kernel('kernels-community/quantization-bitsandbytes', version=1)"
    environment = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path)}
    with HubStandIn() as hub:
        environment["HF_ENDPOINT"] = hub.endpoint
        finished = subprocess.run([sys.executable, "-c", probe], env=environment, capture_output=True, timeout=120)
    assert finished.returncode != 0  # no such kernel on the stand-in: bitsandbytes falls back to its own
    assert hub.kernel_probes and hub.unexpected == []
