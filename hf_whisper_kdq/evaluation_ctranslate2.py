"""Evaluate CTranslate2 folders (e.g. from ``export.ctranslate2``) decoded by faster-whisper, into the same
:class:`~hf_whisper_kdq.evaluation.EvaluationReport` as ``evaluation.evaluate_model``::

    from hf_whisper_kdq.evaluation_ctranslate2 import evaluate_faster_whisper, transcribe_faster_whisper

    report = evaluate_faster_whisper("student-ct2", load_manifest("dev.jsonl"))
    texts = transcribe_faster_whisper("student-ct2", ["audio.wav"], "en")

Decoding matches ``evaluation.transcribe`` (greedy, no timestamps or conditioning on previous text), so the two
reports compare the runtimes, not decoding settings. ``faster-whisper`` is optional: ``pip install
"hf-whisper-kdq[export]"``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .audio import as_audio_array
from .evaluation import EvaluationReport, ManifestRows, language_codes, weight_files
from .optional import import_optional
from .sources.ctranslate2 import read_ct2_model

__all__ = ["evaluate_faster_whisper", "transcribe_faster_whisper"]


def _faster_whisper_model(model, *, device: str, compute_type: str, cpu_threads: int):
    """A ``faster_whisper.WhisperModel``: ``model`` itself, or one loaded from the folder ``model``."""
    faster_whisper = import_optional("faster_whisper", "faster-whisper")
    if isinstance(model, faster_whisper.WhisperModel):
        return model
    folder = Path(model)
    if not (folder / "model.bin").is_file():
        raise FileNotFoundError(f"{folder} holds no model.bin: export one with export_ctranslate2")
    return faster_whisper.WhisperModel(str(folder), device=device, compute_type=compute_type, cpu_threads=cpu_threads)


def _language_codes(whisper, languages, n: int) -> list[str | None]:
    """``evaluation.language_codes``, checked against the languages the model supports."""
    codes = language_codes(languages, n)
    supported = whisper.supported_languages
    if unsupported := sorted({c for c in codes if c is not None and c not in supported}):
        listed = ", ".join(supported[:8]) + (" ..." if len(supported) > 8 else "")
        raise ValueError(
            f"this model cannot transcribe language(s) {unsupported} (it supports {listed}): use a "
            "multilingual checkpoint or drop those rows"
        )
    return codes


_GREEDY = dict(
    without_timestamps=True,
    condition_on_previous_text=False,
    vad_filter=False,
    temperature=0.0,
    compression_ratio_threshold=None,
    log_prob_threshold=None,
    no_speech_threshold=None,
)


def transcribe_faster_whisper(
    model_dir,
    audios: Sequence[Any],
    languages: str | Sequence[str | None] | None = None,
    *,
    beam_size: int = 1,
    device: str = "cpu",
    compute_type: str = "default",
    cpu_threads: int = 0,
    task: str = "transcribe",
    max_new_tokens: int | None = None,
    **options,
) -> list[str]:
    """Transcribe ``audios`` (16 kHz arrays, paths or datasets audio dicts) one by one with faster-whisper.

    ``model_dir`` is a CTranslate2 folder (or a loaded ``faster_whisper.WhisperModel``); ``languages`` one code
    for all, one per audio, or None to detect. Decoding matches ``evaluation.transcribe``: greedy for
    ``beam_size=1``, without timestamps, VAD or conditioning on previous text, and without faster-whisper's
    temperature fallback and no-speech skipping (which would make a weak student's results random, or drop its
    text); ``options`` go to ``WhisperModel.transcribe`` and override these. Audio over 30 s is decoded in
    successive windows. ``max_new_tokens`` caps the tokens of each 30 s window (default: up to Whisper's 448
    positions); ``cpu_threads=0`` is CTranslate2's default (4)."""
    whisper = _faster_whisper_model(model_dir, device=device, compute_type=compute_type, cpu_threads=cpu_threads)
    codes = _language_codes(whisper, languages, len(audios))
    texts = []
    for audio, code in zip(audios, codes):
        settings = {**_GREEDY, "beam_size": beam_size, "max_new_tokens": max_new_tokens, **options}
        segments, _ = whisper.transcribe(as_audio_array(audio), language=code, task=task, **settings)
        texts.append("".join(segment.text for segment in segments).strip())  # segments is a lazy generator
    return texts


def _n_parameters(folder: Path) -> int:
    variables = read_ct2_model(folder).variables
    return sum(tensor.numel() for name, tensor in variables.items() if not name.endswith("_scale"))


def evaluate_faster_whisper(
    model_dir: str | os.PathLike,
    dataset,
    *,
    beam_size: int = 1,
    device: str = "cpu",
    compute_type: str = "default",
    cpu_threads: int = 0,
    max_new_tokens: int | None = None,
    warmup: bool = True,
) -> EvaluationReport:
    """``evaluation.evaluate_model`` for a CTranslate2 folder decoded by faster-whisper: the same manifest
    dataset, scoring (``scoring.score``: normalized WER, CER for zh/ja/...), per corpus and per language
    entries and real-time factor (audio read before the clock starts; one warm-up utterance off the clock).
    ``batch_size`` is 1 (faster-whisper decodes one utterance at a time), ``dtype`` the compute type."""
    rows = ManifestRows.of(dataset)
    whisper = _faster_whisper_model(model_dir, device=device, compute_type=compute_type, cpu_threads=cpu_threads)
    files = weight_files(model_dir)
    report = EvaluationReport(
        model=str(model_dir),
        n_parameters=_n_parameters(Path(model_dir)),
        model_size_bytes=sum(file.stat().st_size for file in files),
        model_size_source="disk",
        batch_size=1,
        num_beams=beam_size,
        device=device,
        dtype=whisper.model.compute_type,
        n_unlabeled_skipped=rows.unlabeled,
    )

    def transcriber(arrays, code: str, warmup: bool) -> list[str]:
        return transcribe_faster_whisper(
            whisper, arrays, code, beam_size=beam_size, max_new_tokens=8 if warmup else max_new_tokens
        )

    return rows.transcribe_and_score(report, transcriber, warmup=warmup)
