"""Safe loading and secrets: no pickle is read with code execution allowed, no remote code is trusted, the trainer
writes safetensors checkpoints, and a Hub token never reaches a written file, a Hub commit or a log line."""

from __future__ import annotations

import ast
import logging
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
import transformers.utils.hub
from conftest import tiny_speech_rows
from datasets import Dataset
from hub_standin import HubStandIn
from huggingface_hub import HfApi
from transformers import logging as hf_logging
from transformers.trainer_pt_utils import safe_globals

from hf_whisper_kdq.config import DistillQuantArguments
from hf_whisper_kdq.data import WhisperDataCollator
from hf_whisper_kdq.students import build_student
from hf_whisper_kdq.trainer import DistillQuantTrainer

PACKAGE = Path(__file__).resolve().parents[1] / "hf_whisper_kdq"
TOKEN = "hf_FAKEsecret0123456789abcdefghijKLMNOP"
REPO = "kdq-org/whisper-tiny-kdq"


# ---- (a) static scan of the package source ------------------------------------------------------------------------


def unweighted_loads(source: str) -> list[str]:
    """``torch.load`` calls without a literal ``weights_only=True``, as ``line: code``."""
    tree = ast.parse(source)
    # `from torch import load` (possibly renamed) makes a bare name a torch.load too.
    loads = {
        alias.asname or alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module == "torch"
        for alias in node.names
        if alias.name == "load"
    }
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        is_torch_load = (
            isinstance(func, ast.Attribute)
            and func.attr == "load"
            and isinstance(func.value, ast.Name)
            and func.value.id == "torch"
        ) or (isinstance(func, ast.Name) and func.id in loads)
        weights_only = next((k.value for k in node.keywords if k.arg == "weights_only"), None)
        if is_torch_load and not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
            found.append(f"{node.lineno}: {ast.unparse(node)}")
    return found


def test_the_scan_finds_unsafe_loads():
    unsafe = "import torch\nfrom torch import load as read\ntorch.load(p)\ntorch.load(p, weights_only=False)\nread(p)\n"
    assert len(unweighted_loads(unsafe)) == 3
    assert unweighted_loads("import torch\ntorch.load(path, map_location='cpu', weights_only=True)\n") == []


def test_package_loads_pickles_weights_only_and_never_trusts_remote_code():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20 and PACKAGE / "sources" / "openai.py" in files
    scans = {str(f.relative_to(PACKAGE)): unweighted_loads(f.read_text(encoding="utf-8")) for f in files}
    assert {name: calls for name, calls in scans.items() if calls} == {}
    # No other unpickler, and no remote code in any form (a keyword, a kwargs dict, a string).
    for file in files:
        text = file.read_text(encoding="utf-8")
        assert "trust_remote_code" not in text, file
        assert "pickle.load" not in text and "allow_pickle=True" not in text, file


# ---- (b) + (c) a training run with a token: nothing written or logged holds it; checkpoints are safetensors ------


@pytest.fixture
def all_logs(caplog):
    """Every log record at DEBUG, transformers' and huggingface_hub's included (they do not propagate by default)."""
    import huggingface_hub.utils.logging as hub_logging

    verbosity, hub_verbosity = hf_logging.get_verbosity(), hub_logging.get_verbosity()
    hf_logging.set_verbosity_debug()
    hf_logging.enable_propagation()
    hub_logging.set_verbosity_debug()
    hub_root = logging.getLogger("huggingface_hub")
    hub_propagate, hub_root.propagate = hub_root.propagate, True
    caplog.set_level(logging.DEBUG)
    yield caplog
    hub_root.propagate = hub_propagate
    hub_logging.set_verbosity(hub_verbosity)
    hf_logging.disable_propagation()
    hf_logging.set_verbosity(verbosity)


