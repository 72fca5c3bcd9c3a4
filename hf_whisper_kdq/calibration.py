"""Measurements on a student's own probe inputs, with every layer of the plan in float: ``q_l`` (the relative
output error of a unit's linears at each bit width, `measure_quantization_losses`, the guided selection's local
signal) and the mean square of each linear's inputs, on which `calibrate_clipping` searches the learnable clipping
ratios by expected output error before training (AWQ's clip search; the weight error alone clips the weights that
meet the largest inputs: benchmarks/README.md, "Guided bits against uniform bits").
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch import nn

from .losses import IGNORE_INDEX
from .quant import fake_quantize, quant_layers, search_clips_on_inputs, set_quant_specs
from .selection import KDQPlan


class measure_quantization_losses:
    """Context manager measuring ``q_l(b)`` for every unit of ``plan`` and every candidate bits while the probe
    batches run: Σ‖X·q(W)ᵀ − X·Wᵀ‖² / Σ‖X·Wᵀ‖² over the unit's linears, X their inputs.

    Each linear is measured in a forward hook, inside its own forward: a model sharded by FSDP holds a layer's whole
    weight only then. ``max_rows`` rows of each call's input are used (evenly strided over its positions), which
    bounds the work on long encoder sequences while covering every utterance of the probe batches. A unit without
    linears (the embedding lookup) has no ``q_l`` (0); only its tied projection's inputs are recorded, for the
    clipping search.

    Usage::

        with measure_quantization_losses(model, plan, bit_choices) as measure:
            ...  # run the probe batches
        q = measure.losses()  # {unit name: {bits: q_l}}
    """

    def __init__(self, model: nn.Module, plan: KDQPlan, bit_choices: tuple[int, ...], max_rows: int = 4096):
        self.model, self.plan, self.bit_choices, self.max_rows = model, plan, bit_choices, max_rows
        self._numerators: dict[str, dict[int, float]] = defaultdict(lambda: dict.fromkeys(bit_choices, 0.0))
        self._denominators: dict[str, float] = defaultdict(float)
        self._input_squares: dict[str, torch.Tensor] = {}
        self._input_rows: dict[str, int] = defaultdict(int)
        self._handles = []

    def __enter__(self) -> measure_quantization_losses:
        modules = {**dict(self.model.named_modules()), **quant_layers(self.model)}  # under a LoRA layer: its wrapper
        for name in (m for unit in self.plan.units for m in unit.modules):
            module = modules[name]
            if isinstance(module, nn.Linear):
                self._handles.append(module.register_forward_hook(self._hook(name)))
                continue
            # An embedding's weight meets inputs only as the tied output layer's: those weigh its clipping search.
            for member in getattr(getattr(module, "_quant_group", None), "members", ()):
                if isinstance(member, nn.Linear):
                    self._handles.append(member.register_forward_hook(self._input_hook(name)))
        return self

    def _rows(self, args) -> torch.Tensor:
        x = args[0].detach().flatten(0, -2)
        return x[:: max(1, math.ceil(x.shape[0] / self.max_rows))].float()

    def _record_inputs(self, name: str, x: torch.Tensor) -> None:
        squares = x.pow(2).sum(0)
        self._input_squares[name] = self._input_squares[name] + squares if name in self._input_squares else squares
        self._input_rows[name] += x.shape[0]

    def _input_hook(self, name: str):
        @torch.no_grad()
        def record(module, args, output):
            self._record_inputs(name, self._rows(args))

        return record

    def _hook(self, name: str):
        @torch.no_grad()
        def measure(module, args, output):
            x = self._rows(args)
            self._record_inputs(name, x)
            # A LoRA student's quantizer sees W + B @ A.
            weight = (module.effective_weight() if hasattr(module, "effective_weight") else module.weight).float()
            reference = x @ weight.T
            self._denominators[name] += reference.pow(2).sum().item()
            for bits in self.bit_choices:
                spec = self.plan.spec(bits)
                if spec is not None:
                    # Learned clipping is ignored on purpose: sensitivity is a property of the weights.
                    quantized = fake_quantize(weight, spec, None, layer=name)
                    self._numerators[name][bits] += (x @ quantized.T - reference).pow(2).sum().item()

        return measure

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def input_mean_squares(self) -> dict[str, torch.Tensor]:
        """{linear name: ``[in_features]`` mean of ``x_j²`` over the inputs it saw}, for `search_clips_on_inputs`."""
        return {name: squares / self._input_rows[name] for name, squares in self._input_squares.items()}

    def losses(self) -> dict[str, dict[int, float]]:
        """{unit name: {bits: q_l(bits)}} over what ran inside the context (0 for units that saw no input)."""
        losses = {}
        for unit in self.plan.units:
            denominator = sum(self._denominators.get(name, 0.0) for name in unit.modules)
            losses[unit.name] = {
                bits: sum(self._numerators[name][bits] for name in unit.modules if name in self._numerators)
                / max(denominator, 1e-30)
                for bits in self.bit_choices
            }
        return losses


@torch.no_grad()
def calibrate_clipping(model: nn.Module, plan: KDQPlan, batches: list[dict]) -> list[str]:
    """Search the learnable clipping ratios of ``model``'s quantized layers again at ``plan``'s specs, weighting each
    weight's error by the mean square of its inputs in the float student's forward over the rows of ``batches``
    (training batches with ``input_features`` and ``labels``), one row at a time. In place, before any optimizer,
    DeepSpeed engine or FSDP wrapper holds copies of the ratios: every process of a launch computes the same ones
    from the same batches. Returns the names of the layers searched again."""
    specs = plan.module_specs()
    if not any(spec is not None and spec.learnable_clipping for spec in specs.values()):
        return []
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    set_quant_specs(model, dict.fromkeys(specs, None))
    try:
        with measure_quantization_losses(model, plan, ()) as inputs:
            # One row at a time, trimmed to its labels: padded positions would make the statistics (and the ratios)
            # depend on how the rows were batched, which differs between launches of one training.
            for batch in batches:
                for features, labels in zip(batch["input_features"], batch["labels"], strict=True):
                    labelled = labels.ne(IGNORE_INDEX).nonzero()
                    if len(labelled):
                        length = int(labelled.max()) + 1
                        model(input_features=features[None].to(device), labels=labels[None, :length].to(device))
    finally:
        set_quant_specs(model, specs)
        model.train(was_training)
    return search_clips_on_inputs(model, specs, inputs.input_mean_squares())
