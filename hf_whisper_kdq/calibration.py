"""Measurements on a student's own probe inputs, with every layer of the plan in float: ``q_l`` (the relative
output error of a unit's linears at each bit width, `measure_quantization_losses`, the guided selection's local
signal) and the mean square of each linear's inputs, on which `calibrate_clipping` searches the learnable clipping
ratios by expected output error before training (AWQ's clip search; the weight error alone clips the weights that
meet the largest inputs: benchmarks/README.md, "Guided bits against uniform bits"); and the input Hessians from which
`gptq_layers` gives layers GPTQ's codes, one block after another (a frozen layer keeps them, a trained one starts
from them).
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Collection

import torch
from torch import nn
from tqdm.auto import tqdm

from .losses import IGNORE_INDEX
from .quant import (
    QuantizedWeight,
    fake_quantize,
    quant_layers,
    quant_specs,
    search_clip_ratios,
    search_clips_on_inputs,
    set_quant_specs,
)
from .quant.gptq import InputHessian, gptq_quantize
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
def calibrate_clipping(
    model: nn.Module, plan: KDQPlan, batches: list[dict], *, skip: Collection[str] = ()
) -> list[str]:
    """Search the learnable clipping ratios of ``model``'s quantized layers again at ``plan``'s specs, weighting each
    weight's error by the mean square of its inputs in the float student's forward over the rows of ``batches``
    (training batches with ``input_features`` and ``labels``), one row at a time. In place, before any optimizer,
    DeepSpeed engine or FSDP wrapper holds copies of the ratios: every process of a launch computes the same ones
    from the same batches. The layers in ``skip`` keep their ratios (e.g. those GPTQ started at 1). Returns the names
    of the layers searched again."""
    specs = plan.module_specs()
    if not any(spec is not None and spec.learnable_clipping for spec in specs.values()):
        return []
    was_training = model.training
    model.eval()
    set_quant_specs(model, dict.fromkeys(specs, None))
    try:
        with measure_quantization_losses(model, plan, ()) as inputs:
            _run_rows(model, batches)
    finally:
        set_quant_specs(model, specs)
        model.train(was_training)
    searched = {name: spec for name, spec in specs.items() if name not in skip}
    return search_clips_on_inputs(model, searched, inputs.input_mean_squares())


class _BlockDone(Exception):
    """Raised by a block's forward hook once its inputs are recorded: the rest of the forward is not needed."""


def _blocks(names: list[str]) -> dict[str, list[str]]:
    """{block: its layers} in forward order, a block being the transformer layer (``...layers.N``) a linear is in,
    or the linear itself outside one."""
    blocks: dict[str, list[str]] = {}
    for name in names:
        found = re.match(r"(.*\.layers\.\d+)\.", name)
        blocks.setdefault(found.group(1) if found else name, []).append(name)
    return blocks


def _follows(block: str, previous: str) -> bool:
    """Whether transformer layer ``block`` (``...layers.N``) is the one right after ``previous`` in its stack, so that
    ``previous``'s outputs are its hidden states."""
    found = re.fullmatch(r"(.*\.layers\.)(\d+)", block)
    return found is not None and previous == f"{found.group(1)}{int(found.group(2)) - 1}"


def _block_inputs(model: nn.Module, block: nn.Module, batches: list[dict], encoder_states) -> list[tuple]:
    """Each labelled row's inputs to ``block`` (positional and keyword arguments), from a forward that stops there."""
    captured = []

    def capture(module, args, kwargs):
        captured.append((args, kwargs))
        raise _BlockDone

    handle = block.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        _run_rows(model, batches, encoder_states)
    finally:
        handle.remove()
    return captured


def _labelled_rows(batches: list[dict]):
    """(features ``[1, mels, frames]``, labels ``[1, length]``) of each labelled row of ``batches``, trimmed to its
    labels: padded positions would make the statistics depend on how the rows were batched, which differs between
    launches of one training."""
    for batch in batches:
        for features, labels in zip(batch["input_features"], batch["labels"], strict=True):
            labelled = labels.ne(IGNORE_INDEX).nonzero()
            if len(labelled):
                yield features[None], labels[None, : int(labelled.max()) + 1]


def _run_rows(model: nn.Module, batches: list[dict], encoder_states: list[torch.Tensor] | None = None) -> None:
    """The model's forward on each labelled row of ``batches``, one row at a time; with ``encoder_states`` (one per
    row, `_encoder_states`), the decoder's alone on them."""
    device = next(model.parameters()).device
    for i, (features, labels) in enumerate(_labelled_rows(batches)):
        inputs = (
            {"input_features": features.to(device)}
            if encoder_states is None
            else {"encoder_outputs": (encoder_states[i],)}
        )
        try:
            # No key-value cache: a block's captured inputs are run again (`gptq_layers`), and a cache would grow.
            model(**inputs, labels=labels.to(device), use_cache=False)
        except _BlockDone:
            pass


