"""LoRA students (peft): low-rank adapters trained inside the quantizer, merged into weights on its grid.

``DistillQuantArguments(lora_r=16)``, or a ``peft.PeftModel`` student with a ``LoraConfig``, makes
`DistillQuantTrainer` train rank-r adapters ``B·A`` on the student's attention and feed-forward linears (and the
clipping ratios and width adapters, which are small) while every other weight stays frozen: the optimizer holds state
for a few percent of the weights (numbers: benchmarks/README.md, "LoRA students").

**Where the adapters go.** peft's LoRA ``Linear`` wraps a linear (``base_layer``) and adds ``lora_B(lora_A(x)) ·
scaling`` *beside* it. Beside a fake-quantized linear that trains ``Q(W)·x + B·A·x``, whose merge ``Q(W) + B·A`` is off
the grid: the export would have to quantize it again, and what it rounds away (at 2-4 bits an update of ``B·A`` is
mostly smaller than the grid's step, so most of it) is what training learned; the shipped model would not be the
trained one and the exports could not be exact. Here the update goes *inside* the quantizer instead
(`QuantLoraLinear`, registered with peft for our `FakeQuantLinear` through ``LoraConfig._register_custom_module``): the
layer computes ``Q(W + B·A)·x``, as QA-LoRA and LoftQ train adapters against the quantized weight. The
straight-through estimator passes the weight's gradient to ``B`` and ``A``, so training moves ``W + B·A`` across
grid points (and the clipping ratios learn the scales); peft's own ``merge`` (``W += B·A · scaling``) then gives the
very weight the quantizer saw, and `convert_qat` its very codes: the packed folder, the whisper.cpp file and the
CTranslate2 copy of the merged student equal the LoRA student bit for bit. The cost: each step still quantizes every
adapted weight (the forward of full KDQ) and forms the dense ``B·A`` and the weight's gradient; the saving is in the
optimizer state and the weight gradients kept between steps, not in compute. The token embedding, tied to the output
layer, gets no adapter (its lookup and the tied output layer would quantize different weights); its clipping learns.

The trainer trains the base model peft adapted in place (``PeftModel.get_base_model()``; ``trainer.peft_model`` is the
PeftModel): every part of the trainer (forwards, guided selection, caches, checkpoints, resume, exports) sees the
Whisper model it knows, and a quantized layer keeps its name (``quant.quant_layers`` looks through the LoRA layer).
Checkpoints hold the whole state, frozen weights included, so resuming restores the adapters, clipping ratios and
plan exactly; ``trainer.peft_model.save_pretrained`` writes the adapters alone.

peft is imported with this module: the trainer imports it only for a LoRA student.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .adapters import is_training_only
from .optional import PEFT_INSTALL_HINT, import_optional
from .quant import FakeQuantLinear
from .quant.api import WHISPER_LINEAR_LEAVES

peft = import_optional("peft", "peft", PEFT_INSTALL_HINT)
from peft.tuners.lora import Linear as LoraLinear  # noqa: E402  (after the check that names the install command)
from peft.tuners.lora import LoraConfig  # noqa: E402
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict  # noqa: E402

ADAPTER_NAME = "default"

logger = logging.getLogger(__name__)


def is_peft_model(model: Any) -> bool:
    """Whether ``model`` is a ``peft.PeftModel`` (or a subclass of it)."""
    return isinstance(model, peft.PeftModel)


class QuantLoraLinear(LoraLinear):
    """peft's LoRA ``Linear`` over a `FakeQuantLinear`, with its update inside the quantizer: the output is
    ``Q(W + B·A · scaling)·x`` (the wrapper's `attach_weight_offset`), not ``Q(W)·x + B·A·x · scaling``.

    Merging (peft's ``merge`` / ``merge_and_unload``, or `adapters.merge_lora_layers`) writes ``W + B·A · scaling``
    into the wrapper's weight: the weight it quantized, so its outputs do not change. Input dropout, a trainable
    bias and peft's LoRA variants (DoRA ...) change the output outside the weight, which no merged weight can hold:
    they are refused. Several active adapters are added up before quantizing (a merge adds them one at a time, so
    there the merged weights may differ in the last bit).
    """

    def __init__(self, base_layer: FakeQuantLinear, adapter_name: str, **kwargs) -> None:
        super().__init__(base_layer, adapter_name, **kwargs)
        self.get_base_layer().attach_weight_offset(self._quantizer_offset)

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: LoraConfig, **kwargs) -> None:
        if config.lora_dropout or config.lora_bias:
            raise ValueError(
                f"{type(self).__name__}: lora_dropout={config.lora_dropout}, lora_bias={config.lora_bias}: an "
                "update inside the quantizer is a weight, which cannot drop inputs or carry a bias: use "
                "LoraConfig(lora_dropout=0.0, lora_bias=False)"
            )
        super().update_layer(adapter_name, r, lora_alpha, config=config, **kwargs)
        if self.lora_variant.get(adapter_name) is not None:
            raise ValueError(
                f"{type(self).__name__}: {type(self.lora_variant[adapter_name]).__name__} changes the output outside "
                "the weight the quantizer sees: train plain LoRA (LoraConfig without use_dora or other variants)"
            )

    def _quantizer_offset(self) -> tuple[tuple, torch.Tensor] | None:
        """``(key, B·A · scaling)`` of the active adapters, or None when they are merged or disabled."""
        if self.merged or self.disable_adapters:
            return None
        active = [name for name in self.active_adapters if name in self.lora_A]
        if not active:
            return None
        weights = [(self.lora_A[name].weight, self.lora_B[name].weight) for name in active]
        key = tuple(
            (name, self.scaling[name], *((w.data_ptr(), w._version) for w in pair))
            for name, pair in zip(active, weights, strict=True)
        )
        return key, sum(self.get_delta_weight(name) for name in active)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if kwargs.get("adapter_names") is not None:
            raise TypeError(f"{type(self).__name__} does not support mixed adapter batches (adapter_names)")
        if self.disable_adapters and self.merged:
            self.unmerge()
        return self.base_layer(x, *args, **kwargs)  # the wrapper quantizes W + B·A (see _quantizer_offset)


@dataclass
class LoraSetup:
    """What a LoRA student is built from: the peft config, and the adapter weights of a PeftModel given to the
    trainer (None: fresh adapters, B = 0)."""

    config: LoraConfig | None
    adapter_name: str = ADAPTER_NAME
    state: dict[str, torch.Tensor] | None = None


def take_apart(model: nn.Module, args) -> tuple[nn.Module, LoraSetup]:
    """``(Whisper model, LoraSetup)`` of a student: a PeftModel's LoRA layers taken out again (its adapter weights
    kept in the setup), so that the fake-quant wrappers go in first and `attach_lora` puts the adapters on them."""
    if not is_peft_model(model):
        return model, LoraSetup(None)
    if args.lora_r:
        raise ValueError(
            f"the student is a PeftModel and lora_r={args.lora_r}: its own LoraConfig is used, so drop lora_r (or "
            "pass the plain Whisper student with lora_r)"
        )
    names = list(model.peft_config)
    config = model.peft_config[names[0]]
    if len(names) != 1 or not isinstance(config, LoraConfig):
        kinds = ", ".join(f"{n}: {type(c).__name__}" for n, c in model.peft_config.items())
        raise ValueError(f"a PeftModel student needs one LoRA adapter, got {kinds}: keep one LoraConfig adapter")
    other = sorted(
        {type(m).__name__ for m in model.modules() if hasattr(m, "lora_A") and not isinstance(m, LoraLinear)}
    )
    if other:
        raise ValueError(
            f"LoRA layers of {other} are not on linears: only the attention and feed-forward linears take adapters "
            "inside the quantizer; target them (e.g. target_modules=['q_proj', 'k_proj', 'v_proj', 'out_proj', "
            "'fc1', 'fc2'])"
        )
    state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model, adapter_name=names[0]).items()}
    return model.unload(), LoraSetup(copy.deepcopy(config), names[0], state)


def lora_targets(model: nn.Module, args) -> list[str]:
    """The student's attention and feed-forward linears on the sides that train: the decoder, and the encoder unless
    ``freeze_encoder``."""
    sides = ("decoder",) if args.freeze_encoder else ("encoder", "decoder")
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and name.rpartition(".")[2] in WHISPER_LINEAR_LEAVES
        and any(side in name.split(".") for side in sides)
    ]


def attach_lora(model: nn.Module, setup: LoraSetup, args) -> peft.PeftModel:
    """Put LoRA adapters on ``model`` (fake-quant wrappers already in place: `QuantLoraLinear` on those, peft's own
    layer on float linears), in place, and return the PeftModel around it. Only the adapters, and the clipping ratios
    and width adapters that trained before, train."""
    config = setup.config or LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha or args.lora_r,
        lora_dropout=0.0,
        target_modules=lora_targets(model, args),
    )
    config = copy.deepcopy(config)
    config._register_custom_module({FakeQuantLinear: QuantLoraLinear})
    # peft freezes every parameter that is not its own: these train beside the adapters.
    training = [p for name, p in model.named_parameters() if p.requires_grad and is_training_only(name)]
    adapted = peft.get_peft_model(model, config, adapter_name=setup.adapter_name)
    if setup.state is not None:
        result = set_peft_model_state_dict(adapted, setup.state, adapter_name=setup.adapter_name)
        if result.unexpected_keys:
            raise RuntimeError(
                f"adapter weights {result.unexpected_keys[:3]} found no LoRA layer after quantization was prepared"
            )
    for parameter in training:
        parameter.requires_grad_(True)
    if args.freeze_encoder:
        encoder = [n for n, p in model.model.encoder.named_parameters() if p.requires_grad]
        if encoder:
            raise ValueError(
                f"freeze_encoder and LoRA adapters in the encoder ({encoder[0]} ...): its cached outputs would go "
                "stale as they train. Target the decoder's linears only, or set freeze_encoder=False"
            )
    unique = {id(p): p for p in model.parameters()}.values()
    trainable, total = sum(p.numel() for p in unique if p.requires_grad), sum(p.numel() for p in unique)
    logger.info("LoRA student: %d of %d parameters train (%.2f%%)", trainable, total, 100 * trainable / total)
    return adapted
