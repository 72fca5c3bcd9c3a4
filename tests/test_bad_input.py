"""Bad input: each case is refused (or handled) early, with an error that names the culprit and the fix, and
nothing of the user's is lost. One test per row of docs/errors.md, in its order."""

from __future__ import annotations

import json
import logging
import math
import pickle
import re
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import make_micro_rows, micro_collate, micro_training_args
from datasets import Dataset
from hub_standin import HubStandIn
from transformers import GPT2Config, GPT2LMHeadModel, TrainerCallback

from hf_whisper_kdq import DistillQuantArguments, DistillQuantTrainer, NonFiniteLossError, build_student
from hf_whisper_kdq.data import MAX_LABEL_TOKENS, SAMPLING_RATE, load_manifest, prepare_dataset
from hf_whisper_kdq.export import save_compressed
from hf_whisper_kdq.export.ctranslate2 import export_ctranslate2
from hf_whisper_kdq.hub import MissingTokenError, PushError, push_compressed
from hf_whisper_kdq.quant import quant_specs
from hf_whisper_kdq.sources import load_whisper, save_whisper
from hf_whisper_kdq.students import TEACHER_LAYERS_KEY

pytestmark = pytest.mark.usefixtures("single_thread", "quiet_transformers")

REPO = "kdq-org/whisper-kdq"


def _args(tmp_path, **overrides) -> DistillQuantArguments:
    return micro_training_args(tmp_path, **{"max_steps": 1, **overrides})  # one step shows each error


def _trainer(student, teacher, args, rows=None, **kwargs) -> DistillQuantTrainer:
    return DistillQuantTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=Dataset.from_list(rows or make_micro_rows(4)),
        data_collator=micro_collate,
        **kwargs,
    )


@pytest.fixture
def pair(micro_whisper):
    """(student, teacher): a 4-decoder-layer micro teacher and its spaced 2-decoder-layer copy."""
    teacher = micro_whisper(decoder_layers=4)
    return build_student(teacher, decoder_layers=2), teacher


@pytest.fixture
def processor(tiny_whisper):
    return tiny_whisper[1]


def _sine(seconds: float, rate: int = SAMPLING_RATE, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _manifest(folder: Path, rows: list[dict]) -> Dataset:
    """Rows ``(id, audio array, rate, text)`` written as WAV files plus a JSONL manifest, loaded back."""
    (folder / "wav").mkdir(exist_ok=True)
    lines = []
    for row_id, audio, rate, text in rows:
        sf.write(folder / "wav" / f"{row_id}.wav", audio, rate, subtype="PCM_16")
        lines.append(json.dumps({"id": row_id, "language": "en", "audio": f"wav/{row_id}.wav", "text": text}))
    (folder / "m.jsonl").write_text("\n".join(lines) + "\n")
    return load_manifest(folder / "m.jsonl")


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _gpt2() -> GPT2LMHeadModel:
    return GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=64, n_positions=16))


# ---- 1. teacher and student with different tokenizers -------------------------------------------------------


def test_different_tokenizers_are_refused_before_training(tmp_path, pair):
    student, teacher = pair
    student.config.vocab_size = 65
    with pytest.raises(ValueError, match=r"different tokenizers \(vocab_size 65 vs 64\).*same family"):
        _trainer(student, teacher, _args(tmp_path))
    student.config.vocab_size = 64
    student.generation_config.eos_token_id = 5
    with pytest.raises(ValueError, match=r"different tokenizers \(eos_token_id 5 vs 2\).*build_student"):
        _trainer(student, teacher, _args(tmp_path))
    assert not (tmp_path / "out").exists()  # refused before the Trainer set anything up


# ---- 2. a student wider (or deeper) than its teacher ----------------------------------------------------------