def _encoder_states(model: nn.Module, batches: list[dict]) -> list[torch.Tensor]:
    """The encoder's last hidden state on each labelled row of ``batches``: what every forward that captures a
    decoder-side block's inputs would otherwise compute again (the encoder is most of a row's forward)."""
    device = next(model.parameters()).device
    encoder = model.get_encoder()
    return [encoder(features.to(device)).last_hidden_state for features, _ in _labelled_rows(batches)]


@torch.no_grad()
def gptq_layers(
    model: nn.Module,
    names: list[str],
    batches: list[dict],
    *,
    clipping: str = "none",
    keep_codes: bool = True,
    progress: bool = True,
) -> dict[str, QuantizedWeight]:
    """Give the prepared linears ``names`` GPTQ's codes at their specs, from the inputs they meet on the rows of
    ``batches`` (training batches with ``input_features`` and ``labels``). Block after block (transformer layers, in
    the order of ``names``): a block's inputs come from the earlier blocks already holding their codes, everything
    else in float. Returns {name: codes}.

    ``keep_codes=True`` (a frozen layer): each layer holds its codes (``fix_codes``: the forward uses them as they
    are). ``keep_codes=False`` (a layer that trains from there): its weight becomes the codes' values and its
    quantizer rounds it again at every step, which gives back GPTQ's codes except where error feedback moved a
    group's extreme (0.05% of whisper-base's decoder codes at int4 g32: benchmarks/README.md, "GPTQ start of the
    decoder").

    A block's inputs are the previous block's outputs, kept for every row (llm-compressor's sequential pipeline;
    about 3 MB a row in the encoder): each block runs once to collect its Hessians and once, holding its codes, to
    give the next its inputs, instead of the model running from its input up to every block.

    Every position of the 30 s window counts, the padding after short utterances included (the decoder attends to
    it): fitted to the speech positions alone, the codes of 16 utterances broke the padding's outputs and were still
    not better on speech than llm-compressor's on 64 (benchmarks/README.md, "GPTQ inside the package").

    ``clipping``: ``"none"`` sets each layer's clipping ratios to 1 (every group's scale from its largest weight, as
    llm-compressor's min-max observer; GPTQ's error feedback does what clipping did for round-to-nearest),
    ``"searched"`` searches them on the inputs here first (the Hessian's diagonal is their mean square).

    ``progress``: a bar over the blocks (whisper-base's encoder on 240 rows: about 20 minutes on one CPU thread).
    """
    if clipping not in ("none", "searched"):
        raise ValueError(f"clipping={clipping!r}: choose 'none' or 'searched'")
    specs = quant_specs(model)
    missing = [name for name in names if specs.get(name) is None]
    if missing:
        raise ValueError(f"GPTQ needs a quantization spec on {missing[:3]} (prepare_qat with the plan first)")
    modules = {**dict(model.named_modules()), **quant_layers(model)}
    was_training = model.training
    model.eval()
    set_quant_specs(model, dict.fromkeys(specs, None))
    codes: dict[str, QuantizedWeight] = {}
    try:
        decoder_side = not any(".encoder." in name for name in names)
        encoder_states = _encoder_states(model, batches) if decoder_side else None
        blocks = list(_blocks(names).items())
        # Whether each block's inputs are the previous block's outputs; otherwise a forward captures them.
        chained = [i > 0 and _follows(block, blocks[i - 1][0]) for i, (block, _) in enumerate(blocks)]
        inputs: list[tuple] = []
        side = "decoder" if decoder_side else "encoder"
        bar = tqdm(blocks, desc=f"GPTQ ({side}, {len(names)} linears)", unit="block", disable=not progress)
        for position, (block, layers) in enumerate(bar):
            if not chained[position]:
                inputs = _block_inputs(model, modules[block], batches, encoder_states)
            hessians = {name: InputHessian(modules[name].in_features, modules[name].weight.device) for name in layers}
            handles = [
                modules[name].register_forward_hook(lambda m, args, out, h=hessians[name]: h.add(args[0]))
                for name in layers
            ]
            try:
                for args, kwargs in inputs:
                    modules[block](*args, **kwargs)
            finally:
                for handle in handles:
                    handle.remove()
            for name in layers:
                module, spec, hessian = modules[name], specs[name], hessians[name].matrix()
                clip = module.weight_clip if spec.learnable_clipping else None
                if clip is not None and clipping == "none":
                    clip.fill_(1.0)
                elif clip is not None:
                    ratios = search_clip_ratios(module.weight, spec, layer=name, input_mean_square=hessian.diagonal())
                    clip.copy_(ratios)
                codes[name] = gptq_quantize(module.weight, hessian, spec, clip, layer=name)
                if keep_codes:
                    module.set_quant_spec(spec)
                    module.fix_codes(codes[name])
                    module.set_quant_spec(None)  # float until every block is done: fixed codes stay (its weight)
                else:  # the codes' values, which later blocks meet as they are while every spec is None
                    module.weight.copy_(codes[name].dequantize(module.weight.dtype))
            if position + 1 < len(blocks) and chained[position + 1]:
                inputs = [((modules[block](*args, **kwargs), *args[1:]), kwargs) for args, kwargs in inputs]
    finally:
        set_quant_specs(model, specs)
        model.train(was_training)
    return codes
