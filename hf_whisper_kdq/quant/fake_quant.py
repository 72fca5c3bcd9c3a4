"""Quantizer math: signed integer fake quantization with a straight-through estimator and LSQ-style
learnable clipping, and the real quantization (`quantize_weight`) that convert/export use.

The same two functions (`_grouped_scale`, `_unrounded_codes`) compute the scales and codes for both paths, so
``fake_quantize(w, spec, clip)`` and ``quantize_weight(w, spec, clip).dequantize()`` are bit-identical:
what was trained is exactly what gets exported.

Codes use the full signed range ``[-2**(b-1), 2**(b-1) - 1]`` (int2: four levels -2..1), the range the packed
format stores, with a *signed* scale (as llama.cpp's k-quants do): the group's largest-magnitude weight ``e``
maps to the code ``-2**(b-1)``, whatever its sign, so the extra negative code is used by both signs.
A `GGMLSpec` (ggml's block formats) takes ggml's own rule instead (`ggml_blocks`), with the same
straight-through gradient and the same guarantee: its `quantize_weight` dequantizes to its `fake_quantize`. For a
weight ``w`` of shape ``[rows, cols]`` viewed as ``[rows, G, cols // G]`` (G scales per row)::

    e     = the entry of largest |w| in each group    (detached: weights get a pure straight-through gradient)
    scale = -sign(e) * fp16_ceil(clip * |e| / 2**(b-1))     (clip in (0, 1], 1.0 when not learned)
    codes = round(clamp(w / scale, -2**(b-1), 2**(b-1) - 1))
    w_q   = codes * scale

The side opposite to ``e`` reaches ``(2**(b-1) - 1) * |scale|``; what lies beyond is clipped. Against the
restricted symmetric range ``[-(2**(b-1) - 1), 2**(b-1) - 1]`` this gives a step of ``|e| / 2**(b-1)`` instead
of ``|e| / (2**(b-1) - 1)``: 4 levels instead of 3 at int2 (benchmarks/README.md, "Quantization grid").

Gradients:
    d w_q / d w    = 1 where the clamp left ``w / scale`` alone, else 0 (STE; clamping first makes the clipped
                     elements exactly the ones with zero gradient)
    d w_q / d clip = (codes - w / scale) * d scale / d clip inside, codes * d scale / d clip outside (LSQ, Esser
                     et al. 2020), times LSQ's gradient scale 1 / sqrt(n_per_scale * 2**(b-1)) so that the
                     clip's update size does not grow with the number of weights it governs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .ggml_blocks import dequantize_groups, ggml_fake_quantize, ggml_quantize
from .spec import GGML_BLOCKS, SCALE_BYTES, AnySpec, GGMLSpec, QuantSpec, packed_row_bytes

# Floor of the clipping ratio: below it a group would collapse to a handful of codes around zero.
CLIP_MIN = 1e-2
_FP16_MAX = 65504.0
_FP16_TINY = 2.0**-24  # smallest positive (subnormal) fp16


class _ScaleToFP16(torch.autograd.Function):
    """Round scale magnitudes (> 0) *up* to the nearest fp16 value (identity backward).

    The export stores scales as fp16 (that is what the size budget counts). Doing the rounding here
    makes that cast lossless, so the exported model equals the trained one; rounding up rather than to
    nearest keeps ``clip * |e|`` inside the code range, so no extra element gets clipped.
    """

    @staticmethod
    def forward(ctx, scale: Tensor) -> Tensor:
        scale = scale.clamp(_FP16_TINY, _FP16_MAX)
        half = scale.to(torch.float16)
        up = torch.nextafter(half, torch.full_like(half, math.inf))
        return torch.where(half.to(scale.dtype) < scale, up, half).to(scale.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad


class _ClipRatio(torch.autograd.Function):
    """Clamp the learnable clipping ratio into ``[CLIP_MIN, 1]`` and apply LSQ's gradient scale.

    A plain clamp would freeze a ratio that an optimizer step pushed just past 1 (its gradient is 0
    there, in both directions). Instead the gradient passes whenever following it (``x -= lr * g``)
    moves the ratio back towards the valid range, and is blocked only when it would push further out.
    """

    @staticmethod
    def forward(ctx, clip: Tensor, grad_scale: float) -> Tensor:
        ctx.save_for_backward(clip)
        ctx.grad_scale = grad_scale
        return clip.clamp(CLIP_MIN, 1.0)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (clip,) = ctx.saved_tensors
        grad = grad * ctx.grad_scale
        outward = ((clip > 1.0) & (grad < 0)) | ((clip < CLIP_MIN) & (grad > 0))
        return grad.masked_fill(outward, 0.0), None


def _grouped_scale(weight: Tensor, spec: QuantSpec, clip: Tensor | None, layer: str) -> tuple[Tensor, Tensor]:
    """The shared front of fake and real quantization.

    Args:
        weight: ``[rows, cols]``, any float dtype (computed in float32).
        clip: ``spec.scale_shape(weight.shape)`` ratios, or None for ``clip = 1``.

    Returns:
        grouped: ``weight`` as float32 ``[rows, G, cols // G]`` (a view when it already is float32).
        scale: ``[rows, G, 1]`` (``[1, 1, 1]`` for per_tensor) float32, signed, fp16-representable values;
            differentiable (LSQ) with respect to ``clip``.
    """
    spec.check_shape(weight.shape, layer)
    rows, cols = weight.shape
    groups = spec.num_groups(weight.shape)
    grouped = weight.float().reshape(rows, groups, cols // groups)
    if spec.granularity == "per_tensor":
        low, high = torch.aminmax(grouped.detach())
        low, high = low.reshape(1, 1, 1), high.reshape(1, 1, 1)
        per_scale = grouped.numel()
    else:
        # One pass without a temporary |w|: this runs over the 26 M-entry embedding at every training step.
        low, high = torch.aminmax(grouped.detach(), dim=-1, keepdim=True)
        per_scale = cols // groups
    # The largest-magnitude entry maps to the code qmin (< 0): a positive one needs a negative scale.
    positive_extreme = high > -low
    magnitude = torch.where(positive_extreme, high, -low)
    if clip is not None:
        expected = spec.scale_shape(weight.shape)
        if tuple(clip.shape) != expected:
            raise ValueError(f"{layer}: clip must have shape {list(expected)} for {spec}, got {list(clip.shape)}")
        ratio = _ClipRatio.apply(clip.float(), 1.0 / math.sqrt(per_scale * -spec.qmin))
        magnitude = magnitude * ratio.reshape(magnitude.shape)
    scale = _ScaleToFP16.apply(magnitude / -spec.qmin)
    return grouped, torch.where(positive_extreme, -scale, scale)


def _unrounded_codes(grouped: Tensor, scale: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """``clamp(w / scale)`` (a new tensor, to be rounded in place) and the mask of the elements the clamp left
    alone: the one place the codes are computed, so that fake and real quantization cannot drift apart."""
    ratio = torch.div(grouped, scale)
    clamped = ratio.clamp(spec.qmin, spec.qmax)
    return clamped, clamped == ratio


class _FakeQuantize(torch.autograd.Function):
    """``round(clamp(w / scale)) * scale`` with the straight-through and LSQ gradients of the module docstring.

    One Function instead of autograd over div/clamp/round/mul: it keeps a bool mask instead of every
    intermediate and computes the scale gradient with two dot products per group, which matters over the token
    embedding, fake-quantized at every step (timings: benchmarks/README.md, "CPU step time, session 6").
    """

    @staticmethod
    def forward(ctx, grouped: Tensor, scale: Tensor, spec: QuantSpec) -> Tensor:
        codes, inside = _unrounded_codes(grouped, scale, spec)
        values = codes.round_().mul_(scale)
        ctx.save_for_backward(grouped, scale, inside, values)
        return values

    @staticmethod
    def backward(ctx, grad: Tensor):
        grouped, scale, inside, values = ctx.saved_tensors
        grad_weight = grad * inside
        grad_scale = None
        if ctx.needs_input_grad[1]:
            # d values / d scale = codes - inside * w / scale, summed over each group:
            # (sum(grad * values) - sum(grad_weight * w)) / scale, as codes = values / scale exactly.
            dots = torch.linalg.vecdot(grad, values, dim=-1) - torch.linalg.vecdot(grad_weight, grouped, dim=-1)
            grad_scale = dots.unsqueeze(-1) / scale
            if grad_scale.shape != scale.shape:  # per_tensor: one scale for every group
                grad_scale = grad_scale.sum().reshape(scale.shape)
        return grad_weight, grad_scale, None


def fake_quantize(weight: Tensor, spec: AnySpec, clip: Tensor | None = None, *, layer: str = "<weight>") -> Tensor:
    """Quantize-dequantize ``weight`` (``[rows, cols]``) → same shape and dtype, differentiable.

    Forward: ``dequant(quant(weight))``. Backward: identity to ``weight`` inside the code range and zero
    outside (see the module docstring); LSQ gradient to ``clip`` (shape
    ``spec.scale_shape(weight.shape)``, ratios in (0, 1]) when given (never for a `GGMLSpec`).
    """
    if isinstance(spec, GGMLSpec):
        spec.check_shape(weight.shape, layer)
        return ggml_fake_quantize(weight, spec.type)
    grouped, scale = _grouped_scale(weight, spec, clip, layer)
    return _FakeQuantize.apply(grouped, scale, spec).reshape(weight.shape).to(weight.dtype)


@dataclass
class QuantizedWeight:
    """Integer codes and scales of one weight: what an export step packs.

    Attributes:
        codes: int8 ``[rows, cols]``, values in ``[-2**(bits-1), 2**(bits-1) - 1]``.
        scales: float32 ``[rows, n_groups]`` (``[1, 1]`` for per_tensor), signed (see the module docstring);
            values are exactly representable in fp16, so storing them as fp16 loses nothing.
        bits: code width.
        group_size: consecutive columns of a row sharing one scale (``cols`` unless per_group).
        granularity: ``"per_tensor"``, ``"per_channel"`` or ``"per_group"``.
        dtype: dtype of the float weight it came from; `dequantize` returns it by default.
        ggml_type: the ggml block type of a `GGMLSpec` layer (its codes and scales are ggml's), else None.
        super_scales, sub_scales: the k-quants' (q3_K, q2_K) fp16 super-block scales and 6- or 4-bit sub-block scales
            (``scales`` is their float32 product, which fp16 cannot hold: the compressed-tensors export refuses them).
        super_mins, sub_mins: q2_K's fp16 super-block minimum and 4-bit sub-block minimums: its codes are unsigned
            ([0, 3]) and its values ``codes * scales - super_mins * sub_mins``.
    """

    codes: Tensor
    scales: Tensor
    bits: int
    group_size: int
    granularity: str
    dtype: torch.dtype = torch.float32
    ggml_type: str | None = None
    super_scales: Tensor | None = None
    sub_scales: Tensor | None = None
    super_mins: Tensor | None = None
    sub_mins: Tensor | None = None

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """``codes * scales`` (minus q2_K's offsets) → ``[rows, cols]`` in ``dtype`` (default: the original
        weight's)."""
        return dequantize_groups(self).to(dtype or self.dtype)

    @property
    def nbytes_packed(self) -> int:
        """Bytes of the packed codes (each row in whole 32-bit words) plus 2 bytes (fp16) per scale; a ggml type's
        blocks as ggml stores them."""
        if self.ggml_type is not None:
            block, block_bytes, _ = GGML_BLOCKS[self.ggml_type]
            return self.codes.numel() // block * block_bytes
        rows, cols = self.codes.shape
        return rows * packed_row_bytes(cols, self.bits) + self.scales.numel() * SCALE_BYTES


@torch.no_grad()
def quantize_weight(
    weight: Tensor, spec: AnySpec, clip: Tensor | None = None, *, layer: str = "<weight>"
) -> QuantizedWeight:
    """Real quantization of ``weight`` (``[rows, cols]``); ``.dequantize()`` equals `fake_quantize`."""
    if isinstance(spec, GGMLSpec):
        spec.check_shape(weight.shape, layer)
        blocks = ggml_quantize(weight, spec.type)
        return QuantizedWeight(
            codes=blocks.codes,
            scales=blocks.scales,
            bits=spec.bits,
            group_size=blocks.group_size,
            granularity="per_group",
            dtype=weight.dtype,
            ggml_type=spec.type,
            super_scales=blocks.super_scales,
            sub_scales=blocks.sub_scales,
            super_mins=blocks.super_mins,
            sub_mins=blocks.sub_mins,
        )
    grouped, scale = _grouped_scale(weight, spec, clip, layer)
    codes, _ = _unrounded_codes(grouped, scale, spec)
    rows, cols = weight.shape
    return QuantizedWeight(
        codes=codes.round_().to(torch.int8).reshape(rows, cols),
        scales=scale.reshape(scale.shape[0], scale.shape[1]).contiguous(),
        bits=spec.bits,
        group_size=cols // spec.num_groups(weight.shape),
        granularity=spec.granularity,
        dtype=weight.dtype,
    )


# Clipping ratios `search_clip_ratios` tries: 1.0 down to 0.5 in steps of 0.05.
CLIP_SEARCH_RATIOS: tuple[float, ...] = tuple(round(1.0 - 0.05 * i, 2) for i in range(11))


@torch.no_grad()
def search_clip_ratios(
    weight: Tensor,
    spec: QuantSpec,
    ratios: tuple[float, ...] = CLIP_SEARCH_RATIOS,
    *,
    layer: str = "<weight>",
    input_mean_square: Tensor | None = None,
) -> Tensor:
    """The clipping ratio of each scale of ``weight`` (``[rows, cols]``) that minimizes its squared quantization
    error over its group, among ``ratios``: where learnable clipping starts.

    Without ``input_mean_square`` the error is the weights' ``Σ_j (w_j - q(w_j))²``. With it (``[cols]``, the mean
    of ``x_j²`` over the layer's inputs) it is the expected output error ``Σ_j E[x_j²] (w_j - q(w_j))²`` (the
    diagonal of the inputs' second moment, as AWQ's clip search measures it on calibration activations): at 3 bits
    the weight error clips the few weights that meet large inputs, which costs more than it saves (benchmarks/
    README.md, "Guided bits against uniform bits").

    Returns:
        float32 ``spec.scale_shape(weight.shape)`` ratios (ties go to the larger ratio). Learned from 1.0 alone,
        the ratios barely move at a model's learning rate (benchmarks/README.md, "Clipping").
    """
    shape = spec.scale_shape(weight.shape)
    best_ratio = torch.ones(shape, dtype=torch.float32, device=weight.device)
    best_error = torch.full(shape, math.inf, dtype=torch.float32, device=weight.device)
    rows, cols = weight.shape
    importance = None
    if input_mean_square is not None:
        if tuple(input_mean_square.shape) != (cols,):
            raise ValueError(
                f"{layer}: input_mean_square must have shape [{cols}], got {list(input_mean_square.shape)}"
            )
        groups = spec.num_groups(weight.shape)
        importance = input_mean_square.float().to(weight.device).reshape(1, groups, cols // groups)
    for ratio in sorted(ratios, reverse=True):
        clip = torch.full(shape, float(ratio), dtype=torch.float32, device=weight.device)
        grouped, scale = _grouped_scale(weight, spec, clip, layer)
        codes, _ = _unrounded_codes(grouped, scale, spec)
        error = codes.round_().mul_(scale).sub_(grouped).pow_(2)
        error = (error if importance is None else error.mul_(importance)).sum(dim=-1)
        if spec.granularity == "per_tensor":
            error = error.sum().reshape(shape)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_ratio = torch.where(better, clip, best_ratio)
    return best_ratio
