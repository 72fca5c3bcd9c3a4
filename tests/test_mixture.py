"""The training mixture: sources parsed from the command line, drawn in their shares (every row of every source at
least once), tagged with where rows and labels come from, and described for the model card."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import make_micro_whisper
from test_labelling import plant_transcripts

from hf_whisper_kdq.compress import CompressArguments, PhaseTimer, training_data
from hf_whisper_kdq.data import load_manifest
from hf_whisper_kdq.mixture import TrainingSource, describe, mix, parse_sources

RATE = 16000


def _manifest(folder, name: str, count: int, language: str | None, corpus: str):
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(count):
        audio = folder / f"{name}-{i}.wav"
        sf.write(audio, (0.2 * np.sin(np.arange(RATE // 2) * (0.05 + 0.01 * i))).astype(np.float32), RATE)
        lines.append(
            {
                "id": f"{name}-{i}",
                "corpus": corpus,
                "language": language,
                "audio": audio.name,
                "duration": 0.5,
                "text": f"row {i} of {name}",
            }
        )
    path = folder / f"{name}.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_sources_parse_from_comma_separated_flags():
    assert parse_sources("a.jsonl, b.jsonl", "3,1", "reference,teacher") == [
        TrainingSource("a.jsonl", 3.0, "reference"),
        TrainingSource("b.jsonl", 1.0, "teacher"),
    ]
    assert parse_sources("a.jsonl,b.jsonl", None, "teacher") == [
        TrainingSource("a.jsonl", None, "teacher"),
        TrainingSource("b.jsonl", None, "teacher"),
    ]
    with pytest.raises(ValueError, match="--train_weights has 3 values for 2 manifests"):
        parse_sources("a.jsonl,b.jsonl", "1,2,3")
    with pytest.raises(ValueError, match="must be > 0"):
        parse_sources("a.jsonl,b.jsonl", "1,0")
    with pytest.raises(ValueError, match="not a number"):
        parse_sources("a.jsonl", "x")
    with pytest.raises(ValueError, match="--train_labels: 'gold'"):
        parse_sources("a.jsonl", None, "gold")
    with pytest.raises(ValueError, match="no training manifest given"):
        CompressArguments(train_weights="1,2")


def test_weighted_sources_are_drawn_in_their_shares_and_each_row_at_least_once(tmp_path):
    big = load_manifest(_manifest(tmp_path, "big", 60, "en", "english corpus"))
    small = load_manifest(_manifest(tmp_path, "small", 6, None, "mandarin corpus"))
    sources = [TrainingSource("big.jsonl", 1.0), TrainingSource("small.jsonl", 1.0)]
    mixture = mix([big, small], sources, seed=0, language="zh")
    drawn = Counter(mixture["source"])
    # Equal weights: the small source is repeated until the big one has given all its rows.
    assert set(mixture.filter(lambda r: r["source"] == "big.jsonl")["id"]) == set(big["id"])
    assert set(mixture.filter(lambda r: r["source"] == "small.jsonl")["id"]) == set(small["id"])
    assert drawn["big.jsonl"] >= 60 and 0.6 < drawn["small.jsonl"] / drawn["big.jsonl"] < 1.6
    assert set(mixture.filter(lambda r: r["source"] == "small.jsonl")["language"]) == {"zh"}  # filled in
    assert set(mixture["labels"]) == {"reference"}
    # Concatenated without weights: each row once, in order.
    plain = mix([big, small], [TrainingSource("big.jsonl"), TrainingSource("small.jsonl")], language="zh")
    assert list(plain["id"]) == list(big["id"]) + list(small["id"])
    with pytest.raises(ValueError, match="give every source a weight, or none"):
        mix([big, small], [TrainingSource("big.jsonl", 2.0), TrainingSource("small.jsonl")])

    report = describe(mixture, {"big.jsonl": 1.0, "small.jsonl": 1.0})
    rows = {s.source: s for s in report.sources}
    assert rows["small.jsonl"].rows_distinct == 6 and rows["small.jsonl"].rows_drawn == drawn["small.jsonl"]
    assert rows["small.jsonl"].languages == ["zh"] and rows["small.jsonl"].corpora == ["mandarin corpus"]
    assert rows["big.jsonl"].hours_drawn == pytest.approx(drawn["big.jsonl"] * 0.5 / 3600)
    assert "| small.jsonl | mandarin corpus | zh | reference | 6 |" in report.table()


def test_compress_mixes_its_manifests_and_labels_a_source_with_the_teacher(tmp_path, monkeypatch):
    english = _manifest(tmp_path / "en", "en", 8, "en", "english corpus")
    mandarin = _manifest(tmp_path / "zh", "zh", 4, "zh", "mandarin corpus")
    calls = plant_transcripts(monkeypatch, {f"zh-{i}": f"teacher says {i}" for i in range(4)})
    compress = CompressArguments(
        train_manifest=f"{english},{mandarin}",
        train_weights="1,1",
        train_labels="reference,teacher",
    )  # synthetic_prompts left at its default: no synthesized speech beside manifests
    teacher = make_micro_whisper(seed=0)  # its weights key the saved labels; the transcripts are planted
    train = training_data(compress, teacher, None, timer=PhaseTimer(), output_dir=str(tmp_path / "run"))
    assert len(calls) == 1  # the Mandarin source only
    by_source = {row["id"]: row for row in train}
    assert by_source["zh-2"]["text"] == "teacher says 2" and by_source["zh-2"]["labels"] == "teacher"
    assert by_source["en-3"]["text"] == "row 3 of en" and by_source["en-3"]["labels"] == "reference"
    assert set(train["source"]) == {str(english), str(mandarin)}
    training_data(compress, teacher, None, timer=PhaseTimer(), output_dir=str(tmp_path / "run"))
    assert len(calls) == 1  # the teacher's labels are reused


def test_a_capped_mixture_labels_only_the_rows_it_draws(tmp_path, monkeypatch):
    """--max_train_samples 6 of a 40-row source labelled by the teacher: 6 rows are transcribed, not 40."""
    mandarin = _manifest(tmp_path / "zh", "zh", 40, "zh", "mandarin corpus")
    english = _manifest(tmp_path / "en", "en", 4, "en", "english corpus")
    calls = plant_transcripts(monkeypatch, {f"zh-{i}": f"teacher says {i}" for i in range(40)})
    compress = CompressArguments(
        train_manifest=f"{english},{mandarin}",
        train_weights="1,3",
        train_labels="reference,teacher",
        max_train_samples=6,
    )
    train = training_data(compress, make_micro_whisper(seed=0), None, output_dir=str(tmp_path / "run"), seed=3)
    drawn = [row for row in train if row["labels"] == "teacher"]
    assert len(train) == 6 and drawn
    assert sorted(Path(audio["path"]).stem for call in calls for audio in call["audios"]) == sorted(
        {row["id"] for row in drawn}
    )
    assert all(row["text"] == f"teacher says {row['id'].split('-')[1]}" for row in drawn)


def test_unlabeled_audio_gets_the_teachers_transcripts_and_empty_ones_are_dropped(tmp_path, monkeypatch):
    manifest = _manifest(tmp_path / "u", "u", 3, "en", "unlabeled corpus")
    rows = [{**json.loads(line), "text": None} for line in manifest.read_text().splitlines()]
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    plant_transcripts(monkeypatch, {"u-0": "first words", "u-1": "[Music]", "u-2": "third words"})
    compress = CompressArguments(unlabeled_manifest=str(manifest))
    train = training_data(compress, make_micro_whisper(seed=0), None, output_dir=str(tmp_path / "run"))
    assert dict(zip(train["id"], train["text"])) == {"u-0": "first words", "u-2": "third words"}
    assert set(train["labels"]) == {"teacher"} and set(train["source"]) == {str(manifest)}
