"""``LayerSelectionCallback``: measures the student on probe batches and (re)writes the KDQ plan.

At train begin, and every ``selection_interval`` optimizer steps within the first ``selection_until`` of training, it
measures on a few training batches

* the output cost ``c_l(b)`` of every unit at every candidate bit width: the change of teacher-forced
  KL(teacher ‖ student) with that unit alone quantized (teacher outputs from the trainer's caches; the student's
  encoder runs once per batch unless an encoder unit is the one quantized),
* the quantization loss ``q_l(b)`` of every unit's own linears, and
* the distillation loss ``d_l`` of every student layer against every teacher layer,

then re-matches layers (dynamic modes), allocates bits under the size budget and picks the distilled layers (from
``c_l``, or from ``d_l`` and ``q_l`` with ``selection_cost="local_error"``; see :mod:`hf_whisper_kdq.selection`). The plan is logged, written
as ``kdq_plan.json`` into each checkpoint, and kept in the TrainerState so that resuming restores it exactly
(the measurement is deterministic: probe batches are fixed dataset rows, models run in eval mode).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .calibration import measure_quantization_losses
from .config import DistillQuantArguments
from .forwards import StudentTeacherForwards
from .ggml_budget import fit_ggml_budget
from .losses import IGNORE_INDEX, logit_distillation_loss
from .quant import FLOAT_BITS, QuantSpec, set_quant_specs
from .selection import (
    KDQPlan,
    allocate_bits,
    choose_distillation_layers,
    fixed_bytes,
    float_stored_units,
    fp16_bytes,
    match_layers,
    measure_output_costs,
    plan_shapes,
    plan_size,
    relative_hidden_errors,
    uniform_bits,
    unit_bytes,
)

logger = logging.getLogger(__name__)


class SelectionHost(Protocol):
    """What the selection reads and writes: :class:`~hf_whisper_kdq.DistillQuantTrainer` provides it."""

    args: DistillQuantArguments
    plan: KDQPlan
    forwards: StudentTeacherForwards
    processor: object  # the WhisperProcessor: a ggml plan bills the whisper.cpp file, which holds its vocabulary

    def unwrapped_student(self) -> nn.Module: ...

    def apply_plan(self, plan: KDQPlan) -> None: ...

    def probe_batches(self) -> list[dict]: ...

    def is_world_process_zero(self) -> bool: ...


@dataclass
class _Probe:
    """What one probe batch needs to re-run the student's decoder: its inputs, the encoder states the student's
    decoder saw, the label positions and the teacher's logits there ([N, V])."""

    features: torch.Tensor
    decoder_input_ids: torch.Tensor
    encoder_states: torch.Tensor
    labels: torch.Tensor
    teacher_logits: torch.Tensor


@contextmanager
def _decoder_inputs(model):
    """While active, records the keyword inputs of every call of ``model``'s decoder (a list of dicts)."""
    calls = []
    handle = model.model.decoder.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs), with_kwargs=True
    )
    try:
        yield calls
    finally:
        handle.remove()


class ProbeKL:
    """Teacher-forced KL(teacher ‖ student) in nats per label token over the probe batches, for any quantization
    specs of the plan's modules (the others float): the measure ``selection.measure_output_costs`` takes."""

    def __init__(self, host: SelectionHost, model: nn.Module, plan: KDQPlan, probes: list[_Probe]):
        self.host, self.model, self.probes = host, model, probes
        self.float_specs = dict.fromkeys(plan.module_specs(), None)
        self.encoder_modules = {m for u in plan.units if u.side == "encoder" for m in u.modules}
        self.tokens = sum(int(p.labels.ne(IGNORE_INDEX).sum()) for p in probes)
        self._measured: dict[tuple, float] = {}

    def __call__(self, specs: dict[str, QuantSpec | None]) -> float:
        key = tuple(sorted((name, spec.bits) for name, spec in specs.items() if spec is not None))
        if key not in self._measured:
            self._measured[key] = self._measure(specs)
        return self._measured[key]

    def _measure(self, specs: dict[str, QuantSpec | None]) -> float:
        set_quant_specs(self.model, {**self.float_specs, **specs})
        quantized_encoder = any(specs.get(m) is not None for m in self.encoder_modules)
        total = 0.0
        with self.host.forwards.accelerator.autocast():
            for probe in self.probes:
                inputs = (
                    {"input_features": probe.features}
                    if quantized_encoder
                    else {"encoder_outputs": (probe.encoder_states,)}
                )
                logits = self.model(decoder_input_ids=probe.decoder_input_ids, **inputs).logits
                labelled = probe.labels.ne(IGNORE_INDEX)
                total += logit_distillation_loss(
                    logits[labelled], probe.teacher_logits, probe.labels[labelled], num_items_in_batch=self.tokens
                ).item()
        return total


