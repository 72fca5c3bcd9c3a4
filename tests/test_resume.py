"""Resume and durability: a training run killed with SIGKILL (in the middle of writing a checkpoint) resumes to
exactly the uninterrupted result, and caches (converted offline packs, encoder outputs, synthesized speech) never
serve an entry that is damaged or from another version: they rebuild it."""

from __future__ import annotations

import copy
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import make_micro_rows, make_micro_whisper, micro_collate

from hf_whisper_kdq import sources, synthesis
from hf_whisper_kdq.config import DistillQuantArguments
from hf_whisper_kdq.files import last_complete_checkpoint
from hf_whisper_kdq.output_cache import EncoderOutputCache
from hf_whisper_kdq.sources import OFFLINE_PACKS, load_whisper
from hf_whisper_kdq.sources.offline import OfflinePack, converted_pack_dir
from hf_whisper_kdq.students import build_student
from hf_whisper_kdq.trainer import DistillQuantTrainer

SCRIPT = Path(__file__).parent / "scripts" / "resume_train.py"

# ---- a killed run resumes to the uninterrupted result --------------------------------------------------------------


def _start(output: Path, *mode: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), str(output), *mode],
        cwd=output.parent,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(process: subprocess.Popen) -> int:
    _, stderr = process.communicate(timeout=300)
    assert process.returncode in (0, -signal.SIGKILL), stderr[-4000:]
    return process.returncode


def _train_logs(result: dict) -> dict[int, dict]:
    return {entry["step"]: entry for entry in result["log_history"] if "loss" in entry}


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_run_killed_while_saving_resumes_to_the_uninterrupted_result(tmp_path, lora):
    if lora:
        pytest.importorskip("peft")
    flags = ("--lora",) if lora else ()
    # Both at once (one thread each): the reference, and a run that SIGKILLs itself while checkpoint-9 is half written.
    reference = _start(tmp_path / "reference", "run", *flags)
    killed = _start(tmp_path / "killed", "kill-in-save", "9", *flags)
    assert _finish(reference) == 0
    assert _finish(killed) == -signal.SIGKILL
    partial = tmp_path / "killed" / "checkpoint-9"
    assert (partial / "model.safetensors").is_file() and (partial / "optimizer.pt").is_file()
    assert not (partial / "trainer_state.json").exists() and not (tmp_path / "killed" / "result.pt").exists()
    # The plan at the checkpoint resume starts from (re-selected at step 6), for the check below that it moves on.
    resumed_from = json.loads((tmp_path / "killed" / "checkpoint-6" / "kdq_plan.json").read_text())

    resumed = _start(tmp_path / "killed", "resume", *flags)  # train(resume_from_checkpoint=True): checkpoint-6, not -9
    assert _finish(resumed) == 0
    want, got = (torch.load(tmp_path / name / "result.pt", weights_only=True) for name in ("reference", "killed"))

    # Every logged step (1-6 restored from the checkpoint's state, 7-10 trained again: loss, each loss term, grad
    # norm, learning rate, epoch) is equal, exactly: both runs use one thread, so the same ops on the same values in
    # the same order give the same bits. Any state not restored (weights, Adam moments, scheduler, clipping ratios,
    # adapters, plan, dropout RNG, data order) shows as a difference.
    assert sorted(_train_logs(got)) == list(range(1, 11))
    assert _train_logs(got) == _train_logs(want)
    # The plan, measurements included, after re-selections at steps 2, 4, 6 (before the kill) and 8 (after resume).
    assert got["plan"] == want["plan"] and got["plan"]["step"] == 8
    # the plan did move on: re-measured on the step-8 weights (its bits may stay those of step 6)
    assert [u["quant_loss"] for u in got["plan"]["units"]] != [u["quant_loss"] for u in resumed_from["units"]]
    assert len({u["bits"] for u in got["plan"]["units"]}) > 1
    assert got["weights"].keys() == want["weights"].keys()
    assert any(k.endswith("weight_clip") for k in want["weights"])
    assert any(k.startswith("kdq_adapters.") for k in want["weights"])
    assert any(".lora_A." in k for k in want["weights"]) == lora
    different = [k for k in want["weights"] if not torch.equal(got["weights"][k], want["weights"][k])]
    assert different == []


def test_resume_takes_the_newest_completely_written_checkpoint(tmp_path):
    def checkpoint(step: int, state: str | None) -> Path:
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"weights")
        if state is not None:
            (folder / "trainer_state.json").write_text(state)
        return folder

    assert last_complete_checkpoint(tmp_path) is None
    checkpoint(2, json.dumps({"global_step": 2}))
    checkpoint(10, json.dumps({"global_step": 10}))
    checkpoint(12, '{"global_step": 1')  # killed while writing its state
    checkpoint(14, None)  # killed before writing its state
    (tmp_path / "checkpoint-best").mkdir()
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-10")

    teacher = make_micro_whisper(decoder_layers=4)
    args = DistillQuantArguments(output_dir=str(tmp_path / "empty"), report_to="none", use_cpu=True, max_steps=1)
    trainer = DistillQuantTrainer(
        model=build_student(teacher, decoder_layers=2),
        teacher_model=teacher,
        args=args,
        train_dataset=make_micro_rows(4),
        data_collator=micro_collate,
    )
    (tmp_path / "empty").mkdir(exist_ok=True)
    with pytest.raises(ValueError, match="No complete checkpoint found"):
        trainer.train(resume_from_checkpoint=True)


