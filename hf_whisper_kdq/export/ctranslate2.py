"""Export a Whisper student to CTranslate2 (the faster-whisper format) and evaluate it with faster-whisper.

The conversion is CTranslate2's own ``TransformersConverter``, run on a standard Hugging Face folder
(``sources.save_whisper``), so the result is exactly what ``ct2-transformers-converter`` would write::

    from hf_whisper_kdq.export.ctranslate2 import export_ctranslate2, evaluate_faster_whisper

    folder = export_ctranslate2(student, processor, "student-ct2", quantization="int8")
    report = evaluate_faster_whisper(folder, load_manifest("dev.jsonl"))   # an evaluation.EvaluationReport

A QAT-prepared student is exported with its quantization baked in: a copy is converted (``quant.convert_qat``)
to plain layers holding the dequantized weights, which CTranslate2 then stores in the requested
``quantization``. CTranslate2 has no 2/3/4-bit weights: an int4 layer comes out as int8 (or float) codes of
its int4-dequantized values, so its accuracy is kept but not its size. Distillation adapters
(``model.kdq_adapters``) are training-only and are dropped.

``ctranslate2`` and ``faster-whisper`` are optional: ``pip install "hf-whisper-kdq[export]"``.
"""

from __future__ import annotations

import copy
import importlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from ..evaluation import EvaluationReport, ManifestRows, as_audio_array, weight_files
from ..scoring import language_code
from ..sources import check_output_folder

logger = logging.getLogger(__name__)

# CTranslate2's weight types (ctranslate2.specs.model_spec.ACCEPTED_MODEL_TYPES), checked before importing it.
QUANTIZATIONS = ("int8", "int8_float16", "int8_float32", "int8_bfloat16", "int16", "float16", "float32", "bfloat16")
# Files faster-whisper reads next to model.bin: the tokenizer, and the feature extractor (128 mels for large-v3).
COPY_FILES = ("tokenizer.json", "preprocessor_config.json")
# Written into every export: a folder holding it may be replaced without overwrite=True.
EXPORT_MARKER = ".hf_whisper_kdq_ct2_export"
ADAPTERS_ATTRIBUTE = "kdq_adapters"  # = trainer.ADAPTERS_ATTRIBUTE, not imported to keep this module light
_INSTALL_HINT = 'pip install "hf-whisper-kdq[export]"'

__all__ = [
    "COPY_FILES",
    "QUANTIZATIONS",
    "evaluate_faster_whisper",
    "export_ctranslate2",
    "transcribe_faster_whisper",
]


def _import(module: str, package: str):
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(f"{package} is not installed ({error}). Fix: {_INSTALL_HINT}") from error


# --- Export ---------------------------------------------------------------------------------------------
def _plain_student(model: nn.Module) -> nn.Module:
    """The model as CTranslate2 can read it: QAT wrappers baked into plain layers, no adapters. The caller's
    model is never modified (a copy is made when anything must change)."""
    from ..quant.modules import FAKE_QUANT_TYPES

    prepared = any(isinstance(module, FAKE_QUANT_TYPES) for module in model.modules())
    adapters = ADAPTERS_ATTRIBUTE in model._modules
    if not (prepared or adapters):
        return model
    student = copy.deepcopy(model)
    if adapters:
        delattr(student, ADAPTERS_ATTRIBUTE)
    if prepared:
        from ..quant import convert_qat

        convert_qat(student)
    return student


def _replace(staging: Path, output_dir: Path) -> None:
    """Move ``staging`` to ``output_dir``; a previous folder is kept aside until the new one is in place."""
    if not output_dir.exists():
        staging.rename(output_dir)
        return
    backup = output_dir.with_name(f".{output_dir.name}.old")
    shutil.rmtree(backup, ignore_errors=True)
    output_dir.rename(backup)
    try:
        staging.rename(output_dir)
    except BaseException:
        backup.rename(output_dir)
        raise
    shutil.rmtree(backup)


def _convertible_folder(folder: Path) -> bool:
    """A local HF folder CTranslate2 can convert as it is (it needs the files to copy, too)."""
    from ..sources import resolve_source

    if not (folder.is_dir() and all((folder / name).is_file() for name in COPY_FILES)):
        return False
    try:
        return resolve_source(folder).kind == "hf"
    except ValueError:
        return False


