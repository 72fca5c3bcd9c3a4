"""Training-only parts of a student: the distillation adapters, and what an export removes before writing.

A student narrower than its teacher gets one linear adapter per layer and distilled side, mapping its hidden
states to the teacher's width. They live on the student (``model.kdq_adapters``) so that optimizers, checkpoints,
resuming and FSDP see them like any other weight, and every export drops them, with the fake-quant wrappers'
training state (learned clipping ratios), through :func:`strip_training_only`. A LoRA student's low-rank adapters
(:mod:`hf_whisper_kdq.peft_students`) are training-only too: every export merges them into the weights under them
first (:func:`merge_lora_layers`), which needs no import of peft.
"""

from __future__ import annotations

import torch
from torch import nn

from .quant import QuantizedWeight, convert_qat
from .quant.modules import FAKE_QUANT_TYPES

# What peft names its LoRA parameters (lora_A, lora_B, and lora_magnitude_vector ... of its variants).
LORA_PARAMETER = ".lora_"

ADAPTERS_ATTRIBUTE = "kdq_adapters"
SIDES = {"decoder": ("decoder",), "encoder": ("encoder",), "both": ("encoder", "decoder"), "none": ()}


def hidden_width(config, side: str, representation: str) -> int:
    """Width of the representation distilled on ``side`` ("encoder"/"decoder") of a Whisper ``config``."""
    return getattr(config, f"{side}_ffn_dim") if representation == "ffn_intermediate" else config.d_model


def attach_adapters(model: nn.Module, teacher_config, args) -> None:
    """Linear maps from the student's to the teacher's hidden width, one per student layer of each side
    ``args.hidden_target`` distils whose width differs (none when the widths match)."""
    adapters = {}
    for side in SIDES[args.hidden_target]:
        ours = hidden_width(model.config, side, args.hidden_representation)
        theirs = hidden_width(teacher_config, side, args.hidden_representation)
        if ours != theirs:
            for i in range(getattr(model.config, f"{side}_layers")):
                adapters[f"{side}_{i}"] = nn.Linear(ours, theirs, bias=False, dtype=model.dtype)
    if adapters:
        model.add_module(ADAPTERS_ATTRIBUTE, nn.ModuleDict(adapters))


def adapt(model: nn.Module, side: str, index: int, hidden: torch.Tensor) -> torch.Tensor:
    """Map the student representation of layer ``index`` of ``side`` to the teacher's width (identity when the
    student has no adapter for it). ``model`` is the unwrapped student."""
    adapters = getattr(model, ADAPTERS_ATTRIBUTE, None)
    key = f"{side}_{index}"
    return adapters[key](hidden) if adapters is not None and key in adapters else hidden


def is_training_only(name: str) -> bool:
    """Whether the parameter or state-dict key ``name`` exists for training only (never exported, never counted
    in the model's size): an adapter's weight, a LoRA weight or a learned clipping ratio."""
    return name.endswith("weight_clip") or name.startswith(f"{ADAPTERS_ATTRIBUTE}.") or LORA_PARAMETER in name


def merged_key(key: str) -> str:
    """The state-dict key ``key`` of a LoRA student has once its LoRA layers are merged (peft's ``.base_layer``
    dropped): what an export names the weight."""
    return key.replace(".base_layer.", ".")


def _is_lora_layer(module: nn.Module) -> bool:
    # peft's tuner layers hold the layer they adapt as ``base_layer`` and can merge into it.
    return "base_layer" in module._modules and hasattr(module, "lora_A") and callable(getattr(module, "merge", None))


def holds_training_only(model: nn.Module) -> bool:
    """Whether ``model`` has adapters, LoRA layers or fake-quant wrappers, i.e. whether :func:`strip_training_only`
    changes it."""
    return ADAPTERS_ATTRIBUTE in model._modules or any(
        isinstance(m, FAKE_QUANT_TYPES) or _is_lora_layer(m) for m in model.modules()
    )


@torch.no_grad()
def merge_lora_layers(model: nn.Module) -> list[str]:
    """Merge every LoRA layer of ``model`` into the layer under it (peft's own ``merge``: ``W += B @ A · scaling``)
    and put that layer back in its place, in place. A fake-quant wrapper then holds the very weight it quantized
    while training (peft_students.QuantLoraLinear), so its codes are those the LoRA student ran with.

    Returns the names of the merged layers."""
    merged = []
    for name, module in list(model.named_modules()):
        if not _is_lora_layer(module):
            continue
        module.merge()
        base = module.get_base_layer()
        if isinstance(base, FAKE_QUANT_TYPES):
            base.attach_weight_offset(None)
            base._quant_group.cached = None  # computed before the merge, from the same Parameter
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, base)
        merged.append(name)
    return merged


def strip_training_only(model: nn.Module) -> dict[str, QuantizedWeight]:
    """Make ``model`` (in place; pass a copy to keep the original) what inference and every export read: LoRA
    layers merged, adapters dropped and fake-quant wrappers baked into plain layers (``convert_qat``).

    Returns:
        ``convert_qat``'s integer codes and scales of each quantized layer (empty for a float model).
    """
    merge_lora_layers(model)
    if ADAPTERS_ATTRIBUTE in model._modules:
        delattr(model, ADAPTERS_ATTRIBUTE)
    codes = convert_qat(model)
    if any(isinstance(m, FAKE_QUANT_TYPES) for m in model.modules()):
        raise RuntimeError("convert_qat left fake-quant wrappers behind")
    return codes