def test_wider_student_is_distilled_through_adapters_and_a_foreign_layer_map_is_refused(tmp_path, micro_whisper):
    teacher = micro_whisper(decoder_layers=2)
    # Supported: wider (48 vs 32) and deeper (3 vs 2 decoder layers): adapters map 48 -> 32, layers match by depth.
    student = micro_whisper(seed=1, d_model=48, encoder_ffn_dim=96, decoder_ffn_dim=96, decoder_layers=3)
    args = _args(tmp_path, max_steps=2, hidden_target="both", num_distill_layers=5, quant_group_size=16)
    trainer = _trainer(student, teacher, args)
    adapters = student.kdq_adapters
    assert sorted(adapters) == ["decoder_0", "decoder_1", "decoder_2", "encoder_0", "encoder_1"]
    assert all((a.in_features, a.out_features) == (48, 32) for a in adapters.values())
    assert [u.teacher_layer for u in trainer.plan.layers("decoder")] == [0, 0, 1]  # round(i * 1 / 2): 0, 0.5, 1
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss_hidden" in entry]
    assert len(logs) == 2 and all(0 < entry["loss_hidden"] < math.inf for entry in logs)

    # Unsupported: a spaced copy of a 4-layer teacher trained against a 2-layer one (its recorded map points at
    # teacher layers 0 and 3). Refused by name before training instead of an IndexError mid-step.
    copied = build_student(micro_whisper(decoder_layers=4), decoder_layers=2)
    with pytest.raises(
        ValueError,
        match=rf"{TEACHER_LAYERS_KEY} maps its 2 decoder layers to teacher layers \[0, 3\]"
        r".*2 decoder layers.*built from another teacher.*delete",
    ):
        _trainer(copied, teacher, _args(tmp_path))


# ---- 3. a model that is not Whisper ----------------------------------------------------------------------------


def test_non_whisper_models_are_refused_by_role(tmp_path, pair):
    student, teacher = pair
    with pytest.raises(
        TypeError,
        match=r"the student is a GPT2LMHeadModel, not a WhisperForConditionalGeneration.*"
        r"load_whisper",
    ):
        _trainer(_gpt2(), teacher, _args(tmp_path))
    with pytest.raises(TypeError, match="the teacher is a WhisperModel, not a WhisperForConditionalGeneration"):
        _trainer(student, teacher.model, _args(tmp_path))  # the bare encoder-decoder, without the LM head
    with pytest.raises(TypeError, match="the teacher is a GPT2LMHeadModel"):
        build_student(_gpt2(), decoder_layers=1)
    # A path to another model type: from_pretrained would only warn and return a random Whisper.
    folder = tmp_path / "gpt2"
    _gpt2().save_pretrained(folder)
    with pytest.raises(TypeError, match=rf"{re.escape(str(folder))} is a gpt2 checkpoint, not Whisper: give a Whisper"):
        load_whisper(folder)
    with pytest.raises(TypeError, match="is a gpt2 checkpoint"):
        _trainer(student, str(folder), _args(tmp_path))


# ---- 4. bits outside {2, 3, 4, 8}, and every other argument check: tests/test_config.py --------------------


# ---- 5. a size budget below the student's smallest size -------------------------------------------------------


def test_unreachable_size_budget_names_the_minimum_and_the_flag(tmp_path, pair):
    student, teacher = pair
    # Raised when the trainer is built: before any data is read or any step is taken.
    with pytest.raises(
        ValueError,
        match=r"size budget 0.01 MB is below what this student reaches at the lowest bits "
        r"\(\d+\.\d\d MB\): raise the budget to at least that \(size_budget_mb=",
    ) as caught:
        _trainer(student, teacher, _args(tmp_path, size_budget_mb=0.01, max_steps=3))
    minimum = float(re.search(r"lowest bits \((\S+) MB\)", str(caught.value)).group(1))
    assert 0.01 < minimum < sum(p.numel() for p in student.parameters()) * 2 / 1e6
    # The named minimum is reachable.
    _, fresh_teacher = pair
    again = _trainer(
        build_student(fresh_teacher, decoder_layers=2),
        fresh_teacher,
        _args(tmp_path, size_budget_mb=minimum + 0.01, max_steps=1),
    )
    again.train()
    assert again.plan.size_bytes <= again.plan.budget_bytes


# ---- 6. a group size that does not divide a layer's width ------------------------------------------------------


def test_group_size_not_dividing_a_width_names_the_layer_and_the_fix(tmp_path, pair):
    student, teacher = pair
    with pytest.raises(
        ValueError,
        match=r"model\.encoder\.layers\.0\.self_attn\.\w_proj: group_size=24 does not "
        r"divide its input width 32; valid group sizes are \[1, 2, 4, 8, 16, 32\]\. Fix: "
        r".*quant_group_size.*quant_granularity='per_channel'",
    ):
        _trainer(student, teacher, _args(tmp_path, quant_group_size=24))
    assert quant_specs(student) == {}  # refused before any layer was swapped
    trainer = _trainer(student, teacher, _args(tmp_path, quant_group_size=24, quant_granularity="per_channel"))
    assert trainer.plan.spec(4).granularity == "per_channel"


