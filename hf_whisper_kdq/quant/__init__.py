"""Quantization-aware training for Whisper: prepare (fake-quant wrappers) → train → convert.

Weight-only, symmetric, signed integer quantization (2/3/4/8 bits, per tensor / channel / group) with a
straight-through estimator and optional LSQ-style learnable clipping, as used by Whisper-KDQ
(Shao et al. 2023), or ggml's block formats (``GGMLSpec``: q2_K, q3_K, q4_0, q8_0, whose codes a whisper.cpp file
holds exactly; q2_K's with a minimum per sub-block). No dependency on torchao; the shape of the API follows it.

    from hf_whisper_kdq.quant import QuantSpec, default_quant_targets, prepare_qat, convert_qat

    spec = QuantSpec.parse("int4-g32")
    prepare_qat(model, {name: spec for name in default_quant_targets(model)})
    ...  # train
    codes = convert_qat(model)  # {layer: QuantizedWeight(codes int8, scales float32)}
"""

from .api import (
    convert_qat,
    default_quant_targets,
    prepare_qat,
    quant_layers,
    quant_specs,
    quantized_size_bytes,
    search_clips_on_inputs,
    set_quant_specs,
)
from .fake_quant import QuantizedWeight, fake_quantize, quantize_weight, search_clip_ratios
from .modules import FakeQuantEmbedding, FakeQuantLinear
from .spec import ALLOWED_BITS, FLOAT_BITS, GGML_SPEC_TYPES, GRANULARITIES, GGMLSpec, QuantSpec, weight_bytes

__all__ = [
    "ALLOWED_BITS",
    "FLOAT_BITS",
    "GRANULARITIES",
    "FakeQuantEmbedding",
    "GGML_SPEC_TYPES",
    "GGMLSpec",
    "FakeQuantLinear",
    "QuantSpec",
    "QuantizedWeight",
    "convert_qat",
    "default_quant_targets",
    "fake_quantize",
    "prepare_qat",
    "quant_layers",
    "quant_specs",
    "quantize_weight",
    "quantized_size_bytes",
    "search_clip_ratios",
    "search_clips_on_inputs",
    "set_quant_specs",
    "weight_bytes",
]