class LayerSelectionCallback(TrainerCallback, ExportableState):
    """Guided layer selection for :class:`~hf_whisper_kdq.DistillQuantTrainer`, which adds it (one passed in its
    ``callbacks`` is used instead, bound to it). ``trainer`` is a :class:`SelectionHost`."""

    def __init__(self, trainer: SelectionHost | None = None, restored_plan: dict | None = None):
        self.trainer = trainer
        self.restored_plan = restored_plan
        self._warned_embedding = False

    def bind(self, trainer: SelectionHost) -> None:
        self.trainer = trainer

    def state(self) -> dict:
        return {"args": {}, "attributes": {"restored_plan": self.trainer.plan.to_dict()}}

    # ---- events -------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        if self.restored_plan is not None:
            self.trainer.apply_plan(KDQPlan.from_dict(self.restored_plan))
            self.restored_plan = None
            logger.info("Restored the KDQ plan of step %d from the checkpoint", self.trainer.plan.step)
        elif state.global_step == 0:
            self.select(step=0)

    def on_step_end(self, args, state, control, **kwargs):
        interval, step = args.selection_interval, state.global_step
        # selection_until ≤ 1: never at the last step, whose plan no step would use.
        if interval and step % interval == 0 and step < args.selection_until * state.max_steps:
            self.select(step=step)

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            if folder.is_dir():
                self.trainer.plan.save(folder)

    # ---- selection ------------------------------------------------------------------------------------
    @torch.no_grad()
    def select(self, step: int) -> KDQPlan:
        trainer, args = self.trainer, self.trainer.args
        plan = trainer.plan
        model = trainer.unwrapped_student()
        was_training = model.training
        model.eval()
        # Measure the float student: sensitivities are properties of its weights, not of the current bits.
        if plan.module_specs():
            set_quant_specs(model, dict.fromkeys(plan.module_specs(), None))
        sides = trainer.forwards.distill_sides if args.num_distill_layers else ()
        errors = {side: 0.0 for side in sides}
        batches = trainer.probe_batches()
        probes = []
        # The student's encoder runs (rather than coming from a cache) only where q_l hooks its quantized layers.
        encoder_probed = any(u.modules for u in plan.units if u.side == "encoder")
        with (
            measure_quantization_losses(model, plan, args.bit_choices) as quantization,
            _decoder_inputs(model) as calls,
        ):
            for batch in batches:
                calls.clear()
                _, teacher_out, reps = trainer.forwards(model, batch, sides, cached_student_encoder=not encoder_probed)
                mask = batch["labels"].ne(IGNORE_INDEX)
                probes.append(
                    _Probe(
                        batch["input_features"],
                        calls[-1]["input_ids"],
                        calls[-1]["encoder_hidden_states"],
                        batch["labels"],
                        teacher_out.logits[mask],
                    )
                )
                for side in sides:
                    errors[side] = errors[side] + relative_hidden_errors(
                        reps["student"][side], reps["teacher"][side], mask if side == "decoder" else None
                    )

        q = quantization.losses()
        for unit in plan.units:
            unit.quant_loss = q[unit.name]
        for side in sides:
            matrix = errors[side] / len(batches)
            layers = plan.layers(side)
            if args.layer_matching != "static":
                matched = match_layers(matrix, monotone=args.layer_matching == "dynamic_monotone")
                for unit in layers:
                    unit.teacher_layer = matched[unit.index]
            for unit in layers:
                unit.distill_loss = float(matrix[unit.index, unit.teacher_layer])
        shapes = plan_shapes(model, plan) if plan.module_specs() else {}
        plan.probe_kl = {}
        if plan.module_specs():
            probe_kl = ProbeKL(trainer, model, plan, probes)
            if args.selection_cost == "output_kl":
                costs = measure_output_costs(plan, args.bit_choices, probe_kl)
                for unit in plan.units:
                    unit.output_cost = costs.get(unit.name, {})
            self._allocate(plan, shapes, probe_kl)
        choose_distillation_layers(plan, args.num_distill_layers, sides, cost=args.selection_cost)
        plan.step = step
        trainer.apply_plan(plan)
        model.train(was_training)
        if trainer.is_world_process_zero():
            logger.info("\n%s", plan.summary())
            self._warn_embedding_stored_float(plan, shapes)
        return plan

    def _allocate(self, plan: KDQPlan, shapes, probe_kl: ProbeKL) -> None:
        """Allocate bits under the budget; under ``output_kl``, keep the best uniform allocation that fits instead
        when its probe KL is lower than the allocation's (the unit costs were measured one unit at a time)."""
        args, model = self.trainer.args, probe_kl.model
        if args.quant_format == "ggml":  # one type for the whole file: the widest whose file fits
            teacher_bytes = fp16_bytes(self.trainer.forwards.teacher)
            fit_ggml_budget(plan, model, self.trainer.processor, args, teacher_bytes)
            return
        budgeting = dict(
            fixed_bytes=fixed_bytes(model, plan, shapes),
            budget_bytes=args.budget_bytes(fp16_bytes(self.trainer.forwards.teacher)),
            stored_float=float_stored_units(args),
        )
        allocate_bits(plan, shapes, args.bit_choices, cost=args.selection_cost, **budgeting)
        if args.selection_cost != "output_kl":
            return
        plan.probe_kl = {"float": probe_kl({}), "plan": probe_kl(plan.module_specs())}
        uniform = uniform_bits(plan, shapes, args.bit_choices, **budgeting)
        if uniform is None:
            return
        allocated = {u.name: u.bits for u in plan.units}
        for unit in plan.units:
            if unit.modules:
                unit.bits = max(args.bit_choices) if unit.name in budgeting["stored_float"] else uniform
        plan.probe_kl[f"uniform int{uniform}"] = probe_kl(plan.module_specs())
        if plan.probe_kl[f"uniform int{uniform}"] < plan.probe_kl["plan"]:
            plan.size_bytes = plan_size(
                plan, shapes, fixed_bytes=budgeting["fixed_bytes"], stored_float=budgeting["stored_float"]
            )
            plan.rule += f" Kept here: uniform int{uniform} (lower joint probe KL than the greedy allocation)."
        else:
            for unit in plan.units:
                unit.bits = allocated[unit.name]

    def _warn_embedding_stored_float(self, plan: KDQPlan, shapes) -> None:
        """Say once when the paper's accounting counts the embedding at fewer bits than the packed file will hold (a
        plan of mixed widths: see export.compressed)."""
        embedding = next((u for u in plan.units if u.name == "embedding" and u.modules), None)
        paper = self.trainer.args.size_budget_accounting == "paper"
        if self._warned_embedding or not paper or embedding is None or embedding.bits >= FLOAT_BITS:
            return
        if len({u.bits for u in plan.units if u.modules and u.bits < FLOAT_BITS}) == 1:
            return  # one integer width: the export stores the embedding packed (see export.compressed)
        self._warned_embedding = True
        extra = unit_bytes(plan, embedding, FLOAT_BITS, shapes) - unit_bytes(plan, embedding, embedding.bits, shapes)
        logger.warning(
            "The plan counts the token embedding at %d bits (size_budget_accounting='paper'), but it mixes bit widths, "
            "and a packed checkpoint of several widths stores the embedding in fp16 (transformers loads such files "
            "only through its compressed path, which cannot load a quantized embedding): the file will be about "
            "%.1f MB larger than the plan's %.1f MB (the CTranslate2 copy stores it in int8). To make the budget bound "
            "the file, use size_budget_accounting='on_disk'.",
            embedding.bits,
            extra / 1e6,
            plan.size_bytes / 1e6,
        )
