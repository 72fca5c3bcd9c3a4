"""Export Whisper to a whisper.cpp model file (the ggml format), in one weight type::

    from hf_whisper_kdq.export.ggml import export_whisper_cpp

    export_whisper_cpp("openai/whisper-base", None, "ggml-base-q5_0.bin", ftype="q5_0")
    # anywhere with whisper.cpp: whisper-cli -m ggml-base-q5_0.bin -f audio.wav   (or pywhispercpp.model.Model)

The file is what whisper.cpp's ``models/convert-h5-to-ggml.py`` writes, followed, for a quantized type, by
whisper.cpp's ``quantize`` tool: the header (hyperparameters and the file type), the model's mel filters, its BPE
vocabulary as bytes, then every tensor under whisper.cpp's name. As there, every weight passes through float16 first;
float32 stay the biases, LayerNorms, positional embeddings and the convolution biases; float16 the convolution
weights; every other 2-D weight, the token embedding included, is stored in the file type (``q8_0``, ``q5_0``,
``q4_0``, ``q3_K``, ``q2_K``). `ggml_file_bytes` counts that file's bytes without writing it (what a ggml size budget bills).

whisper.cpp's loader sizes every quantizable weight from the header's one type: a file cannot mix types per tensor.
It also fixes the architecture: tied output layer, feed-forward width ``4 * d_model``, rows a multiple of the block
(32; q3_K and q2_K 256) for a quantized type; a model without these is refused before anything is written.

What the quantized tensors hold (`ggml_codes`): a float model is quantized by ggml's reference quantizers
(byte-identical to ``ggml_quantize_chunk``); a QAT student or a packed folder whose codes the type holds (a
``quant_format="ggml"`` student, or int4 / int8 with groups of 32 as q4_0 / q8_0) is written from its own codes and
scales, without re-quantization, and each tensor is read back and compared with the fake-quantized weight; other
codes are refused unless ``requantize``. Distillation adapters are dropped. ``pywhispercpp`` (optional:
``pip install "hf-whisper-kdq[export]"``) runs the file from Python, and its libggml-base checks the written blocks.
"""

from __future__ import annotations

import logging
import math
import os
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from ..adapters import is_training_only, merged_key
from ..audio import as_audio_array
from ..evaluation import EvaluationReport, ManifestRows
from ..files import atomic_file
from ..optional import import_optional
from ..quant.spec import GGML_BLOCKS
from ..scoring import language_code
from .compressed import float_model_and_codes
from .ggml_codes import (
    BLOCK_TYPES,
    GGML_TYPES,
    exact_codes,
    file_type_of,
    ggml_library,
    quantize_blocks,
    written_exactly,
)

logger = logging.getLogger(__name__)

GGML_FILE_MAGIC = 0x67676D6C  # "ggml"
# The quantize tool writes QNT_VERSION * QNT_VERSION_FACTOR + ftype into the header of a quantized file.
QNT_VERSION, QNT_VERSION_FACTOR = 2, 1000
# File types (ggml_ftype): the header's type, which whisper.cpp gives every quantizable weight.
FTYPES = {"f16": 1, "q8_0": 7, "q5_0": 8, "q4_0": 2, "q3_K": 11, "q2_K": 10}
_HEADER_BYTES = 48  # magic and 11 int32 hyperparameters

__all__ = [
    "FTYPES",
    "check_architecture",
    "evaluate_whisper_cpp",
    "export_whisper_cpp",
    "ggml_file_bytes",
    "ggml_parameter_count",
    "ggml_tensor_name",
    "is_whisper_cpp_file",
    "load_whisper_cpp",
    "quantize_blocks",
    "read_file_type",
    "transcribe_whisper_cpp",
]


