"""ggml's block formats: the codes and scales of ``q8_0``, ``q5_0``, ``q4_0``, ``q3_K`` and ``q2_K`` as ggml's
reference quantizers compute them (ggml-quants.c, ``quantize_row_*_ref``: what ``ggml_quantize_chunk`` and
whisper.cpp's ``quantize`` tool run without an importance matrix), the values ggml dequantizes them to, and their
bytes.

Why written here rather than called from ggml: training needs the quantizer inside the forward pass, in torch and on the
model's device (ggml's library quantizes float32 arrays on the CPU), and "fake == packed" needs ggml's exact float32
arithmetic, which this module reproduces step by step: ``q8_0`` rounds ``x * (1/d)`` half away from zero
(``roundf``) with ``d = amax / 127``; ``q4_0``/``q5_0`` truncate ``x * (1/d) + 8.5`` (``+ 16.5``) with
``d = max / -8`` (``/ -16``), ``max`` the signed weight of largest magnitude; ``q3_K`` runs ``make_q3_quants``'
weighted least-squares search per 16-weight sub-block (five passes of coordinate descent over the codes, sums
accumulated in ggml's order), quantizes the 16 sub-block scales to 6 bits against an fp16 super-block scale, then
re-rounds every weight to the quantized scale with ``nearest_int`` (round half to even through ggml's float trick,
emulated bit for bit); ``q2_K`` runs ``make_qkx2_quants``' search (16 trial scales, each fitted by weighted least
squares with a minimum) per 16-weight sub-block, quantizes scales and minimums to 4 bits against two fp16
super-block values, and re-rounds every weight to ``nearest_int((x + min) / scale)`` in [0, 3]. Scales are rounded
to fp16 as the file stores them, so ``codes * scales`` (minus q2_K's minimums) is what ggml's ``dequantize_row_*``
returns (tested against pywhispercpp's libggml-base, byte for byte).

`ggml_quantize` gives the `GGMLCodes` of a weight (codes; ``scales`` the multiplier of each group as ggml applies it:
``d``, or the k-quants' ``d * sc`` per sub-block; q2_K's minimums ``dmin * m``; the mask of weights the clamp left
alone, where the straight-through gradient passes), which ``quant.quantize_weight`` turns into a `QuantizedWeight`;
`pack` writes a weight's blocks; `unpack` dequantizes blocks read back from a file.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .spec import GGML_BLOCKS

_GROUP_MAX_EPS = 1e-15  # make_q3_quants: a sub-block below this magnitude is all zeros
_MAGIC = 12582912.0  # 1.5 * 2**23: nearest_int's float trick
_Q3_NMAX = 4  # q3_K codes l in [-4, 3]
_K_SUB = 16  # weights per sub-block of the k-quants (q3_K, q2_K)
_Q3_PASSES = 5  # make_q3_quants' coordinate-descent passes
_Q2_NMAX = 3  # q2_K codes l in [0, 3]
_Q2_LEVELS = 15.0  # q2_K's 4-bit sub-block scales and minimums: q4scale
# make_qkx2_quants(16, 3, x, |x|, L, &min, Laux, -0.5f, 0.1f, 15, true): trial scales (nmax - 0.5 + 0.1 * is) / range
_Q2_TRIALS = [np.float32(-0.5) + np.float32(0.1) * np.float32(step) + np.float32(_Q2_NMAX) for step in range(16)]


def _nearest_int(values: Tensor) -> Tensor:
    """ggml's ``nearest_int``: add 1.5 * 2**23 in float32 and read the low mantissa bits (round half to even, and
    ggml's own answer beyond its ±4194303 range)."""
    shifted = (values.float() + _MAGIC).contiguous().view(torch.int32)
    return (shifted & 0x007FFFFF) - 0x00400000


def _fp16(values: Tensor) -> Tensor:
    """float32 → fp16 (round to nearest even, as ``GGML_FP32_TO_FP16``) → float32."""
    return values.half().float()


