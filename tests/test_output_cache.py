"""The on-disk caches of frozen models' outputs (hf_whisper_kdq.output_cache) on micro Whisper models: the teacher's
logits recomputed from its cached decoder states are its own, the KD loss is the one without the cache, the top-k
form and its bucket KL, the size of an entry, reuse by a rerun, progress and the size bound's warnings, and fp16
encoder entries."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import MICRO_VOCAB, make_micro_rows, micro_collate
from conftest import micro_training_args as _args
from datasets import Dataset
from safetensors import safe_open
from transformers.modeling_outputs import BaseModelOutput
from transformers.models.whisper.modeling_whisper import shift_tokens_right

from hf_whisper_kdq.losses import IGNORE_INDEX, logit_distillation_loss, top_k_distillation_loss
from hf_whisper_kdq.output_cache import CacheFolder, EncoderOutputCache, TeacherOutputCache
from hf_whisper_kdq.students import build_student
from hf_whisper_kdq.trainer import DistillQuantTrainer

pytestmark = pytest.mark.usefixtures("single_thread", "quiet_transformers")


def _inputs(teacher, rows):
    batch = micro_collate(rows)
    ids = shift_tokens_right(batch["labels"], teacher.config.pad_token_id, teacher.config.decoder_start_token_id)
    with torch.no_grad():
        hidden = teacher.get_encoder()(batch["input_features"]).last_hidden_state
    return batch["input_features"], hidden, ids, batch["labels"]


def _expected(teacher, hidden, ids):
    """The teacher's own forward, its last decoder state taken before the final layer norm (as the cache keeps it)."""
    captured = []
    handle = teacher.model.decoder.layer_norm.register_forward_pre_hook(lambda m, args: captured.append(args[0]))
    try:
        with torch.no_grad():
            out = teacher(encoder_outputs=(hidden,), decoder_input_ids=ids, output_hidden_states=True)
    finally:
        handle.remove()
    return out.logits, (*out.decoder_hidden_states[:-1], captured[-1])


def _forward(cache, teacher, features, hidden, ids, labels, **kwargs):
    return cache.forward(teacher, features, lambda rows: hidden[rows], ids, labels, **kwargs)


def test_recomputed_logits_equal_the_teachers_in_any_padding_and_entries_are_keyed_by_the_labels(
    tmp_path, micro_whisper
):
    teacher = micro_whisper(seed=1).eval()
    short, long = (
        make_micro_rows(2, seed=5, min_tokens=2, max_tokens=3),
        make_micro_rows(1, seed=6, min_tokens=8, max_tokens=9),
    )
    cache = TeacherOutputCache(tmp_path, teacher, max_bytes=10**9)

    def check(rows):
        features, hidden, ids, labels = _inputs(teacher, rows)
        logits, states = _expected(teacher, hidden, ids)
        labelled = labels.ne(IGNORE_INDEX)
        got = _forward(cache, teacher, features, hidden, ids, labels)
        torch.testing.assert_close(got.logits[labelled], logits[labelled])
        packed = _forward(cache, teacher, features, hidden, ids, labels, logits_at=labelled)
        torch.testing.assert_close(packed.logits, logits[labelled])
        for a, b in zip(got.decoder_hidden_states, states, strict=True):
            torch.testing.assert_close(a[labelled], b[labelled])

    check(short)  # written in a batch padded to 3 tokens
    check(short + long)  # read back in a batch padded to 9
    assert (cache.misses, cache.hits) == (3, 2 + 5)
    relabelled = [{**short[0], "labels": list(reversed(short[0]["labels"]))}]
    check(relabelled)  # same audio, other transcript: another entry
    assert cache.misses == 4
    features, _, ids, labels = _inputs(teacher, relabelled)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 outputs are not the fp32 entry's
        hidden = teacher.get_encoder()(features).last_hidden_state
        _forward(cache, teacher, features, hidden, ids, labels)
    assert cache.misses == 5


