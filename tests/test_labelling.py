"""Tests for hf_whisper_kdq.labelling: teacher pseudo-labels, WER filtering and the report."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import soundfile as sf

from hf_whisper_kdq import evaluation
from hf_whisper_kdq.data import load_manifest
from hf_whisper_kdq.labelling import LabellingReport, pseudo_label

RATE = 16000


def write_manifest(folder: Path, rows: list[dict]) -> Path:
    """rows: id, language (or absent), text; each gets a distinct tone file beside the manifest."""
    lines = []
    for i, row in enumerate(rows):
        t = np.arange(int(RATE * (0.5 + 0.1 * i))) / RATE
        sf.write(folder / f"{row['id']}.wav", (0.3 * np.sin(2 * np.pi * (200 + 40 * i) * t)).astype(np.float32), RATE)
        lines.append({"corpus": "synth", "audio": f"{row['id']}.wav", **row})
    path = folder / "manifest.jsonl"
    path.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines), encoding="utf-8")
    return path


def plant_transcripts(monkeypatch, by_id: dict[str, str]) -> list[dict]:
    """Replace the teacher's decoding (not the point of these tests) by planted transcripts, keyed by the
    audio file name; returns the recorded calls."""
    calls = []

    def fake_transcribe(model, processor, audios, *, languages, batch_size, num_beams, **kwargs):
        calls.append({"audios": audios, "languages": languages, "batch_size": batch_size, "num_beams": num_beams})
        return [by_id[Path(audio["path"]).stem] for audio in audios]

    monkeypatch.setattr(evaluation, "transcribe", fake_transcribe)
    return calls


ROWS = [
    {"id": "r1", "language": "en", "text": "The quick brown fox."},
    {"id": "r2", "language": "en", "text": "jumps over the lazy dog"},
    {"id": "r3", "language": "en", "text": "hello there"},
    {"id": "r4", "language": "zh", "text": "其中有两个是内因的指标"},
    {"id": "r5", "language": "en", "text": None},
    {"id": "r6", "language": "en", "text": "good morning"},
]
TEACHER = {
    "r1": "the quick brown fox",  # agrees
    "r2": "jumps over a hazy log",  # WER 3/5
    "r3": "  ",  # empty
    "r4": "其中有兩個是內因的指標。",  # agrees once normalized (CER 0)
    "r5": "no reference here",  # kept: nothing to check against
    "r6": "[Music]",  # empty once normalized
}


@pytest.fixture
def dataset(tmp_path) -> datasets.Dataset:
    return load_manifest(write_manifest(tmp_path, ROWS))


def test_threshold_drops_disagreeing_and_empty_rows(tiny_whisper, dataset, monkeypatch):
    calls = plant_transcripts(monkeypatch, TEACHER)
    out, report = pseudo_label(dataset, *tiny_whisper, batch_size=3, num_beams=2, wer_threshold=0.3, progress=False)
    assert calls[0]["languages"] == ["en", "en", "en", "zh", "en", "en"]
    assert (calls[0]["batch_size"], calls[0]["num_beams"]) == (3, 2)
    assert out["id"] == ["r1", "r4", "r5"]
    assert out["text"] == [TEACHER["r1"], TEACHER["r4"], TEACHER["r5"]]
    assert out["reference_text"] == ["The quick brown fox.", "其中有两个是内因的指标", None]
    assert out["teacher_error_rate"] == [0.0, 0.0, None]
    assert out.column_names == [*dataset.column_names, "reference_text", "teacher_error_rate"]
    assert out.features["audio"] == dataset.features["audio"]
    assert (report.n_input, report.n_kept, report.n_dropped_empty, report.n_dropped_wer) == (6, 3, 2, 1)
    assert report.dropped == {"empty": ["r3", "r6"], "wer": ["r2"]} and report.n_dropped == 3
    assert report.n_with_reference == 5
    english = report.teacher_scores["en"]
    assert english["metric"] == "wer" and english["error_rate"] == pytest.approx(7 / 13)
    assert english["n_utterances"] == 4 and report.teacher_scores["zh"]["error_rate"] == 0.0
    assert "kept 3" in report.summary() and "WER threshold 0.3" in report.summary()


def test_without_threshold_only_empty_rows_go(tiny_whisper, dataset, monkeypatch):
    plant_transcripts(monkeypatch, TEACHER)
    out, report = pseudo_label(dataset, *tiny_whisper, progress=False)
    assert out["id"] == ["r1", "r2", "r4", "r5"] and report.n_dropped_wer == 0 and report.n_dropped_empty == 2
    assert out["teacher_error_rate"][1] == pytest.approx(0.6)


def test_other_reference_column_and_decoded_audio_feature(tiny_whisper, dataset, monkeypatch):
    plant_transcripts(monkeypatch, TEACHER)
    renamed = dataset.rename_column("text", "transcript").cast_column("audio", datasets.Audio(sampling_rate=RATE))
    out, report = pseudo_label(renamed, *tiny_whisper, reference_column="transcript", wer_threshold=0.0, progress=False)
    assert out["id"] == ["r1", "r4", "r5"] and out["transcript"] == out["reference_text"]
    assert out.column_names[-3:] == ["text", "reference_text", "teacher_error_rate"]


def test_unlabeled_audio_with_real_teacher(tiny_whisper, tmp_path):
    rows = [
        {"id": "u1", "language": "en", "text": None},
        {"id": "u2", "language": "zh", "text": None},
        {"id": "u3", "language": None, "text": None},
    ]
    dataset = load_manifest(write_manifest(tmp_path, rows))
    out, report = pseudo_label(
        dataset, *tiny_whisper, batch_size=2, wer_threshold=0.1, max_new_tokens=3, progress=False
    )
    assert out.column_names == dataset.column_names  # no references: no reference columns
    assert report.n_kept + report.n_dropped_empty == 3 and report.n_dropped_wer == 0 and report.n_with_reference == 0
    assert all(isinstance(text, str) and text.strip() for text in out["text"])
    assert report.teacher_scores == {} and report.decode_seconds > 0


def test_english_only_teacher_scores_rows_without_language(tiny_whisper, tmp_path):
    model, processor = tiny_whisper
    model.generation_config.is_multilingual = False
    rows = [{"id": "e1", "text": "a sentence the random teacher will not say"}, {"id": "e2", "text": "nor this one"}]
    dataset = load_manifest(write_manifest(tmp_path, rows)).remove_columns("language")
    out, report = pseudo_label(dataset, model, processor, wer_threshold=0.0, max_new_tokens=3, progress=False)
    assert report.n_with_reference == 2 and "en" in report.teacher_scores
    assert report.n_kept + report.n_dropped_empty + report.n_dropped_wer == 2 and report.n_dropped_wer >= 1
    with pytest.raises(ValueError, match="English-only"):
        pseudo_label(
            load_manifest(write_manifest(tmp_path, [{"id": "c1", "language": "zh", "text": None}])),
            model,
            processor,
            progress=False,
        )


def test_argument_errors(tiny_whisper, dataset):
    with pytest.raises(ValueError, match="wer_threshold must be >= 0"):
        pseudo_label(dataset, *tiny_whisper, wer_threshold=-0.1)
    with pytest.raises(ValueError, match="no 'speech' column"):
        pseudo_label(dataset, *tiny_whisper, audio_column="speech")


def test_report_round_trip(tmp_path):
    report = LabellingReport(
        n_input=4,
        n_kept=2,
        n_dropped_empty=1,
        n_dropped_wer=1,
        n_with_reference=3,
        wer_threshold=0.1,
        teacher_scores={"en": {"metric": "wer", "error_rate": 0.2, "n_utterances": 3}},
        dropped={"empty": ["a"], "wer": ["b"]},
    )
    path = report.save_json(tmp_path / "nested" / "labelling.json")
    assert LabellingReport.from_dict(json.loads(path.read_text())) == report
    assert "en WER 20.00% over 3" in report.summary()


def test_teacher_labels_are_kept_and_reused_until_threshold_or_teacher_change(tmp_path, monkeypatch):
    """Labelling is the slowest data phase: a rerun (or the other processes of a launch) reads the saved labels."""
    from conftest import make_micro_whisper

    from hf_whisper_kdq.labelling import cached_pseudo_labels, labels_folder

    manifest = write_manifest(tmp_path, ROWS)
    calls = plant_transcripts(monkeypatch, TEACHER)
    output = tmp_path / "run"
    folder = labels_folder(output, manifest)
    teacher = make_micro_whisper(seed=0)

    def labels(threshold=None, teacher=teacher):
        return cached_pseudo_labels(str(manifest), teacher, None, wer_threshold=threshold, output_dir=output)

    first = labels()
    assert len(calls) == 1 and (folder / "key.json").is_file() and (folder / "labelling_reports.json").is_file()
    again = labels()
    assert len(calls) == 1 and again["text"] == first["text"] and again["id"] == first["id"]
    labels(threshold=0.1)
    assert len(calls) == 2
    changed = make_micro_whisper(seed=1)
    labels(threshold=0.1, teacher=changed)
    assert len(calls) == 3
    assert labels_folder(output, tmp_path / "other" / manifest.name) != folder  # one folder per manifest path


def test_only_the_rows_asked_for_are_labelled_and_later_calls_label_only_new_rows(tmp_path, monkeypatch):
    """A capped mixture draws a few rows of a large manifest: those are labelled, and a run drawing others labels
    only the rows not labelled yet; dropped rows (empty, over the threshold) are not labelled again either."""
    from conftest import make_micro_whisper

    from hf_whisper_kdq.labelling import cached_pseudo_labels

    manifest = write_manifest(tmp_path, ROWS)
    calls = plant_transcripts(monkeypatch, TEACHER)
    teacher = make_micro_whisper(seed=0)

    def labels(ids):
        labelled = cached_pseudo_labels(str(manifest), teacher, None, ids=ids, output_dir=tmp_path / "run")
        return dict(zip(labelled["id"], labelled["text"]))

    def labelled_in_last_call():
        return sorted(Path(audio["path"]).stem for audio in calls[-1]["audios"])

    assert labels({"r1", "r3"}) == {"r1": "the quick brown fox"}  # r3's empty transcript is dropped
    assert len(calls) == 1 and labelled_in_last_call() == ["r1", "r3"]
    assert labels({"r1", "r2", "r3"}) == {"r1": "the quick brown fox", "r2": "jumps over a hazy log"}
    assert len(calls) == 2 and labelled_in_last_call() == ["r2"]
    assert labels({"r2"}) == {"r2": "jumps over a hazy log"} and len(calls) == 2
    assert set(labels(None)) == {"r1", "r2", "r4", "r5"} and labelled_in_last_call() == ["r4", "r5", "r6"]