def export_ctranslate2(
    model: nn.Module | str | os.PathLike,
    processor=None,
    output_dir: str | os.PathLike = None,
    *,
    quantization: str = "int8",
    overwrite: bool = False,
) -> Path:
    """Write a CTranslate2 / faster-whisper folder (``model.bin``, ``config.json``, ``vocabulary.json``,
    ``tokenizer.json``, ``preprocessor_config.json``).

    Args:
        model: a ``WhisperForConditionalGeneration`` (plain or QAT-prepared, possibly with ``kdq_adapters``),
            or anything ``sources.load_whisper`` reads (an HF folder, a Hub id, an OpenAI ``.pt``, another
            CTranslate2 folder, e.g. to re-quantize it); ``processor`` is then not needed.
        processor: the model's ``WhisperProcessor`` (required with a model object).
        output_dir: the folder to write. It is built beside its final place and renamed in, so an interrupted
            export leaves nothing half-written. A previous export there is replaced; another folder this package
            wrote (e.g. by ``save_whisper``) only with ``overwrite``; a non-empty folder of anything else is
            refused (``FileExistsError``) and left untouched.
        quantization: CTranslate2 weight type, one of ``QUANTIZATIONS``; faster-whisper may still compute in
            another type (its ``compute_type``).

    Returns:
        ``output_dir`` as a ``Path``.
    """
    if output_dir is None:
        raise TypeError("export_ctranslate2() needs an output_dir")
    if quantization not in QUANTIZATIONS:
        raise ValueError(
            f"quantization {quantization!r} is not a CTranslate2 weight type: use one of {', '.join(QUANTIZATIONS)}"
        )
    is_module = isinstance(model, nn.Module)
    if is_module and processor is None:
        raise ValueError("exporting a model object needs its WhisperProcessor (the tokenizer and feature extractor)")
    source = str(model) if not is_module else getattr(model, "name_or_path", "") or None
    output_dir = Path(output_dir).expanduser().absolute()
    check_output_folder(
        output_dir, kind="CTranslate2 export", same_kind=(output_dir / EXPORT_MARKER).is_file(), overwrite=overwrite
    )
    converters = _import("ctranslate2.converters", "ctranslate2")
    from ..sources import load_whisper, save_whisper

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    try:
        if not is_module and _convertible_folder(Path(model).expanduser()):
            hf_folder = Path(model).expanduser()
        else:
            if not is_module:
                model, processor = load_whisper(model, dtype=None)
            hf_folder = save_whisper(_plain_student(model), processor, work / "hf")
        converter = converters.TransformersConverter(str(hf_folder), copy_files=list(COPY_FILES))
        staging = Path(converter.convert(str(work / "ct2"), quantization=quantization))
        marker = {
            "quantization": quantization,
            "source": source,
            "converter": "ctranslate2.converters."
            f"TransformersConverter (ctranslate2 {_import('ctranslate2', 'ctranslate2').__version__})",
        }
        (staging / EXPORT_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        _replace(staging, output_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    logger.info("CTranslate2 %s export written to %s", quantization, output_dir)
    return output_dir


# --- faster-whisper -------------------------------------------------------------------------------------
def _faster_whisper_model(model, *, device: str, compute_type: str, cpu_threads: int):
    """A ``faster_whisper.WhisperModel``: ``model`` itself, or one loaded from the folder ``model``."""
    faster_whisper = _import("faster_whisper", "faster-whisper")
    if isinstance(model, faster_whisper.WhisperModel):
        return model
    folder = Path(model)
    if not (folder / "model.bin").is_file():
        raise FileNotFoundError(f"{folder} holds no model.bin: export one with export_ctranslate2")
    return faster_whisper.WhisperModel(str(folder), device=device, compute_type=compute_type, cpu_threads=cpu_threads)


def _language_codes(whisper, languages, n: int) -> list[str | None]:
    per_item = [languages] * n if languages is None or isinstance(languages, str) else list(languages)
    if len(per_item) != n:
        raise ValueError(f"{len(per_item)} languages for {n} audios: pass one per audio, or a single string")
    codes = [None if lang is None else language_code(lang) for lang in per_item]
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
    from ..sources.ctranslate2 import read_ct2_model

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