@pytest.fixture
def hub(monkeypatch):
    """The local Hub stand-in for both pushes: ours (HF_ENDPOINT) and the Trainer's checkpoint pushes (its shared
    HfApi). The token is in the environment, as huggingface_hub's standard sources have it."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with HubStandIn(lifetime=300) as standin:
        monkeypatch.setenv("HF_ENDPOINT", standin.endpoint)
        monkeypatch.setattr(transformers.utils.hub, "_hf_api", HfApi(endpoint=standin.endpoint))
        yield standin


def test_token_is_never_written_or_logged_and_checkpoints_are_safetensors(
    tmp_path, tiny_whisper, hub, all_logs, capsys, single_thread
):
    pytest.importorskip("compressed_tensors", minversion="0.20")
    teacher, processor = tiny_whisper
    student = build_student(teacher, decoder_layers=1)
    rows = tiny_speech_rows(processor, [" hello world", " another short one"])
    output = tmp_path / "run"
    args = DistillQuantArguments(
        output_dir=str(output),
        per_device_train_batch_size=2,
        max_steps=2,
        save_strategy="steps",
        save_steps=1,
        report_to="none",
        use_cpu=True,
        logging_steps=1,
        seed=0,
        selection_probe_batches=1,
        quant_targets="decoder",
        push_to_hub=True,
        hub_model_id=REPO,
        hub_token=TOKEN,
    )
    trainer = DistillQuantTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=Dataset.from_list(rows),
        data_collator=WhisperDataCollator(processor, decoder_start_token_id=student.config.decoder_start_token_id),
        processing_class=processor,
    )
    trainer.train()
    # The Trainer's own pushes (of the output folder, at each save) run in the background.
    assert trainer.push_in_progress is not None
    trainer.push_in_progress.wait_until_done()
    assert [job.exception() for job in trainer.push_in_progress.jobs] == [None] * len(trainer.push_in_progress.jobs)
    trainer.push_to_hub()  # save_compressed + model card + figure, pushed in one commit

    # The token was there to leak: every request carried it, and the Trainer's push committed the pickled arguments
    # (training_args.bin) besides the weights.
    # One Trainer push per save, unless the previous one is still uploading; ours comes last.
    assert hub.unexpected == [] and len(hub.commits) >= 2
    assert all(r["authorization"] == f"Bearer {TOKEN}" for r in hub.requests)
    pushes = [commit["files"] for commit in hub.commits]
    assert all({"training_args.bin", "model.safetensors"} <= set(files) for files in pushes[:-1])
    assert {"README.md", "kdq_plan.png", "model.safetensors", "compression_report.json"} <= set(pushes[-1])
    written = [p for p in sorted(output.rglob("*")) if p.is_file()]
    names = {p.relative_to(output).as_posix() for p in written}
    assert {
        "training_args.bin",
        "checkpoint-1/training_args.bin",
        "checkpoint-2/trainer_state.json",
        "compressed/README.md",
        "compressed/kdq_plan.png",
        "compressed/model.safetensors",
    } <= names

    secret = TOKEN.encode()
    assert [p.relative_to(output).as_posix() for p in written if secret in p.read_bytes()] == []
    assert [name for files in pushes for name, content in files.items() if secret in content] == []
    printed = capsys.readouterr()
    assert "loss" in printed.out  # the Trainer's printed logs were captured
    assert TOKEN not in printed.out and TOKEN not in printed.err
    assert any(r.name.startswith("transformers") for r in all_logs.records)  # transformers' records reach caplog
    assert TOKEN not in all_logs.text
    assert not [r for r in all_logs.records if TOKEN in r.getMessage()]
    # The pickled arguments still load and still work, without the token, which the pushes take from the environment.
    saved = torch.load(output / "checkpoint-2" / "training_args.bin", weights_only=False)
    assert isinstance(saved, DistillQuantArguments) and saved.hub_token is None and saved.hub_model_id == REPO
    assert trainer.args.hub_token == TOKEN  # the live arguments keep it

    # (c) Checkpoints hold their weights as safetensors; the only pickles are the Trainer's optimizer, scheduler and
    # RNG states (read back with weights_only=True) and the arguments.
    for step in (1, 2):
        checkpoint = output / f"checkpoint-{step}"
        files = {p.name for p in checkpoint.iterdir()}
        assert "model.safetensors" in files and "pytorch_model.bin" not in files
        pickles = {name for name in files if name.endswith((".bin", ".pt", ".pth", ".pkl"))}
        assert pickles == {"training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth"}, pickles
        with safe_globals():  # the Trainer's own allowlist of numpy's RNG state types, as it reads them on resume
            for name in pickles - {"training_args.bin"}:
                torch.load(checkpoint / name, weights_only=True)