# --- Tensor names and types ------------------------------------------------------------------------------
# Hugging Face module names inside a layer -> whisper.cpp's (the names of OpenAI's checkpoint).
_LAYER_PARTS = {
    "self_attn.q_proj": "attn.query",
    "self_attn.k_proj": "attn.key",
    "self_attn.v_proj": "attn.value",
    "self_attn.out_proj": "attn.out",
    "self_attn_layer_norm": "attn_ln",
    "encoder_attn.q_proj": "cross_attn.query",
    "encoder_attn.k_proj": "cross_attn.key",
    "encoder_attn.v_proj": "cross_attn.value",
    "encoder_attn.out_proj": "cross_attn.out",
    "encoder_attn_layer_norm": "cross_attn_ln",
    "fc1": "mlp.0",
    "fc2": "mlp.2",
    "final_layer_norm": "mlp_ln",
}
_TOP_PARTS = {
    "encoder.layer_norm": "encoder.ln_post",
    "decoder.embed_tokens": "decoder.token_embedding",
    "decoder.layer_norm": "decoder.ln",
}
# Kept in float32 by both the converter and the quantize tool (besides every 1-D tensor).
_FLOAT32_2D = {
    "encoder.conv1.bias",
    "encoder.conv2.bias",
    "encoder.positional_embedding",
    "decoder.positional_embedding",
}


def ggml_tensor_name(hf_name: str) -> str:
    """whisper.cpp's name of a ``WhisperForConditionalGeneration`` state-dict entry (``model.`` prefix included)."""
    parts = hf_name.removeprefix("model.").split(".")
    module, leaf = ".".join(parts[:-1]), parts[-1]
    if leaf not in ("weight", "bias"):
        raise KeyError(f"{hf_name} has no whisper.cpp counterpart")
    if len(parts) > 3 and parts[1] == "layers":
        inner = ".".join(parts[3:-1])
        if inner not in _LAYER_PARTS:
            raise KeyError(f"{hf_name} has no whisper.cpp counterpart")
        return f"{parts[0]}.blocks.{parts[2]}.{_LAYER_PARTS[inner]}.{leaf}"
    if module in ("encoder.conv1", "encoder.conv2"):
        return f"{module}.{leaf}"
    if module.endswith("embed_positions"):  # a bare tensor in OpenAI's checkpoint: no ".weight"
        return f"{parts[0]}.positional_embedding"
    if module not in _TOP_PARTS:
        raise KeyError(f"{hf_name} has no whisper.cpp counterpart")
    return f"{_TOP_PARTS[module]}.{leaf}"


def _tensor_type(name: str, n_dims: int, ftype: str) -> str:
    if n_dims < 2 or name in _FLOAT32_2D:
        return "f32"
    if n_dims > 2:  # the convolution weights: whisper.cpp reads them as float16 in every non-f32 file
        return "f16"
    return ftype


# --- The file --------------------------------------------------------------------------------------------
def check_architecture(config, ftype: str) -> None:
    """What whisper.cpp's fixed Whisper graph cannot run, before any work."""
    problems = []
    for side in ("encoder", "decoder"):
        ffn = getattr(config, f"{side}_ffn_dim")
        if ffn != 4 * config.d_model:
            problems.append(f"{side}_ffn_dim is {ffn}, whisper.cpp computes 4 * d_model = {4 * config.d_model}")
    if ftype != "f16":
        block = GGML_BLOCKS[ftype][0]
        for label, width in (("d_model", config.d_model), ("4 * d_model", 4 * config.d_model)):
            if width % block:
                problems.append(f"{ftype} needs rows of a multiple of {block}, {label} is {width}")
    if getattr(config, "scale_embedding", False):
        problems.append("scale_embedding=True (whisper.cpp does not scale the token embedding)")
    if problems:
        raise ValueError("whisper.cpp cannot run this model: " + "; ".join(problems))


def _header(config, ftype: str) -> bytes:
    file_type = FTYPES[ftype] if ftype == "f16" else QNT_VERSION * QNT_VERSION_FACTOR + FTYPES[ftype]
    fields = (
        GGML_FILE_MAGIC,
        config.vocab_size,
        config.max_source_positions,
        config.d_model,
        config.encoder_attention_heads,
        config.encoder_layers,
        config.max_target_positions,
        config.d_model,
        config.decoder_attention_heads,
        config.decoder_layers,
        config.num_mel_bins,
        file_type,
    )
    return struct.pack("<I11i", *fields)