def test_kd_loss_with_the_cache_equals_the_one_without_on_first_and_later_reads(tmp_path, micro_whisper):
    teacher, student = micro_whisper(seed=1).eval(), micro_whisper(seed=2).eval()
    features, hidden, ids, labels = _inputs(teacher, make_micro_rows(4, seed=7, min_tokens=2, max_tokens=9))
    labelled = labels.ne(IGNORE_INDEX)
    with torch.no_grad():
        student_logits = student(encoder_outputs=(hidden,), decoder_input_ids=ids).logits[labelled]
    exact = logit_distillation_loss(
        student_logits, _expected(teacher, hidden, ids)[0][labelled], labels[labelled], temperature=2.0
    )
    for _ in range(2):  # written, then read back by another cache of the same folder (a rerun)
        cache = TeacherOutputCache(tmp_path, teacher, max_bytes=10**9)
        packed = _forward(cache, teacher, features, hidden, ids, labels, logits_at=labelled)
        cached = logit_distillation_loss(student_logits, packed.logits, labels[labelled], temperature=2.0)
        torch.testing.assert_close(cached, exact)
    assert (cache.hits, cache.misses) == (4, 0)


def _bucket_kl(student, teacher, k, temperature):
    """KL over the teacher's top k tokens plus one bucket for the rest, in float64 from full distributions."""
    p = torch.softmax(teacher.double() / temperature, -1)
    q = torch.softmax(student.double() / temperature, -1)
    top = teacher.topk(k, dim=-1).indices
    p_top, q_top = p.gather(-1, top), q.gather(-1, top)
    p_buckets, q_buckets = p_top, q_top
    if k < teacher.shape[-1]:
        p_buckets = torch.cat([p_top, 1 - p_top.sum(-1, keepdim=True)], -1)
        q_buckets = torch.cat([q_top, 1 - q_top.sum(-1, keepdim=True)], -1)
    terms = torch.where(p_buckets > 0, p_buckets * (p_buckets.log() - q_buckets.log()), 0.0)
    return temperature**2 * terms.sum() / len(student)


@pytest.mark.parametrize("k", [1, 5, MICRO_VOCAB])
def test_top_k_bucket_kl_and_its_gradient_match_a_direct_computation(k):
    generator = torch.Generator().manual_seed(0)
    teacher = 3 * torch.randn(6, MICRO_VOCAB, generator=generator)
    student = (3 * torch.randn(6, MICRO_VOCAB, generator=generator)).requires_grad_()
    labels = torch.tensor([5, 7, IGNORE_INDEX, 9, 11, 13])
    temperature = 2.0
    top = teacher.topk(k, dim=-1)
    loss = top_k_distillation_loss(
        student, top.values, top.indices, torch.logsumexp(teacher / temperature, -1), labels, temperature=temperature
    )
    (grad,) = torch.autograd.grad(loss, student)
    kept = labels.ne(IGNORE_INDEX)
    reference_student = student.detach().double().requires_grad_()
    reference = _bucket_kl(reference_student[kept], teacher[kept], k, temperature)
    (reference_grad,) = torch.autograd.grad(reference, reference_student)
    torch.testing.assert_close(loss.double(), reference, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad.double(), reference_grad, rtol=1e-4, atol=1e-7)
    assert not grad[~kept].any()
    full = logit_distillation_loss(student.detach(), teacher, labels, temperature=temperature)
    if k == MICRO_VOCAB:  # no rest bucket: the full KL
        torch.testing.assert_close(loss.detach(), full)
    else:  # a coarser distribution: never more than the full KL
        assert float(loss) < float(full)


def _entry(cache) -> dict[str, torch.Tensor]:
    (path,) = cache.folder.glob("*/*.safetensors")
    with safe_open(path, "pt") as tensors:
        return {name: tensors.get_tensor(name) for name in tensors.keys()}