# ---- 7. nothing left after filtering ---------------------------------------------------------------------------


def test_empty_dataset_after_filtering_says_how_many_rows_and_why(tmp_path, processor):
    dataset = _manifest(
        tmp_path, [("no-words", _sine(1.0), SAMPLING_RATE, None), ("wordy", _sine(1.0), SAMPLING_RATE, " word" * 500)]
    )
    with pytest.raises(
        ValueError,
        match=r"no usable rows: all 2 rows were dropped .*labels_too_long: 1 \(wordy\), "
        r"no_text: 1 \(no-words\)\)\. Fix: labels_too_long: split these utterances .* 448 tokens.*"
        r"no_text: give these rows a transcript",
    ):
        prepare_dataset(dataset, processor)
    with pytest.raises(ValueError, match=r"the dataset has no rows.*languages / corpora / limit"):
        prepare_dataset(load_manifest(tmp_path / "m.jsonl", languages=["zh"]), processor)


# ---- 8. audio longer than 30 s ---------------------------------------------------------------------------------


def test_audio_over_30_seconds_is_dropped_and_named(tmp_path, processor, caplog):
    dataset = _manifest(
        tmp_path, [("short", _sine(1.0), SAMPLING_RATE, "hello"), ("long-talk", _sine(30.5, rate=8000), 8000, "hello")]
    )
    with caplog.at_level(logging.WARNING, logger="hf_whisper_kdq.data"):
        prepared, report = prepare_dataset(dataset, processor)
    assert prepared["id"][:] == ["short"]
    assert report.dropped == {"audio_too_long": 1} and report.dropped_ids == {"audio_too_long": ["long-talk"]}
    assert "kept 1 of 2 rows; dropped audio_too_long: 1 (long-talk)" in caplog.text
    with pytest.raises(
        ValueError,
        match=r"audio_too_long: 1 \(long-talk\).*cut this audio into segments of at most "
        r"30 s",
    ):
        prepare_dataset(dataset.select([1]), processor)


# ---- 9. labels longer than 448 tokens ----------------------------------------------------------------------------


def test_labels_over_448_tokens_are_dropped_and_named(tmp_path, processor, caplog):
    rows = [("ok", _sine(1.0), SAMPLING_RATE, "hello")]
    rows += [(f"chapter-{i}", _sine(1.0), SAMPLING_RATE, " word" * 450) for i in range(7)]
    with caplog.at_level(logging.WARNING, logger="hf_whisper_kdq.data"):
        prepared, report = prepare_dataset(_manifest(tmp_path, rows), processor)
    assert prepared["id"][:] == ["ok"] and all(len(labels) <= MAX_LABEL_TOKENS for labels in prepared["labels"])
    assert report.dropped_ids == {"labels_too_long": [f"chapter-{i}" for i in range(7)]}  # every id kept
    # the log names the first five and counts the rest
    assert "labels_too_long: 7 (chapter-0, chapter-1, chapter-2, chapter-3, chapter-4, ... and 2 more)" in caplog.text


# ---- 10. a sampling rate other than 16 kHz -------------------------------------------------------------------------


def test_other_sampling_rates_are_resampled_to_16k(tmp_path, processor):
    rows = [(f"rate-{rate}", _sine(1.0, rate=rate), rate, "hello") for rate in (SAMPLING_RATE, 8000, 44100)]
    dataset = _manifest(tmp_path, rows)
    # a decoded datasets value at yet another rate
    from_array = Dataset.from_dict(
        {
            "id": ["array-22050"],
            "language": ["en"],
            "text": ["hello"],
            "audio": [{"array": _sine(1.0, rate=22050), "sampling_rate": 22050}],
        }
    )
    prepared, report = prepare_dataset(dataset, processor)
    prepared_array, _ = prepare_dataset(from_array, processor)
    assert report.dropped == {} and report.rows_kept == 3
    reference = prepared[0]["input_features"]
    for features in (prepared[1]["input_features"], prepared[2]["input_features"], prepared_array[0]["input_features"]):
        # 1 s of 440 Hz fills the same 100 frames of the 3000 at the same pitch (an unresampled 8 kHz file would
        # fill 50 frames at 880 Hz, a 44.1 kHz one 276 frames at 160 Hz).
        assert np.abs(features[:, :95] - reference[:, :95]).mean() < 0.05
        assert np.argmax(features[:, 50]) == np.argmax(reference[:, 50])