def _signed_absmax(blocks: Tensor) -> Tensor:
    """Per row of ``blocks`` the value of largest magnitude with its sign, the first on ties, +0 for zeros (ggml's
    loops start from ``max = 0`` and keep the first strictly larger magnitude)."""
    largest = blocks.gather(-1, blocks.abs().argmax(dim=-1, keepdim=True)).squeeze(-1)
    return torch.where(largest == 0, torch.zeros_like(largest), largest)


def _divide(numerator: float, values: Tensor) -> Tensor:
    """float32 ``numerator / values``, correctly rounded as C divides. Why not ``numerator / values``: torch computes a
    scalar over a tensor as ``values.reciprocal() * numerator``, two roundings (1 ulp off for ~30% of values unless
    the numerator is a power of 2), which moved q2_K's scales."""
    return torch.tensor(numerator, dtype=values.dtype) / values


def _inverse(scale: Tensor) -> Tensor:
    """``d ? 1.0f/d : 0.0f``."""
    return torch.where(scale != 0, 1.0 / scale, torch.zeros_like(scale))


def round_to_scales(values: Tensor, scales: Tensor, ggml_type: str, offsets: Tensor | None = None) -> Tensor:
    """Codes (float) of ``values`` on given ``scales`` (and q2_K's ``offsets``, broadcast against them), rounded and
    clamped as ggml's reference quantizer of ``ggml_type`` rounds a weight once its block's scale is known: q8_0
    ``x * (1/d)`` half away from zero, q4_0/q5_0 ``trunc(x * (1/d) + half + 0.5)``, q3_K ``nearest_int(x / (d * sc))``,
    q2_K ``nearest_int((x + dmin * m) / (d * sc))`` in [0, 3] (unsigned: its values are ``code * scale - offset``); a
    zero scale gives code 0. Also what GPTQ rounds each column with (`quant.gptq`), whose error feedback moves weights
    past their block's extreme: hence the clamp at both ends."""
    if ggml_type == "q2_K":
        if offsets is None:
            raise ValueError("q2_K rounds on its sub-blocks' scales and minimums: pass offsets (dmin * m)")
        ratio = (values + offsets) / torch.where(scales != 0, scales, torch.ones_like(scales))
        codes = _nearest_int(ratio).clamp(0, _Q2_NMAX).float()
        return torch.where(scales != 0, codes, torch.zeros_like(codes))
    if ggml_type == "q8_0":
        scaled = (values * _inverse(scales)).double()  # roundf of the float32 product, exact in float64
        return (torch.sign(scaled) * torch.floor(scaled.abs() + 0.5)).clamp(-127, 127).float()
    if ggml_type == "q3_K":
        ratio = values / torch.where(scales != 0, scales, torch.ones_like(scales))
        codes = _nearest_int(ratio).clamp(-_Q3_NMAX, _Q3_NMAX - 1).float()
        return torch.where(scales != 0, codes, torch.zeros_like(codes))
    half = 1 << (GGML_BLOCKS[ggml_type][2] - 1)
    shifted = values * _inverse(scales) + (half + 0.5)
    return torch.trunc(shifted).clamp(0, 2 * half - 1) - half


