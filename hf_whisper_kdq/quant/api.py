"""Model-level QAT: choose targets, prepare (swap in fake-quant wrappers), convert (bake and export codes),
and size accounting for bit budgets.

Flow, as in torchao's ``quantize_(model, QATConfig(step="prepare" | "convert"))``::

    targets = default_quant_targets(model)                       # Whisper's attention/FFN linears
    prepare_qat(model, {name: QuantSpec.parse("int4-g32") for name in targets})
    ... train (the distillation Trainer; a callback may call set_quant_specs to move bits) ...
    codes = convert_qat(model)                                   # plain nn.Linear/nn.Embedding again

Tied weights are found by Parameter identity, never by name: every ``nn.Linear``/``nn.Embedding``
holding a targeted weight is quantized with the same spec and the same ``weight_clip``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from .fake_quant import QuantizedWeight, quantize_weight, search_clip_ratios
from .modules import FAKE_QUANT_TYPES, FakeQuantEmbedding, FakeQuantLinear, _QuantGroup
from .spec import QuantSpec, as_spec, weight_bytes

SpecLike = QuantSpec | str | None

# Leaf names of the linears inside Whisper's attention and feed-forward blocks.
WHISPER_LINEAR_LEAVES = frozenset({"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"})

# peft puts its LoRA layer where a linear was and the linear under it, as ``base_layer``. A quantized layer keeps its
# own name (the LoRA layer's) for plans, selection and exports, so that they do not depend on whether it is adapted.
ADAPTED_LAYER = "base_layer"


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, leaf, module)


def _swappable(module: nn.Module) -> bool:
    # Subclasses with their own forward (e.g. Whisper's positional embedding, which returns a slice of
    # its table) would lose that behaviour in a generic wrapper.
    if isinstance(module, FAKE_QUANT_TYPES):
        return True
    if isinstance(module, nn.Linear):
        return type(module).forward is nn.Linear.forward
    if isinstance(module, nn.Embedding):
        return type(module).forward is nn.Embedding.forward
    return False


def quant_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every fake-quant wrapper of ``model`` in model order, by its layer name (that of the LoRA layer over it, when
    peft adapted it)."""
    suffix = f".{ADAPTED_LAYER}"
    return {name.removesuffix(suffix): m for name, m in model.named_modules() if isinstance(m, FAKE_QUANT_TYPES)}


def _resolve(model: nn.Module, names: Iterable[str]) -> dict[str, nn.Module]:
    """Look ``names`` up (an adapted layer's name gives its wrapper); KeyError lists the missing ones, TypeError the
    ones that are not plain Linear/Embedding layers."""
    modules = {**dict(model.named_modules()), **quant_layers(model)}
    names = list(names)
    missing = [n for n in names if n not in modules]
    if missing:
        raise KeyError(f"no module named {missing} in {type(model).__name__}")
    wrong = [f"{n} ({type(modules[n]).__name__})" for n in names if not _swappable(modules[n])]
    if wrong:
        raise TypeError(
            f"only nn.Linear / nn.Embedding layers (without a custom forward) can be quantized, got {wrong}"
        )
    return {n: modules[n] for n in names}


def _weight_owners(model: nn.Module) -> dict[int, list[tuple[str, nn.Module, str]]]:
    """``id(parameter)`` → every ``(module name, module, attribute)`` that holds it directly."""
    owners: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for name, module in model.named_modules():
        for attr, param in module._parameters.items():
            if param is not None:
                owners.setdefault(id(param), []).append((name, module, attr))
    return owners


_Members = list[tuple[str, nn.Module]]


def _tie_groups(model: nn.Module, specs: Mapping[str, QuantSpec | None]) -> list[tuple[_Members, QuantSpec | None]]:
    """Group the targets with every module sharing their weight; one agreed spec per group."""
    targets = _resolve(model, specs)
    owners = _weight_owners(model)
    groups: dict[int, tuple[_Members, QuantSpec | None, str]] = {}
    for name, module in targets.items():
        key = id(module.weight)
        if key in groups:
            members, spec, first = groups[key]
            if specs[name] != spec:
                raise ValueError(
                    f"{name} and {first} share one weight Parameter but were given different specs "
                    f"({specs[name]} vs {spec})"
                )
            continue
        members = []
        for owner_name, owner, attr in owners[key]:
            if attr != "weight" or not _swappable(owner):
                raise TypeError(
                    f"the weight of {name} is also {owner_name}.{attr} ({type(owner).__name__}), which cannot be "
                    "fake-quantized consistently with it"
                )
            members.append((owner_name, owner))
        groups[key] = (members, specs[name], name)
    return [(members, spec) for members, spec, _ in groups.values()]


