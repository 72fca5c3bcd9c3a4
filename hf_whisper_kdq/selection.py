"""Guided layer selection: the plan of which layers are distilled, which are quantized, and to how many bits.

The method's two-way guidance (Whisper-KDQ, Shao et al. 2023), with signals that measure what the budget spends
(``selection_cost="output_kl"``, the default):

* **the cost of a unit at b bits** is ``c_l(b)``, the change of teacher-forced KL(teacher ‖ student) (nats per label
  token) on the probe batches when unit ``l`` alone is quantized to ``b`` bits and the rest of the student stays
  float. It is what quantizing that unit adds to the output distance that distillation must close: a distillation
  difficulty measured at the output, so it is not zero for a student equal to its teacher (whose hidden-state
  distance ``d_l`` is 0 at step 0 by construction), and it ranks a copied layer by its sensitivity rather than by its
  (near-zero) float distance.
* **bits follow that cost**: every unit starts at its highest allowed bits; while the model is over budget, the unit
  whose next lower bit width adds the least cost per byte saved, ``(c_l(b_next) − c_l(b)) / (bytes(b) −
  bytes(b_next))``, steps down; then units step back up while they fit, the most cost removed per byte added first
  (the descent's last step can overshoot by a large unit's whole step). A greedy knapsack, near-optimal on
  convex-ish curves and deterministic, so that every rank plans alike. The sum of unit costs assumes they add up; the selection therefore measures the
  allocation's joint KL and keeps the best uniform allocation that fits instead when that is lower.
* **distillation layers are those quantization damages most**: the ``num_distill_layers`` layers of highest
  ``c_l`` at their assigned bits.

``selection_cost="local_error"`` keeps the previous rule: ``q_l(b)``, the relative output error of a unit's own
linears, weighted by ``w_l = d_l / mean(d)`` and divided by bytes saved. A local error does not see how a unit's
error reaches the output: it let the tied 51,865-token embedding (six decoder layers' bytes) drop to 2 bits, which
destroys the output. ``q_l`` and ``d_l`` are measured and recorded in the plan under both rules.

A *unit* is one encoder layer, one decoder layer, or the token embedding (with the tied output projection).
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .adapters import is_training_only
from .config import GGML_TYPE_OF_BITS
from .files import atomic_write_text
from .quant import FLOAT_BITS, GGMLSpec, QuantSpec, default_quant_targets, weight_bytes
from .quant.spec import AnySpec
from .students import teacher_layer_map

PLAN_FILE = "kdq_plan.json"
_LAYER = re.compile(r"(?:^|\.)(encoder|decoder)\.layers\.(\d+)\.")


@dataclass
class UnitPlan:
    """One unit of the plan. ``bits`` is 16 for a unit kept in float."""

    name: str
    side: str
    index: int | None
    modules: list[str]
    bits: int
    distilled: bool = False
    teacher_layer: int | None = None
    quant_loss: dict[int, float] = field(default_factory=dict)
    distill_loss: float | None = None
    output_cost: dict[int, float] = field(default_factory=dict)


@dataclass
class KDQPlan:
    """Per-unit bits, distillation flags and matched teacher layers, plus the measurements behind them."""

    units: list[UnitPlan]
    granularity: str
    group_size: int | None
    learnable_clipping: bool
    budget_bytes: int | None = None
    size_bytes: int | None = None
    step: int = 0
    rule: str = ""
    probe_kl: dict[str, float] = field(default_factory=dict)
    quant_format: str = "int"  # "ggml": bits 2/3/4/8 are ggml's q2_K/q3_K/q4_0/q8_0 blocks (see ggml_budget)

    # ---- views ----------------------------------------------------------------------------------
    def unit(self, name: str) -> UnitPlan:
        return next(u for u in self.units if u.name == name)

    def layers(self, side: str) -> list[UnitPlan]:
        return sorted((u for u in self.units if u.side == side), key=lambda u: u.index)

    def distilled_pairs(self, side: str) -> list[tuple[int, int]]:
        """(student layer, teacher layer) of the distilled layers of one side."""
        return [(u.index, u.teacher_layer) for u in self.layers(side) if u.distilled and u.teacher_layer is not None]

    def spec(self, bits: int) -> AnySpec | None:
        if bits >= FLOAT_BITS:
            return None
        if self.quant_format == "ggml":
            return GGMLSpec(GGML_TYPE_OF_BITS[bits])
        group = self.group_size if self.granularity == "per_group" else None
        return QuantSpec(bits, self.granularity, group, True, self.learnable_clipping)

    def module_specs(self) -> dict[str, QuantSpec | None]:
        return {module: self.spec(u.bits) for u in self.units for module in u.modules}

    def quantized(self, side: str) -> bool:
        return any(u.bits < FLOAT_BITS for u in self.units if u.side == side and u.modules)

    # ---- persistence ------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> KDQPlan:
        units = [
            UnitPlan(
                **{
                    **u,
                    "quant_loss": {int(b): float(v) for b, v in u.get("quant_loss", {}).items()},
                    "output_cost": {int(b): float(v) for b, v in u.get("output_cost", {}).items()},
                }
            )
            for u in data["units"]
        ]
        return cls(**{**data, "units": units})

    def save(self, folder: str | Path) -> Path:
        return atomic_write_text(Path(folder) / PLAN_FILE, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, folder_or_file: str | Path) -> KDQPlan:
        path = Path(folder_or_file)
        path = path / PLAN_FILE if path.is_dir() else path
        return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))

    @classmethod
    def coerce(cls, plan: KDQPlan | dict | str | Path) -> KDQPlan:
        """A plan given as itself, its ``to_dict()``, or a ``kdq_plan.json`` file or its folder."""
        return (
            plan if isinstance(plan, cls) else cls.from_dict(dict(plan)) if isinstance(plan, dict) else cls.load(plan)
        )

    def summary(self) -> str:
        """A Markdown table of the plan, one row per unit."""
        rows = [
            "| unit | bits | distilled | teacher layer | ΔKL (assigned bits) | q_l (assigned bits) | d_l |",
            "|---|---|---|---|---|---|---|",
        ]

        def number(value: float | None) -> str:
            return "" if value is None else f"{value:.4g}"

        for u in self.units:
            bits = "float" if u.bits >= FLOAT_BITS else str(u.bits)
            teacher = "" if u.teacher_layer is None else str(u.teacher_layer)
            rows.append(
                f"| {u.name} | {bits} | {'yes' if u.distilled else ''} | {teacher} | "
                f"{number(u.output_cost.get(u.bits))} | {number(u.quant_loss.get(u.bits))} | "
                f"{number(u.distill_loss)} |"
            )
        size = "" if self.size_bytes is None else f" — size {self.size_bytes / 1e6:.2f} MB"
        budget = "" if self.budget_bytes is None else f" (budget {self.budget_bytes / 1e6:.2f} MB)"
        kl = "".join(f"\nprobe KL (nats/token), {name}: {value:.4g}" for name, value in self.probe_kl.items())
        rule = f"\nrule: {self.rule}" if self.rule else ""
        return f"KDQ plan at step {self.step}{size}{budget}\n" + "\n".join(rows) + kl + rule


def group_units(quant_targets: list[str]) -> dict[str, list[str]]:
    """Group quantizable module names into units: ``encoder.3``, ``decoder.0``, ``embedding``."""
    units: dict[str, list[str]] = defaultdict(list)
    for name in quant_targets:
        match = _LAYER.search(name)
        units[f"{match.group(1)}.{match.group(2)}" if match else "embedding"].append(name)
    return dict(units)


def initial_plan(
    quant_targets: list[str],
    teacher_layers: dict[str, list[int]],
    *,
    bits: int,
    granularity: str,
    group_size: int | None,
    learnable_clipping: bool,
) -> KDQPlan:
    """One unit per encoder and decoder layer (``teacher_layers`` gives each its teacher layer) plus the
    embedding when targeted. Units with quantization targets start at ``bits``, the others stay float."""
    grouped = group_units(quant_targets)
    units = [
        UnitPlan(
            f"{side}.{i}",
            side,
            i,
            grouped.get(f"{side}.{i}", []),
            bits if f"{side}.{i}" in grouped else FLOAT_BITS,
            teacher_layer=teacher,
        )
        for side in ("encoder", "decoder")
        for i, teacher in enumerate(teacher_layers[side])
    ]
    if "embedding" in grouped:
        units.append(UnitPlan("embedding", "embedding", None, grouped["embedding"], bits))
    return KDQPlan(units, granularity, group_size, learnable_clipping)


def starting_plan(model: nn.Module, teacher_model: nn.Module, args) -> KDQPlan:
    """The plan a `DistillQuantTrainer` starts from: ``args.quant_targets`` at the widest uniform integer bit choice
    that fits the size budget (the highest without one), each student layer matched to its teacher layer
    (`teacher_layer_map`); selection rewrites it at train begin.

    The starting bits matter: learnable clipping ratios are searched when the layers are prepared, before the
    optimizer exists (an optimizer's master copies, e.g. DeepSpeed's fp32 ones, would undo a later re-search), and
    ratios searched at 8 bits are ~1, useless at the 3 or 4 bits a budget leads to."""
    targets = args.quant_target_set
    integer_bits = [b for b in args.bit_choices if b < FLOAT_BITS]
    try:
        names = default_quant_targets(
            model, encoder="encoder" in targets, decoder="decoder" in targets, embedding="embedding" in targets
        )
    except ValueError:
        names = []
    if "embedding" in targets and names:
        names.append("proj_out")  # tied to the embedding: one unit, quantized together
    plan = initial_plan(
        names if integer_bits else [],
        teacher_layer_map(model, teacher_model),
        bits=max(integer_bits) if integer_bits else FLOAT_BITS,
        granularity=args.quant_granularity,
        group_size=args.quant_group_size,
        learnable_clipping=args.learnable_clipping,
    )
    plan.quant_format = args.quant_format
    budget = args.budget_bytes(fp16_bytes(teacher_model))
    if budget is not None and plan.module_specs() and args.quant_format == "int":  # ggml: ggml_budget fits the file
        shapes, stored_float = plan_shapes(model, plan), float_stored_units(args)
        bits = uniform_bits(
            plan,
            shapes,
            args.bit_choices,
            fixed_bytes=fixed_bytes(model, plan, shapes),
            budget_bytes=budget,
            stored_float=stored_float,
        )
        for unit in plan.units:
            if bits is not None and unit.modules and unit.name not in stored_float:
                unit.bits = bits
    return plan


# ---- measurements --------------------------------------------------------------------------------------


def measure_output_costs(
    plan: KDQPlan, bit_choices: tuple[int, ...], probe_kl: Callable[[dict[str, QuantSpec | None]], float]
) -> dict[str, dict[int, float]]:
    """``c_l(b)`` for every unit of ``plan`` with modules and every integer bit width of ``bit_choices``: the probe KL
    with that unit alone quantized to ``b`` bits minus the float student's (``c_l(16) = 0``).

    ``probe_kl(specs)`` is the student's teacher-forced KL(teacher ‖ student) in nats per label token on the probe
    batches with ``specs`` applied to those modules and every other module of the plan in float.
    """
    reference = probe_kl({})
    costs = {}
    for unit in plan.units:
        if unit.modules:
            costs[unit.name] = {
                bits: 0.0 if bits >= FLOAT_BITS else probe_kl(dict.fromkeys(unit.modules, plan.spec(bits))) - reference
                for bits in bit_choices
            }
    return costs


def relative_hidden_errors(student: list[torch.Tensor], teacher: list[torch.Tensor], mask: torch.Tensor | None):
    """Matrix [n_student, n_teacher] of ‖s_i − t_j‖² / ‖t_j‖² over the counted positions.

    Args:
        student: per student layer [B, L, D] (already in the teacher's width).
        teacher: per teacher layer [B, L, D].
        mask: [B, L] bool or None.
    """
    weights = None if mask is None else mask.unsqueeze(-1).float()
    errors = torch.zeros(len(student), len(teacher))
    for j, t in enumerate(teacher):
        t = t.float() if weights is None else t.float() * weights
        energy = t.pow(2).sum().clamp_min(1e-12)
        for i, s in enumerate(student):
            s = s.float() if weights is None else s.float() * weights
            errors[i, j] = ((s - t).pow(2).sum() / energy).item()
    return errors


def match_layers(errors: torch.Tensor, monotone: bool) -> list[int]:
    """Teacher layer per student layer: argmin of each row, or (monotone) the non-decreasing assignment
    of least total error, by dynamic programming over [n_student, n_teacher]."""
    if not monotone:
        return errors.argmin(dim=1).tolist()
    n_student, n_teacher = errors.shape
    cost = errors.clone()
    choice = torch.zeros_like(errors, dtype=torch.long)
    for i in range(1, n_student):
        best, where = torch.cummin(cost[i - 1], dim=0)
        cost[i] = errors[i] + best
        choice[i] = where
    path = [int(cost[-1].argmin())]
    for i in range(n_student - 1, 0, -1):
        path.append(int(choice[i, path[-1]]))
    return path[::-1]


# ---- decisions -------------------------------------------------------------------------------------------


def unit_bytes(plan: KDQPlan, unit: UnitPlan, bits: int, shapes: dict[str, torch.Size]) -> int:
    """Bytes of a unit's weights at ``bits`` (the embedding and its tied projection count once)."""
    spec = plan.spec(bits)
    counted = [m for m in unit.modules if not (unit.side == "embedding" and m.endswith("proj_out"))]
    return sum(weight_bytes(shapes[m], spec, layer=m) for m in counted)


def fp16_bytes(model: nn.Module) -> int:
    """Bytes of all of ``model``'s parameters in fp16: the reference of size ratios (the teacher's). A teacher
    loaded in 4-bit by bitsandbytes counts its weights' original shapes (their packed tensors hold two per byte)."""
    return 2 * sum(
        math.prod(p.quant_state.shape) if getattr(p, "quant_state", None) is not None else p.numel()
        for p in model.parameters()
    )


def plan_shapes(model: nn.Module, plan: KDQPlan) -> dict[str, torch.Size]:
    """Weight shapes of the modules the plan's units hold."""
    names = {m for unit in plan.units for m in unit.modules}
    return {name: module.weight.shape for name, module in model.named_modules() if name in names}


def fixed_bytes(model: nn.Module, plan: KDQPlan, shapes: dict[str, torch.Size]) -> int:
    """fp16 bytes of everything outside the plan's units (adapters and clipping ratios are training-only)."""
    training_only = {id(p) for name, p in model.named_parameters() if is_training_only(name)}
    total = sum(p.numel() * 2 for p in model.parameters() if id(p) not in training_only)
    return total - sum(unit_bytes(plan, unit, FLOAT_BITS, shapes) for unit in plan.units)


def plan_size(
    plan: KDQPlan, shapes: dict[str, torch.Size], *, fixed_bytes: int, stored_float: frozenset[str] = frozenset()
) -> int:
    """The plan's size at its units' bits (``stored_float`` units at fp16)."""
    return fixed_bytes + sum(
        unit_bytes(plan, u, FLOAT_BITS if u.name in stored_float else u.bits, shapes) for u in plan.units
    )


def smallest_bytes(
    plan: KDQPlan,
    shapes: dict[str, torch.Size],
    bit_choices: tuple[int, ...],
    *,
    fixed_bytes: int,
    stored_float: frozenset[str] = frozenset(),
) -> int:
    """The plan's size with every quantized unit at the lowest of ``bit_choices``."""
    lowest = min(bit_choices)
    return fixed_bytes + sum(
        unit_bytes(plan, u, FLOAT_BITS if u.name in stored_float else lowest, shapes) for u in plan.units
    )


class UnreachableBudgetError(ValueError):
    """The size budget is below the plan's size with every quantized unit at the lowest bits."""

    def __init__(self, plan: KDQPlan, budget: int, minimum: int, bit_choices: tuple[int, ...]):
        self.budget, self.minimum = budget, minimum
        fixes = [f"raise the budget to at least that (size_budget_mb={self.minimum_mb})"]
        if min(bit_choices) > 2:
            fixes.append("allow lower bit widths (quant_bit_choices, e.g. 2,3,4,8)")
        if any(not u.modules for u in plan.units) or not any(u.side == "embedding" for u in plan.units):
            fixes.append("quantize more (quant_targets encoder,decoder,embedding)")
        fixes.append("use a smaller student (fewer layers, or a smaller Whisper)")
        super().__init__(
            f"size budget {budget / 1e6:.2f} MB is below what this student reaches at the lowest bits "
            f"({minimum / 1e6:.2f} MB): " + ", ".join(fixes[:-1]) + f" or {fixes[-1]}"
        )

    @property
    def minimum_mb(self) -> float:
        """The smallest size in MB, rounded up to 0.1 MB: a ``size_budget_mb`` that is reachable."""
        return math.ceil(self.minimum / 1e5) / 10


RULES = {
    "output_kl": "bits: greedy descent from the highest bits under the size budget, the unit whose next lower bits "
    "add the least output_cost per byte saved steps down, then units step back up while they fit, the most "
    "output_cost removed per byte added first; output_cost[b] = teacher-forced KL(teacher||student) on "
    "the probe batches (nats/label token) with that unit alone at b bits, minus the float student's; kept only if its "
    "joint probe KL is no higher than the best uniform allocation that fits (probe_kl). Distilled: the "
    "num_distill_layers layers of highest output_cost at their bits.",
    "local_error": "bits: greedy descent from the highest bits under the size budget, the unit whose next lower bits "
    "add the least w_l * quant_loss per byte saved steps down; quant_loss[b] = relative output error of the unit's "
    "own linears at b bits, w_l = distill_loss / mean(distill_loss). Distilled: the num_distill_layers layers of "
    "highest quant_loss at their bits.",
}


def unit_harm(plan: KDQPlan, rule: str) -> Callable[[UnitPlan, int], float]:
    """The harm of a unit at some bits that ``rule`` (a key of `RULES`) minimizes."""
    if rule == "output_kl":
        return lambda u, bits: u.output_cost.get(bits, 0.0)
    distill = [u.distill_loss for u in plan.units if u.distill_loss is not None]
    mean_d = sum(distill) / len(distill) if distill else 1.0
    floor = 0.05 * mean_d if mean_d > 0 else 1.0  # keeps a perfectly matched layer's weight above zero

    def weighted_quant_loss(u: UnitPlan, bits: int) -> float:
        weight = ((u.distill_loss if u.distill_loss is not None else mean_d) + floor) / (mean_d + floor)
        return weight * u.quant_loss.get(bits, 0.0)

    return weighted_quant_loss


def uniform_bits(
    plan: KDQPlan,
    shapes: dict[str, torch.Size],
    bit_choices: tuple[int, ...],
    *,
    fixed_bytes: int,
    budget_bytes: int | None,
    stored_float: frozenset[str] = frozenset(),
) -> int | None:
    """The highest integer bit width of ``bit_choices`` at which every quantizable unit fits the budget (units
    stored in float count fp16), or None when none does."""
    for bits in sorted((b for b in bit_choices if b < FLOAT_BITS), reverse=True):
        size = fixed_bytes + sum(
            unit_bytes(plan, u, FLOAT_BITS if u.name in stored_float else bits, shapes) for u in plan.units if u.modules
        )
        if budget_bytes is None or size <= budget_bytes:
            return bits
    return None


def _fill_up(units: list[UnitPlan], choices: list[int], harm, billed, size: int, budget_bytes: int) -> int:
    """Raise units back while they fit, the most harm removed per byte added first: the descent's last step can
    overshoot by a large unit's whole step (the embedding's is six decoder layers' bytes). A step whose measured
    harm does not fall is taken too, last: more bits never quantize worse, and a cost measured a few thousandths of
    a nat higher at more bits is the probe batches' noise. Returns the new size."""
    while True:
        best = None
        for u in units:
            position = choices.index(u.bits)
            if position == 0:
                continue
            higher = choices[position - 1]
            added = billed(u, higher) - billed(u, u.bits)
            gain = (harm(u, u.bits) - harm(u, higher)) / max(added, 1)
            if size + added <= budget_bytes and (best is None or gain > best[0]):
                best = (gain, u, higher, added)
        if best is None:
            return size
        _, unit, higher, added = best
        unit.bits = higher
        size += added


def allocate_bits(
    plan: KDQPlan,
    shapes: dict[str, torch.Size],
    bit_choices: tuple[int, ...],
    *,
    fixed_bytes: int,
    budget_bytes: int | None,
    stored_float: frozenset[str] = frozenset(),
    cost: str = "output_kl",
) -> None:
    """Assign bits in place (greedy descent, see the module docstring) from the units' ``output_cost``, or with
    ``cost="local_error"`` from their ``d_l``-weighted ``quant_loss`` (the previous rule).

    Without a budget every unit gets the highest integer bit width among the choices. ``fixed_bytes`` is
    everything the plan does not quantize (fp16 norms, biases, convolutions, positions, float embedding).
    ``stored_float`` names units whose export stores them in fp16 whatever their bits (the embedding in the packed
    format): they cost fp16 bytes, so lowering their bits saves nothing and they keep the highest choice.
    """

    def billed(unit: UnitPlan, bits: int) -> int:
        return unit_bytes(plan, unit, FLOAT_BITS if unit.name in stored_float else bits, shapes)

    choices = sorted(bit_choices, reverse=True)
    quantizable = [u for u in plan.units if u.modules]
    if budget_bytes is None:
        integer = [b for b in choices if b < FLOAT_BITS]
        for unit in quantizable:
            unit.bits = integer[0] if integer else FLOAT_BITS
    else:
        harm = unit_harm(plan, cost)
        for unit in quantizable:
            unit.bits = choices[0]
        size = fixed_bytes + sum(billed(u, u.bits) for u in quantizable)
        while size > budget_bytes:
            best = None
            for u in quantizable:
                position = choices.index(u.bits)
                if position + 1 == len(choices):
                    continue
                lower = choices[position + 1]
                saved = billed(u, u.bits) - billed(u, lower)
                ratio = (harm(u, lower) - harm(u, u.bits)) / max(saved, 1)
                if saved > 0 and (best is None or ratio < best[0]):
                    best = (ratio, u, lower, saved)
            if best is None:
                minimum = smallest_bytes(plan, shapes, bit_choices, fixed_bytes=fixed_bytes, stored_float=stored_float)
                raise UnreachableBudgetError(plan, budget_bytes, minimum, bit_choices)
            _, unit, lower, saved = best
            unit.bits = lower
            size -= saved
        if cost == "output_kl":
            size = _fill_up(quantizable, choices, harm, billed, size, budget_bytes)
    plan.budget_bytes = budget_bytes
    plan.size_bytes = plan_size(plan, shapes, fixed_bytes=fixed_bytes, stored_float=stored_float)
    plan.rule = RULES[cost]


def choose_distillation_layers(plan: KDQPlan, count: int, sides: tuple[str, ...], cost: str = "output_kl") -> None:
    """Mark the ``count`` layers (of the given sides) that quantization damages most at their assigned bits as
    distilled (highest ``output_cost``, or ``quant_loss`` with ``cost="local_error"``); ties broken by depth (deeper
    first), deterministically."""
    candidates = [u for u in plan.units if u.side in sides and u.teacher_layer is not None]
    damage = (
        (lambda u: u.output_cost.get(u.bits, 0.0)) if cost == "output_kl" else (lambda u: u.quant_loss.get(u.bits, 0.0))
    )
    ranked = sorted(candidates, key=lambda u: (damage(u), u.side == "decoder", u.index), reverse=True)
    chosen = {u.name for u in ranked[:count]}
    for unit in plan.units:
        unit.distilled = unit.name in chosen


def float_stored_units(args) -> frozenset[str]:
    """Units that count at fp16 in the budget: the embedding under on-disk accounting when the bit choices allow
    several integer widths (a packed file of mixed widths keeps it in fp16; one of a single width stores it packed,
    see export.compressed)."""
    one_width = len({bits for bits in args.bit_choices if bits < FLOAT_BITS}) <= 1
    return frozenset({"embedding"} if args.size_budget_accounting == "on_disk" and not one_width else ())


def check_size_budget(model, plan: KDQPlan, args, teacher_fp16_bytes: int) -> None:
    """Raise before training (and before a long data phase) when no allocation of ``args.bit_choices`` fits the
    size budget, with the smallest size this student reaches."""
    budget = args.budget_bytes(teacher_fp16_bytes)
    if budget is None or args.quant_format == "ggml":  # ggml_budget.fit_ggml_budget checks the file's bytes
        return
    shapes = plan_shapes(model, plan)
    minimum = smallest_bytes(
        plan,
        shapes,
        args.bit_choices,
        fixed_bytes=fixed_bytes(model, plan, shapes),
        stored_float=float_stored_units(args),
    )
    if minimum > budget:
        raise UnreachableBudgetError(plan, budget, minimum, args.bit_choices)
