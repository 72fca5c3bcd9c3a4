"""Read CTranslate2 / faster-whisper Whisper models and turn them into Hugging Face state dicts.

Nobody ships a CTranslate2 -> Transformers converter, and the `ctranslate2` package can only write this
format, so the reader is written here against the format's definition (``ModelSpec._serialize`` in
ctranslate2/specs/model_spec.py, binary version 6):

    u32 binary_version | str spec_name | u32 spec_revision | u32 n_variables
    n_variables x (str name | u8 rank | rank x u32 dim | u8 dtype_id | u32 n_bytes | n_bytes data)
    u32 n_aliases | n_aliases x (str alias | str target)

where ``str`` is ``u16 length (including a trailing NUL) | utf-8 bytes | NUL``. Reading needs neither
ctranslate2 nor its C++ runtime, so it works on any machine that runs PyTorch.
"""

from __future__ import annotations

import io
import json
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from transformers import WhisperConfig

SUPPORTED_BINARY_VERSIONS = (5, 6)
# Order of ctranslate2's DataType enum (include/ctranslate2/types.h); bfloat16 has no numpy dtype.
_CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16, 5: "bfloat16"}


class CT2FormatError(ValueError):
    """The file is not a CTranslate2 Whisper model this reader understands."""


@dataclass
class CT2Model:
    """The decoded content of a CTranslate2 model folder.

    ``variables`` holds the stored tensors as stored (possibly int8/int16 with a ``*_scale`` beside them);
    ``aliases`` maps a name to the variable it shares (``decoder/projection/weight`` ->
    ``decoder/embeddings/weight``: CTranslate2 stores tied weights once); ``scalars`` holds the spec's rank-0
    options (``encoder/num_heads``, ``decoder/pre_norm`` ...); ``config`` is the folder's ``config.json``.
    """

    spec_name: str
    spec_revision: int
    binary_version: int
    variables: dict[str, torch.Tensor]
    scalars: dict[str, int | float]
    aliases: dict[str, str] = field(default_factory=dict)
    config: dict = field(default_factory=dict)

    def dequantized(self) -> dict[str, torch.Tensor]:
        """Every tensor in floating point, aliases included; undoes CTranslate2's weight quantization
        (int8 per-row scales, int16 one scale) as ``w = q / scale``."""
        tensors = {}
        for name, tensor in self.variables.items():
            if name.endswith("_scale"):
                continue
            scale = self.variables.get(name + "_scale")
            if scale is not None:
                scale = scale.float().reshape(-1, *([1] * (tensor.dim() - 1))) if scale.dim() else scale.float()
                tensor = tensor.float() / scale
            tensors[name] = tensor
        # CTranslate2 aliases any two equal tensors, not only tied ones (zero biases of a fresh model):
        # copies keep HF's parameters independent; real ties are restored by the caller.
        for alias, target in self.aliases.items():
            if target in tensors:
                tensors[alias] = tensors[target].clone()
        return tensors


class _ConcatenatedReader(io.RawIOBase):
    """Reads several files as one stream: packs split ``model.bin`` into ``model.bin.part1``, ``.part2``..."""

    def __init__(self, paths: Iterable[Path]):
        self._files = [open(path, "rb") for path in paths]
        self._index = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self._index < len(self._files):
            n = self._files[self._index].readinto(buffer)
            if n:
                return n
            self._index += 1
        return 0

    def close(self) -> None:
        for handle in self._files:
            handle.close()
        super().close()


def model_bin_parts(folder: str | Path) -> list[Path]:
    """``model.bin``, or its numbered parts in order; empty when the folder holds neither."""
    folder = Path(folder)
    if (folder / "model.bin").is_file():
        return [folder / "model.bin"]
    parts = [p for p in folder.glob("model.bin.part*") if re.fullmatch(r"model\.bin\.part\d+", p.name)]
    return sorted(parts, key=lambda p: int(p.name.rsplit("part", 1)[1]))


