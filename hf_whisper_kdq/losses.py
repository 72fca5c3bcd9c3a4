"""Loss terms of guided distillation + quantization, as pure functions.

Every function returns a *sum* divided by an explicit normalizer, so that the trainer can make gradient
accumulation exact: token-level terms are divided by ``num_items_in_batch`` (all label tokens of the
accumulated batch, counted by the Trainer), frame-level terms by the frames of the accumulated batch. With
``normalizer=None`` a term falls back to the mean over its own batch, which is what evaluation wants.

Shapes: B batch, T decoder positions, V vocabulary, S encoder frames, D / D_t hidden widths.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from functools import partial

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


class NonFiniteLossError(RuntimeError):
    """A training loss term became NaN or infinite; ``step`` and ``terms`` (the non-finite ones) say where."""

    def __init__(self, message: str, *, step: int, terms: list[str]):
        super().__init__(message)
        self.step, self.terms = step, terms

    def __reduce__(self):
        # The keyword-only constructor would otherwise break pickling (e.g. out of a launcher's worker process).
        return partial(NonFiniteLossError, self.args[0], step=self.step, terms=self.terms), ()


def _normalize(total: torch.Tensor, count: torch.Tensor | int, normalizer: torch.Tensor | float | None):
    denominator = count if normalizer is None else normalizer
    if torch.is_tensor(denominator):
        denominator = denominator.to(total.device, total.dtype).clamp_min(1)
        return total / denominator
    return total / max(float(denominator), 1.0)


def cross_entropy_loss(
    logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch: torch.Tensor | int | None = None
) -> torch.Tensor:
    """Token cross-entropy against the labels.

    Args:
        logits: [B, T, V] student logits, aligned with ``labels`` (Whisper shifts its decoder inputs, not its
            labels), or any [..., V] with labels [...] (e.g. packed [N, V] rows of the labelled positions).
        labels: [B, T] token ids, ``-100`` where there is nothing to predict.
        num_items_in_batch: label tokens of the whole accumulated batch; defaults to this batch's count.

    Returns:
        Scalar: summed token loss / normalizer.
    """
    total = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return _normalize(total, labels.ne(IGNORE_INDEX).sum(), num_items_in_batch)


class _SoftenedKL(torch.autograd.Function):
    """``sum KL(softmax(t / T) ‖ softmax(s / T))`` over the rows in ``runs`` (``[start, end)`` ranges) of ``[N, V]``
    logits, with the gradient ``(softmax(s / T) - softmax(t / T)) / T`` computed in the same pass.

    Written out rather than composed from log_softmax/kl_div because autograd over the composition keeps four
    ``[N, V]`` intermediates (V: whisper's 51,865-way vocabulary) and copies the selected rows twice; this walks the
    rows in chunks that stay in the CPU's cache (timings: benchmarks/README.md, "CPU step time, session 6").
    """

    @staticmethod
    def forward(
        ctx,
        student: torch.Tensor,
        teacher: torch.Tensor,
        runs: list[tuple[int, int]],
        temperature: float,
        with_gradient: bool,
    ):
        chunk = max(1, (_KL_CHUNK_ELEMENTS if student.device.type == "cpu" else 2**27) // student.shape[-1])
        grad = torch.empty_like(student, dtype=torch.float32) if with_gradient else None
        total = student.new_zeros((), dtype=torch.float32)
        done = 0  # rows before it are either computed or zeroed in grad
        for run_start, run_end in runs:
            if grad is not None:
                grad[done:run_start] = 0  # padding rows get no gradient
            for start in range(run_start, run_end, chunk):
                end = min(start + chunk, run_end)
                student_log_probs = F.log_softmax(_soften(student[start:end], temperature), dim=-1)
                teacher_log_probs = F.log_softmax(_soften(teacher[start:end], temperature), dim=-1)
                teacher_probs = teacher_log_probs.exp()
                total += (teacher_probs * (teacher_log_probs - student_log_probs)).sum()
                if grad is not None:
                    torch.sub(student_log_probs.exp_(), teacher_probs, out=grad[start:end])
                    if temperature != 1.0:
                        grad[start:end].div_(temperature)
            done = run_end
        if grad is not None:
            grad[done:] = 0
        ctx.save_for_backward(grad)
        ctx.student_dtype = student.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return (grad * grad_total).to(ctx.student_dtype), None, None, None, None


def _soften(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    logits = logits.float()
    return logits if temperature == 1.0 else logits / temperature


def _runs(mask: torch.Tensor) -> list[tuple[int, int]]:
    """``[start, end)`` ranges of consecutive True entries of a 1-D bool mask (each row's label positions)."""
    positions = mask.nonzero().squeeze(1)
    if len(positions) == 0:
        return []
    breaks = ((positions[1:] - positions[:-1]) != 1).nonzero().squeeze(1) + 1
    starts = torch.cat([positions[:1], positions[breaks]]).tolist()
    ends = torch.cat([positions[breaks - 1] + 1, positions[-1:] + 1]).tolist()
    return list(zip(starts, ends))


# Elements of a CPU chunk of _SoftenedKL: ~40 rows of whisper's vocabulary, 8 MB of float32, in the range of chunk
# sizes that ran fastest (benchmarks/README.md, "CPU step time, session 6").
_KL_CHUNK_ELEMENTS = 2**21


def logit_distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    num_items_in_batch: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """``T² · KL(teacher ‖ student)`` of temperature-softened distributions, over label positions only.

    The ``T²`` factor keeps gradient magnitudes comparable across temperatures (Hinton et al., 2015).

    Args:
        student_logits: [B, T, V], or any [..., V] with labels [...] (e.g. packed [N, V] rows).
        teacher_logits: same shape and vocabulary (the trainer checks the tokenizers match); no gradient flows
            to them.
        labels: [B, T]; positions with ``-100`` (padding) contribute nothing.
        temperature: softening temperature, > 0.
        num_items_in_batch: as in :func:`cross_entropy_loss`.

    Returns:
        Scalar; exactly 0 when the two logits are equal.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} != teacher logits {tuple(teacher_logits.shape)}"
        )
    mask = labels.ne(IGNORE_INDEX)
    vocabulary = student_logits.shape[-1]
    # needs_input_grad does not see no_grad (evaluation): the gradient pass is asked for explicitly.
    with_gradient = torch.is_grad_enabled() and student_logits.requires_grad
    kl = _SoftenedKL.apply(
        student_logits.reshape(-1, vocabulary),
        teacher_logits.reshape(-1, vocabulary).detach(),
        _runs(mask.reshape(-1)),
        float(temperature),
        with_gradient,
    )
    return _normalize(kl * temperature**2, mask.sum(), num_items_in_batch)


def top_k_distillation_loss(
    student_logits: torch.Tensor,
    teacher_top_logits: torch.Tensor,
    teacher_top_indices: torch.Tensor,
    teacher_log_normaliser: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    num_items_in_batch: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """``T² · KL`` of temperature-softened distributions over k + 1 buckets: the teacher's k most likely tokens and
    one bucket of all the other tokens, over label positions only.

    What a teacher cache that keeps only the k largest logits and the log-normaliser can compute: the teacher's
    probabilities of those k tokens are exact, the rest is known only as one total. It is at most the full KL (the
    data-processing inequality), and equals it when the student's tail is proportional to the teacher's.

    Args:
        student_logits: [..., V] (e.g. packed [N, V] rows); the gradient flows to them.
        teacher_top_logits: [..., k] the teacher's k largest logits (at temperature 1).
        teacher_top_indices: [..., k] their token ids (long).
        teacher_log_normaliser: [...] ``logsumexp(teacher_logits / T)`` over the whole vocabulary.
        labels: [...]; positions with ``-100`` contribute nothing.
        temperature: softening temperature, > 0, the one the log-normaliser was computed at.
        num_items_in_batch: as in :func:`cross_entropy_loss`.

    Returns:
        Scalar; 0 when the student's logits are the teacher's.
    """
    mask = labels.ne(IGNORE_INDEX)
    student = _soften(student_logits[mask], temperature)  # [N, V]
    indices = teacher_top_indices[mask]
    teacher_top = _soften(teacher_top_logits[mask], temperature) - teacher_log_normaliser[mask].float()[:, None]
    student_normaliser = torch.logsumexp(student, dim=-1, keepdim=True)
    student_top = student.gather(-1, indices) - student_normaliser
    kl = (teacher_top.exp() * (teacher_top - student_top)).sum()
    if indices.shape[-1] < student.shape[-1]:  # else no token is left for a rest bucket
        # Its log-probabilities: the teacher's from its top mass, the student's from its other logits (log(1 - Σ
        # top) would lose the student's small tail to cancellation).
        teacher_rest_probs = -torch.expm1(torch.logsumexp(teacher_top, dim=-1).clamp_max(0))
        student_rest = torch.logsumexp(student.scatter(-1, indices, -math.inf), dim=-1) - student_normaliser[:, 0]
        rest = teacher_rest_probs * (torch.log(teacher_rest_probs) - student_rest)
        kl = kl + torch.where(teacher_rest_probs > 0, rest, 0.0).sum()
    return _normalize(kl * temperature**2, mask.sum(), num_items_in_batch)


def hidden_distillation_loss(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    normalizer: torch.Tensor | float | None = None,
    relative: bool = False,
) -> torch.Tensor:
    """Mean squared error per position between a student representation and its matched teacher layer.

    Args:
        student_hidden: [B, L, D_t] (already mapped to the teacher's width by an adapter when widths differ).
        teacher_hidden: [B, L, D_t], no gradient needed.
        mask: [B, L] bool, positions that count (decoder: label tokens); None counts every position
            (encoder frames).
        normalizer: positions of the whole accumulated batch (``num_items_in_batch`` for decoder states).
        relative: divide each position's error by mean_D t² of that position (scale-free). Per position, so
            the sum over positions still splits exactly across micro-batches.

    Returns:
        Scalar: Σ over counted positions of mean_D (s − t)² (÷ mean_D t² when ``relative``), divided by the
        normalizer.
    """
    if student_hidden.shape != teacher_hidden.shape:
        raise ValueError(f"hidden shapes differ: {tuple(student_hidden.shape)} vs {tuple(teacher_hidden.shape)}")
    teacher_hidden = teacher_hidden.float()
    per_position = (student_hidden.float() - teacher_hidden).pow(2).mean(dim=-1)
    if relative:
        per_position = per_position / teacher_hidden.pow(2).mean(dim=-1).clamp_min(1e-6)
    if mask is not None:
        per_position = per_position * mask
        count = mask.sum()
    else:
        count = per_position.numel()
    return _normalize(per_position.sum(), count, normalizer)


def quantization_loss(weight: torch.Tensor, fake_quantized_weight: torch.Tensor) -> torch.Tensor:
    """Relative squared error ``‖w − q(w)‖² / ‖w‖²`` of one weight matrix (any shape).

    Scale-free, so layers of different sizes and magnitudes add up meaningfully. Its gradient reaches both
    the weight (pulling it towards the quantization grid) and learnable clipping parameters.
    """
    return (weight.float() - fake_quantized_weight.float()).pow(2).sum() / weight.float().pow(2).sum().clamp_min(1e-12)


def check_finite_terms(
    terms: Mapping[str, torch.Tensor],
    *,
    step: int,
    across_processes: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> None:
    """Raise :class:`NonFiniteLossError` when any loss term is NaN or infinite.

    One device sync for all terms. Stopping here, before the backward pass, keeps the weights and the checkpoints
    already written from the diverged step.

    Args:
        terms: term name (``ce``, ``kd``, ``hidden``, ``quant``) → scalar loss.
        step: the optimizer step being computed (1-based, as logged).
        across_processes: sums a scalar tensor over the processes of a multi-process run. With it, every process
            stops when any one diverges: alone, the others would wait for it in their next collective until the
            launcher's timeout.
    """
    values = torch.stack([value.detach().float().reshape(()) for value in terms.values()])
    diverged_here = (~torch.isfinite(values)).any().float()
    diverged = across_processes(diverged_here) if across_processes is not None else diverged_here
    if not bool(diverged > 0):
        return
    if not bool(diverged_here > 0):
        raise NonFiniteLossError(
            f"the loss became non-finite at step {step} in another process (its error names the term); this "
            "process stops with it. The checkpoints already written are kept",
            step=step,
            terms=[],
        )
    values = values.tolist()
    bad = [name for name, value in zip(terms, values) if not math.isfinite(value)]
    shown = ", ".join(f"{name}={value:.4g}" for name, value in zip(terms, values))
    raise NonFiniteLossError(
        f"the loss became non-finite at step {step} in term(s) {', '.join(bad)} ({shown}); training stopped before "
        "this step's update and the checkpoints already written are kept. Fix: lower learning_rate or set "
        "max_grad_norm, train in bf16 or fp32 instead of fp16, check the inputs of this step for NaN/inf (and the "
        "teacher when only kd or hidden diverged), then resume from the last checkpoint (resume_from_checkpoint)",
        step=step,
        terms=bad,
    )