# ---- caches: a damaged or foreign entry is rebuilt, never used ----------------------------------------------------


def test_damaged_or_foreign_converted_pack_is_converted_again(tmp_path, monkeypatch, tiny_whisper):
    model, processor = tiny_whisper
    monkeypatch.setenv("HF_WHISPER_KDQ_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pack = OfflinePack("kdq-test/tiny-pack", (), "1.0")  # no PyPI parts: the conversion below stands in for them
    monkeypatch.setitem(OFFLINE_PACKS, pack.hub_id, pack)
    conversions = []

    def convert(folder):
        conversions.append(folder)
        return copy.deepcopy(model), processor

    monkeypatch.setattr(sources, "_from_ct2_folder", convert)
    expected = model.state_dict()

    def load_and_check(conversion_count: int) -> None:
        loaded, _ = load_whisper(pack.hub_id)
        assert len(conversions) == conversion_count
        for name, tensor in loaded.state_dict().items():
            assert torch.equal(tensor, expected[name]), name

    load_and_check(1)
    load_and_check(1)  # served from the cache
    folder = converted_pack_dir(pack)
    weights = folder / "model.safetensors"
    whole = weights.read_bytes()

    damaged = bytearray(whole)
    damaged[-3] ^= 0xFF  # one weight's bits: it would load without any error
    weights.write_bytes(bytes(damaged))
    load_and_check(2)
    weights.write_bytes(whole[: len(whole) // 2])  # truncated
    load_and_check(3)
    manifest_file = next(folder.glob(".*pack.json"))
    manifest = json.loads(manifest_file.read_text())
    manifest_file.write_text(json.dumps({**manifest, "conversion": manifest["conversion"] - 1}))  # an older converter
    load_and_check(4)
    manifest_file.unlink()  # written by a version without the manifest
    load_and_check(5)
    shutil.rmtree(folder)
    folder.mkdir()
    (folder / "config.json").write_text("{}")  # a folder without the completion marker
    load_and_check(6)
    load_and_check(6)
    assert not [p.name for p in folder.parent.iterdir() if p.name.startswith(".")]  # no staging leftovers


def test_encoder_cache_entry_of_another_encoder_is_recomputed(tmp_path):
    first, second = make_micro_whisper(seed=1).get_encoder(), make_micro_whisper(seed=2).get_encoder()
    features = micro_collate(make_micro_rows(3, seed=5))["input_features"]
    one = EncoderOutputCache(tmp_path, first, max_bytes=10**9)
    one.encode(first, features)
    two = EncoderOutputCache(tmp_path, second, max_bytes=10**9)
    # The first encoder's entries under the second's keys: what a copied cache or a fingerprint-prefix collision holds.
    for entry in one.folder.glob("*/*.safetensors"):
        target = two.folder / entry.relative_to(one.folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(entry, target)
    with torch.no_grad():
        expected = second(features).last_hidden_state.half().float()  # as the cache stores it
    torch.testing.assert_close(two.encode(second, features), expected, rtol=0, atol=0)
    assert (two.hits, two.misses) == (0, 3)
    torch.testing.assert_close(two.encode(second, features), expected, rtol=0, atol=0)
    assert (two.hits, two.misses) == (3, 3)  # rewritten with this encoder's entries
    assert not list(tmp_path.rglob("*.tmp"))


class _ToneEngine:
    """A stand-in text-to-speech engine: a 1 s tone per text, counted."""

    name, voice_id = "tone", "tone:1"

    def __init__(self):
        self.calls = 0

    def params(self, text: str, variation: bool) -> dict:
        return {"hz": 200 + len(text)}

    def synthesize(self, text: str, params: dict) -> tuple[np.ndarray, int]:
        self.calls += 1
        t = np.arange(22050) / 22050
        return (0.5 * np.sin(2 * np.pi * params["hz"] * t)).astype(np.float32), 22050


@pytest.mark.parametrize("audio_format", ["flac", "wav"])
def test_truncated_synthesis_cache_entry_is_synthesized_again(tmp_path, monkeypatch, audio_format):
    engine = _ToneEngine()
    monkeypatch.setattr(synthesis, "get_engine", lambda *args, **kwargs: engine)

    def synthesize():
        dataset = synthesis.synthesize_dataset(
            ["hello there"], cache_dir=tmp_path, audio_format=audio_format, corpus="tones", progress=False
        )
        return Path(dataset[0]["audio"]["path"]), dataset[0]["duration"]

    path, duration = synthesize()
    assert engine.calls == 1 and duration == 1.0
    assert synthesize() == (path, duration) and engine.calls == 1  # from the cache
    audio, _ = sf.read(path, dtype="int16")
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    assert synthesize() == (path, duration) and engine.calls == 2
    np.testing.assert_array_equal(sf.read(path, dtype="int16")[0], audio)
    path.write_bytes(whole[:20])  # not even a whole header
    assert synthesize() == (path, duration) and engine.calls == 3
    assert not list(tmp_path.rglob("*.tmp"))