def _mel_filters(feature_extractor, n_mels: int) -> bytes:
    filters = np.asarray(feature_extractor.mel_filters, dtype=np.float32).T  # (n_mels, n_fft // 2 + 1)
    if filters.shape[0] != n_mels:
        raise ValueError(f"the feature extractor has {filters.shape[0]} mel bins, the model {n_mels}")
    return struct.pack("<2i", *filters.shape) + np.ascontiguousarray(filters).tobytes()


def _vocabulary(tokenizer) -> bytes:
    """The BPE vocabulary (no added tokens, no ``<|endoftext|>``) in id order, each token as its bytes: whisper.cpp
    numbers the tokens it reads 0, 1, ... and names the special tokens after them itself."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocabulary = tokenizer.backend_tokenizer.get_vocab(with_added_tokens=False)
    vocabulary.pop("<|endoftext|>", None)
    tokens = sorted(vocabulary.items(), key=lambda item: item[1])
    if [index for _, index in tokens] != list(range(len(tokens))):
        raise ValueError("the tokenizer's BPE vocabulary is not numbered 0, 1, ...: whisper.cpp cannot read it")
    byte_of = {character: byte for byte, character in bytes_to_unicode().items()}
    out = [struct.pack("<i", len(tokens))]
    for token, _ in tokens:
        text = bytes(byte_of[character] for character in token)
        out.append(struct.pack("<i", len(text)) + text)
    return b"".join(out)


def _layout(model: nn.Module) -> list[tuple[str, str, tuple[int, ...]]]:
    """``(state-dict key, whisper.cpp name, shape written)`` of every tensor whisper.cpp reads, in file order."""
    state = model.state_dict()
    embedding = state["model.decoder.embed_tokens.weight"]
    projection = state.get("proj_out.weight")
    if projection is not None and not (projection is embedding or projection.equal(embedding)):
        raise ValueError("proj_out is not tied to the token embedding: whisper.cpp has no separate output layer")
    layout = []
    for key, tensor in state.items():
        # proj_out: tied; weight_scale, weight_shape ...: what compressed-tensors leaves beside an unpacked weight;
        # adapters and clipping ratios: training only.
        if key == "proj_out.weight" or key.rpartition(".")[2].startswith("weight_") or is_training_only(key):
            continue
        name = ggml_tensor_name(merged_key(key))  # the selection bills a LoRA student before any merge
        shape = (tensor.shape[0], 1) if name in ("encoder.conv1.bias", "encoder.conv2.bias") else tuple(tensor.shape)
        layout.append((key, name, tuple(int(size) for size in shape)))
    return layout


def _stored_bytes(tensor_type: str, count: int) -> int:
    """Bytes of ``count`` values stored as ``tensor_type`` (a block type, f32 or f16)."""
    if tensor_type in BLOCK_TYPES:
        block, block_bytes, _ = GGML_BLOCKS[tensor_type]
        return count // block * block_bytes
    return count * (4 if tensor_type == "f32" else 2)


def _data_bytes(name: str, shape: tuple[int, ...], ftype: str) -> int:
    return _stored_bytes(_tensor_type(name, len(shape), ftype), math.prod(shape))


def _tensor_header(name: str, shape: tuple[int, ...], ftype: str) -> bytes:
    encoded = name.encode()
    tensor_type = GGML_TYPES[_tensor_type(name, len(shape), ftype)]
    # ggml lists dimensions fastest-varying first: numpy's shape reversed.
    return struct.pack(f"<3i{len(shape)}i", len(shape), len(encoded), tensor_type, *shape[::-1]) + encoded


def ggml_file_bytes(model: nn.Module, processor, ftype: str) -> int:
    """Bytes of the whisper.cpp file `export_whisper_cpp` writes for ``model`` in ``ftype``, counted without
    writing it: the header, mel filters and vocabulary, and every tensor's record (conv weights in fp16, positional
    embeddings, LayerNorms and biases in float32, every other 2-D weight, the token embedding included, in
    ``ftype``'s blocks). ``model`` may be a QAT student: adapters and clipping ratios are not counted."""
    if ftype not in FTYPES:
        raise ValueError(f"ftype {ftype!r} is not supported: use one of {', '.join(FTYPES)}")
    config = model.config
    fixed = _HEADER_BYTES + len(_mel_filters(processor.feature_extractor, config.num_mel_bins))
    fixed += len(_vocabulary(processor.tokenizer))
    return fixed + sum(
        len(_tensor_header(name, shape, ftype)) + _data_bytes(name, shape, ftype) for _, name, shape in _layout(model)
    )