def prepare_qat(model: nn.Module, specs: Mapping[str, SpecLike]) -> list[str]:
    """Swap the named ``nn.Linear``/``nn.Embedding`` modules for fake-quant wrappers, in place.

    Args:
        model: any module, e.g. ``WhisperForConditionalGeneration``.
        specs: module name → `QuantSpec` (or its string form, e.g. ``"int4-g32"``), or None to wrap
            the layer but keep it in float until a spec is set later.

    Returns:
        The names of all wrapped modules in model order, including modules pulled in because they share
        a targeted weight (``proj_out`` when ``model.decoder.embed_tokens`` is targeted, and vice versa).

    The wrappers hold the very same ``weight``/``bias`` Parameter objects (no copies), so an optimizer
    built before still updates them, state_dict keys are unchanged apart from ``*.weight_clip`` (only
    with learnable clipping), and tied weights stay tied. Calling it again on wrapped layers just
    changes their specs. Everything is validated before the model is touched.
    """
    parsed = {name: as_spec(spec) for name, spec in specs.items()}
    plan = _tie_groups(model, parsed)
    for members, spec in plan:
        if spec is not None:
            spec.check_shape(members[0][1].weight.shape, members[0][0])
        wrapped = [isinstance(m, FAKE_QUANT_TYPES) for _, m in members]
        if any(wrapped) and not (all(wrapped) and len({id(m._quant_group) for _, m in members}) == 1):
            raise TypeError(f"{[n for n, _ in members]} share a weight but are only partly prepared")

    for members, spec in plan:
        first = members[0][1]
        if not isinstance(first, FAKE_QUANT_TYPES):
            group = _QuantGroup()
            for name, module in members:
                cls = FakeQuantEmbedding if isinstance(module, nn.Embedding) else FakeQuantLinear
                wrapper = cls.from_float(module, name=name, group=group)
                _set_module(model, name, wrapper)
            first = group.members[0]
        first.set_quant_spec(spec)

    swapped = {name for members, _ in plan for name, _ in members}
    return [name for name, _ in model.named_modules() if name in swapped]


def default_quant_targets(
    model: nn.Module, *, encoder: bool = True, decoder: bool = True, embedding: bool = False
) -> list[str]:
    """Names of Whisper's quantizable layers, in model order.

    Attention ``q_proj``/``k_proj``/``v_proj``/``out_proj`` and ``fc1``/``fc2`` of the encoder and/or
    decoder (a module path containing an ``encoder`` / ``decoder`` component), plus the decoder's
    ``embed_tokens`` when ``embedding`` (``proj_out``, tied to it, follows in `prepare_qat`). Convolutions,
    layer norms and positional embeddings are never listed. Works on ``WhisperModel`` and
    ``WhisperForConditionalGeneration`` alike; ValueError when nothing matches.
    """
    names = []
    for name, module in model.named_modules():
        parts = name.split(".")
        if isinstance(module, nn.Linear) and parts[-1] in WHISPER_LINEAR_LEAVES:
            if (encoder and "encoder" in parts) or (decoder and "decoder" in parts):
                names.append(name)
        elif embedding and isinstance(module, nn.Embedding) and parts[-1] == "embed_tokens" and "decoder" in parts:
            names.append(name)
    if not names:
        raise ValueError(f"no Whisper encoder/decoder linears found in {type(model).__name__}")
    return names


def quant_specs(model: nn.Module) -> dict[str, QuantSpec | None]:
    """Current spec of every fake-quant wrapper (None = float), in model order."""
    return {name: m.quant_spec for name, m in quant_layers(model).items()}


def set_quant_specs(model: nn.Module, specs: Mapping[str, SpecLike]) -> None:
    """Change the specs of prepared layers (e.g. a bit-selection callback during training).

    Unlike `prepare_qat` it never swaps modules: every name must already be a wrapper (TypeError
    otherwise). Changing a tied layer changes all layers tied to it.
    """
    parsed = {name: as_spec(spec) for name, spec in specs.items()}
    modules = _resolve(model, parsed)
    plain = [n for n, m in modules.items() if not isinstance(m, FAKE_QUANT_TYPES)]
    if plain:
        raise TypeError(f"{plain} are not prepared for QAT; call prepare_qat first")
    _tie_groups(model, parsed)  # conflicting specs for tied layers → ValueError, before any change
    for name, spec in parsed.items():
        modules[name].set_quant_spec(spec)