@pytest.mark.parametrize("top_k", [0, 8])
def test_an_entry_holds_the_decoder_states_of_its_positions_and_the_top_k_form(tmp_path, micro_whisper, top_k):
    """Per position: (layers + 1) fp32 states of d_model values, and with top_k, k logits, k int32 ids and a
    log-normaliser; no logits (V values a position)."""
    teacher = micro_whisper(seed=1, decoder_layers=3).eval()
    rows = make_micro_rows(1, seed=8, min_tokens=6, max_tokens=6)
    features, hidden, ids, labels = _inputs(teacher, rows)
    cache = TeacherOutputCache(tmp_path, teacher, max_bytes=10**9, top_k=top_k, temperature=2.0)
    out = _forward(cache, teacher, features, hidden, ids, labels, logits_at=labels.ne(IGNORE_INDEX))
    positions, width = labels.shape[1], teacher.config.d_model
    entry = _entry(cache)
    per_position = (3 + 1) * width * 4 + (top_k * (4 + 4) + 4 if top_k else 0)
    assert sum(t.numel() * t.element_size() for k, t in entry.items() if k != "fingerprint") == (
        positions * per_position
    )
    assert entry["decoder_hidden_states"].shape == (positions, 3 + 1, width) and "logits" not in entry
    (path,) = cache.folder.glob("*/*.safetensors")
    assert path.stat().st_size < positions * per_position + 1024  # header and fingerprint
    if top_k:
        exact = _expected(teacher, hidden, ids)[0][0]
        torch.testing.assert_close(out.top_logits, exact.topk(top_k, -1).values)
        assert torch.equal(out.top_indices, exact.topk(top_k, -1).indices)
        torch.testing.assert_close(out.log_normaliser, torch.logsumexp(exact / 2.0, -1))
        other_temperature = TeacherOutputCache(tmp_path, teacher, max_bytes=10**9, top_k=top_k, temperature=1.0)
        _forward(other_temperature, teacher, features, hidden, ids, labels)
        assert other_temperature.misses == 1  # its log-normaliser is another entry's


def test_a_rerun_reuses_every_entry_without_running_the_teacher(tmp_path, micro_whisper, caplog):
    teacher = micro_whisper(seed=1).eval()
    features, hidden, ids, labels = _inputs(teacher, make_micro_rows(5, seed=9))
    first = TeacherOutputCache(tmp_path, teacher, max_bytes=10**9)
    expected = _forward(first, teacher, features, hidden, ids, labels)

    def no_encoder(rows):
        raise AssertionError(f"rows {rows} were computed again")

    again = micro_whisper(seed=1).eval()  # the same weights loaded again: same fingerprint, same keys
    with caplog.at_level(logging.INFO, logger="hf_whisper_kdq.output_cache"):
        rerun = TeacherOutputCache(CacheFolder(tmp_path, 10**9), again, expected_rows=5)
        got = rerun.forward(again, features, no_encoder, ids, labels)
    assert (rerun.hits, rerun.misses) == (5, 0)
    assert "teacher outputs: reusing the 5 rows cached" in caplog.text
    torch.testing.assert_close(got.logits, expected.logits)


def test_progress_the_projected_size_and_the_bound_are_logged(tmp_path, micro_whisper, caplog):
    teacher = micro_whisper(seed=1).eval()
    rows = make_micro_rows(10, seed=10, min_tokens=4, max_tokens=4)
    features, hidden, ids, labels = _inputs(teacher, rows)
    entry_bytes = 5 * (2 + 1) * teacher.config.d_model * 4  # 5 positions, 3 states
    bound = 6 * entry_bytes  # the projection for 10 rows is over it; the 7th row reaches it
    cache = TeacherOutputCache(tmp_path, teacher, max_bytes=bound, expected_rows=10)
    with caplog.at_level(logging.INFO, logger="hf_whisper_kdq.output_cache"):
        _forward(cache, teacher, features, hidden, ids, labels)
    messages = [record.getMessage() for record in caplog.records]
    assert any("teacher outputs: caching about" in m and "for the 10 training rows" in m for m in messages)
    assert any("more than the cache's bound" in m and "--encoder_cache_max_gb" in m for m in messages)
    assert any("teacher outputs: 10 of 10 rows cached by this run" in m for m in messages)
    reached = [m for m in messages if "reached its bound" in m]
    assert len(reached) == 1 and "raise --encoder_cache_max_gb" in reached[0]  # once, though later writes evict
    assert cache.store.bytes <= bound and len(list(cache.folder.glob("*/*.safetensors"))) < 10


