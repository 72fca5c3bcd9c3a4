"""Export Whisper to ONNX Runtime, its quantized weights stored as the student's own integer codes::

    from hf_whisper_kdq.export.onnx import export_onnx
    from hf_whisper_kdq.evaluation_onnx import transcribe_onnx

    export_onnx("kdq-output/", None, "kdq-onnx/")  # a compressed folder, a QAT student, or any Whisper
    texts = transcribe_onnx("kdq-onnx/", ["audio.wav"], "en")

The folder holds two graphs and what decoding needs besides them:

* ``encoder.onnx``: ``input_features`` ``[batch, n_mels, 3000]`` → ``cross_key.{i}`` / ``cross_value.{i}``
  ``[batch, heads, 1500, head_dim]`` for every decoder layer ``i`` (the cross-attention keys and values, computed
  once per utterance).
* ``decoder.onnx``: one decoding step. ``input_ids`` ``[batch, tokens]``, ``past_key.{i}`` / ``past_value.{i}``
  ``[batch, heads, past, head_dim]`` (``past = 0`` at the first step) and the cross keys and values →
  ``logits`` ``[batch, tokens, vocab]`` and ``present_key.{i}`` / ``present_value.{i}`` (past and new tokens).
  One graph serves the prompt and every later token, so no weight is stored twice.
* the processor (tokenizer, feature extractor), ``config.json``, ``generation_config.json`` (language and task
  tokens, suppressed tokens) and ``onnx_export.json`` (what each weight holds, bytes).

**Weights.** A quantized linear is an onnxruntime ``com.microsoft::MatMulNBits`` whose packed blocks are the
student's codes (``convert_qat``'s, or a packed folder's) offset by the operator's default zero point
``2**(bits - 1)``, and whose block scales are the student's scales, so the graph computes the fake-quantized
student's weights exactly (3-bit codes in 4-bit blocks: MatMulNBits has 2, 4 and 8 bits; per-channel scales
repeated over blocks of 32). A quantized token embedding is a ``GatherBlockQuantized`` on the same bytes, which the
tied output projection reads again through a Reshape: stored once. A float model is exported with float weights,
or quantized on the way (``quantize="int4-g32"``: round-to-nearest by ``quant.quantize_weight``, the naive
baseline). Every other float tensor (convolutions, positional embeddings, LayerNorms, biases, scales) is stored in
float16 and cast back to float32 by the graph (onnxruntime folds those casts when it loads the model), so an int4
whisper-base is ~47 MB on disk. Whisper's stock graphs (optimum's) keep a decoder with and one without past, and
onnxruntime's ``quantize_dynamic`` does not enter the merged decoder's If-subgraphs: both left ~208 MB of float
decoder weights.

**Why not optimum.** ``optimum-onnx`` 0.1.0 (its only release) imports a function transformers 5 removed
(``get_parameter_dtype``), and transformers 5's own decoder does not trace to ONNX without a cache object (its mask
code uses ``torch.diff``). The graphs are therefore traced from a short forward of the model's own modules, checked
against transformers' logits in the tests. Distillation adapters are dropped. ``onnx`` and ``onnxruntime`` are
optional: ``pip install "hf-whisper-kdq[onnx]"``.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..files import atomic_folder, check_output_folder, written_by_us
from ..optional import ONNX_INSTALL_HINT, import_optional
from ..quant import QuantizedWeight, QuantSpec, default_quant_targets, quantize_weight
from ..sources import save_processor
from .compressed import float_model_and_codes

logger = logging.getLogger(__name__)

ENCODER_FILE, DECODER_FILE = "encoder.onnx", "decoder.onnx"
EXPORT_FILE = "onnx_export.json"
OPSET = 17
EMBEDDING = "model.decoder.embed_tokens"
# The block MatMulNBits uses for per-channel and per-tensor scales (repeated): any power of two ≥ 16 divides 512.
_REPEAT_BLOCK = 32

__all__ = ["DECODER_FILE", "ENCODER_FILE", "EXPORT_FILE", "export_onnx", "onnx_file_bytes", "pack_nbits"]


# --- Packed blocks -----------------------------------------------------------------------------------------
def _container_bits(bits: int) -> int:
    """The MatMulNBits / GatherBlockQuantized width (2, 4 or 8) that holds ``bits``-bit codes."""
    return 2 if bits <= 2 else 4 if bits <= 4 else 8


def pack_nbits(q: QuantizedWeight, layer: str = "<weight>") -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """``(packed, scales, bits, block_size)`` of onnxruntime's block formats for ``q``'s codes and scales:
    ``packed`` uint8 ``[rows, cols * bits / 8]`` (codes + ``2**(bits - 1)``, low bits first, the operators'
    default zero point), ``scales`` float32 ``[rows, cols / block_size]``; dequantized, they equal
    ``q.dequantize()`` exactly."""
    rows, cols = q.codes.shape
    if q.super_scales is not None:
        raise ValueError(
            f"{layer}: {q.ggml_type} codes carry super-block scales that the ONNX block formats cannot hold; "
            "export this student to whisper.cpp (export_whisper_cpp), or train it with an integer spec"
        )
    scales = q.scales.float().reshape(q.scales.shape[0], -1).expand(rows, -1)
    if q.granularity == "per_group":
        block = q.group_size
    else:
        block = _REPEAT_BLOCK
        scales = scales.repeat_interleave(cols // block, dim=1) if cols % block == 0 else scales
    if block < 16 or block & (block - 1) or cols % block:
        raise ValueError(
            f"{layer}: groups of {q.group_size} over {cols} columns are not an onnxruntime block (a power of two "
            "≥ 16 dividing the columns): quantize with groups of 32, 64 or 128"
        )
    bits = _container_bits(q.bits)
    unsigned = (q.codes.to(torch.int16) + 2 ** (bits - 1)).to(torch.uint8).reshape(rows, -1, 8 // bits)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8)
    packed = (unsigned << shifts).sum(dim=-1, dtype=torch.uint8)  # disjoint bit fields: the sum is an OR
    return packed.contiguous(), scales.contiguous(), bits, block


def _unpack(packed: torch.Tensor, scales: torch.Tensor, bits: int, block: int) -> torch.Tensor:
    """The float matrix ``pack_nbits``' output stands for (the traced forward's value; the graph computes it)."""
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8)
    codes = ((packed.unsqueeze(-1) >> shifts) & (2**bits - 1)).reshape(packed.shape[0], -1).float() - 2 ** (bits - 1)
    return (codes.reshape(codes.shape[0], -1, block) * scales.unsqueeze(-1)).reshape(codes.shape[0], -1)


def _typed(value, like, sizes):
    """``value`` (a contrib op's output) given ``like``'s float type and ``sizes``: the exporter cannot infer the
    shapes of onnxruntime's own operators, and would warn at every one."""
    value.setType(like.type().with_dtype(torch.float32).with_sizes(sizes))
    return value


class _MatMulNBits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, packed, scales, bits: int, block: int):
        return x @ _unpack(packed, scales, bits, block).T

    @staticmethod
    def symbolic(g, x, packed, scales, bits: int, block: int):
        rows, blob = packed.type().sizes()
        blocks = blob * 8 // (bits * block)
        shape = g.op("Constant", value_t=torch.tensor([rows, blocks, block * bits // 8]))
        y = g.op(
            "com.microsoft::MatMulNBits",
            x,
            g.op("Reshape", packed, shape),
            scales,
            K_i=blocks * block,
            N_i=rows,
            bits_i=bits,
            block_size_i=block,
        )
        return _typed(y, x, [*x.type().varyingSizes()[:-1], rows])


class _GatherBlockQuantized(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, packed, scales, bits: int, block: int):
        return F.embedding(ids, _unpack(packed, scales, bits, block))

    @staticmethod
    def symbolic(g, ids, packed, scales, bits: int, block: int):
        y = g.op(
            "com.microsoft::GatherBlockQuantized",
            packed,
            ids,
            scales,
            gather_axis_i=0,
            quantize_axis_i=1,
            block_size_i=block,
            bits_i=bits,
        )
        width = packed.type().sizes()[1] * 8 // bits
        return _typed(y, scales, [*ids.type().varyingSizes(), width])


class _PackedWeight(nn.Module):
    """One weight in onnxruntime's block format, read as a linear layer's (``linear``) or as an embedding table
    (``gather``): the tied token embedding and output projection share one."""

    def __init__(self, q: QuantizedWeight, layer: str):
        super().__init__()
        packed, scales, self.bits, self.block = pack_nbits(q, layer)
        self.register_buffer("packed", packed)
        self.register_buffer("scales", scales)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        return _MatMulNBits.apply(x, self.packed, self.scales, self.bits, self.block)

    def gather(self, ids: torch.Tensor) -> torch.Tensor:
        return _GatherBlockQuantized.apply(ids, self.packed, self.scales, self.bits, self.block)


class _NBitsLinear(nn.Module):
    def __init__(self, linear: nn.Linear, q: QuantizedWeight, layer: str):
        super().__init__()
        self.weight = _PackedWeight(q, layer)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.weight.linear(x)
        return y if self.bias is None else y + self.bias


def _swap_quantized_linears(model: nn.Module, codes: Mapping[str, QuantizedWeight]) -> None:
    for name, q in codes.items():
        if name == EMBEDDING:
            continue
        parent, _, leaf = name.rpartition(".")
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"{name} holds codes but is a {type(linear).__name__}, not a Linear: cannot export it")
        setattr(model.get_submodule(parent), leaf, _NBitsLinear(linear, q, name))


# --- The two graphs ----------------------------------------------------------------------------------------
def _heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``[batch, tokens, dim]`` → ``[batch, heads, tokens, head_dim]``."""
    batch, tokens, dim = x.shape
    return x.view(batch, tokens, num_heads, dim // num_heads).transpose(1, 2)


def _attend(attention: nn.Module, x: torch.Tensor, keys, values, mask=None) -> torch.Tensor:
    """transformers' ``WhisperAttention`` with its keys and values given: the query scaled before the product, as
    there (the attention call itself then scales by 1)."""
    batch, tokens, dim = x.shape
    query = _heads(attention.q_proj(x) * attention.scaling, attention.num_heads)
    out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=1.0)
    return attention.out_proj(out.transpose(1, 2).reshape(batch, tokens, dim))


def _feed_forward(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x + layer.fc2(layer.activation_fn(layer.fc1(layer.final_layer_norm(x))))


class _Encoder(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.encoder = model.model.encoder
        self.cross = nn.ModuleList(layer.encoder_attn for layer in model.model.decoder.layers)

    def forward(self, input_features: torch.Tensor) -> tuple[torch.Tensor, ...]:
        encoder = self.encoder
        x = F.gelu(encoder.conv1(input_features))
        x = F.gelu(encoder.conv2(x)).permute(0, 2, 1) + encoder.embed_positions.weight
        for layer in encoder.layers:
            attention = layer.self_attn
            h = layer.self_attn_layer_norm(x)
            x = x + _attend(
                attention,
                h,
                _heads(attention.k_proj(h), attention.num_heads),
                _heads(attention.v_proj(h), attention.num_heads),
            )
            x = _feed_forward(layer, x)
        x = encoder.layer_norm(x)
        return tuple(
            t for a in self.cross for t in (_heads(a.k_proj(x), a.num_heads), _heads(a.v_proj(x), a.num_heads))
        )


class _DecoderStep(nn.Module):
    def __init__(self, model: nn.Module, embedding: QuantizedWeight | None):
        super().__init__()
        self.decoder = model.model.decoder
        self.packed_embedding = None if embedding is None else _PackedWeight(embedding, EMBEDDING)
        # Tied to a packed embedding: the output projection reads its bytes; otherwise it is its own (float or
        # swapped) layer, whose weight, tied to a float embedding, is the same initializer.
        tied = embedding is not None and model.config.tie_word_embeddings
        self.output = self.packed_embedding.linear if tied else model.proj_out

    def forward(self, input_ids: torch.Tensor, *caches: torch.Tensor) -> tuple[torch.Tensor, ...]:
        decoder = self.decoder
        n = len(decoder.layers)
        past, cross = caches[: 2 * n], caches[2 * n :]
        tokens, past_length = input_ids.shape[1], past[0].shape[2]
        positions = torch.arange(tokens) + past_length
        if self.packed_embedding is None:
            x = decoder.embed_tokens(input_ids)
        else:
            x = self.packed_embedding.gather(input_ids)
        x = x + decoder.embed_positions.weight[positions]
        # Causal over past and new tokens: new token i sees positions ≤ past + i.
        seen = torch.arange(tokens + past_length).unsqueeze(0) <= positions.unsqueeze(1)
        mask = torch.zeros_like(seen, dtype=torch.float32).masked_fill(~seen, torch.finfo(torch.float32).min)
        presents = []
        for i, layer in enumerate(decoder.layers):
            attention = layer.self_attn
            h = layer.self_attn_layer_norm(x)
            keys = torch.cat([past[2 * i], _heads(attention.k_proj(h), attention.num_heads)], dim=2)
            values = torch.cat([past[2 * i + 1], _heads(attention.v_proj(h), attention.num_heads)], dim=2)
            presents += [keys, values]
            x = x + _attend(attention, h, keys, values, mask)
            x = x + _attend(layer.encoder_attn, layer.encoder_attn_layer_norm(x), cross[2 * i], cross[2 * i + 1])
            x = _feed_forward(layer, x)
        return (self.output(decoder.layer_norm(x)), *presents)


def _cache_names(prefix: str, n_layers: int) -> list[str]:
    return [f"{prefix}_{kind}.{i}" for i in range(n_layers) for kind in ("key", "value")]


def _store_float16(path: Path) -> None:
    """Store the graph's float32 initializers in float16, each read through a Cast back to float32 (onnxruntime
    folds the casts when it loads the model). The scales lose nothing: `QuantizedWeight` scales are float16 values
    (q3_K's, which are not, are refused by `pack_nbits`)."""
    onnx = import_optional("onnx", "onnx", ONNX_INSTALL_HINT)
    from onnx import numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    casts = []
    for initializer in graph.initializer:
        if initializer.data_type != onnx.TensorProto.FLOAT:
            continue
        name, values = initializer.name, numpy_helper.to_array(initializer)
        initializer.CopyFrom(numpy_helper.from_array(values.astype(np.float16), f"{name}.float16"))
        casts.append(onnx.helper.make_node("Cast", [initializer.name], [name], to=onnx.TensorProto.FLOAT))
    for node in reversed(casts):
        graph.node.insert(0, node)
    onnx.save(model, str(path))


def _export(module: nn.Module, inputs: tuple, path: Path, input_names, output_names, dynamic_axes) -> None:
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of torch.export's, which has no `symbolic` hook.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            module,
            inputs,
            str(path),
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=dynamic_axes,
            opset_version=OPSET,
            custom_opsets={"com.microsoft": 1},
            do_constant_folding=False,  # folding would store the embedding again as the output layer's reshaped copy
            dynamo=False,  # the TorchScript exporter: it emits the onnxruntime contrib ops through `symbolic`
        )


def _quantized(model: nn.Module, quantize: str | None, codes: dict[str, QuantizedWeight]) -> dict[str, QuantizedWeight]:
    """``codes``, or for a float model and a ``quantize`` spec, round-to-nearest codes of its linears and embedding."""
    if quantize is None:
        return codes
    if codes:
        raise ValueError(
            f"quantize={quantize!r} was given, but the source already holds quantized codes: they are exported as "
            "they are; leave quantize out (re-quantizing a quantized model only adds error)"
        )
    spec = QuantSpec.parse(quantize)
    names = default_quant_targets(model, embedding=True)
    return {
        name: quantize_weight(model.get_submodule(name).weight.detach().float(), spec, layer=name) for name in names
    }


def onnx_file_bytes(folder: str | os.PathLike) -> int:
    """Bytes of the ONNX graphs in ``folder`` (external data files included)."""
    folder = Path(folder)
    return sum(path.stat().st_size for path in folder.iterdir() if path.suffix in (".onnx", ".data"))


def export_onnx(
    model_or_folder,
    processor=None,
    output_dir: str | os.PathLike = None,
    *,
    quantize: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write an ONNX Runtime folder (``encoder.onnx``, ``decoder.onnx``, processor, configs) for a Whisper.

    Args:
        model_or_folder: a ``WhisperForConditionalGeneration`` (plain or QAT-prepared, possibly with adapters) or
            anything ``sources.load_whisper`` reads; a compressed folder's packed codes are exported exactly.
        processor: the model's ``WhisperProcessor`` (required with a model object; default: the loaded one).
        output_dir: the folder to write, atomically. A previous ONNX export is replaced; another output of this
            package only with ``overwrite``; a folder of other files never.
        quantize: for a float source, a ``QuantSpec`` (``"int4-g32"``, ``"int8-g32"`` ...) to quantize every
            encoder and decoder linear and the token embedding to, round-to-nearest; None keeps float weights.

    Returns:
        ``output_dir`` as a ``Path``.
    """
    if output_dir is None:
        raise TypeError("export_onnx() needs the output folder")
    import_optional("onnx", "onnx", ONNX_INSTALL_HINT)
    output_dir = Path(output_dir).expanduser().absolute()
    previous = (output_dir / EXPORT_FILE).is_file() and written_by_us(output_dir)
    check_output_folder(output_dir, kind="ONNX export", same_kind=previous, overwrite=overwrite)
    model, processor, codes = float_model_and_codes(model_or_folder, processor)
    codes = _quantized(model, quantize, codes)
    if EMBEDDING in codes and model.config.tie_word_embeddings:
        codes.pop("proj_out", None)  # a QAT student lists its tied output layer too: it reads the embedding's bytes
    graph_model = copy.deepcopy(model).float().eval()  # its linears are swapped; the caller's model never
    _swap_quantized_linears(graph_model, codes)
    encoder, decoder = _Encoder(graph_model).eval(), _DecoderStep(graph_model, codes.get(EMBEDDING)).eval()
    config = model.config
    n_layers, heads = config.decoder_layers, config.decoder_attention_heads
    head_dim = config.d_model // heads
    features = torch.zeros(1, config.num_mel_bins, 2 * config.max_source_positions)
    with torch.no_grad():
        cross = encoder(features)
        past = tuple(torch.zeros(1, heads, 3, head_dim) for _ in range(2 * n_layers))
        ids = torch.full((1, 2), config.decoder_start_token_id, dtype=torch.long)
        cross_names, past_names = _cache_names("cross", n_layers), _cache_names("past", n_layers)
        with atomic_folder(output_dir) as staging:
            _export(
                encoder,
                (features,),
                staging / ENCODER_FILE,
                ["input_features"],
                cross_names,
                {"input_features": {0: "batch"}, **{name: {0: "batch"} for name in cross_names}},
            )
            present_names = _cache_names("present", n_layers)
            _export(
                decoder,
                (ids, *past, *cross),
                staging / DECODER_FILE,
                ["input_ids", *past_names, *cross_names],
                ["logits", *present_names],
                {
                    "input_ids": {0: "batch", 1: "tokens"},
                    "logits": {0: "batch", 1: "tokens"},
                    **{name: {0: "batch", 2: "past"} for name in past_names},
                    **{name: {0: "batch", 2: "past_and_new"} for name in present_names},
                    **{name: {0: "batch"} for name in cross_names},
                },
            )
            for name in (ENCODER_FILE, DECODER_FILE):
                _store_float16(staging / name)
            config.save_pretrained(staging)
            model.generation_config.save_pretrained(staging)
            save_processor(processor, staging)
            summary = {
                "source": str(model_or_folder)
                if not isinstance(model_or_folder, nn.Module)
                else type(model_or_folder).__name__,
                "n_parameters": sum(p.numel() for p in model.parameters()),
                "quantized": {
                    name: {
                        "bits": q.bits,
                        "stored_bits": _container_bits(q.bits),
                        "group_size": q.group_size,
                        "granularity": q.granularity,
                    }
                    for name, q in codes.items()
                },
                "files": {path.name: path.stat().st_size for path in sorted(staging.glob("*.onnx"))},
            }
            (staging / EXPORT_FILE).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    logger.info(
        "ONNX export written to %s (%.1f MB of graphs; %d quantized weights)",
        output_dir,
        onnx_file_bytes(output_dir) / 1e6,
        len(codes),
    )
    return output_dir