def read_file_type(path: str | os.PathLike) -> str:
    """The file type (``FTYPES`` key) in the header of a whisper.cpp file."""
    with open(path, "rb") as file:
        header = file.read(_HEADER_BYTES)
    (file_type,) = struct.unpack_from("<i", header, _HEADER_BYTES - 4)
    names = {code: name for name, code in FTYPES.items()}
    if file_type % QNT_VERSION_FACTOR not in names:
        raise ValueError(
            f"{path}: whisper.cpp file type {file_type % QNT_VERSION_FACTOR} is not one this package reads or writes "
            f"({', '.join(FTYPES)}); run it with whisper.cpp directly, or export one with export-ggml --ftype"
        )
    return names[file_type % QNT_VERSION_FACTOR]


def is_whisper_cpp_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a file that starts with the ggml magic (a whisper.cpp model file)."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size < _HEADER_BYTES:
        return False
    with open(path, "rb") as file:
        return struct.unpack("<I", file.read(4))[0] == GGML_FILE_MAGIC


def ggml_parameter_count(path: str | os.PathLike) -> int:
    """The values of every tensor of a whisper.cpp file (the tied token embedding once), read from its tensor
    table as whisper.cpp's loader walks it: header, mel filters, vocabulary, then each tensor's record (the tensor
    data is skipped, not read). Files of the types :data:`FTYPES` lists."""
    read_file_type(path)  # refuses the types whose tensor sizes are not known here
    type_names = {code: name for name, code in GGML_TYPES.items()}
    with open(path, "rb") as file:

        def unpack(form: str) -> tuple:
            return struct.unpack(form, file.read(struct.calcsize(form)))

        file.seek(_HEADER_BYTES)
        n_mel, n_fft = unpack("<2i")
        file.seek(4 * n_mel * n_fft, os.SEEK_CUR)
        (n_tokens,) = unpack("<i")
        for _ in range(n_tokens):
            file.seek(unpack("<i")[0], os.SEEK_CUR)
        total, end = 0, os.fstat(file.fileno()).st_size
        while file.tell() < end:
            n_dims, name_length, tensor_type = unpack("<3i")
            count = math.prod(unpack(f"<{n_dims}i"))
            file.seek(name_length + _stored_bytes(type_names[tensor_type], count), os.SEEK_CUR)
            total += count
    return total


def _check_output(path: Path, overwrite: bool) -> None:
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder: give the path of the model file to write, e.g. {path}/ggml.bin")
    if not path.exists():
        return
    with open(path, "rb") as file:
        is_ggml = file.read(4) == struct.pack("<I", GGML_FILE_MAGIC)
    if not is_ggml:
        raise FileExistsError(f"{path} exists and is not a ggml model file: it is never replaced; choose another path")
    if not overwrite:
        raise FileExistsError(f"{path} exists: pass overwrite=True (--overwrite) to replace it, or choose another path")


