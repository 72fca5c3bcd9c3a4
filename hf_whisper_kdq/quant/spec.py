"""What one layer's weight quantization looks like: `QuantSpec`, its string form and its storage cost.

A spec describes weight-only, symmetric, signed integer quantization of a 2-D weight ``[rows, cols]``
(``[out_features, in_features]`` for ``nn.Linear``, ``[num_embeddings, embedding_dim]`` for
``nn.Embedding``). Rows are always the "channel" axis: an embedding row is one token, so per-channel
scales for an embedding are per-token scales.

String form (``QuantSpec.parse`` / ``str(spec)``)::

    int8            8 bits, per_channel (the default granularity)
    int4-g32        4 bits, per_group, 32 columns per group
    int4-tensor     4 bits, one scale for the whole tensor
    int3-channel    3 bits, per_channel, spelled out
    int2-g64-clip   ... with a learnable clipping ratio per scale

`GGMLSpec` is the other kind: one of ggml's block formats (``q8_0``, ``q4_0``, ``q3_K``, ``q2_K``), whose scales and codes
follow ggml's own rule (`ggml_blocks`), so that a student trained with it is written to a whisper.cpp file exactly.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

ALLOWED_BITS: tuple[int, ...] = (2, 3, 4, 8)
GRANULARITIES: tuple[str, ...] = ("per_tensor", "per_channel", "per_group")

# Storage width of everything kept in float: scales, and layers left unquantized (counted, and stored, as fp16).
FLOAT_BITS = 16
SCALE_BYTES = 2

_PARSE_RE = re.compile(r"^int(?P<bits>\d+)(?P<rest>(?:-[a-z0-9_]+)*)$")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class QuantSpec:
    """Weight quantization of one layer.

    Args:
        bits: integer width, one of ``ALLOWED_BITS`` (2, 3, 4, 8).
        granularity: ``"per_tensor"`` (one scale), ``"per_channel"`` (one scale per row) or
            ``"per_group"`` (one scale per ``group_size`` consecutive columns of a row).
        group_size: columns per group; required for ``per_group``, must be ``None`` otherwise. Whether
            it divides a layer's input width is checked when the spec meets the layer
            (`check_shape`), since the spec itself does not know the layer.
        symmetric: must be True: a zero point of 0. Codes are signed integers in the full range
            ``[-2**(bits-1), 2**(bits-1) - 1]`` (int4: [-8, 7], int2: {-2, -1, 0, 1}, four levels) with a signed
            scale that maps each group's largest-magnitude weight to ``-2**(bits-1)`` (`fake_quant`), so all
            ``2**bits`` codes the packed format stores are used.
        learnable_clipping: give the layer a learnable clipping ratio per scale (LSQ/PACT style)
            that shrinks the quantization range below ``max|w|``.
    """

    bits: int
    granularity: str = "per_channel"
    group_size: int | None = None
    symmetric: bool = True
    learnable_clipping: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or self.bits not in ALLOWED_BITS:
            raise ValueError(f"QuantSpec.bits must be one of {list(ALLOWED_BITS)}, got {self.bits!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"QuantSpec.granularity must be one of {list(GRANULARITIES)}, got {self.granularity!r}")
        if self.granularity == "per_group":
            if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1:
                raise ValueError(f"per_group quantization needs a positive integer group_size, got {self.group_size!r}")
        elif self.group_size is not None:
            raise ValueError(
                f"group_size={self.group_size} is only meaningful with granularity='per_group', "
                f"not {self.granularity!r}"
            )
        if self.symmetric is not True:
            # Asymmetric codes would need zero points in QuantizedWeight and in the export format.
            raise ValueError("only symmetric (zero point 0) quantization is supported: symmetric must be True")
        if not isinstance(self.learnable_clipping, bool):
            raise ValueError(f"learnable_clipping must be a bool, got {self.learnable_clipping!r}")

    # ------------------------------------------------------------------ integer range

    @property
    def qmax(self) -> int:
        """Largest code, ``2**(bits-1) - 1``."""
        return 2 ** (self.bits - 1) - 1

    @property
    def qmin(self) -> int:
        """Smallest code, ``-2**(bits-1)``: the code of each group's largest-magnitude weight."""
        return -(2 ** (self.bits - 1))

    # ------------------------------------------------------------------ geometry

    def check_shape(self, shape: Sequence[int], layer: str = "<weight>") -> None:
        """Raise ``ValueError`` naming ``layer`` when this spec cannot quantize a weight of ``shape``."""
        if len(shape) != 2:
            raise ValueError(f"{layer}: only 2-D weights can be quantized, got shape {tuple(shape)}")
        cols = int(shape[1])
        if self.granularity == "per_group" and cols % self.group_size != 0:
            raise ValueError(
                f"{layer}: group_size={self.group_size} does not divide its input width {cols}; "
                f"valid group sizes are {_divisors(cols)}. Fix: pick one of them (quant_group_size, or the 'g' part "
                "of a spec such as 'int4-g32'), or use per-channel scales (quant_granularity='per_channel')"
            )

    def num_groups(self, shape: Sequence[int]) -> int:
        """Scales per row: ``cols // group_size`` for per_group, else 1."""
        if self.granularity == "per_group":
            return int(shape[1]) // self.group_size
        return 1

    def scale_shape(self, shape: Sequence[int]) -> tuple[int, int]:
        """Shape of the scales (and of a learnable clip) for a weight of ``shape``.

        ``[1, 1]`` for per_tensor, ``[rows, 1]`` for per_channel, ``[rows, cols // group_size]``
        for per_group.
        """
        if self.granularity == "per_tensor":
            return (1, 1)
        return (int(shape[0]), self.num_groups(shape))

    # ------------------------------------------------------------------ text form

    @classmethod
    def parse(cls, text: str) -> QuantSpec:
        """``"int4-g32"`` → ``QuantSpec(4, "per_group", 32)``; see the module docstring for the grammar."""
        match = _PARSE_RE.match(text.strip().lower())
        if match is None:
            raise ValueError(
                f"cannot parse quantization spec {text!r}; expected e.g. 'int8', 'int4-g32', "
                f"'int4-tensor', 'int3-channel', 'int2-g64-clip'"
            )
        kwargs: dict = {"bits": int(match["bits"])}
        for token in filter(None, match["rest"].split("-")):
            if token in ("tensor", "per_tensor", "t"):
                kwargs["granularity"] = "per_tensor"
            elif token in ("channel", "per_channel", "c"):
                kwargs["granularity"] = "per_channel"
            elif re.fullmatch(r"g\d+", token):
                kwargs["granularity"], kwargs["group_size"] = "per_group", int(token[1:])
            elif token in ("clip", "lc"):
                kwargs["learnable_clipping"] = True
            else:
                raise ValueError(f"cannot parse quantization spec {text!r}: unknown part {token!r}")
        return cls(**kwargs)

    def __str__(self) -> str:
        if self.granularity == "per_group":
            text = f"int{self.bits}-g{self.group_size}"
        elif self.granularity == "per_tensor":
            text = f"int{self.bits}-tensor"
        else:
            text = f"int{self.bits}"
        return text + ("-clip" if self.learnable_clipping else "")


