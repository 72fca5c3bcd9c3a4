"""GPTQ (Frantar et al. 2023) on this package's grid: rounding with second-order error feedback, column by column,
from the inputs a layer meets on calibration data.

Written here rather than taken from llm-compressor (which runs it on compressed-tensors' grid) for two reasons:
llm-compressor 0.14 pins another transformers than this package's (it runs in a venv of its own:
``benchmarks/gptq_baseline.py``), and the codes must be those of `fake_quantize`'s grid (signed scale, the full
signed range, fp16-exact scales, the learned clipping ratios) so that a layer holding them trains and exports
exactly (`FakeQuantLinear.fix_codes`). The algorithm is the reference one (and llm-compressor's): Hessian
``H = 2/n Σ x xᵀ`` over the layer's input rows, dampened by 1% of its mean diagonal, the upper Cholesky factor
of ``H⁻¹``, blocks of 128 columns with lazy updates, each group's scale taken from the error-updated weights when the
loop reaches the group (static groups off, no activation ordering).

On a ggml block type (`GGMLSpec`: whisper.cpp's q8_0, q4_0, q3_K, q2_K) the same loop runs with ggml's scales: when
it reaches a block (32 weights; the k-quants' super-block of 256), ggml's reference quantizer
(`ggml_blocks.ggml_quantize`) gives the block's scales from the error-updated weights (q3_K: the fp16 super-block
scale and the 6-bit sub-block scales of its 16 sub-blocks; q2_K: 4-bit scales and minimums of two fp16 values), and
each column is then rounded to the nearest code of that type's range with error
feedback. The codes differ from ggml's own rounding, the scales are ggml's, so the blocks are valid for whisper.cpp
and `export_whisper_cpp` writes them as they are.

    hessian = InputHessian(in_features)
    ...  # hessian.add(x) for each input batch x [..., in_features]
    q = gptq_quantize(linear.weight, hessian.matrix(), QuantSpec(4, "per_group", 32))  # a QuantizedWeight
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .fake_quant import QuantizedWeight, _grouped_scale, _unrounded_codes
from .ggml_blocks import GGMLCodes, ggml_quantize, group_offsets, round_to_scales
from .spec import AnySpec, GGMLSpec, QuantSpec

# Columns updated together before the error is carried to the rest (the reference implementation's block size).
BLOCK_COLUMNS = 128
# Added to the Hessian's diagonal, as a fraction of its mean: GPTQ's (and llm-compressor's) dampening default.
DAMPENING = 0.01


class InputHessian:
    """Running ``2/n Σ x xᵀ`` (``[in_features, in_features]``, float64 sums) of the input rows a linear meets."""

    def __init__(self, in_features: int, device: torch.device | str | None = None):
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self.rows = 0

    @torch.no_grad()
    def add(self, inputs: Tensor) -> None:
        """Add the rows of ``inputs`` (``[..., in_features]``)."""
        x = inputs.detach().reshape(-1, inputs.shape[-1]).to(self.sum.device, torch.float64)
        self.sum.addmm_(x.T, x)
        self.rows += x.shape[0]

    def matrix(self) -> Tensor:
        """float32 ``[in_features, in_features]``; ValueError before any row was added."""
        if self.rows == 0:
            raise ValueError("no input rows were added: run calibration data through the layer first")
        return (self.sum * (2.0 / self.rows)).float()


def _inverse_cholesky(hessian: Tensor, dampening: float) -> Tensor:
    """The upper Cholesky factor of the dampened ``H⁻¹``, the factor GPTQ's updates read rows of."""
    diagonal = torch.arange(hessian.shape[0], device=hessian.device)
    damped = hessian.clone()
    damped[diagonal, diagonal] += dampening * damped.diagonal().mean()
    for attempt in range(5):
        factor, info = torch.linalg.cholesky_ex(damped)
        if info == 0:
            return torch.linalg.cholesky(torch.cholesky_inverse(factor), upper=True)
        # Not positive definite in float32 (few, collinear input rows): dampen more, as llm-compressor's retry does.
        damped[diagonal, diagonal] += dampening * 10**attempt * hessian.diagonal().mean()
    raise ValueError("the input Hessian is not positive definite even dampened: calibrate on more input rows")


