"""The pure loss functions of guided distillation + quantization (hf_whisper_kdq.losses)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hf_whisper_kdq.losses import (
    IGNORE_INDEX,
    cross_entropy_loss,
    hidden_distillation_loss,
    logit_distillation_loss,
    quantization_loss,
)
from hf_whisper_kdq.quant import QuantSpec, fake_quantize


def _batch(seed=0, batch=3, positions=5, vocab=11):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, positions, vocab, generator=generator)
    labels = torch.randint(0, vocab, (batch, positions), generator=generator)
    labels[0, 3:] = IGNORE_INDEX  # rows of different lengths
    labels[2, 1:] = IGNORE_INDEX
    return logits, labels


# ---- logit distillation -------------------------------------------------------------------------------


def test_kd_is_zero_for_identical_logits():
    logits, labels = _batch()
    for temperature in (0.5, 1.0, 4.0):
        loss = logit_distillation_loss(logits, logits.clone(), labels, temperature=temperature)
        assert loss.item() == pytest.approx(0.0, abs=1e-6)


def test_kd_is_positive_and_equals_t2_times_kl_of_softened_distributions():
    student, labels = _batch(seed=1)
    teacher, _ = _batch(seed=2)
    mask = labels.ne(IGNORE_INDEX)
    for temperature in (1.0, 2.0, 5.0):
        loss = logit_distillation_loss(student, teacher, labels, temperature=temperature)
        p = F.softmax(teacher[mask] / temperature, dim=-1)
        kl = (p * (p.log() - F.log_softmax(student[mask] / temperature, dim=-1))).sum(-1).mean()
        assert loss.item() > 0
        assert loss.item() == pytest.approx(temperature**2 * kl.item(), rel=1e-5)


def test_kd_t2_scaling_keeps_the_loss_of_scaled_logits_constant():
    # KL of softmax(z/T) is invariant when both logits and T are multiplied by c, so T²·KL scales exactly by c².
    student, labels = _batch(seed=3)
    teacher, _ = _batch(seed=4)
    base = logit_distillation_loss(student, teacher, labels, temperature=1.0)
    scaled = logit_distillation_loss(3 * student, 3 * teacher, labels, temperature=3.0)
    assert scaled.item() == pytest.approx(9 * base.item(), rel=1e-5)
    # and at a high temperature T²·KL tends to the (finite) logit-matching limit instead of vanishing
    far = [logit_distillation_loss(student, teacher, labels, temperature=t).item() for t in (50.0, 100.0)]
    assert far[0] == pytest.approx(far[1], rel=0.01) and far[1] > 0.01


def test_kd_ignores_masked_positions():
    student, labels = _batch(seed=5)
    teacher, _ = _batch(seed=6)
    loss = logit_distillation_loss(student, teacher, labels, temperature=2.0)
    mask = labels.eq(IGNORE_INDEX)
    assert mask.any()
    student2, teacher2 = student.clone(), teacher.clone()
    student2[mask] = torch.randn_like(student2[mask]) * 100
    teacher2[mask] = torch.randn_like(teacher2[mask]) * 100
    unchanged = logit_distillation_loss(student2, teacher2, labels, temperature=2.0)
    assert unchanged.item() == pytest.approx(loss.item(), rel=1e-6)
    # and changing a counted position does change it
    student2[~mask] += 1.0 * torch.randn_like(student2[~mask])
    changed = logit_distillation_loss(student2, teacher2, labels, temperature=2.0)
    assert changed.item() != pytest.approx(loss.item(), rel=1e-3)


def test_kd_shape_mismatch_is_an_error():
    student, labels = _batch(vocab=11)
    teacher, _ = _batch(vocab=12)
    with pytest.raises(ValueError, match="student logits .* != teacher logits"):
        logit_distillation_loss(student, teacher, labels)


def test_kd_gradient_reaches_the_student_only():
    student, labels = _batch(seed=7)
    teacher, _ = _batch(seed=8)
    student.requires_grad_(True)
    logit_distillation_loss(student, teacher, labels, temperature=2.0).backward()
    masked = labels.eq(IGNORE_INDEX)
    assert student.grad[~masked].abs().sum() > 0
    assert student.grad[masked].abs().sum() == 0


@pytest.mark.parametrize("chunk_rows", [None, 3], ids=["one_chunk", "chunks_of_3_rows"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kd_gradient_equals_autograd_over_the_formula(temperature, chunk_rows, monkeypatch):
    import hf_whisper_kdq.losses as losses

    if chunk_rows:  # runs longer than a chunk, and chunks that end inside a run
        monkeypatch.setattr(losses, "_KL_CHUNK_ELEMENTS", chunk_rows * _batch(seed=11)[0].shape[-1])
    student, labels = _batch(seed=11)
    teacher, _ = _batch(seed=12)
    mask = labels.ne(IGNORE_INDEX)
    assert not bool(mask.all())
    fast = student.clone().requires_grad_(True)
    reference = student.clone().requires_grad_(True)
    logit_distillation_loss(fast, teacher, labels, temperature=temperature, num_items_in_batch=7).backward()
    p = F.softmax(teacher[mask] / temperature, dim=-1)
    kl = (p * (p.log() - F.log_softmax(reference[mask] / temperature, dim=-1))).sum()
    (kl * temperature**2 / 7).backward()
    torch.testing.assert_close(fast.grad, reference.grad, rtol=1e-5, atol=1e-7)


def test_kd_of_bf16_logits_gives_a_bf16_gradient():
    student, labels = _batch(seed=13)
    teacher, _ = _batch(seed=14)
    student = student.bfloat16().requires_grad_(True)
    logit_distillation_loss(student, teacher.bfloat16(), labels).backward()
    assert student.grad.dtype == torch.bfloat16 and float(student.grad.float().abs().sum()) > 0


# ---- cross-entropy and normalization --------------------------------------------------------------------


def test_ce_equals_torch_mean_ce_without_num_items():
    logits, labels = _batch(seed=9)
    expected = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
    assert cross_entropy_loss(logits, labels).item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("loss_name", ["ce", "kd", "hidden_masked", "hidden_relative"])
def test_halves_normalized_by_total_items_add_up_to_the_full_batch(loss_name):
    logits, labels = _batch(seed=10, batch=4, positions=6)
    teacher, _ = _batch(seed=11, batch=4, positions=6)
    labels[1, 2:] = IGNORE_INDEX  # the halves hold different numbers of tokens: a mean of means would differ
    total_items = labels.ne(IGNORE_INDEX).sum()

    def loss(part, normalizer):
        if loss_name == "ce":
            return cross_entropy_loss(logits[part], labels[part], normalizer)
        if loss_name == "kd":
            return logit_distillation_loss(
                logits[part], teacher[part], labels[part], temperature=2.0, num_items_in_batch=normalizer
            )
        mask = labels[part].ne(IGNORE_INDEX)
        return hidden_distillation_loss(
            logits[part], teacher[part], mask=mask, normalizer=normalizer, relative=loss_name == "hidden_relative"
        )

    full = loss(slice(None), None)
    halves = loss(slice(0, 2), total_items) + loss(slice(2, 4), total_items)
    assert halves.item() == pytest.approx(full.item(), rel=1e-5)
    # an int normalizer behaves as the tensor one
    halves = loss(slice(0, 2), int(total_items)) + loss(slice(2, 4), int(total_items))
    assert halves.item() == pytest.approx(full.item(), rel=1e-5)
    # the mean of the two half-batch means is different here (that is what num_items_in_batch fixes)
    assert (loss(slice(0, 2), None) + loss(slice(2, 4), None)).item() / 2 != pytest.approx(full.item(), rel=1e-3)


def test_ce_with_no_label_tokens_is_zero_not_nan():
    logits, labels = _batch()
    labels[:] = IGNORE_INDEX
    assert cross_entropy_loss(logits, labels).item() == 0.0
    assert logit_distillation_loss(logits, logits + 1, labels).item() == 0.0


# ---- hidden states ---------------------------------------------------------------------------------------


def test_hidden_loss_without_mask_is_mean_squared_error():
    generator = torch.Generator().manual_seed(12)
    student = torch.randn(2, 7, 16, generator=generator)
    teacher = torch.randn(2, 7, 16, generator=generator)
    mse = F.mse_loss(student, teacher).item()
    assert hidden_distillation_loss(student, teacher).item() == pytest.approx(mse, rel=1e-6)
    assert hidden_distillation_loss(teacher.clone(), teacher).item() == 0.0
    # frame normalizer: sum over positions divided by the given count
    assert hidden_distillation_loss(student, teacher, normalizer=28).item() == pytest.approx(
        F.mse_loss(student, teacher).item() * 14 / 28, rel=1e-6
    )


def test_hidden_loss_with_mask_counts_only_masked_positions():
    generator = torch.Generator().manual_seed(13)
    student = torch.randn(2, 7, 16, generator=generator)
    teacher = torch.randn(2, 7, 16, generator=generator)
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[0, :3] = True
    mask[1, :5] = True
    loss = hidden_distillation_loss(student, teacher, mask=mask)
    assert loss.item() == pytest.approx(F.mse_loss(student[mask], teacher[mask]).item(), rel=1e-6)
    changed = student.clone()
    changed[~mask] = 1000.0
    assert hidden_distillation_loss(changed, teacher, mask=mask).item() == pytest.approx(loss.item(), rel=1e-6)


def test_relative_hidden_loss_is_scale_free_and_zero_on_a_match():
    generator = torch.Generator().manual_seed(14)
    student = torch.randn(2, 7, 16, generator=generator)
    teacher = torch.randn(2, 7, 16, generator=generator)
    relative = hidden_distillation_loss(student, teacher, relative=True).item()
    # states 10× larger: the absolute loss grows 100×, the relative one does not move
    assert hidden_distillation_loss(10 * student, 10 * teacher).item() == pytest.approx(
        100 * hidden_distillation_loss(student, teacher).item(), rel=1e-5
    )
    assert hidden_distillation_loss(10 * student, 10 * teacher, relative=True).item() == pytest.approx(
        relative, rel=1e-5
    )
    per_position = (student - teacher).pow(2).mean(-1) / teacher.pow(2).mean(-1)
    assert relative == pytest.approx(per_position.mean().item(), rel=1e-5)
    assert hidden_distillation_loss(teacher.clone(), teacher, relative=True).item() == 0.0


def test_hidden_loss_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="hidden shapes differ"):
        hidden_distillation_loss(torch.zeros(2, 3, 8), torch.zeros(2, 3, 16))


# ---- quantization ---------------------------------------------------------------------------------------


def test_quantization_loss_zero_when_equal_and_scale_free():
    generator = torch.Generator().manual_seed(14)
    weight = torch.randn(16, 64, generator=generator)
    assert quantization_loss(weight, weight.clone()).item() == 0.0
    spec = QuantSpec(4, "per_group", 32)
    loss = quantization_loss(weight, fake_quantize(weight, spec, None))
    assert 0 < loss.item() < 0.1
    # relative: scaling the weight (by a power of two: exact in floating point) leaves it unchanged
    scaled = weight * 8
    assert quantization_loss(scaled, fake_quantize(scaled, spec, None)).item() == pytest.approx(loss.item(), rel=1e-4)
    # and it equals ‖w − q‖² / ‖w‖²
    q = fake_quantize(weight, spec, None)
    assert loss.item() == pytest.approx(((weight - q).pow(2).sum() / weight.pow(2).sum()).item(), rel=1e-6)
    # fewer bits, more loss
    assert quantization_loss(weight, fake_quantize(weight, QuantSpec(2, "per_group", 32), None)) > loss


def test_quantization_loss_gradient_reaches_weight_and_clip():
    generator = torch.Generator().manual_seed(15)
    weight = torch.randn(8, 32, generator=generator).requires_grad_(True)
    spec = QuantSpec(3, "per_group", 32, learnable_clipping=True)
    clip = torch.full((8, 1), 0.9, requires_grad=True)
    quantization_loss(weight, fake_quantize(weight, spec, clip)).backward()
    assert weight.grad.abs().sum() > 0 and clip.grad.abs().sum() > 0