# ---- 11. NaN / inf loss ----------------------------------------------------------------------------------------------


class _PoisonTeacher(TrainerCallback):
    """Sets the teacher's weights to NaN after optimizer step ``at`` (its checkpoint is saved right after)."""

    def __init__(self, trainer, at: int):
        self.trainer, self.at = trainer, at

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            with torch.no_grad():
                self.trainer.teacher.proj_out.weight.fill_(float("nan"))


def test_non_finite_loss_stops_naming_step_and_term_and_keeps_checkpoints(tmp_path, pair):
    student, teacher = pair
    # hidden_target="none": the poisoned teacher then makes exactly one term non-finite, the logit distillation.
    args = _args(tmp_path, max_steps=5, save_strategy="steps", save_steps=1, hidden_target="none")
    trainer = _trainer(student, teacher, args)
    trainer.add_callback(_PoisonTeacher(trainer, at=2))
    with pytest.raises(
        NonFiniteLossError,
        match=r"non-finite at step 3 in term\(s\) kd \(ce=[^,]+, kd=nan, "
        r"hidden=0, quant=[^,]+\).*checkpoints already written are kept.*learning_rate",
    ) as caught:
        trainer.train()
    assert (caught.value.step, caught.value.terms) == (3, ["kd"]) and isinstance(caught.value, RuntimeError)
    assert pickle.loads(pickle.dumps(caught.value)).terms == ["kd"]  # survives a launcher's worker process
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert all((out / name / "model.safetensors").is_file() for name in ("checkpoint-1", "checkpoint-2"))
    # stopped before the backward pass: the student took no NaN update
    assert all(torch.isfinite(p).all() for p in student.parameters())


# ---- 12. push without a token, or without write access -----------------------------------------------------------


def test_push_without_token_or_write_access_names_repo_and_fix(tmp_path, monkeypatch):
    folder = tmp_path / "compressed"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights")
    (folder / "README.md").write_text("# card\n")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    with HubStandIn() as hub:
        with pytest.raises(
            MissingTokenError,
            match=rf"cannot push to {REPO}: no Hugging Face token found\. Fix: run "
            r"`huggingface-cli login`.*HF_TOKEN",
        ):
            push_compressed(folder, REPO, endpoint=hub.endpoint)
    assert hub.requests == []  # refused before any request

    monkeypatch.setenv("HF_TOKEN", "hf_ReadOnlyStandInToken0123456789")
    with HubStandIn(forbid="commit") as hub:
        with pytest.raises(
            PushError,
            match=rf"pushing to {REPO} failed while trying to commit the files: HTTP 403 "
            r"\(the token may not write to this repo.*write access.*write permission\)",
        ):
            push_compressed(folder, REPO, endpoint=hub.endpoint)
    assert hub.commits == [] and _tree(folder) == {"README.md": b"# card\n", "model.safetensors": b"weights"}


# ---- 13. an export target that holds something else ------------------------------------------------------------------


def test_export_into_a_foreign_folder_deletes_nothing(tmp_path, micro_whisper, processor):
    model = micro_whisper()
    foreign = tmp_path / "my-project"
    (foreign / "src").mkdir(parents=True)
    (foreign / "notes.txt").write_text("keep me")
    (foreign / "src" / "main.py").write_text("print('hi')")
    before = _tree(foreign)
    refusal = (
        re.escape(str(foreign)) + r" is not empty and was not written by hf_whisper_kdq"
        r".*nothing in it is replaced or deleted"
    )
    with pytest.raises(FileExistsError, match=refusal):
        save_whisper(model, processor, foreign)
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match=refusal + ", even with overwrite=True"):
            save_compressed(model, processor, foreign, overwrite=overwrite)
        with pytest.raises(FileExistsError, match=refusal + ", even with overwrite=True"):
            export_ctranslate2(model, processor, foreign, overwrite=overwrite)
    assert _tree(foreign) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my-project"]  # no staging folder left behind
    # A previous output of ours is recognized (its completion marker) and replaced.
    ours = save_whisper(model, processor, tmp_path / "hf")
    (ours / "config.json").write_text("{}")
    save_whisper(model, processor, ours)
    assert (ours / "config.json").read_text() != "{}"
