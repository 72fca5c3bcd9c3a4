"""Fake-quantized drop-ins for ``nn.Linear`` and ``nn.Embedding`` (the "prepare" half of QAT).

The wrappers are subclasses of the float modules and keep their parameters under the same names
(``weight``, ``bias``), so checkpoints, optimizers and Hugging Face weight tying keep working. The only
addition is ``weight_clip``, a learnable clipping ratio per scale, present only while the spec asks
for learnable clipping.

Wrappers that hold the same ``weight`` Parameter (Whisper's ``proj_out`` and
``model.decoder.embed_tokens``) share one `_QuantGroup`: one spec and one ``weight_clip`` Parameter,
so the tied weight is quantized identically wherever it is used, and changing the spec of either
module changes both.

A linear wrapper may also get a *weight offset* (`attach_weight_offset`): a low-rank adapter's update ``B @ A``
(:mod:`hf_whisper_kdq.peft_students`), added to the float weight before it is quantized, so that what is quantized
is the merged weight ``W + B @ A`` and merging the adapter changes nothing the quantizer sees.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .fake_quant import QuantizedWeight, fake_quantize, search_clip_ratios
from .spec import GGMLSpec, QuantSpec, as_spec

# Per-instance hook registries carried over when a module is swapped, so hooks registered on the
# float module (e.g. by a distillation callback) keep firing on its wrapper and back.
_HOOK_ATTRS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


def _adopt(new: nn.Module, old: nn.Module) -> nn.Module:
    """Give ``new`` the training flag and hook registries of ``old`` (the same dict objects, so
    existing hook handles still remove their hooks)."""
    if "forward" in old.__dict__:
        # Something (accelerate's dispatch hooks, a monkey patch) replaced forward on the instance;
        # carrying it over would call the float forward and silently skip quantization.
        raise TypeError(
            f"{type(old).__name__} has an instance-level forward override; prepare/convert the model "
            "before attaching dispatch hooks"
        )
    new.train(old.training)
    for attr in _HOOK_ATTRS:
        if attr in old.__dict__:
            new.__dict__[attr] = old.__dict__[attr]
    return new


class _QuantGroup:
    """Spec shared by the wrappers of one weight Parameter (one member unless the weight is tied)."""

    def __init__(self) -> None:
        self.spec: QuantSpec | None = None
        self.members: list[nn.Module] = []
        # (key, tensor) of the last fake-quantized weight computed without autograd: generation runs the
        # forward once per token, and re-quantizing a 26 M-entry embedding each time dominated decoding.
        self.cached: tuple[tuple, Tensor] | None = None
        # Codes computed by another quantizer (GPTQ) that the weight holds as they are (`fix_codes`).
        self.fixed: QuantizedWeight | None = None


def _codes_fit(quantized: QuantizedWeight, spec, shape) -> bool:
    """Whether ``quantized`` has the layout ``spec`` gives a weight of ``shape`` (an integer spec, or a ggml type)."""
    if isinstance(spec, GGMLSpec):
        return quantized.ggml_type == spec.type and tuple(quantized.codes.shape) == tuple(shape)
    if not isinstance(spec, QuantSpec) or quantized.ggml_type is not None:
        return False
    layout = (quantized.bits, quantized.granularity, tuple(quantized.codes.shape), tuple(quantized.scales.shape))
    group_size = int(shape[1]) // spec.num_groups(shape)
    expected = (spec.bits, spec.granularity, tuple(shape), spec.scale_shape(shape))
    return layout == expected and quantized.group_size == group_size


class _FakeQuantMixin:
    """Spec handling common to both wrappers; expects ``self.weight`` of shape ``[rows, cols]``."""

    weight: nn.Parameter
    weight_clip: nn.Parameter | None

    def _init_quant(self, name: str, group: _QuantGroup | None = None) -> None:
        # Plain attributes: nn.Module only registers Modules/Parameters/Tensors specially.
        self.quant_name = name
        self._quant_group = group if group is not None else _QuantGroup()
        self._quant_group.members.append(self)
        self._weight_offset = None
        if group is not None and group.members[0] is not self:
            self.register_parameter("weight_clip", group.members[0].weight_clip)
        else:
            self.register_parameter("weight_clip", None)

    @property
    def quant_spec(self) -> QuantSpec | None:
        """The current spec; None means the layer runs in float."""
        return self._quant_group.spec

    @property
    def tied_modules(self) -> list[nn.Module]:
        """All wrappers (this one included) that share this weight, hence its spec and clip."""
        return list(self._quant_group.members)

    def attach_weight_offset(self, offset) -> None:
        """Quantize ``weight + offset()[1]`` from now on (``offset=None`` detaches it).

        ``offset()`` returns None (no offset at the moment, e.g. the adapter is merged or disabled) or ``(key,
        tensor)``: a tensor of the weight's shape and a hashable key of the state it was computed from, which keys
        the no-grad cache of the quantized weight. A tied weight (the embedding) cannot take one: its members would
        disagree on the weight they quantize.
        """
        if offset is not None and self._quant_group.fixed is not None:
            raise TypeError(f"{self.quant_name} holds fixed codes (fix_codes): its weight takes no offset")
        if offset is not None and (not isinstance(self, nn.Linear) or len(self._quant_group.members) > 1):
            raise TypeError(
                f"{self.quant_name}: only a linear with a weight of its own takes an offset (an embedding looks its "
                "rows up without it, and the members of a tied weight would disagree on the weight they quantize)"
            )
        self._weight_offset = offset

    def _offset_weight(self) -> tuple[Tensor, object]:
        """``(effective weight, key of its offset's state or None)``."""
        offset = self._weight_offset() if self._weight_offset is not None else None
        return (self.weight, None) if offset is None else (self.weight + offset[1], offset[0])

    def effective_weight(self) -> Tensor:
        """The float weight the quantizer sees: ``weight``, plus the attached offset when there is one."""
        return self._offset_weight()[0]

    def set_quant_spec(self, spec: QuantSpec | str | None) -> None:
        """Switch bits/granularity at runtime, for this module and every module tied to its weight.

        ``None`` runs the layer in float and keeps a learned ``weight_clip`` for later. A spec with
        learnable clipping keeps the existing ``weight_clip`` Parameter when its shape still fits (same
        object: optimizers keep tracking it) and otherwise starts a new one at the ratios of least weight error
        (`search_clip_ratios`), so after a change of granularity the optimizer must be told about the new
        Parameter. A spec without learnable
        clipping removes ``weight_clip``.
        """
        spec = as_spec(spec)
        if spec is not None:
            spec.check_shape(self.weight.shape, self.quant_name)
        clip = self.weight_clip
        if spec is not None:
            if not spec.learnable_clipping:
                clip = None
            else:
                shape = spec.scale_shape(self.weight.shape)
                if clip is None or tuple(clip.shape) != shape:
                    clip = nn.Parameter(
                        search_clip_ratios(self.effective_weight().detach(), spec, layer=self.quant_name)
                    )
        fixed = self._quant_group.fixed
        if spec is not None and fixed is not None and not _codes_fit(fixed, spec, self.weight.shape):
            self._quant_group.fixed = None  # codes of another spec: the layer quantizes its weight from now on
        self._quant_group.spec = spec
        for member in self._quant_group.members:
            member.register_parameter("weight_clip", clip)

    @torch.no_grad()
    def fix_codes(self, quantized: QuantizedWeight) -> None:
        """Hold ``quantized`` (codes of this layer's spec from another quantizer, e.g. `gptq.gptq_quantize`) as
        the quantized weight: ``weight`` becomes its dequantized values, the forward uses them as they are (no
        re-rounding, which would move codes whose group lost its extreme to GPTQ's error feedback), and
        `convert_qat` returns these codes. For a frozen layer: training the weight would leave the codes behind
        (`fixed_codes` raises then). A spec of another layout releases them; ``None`` (float, e.g. while other
        layers are probed) keeps them for when the spec comes back."""
        spec = self.quant_spec
        if not _codes_fit(quantized, spec, self.weight.shape):
            raise ValueError(
                f"{self.quant_name}: codes of {quantized.bits} bits, {quantized.granularity}, groups of "
                f"{quantized.group_size}, {list(quantized.codes.shape)} do not have the layer's spec ({spec}, "
                f"{list(self.weight.shape)}): set the spec first (prepare_qat)"
            )
        values = quantized.dequantize(torch.float32)
        if self.weight.dtype != torch.float32 and not torch.equal(values.to(self.weight.dtype).float(), values):
            raise ValueError(
                f"{self.quant_name}: a {self.weight.dtype} weight cannot hold these codes exactly: use float32"
            )
        self.weight.copy_(values)
        self._quant_group.fixed = quantized
        self._quant_group.cached = None

    def fixed_codes(self) -> QuantizedWeight | None:
        """The codes `fix_codes` gave this layer, or None; RuntimeError if its weight changed since."""
        fixed = self._quant_group.fixed
        if fixed is not None and not torch.equal(
            self.weight.detach().float(), fixed.dequantize(torch.float32).to(self.weight.device)
        ):
            raise RuntimeError(
                f"{self.quant_name}: its weight changed after fix_codes, so it no longer holds its fixed codes: "
                "freeze the layer (freeze_encoder) or give it a spec again to quantize it by rounding"
            )
        return fixed

    def quantized_weight(self) -> Tensor:
        """The weight as the forward pass uses it: `effective_weight` fake-quantized, or as it is when spec is
        None."""
        spec = self.quant_spec
        weight, offset_key = self._offset_weight()
        if spec is None or self._quant_group.fixed is not None:
            return weight
        clip = self.weight_clip if spec.learnable_clipping else None
        group = self._quant_group
        if torch.is_grad_enabled():
            # A forward with autograd precedes every optimizer step, and fused optimizers (torch's default AdamW in
            # transformers 5: adamw_torch_fused) update parameters without bumping their version counters: the
            # cache must not outlive a training forward.
            group.cached = None
            return fake_quantize(weight, spec, clip, layer=self.quant_name)
        # Other in-place updates (load_state_dict, manual edits) bump the version counters.
        key = (
            offset_key,
            spec,
            self.weight.data_ptr(),
            self.weight._version,
            self.weight.dtype,
            None if clip is None else (clip.data_ptr(), clip._version),
        )
        if group.cached is None or group.cached[0] != key:
            group.cached = (key, fake_quantize(weight, spec, clip, layer=self.quant_name))
        return group.cached[1]

    def _quant_repr(self) -> str:
        spec = self.quant_spec
        if spec is None:
            return "quant=float"
        text = f"bits={spec.bits}, granularity={spec.granularity}"
        if spec.group_size is not None:
            text += f", group_size={spec.group_size}"
        if spec.learnable_clipping:
            text += ", learnable_clipping=True"
        return text


class FakeQuantLinear(_FakeQuantMixin, nn.Linear):
    """``nn.Linear`` whose weight ``[out_features, in_features]`` is fake-quantized in forward.

    Input ``[..., in_features]`` → output ``[..., out_features]``. Rows are output channels, so
    per_channel means one scale per output feature and per_group splits the input width.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        spec: QuantSpec | str | None = None,
        name: str = "<FakeQuantLinear>",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._init_quant(name)
        self.set_quant_spec(spec)

    @classmethod
    def from_float(cls, linear: nn.Linear, *, name: str, group: _QuantGroup | None = None) -> FakeQuantLinear:
        """Wrap ``linear`` sharing its Parameter objects (no copy); the spec is set by the caller."""
        new = cls.__new__(cls)
        nn.Linear.__init__(new, linear.in_features, linear.out_features, bias=False, device="meta")
        new.weight = linear.weight
        new.bias = linear.bias
        new._init_quant(name, group)
        return _adopt(new, linear)

    def to_float(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding this module's (unchanged) Parameters."""
        plain = nn.Linear(self.in_features, self.out_features, bias=False, device="meta")
        plain.weight = self.weight
        plain.bias = self.bias
        return _adopt(plain, self)

    def forward(self, input: Tensor) -> Tensor:
        return F.linear(input, self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._quant_repr()}"


class FakeQuantEmbedding(_FakeQuantMixin, nn.Embedding):
    """``nn.Embedding`` whose table ``[num_embeddings, embedding_dim]`` is fake-quantized in forward.

    Indices ``[...]`` → vectors ``[..., embedding_dim]``. Rows are tokens, so per_channel means one
    scale per token. ``max_norm`` (renormalizes the table in place) and ``sparse`` gradients are not
    supported: neither makes sense through a fake-quantized table.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        *,
        spec: QuantSpec | str | None = None,
        name: str = "<FakeQuantEmbedding>",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(num_embeddings, embedding_dim, padding_idx, device=device, dtype=dtype)
        self._init_quant(name)
        self.set_quant_spec(spec)

    @classmethod
    def from_float(cls, embedding: nn.Embedding, *, name: str, group: _QuantGroup | None = None) -> FakeQuantEmbedding:
        """Wrap ``embedding`` sharing its weight Parameter (no copy); the spec is set by the caller."""
        if embedding.max_norm is not None or embedding.sparse:
            raise TypeError(f"{name}: embeddings with max_norm or sparse=True cannot be fake-quantized")
        new = cls.__new__(cls)
        nn.Embedding.__init__(
            new,
            embedding.num_embeddings,
            embedding.embedding_dim,
            embedding.padding_idx,
            scale_grad_by_freq=embedding.scale_grad_by_freq,
            device="meta",
        )
        new.weight = embedding.weight
        new._init_quant(name, group)
        return _adopt(new, embedding)

    def to_float(self) -> nn.Embedding:
        """A plain ``nn.Embedding`` holding this module's (unchanged) weight Parameter."""
        plain = nn.Embedding(
            self.num_embeddings,
            self.embedding_dim,
            self.padding_idx,
            scale_grad_by_freq=self.scale_grad_by_freq,
            device="meta",
        )
        plain.weight = self.weight
        return _adopt(plain, self)

    def forward(self, input: Tensor) -> Tensor:
        spec = self.quant_spec
        fixed = self._quant_group.fixed is not None
        if spec is None or fixed or spec.granularity == "per_tensor" or not torch.is_grad_enabled():
            return self._lookup(input, self.quantized_weight())
        # Scales are per row (or per group within a row), so quantizing only the rows the batch looks up gives the
        # same values and gradients as quantizing the whole table: a few hundred rows instead of whisper's 51,865,
        # whose fake quantization was a large share of a cached CPU training step (benchmarks/README.md, "CPU step
        # time, session 6").
        rows = self._lookup(input, self.weight)
        clip = self.weight_clip if spec.learnable_clipping else None
        if clip is not None:
            clip = self._lookup(input, clip).reshape(-1, clip.shape[-1])  # the clip gets the gradient rows get
        quantized = fake_quantize(rows.reshape(-1, self.embedding_dim), spec, clip, layer=self.quant_name)
        return quantized.reshape(rows.shape)

    def _lookup(self, input: Tensor, table: Tensor) -> Tensor:
        return F.embedding(input, table, self.padding_idx, None, self.norm_type, self.scale_grad_by_freq, False)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._quant_repr()}"


FAKE_QUANT_TYPES = (FakeQuantLinear, FakeQuantEmbedding)
