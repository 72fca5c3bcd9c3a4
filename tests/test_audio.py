"""Tests for hf_whisper_kdq.audio: decoding, resampling, downmixing, the errors bad audio raises."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from hf_whisper_kdq.audio import SAMPLING_RATE, AudioError, as_audio_array, is_silent, load_audio


def sine(seconds: float, rate: int = SAMPLING_RATE, freq: float = 440.0, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def write(path: Path, audio: np.ndarray, rate: int = SAMPLING_RATE, subtype: str = "FLOAT") -> Path:
    sf.write(path, audio, rate, subtype=subtype)
    return path


def junk(path: Path) -> Path:
    path.write_bytes(b"RIFF not really a wave file")
    return path


def dominant_frequency(audio: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(audio))
    return float(np.fft.rfftfreq(audio.size, 1 / rate)[np.argmax(spectrum)])


def test_load_audio_reads_mono_16k_unchanged(tmp_path):
    audio = sine(0.5)
    out = load_audio(write(tmp_path / "a.wav", audio))
    assert out.dtype == np.float32 and out.ndim == 1
    np.testing.assert_allclose(out, audio, atol=1e-6)


def test_load_audio_resamples_44k_keeping_pitch(tmp_path):
    out = load_audio(write(tmp_path / "a.flac", sine(1.0, rate=44100), rate=44100, subtype="PCM_16"))
    assert abs(out.size - SAMPLING_RATE) <= 1
    assert dominant_frequency(out, SAMPLING_RATE) == pytest.approx(440, abs=2)


def test_load_audio_downmixes_stereo_by_mean(tmp_path):
    left = sine(0.25)
    stereo = np.stack([left, np.zeros_like(left)], axis=1)
    out = load_audio(write(tmp_path / "stereo.wav", stereo))
    assert out.shape == left.shape
    np.testing.assert_allclose(out, left / 2, atol=1e-6)


def test_load_audio_accepts_datasets_values(tmp_path):
    path = write(tmp_path / "a.flac", sine(0.5), subtype="PCM_16")
    from_bytes = load_audio({"path": "renamed.flac", "bytes": path.read_bytes()})
    np.testing.assert_allclose(from_bytes, load_audio(str(path)))
    # int16 at 8 kHz, channel-first stereo: scaled to [-1, 1), averaged, resampled.
    pcm = (sine(1.0, rate=8000, freq=200) * 32768).astype(np.int16)
    out = load_audio({"array": np.stack([pcm, pcm]), "sampling_rate": 8000})
    assert abs(out.size - SAMPLING_RATE) <= 1
    assert 0.45 < np.abs(out).max() < 0.55
    assert dominant_frequency(out, SAMPLING_RATE) == pytest.approx(200, abs=2)


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda d: d / "nowhere.wav", "missing_audio"),
        (lambda d: junk(d / "junk.wav"), "unreadable_audio"),
        (lambda d: write(d / "empty.wav", np.zeros(0, np.float32)), "empty_audio"),
        (lambda d: write(d / "nan.wav", np.where(np.arange(800) == 400, np.nan, 0.1).astype("f4")), "non_finite_audio"),
        (lambda d: write(d / "inf.wav", np.full(800, np.inf, np.float32)), "non_finite_audio"),
    ],
    ids=["missing", "unreadable", "empty", "nan", "inf"],
)
def test_load_audio_bad_inputs_raise_audio_error(tmp_path, make, reason):
    with pytest.raises(AudioError, match=r"row 'utt-7'.*Fix: ") as caught:
        load_audio(make(tmp_path), row_id="utt-7")
    assert caught.value.reason == reason and caught.value.row_id == "utt-7"
    assert isinstance(caught.value, ValueError)


def test_load_audio_rejects_value_without_audio():
    with pytest.raises(AudioError, match="neither a path") as caught:
        load_audio({"path": None, "bytes": None})
    assert caught.value.reason == "missing_audio"
    with pytest.raises(AudioError, match="Audio\\(decode=False\\)"):
        load_audio(object())


def test_audio_error_survives_pickling():
    error = AudioError("bad", fix="do this", reason="empty_audio", row_id="r1")
    clone = pickle.loads(pickle.dumps(error))
    assert (str(clone), clone.reason, clone.row_id) == (str(error), "empty_audio", "r1")


def test_silence_decodes_and_is_detected(tmp_path):
    out = load_audio(write(tmp_path / "silent.wav", np.zeros(1600, np.float32)))
    assert out.size == 1600 and is_silent(out)
    assert not is_silent(sine(0.1, amplitude=0.01))


def test_as_audio_array_passes_samples_through_and_decodes_the_rest(tmp_path):
    audio = sine(0.25)
    assert as_audio_array(audio) is audio
    np.testing.assert_array_equal(as_audio_array(torch.from_numpy(audio)), audio)
    np.testing.assert_allclose(as_audio_array(write(tmp_path / "a.wav", audio)), audio, atol=1e-6)
    with pytest.raises(ValueError, match="1-D mono"):
        as_audio_array(np.stack([audio, audio]))