def _read_exact(stream: BinaryIO, n: int) -> bytes:
    data = stream.read(n)
    if len(data) != n:
        raise CT2FormatError(f"unexpected end of file: wanted {n} bytes, got {len(data)}")
    return data


def _read(stream: BinaryIO, fmt: str):
    return struct.unpack("<" + fmt, _read_exact(stream, struct.calcsize("<" + fmt)))[0]


def _read_string(stream: BinaryIO) -> str:
    length = _read(stream, "H")
    return _read_exact(stream, length)[:-1].decode("utf-8")


def _decode_tensor(data: bytes, dtype_id: int, shape: list[int]) -> torch.Tensor:
    if dtype_id not in _CT2_DTYPES:
        raise CT2FormatError(f"unknown CTranslate2 dtype id {dtype_id}")
    dtype = _CT2_DTYPES[dtype_id]
    if dtype == "bfloat16":
        return torch.frombuffer(bytearray(data), dtype=torch.bfloat16).reshape(shape)
    return torch.from_numpy(np.frombuffer(data, dtype=dtype).copy().reshape(shape))


def read_ct2_model(folder: str | Path) -> CT2Model:
    """Parse ``model.bin`` (or ``model.bin.part*``) and ``config.json`` of a CTranslate2 folder."""
    folder = Path(folder)
    parts = model_bin_parts(folder)
    if not parts:
        raise CT2FormatError(f"{folder} holds no model.bin (nor model.bin.part1, part2, ...)")
    with io.BufferedReader(_ConcatenatedReader(parts), buffer_size=1 << 20) as stream:
        binary_version = _read(stream, "I")
        if binary_version not in SUPPORTED_BINARY_VERSIONS:
            raise CT2FormatError(
                f"{parts[0]}: CTranslate2 binary version {binary_version} is not supported "
                f"(supported: {SUPPORTED_BINARY_VERSIONS}); re-convert it with a recent ctranslate2"
            )
        spec_name = _read_string(stream)
        spec_revision = _read(stream, "I")
        variables: dict[str, torch.Tensor] = {}
        scalars: dict[str, int | float] = {}
        for _ in range(_read(stream, "I")):
            name = _read_string(stream)
            shape = [_read(stream, "I") for _ in range(_read(stream, "B"))]
            dtype_id = _read(stream, "B")
            tensor = _decode_tensor(_read_exact(stream, _read(stream, "I")), dtype_id, shape)
            if shape or name.endswith("_scale"):  # int16 quantization stores one scalar scale per weight
                variables[name] = tensor
            else:
                scalars[name] = tensor.item()
        aliases = {}
        for _ in range(_read(stream, "I")):
            alias = _read_string(stream)
            aliases[alias] = _read_string(stream)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    return CT2Model(spec_name, spec_revision, binary_version, variables, scalars, aliases, config)


def _linear(state: dict, prefix: str, variables: dict, scope: str, with_bias: bool = True) -> None:
    state[f"{prefix}.weight"] = variables[f"{scope}/weight"]
    if with_bias:
        state[f"{prefix}.bias"] = variables[f"{scope}/bias"]


def _layer_norm(state: dict, prefix: str, variables: dict, scope: str) -> None:
    state[f"{prefix}.weight"] = variables[f"{scope}/gamma"]
    state[f"{prefix}.bias"] = variables[f"{scope}/beta"]


def _split_attention(state: dict, prefix: str, variables: dict, scope: str, names: tuple[str, ...]) -> None:
    """Split a fused projection (``qkv`` or ``kv``) into HF's separate projections.

    Whisper's key projection has no bias: CTranslate2 stores zeros in its slice of the fused bias, and the
    HF module has no ``k_proj.bias``, so that slice is dropped.
    """
    weights = variables[f"{scope}/weight"].chunk(len(names), dim=0)
    biases = variables[f"{scope}/bias"].chunk(len(names), dim=0)
    for name, weight, bias in zip(names, weights, biases):
        state[f"{prefix}.{name}_proj.weight"] = weight.clone()  # own storage: safetensors refuses shared views
        if name != "k":
            state[f"{prefix}.{name}_proj.bias"] = bias.clone()


