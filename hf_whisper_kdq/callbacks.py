"""``LayerSelectionCallback``: measures the student on probe batches and (re)writes the KDQ plan.

At train begin, and every ``selection_interval`` optimizer steps within the first ``selection_until`` of training, it
measures on a few training batches

* the quantization loss ``q_l(b)`` of every unit at every candidate bit width, and
* the distillation loss ``d_l`` of every student layer against every teacher layer,

then re-matches layers (dynamic modes), allocates bits under the size budget from ``d_l`` and ``q_l``, and
picks the distilled layers from ``q_l`` (see :mod:`hf_whisper_kdq.selection`). The plan is logged, written
as ``kdq_plan.json`` into each checkpoint, and kept in the TrainerState so that resuming restores it exactly
(the measurement is deterministic: probe batches are fixed dataset rows, models run in eval mode).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

import torch
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .config import DistillQuantArguments
from .forwards import StudentTeacherForwards
from .losses import IGNORE_INDEX
from .quant import FLOAT_BITS, set_quant_specs
from .selection import (
    KDQPlan,
    allocate_bits,
    choose_distillation_layers,
    fixed_bytes,
    float_stored_units,
    fp16_bytes,
    match_layers,
    measure_quantization_losses,
    plan_shapes,
    relative_hidden_errors,
    unit_bytes,
)

logger = logging.getLogger(__name__)


class SelectionHost(Protocol):
    """What the selection reads and writes: :class:`~hf_whisper_kdq.DistillQuantTrainer` provides it."""

    args: DistillQuantArguments
    plan: KDQPlan
    forwards: StudentTeacherForwards

    def unwrapped_student(self) -> nn.Module: ...

    def apply_plan(self, plan: KDQPlan) -> None: ...

    def probe_batches(self) -> list[dict]: ...

    def is_world_process_zero(self) -> bool: ...


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
        with measure_quantization_losses(model, plan, args.bit_choices) as quantization:
            for batch in batches:
                _, _, reps = trainer.forwards(model, batch, sides, cached_student_encoder=False)
                mask = batch["labels"].ne(IGNORE_INDEX)
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
        if plan.module_specs():
            shapes = plan_shapes(model, plan)
            allocate_bits(
                plan,
                shapes,
                args.bit_choices,
                fixed_bytes=fixed_bytes(model, plan, shapes),
                budget_bytes=args.budget_bytes(fp16_bytes(trainer.forwards.teacher)),
                stored_float=float_stored_units(args),
            )
        choose_distillation_layers(plan, args.num_distill_layers, sides)
        plan.step = step
        trainer.apply_plan(plan)
        model.train(was_training)
        if trainer.is_world_process_zero():
            logger.info("\n%s", plan.summary())
            self._warn_embedding_stored_float(plan, shapes if plan.module_specs() else {})
        return plan

    def _warn_embedding_stored_float(self, plan: KDQPlan, shapes) -> None:
        """Say once when the paper's accounting counts the embedding at fewer bits than the packed file holds."""
        embedding = next((u for u in plan.units if u.name == "embedding" and u.modules), None)
        paper = self.trainer.args.size_budget_accounting == "paper"
        if self._warned_embedding or not paper or embedding is None or embedding.bits >= FLOAT_BITS:
            return
        self._warned_embedding = True
        extra = unit_bytes(plan, embedding, FLOAT_BITS, shapes) - unit_bytes(plan, embedding, embedding.bits, shapes)
        logger.warning(
            "The plan counts the token embedding at %d bits (size_budget_accounting='paper'), but the packed "
            "checkpoint stores it in fp16 (transformers cannot load a quantized embedding): the file will be about "
            "%.1f MB larger than the plan's %.1f MB (the CTranslate2 copy stores it in int8). To make the budget bound "
            "the file, use size_budget_accounting='on_disk'.",
            embedding.bits,
            extra / 1e6,
            plan.size_bytes / 1e6,
        )