def export_whisper_cpp(
    model_or_folder: nn.Module | str | os.PathLike,
    processor=None,
    path: str | os.PathLike = None,
    *,
    ftype: str = "q5_0",
    requantize: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write a whisper.cpp model file (``ggml-*.bin``) whose quantizable weights are all of type ``ftype``.

    Args:
        model_or_folder: a ``WhisperForConditionalGeneration`` (plain or QAT-prepared, possibly with
            ``kdq_adapters``), or anything ``sources.load_whisper`` reads: a Hub id, an offline pack
            (``openai/whisper-tiny.en``), an HF folder, a compressed folder written by ``save_compressed``, an OpenAI
            ``.pt``, a CTranslate2 folder.
        processor: the model's ``WhisperProcessor`` (required with a model object; default: the loaded one).
        path: the file to write, atomically (an interrupted export leaves nothing). An existing ggml file is replaced
            only with ``overwrite``; any other file never.
        ftype: ``f16``, ``q8_0``, ``q5_0``, ``q4_0``, ``q3_K``, ``q2_K`` (``FTYPES``), or ``auto``: the type that holds the
            source's codes exactly (a QAT student or a packed folder, see `ggml_codes.file_type_of`).
        requantize: quantize every weight's (dequantized) float values with ggml's rule, even where the source
            holds codes of another grid; without it such a source is refused (`ggml_codes.exact_codes`). A source
            whose codes the type holds is written from them exactly, and checked.

    Returns:
        ``path`` as a ``Path``.
    """
    if path is None:
        raise TypeError("export_whisper_cpp() needs the path of the file to write")
    if ftype not in FTYPES and ftype != "auto":
        raise ValueError(f"ftype {ftype!r} is not supported: use one of {', '.join(FTYPES)} or auto")
    path = Path(path).expanduser().absolute()
    _check_output(path, overwrite)
    model, processor, codes = float_model_and_codes(model_or_folder, processor)
    if ftype == "auto":
        ftype = file_type_of(codes)
    config = model.config
    check_architecture(config, ftype)
    layout = _layout(model)
    blocks = [key for key, name, shape in layout if _tensor_type(name, len(shape), ftype) in BLOCK_TYPES]
    exact = exact_codes(codes, blocks, ftype, requantize=requantize)
    library = ggml_library() if exact else None
    state = model.state_dict()
    sizes = {"f32": 0, "f16": 0, ftype: 0}
    with atomic_file(path) as temporary, open(temporary, "wb") as file:
        file.write(_header(config, ftype))
        file.write(_mel_filters(processor.feature_extractor, config.num_mel_bins))
        file.write(_vocabulary(processor.tokenizer))
        for key, name, shape in layout:
            tensor_type = _tensor_type(name, len(shape), ftype)
            if key in exact:
                data, checks = written_exactly(name, exact[key], ftype, library)
            else:
                # Through float16 first, as whisper.cpp's converter writes every weight before quantize reads it.
                values = state[key].detach().cpu().float().numpy().astype(np.float16).astype(np.float32)
                if tensor_type in BLOCK_TYPES:
                    data = quantize_blocks(values, tensor_type)
                else:
                    data = values.astype(np.float32 if tensor_type == "f32" else np.float16).tobytes()
            file.write(_tensor_header(name, shape, ftype) + data)
            sizes[tensor_type] += len(data)
    logger.info(
        "whisper.cpp %s file written to %s (%.1f MB; tensor bytes: %s)%s",
        ftype,
        path,
        path.stat().st_size / 1e6,
        ", ".join(f"{kind} {size / 1e6:.1f} MB" for kind, size in sizes.items()),
        f"; {len(exact)} weights written from the student's own codes, checked by {' and '.join(checks)}"
        if exact
        else "",
    )
    return path


# --- Running the file ------------------------------------------------------------------------------------
_WARNING_LEVELS = (3, 4)  # GGML_LOG_LEVEL_WARN, GGML_LOG_LEVEL_ERROR
# As evaluation.transcribe decodes: greedy, no timestamps, no conditioning on previous text, no temperature fallback.
_GREEDY = dict(no_context=True, no_timestamps=True, temperature=0.0, temperature_inc=0.0)
# whisper.cpp's own temperature fallback, its defaults (whisper_full_default_params): a segment whose tokens' entropy
# is under 2.4 (a loop) or whose mean log-probability is under -1 is decoded again at 0.2, 0.4, ... 1.0. The
# counterpart of evaluation.TEMPERATURE_FALLBACK, in whisper.cpp's terms (its entropy stands for the compression
# ratio), with whisper.cpp's own seeded sampler.
TEMPERATURE_FALLBACK = dict(temperature_inc=0.2, entropy_thold=2.4, logprob_thold=-1.0)


def load_whisper_cpp(path: str | os.PathLike, *, n_threads: int = 2, **params):
    """A ``pywhispercpp.model.Model`` of the file at ``path``, decoding as ``evaluation.transcribe`` does (greedy,
    without timestamps, conditioning on previous text or temperature fallback); ``params`` override that.

    whisper.cpp's load messages are collected instead of printed; a warning or an error among them raises
    ``ValueError`` with the messages, because pywhispercpp returns a context even then (e.g. an empty model for a
    truncated file, which later decodes nothing)."""
    bindings = import_optional("_pywhispercpp", "pywhispercpp")
    Model = import_optional("pywhispercpp.model", "pywhispercpp").Model
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} is not a file: write one with export_whisper_cpp")
    settings = {**_GREEDY, "print_progress": False, "print_realtime": False, "n_threads": n_threads, **params}
    messages: list[tuple[int, str]] = []
    bindings.whisper_log_set(lambda level, text: messages.append((level, text)))
    try:
        model = Model(str(path), **settings)
    finally:
        bindings.whisper_log_set(None)  # a Python callback must not outlive the load (other threads, shutdown)
    if any(level in _WARNING_LEVELS for level, _ in messages):
        raise ValueError(f"whisper.cpp did not load {path} cleanly:\n" + "".join(text for _, text in messages[-12:]))
    return model


def transcribe_whisper_cpp(
    model: Any,
    audios: Sequence[Any],
    language: str | None = "en",
    *,
    n_threads: int = 2,
) -> list[str]:
    """Transcribe ``audios`` (16 kHz arrays, paths or datasets audio dicts) one by one with whisper.cpp.

    ``model`` is a whisper.cpp file (loaded by :func:`load_whisper_cpp` with ``n_threads``) or a model
    ``load_whisper_cpp`` returned; ``language`` one code for all, or None to detect it."""
    if isinstance(model, (str, os.PathLike)):
        model = load_whisper_cpp(model, n_threads=n_threads)
    code = "" if language is None else language_code(language)  # "": whisper.cpp detects the language
    texts = []
    for audio in audios:
        segments = model.transcribe(as_audio_array(audio), language=code)
        texts.append("".join(segment.text for segment in segments).strip())
    return texts


def evaluate_whisper_cpp(
    path: str | os.PathLike,
    dataset,
    *,
    n_threads: int = 1,
    warmup: bool = True,
    temperature_fallback: bool = False,
) -> EvaluationReport:
    """``evaluation.evaluate_model`` for a whisper.cpp file: the same manifest dataset, scoring, per corpus and per
    language entries and real-time factor (audio read before the clock starts; one warm-up utterance off the
    clock), decoded as :func:`transcribe_whisper_cpp` does: greedily, or with ``temperature_fallback`` by
    whisper.cpp's own fallback (``TEMPERATURE_FALLBACK``). Size: the file's bytes; ``batch_size`` 1."""
    rows = ManifestRows.of(dataset)
    n_parameters = ggml_parameter_count(path)  # first: it refuses the file types it cannot size, with the fix
    model = load_whisper_cpp(path, n_threads=n_threads, **(TEMPERATURE_FALLBACK if temperature_fallback else {}))
    report = EvaluationReport(
        model=str(path),
        n_parameters=n_parameters,
        model_size_bytes=Path(path).stat().st_size,
        model_size_source="disk",
        batch_size=1,
        num_beams=1,
        device="cpu",
        dtype=f"whisper.cpp {read_file_type(path)}",
        temperature_fallback=temperature_fallback,
        n_unlabeled_skipped=rows.unlabeled,
    )

    def transcriber(arrays, code: str, warmup: bool) -> list[str]:
        return transcribe_whisper_cpp(model, arrays, code)

    return rows.transcribe_and_score(report, transcriber, warmup=warmup)