def test_progress_counts_this_runs_rows_not_the_rows_of_earlier_runs(tmp_path, micro_whisper, caplog):
    teacher = micro_whisper(seed=1).eval()
    earlier = make_micro_rows(6, seed=10, min_tokens=4, max_tokens=4)
    _forward(
        TeacherOutputCache(tmp_path, teacher, max_bytes=10**9, expected_rows=6), teacher, *_inputs(teacher, earlier)
    )
    rows = make_micro_rows(4, seed=11, min_tokens=4, max_tokens=4)
    with caplog.at_level(logging.INFO, logger="hf_whisper_kdq.output_cache"):
        _forward(
            TeacherOutputCache(tmp_path, teacher, max_bytes=10**9, expected_rows=4), teacher, *_inputs(teacher, rows)
        )
    messages = [record.getMessage() for record in caplog.records]
    assert any("4 of 4 rows cached by this run" in m and "the folder: 10 rows" in m for m in messages), messages


class _LoudEncoder(torch.nn.Module):
    """An encoder whose outputs overflow fp16."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor([1e6]))

    def forward(self, features):
        return BaseModelOutput(last_hidden_state=features.transpose(1, 2) * self.scale)


def test_encoder_entries_are_fp16_keyed_by_model_and_bounded(tmp_path, micro_whisper):
    first, second = micro_whisper(seed=1).get_encoder(), micro_whisper(seed=2).get_encoder()
    features = micro_collate(make_micro_rows(4, seed=5))["input_features"]
    one = EncoderOutputCache(tmp_path, first, max_bytes=10**9)
    two = EncoderOutputCache(tmp_path, second, max_bytes=10**9)
    assert one.folder != two.folder
    computed = one.encode(first, features)
    with torch.no_grad():
        exact = second(features).last_hidden_state
        torch.testing.assert_close(computed, first(features).last_hidden_state.half().float())
    # The first read returns what later reads (and a rerun) get: the fp16 value.
    torch.testing.assert_close(two.encode(second, features), exact.half().float(), rtol=0, atol=0)
    assert two.misses == 4 and two.hits == 0  # the other model's entries are never hit
    assert _entry_dtype(one) == torch.float16

    loud = _LoudEncoder()
    overflow = EncoderOutputCache(tmp_path / "loud", loud, max_bytes=10**9)
    torch.testing.assert_close(overflow.encode(loud, features[:1]), features[:1].transpose(1, 2) * 1e6)
    assert _entry_dtype(overflow) == torch.float32  # fp16 would hold inf

    entry_bytes = next(one.folder.glob("*/*.safetensors")).stat().st_size
    small = EncoderOutputCache(tmp_path / "small", first, max_bytes=3 * entry_bytes)
    small.encode(first, features)
    assert len(list((tmp_path / "small").glob("*/*/*.safetensors"))) <= 3


def test_int8_entries_hold_half_the_bytes_and_give_back_what_they_store(tmp_path, micro_whisper):
    encoder = micro_whisper(seed=1).get_encoder()
    features = micro_collate(make_micro_rows(3, seed=5))["input_features"]
    with torch.no_grad():
        exact = encoder(features).last_hidden_state
    fp16 = EncoderOutputCache(tmp_path / "fp16", encoder, max_bytes=10**9, precision="fp16")
    int8 = EncoderOutputCache(tmp_path / "int8", encoder, max_bytes=10**9, precision="int8")
    fp16.encode(encoder, features)
    first = int8.encode(encoder, features)
    again = EncoderOutputCache(tmp_path / "int8", encoder, max_bytes=10**9, precision="int8")
    torch.testing.assert_close(again.encode(encoder, features), first, rtol=0, atol=0)  # epochs and reruns agree
    assert (again.hits, again.misses) == (3, 0)
    error = (first - exact).norm() / exact.norm()
    assert 0 < error < 0.02  # 127 levels per frame
    sizes = [sum(p.stat().st_size for p in cache.folder.glob("*/*.safetensors")) for cache in (fp16, int8)]
    assert sizes[1] < sizes[0]  # one byte a value instead of two, plus 4 a frame (micro widths: headers weigh)
    with safe_open(next(int8.folder.glob("*/*.safetensors")), "pt") as tensors:
        assert tensors.get_tensor("codes").dtype == torch.int8
    # fp16 and int8 entries of the same rows are different entries: a run never reads the other precision's
    assert (
        EncoderOutputCache(tmp_path / "int8", encoder, max_bytes=10**9, precision="fp16")
        .encode(encoder, features)
        .dtype
        == first.dtype
    )
    with pytest.raises(ValueError, match="choose one of auto, fp16, int8"):
        EncoderOutputCache(tmp_path, encoder, max_bytes=10**9, precision="int4")


def test_auto_precision_keeps_fp16_while_the_training_set_fits_the_bound(tmp_path, micro_whisper, caplog):
    encoder = micro_whisper(seed=1).get_encoder()
    features = micro_collate(make_micro_rows(2, seed=5))["input_features"]
    fp16_row = features.shape[-1] // 2 * encoder.config.d_model * 2
    fits = EncoderOutputCache(tmp_path, encoder, max_bytes=100 * fp16_row, expected_rows=50)
    fits.encode(encoder, features)
    with caplog.at_level(logging.INFO, logger="hf_whisper_kdq.output_cache"):
        over = EncoderOutputCache(tmp_path, encoder, max_bytes=100 * fp16_row, expected_rows=500)
        over.encode(encoder, features)
    assert (fits.precision, over.precision) == ("fp16", "int8")
    assert "storing int8 with a scale per frame" in caplog.text and "--encoder_cache_precision fp16" in caplog.text
    assert over.misses == 2  # int8 entries are not the fp16 run's


def _entry_dtype(cache) -> torch.dtype:
    path = next(cache.folder.glob("*/*.safetensors"))
    with safe_open(path, "pt") as tensors:
        return tensors.get_tensor("last_hidden_state").dtype


def test_training_with_the_top_k_cache_uses_the_bucket_kl(tmp_path, micro_whisper):
    """With teacher_cache_top_k = V (no rest bucket) a training step's KD term and gradients are the exact ones; with
    a small k the KD term is lower (a coarser distribution) and evaluation still gets the exact logits."""
    teacher = micro_whisper(seed=1, decoder_layers=4)
    student = build_student(teacher, decoder_layers=2)
    rows = make_micro_rows(4, seed=11, min_tokens=2, max_tokens=9)
    results = {}
    for top_k in (0, MICRO_VOCAB, 4):
        args = _args(
            tmp_path / str(top_k),
            max_steps=1,
            quant_targets="decoder",
            kd_temperature=2.0,
            cache_teacher_outputs=True,
            teacher_cache_top_k=top_k,
            encoder_cache_dir=str(tmp_path / "cache"),
        )
        trainer = DistillQuantTrainer(
            model=student,
            teacher_model=teacher,
            args=args,
            train_dataset=Dataset.from_list(rows),
            data_collator=micro_collate,
        )
        batch = trainer._prepare_inputs(micro_collate(rows))
        trainer.model.train()
        student.zero_grad()
        trainer.compute_loss(trainer.model, batch, num_items_in_batch=None).backward()
        kd = trainer._logged_terms["train"]["kd"][-1]
        grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
        _, teacher_out, _ = trainer.forwards(trainer.model, batch, ())  # evaluation's call: no logits_at
        assert teacher_out.logits is not None
        results[top_k] = kd, grads
    torch.testing.assert_close(results[MICRO_VOCAB][0], results[0][0])
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[MICRO_VOCAB][1][name], grad, msg=name)
    assert 0 < float(results[4][0]) < float(results[0][0])