def _count_layers(variables: dict, side: str) -> int:
    indices = {int(m.group(1)) for n in variables if (m := re.match(rf"{side}/layer_(\d+)/", n))}
    if indices != set(range(len(indices))):
        raise CT2FormatError(f"{side} layers are not numbered 0..n-1: {sorted(indices)}")
    return len(indices)


def whisper_config_from_ct2(model: CT2Model) -> WhisperConfig:
    """Derive the architecture from tensor shapes and the spec's head counts."""
    v, s = model.variables, model.scalars
    vocab_size, d_model = v["decoder/embeddings/weight"].shape
    return WhisperConfig(
        vocab_size=vocab_size,
        num_mel_bins=v["encoder/conv1/weight"].shape[1],
        d_model=d_model,
        encoder_layers=_count_layers(v, "encoder"),
        decoder_layers=_count_layers(v, "decoder"),
        encoder_attention_heads=int(s["encoder/num_heads"]),
        decoder_attention_heads=int(s["decoder/num_heads"]),
        encoder_ffn_dim=v["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        decoder_ffn_dim=v["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        max_source_positions=v["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=v["decoder/position_encodings/encodings"].shape[0],
    )


def ct2_to_hf_state_dict(model: CT2Model) -> tuple[WhisperConfig, dict[str, torch.Tensor]]:
    """Map a CTranslate2 ``WhisperSpec`` onto ``WhisperForConditionalGeneration``'s parameter names."""
    if model.spec_name != "WhisperSpec":
        raise CT2FormatError(f"expected a WhisperSpec model, found {model.spec_name!r}")
    if not model.scalars.get("decoder/pre_norm", 1):
        raise CT2FormatError("post-norm decoders are not Whisper models")
    v = model.dequantized()
    config = whisper_config_from_ct2(model)
    state: dict[str, torch.Tensor] = {}
    for side in ("encoder", "decoder"):
        hf = f"model.{side}"
        _layer_norm(state, f"{hf}.layer_norm", v, f"{side}/layer_norm")
        for i in range(getattr(config, f"{side}_layers")):
            ct, layer = f"{side}/layer_{i}", f"{hf}.layers.{i}"
            _layer_norm(state, f"{layer}.self_attn_layer_norm", v, f"{ct}/self_attention/layer_norm")
            _split_attention(state, f"{layer}.self_attn", v, f"{ct}/self_attention/linear_0", ("q", "k", "v"))
            _linear(state, f"{layer}.self_attn.out_proj", v, f"{ct}/self_attention/linear_1")
            if side == "decoder":
                _layer_norm(state, f"{layer}.encoder_attn_layer_norm", v, f"{ct}/attention/layer_norm")
                _linear(state, f"{layer}.encoder_attn.q_proj", v, f"{ct}/attention/linear_0")
                _split_attention(state, f"{layer}.encoder_attn", v, f"{ct}/attention/linear_1", ("k", "v"))
                _linear(state, f"{layer}.encoder_attn.out_proj", v, f"{ct}/attention/linear_2")
            _layer_norm(state, f"{layer}.final_layer_norm", v, f"{ct}/ffn/layer_norm")
            _linear(state, f"{layer}.fc1", v, f"{ct}/ffn/linear_0")
            _linear(state, f"{layer}.fc2", v, f"{ct}/ffn/linear_1")
    for conv in ("conv1", "conv2"):
        _linear(state, f"model.encoder.{conv}", v, f"encoder/{conv}")
    state["model.encoder.embed_positions.weight"] = v["encoder/position_encodings/encodings"]
    state["model.decoder.embed_positions.weight"] = v["decoder/position_encodings/encodings"]
    state["model.decoder.embed_tokens.weight"] = v["decoder/embeddings/weight"]
    projection = v.get("decoder/projection/weight")
    if projection is not None and not torch.equal(projection, v["decoder/embeddings/weight"]):
        # Fine-tuned exports may untie the output projection; keep it rather than silently re-tying.
        config.tie_word_embeddings = False
        state["proj_out.weight"] = projection
    return config, state