def _q8_0(blocks: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    scale = blocks.abs().amax(dim=-1) / 127
    return round_to_scales(blocks, scale[:, None], "q8_0"), scale, torch.ones_like(blocks, dtype=torch.bool)


def _offset(blocks: Tensor, ggml_type: str) -> tuple[Tensor, Tensor, Tensor]:
    """q4_0 / q5_0: ``d = max / -2**(bits-1)``, codes ``min(2**bits - 1, (int8)(x/d + 2**(bits-1) + 0.5))``."""
    half = 1 << (GGML_BLOCKS[ggml_type][2] - 1)
    scale = _signed_absmax(blocks) / -half
    inside = blocks * _inverse(scale)[:, None] + (half + 0.5) < 2 * half  # ggml's min(15, ...) left it alone
    return round_to_scales(blocks, scale[:, None], ggml_type), scale, inside


def _ordered_sum(terms: Tensor) -> Tensor:
    """The float32 sum over the first dimension of ``terms``, added in order as ggml's loops add."""
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total


def _q3_pass(x: Tensor, weights: Tensor, weighted: Tensor, codes: Tensor, sumlx: Tensor, suml2: Tensor):
    """One of ``make_q3_quants``' coordinate-descent passes over position-major sub-blocks (``[16, n]``; ``codes``
    updated in place): the new ``sumlx`` and ``suml2``, and which sub-blocks the pass changed."""
    changed = torch.zeros_like(sumlx, dtype=torch.bool)
    for i in range(_K_SUB):
        w, xi, li = weights[i], x[i], codes[i]
        slx = sumlx - weighted[i] * li
        sl2 = suml2 - w * li * li
        new = _nearest_int(xi * sl2 / slx).clamp(-_Q3_NMAX, _Q3_NMAX - 1).float()
        new_slx = slx + weighted[i] * new
        new_sl2 = sl2 + w * new * new
        accept = (slx > 0) & (new != li) & (new_sl2 > 0) & (new_slx * new_slx * suml2 > sumlx * sumlx * new_sl2)
        codes[i] = torch.where(accept, new, li)
        sumlx = torch.where(accept, new_slx, sumlx)
        suml2 = torch.where(accept, new_sl2, suml2)
        changed |= accept
    return sumlx, suml2, changed


def _q3_sub_blocks(x: Tensor) -> tuple[Tensor, Tensor]:
    """``make_q3_quants(16, 4, x, L, true)`` on every row of ``x`` ``[n, 16]``: codes ``L`` (in [0, 7], 0 for an
    all-zero sub-block) and the least-squares scale.

    Why not row by row: the search runs position-major (``[16, n]``, each coordinate step reads contiguous memory), and
    a pass only visits the sub-blocks the previous pass changed (one that changes nothing would leave the state as it
    was; ggml stops there): the same bits ~4x faster, which training on q3_K pays every forward."""
    largest = _signed_absmax(x)
    zero = x.abs().amax(dim=-1) < _GROUP_MAX_EPS
    iscale = -float(_Q3_NMAX) / torch.where(zero, torch.ones_like(largest), largest)
    x = x.t().contiguous()
    codes = _nearest_int(iscale * x).clamp(-_Q3_NMAX, _Q3_NMAX - 1).float()
    weights = x * x
    weighted = weights * x  # w * x[i] with w = x[i]^2, evaluated left to right as in C
    sumlx = _ordered_sum(weighted * codes)
    suml2 = _ordered_sum(weights * codes * codes)
    sumlx, suml2, changed = _q3_pass(x, weights, weighted, codes, sumlx, suml2)
    active = changed.nonzero().squeeze(1)
    for _ in range(_Q3_PASSES - 1):
        if not len(active):
            break
        subset = codes[:, active]
        sums = _q3_pass(x[:, active], weights[:, active], weighted[:, active], subset, sumlx[active], suml2[active])
        codes[:, active], sumlx[active], suml2[active] = subset, sums[0], sums[1]
        active = active[sums[2]]
    scale = torch.where(suml2 > 0, sumlx / suml2, torch.zeros_like(sumlx))
    codes = torch.where(zero[:, None], torch.zeros_like(codes.t()), codes.t() + _Q3_NMAX)
    return codes, torch.where(zero, torch.zeros_like(scale), scale)


def _q3_k(weight: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``quantize_row_q3_K_ref`` on ``weight`` ``[rows, cols]``: signed codes ``[rows, cols]``, sub-block multipliers
    ``d * sc`` ``[rows, cols/16]``, fp16 super-block scales ``d`` ``[rows, cols/256]``, 6-bit ``sc`` in [-32, 31]
    (int8 ``[rows, cols/16]``) and the unclamped mask."""
    rows, cols = weight.shape
    x = weight.reshape(-1, _K_SUB)
    codes, sub_scale = _q3_sub_blocks(x)
    per_super = sub_scale.reshape(-1, 16)
    max_scale = _signed_absmax(per_super)
    has_scale = max_scale != 0
    iscale = -32.0 / torch.where(has_scale, max_scale, torch.ones_like(max_scale))
    levels = _nearest_int(iscale[:, None] * per_super).clamp(-32, 31)
    # max_scale == 0: ggml leaves the scale bytes at 0 (sc = -32) and stores d = 0.
    levels = torch.where(has_scale[:, None], levels, torch.full_like(levels, -32))
    super_scale = torch.where(has_scale, _fp16(1.0 / iscale), torch.zeros_like(iscale))
    multiplier = (super_scale[:, None] * levels.float()).reshape(-1)
    ratio = x / multiplier[:, None]
    requantized = round_to_scales(x, multiplier[:, None], "q3_K") + _Q3_NMAX
    active = (multiplier != 0)[:, None]
    codes = torch.where(active, requantized, codes) - _Q3_NMAX
    inside = ~active | ((ratio >= -_Q3_NMAX - 0.5) & (ratio <= _Q3_NMAX - 0.5))
    return (
        codes.reshape(rows, cols),
        multiplier.reshape(rows, cols // _K_SUB),
        super_scale.reshape(rows, cols // 256),
        levels.to(torch.int8).reshape(rows, cols // _K_SUB),
        inside.reshape(rows, cols),
    )


def _q2_sub_blocks(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``make_qkx2_quants(16, 3, x, |x|, L, &min, Laux, -0.5f, 0.1f, 15, true)`` on every row of ``x`` ``[n, 16]``:
    codes ``L`` in [0, 3], the scale and the minimum (``-min``, >= 0) of each row. Position-major (``[16, n]``) as in
    `_q3_sub_blocks`: every trial scale is one pass of tensor operations over all sub-blocks."""
    x = x.t().contiguous()
    weights = x.abs()
    low = x.amin(dim=0).clamp(max=0.0)  # ggml: if (min > 0) min = 0
    high = x.amax(dim=0)
    flat = high == low
    weight_sum = _ordered_sum(weights)
    weighted_x = _ordered_sum(weights * x)

    def span(minimum: Tensor) -> Tensor:  # max - min (1 where the sub-block is flat: ggml returns before dividing)
        return torch.where(flat, torch.ones_like(high), high - minimum)

    def codes_at(inverse_scale: Tensor, minimum: Tensor) -> Tensor:
        return _nearest_int(inverse_scale * (x - minimum)).clamp(0, _Q2_NMAX).float()

    def error(weights: Tensor, x: Tensor, scale: Tensor, minimum: Tensor, codes: Tensor) -> Tensor:
        return _ordered_sum(weights * (scale * codes + minimum - x).abs())

    minimum = low.clone()
    inverse = _divide(_Q2_NMAX, span(minimum))
    scale = 1.0 / inverse
    codes = codes_at(inverse, minimum)
    best = error(weights, x, scale, minimum, codes)
    previous = torch.full_like(codes, -1.0)
    for trial in _Q2_TRIALS:
        # ggml's loop reads the minimum of the best trial so far, in the trial scale and in the rounding
        trial_codes = codes_at(_divide(trial, span(minimum)), minimum)
        # A trial's fit depends on its codes alone, and the codes of the trial before were not better than the best:
        # only the sub-blocks whose codes changed can improve (most do not: ~3x less work, the same bits).
        moved = (trial_codes != previous).any(dim=0).nonzero().squeeze(1)
        previous = trial_codes
        tried, xs, ws = trial_codes[:, moved], x[:, moved], weights[:, moved]
        weighted = ws * tried
        sum_l, sum_l2, sum_xl = (_ordered_sum(t) for t in (weighted, weighted * tried, weighted * xs))
        weight_sum_m, weighted_x_m = weight_sum[moved], weighted_x[moved]
        determinant = weight_sum_m * sum_l2 - sum_l * sum_l
        solvable = determinant > 0
        safe = torch.where(solvable, determinant, torch.ones_like(determinant))
        trial_scale = (weight_sum_m * sum_xl - weighted_x_m * sum_l) / safe
        trial_min = (sum_l2 * weighted_x_m - sum_l * sum_xl) / safe
        positive = trial_min > 0  # ggml: the minimum is clamped to 0 and the scale refitted without it
        trial_min = torch.where(positive, torch.zeros_like(trial_min), trial_min)
        trial_scale = torch.where(positive, sum_xl / sum_l2, trial_scale)
        trial_error = error(ws, xs, trial_scale, trial_min, tried)
        better = solvable & (trial_error < best[moved])
        improved = moved[better]
        codes[:, improved] = tried[:, better]
        best[improved] = trial_error[better]
        scale[improved] = trial_scale[better]
        minimum[improved] = trial_min[better]
    codes = torch.where(flat, torch.zeros_like(codes), codes)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    minimum = torch.where(flat, low, minimum)
    return codes.t(), scale, -minimum


def _q2_k(weight: Tensor) -> tuple[Tensor, ...]:
    """``quantize_row_q2_K_ref`` on ``weight`` ``[rows, cols]``: codes in [0, 3] ``[rows, cols]``, sub-block
    multipliers ``d * sc`` ``[rows, cols/16]``, fp16 ``d`` and ``dmin`` ``[rows, cols/256]``, 4-bit ``sc`` and ``m``
    (int8 ``[rows, cols/16]``) and the unclamped mask (the offsets ``dmin * m``: `group_offsets`)."""
    rows, cols = weight.shape
    x = weight.reshape(-1, _K_SUB)
    codes, sub_scale, sub_min = _q2_sub_blocks(x)
    sub_scale, sub_min = sub_scale.reshape(-1, 16), sub_min.reshape(-1, 16)

    def four_bits(values: Tensor) -> tuple[Tensor, Tensor]:
        """ggml's ``nearest_int(15 / max * v)`` per sub-block (0 where max <= 0) and ``fp16(max / 15)``."""
        largest = values.amax(dim=1)
        used = largest > 0
        safe = torch.where(used, largest, torch.ones_like(largest))
        levels = _nearest_int(_divide(_Q2_LEVELS, safe)[:, None] * values)
        levels = torch.where(used[:, None], levels, torch.zeros_like(levels))
        # safe / 15 by a tensor: CUDA divides by a Python number as a multiplication by its reciprocal
        return levels, torch.where(used, _fp16(safe / torch.full_like(safe, _Q2_LEVELS)), torch.zeros_like(safe))

    scale_levels, super_scale = four_bits(sub_scale)
    min_levels, super_min = four_bits(sub_min)
    packed = (scale_levels & 0xFF) | ((min_levels << 4) & 0xFF)  # the scales byte, as ggml's uint8 stores it
    scale_levels, min_levels = packed & 0x0F, packed >> 4
    multiplier = (super_scale[:, None] * scale_levels.float()).reshape(-1)
    offset = (super_min[:, None] * min_levels.float()).reshape(-1)
    requantized = round_to_scales(x, multiplier[:, None], "q2_K", offset[:, None])
    active = (multiplier != 0)[:, None]
    codes = torch.where(active, requantized, codes)  # ggml keeps the search's codes where d * sc is 0
    ratio = (x + offset[:, None]) / torch.where(active, multiplier[:, None], torch.ones_like(x))
    inside = ~active | ((ratio >= -0.5) & (ratio <= _Q2_NMAX + 0.5))
    return (
        codes.reshape(rows, cols),
        multiplier.reshape(rows, cols // _K_SUB),
        super_scale.reshape(rows, cols // 256),
        scale_levels.to(torch.int8).reshape(rows, cols // _K_SUB),
        super_min.reshape(rows, cols // 256),
        min_levels.to(torch.int8).reshape(rows, cols // _K_SUB),
        inside.reshape(rows, cols),
    )


@dataclass
class GGMLCodes:
    """One weight ``[rows, cols]`` in a ggml type.

    Attributes:
        codes: int8 ``[rows, cols]``: signed for q8_0 [-127, 127], q4_0 [-8, 7], q5_0 [-16, 15], q3_K [-4, 3];
            q2_K's unsigned [0, 3].
        scales: float32 ``[rows, cols // group_size]``, what each group's codes are multiplied by.
        group_size: 32, or the k-quants' 16.
        inside: bool ``[rows, cols]``, the weights the clamp left alone.
        super_scales: the k-quants' fp16 ``d`` per 256 weights (float32 ``[rows, cols // 256]``).
        sub_scales: their sub-block scales (int8 ``[rows, cols // 16]``): q3_K's 6-bit ``sc`` in [-32, 31], q2_K's
            4-bit ``sc`` in [0, 15]; ``scales`` is ``super_scales * sub_scales`` in float32, as ggml multiplies them.
        super_mins, sub_mins: q2_K's fp16 ``dmin`` per 256 weights and 4-bit ``m`` per 16: each sub-block's values
            are ``codes * scales - dmin * m`` (`offsets`).
    """

    codes: Tensor
    scales: Tensor
    group_size: int
    inside: Tensor
    super_scales: Tensor | None = None
    sub_scales: Tensor | None = None
    super_mins: Tensor | None = None
    sub_mins: Tensor | None = None

    def dequantize(self) -> Tensor:
        """float32 ``codes * scales`` (minus q2_K's offsets): ggml's ``dequantize_row_*`` of these blocks."""
        return dequantize_groups(self)


def group_offsets(quantized) -> Tensor | None:
    """q2_K's ``dmin * m`` per sub-block (float32 ``[rows, cols // 16]``, as ggml multiplies them), else None; for
    `GGMLCodes` and ``QuantizedWeight`` alike."""
    if quantized.super_mins is None:
        return None
    per_sub_block = quantized.sub_mins.shape[1] // quantized.super_mins.shape[1]
    return quantized.super_mins.repeat_interleave(per_sub_block, dim=1) * quantized.sub_mins.float()


def dequantize_groups(quantized) -> Tensor:
    """float32 ``codes * scales - offsets`` of a `GGMLCodes` or a ``QuantizedWeight`` (one home for the rule)."""
    rows, cols = quantized.codes.shape
    groups = cols // quantized.group_size
    shape = (quantized.scales.shape[0], groups, 1)
    values = quantized.codes.float().reshape(rows, groups, quantized.group_size) * quantized.scales.reshape(shape)
    offsets = group_offsets(quantized)
    if offsets is not None:
        values = values - offsets.reshape(shape)
    return values.reshape(rows, cols)


@torch.no_grad()
def ggml_quantize(weight: Tensor, ggml_type: str) -> GGMLCodes:
    """``weight`` ``[rows, cols]`` (``cols`` a multiple of the block) quantized as ggml's ``ggml_type`` does it."""
    block = GGML_BLOCKS[ggml_type][0]
    rows, cols = weight.shape
    if cols % block:
        raise ValueError(f"{ggml_type} needs rows of a multiple of {block} weights, got {cols}")
    values = weight.detach().float()
    if ggml_type == "q3_K":
        codes, scales, super_scales, sub_scales, inside = _q3_k(values)
        return GGMLCodes(codes.to(torch.int8), scales.contiguous(), _K_SUB, inside, super_scales, sub_scales)
    if ggml_type == "q2_K":
        codes, scales, super_scales, sub_scales, super_mins, sub_mins, inside = _q2_k(values)
        return GGMLCodes(
            codes.to(torch.int8), scales.contiguous(), _K_SUB, inside, super_scales, sub_scales, super_mins, sub_mins
        )
    blocks = values.reshape(-1, block)
    codes, scales, inside = _q8_0(blocks) if ggml_type == "q8_0" else _offset(blocks, ggml_type)
    return GGMLCodes(
        codes.to(torch.int8).reshape(rows, cols),
        _fp16(scales).reshape(rows, cols // block),
        block,
        inside.reshape(rows, cols),
    )


class _StraightThrough(torch.autograd.Function):
    """The quantized values forward; the gradient of the weights inside the code range backward."""

    @staticmethod
    def forward(ctx, weight: Tensor, values: Tensor, inside: Tensor) -> Tensor:
        ctx.save_for_backward(inside)
        return values

    @staticmethod
    def backward(ctx, grad: Tensor):
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None


def ggml_fake_quantize(weight: Tensor, ggml_type: str) -> Tensor:
    """``weight`` quantized and dequantized as ggml does (same shape and dtype), with a straight-through gradient."""
    quantized = ggml_quantize(weight, ggml_type)
    return _StraightThrough.apply(weight, quantized.dequantize(), quantized.inside).to(weight.dtype)


# --- Bytes --------------------------------------------------------------------------------------------------------
def _record(ggml_type: str) -> np.dtype:
    return {
        "q8_0": np.dtype([("d", "<f2"), ("qs", "i1", 32)]),
        "q5_0": np.dtype([("d", "<f2"), ("qh", "<u4"), ("qs", "u1", 16)]),
        "q4_0": np.dtype([("d", "<f2"), ("qs", "u1", 16)]),
        "q3_K": np.dtype([("hmask", "u1", 32), ("qs", "u1", 64), ("scales", "u1", 12), ("d", "<f2")]),
        "q2_K": np.dtype([("scales", "u1", 16), ("qs", "u1", 64), ("d", "<f2"), ("dmin", "<f2")]),
    }[ggml_type]


def _two_bit_planes(codes: np.ndarray) -> np.ndarray:
    """The k-quants' 2-bit layout of codes in [0, 3] (``[n, 256]``): ``qs[32 h + l]`` holds ``L[128 h + 32 k + l]``
    in bits 2k, 2k + 1."""
    low = codes.astype(np.uint8).reshape(-1, 2, 4, 32)
    return (low << (2 * np.arange(4, dtype=np.uint8))[:, None]).sum(axis=2, dtype=np.uint8).reshape(-1, 64)


def _from_two_bit_planes(qs: np.ndarray) -> np.ndarray:
    """Codes ``[n, 256]`` in [0, 3] of `_two_bit_planes`' bytes."""
    return ((qs.reshape(-1, 2, 1, 32) >> (2 * np.arange(4, dtype=np.uint8))[:, None]) & 3).reshape(-1, 256)


def _nibbles(codes: np.ndarray) -> np.ndarray:
    """Element j of a 32-block's first half in the low nibble of byte j, element j + 16 in the high one."""
    return (codes[:, :16] & 0x0F) | ((codes[:, 16:] & 0x0F) << 4)


def pack(quantized, ggml_type: str) -> bytes:
    """The blocks of ``quantized`` (`GGMLCodes`, or a ``QuantizedWeight`` of the same fields) in ``ggml_type``, as
    ggml stores them row after row: for `ggml_quantize`'s codes, the bytes ``ggml_quantize_chunk`` writes."""
    block = GGML_BLOCKS[ggml_type][0]
    codes = quantized.codes.numpy().astype(np.int16).reshape(-1, block)
    out = np.zeros(len(codes), _record(ggml_type))
    if ggml_type == "q2_K":
        out["qs"] = _two_bit_planes(codes)
        levels = quantized.sub_scales.numpy().astype(np.uint8) | (quantized.sub_mins.numpy().astype(np.uint8) << 4)
        out["scales"] = levels.reshape(-1, 16)
        out["d"] = quantized.super_scales.numpy().reshape(-1).astype(np.float16)
        out["dmin"] = quantized.super_mins.numpy().reshape(-1).astype(np.float16)
        return out.tobytes()
    if ggml_type == "q3_K":
        offset = (codes + _Q3_NMAX).astype(np.uint8)  # L in [0, 7]
        high = (offset >> 2).reshape(-1, 8, 32)  # bit j // 32 of hmask[j % 32]
        out["hmask"] = (high << np.arange(8, dtype=np.uint8)[:, None]).sum(axis=1, dtype=np.uint8)
        out["qs"] = _two_bit_planes(offset & 3)
        levels = (quantized.sub_scales.numpy().astype(np.int16) + 32).astype(np.uint8).reshape(-1, 16)
        scales = np.zeros((len(codes), 12), np.uint8)
        scales[:, :8] = (levels[:, :8] & 0x0F) | ((levels[:, 8:] & 0x0F) << 4)
        tops = (levels >> 4).reshape(-1, 4, 4)  # scales[8 + j % 4] holds bits 4-5 of sc_j at 2 * (j // 4)
        scales[:, 8:] = (tops << (2 * np.arange(4, dtype=np.uint8))[:, None]).sum(axis=1, dtype=np.uint8)
        out["scales"] = scales
        out["d"] = quantized.super_scales.numpy().reshape(-1).astype(np.float16)
        return out.tobytes()
    out["d"] = quantized.scales.numpy().reshape(-1).astype(np.float16)
    if ggml_type == "q8_0":
        out["qs"] = codes
    else:
        half = 1 << (GGML_BLOCKS[ggml_type][2] - 1)
        offset = (codes + half).astype(np.uint32)
        out["qs"] = _nibbles(offset)
        if ggml_type == "q5_0":  # the fifth bit of element j goes to bit j of a little-endian uint32
            out["qh"] = ((offset >> 4) << np.arange(32, dtype=np.uint32)).sum(axis=1)
    return out.tobytes()


def unpack(data: bytes, ggml_type: str, shape: tuple[int, int]) -> np.ndarray:
    """float32 values ``[rows, cols]`` of ggml blocks as ``dequantize_row_*`` computes them (q8_0, q4_0, q3_K, q2_K)."""
    blocks = np.frombuffer(data, _record(ggml_type))
    d = blocks["d"].astype(np.float32)
    if ggml_type == "q8_0":
        values = blocks["qs"].astype(np.float32) * d[:, None]
    elif ggml_type == "q4_0":
        qs = blocks["qs"].astype(np.int16)
        codes = np.concatenate([qs & 0x0F, qs >> 4], axis=1) - 8
        values = codes.astype(np.float32) * d[:, None]
    elif ggml_type == "q3_K":
        high = (blocks["hmask"][:, None, :] >> np.arange(8, dtype=np.uint8)[:, None]) & 1  # [n, 8, 32]
        codes = _from_two_bit_planes(blocks["qs"]).astype(np.int16) + 4 * high.reshape(-1, 256) - 4
        scales = blocks["scales"].astype(np.int16)
        low_bits = np.concatenate([scales[:, :8] & 0x0F, scales[:, :8] >> 4], axis=1)
        top_bits = (scales[:, 8:][:, None, :] >> (2 * np.arange(4))[:, None]) & 3  # [n, 4 (j // 4), 4 (j % 4)]
        levels = (low_bits | (top_bits.reshape(-1, 16) << 4)) - 32
        multiplier = d[:, None] * levels.astype(np.float32)  # dl = d_all * (sc - 32), float32
        values = multiplier.repeat(_K_SUB, axis=1) * codes.astype(np.float32)
    elif ggml_type == "q2_K":
        levels = blocks["scales"]
        multiplier = d[:, None] * (levels & 0x0F).astype(np.float32)  # dl = d * (sc & 0xF), float32
        offset = blocks["dmin"].astype(np.float32)[:, None] * (levels >> 4).astype(np.float32)  # ml = min * (sc >> 4)
        codes = _from_two_bit_planes(blocks["qs"]).astype(np.float32)
        values = multiplier.repeat(_K_SUB, axis=1) * codes - offset.repeat(_K_SUB, axis=1)
    else:
        raise ValueError(f"unpacking {ggml_type} is not supported: q8_0, q4_0, q3_K and q2_K are")
    return values.reshape(shape)
