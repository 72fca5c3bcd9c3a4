"""Size budgets of whisper.cpp files: the plan of a ``quant_format="ggml"`` student.

whisper.cpp's loader sizes every 2-D weight of a file from the header's one type (a file with per-tensor types is
refused: "wrong size in model file"), so a student trained for that file has one type for all its quantized layers:
the widest of its bit choices (q8_0 > q4_0 > q3_K > q2_K) whose file fits the size budget. The budget bills the file as
`export.ggml.ggml_file_bytes` counts it, byte for byte what `export_whisper_cpp` writes: header, mel filters and
vocabulary, conv weights in fp16, positional embeddings, LayerNorms and biases in float32, every other 2-D weight
(the token embedding included) in the type's blocks. The guided selection still measures every unit and chooses which
layers are distilled (`selection.choose_distillation_layers`); only the bits are uniform.
"""

from __future__ import annotations

from torch import nn

from .config import GGML_TYPE_OF_BITS
from .export.ggml import check_architecture, ggml_file_bytes
from .quant import FLOAT_BITS
from .selection import KDQPlan, UnreachableBudgetError, plan_shapes

RULE = (
    "bits: one ggml type for every quantized unit (whisper.cpp holds one type per file), the widest of "
    "quant_bit_choices (8 q8_0, 4 q4_0, 3 q3_K, 2 q2_K) whose whisper.cpp file fits the size budget, billed as the file's "
    "bytes. Distilled: the num_distill_layers layers of highest output_cost at those bits."
)


class GGMLBudgetError(UnreachableBudgetError):
    """No allowed ggml type gives a whisper.cpp file within the size budget."""

    def __init__(self, budget: int, sizes: dict[int, int]):
        self.budget, self.minimum = budget, min(sizes.values())
        smallest = GGML_TYPE_OF_BITS[min(sizes)]
        fixes = [f"raise size_budget_mb to at least {self.minimum_mb}"]
        smaller = sorted((bits for bits in GGML_TYPE_OF_BITS if bits < min(sizes)), reverse=True)
        if smaller:
            allowed = ",".join(map(str, sorted(set(sizes) | set(smaller))))
            k_quants = " (the k-quants need rows of a multiple of 256)" if min(smaller) < 4 else ""
            fixes.append(
                f"allow {' or '.join(GGML_TYPE_OF_BITS[b] for b in smaller)} (quant_bit_choices {allowed}){k_quants}"
            )
        ValueError.__init__(
            self,
            f"size budget {budget / 1e6:.2f} MB is below this student's smallest whisper.cpp file "
            f"({self.minimum / 1e6:.2f} MB as {smallest}; files: "
            + ", ".join(f"{GGML_TYPE_OF_BITS[b]} {size / 1e6:.2f} MB" for b, size in sorted(sizes.items()))
            + "). Fix: "
            + ", ".join(fixes)
            + ", or use a smaller student (fewer layers, or a smaller Whisper)",
        )


def ggml_file_sizes(model: nn.Module, processor, bit_choices: tuple[int, ...]) -> dict[int, int]:
    """Bytes of ``model``'s whisper.cpp file in the ggml type of each integer bit choice."""
    return {
        bits: ggml_file_bytes(model, processor, GGML_TYPE_OF_BITS[bits]) for bits in bit_choices if bits < FLOAT_BITS
    }


def fit_ggml_budget(plan: KDQPlan, model: nn.Module, processor, args, teacher_fp16_bytes: int) -> None:
    """Give every quantized unit of ``plan`` the widest ggml type of ``args.bit_choices`` whose whisper.cpp file fits
    ``args``' size budget (the widest without a budget), in place, and record the file's bytes as the plan's size.

    Raises ValueError before any training when whisper.cpp cannot run the model (feed-forward width ``4 * d_model``,
    rows of a multiple of the block: the k-quants' 256), when the budget needs a ``processor`` and none is given (the file holds its vocabulary), and
    `GGMLBudgetError` when no type's file fits.
    """
    plan.quant_format = "ggml"
    choices = [bits for bits in sorted(args.bit_choices, reverse=True) if bits < FLOAT_BITS]
    for bits in choices:  # a model whisper.cpp cannot run is refused before training for it
        check_architecture(model.config, GGML_TYPE_OF_BITS[bits])
    for name, shape in plan_shapes(model, plan).items():
        for bits in choices:
            plan.spec(bits).check_shape(shape, name)
    budget = args.budget_bytes(teacher_fp16_bytes)
    if budget is not None and processor is None:
        raise ValueError(
            "quant_format='ggml' bills the size budget as the whisper.cpp file's bytes, and the file holds the "
            "tokenizer's vocabulary: pass the WhisperProcessor (processing_class=processor)"
        )
    sizes = ggml_file_sizes(model, processor, tuple(choices)) if processor is not None else {}
    fitting = [bits for bits in choices if budget is None or sizes[bits] <= budget]
    if not fitting:
        raise GGMLBudgetError(budget, sizes)
    for unit in plan.units:
        if unit.modules:
            unit.bits = fitting[0]
    plan.budget_bytes = budget
    plan.size_bytes = sizes.get(fitting[0])
    plan.rule = RULE