@torch.no_grad()
def search_clips_on_inputs(
    model: nn.Module, specs: Mapping[str, SpecLike], input_mean_squares: Mapping[str, torch.Tensor]
) -> list[str]:
    """Search the learnable clipping ratios of prepared layers again, at ``specs[name]``, weighting each weight's
    error by the mean square of the input it meets (``input_mean_squares[name]``, ``[in_features]``, measured on
    calibration batches): the expected output error rather than the weight error `prepare_qat` minimizes.

    Layers without a spec with learnable clipping, or without measured inputs, keep their ratios. The ratios are
    overwritten in place (their Parameter stays the one an optimizer may hold), so call it before training moves
    them. Returns the names of the layers searched again."""
    modules = _resolve(model, [n for n in specs if n in input_mean_squares])
    searched = []
    for name, module in modules.items():
        spec = as_spec(specs[name])
        clip = getattr(module, "weight_clip", None)
        if spec is None or not spec.learnable_clipping or clip is None:
            continue
        if tuple(clip.shape) != spec.scale_shape(module.weight.shape):
            continue  # a spec of another granularity than the ratios' (set_quant_specs makes new ones)
        weight = module.effective_weight()
        clip.copy_(search_clip_ratios(weight, spec, layer=name, input_mean_square=input_mean_squares[name]))
        searched.append(name)
    return searched


def convert_qat(model: nn.Module) -> dict[str, QuantizedWeight]:
    """Bake the quantization in: replace every wrapper by a plain ``nn.Linear``/``nn.Embedding``.

    Each quantized weight Parameter is overwritten in place with its dequantized value (so tied
    layers stay tied and the model's outputs equal those of the prepared model), ``weight_clip``
    disappears, and wrappers whose spec is None are unwrapped unchanged.

    Returns:
        Layer name → `QuantizedWeight` (int8 codes ``[rows, cols]``, float32 scales ``[rows, n_groups]``)
        for every quantized layer, in model order. Tied layers map to the *same* object, so an export
        step can pack it once (check with ``is``).
    """
    wrappers = [(name, m) for name, m in model.named_modules() if isinstance(m, FAKE_QUANT_TYPES)]
    adapted = [name for name, m in wrappers if m.effective_weight() is not m.weight]
    if adapted:
        raise RuntimeError(
            f"{adapted[0]} and {len(adapted) - 1} more layers quantize their weight plus a LoRA update: merge the "
            "adapters first (adapters.merge_lora_layers, which every export calls)"
        )
    by_group: dict[int, QuantizedWeight] = {}
    result: dict[str, QuantizedWeight] = {}
    for name, module in wrappers:
        spec = module.quant_spec
        if spec is None:
            continue
        key = id(module._quant_group)
        if key not in by_group:
            clip = module.weight_clip if spec.learnable_clipping else None
            by_group[key] = module.fixed_codes() or quantize_weight(module.weight, spec, clip, layer=name)
        result[name] = by_group[key]

    # Quantize everything first, then write: a tied weight must not be re-quantized after being baked.
    written: set[int] = set()
    with torch.no_grad():
        for name, module in wrappers:
            if name in result and id(module.weight) not in written:
                module.weight.copy_(result[name].dequantize(module.weight.dtype))
                written.add(id(module.weight))
    for name, module in wrappers:
        _set_module(model, name, module.to_float())
    return result


def quantized_size_bytes(
    model_or_shapes: nn.Module | Mapping[str, Sequence[int]],
    specs: Mapping[str, SpecLike] | None = None,
) -> int:
    """Stored size in bytes under ``specs``; everything not quantized counts at 16 bits.

    Args:
        model_or_shapes: a model, whose parameters are all counted (each shared Parameter once,
            ``weight_clip`` excluded), or a mapping layer name → weight shape, each counted.
        specs: layer name → spec/None. For a model, these override the specs its wrappers currently
            have (so ``quantized_size_bytes(prepared_model)`` is its current size), and a spec on
            one of several tied layers applies to the shared weight.
    """
    parsed = {name: as_spec(spec) for name, spec in (specs or {}).items()}
    if not isinstance(model_or_shapes, nn.Module):
        unknown = [n for n in parsed if n not in model_or_shapes]
        if unknown:
            raise KeyError(f"specs given for unknown layers {unknown}")
        return sum(weight_bytes(shape, parsed.get(name), layer=name) for name, shape in model_or_shapes.items())

    model = model_or_shapes
    layers = {**quant_specs(model), **parsed}
    per_weight: dict[int, tuple[QuantSpec | None, str]] = {}
    for name, module in _resolve(model, layers).items():
        key = id(module.weight)
        if key in per_weight and per_weight[key][0] != layers[name]:
            raise ValueError(f"{name} and {per_weight[key][1]} share one weight but have different specs")
        per_weight[key] = (layers[name], name)
    clips = {
        id(m.weight_clip) for m in model.modules() if isinstance(m, FAKE_QUANT_TYPES) and m.weight_clip is not None
    }
    total = 0
    for name, param in model.named_parameters():
        if id(param) in clips:
            continue
        spec, layer = per_weight.get(id(param), (None, name))
        total += weight_bytes(param.shape, spec, layer=layer)
    return total