# ggml's block types: (weights per block, bytes per block, code bits). q5_0 is written by the whisper.cpp export only
# (post-training); the others are also trainable specs (`GGMLSpec`).
GGML_BLOCKS: dict[str, tuple[int, int, int]] = {
    "q8_0": (32, 34, 8),  # fp16 d + 32 int8 codes
    "q5_0": (32, 22, 5),  # fp16 d + 32 fifth bits + 16 bytes of nibbles
    "q4_0": (32, 18, 4),  # fp16 d + 16 bytes of nibbles
    "q3_K": (256, 110, 3),  # 32 bytes of high bits + 64 of 2-bit codes + 12 of 6-bit scales + fp16 d
    "q2_K": (256, 84, 2),  # 16 bytes of 4-bit scales and minimums + 64 of 2-bit codes + fp16 d and dmin
}
GGML_SPEC_TYPES: tuple[str, ...] = ("q2_K", "q3_K", "q4_0", "q8_0")
# ggml's sub-block of one scale: the k-quants' 16 weights share a 6-bit (q3_K) or 4-bit (q2_K) multiple of the
# super-block's fp16 d.
_GGML_SCALE_GROUP = {"q8_0": 32, "q5_0": 32, "q4_0": 32, "q3_K": 16, "q2_K": 16}


