"""Reading audio: any file soundfile decodes, or a `datasets` audio value, to 16 kHz mono float32 (arrays and
tensors already in that form pass through :func:`as_audio_array`).

`datasets` is never asked to decode: its decoder (torchcodec) is an optional native dependency that is missing or
broken on many machines, so audio is decoded with soundfile and resampled with soxr here. Problems raise
``AudioError`` with the row, the reason (counted by ``data.prepare_dataset``) and the fix.
"""

from __future__ import annotations

import io
import os
from functools import partial
from typing import Any

import numpy as np
import soundfile as sf
import soxr
import torch

SAMPLING_RATE = 16000
# Peak amplitude under which audio counts as silent: -80 dBFS, about 3 steps of 16-bit PCM.
SILENCE_PEAK = 1e-4


class AudioError(ValueError):
    """Audio that cannot be used for training or evaluation.

    ``reason`` is a short machine-readable key (``missing_audio``, ``unreadable_audio``, ``empty_audio``,
    ``non_finite_audio``) that ``prepare_dataset`` counts; the message names the row and how to fix it.
    """

    def __init__(self, problem: str, *, fix: str, reason: str, row_id: str | None = None):
        where = f"row {row_id!r}" if row_id is not None else "audio"
        super().__init__(f"{where}: {problem}. Fix: {fix}")
        self.problem, self.fix, self.reason, self.row_id = problem, fix, reason, row_id

    def __reduce__(self):
        # The keyword-only constructor would otherwise break pickling across `datasets` worker processes.
        return partial(AudioError, self.problem, fix=self.fix, reason=self.reason, row_id=self.row_id), ()


def _read_file(file: str | io.BytesIO, label: str, row_id: str | None) -> tuple[np.ndarray, int]:
    try:
        audio, rate = sf.read(file, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError) as err:
        raise AudioError(
            f"cannot decode {label} ({err})",
            fix="re-encode the file as WAV or FLAC (e.g. `ffmpeg -i in -ar 16000 out.flac`) or remove the row",
            reason="unreadable_audio",
            row_id=row_id,
        ) from err
    return audio.mean(axis=1), rate


def _from_array(array: Any, rate: Any, row_id: str | None) -> tuple[np.ndarray, int]:
    if rate is None or rate <= 0:
        raise AudioError(
            f"audio array with sampling rate {rate!r}",
            fix='give the array with its "sampling_rate"',
            reason="unreadable_audio",
            row_id=row_id,
        )
    audio = np.asarray(array)
    if np.issubdtype(audio.dtype, np.integer):
        audio = audio / (np.iinfo(audio.dtype).max + 1.0)
    if audio.ndim == 2:
        # Channel-first (torchcodec) and channel-last (soundfile) layouts both occur: channels are the short axis.
        audio = audio.mean(axis=int(np.argmin(audio.shape)))
    return audio.astype(np.float32, copy=False).reshape(-1), int(rate)


def load_audio(source: Any, *, sampling_rate: int = SAMPLING_RATE, row_id: str | None = None) -> np.ndarray:
    """Decode ``source`` to mono float32 samples at ``sampling_rate``.

    ``source`` is a path, or a `datasets` audio value: ``{"path", "bytes"}`` (bytes win when present, as in
    `datasets`) or ``{"array", "sampling_rate"}``. Multi-channel audio is averaged to mono and other rates are
    resampled with soxr. Raises ``AudioError`` naming ``row_id`` for a missing or undecodable file, empty audio
    and NaN/inf samples. Silence decodes normally: test it with ``is_silent``.
    """
    if isinstance(source, (str, os.PathLike)):
        source = {"path": os.fspath(source)}
    if not isinstance(source, dict):
        raise AudioError(
            f"unsupported audio value of type {type(source).__name__}",
            fix="pass a path or a {'path', 'bytes'} dict: cast the column with datasets.Audio(decode=False)",
            reason="unreadable_audio",
            row_id=row_id,
        )
    path = source.get("path")
    if source.get("array") is not None:
        audio, rate = _from_array(source["array"], source.get("sampling_rate"), row_id)
    elif source.get("bytes"):
        audio, rate = _read_file(io.BytesIO(source["bytes"]), f"the audio bytes of {path or 'the row'}", row_id)
    elif path:
        if not os.path.isfile(path):
            raise AudioError(
                f"audio file not found: {path}",
                fix="correct the path (manifest paths are relative to the manifest's folder) or remove the row",
                reason="missing_audio",
                row_id=row_id,
            )
        audio, rate = _read_file(path, path, row_id)
    else:
        raise AudioError(
            "no audio: the value has neither a path, bytes nor an array",
            fix="give every row an audio file",
            reason="missing_audio",
            row_id=row_id,
        )
    where = f" ({path})" if path else ""
    if audio.size == 0:
        raise AudioError(f"the audio is empty{where}", fix="remove the row", reason="empty_audio", row_id=row_id)
    # Checked before resampling, which would smear a single NaN over the whole signal.
    if not np.isfinite(audio).all():
        raise AudioError(
            f"the audio contains NaN or infinite samples{where}",
            fix="re-export the file from its source or remove the row",
            reason="non_finite_audio",
            row_id=row_id,
        )
    if rate != sampling_rate:
        audio = soxr.resample(audio, rate, sampling_rate)
    return np.ascontiguousarray(audio, dtype=np.float32)


def as_audio_array(audio: Any) -> np.ndarray:
    """Arrays and tensors pass through (16 kHz mono); paths and datasets audio dicts go to :func:`load_audio`."""
    if isinstance(audio, (np.ndarray, torch.Tensor)):
        array = np.asarray(audio, dtype=np.float32)
        if array.ndim != 1:
            raise ValueError(f"audio arrays must be 1-D mono samples at 16 kHz, got shape {array.shape}")
        return array
    return load_audio(audio, sampling_rate=SAMPLING_RATE)


def is_silent(audio: np.ndarray, threshold: float = SILENCE_PEAK) -> bool:
    """True when no sample reaches ``threshold`` in absolute value (digital silence, or empty audio)."""
    return audio.size == 0 or float(np.max(np.abs(audio))) < threshold