@torch.no_grad()
def gptq_quantize(
    weight: Tensor,
    hessian: Tensor,
    spec: AnySpec,
    clip: Tensor | None = None,
    *,
    dampening: float = DAMPENING,
    layer: str = "<weight>",
) -> QuantizedWeight:
    """Quantize ``weight`` (``[rows, cols]``) at ``spec`` by GPTQ, given the Hessian of its inputs (`InputHessian`).

    Args:
        hessian: ``[cols, cols]``. Columns whose inputs were always zero (zero diagonal) get code 0.
        spec: an integer `QuantSpec`, or a `GGMLSpec` (ggml's block scales, see the module docstring).
        clip: ``spec.scale_shape(weight.shape)`` clipping ratios applied to each scale (as `fake_quantize` does),
            or None for 1. Not for a `GGMLSpec` (ggml's scales are its own).

    Returns:
        A `QuantizedWeight` on ``spec``'s grid: the same layout, scale rule and fp16-exact scales as
        `quantize_weight`'s (ggml's blocks for a `GGMLSpec`), so ``fix_codes`` can hold it and every export can pack
        it.
    """
    ggml = isinstance(spec, GGMLSpec)
    if not ggml and not isinstance(spec, QuantSpec):
        raise TypeError(f"{layer}: GPTQ quantizes on an integer grid (QuantSpec) or a ggml type (GGMLSpec), not {spec}")
    if ggml and clip is not None:
        raise ValueError(f"{layer}: {spec.type}'s scales are ggml's own: GPTQ takes no clipping ratios for it")
    spec.check_shape(weight.shape, layer)
    rows, cols = weight.shape
    if tuple(hessian.shape) != (cols, cols):
        raise ValueError(f"{layer}: the Hessian must be [{cols}, {cols}], got {list(hessian.shape)}")
    group_size = cols // spec.num_groups(weight.shape)
    # Columns whose scales are set together: a group, or a ggml block (q3_K: a super-block of 16 sub-block scales).
    scale_block = spec.block_size if ggml else group_size
    per_group = ggml or spec.granularity == "per_group"
    work = weight.detach().float().clone()
    hessian = hessian.to(work.device, torch.float32)
    dead = hessian.diagonal() == 0
    if dead.any():
        hessian = hessian.clone()
        hessian[dead, dead] = 1.0
        work[:, dead] = 0.0
    inverse = _inverse_cholesky(hessian, dampening)
    if per_group:
        scales = torch.empty(rows, cols // group_size, dtype=torch.float32, device=work.device)
    else:  # one scale per row or per tensor, from the weight before any update (the reference implementation's)
        _, scale = _grouped_scale(work, spec, clip, layer)
        scales = scale.reshape(scale.shape[0], 1).expand(rows, 1).contiguous()
    super_blocks: list[GGMLCodes] = []  # the k-quants' blocks, in column order: their super- and sub-block values
    offsets = torch.zeros_like(scales) if ggml and spec.type == "q2_K" else None  # q2_K's dmin * m per sub-block
    codes = torch.empty(rows, cols, dtype=torch.int8, device=work.device)
    block = scale_block * math.ceil(BLOCK_COLUMNS / scale_block) if per_group else BLOCK_COLUMNS
    if not ggml:
        group_spec = QuantSpec(spec.bits, "per_channel", learnable_clipping=spec.learnable_clipping)
    for start in range(0, cols, block):
        end = min(start + block, cols)
        columns = work[:, start:end].clone()
        errors = torch.zeros_like(columns)
        block_inverse = inverse[start:end, start:end]
        for i in range(end - start):
            column = start + i
            group = column // group_size
            if ggml and column % scale_block == 0:
                blocks = ggml_quantize(columns[:, i : i + scale_block], spec.type)
                scales[:, group : group + scale_block // group_size] = blocks.scales
                if offsets is not None:
                    offsets[:, group : group + scale_block // group_size] = group_offsets(blocks)
                if blocks.super_scales is not None:
                    super_blocks.append(blocks)
            elif per_group and not ggml and column % group_size == 0:
                group_clip = None if clip is None else clip[:, group : group + 1]
                _, scale = _grouped_scale(columns[:, i : i + group_size], group_spec, group_clip, layer)
                scales[:, group] = scale.reshape(rows)
            scale = scales[:, group if per_group else 0]
            offset = None if offsets is None else offsets[:, group]
            if ggml:
                code = round_to_scales(columns[:, i], scale, spec.type, offset)
            else:
                unrounded, _ = _unrounded_codes(columns[:, i].reshape(rows, 1, 1), scale.reshape(rows, 1, 1), spec)
                code = unrounded.round_().reshape(rows)
            codes[:, column] = code.to(torch.int8)
            value = code * scale if offset is None else code * scale - offset
            error = (columns[:, i] - value) / block_inverse[i, i]
            columns[:, i:] -= error[:, None] * block_inverse[i, i:][None, :]
            errors[:, i] = error
        work[:, end:] -= errors @ inverse[start:end, end:]
    if ggml:

        def joined(field: str) -> Tensor | None:
            parts = [getattr(blocks, field) for blocks in super_blocks]
            return torch.cat(parts, dim=1) if parts and parts[0] is not None else None

        return QuantizedWeight(
            codes=codes,
            scales=scales,
            bits=spec.bits,
            group_size=group_size,
            granularity="per_group",
            dtype=weight.dtype,
            ggml_type=spec.type,
            super_scales=joined("super_scales"),
            sub_scales=joined("sub_scales"),
            super_mins=joined("super_mins"),
            sub_mins=joined("sub_mins"),
        )
    return QuantizedWeight(
        codes=codes,
        scales=scales if spec.granularity != "per_tensor" else scales[:1],
        bits=spec.bits,
        group_size=group_size,
        granularity=spec.granularity,
        dtype=weight.dtype,
    )