@dataclass(frozen=True)
class GGMLSpec:
    """Weight quantization in one of ggml's block formats (``q2_K``, ``q3_K``, ``q4_0``, ``q8_0``): what a whisper.cpp
    file of that type stores for every 2-D weight.

    Blocks run along a row (``[rows, cols]``, ``cols`` a multiple of the block): q8_0 and q4_0 blocks of 32 weights
    with one fp16 scale, q3_K super-blocks of 256 weights, 16 sub-blocks of 16 with 6-bit scales of an fp16
    super-block scale, q2_K the same super-blocks with 4-bit scales and 4-bit minimums (codes in [0, 3], the only
    asymmetric type). The scales follow ggml's reference quantizers (`ggml_blocks`), not a learned clip; as a
    `QuantSpec` it reads as per_group quantization with one scale per ``group_size`` columns.
    """

    type: str

    learnable_clipping = False
    granularity = "per_group"

    def __post_init__(self) -> None:
        if self.type not in GGML_SPEC_TYPES:
            raise ValueError(f"GGMLSpec.type must be one of {', '.join(GGML_SPEC_TYPES)}, got {self.type!r}")

    @property
    def bits(self) -> int:
        return GGML_BLOCKS[self.type][2]

    @property
    def symmetric(self) -> bool:
        return self.type != "q2_K"

    @property
    def block_size(self) -> int:
        return GGML_BLOCKS[self.type][0]

    @property
    def group_size(self) -> int:
        """Columns sharing one (effective) scale: 32, or the k-quants' 16-weight sub-block."""
        return _GGML_SCALE_GROUP[self.type]

    def check_shape(self, shape: Sequence[int], layer: str = "<weight>") -> None:
        if len(shape) != 2:
            raise ValueError(f"{layer}: only 2-D weights can be quantized, got shape {tuple(shape)}")
        if int(shape[1]) % self.block_size:
            raise ValueError(
                f"{layer}: {self.type} stores rows in blocks of {self.block_size} weights and its input width is "
                f"{int(shape[1])}; use {'q4_0 or q8_0 (blocks of 32)' if self.type.endswith('_K') else 'a model'} whose "
                f"widths are multiples of {self.block_size}"
            )

    def num_groups(self, shape: Sequence[int]) -> int:
        return int(shape[1]) // self.group_size

    def scale_shape(self, shape: Sequence[int]) -> tuple[int, int]:
        return (int(shape[0]), self.num_groups(shape))

    def __str__(self) -> str:
        return self.type


AnySpec = QuantSpec | GGMLSpec


def as_spec(value: AnySpec | str | None) -> AnySpec | None:
    """Accept a spec, its string form (``int4-g32``, ``q4_0``), or None (float); everything else is a TypeError."""
    if value is None or isinstance(value, (QuantSpec, GGMLSpec)):
        return value
    if isinstance(value, str):
        if value.strip().lower() in ("none", "float", "fp16", "bf16", "fp32"):
            return None
        ggml_type = {name.lower(): name for name in GGML_SPEC_TYPES}.get(value.strip().lower())
        return GGMLSpec(ggml_type) if ggml_type else QuantSpec.parse(value)
    raise TypeError(f"expected a QuantSpec, a GGMLSpec, their string form or None, got {type(value).__name__}")


def weight_bytes(shape: Sequence[int], spec: AnySpec | None, layer: str = "<weight>") -> int:
    """Stored size of one weight of ``shape`` under ``spec``: what the packed checkpoint holds for it.

    Quantized: each row's codes bit-packed into 32-bit words, ``rows * ceil(cols * bits / 32) * 4`` (the
    compressed-tensors ``pack-quantized`` layout, so a row whose codes do not fill its last word pays for
    the whole word), plus one fp16 scale per group. Float (``spec is None``): ``numel * 2`` (fp16/bf16).
    E.g. int4-g32 of ``[64, 64]`` is ``64*64/2 + 64*2*2 = 2304`` bytes. A `GGMLSpec` counts its blocks as ggml
    stores them (q4_0 of ``[64, 64]``: 128 blocks of 18 bytes).
    """
    if spec is None:
        return math.prod(int(s) for s in shape) * FLOAT_BITS // 8
    spec.check_shape(shape, layer)
    if isinstance(spec, GGMLSpec):
        return math.prod(int(s) for s in shape) // spec.block_size * GGML_BLOCKS[spec.type][1]
    rows, cols = (int(s) for s in shape)
    n_scales = math.prod(spec.scale_shape(shape))
    return rows * packed_row_bytes(cols, spec.bits) + n_scales * SCALE_BYTES


def packed_row_bytes(cols: int, bits: int) -> int:
    """Bytes of one row of ``cols`` codes of ``bits`` bits, packed into whole 32-bit words."""
    return math.ceil(cols * bits / 32) * 4
