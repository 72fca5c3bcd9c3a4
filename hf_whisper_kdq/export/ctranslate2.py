"""Export a Whisper student to CTranslate2 (the faster-whisper format).

The conversion is CTranslate2's own ``TransformersConverter``, run on a standard Hugging Face folder
(``sources.save_whisper``), so the result is exactly what ``ct2-transformers-converter`` would write::

    from hf_whisper_kdq.evaluation_ctranslate2 import evaluate_faster_whisper
    from hf_whisper_kdq.export.ctranslate2 import export_ctranslate2

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
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from torch import nn

from ..adapters import holds_training_only, strip_training_only
from ..files import CT2_EXPORT_MARKER, check_output_folder, replace_folder
from ..optional import import_optional
from ..sources import load_whisper, resolve_source, save_whisper

logger = logging.getLogger(__name__)

# CTranslate2's weight types (ctranslate2.specs.model_spec.ACCEPTED_MODEL_TYPES), checked before importing it.
QUANTIZATIONS = ("int8", "int8_float16", "int8_float32", "int8_bfloat16", "int16", "float16", "float32", "bfloat16")
# Files faster-whisper reads next to model.bin: the tokenizer, and the feature extractor (128 mels for large-v3).
COPY_FILES = ("tokenizer.json", "preprocessor_config.json")

__all__ = ["COPY_FILES", "QUANTIZATIONS", "export_ctranslate2"]


# --- Export ---------------------------------------------------------------------------------------------
def _plain_student(model: nn.Module) -> nn.Module:
    """The model as CTranslate2 can read it: QAT wrappers baked into plain layers, no adapters. The caller's
    model is never modified (a copy is made when anything must change)."""
    if not holds_training_only(model):
        return model
    student = copy.deepcopy(model)
    strip_training_only(student)
    return student


def _convertible_folder(folder: Path) -> bool:
    """A local HF folder CTranslate2 can convert as it is (it needs the files to copy, too)."""
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
        output_dir, kind="CTranslate2 export", same_kind=(output_dir / CT2_EXPORT_MARKER).is_file(), overwrite=overwrite
    )
    converters = import_optional("ctranslate2.converters", "ctranslate2")

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
            f"TransformersConverter (ctranslate2 {import_optional('ctranslate2', 'ctranslate2').__version__})",
        }
        (staging / CT2_EXPORT_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        replace_folder(staging, output_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    logger.info("CTranslate2 %s export written to %s", quantization, output_dir)
    return output_dir
