"""Quantizer math: symmetric integer fake quantization with a straight-through estimator and LSQ-style
learnable clipping, and the real quantization (`quantize_weight`) that convert/export use.

One function, `_codes_and_scale`, computes the integer codes and the scales for both paths, so
``fake_quantize(w, spec, clip)`` and ``quantize_weight(w, spec, clip).dequantize()`` are bit-identical:
what was trained is exactly what gets exported.

For a weight ``w`` of shape ``[rows, cols]`` viewed as ``[rows, G, cols // G]`` (G scales per row)::

    amax  = max |w| over each group            (detached: weights get a pure straight-through gradient)
    scale = fp16_ceil(clip * amax / qmax)      (clip in (0, 1], 1.0 when not learned)
    codes = round(clamp(w / scale, -qmax, qmax))
    w_q   = codes * scale

Gradients:
    d w_q / d w    = 1 where |w| <= clip * amax, else 0 (STE; clamping first makes the clipped
                     elements exactly the ones with zero gradient)
    d w_q / d clip = (codes - w / scale) * amax / qmax inside, ±amax outside (LSQ, Esser et al. 2020),
                     times LSQ's gradient scale 1 / sqrt(n_per_scale * qmax) so that the clip's
                     update size does not grow with the number of weights it governs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .spec import SCALE_BYTES, QuantSpec

# Floor of the clipping ratio: below it a group would collapse to a handful of codes around zero.
CLIP_MIN = 1e-2
_FP16_MAX = 65504.0
_FP16_TINY = 2.0**-24  # smallest positive (subnormal) fp16


class _RoundSTE(torch.autograd.Function):
    """``torch.round`` forward, identity backward; a Function rather than ``x + (round(x) - x).detach()``
    so that the forward value is exactly ``round(x)``."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad


class _ScaleToFP16(torch.autograd.Function):
    """Round scales *up* to the nearest fp16 value (identity backward).

    The export stores scales as fp16 (that is what the size budget counts). Doing the rounding here
    makes that cast lossless, so the exported model equals the trained one; rounding up rather than to
    nearest keeps ``clip * amax`` inside the code range, so no extra element gets clipped.
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


def _codes_and_scale(
    weight: Tensor, spec: QuantSpec, clip: Optional[Tensor], layer: str
) -> tuple[Tensor, Tensor]:
    """The shared core of fake and real quantization.

    Args:
        weight: ``[rows, cols]``, any float dtype (computed in float32).
        clip: ``spec.scale_shape(weight.shape)`` ratios, or None for ``clip = 1``.

    Returns:
        codes: ``[rows, G, cols // G]`` float32 holding integers in ``[-qmax, qmax]``; differentiable
            (STE) with respect to ``weight`` and ``clip``.
        scale: ``[rows, G, 1]`` (``[1, 1, 1]`` for per_tensor) float32, fp16-representable values.
    """
    spec.check_shape(weight.shape, layer)
    rows, cols = weight.shape
    groups = spec.num_groups(weight.shape)
    w = weight.float().reshape(rows, groups, cols // groups)
    magnitude = w.detach().abs()
    if spec.granularity == "per_tensor":
        amax = magnitude.amax().reshape(1, 1, 1)
        per_scale = w.numel()
    else:
        amax = magnitude.amax(dim=-1, keepdim=True)
        per_scale = cols // groups
    if clip is not None:
        expected = spec.scale_shape(weight.shape)
        if tuple(clip.shape) != expected:
            raise ValueError(f"{layer}: clip must have shape {list(expected)} for {spec}, got {list(clip.shape)}")
        ratio = _ClipRatio.apply(clip.float(), 1.0 / math.sqrt(per_scale * spec.qmax))
        amax = amax * ratio.reshape(amax.shape)
    scale = _ScaleToFP16.apply(amax / spec.qmax)
    codes = _RoundSTE.apply(torch.clamp(w / scale, spec.qmin, spec.qmax))
    return codes, scale


def fake_quantize(weight: Tensor, spec: QuantSpec, clip: Optional[Tensor] = None, *, layer: str = "<weight>") -> Tensor:
    """Quantize-dequantize ``weight`` (``[rows, cols]``) → same shape and dtype, differentiable.

    Forward: ``dequant(quant(weight))``. Backward: identity to ``weight`` inside the clipping range
    (``|w| <= clip * max|w|`` of its group) and zero outside; LSQ gradient to ``clip`` (shape
    ``spec.scale_shape(weight.shape)``, ratios in (0, 1]) when given.
    """
    codes, scale = _codes_and_scale(weight, spec, clip, layer)
    return (codes * scale).reshape(weight.shape).to(weight.dtype)


@dataclass
class QuantizedWeight:
    """Integer codes and scales of one weight: what an export step packs.

    Attributes:
        codes: int8 ``[rows, cols]``, values in ``[-(2**(bits-1) - 1), 2**(bits-1) - 1]``.
        scales: float32 ``[rows, n_groups]`` (``[1, 1]`` for per_tensor); values are exactly
            representable in fp16, so storing them as fp16 loses nothing.
        bits: code width.
        group_size: consecutive columns of a row sharing one scale (``cols`` unless per_group).
        granularity: ``"per_tensor"``, ``"per_channel"`` or ``"per_group"``.
        dtype: dtype of the float weight it came from; `dequantize` returns it by default.
    """

    codes: Tensor
    scales: Tensor
    bits: int
    group_size: int
    granularity: str
    dtype: torch.dtype = torch.float32

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> Tensor:
        """``codes * scales`` → ``[rows, cols]`` in ``dtype`` (default: the original weight's)."""
        rows, cols = self.codes.shape
        groups = cols // self.group_size
        values = self.codes.float().reshape(rows, groups, self.group_size) * self.scales.reshape(
            self.scales.shape[0], groups, 1
        )
        return values.reshape(rows, cols).to(dtype or self.dtype)

    @property
    def nbytes_packed(self) -> int:
        """``ceil(numel * bits / 8)`` bytes of bit-packed codes plus 2 bytes (fp16) per scale."""
        return math.ceil(self.codes.numel() * self.bits / 8) + self.scales.numel() * SCALE_BYTES


@torch.no_grad()
def quantize_weight(
    weight: Tensor, spec: QuantSpec, clip: Optional[Tensor] = None, *, layer: str = "<weight>"
) -> QuantizedWeight:
    """Real quantization of ``weight`` (``[rows, cols]``); ``.dequantize()`` equals `fake_quantize`."""
    codes, scale = _codes_and_scale(weight, spec, clip, layer)
    rows, cols = weight.shape
    return QuantizedWeight(
        codes=codes.to(torch.int8).reshape(rows, cols),
        scales=scale.reshape(scale.shape[0], scale.shape[1]).contiguous(),
        bits=spec.bits,
        group_size=cols // spec.num_groups(weight.shape),
        granularity=spec.granularity,
        dtype=weight.dtype,
    )
