"""DistillQuantTrainer end to end on micro Whisper models (64-token vocabulary, 32-frame inputs): training,
logging, gradient-accumulation exactness, the frozen teacher, checkpoints and resume, encoder sharing, dynamic
layer matching, FFN representations and adapters."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import GPTQ_INT4_RECIPE, make_micro_rows, micro_collate, tiny_speech_rows
from conftest import micro_training_args as _args
from datasets import Dataset
from safetensors import safe_open
from transformers import Seq2SeqTrainingArguments

from hf_whisper_kdq.calibration import calibrate_clipping
from hf_whisper_kdq.callbacks import LayerSelectionCallback
from hf_whisper_kdq.losses import IGNORE_INDEX, hidden_distillation_loss
from hf_whisper_kdq.quant import search_clip_ratios
from hf_whisper_kdq.selection import PLAN_FILE, KDQPlan, match_layers, relative_hidden_errors
from hf_whisper_kdq.students import build_student
from hf_whisper_kdq.trainer import DistillQuantTrainer

pytestmark = pytest.mark.usefixtures("single_thread", "quiet_transformers")

TERMS = ("loss_ce", "loss_kd", "loss_hidden", "loss_quant")


def _trainer(student, teacher, args, rows, **kwargs) -> DistillQuantTrainer:
    return DistillQuantTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=Dataset.from_list(rows),
        data_collator=micro_collate,
        **kwargs,
    )


def _selection_callback(trainer) -> LayerSelectionCallback:
    return next(c for c in trainer.callback_handler.callbacks if isinstance(c, LayerSelectionCallback))


def _student_budget_mb(student, average_bits: float) -> float:
    """A size budget of about ``average_bits`` per quantizable weight (the rest in fp16)."""
    total = sum(p.numel() for p in student.parameters())
    linears = sum(
        m.weight.numel() for name, m in student.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in name
    )
    return ((total - linears) * 2 + linears * average_bits / 8 + linears / 32 * 2) / 1e6


@pytest.fixture
def pair(micro_whisper):
    """(student, teacher): a 4-decoder-layer micro teacher and its spaced 2-decoder-layer copy ([0, 3])."""
    teacher = micro_whisper(decoder_layers=4)
    return build_student(teacher, decoder_layers=2), teacher


def _train_logs(trainer):
    return [entry for entry in trainer.state.log_history if "loss" in entry and "train_runtime" not in entry]


def _weighted_sum(entry, args, prefix=""):
    weights = {"ce": args.ce_weight, "kd": args.kd_weight, "hidden": args.hidden_weight, "quant": args.quant_weight}
    return sum(weight * entry[f"{prefix}loss_{name}"] for name, weight in weights.items())


# ---- training -----------------------------------------------------------------------------------------------


def test_training_lowers_the_loss_and_logs_every_term(tmp_path, pair):
    student, teacher = pair
    args = _args(tmp_path, max_steps=10, learning_rate=1e-3, size_budget_mb=_student_budget_mb(student, 4))
    trainer = _trainer(student, teacher, args, make_micro_rows(4, seed=1))  # one batch: the same 4 rows each step
    trainer.train()

    logs = _train_logs(trainer)
    assert [entry["step"] for entry in logs] == list(range(1, 11))
    for entry in logs:
        assert all(term in entry for term in TERMS), entry
        # the logged terms are the step means that make up the loss
        assert entry["loss"] == pytest.approx(_weighted_sum(entry, args), rel=1e-4)
    assert logs[0]["loss_hidden"] > 0 and logs[0]["loss_quant"] > 0 and logs[0]["loss_kd"] > 0
    losses = [entry["loss"] for entry in logs]
    assert losses[-1] < 0.95 * losses[0] and max(losses[-3:]) < min(losses[:3]), losses
    # CE and the hidden term fall; KD starts near 0 (a spaced copy of the teacher) and may rise as CE pulls away
    assert logs[-1]["loss_ce"] < logs[0]["loss_ce"] and logs[-1]["loss_hidden"] < 0.5 * logs[0]["loss_hidden"]
    # the selection ran at the start and was applied
    plan = trainer.plan
    assert plan.size_bytes <= plan.budget_bytes and any(u.distilled for u in plan.units)
    assert min(u.bits for u in plan.units if u.modules) < 8


def test_logged_terms_are_step_means_with_gradient_accumulation(tmp_path, pair):
    student, teacher = pair
    hidden = {}
    for scale in ("absolute", "relative"):
        args = _args(
            tmp_path / scale,
            max_steps=3,
            per_device_train_batch_size=2,
            gradient_accumulation_steps=2,
            hidden_target="both",
            num_distill_layers=3,
            hidden_loss_scale=scale,
        )
        trainer = _trainer(copy.deepcopy(student), teacher, args, make_micro_rows(12, seed=2))
        trainer.train()
        for entry in _train_logs(trainer):
            assert entry["loss"] == pytest.approx(_weighted_sum(entry, args), rel=1e-4)
        hidden[scale] = _train_logs(trainer)[0]["loss_hidden"]
    assert 0 < hidden["relative"] != pytest.approx(hidden["absolute"], rel=1e-3)  # the option reaches the loss


def test_evaluate_logs_every_term(tmp_path, pair):
    student, teacher = pair
    rows = make_micro_rows(8, seed=3)
    args = _args(tmp_path, max_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=2)
    trainer = _trainer(student, teacher, args, make_micro_rows(8), eval_dataset=Dataset.from_list(rows))

    # before any training (no selection yet) ...
    metrics = trainer.evaluate()
    assert all(f"eval_{term}" in metrics for term in TERMS), metrics
    assert metrics["eval_loss"] == pytest.approx(_weighted_sum(metrics, args, "eval_"), rel=1e-4)
    # eval_loss_ce is the student's own cross-entropy on the 8 rows (one batch)
    batch = micro_collate(rows)
    with torch.no_grad():
        student.eval()
        reference = student(input_features=batch["input_features"], labels=batch["labels"]).loss.item()
    assert metrics["eval_loss_ce"] == pytest.approx(reference, rel=1e-4)

    # ... and after training with gradient accumulation: eval terms are not scaled by the accumulation steps
    trainer.train()
    metrics = trainer.evaluate()
    with torch.no_grad():
        student.eval()
        reference = student(input_features=batch["input_features"], labels=batch["labels"]).loss.item()
    assert metrics["eval_loss_ce"] == pytest.approx(reference, rel=1e-4)
    assert metrics["eval_loss"] == pytest.approx(_weighted_sum(metrics, args, "eval_"), rel=1e-4)
    assert not any(key.startswith("loss_") for key in metrics)  # no train terms leak into eval logs
    evals = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    assert len(evals) == 1 and all(f"eval_{term}" in evals[-1] for term in TERMS)  # train() reset the history


def test_evaluate_with_generate_still_logs_every_term(tmp_path, pair):
    student, teacher = pair
    rows = make_micro_rows(4, seed=4)
    seen = {}

    def compute_metrics(prediction):
        seen["shape"] = prediction.predictions.shape
        return {"answer": 42.0}

    args = _args(tmp_path, max_steps=1, predict_with_generate=True, generation_max_length=6)
    trainer = _trainer(
        student,
        teacher,
        args,
        make_micro_rows(8),
        eval_dataset=Dataset.from_list(rows),
        compute_metrics=compute_metrics,
    )
    trainer.train()
    metrics = trainer.evaluate()
    assert metrics["eval_answer"] == 42.0 and seen["shape"][0] == 4
    assert all(f"eval_{term}" in metrics for term in TERMS), metrics
    # the reported loss is the distillation loss, not the plain cross-entropy
    assert metrics["eval_loss"] == pytest.approx(_weighted_sum(metrics, args, "eval_"), rel=1e-4)
    assert metrics["eval_loss_kd"] > 0


# ---- gradient accumulation -----------------------------------------------------------------------------------


def _one_step(tmp_path, teacher, rows, *, batch, accumulation, name, budget_bits):
    # one encoder layer (teacher layer 1 on the embeddings): the encoder hidden term is far from zero
    student = build_student(teacher, encoder_layers=1, decoder_layers=2)
    args = _args(
        tmp_path / name,
        max_steps=1,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        optim="sgd",
        learning_rate=0.5,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        hidden_target="both",
        num_distill_layers=3,
        quant_weight=0.5,
        quant_targets="encoder,decoder,embedding",
        size_budget_mb=_student_budget_mb(student, budget_bits) if budget_bits else None,
        # the probe batches cover the same rows in both runs, so both plans come out the same
        selection_probe_batches=-(-len(rows) // batch),
    )
    trainer = _trainer(student, teacher, args, rows)
    trainer.train()
    return trainer


@pytest.mark.parametrize(
    "rows, batch, accumulation, budget_bits",
    [(8, 2, 4, 4), (6, 4, 2, None)],  # 4 equal micro-batches; then a ragged pair of 4 + 2 rows
    ids=["equal", "ragged"],
)
def test_gradient_accumulation_is_exact(tmp_path, micro_whisper, rows, batch, accumulation, budget_bits):
    teacher = micro_whisper(decoder_layers=4)
    rows = make_micro_rows(rows, seed=5, min_tokens=1, max_tokens=12)
    lengths = [len(row["labels"]) for row in rows]
    assert len(set(lengths)) > 3  # uneven rows: a mean of micro-batch means would differ from the batch mean

    full = _one_step(tmp_path, teacher, rows, batch=len(rows), accumulation=1, name="full", budget_bits=budget_bits)
    accumulated = _one_step(
        tmp_path, teacher, rows, batch=batch, accumulation=accumulation, name="accumulated", budget_bits=budget_bits
    )
    plans = [[(u.name, u.bits, u.distilled, u.teacher_layer) for u in t.plan.units] for t in (full, accumulated)]
    assert plans[0] == plans[1]
    assert all(u.distilled for u in full.plan.units if u.side in ("encoder", "decoder"))

    log_full, log_accumulated = _train_logs(full)[0], _train_logs(accumulated)[0]
    for key in ("loss", *TERMS):
        assert log_accumulated[key] == pytest.approx(log_full[key], rel=1e-5, abs=1e-7), key
    assert log_full["loss_hidden"] > 0 and log_full["loss_quant"] > 0

    ours = dict(accumulated.model.named_parameters())
    moved = 0
    for name, parameter in full.model.named_parameters():
        torch.testing.assert_close(ours[name], parameter, rtol=1e-5, atol=1e-6, msg=name)
    before = build_student(teacher, encoder_layers=1, decoder_layers=2).state_dict()
    for name, tensor in full.model.state_dict().items():
        if name in before and not torch.equal(before[name], tensor):
            moved += 1
    assert moved > 10  # the step did move the weights


# ---- the teacher -----------------------------------------------------------------------------------------------


def test_teacher_is_frozen_unchanged_and_not_saved(tmp_path, pair):
    student, teacher = pair
    before = copy.deepcopy(teacher.state_dict())
    args = _args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2, hidden_target="both", num_distill_layers=3)
    trainer = _trainer(student, teacher, args, make_micro_rows(8))
    trainer.train()

    assert trainer.teacher is teacher and not teacher.training
    for name, parameter in teacher.named_parameters():
        assert not parameter.requires_grad and parameter.grad is None, name
        assert torch.equal(parameter, before[name]), name
    assert all(torch.equal(tensor, before[name]) for name, tensor in teacher.state_dict().items())
    assert trainer.state.global_step == 2

    checkpoint = tmp_path / "out" / "checkpoint-2"
    with safe_open(checkpoint / "model.safetensors", "pt") as file:
        keys = set(file.keys())
        saved_numel = sum(file.get_tensor(key).numel() for key in keys)
    student_keys = set(student.state_dict())
    assert keys <= student_keys, keys - student_keys
    assert student_keys - keys <= {"proj_out.weight"}  # tied to the embedding
    assert not any(key.startswith("model.decoder.layers.2.") or key.startswith("teacher") for key in keys)
    unique_student = sum(p.numel() for p in student.parameters()) + sum(b.numel() for b in student.buffers())
    assert saved_numel == unique_student
    assert saved_numel < sum(p.numel() for p in teacher.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: on one device nothing can be misplaced")
def test_a_teacher_reused_by_a_second_trainer_is_placed_again(tmp_path, micro_whisper):
    """accelerate returns a model it prepared before as it is; a teacher moved back to the CPU between two
    trainers must still reach the GPU (benchmarks/step_time.py does this between its runs)."""
    teacher = micro_whisper(decoder_layers=4)
    for run in range(2):
        student = build_student(teacher, decoder_layers=2)
        args = _args(tmp_path / str(run), max_steps=1, use_cpu=False)
        trainer = _trainer(student, teacher, args, make_micro_rows(8))
        trainer.train()
        assert next(trainer.teacher.parameters()).device.type == "cuda"
        teacher.to("cpu")


@pytest.mark.parametrize("freeze_encoder", [False, True], ids=["own-encoder", "shared-encoder"])
def test_teacher_runs_under_the_mixed_precision_of_training(tmp_path, micro_whisper, freeze_encoder):
    """The Trainer relies on accelerate's wrapped model.forward for autocast; the teacher's encoder is called
    directly, so without an explicit autocast it ran in fp32 under bf16 training (found on a GPU: KDQ steps 3×
    slower than plain fine-tuning)."""
    teacher = micro_whisper(decoder_layers=4)
    student = build_student(teacher, decoder_layers=2)
    args = _args(
        tmp_path,
        max_steps=1,
        bf16=True,
        freeze_encoder=freeze_encoder,
        cache_encoder_outputs=False,
        cache_teacher_outputs=False,
    )
    trainer = _trainer(student, teacher, args, make_micro_rows(4))
    seen = {}

    def record(name):
        def hook(module, inputs, output):
            seen.setdefault(name, output.dtype)

        return hook

    for name in ("encoder", "decoder"):
        getattr(teacher.model, name).layers[0].fc1.register_forward_hook(record(name))
    trainer.train()
    assert seen == {"encoder": torch.bfloat16, "decoder": torch.bfloat16}


def test_tokenizer_mismatch_fails_before_training(tmp_path, pair):
    student, teacher = pair
    student.generation_config.eos_token_id = 5
    with pytest.raises(ValueError, match="different tokenizers.*eos_token_id 5 vs 2"):
        _trainer(student, teacher, _args(tmp_path, max_steps=1), make_micro_rows(4))
    student.generation_config.eos_token_id = 2
    student.config.vocab_size = 65
    with pytest.raises(ValueError, match="vocab_size 65 vs 64"):
        _trainer(student, teacher, _args(tmp_path, max_steps=1), make_micro_rows(4))


def test_arguments_must_be_distill_quant_arguments(tmp_path, pair):
    student, teacher = pair
    plain = Seq2SeqTrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    with pytest.raises(TypeError, match="DistillQuantArguments"):
        _trainer(student, teacher, plain, make_micro_rows(4))
    with pytest.raises(ValueError, match="teacher_model is required"):
        DistillQuantTrainer(model=student, args=_args(tmp_path))
    with pytest.raises(TypeError, match="student is a WhisperModel"):
        DistillQuantTrainer(model=student.model, teacher_model=teacher, args=_args(tmp_path))


# ---- checkpoints and resume ----------------------------------------------------------------------------------


def _plan_key(plan: KDQPlan):
    return [(u.name, u.bits, u.distilled, u.teacher_layer) for u in plan.units]


@pytest.mark.parametrize("restore_callback_states", [False, True])
def test_plan_round_trips_through_checkpoint_and_resume(tmp_path, micro_whisper, restore_callback_states):
    teacher = micro_whisper(decoder_layers=4)
    rows = make_micro_rows(16, seed=6)

    def run(**overrides):
        student = build_student(teacher, decoder_layers=2)
        args = _args(
            tmp_path,
            max_steps=4,
            save_strategy="steps",
            save_steps=2,
            size_budget_mb=_student_budget_mb(student, 3.5),
            # The local rule mixes bits here; output_kl keeps the uniform plan when its probe KL is lower, which
            # on this micro model it is: the round trip wants a plan of several widths.
            selection_cost="local_error",
            restore_callback_states_from_checkpoint=restore_callback_states,
            **overrides,
        )
        return _trainer(student, teacher, args, rows)

    first = run()
    first.train()
    plan = first.plan
    assert len({u.bits for u in plan.units if u.modules}) > 1  # a non-trivial plan
    checkpoint = tmp_path / "out" / "checkpoint-2"
    assert KDQPlan.load(checkpoint / PLAN_FILE) == plan
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    saved = state["stateful_callbacks"]["LayerSelectionCallback"]
    saved = saved[0] if isinstance(saved, list) else saved
    assert KDQPlan.from_dict(saved["attributes"]["restored_plan"]) == plan
    final = {k: v.clone() for k, v in first.model.state_dict().items()}

    # A new trainer resumes: the plan is restored (not re-measured on the step-2 weights), training continues
    # to the same final step and, the run being deterministic, to the same weights.
    second = run()
    second.train(resume_from_checkpoint=str(checkpoint))
    assert second.state.global_step == 4
    assert _plan_key(second.plan) == _plan_key(plan)
    assert second.plan == plan  # measurements included: nothing was re-selected
    specs = {name: m.quant_spec for name, m in second.model.named_modules() if hasattr(m, "quant_spec")}
    assert specs == {name: spec for name, spec in plan.module_specs().items() if name in specs}
    for name, tensor in second.model.state_dict().items():
        torch.testing.assert_close(tensor, final[name], rtol=1e-4, atol=1e-6, msg=name)


# ---- encoder sharing -------------------------------------------------------------------------------------------


def test_frozen_identical_encoder_is_shared_with_the_teacher(tmp_path, pair):
    student, teacher = pair  # all encoder layers kept
    args = _args(
        tmp_path,
        max_steps=1,
        freeze_encoder=True,
        quant_targets="decoder",
        num_distill_layers=2,
        cache_encoder_outputs=False,
    )
    trainer = _trainer(student, teacher, args, make_micro_rows(8, seed=7))
    assert trainer.forwards.shares_encoder and trainer.forwards.distill_sides == ("decoder",)

    calls = []
    handle = student.model.encoder.register_forward_hook(lambda *_: calls.append(1))
    teacher_calls = []
    teacher_handle = teacher.model.encoder.register_forward_hook(lambda *_: teacher_calls.append(1))
    try:
        trainer.train()  # selection (2 probe batches) + one step
        assert calls == [] and len(teacher_calls) == 3
        assert not any(p.requires_grad for p in student.model.encoder.parameters())

        batch = trainer._prepare_inputs(micro_collate(make_micro_rows(4, seed=8)))
        student.train()
        with torch.no_grad():
            shared = trainer.compute_loss(student, batch)
            trainer.forwards.encoder_matches_teacher = False  # force the student's own encoder pass
            assert not trainer.forwards.shares_encoder
            unshared = trainer.compute_loss(student, batch)
        assert len(calls) == 1
        assert shared.item() == pytest.approx(unshared.item(), rel=1e-5)
    finally:
        handle.remove()
        teacher_handle.remove()


def test_encoder_is_not_shared_when_it_differs_or_is_quantized(tmp_path, micro_whisper):
    teacher = micro_whisper(decoder_layers=4)
    fewer = build_student(teacher, encoder_layers=1, decoder_layers=2)
    args = _args(tmp_path, max_steps=1, freeze_encoder=True, quant_targets="decoder")
    assert not _trainer(fewer, teacher, args, make_micro_rows(4)).forwards.shares_encoder
    quantized = build_student(teacher, decoder_layers=2)
    args = _args(tmp_path, max_steps=1, freeze_encoder=True, quant_targets="encoder,decoder")
    assert not _trainer(quantized, teacher, args, make_micro_rows(4)).forwards.shares_encoder
    unfrozen = build_student(teacher, decoder_layers=2)
    args = _args(tmp_path, max_steps=1, quant_targets="decoder")
    assert not _trainer(unfrozen, teacher, args, make_micro_rows(4)).forwards.shares_encoder


# ---- dynamic layer matching --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["dynamic", "dynamic_monotone"])
def test_dynamic_matching_follows_the_measured_errors(tmp_path, micro_whisper, mode):
    teacher = micro_whisper(decoder_layers=4)
    student = build_student(teacher, decoder_layers=3)  # recorded origins [0, 2, 3]
    # student layer 1 becomes an exact copy of teacher layer 1: its output equals teacher layer 1's exactly
    student.model.decoder.layers[1].load_state_dict(teacher.model.decoder.layers[1].state_dict())
    # Absolute hidden loss: the quantized copy's relative error is small but not within 1e-6 of zero.
    args = _args(
        tmp_path,
        max_steps=1,
        layer_matching=mode,
        num_distill_layers=3,
        quant_targets="decoder",
        hidden_loss_scale="absolute",
    )
    trainer = _trainer(student, teacher, args, make_micro_rows(8, seed=9))
    assert [u.teacher_layer for u in trainer.plan.layers("decoder")] == [0, 2, 3]  # static start
    callback = _selection_callback(trainer)
    plan = callback.select(step=0)

    # the measured matrix, recomputed here the way the callback measures it (float student, probe batches)
    saved = plan.module_specs()
    from hf_whisper_kdq.quant import set_quant_specs

    set_quant_specs(student, dict.fromkeys(saved, None))
    student.eval()
    matrix = 0
    batches = trainer.probe_batches()
    with torch.no_grad():
        for batch in batches:
            _, _, reps = trainer.forwards(student, batch, ("decoder",))
            matrix = matrix + relative_hidden_errors(
                reps["student"]["decoder"], reps["teacher"]["decoder"], batch["labels"].ne(IGNORE_INDEX)
            )
    matrix = matrix / len(batches)
    set_quant_specs(student, saved)

    matched = [u.teacher_layer for u in plan.layers("decoder")]
    assert matched == match_layers(matrix, monotone=mode == "dynamic_monotone")
    assert matched[:2] == [0, 1]
    assert matrix[1, 1] == 0 and matrix[0, 0] == 0
    if mode == "dynamic":
        assert matched == matrix.argmin(dim=1).tolist()
    else:
        assert all(a <= b for a, b in zip(matched, matched[1:]))
    for unit in plan.layers("decoder"):
        assert unit.distill_loss == pytest.approx(matrix[unit.index, unit.teacher_layer].item(), abs=1e-6)
    assert (1, 1) in plan.distilled_pairs("decoder")

    # the loss then distils student layer 1 from teacher layer 1 (exactly matched: no hidden loss from it)
    for unit in plan.units:
        unit.distilled = unit.name == "decoder.1"
    batch = batches[0]
    with torch.no_grad():
        trainer.compute_loss(student, batch)
    assert trainer._logged_terms["eval"]["hidden"][-1].item() == pytest.approx(0.0, abs=1e-6)
    plan.unit("decoder.1").teacher_layer = 2
    with torch.no_grad():
        trainer.compute_loss(student, batch)
    assert trainer._logged_terms["eval"]["hidden"][-1].item() > 1e-5


def test_static_matching_keeps_the_recorded_origins(tmp_path, micro_whisper):
    teacher = micro_whisper(decoder_layers=4)
    student = build_student(teacher, decoder_layers=3)
    student.model.decoder.layers[1].load_state_dict(teacher.model.decoder.layers[1].state_dict())
    args = _args(tmp_path, max_steps=1, num_distill_layers=3, quant_targets="decoder")
    trainer = _trainer(student, teacher, args, make_micro_rows(8, seed=9))
    plan = _selection_callback(trainer).select(step=0)
    assert [u.teacher_layer for u in plan.layers("decoder")] == [0, 2, 3]


# ---- representations and adapters -----------------------------------------------------------------------------


def test_ffn_intermediate_representation_trains(tmp_path, pair):
    student, teacher = pair
    args = _args(
        tmp_path,
        max_steps=2,
        hidden_representation="ffn_intermediate",
        hidden_target="both",
        num_distill_layers=4,
        cache_encoder_outputs=False,  # its fp16 entries would give the teacher's decoder rounded encoder outputs
    )
    trainer = _trainer(student, teacher, args, make_micro_rows(8, seed=10))
    assert not hasattr(student, "kdq_adapters")  # same widths: no adapters
    trainer.train()
    logs = _train_logs(trainer)
    assert len(logs) == 2 and all(entry["loss_hidden"] > 0 for entry in logs)
    # decoder layer 0 is a copy of teacher layer 0: its FFN activation matches exactly before training
    batch = trainer._prepare_inputs(micro_collate(make_micro_rows(2, seed=11)))
    fresh = build_student(teacher, decoder_layers=2)
    _, _, reps = trainer.forwards(fresh, batch, ("decoder",))
    assert reps["student"]["decoder"][0].shape == (2, batch["labels"].shape[1], 64)
    assert torch.equal(reps["student"]["decoder"][0], reps["teacher"]["decoder"][0])


@pytest.mark.parametrize("representation", ["layer_output", "ffn_intermediate"])
def test_narrower_student_trains_through_adapters(tmp_path, micro_whisper, representation):
    teacher = micro_whisper(decoder_layers=4)
    student = micro_whisper(seed=1, d_model=16, encoder_ffn_dim=32, decoder_ffn_dim=32)
    args = _args(
        tmp_path,
        max_steps=3,
        learning_rate=1e-2,
        hidden_target="both",
        hidden_representation=representation,
        num_distill_layers=4,
        quant_group_size=16,
    )
    trainer = _trainer(student, teacher, args, make_micro_rows(8, seed=12))
    adapters = student.kdq_adapters
    assert sorted(adapters) == ["decoder_0", "decoder_1", "encoder_0", "encoder_1"]
    width = 16 if representation == "layer_output" else 32
    assert all(a.in_features == width and a.out_features == 2 * width for a in adapters.values())
    # the independent student starts matched by relative depth
    assert [u.teacher_layer for u in trainer.plan.layers("decoder")] == [0, 3]
    before = {name: a.weight.detach().clone() for name, a in adapters.items()}
    trainer.train()
    assert all(u.distilled for u in trainer.plan.units if u.side in ("encoder", "decoder"))
    for name, adapter in adapters.items():
        assert not torch.equal(adapter.weight, before[name]), f"adapter {name} was not trained"
    assert all(entry["loss_hidden"] > 0 for entry in _train_logs(trainer))
    # adapters are training-only: not counted in the plan's size
    assert trainer.plan.size_bytes is not None


# ---- re-selection, prediction, and the real tokenizer ------------------------------------------------------------


def test_periodic_reselection_moves_the_plan_and_saves_it(tmp_path, pair):
    student, teacher = pair
    args = _args(
        tmp_path,
        max_steps=4,
        learning_rate=1e-2,
        selection_interval=2,
        save_strategy="steps",
        save_steps=2,
        size_budget_mb=_student_budget_mb(student, 3.5),
    )
    trainer = _trainer(student, teacher, args, make_micro_rows(8, seed=13))
    trainer.train()
    assert trainer.plan.step == 2  # re-selected at step 2, not at the last step
    assert KDQPlan.load(tmp_path / "out" / "checkpoint-2" / PLAN_FILE).step == 2
    assert KDQPlan.load(tmp_path / "out" / "checkpoint-4" / PLAN_FILE) == trainer.plan
    specs = {name: m.quant_spec for name, m in student.named_modules() if hasattr(m, "quant_spec")}
    assert specs == trainer.plan.module_specs()


def test_reselection_stops_after_selection_until(tmp_path, pair):
    student, teacher = pair
    args = _args(
        tmp_path,
        max_steps=8,
        learning_rate=1e-2,
        selection_interval=2,
        selection_until=0.5,
        size_budget_mb=_student_budget_mb(student, 3.5),
    )
    trainer = _trainer(student, teacher, args, make_micro_rows(8, seed=13))
    steps = []
    select = _selection_callback(trainer).select
    _selection_callback(trainer).select = lambda step: (steps.append(step), select(step=step))[1]
    trainer.train()
    assert steps == [0, 2] and trainer.plan.step == 2  # not at 4 and 6: the second half keeps one plan


def test_predict_does_not_leak_terms_into_the_next_evaluation(tmp_path, pair):
    student, teacher = pair
    eval_rows, other_rows = make_micro_rows(8, seed=14), make_micro_rows(8, seed=15, min_tokens=1, max_tokens=3)
    args = _args(tmp_path, max_steps=1)
    trainer = _trainer(student, teacher, args, make_micro_rows(4), eval_dataset=Dataset.from_list(eval_rows))
    alone = trainer.evaluate()
    trainer.predict(Dataset.from_list(other_rows))
    after_predict = trainer.evaluate()
    for term in TERMS:
        assert after_predict[f"eval_{term}"] == pytest.approx(alone[f"eval_{term}"], rel=1e-5), term


def test_eval_terms_follow_the_metric_key_prefix(tmp_path, pair):
    student, teacher = pair
    datasets = {name: Dataset.from_list(make_micro_rows(4, seed=seed)) for name, seed in (("clean", 16), ("noisy", 17))}
    args = _args(tmp_path, max_steps=2, eval_strategy="steps", eval_steps=2)
    trainer = _trainer(student, teacher, args, make_micro_rows(4), eval_dataset=datasets)
    metrics = trainer.evaluate(datasets["clean"], metric_key_prefix="test")
    assert all(f"test_{term}" in metrics for term in TERMS) and not any(k.startswith("eval_") for k in metrics)
    trainer.train()  # evaluates both datasets at step 2
    logged = {key for entry in trainer.state.log_history for key in entry}
    for name in datasets:
        assert all(f"eval_{name}_{term}" in logged for term in TERMS), sorted(logged)
    assert not any(key.startswith("eval_loss_") for key in logged)  # every eval term under its dataset


def test_real_tokenizer_tiny_whisper_with_the_data_collator(tmp_path, base_pack_folder):
    """The trainer on the real-tokenizer tiny Whisper (51,865 tokens, 30 s inputs) and WhisperDataCollator."""
    from conftest import make_tiny_whisper

    from hf_whisper_kdq.data import WhisperDataCollator

    teacher, processor = make_tiny_whisper(base_pack_folder, decoder_layers=4)
    student = build_student(teacher, decoder_layers=2)
    rows = tiny_speech_rows(processor, [" hello world", " a longer sentence to transcribe"])
    args = _args(
        tmp_path,
        max_steps=2,
        per_device_train_batch_size=2,
        selection_probe_batches=1,
        quant_targets="decoder,embedding",
        size_budget_ratio=0.3,
        size_budget_accounting="paper",  # the embedding at its bits: in fp16 it alone is over 0.3 of this teacher
    )
    collator = WhisperDataCollator(processor, decoder_start_token_id=student.config.decoder_start_token_id)
    trainer = DistillQuantTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=Dataset.from_list(rows),
        data_collator=collator,
        processing_class=processor,
    )
    trainer.train()
    logs = _train_logs(trainer)
    assert len(logs) == 2 and all(all(term in entry for term in TERMS) for entry in logs)
    assert trainer.plan.unit("embedding").bits < 16 and trainer.plan.size_bytes <= trainer.plan.budget_bytes


def test_shared_encoder_outputs_are_cached_across_epochs(tmp_path, pair):
    student, teacher = pair
    args = _args(
        tmp_path,
        max_steps=6,
        freeze_encoder=True,
        quant_targets="decoder",
        num_distill_layers=1,
        encoder_cache_dir=str(tmp_path / "cache"),
    )
    rows = make_micro_rows(8, seed=3)
    trainer = _trainer(student, teacher, args, rows)
    teacher_rows = []
    handle = teacher.model.encoder.register_forward_hook(lambda m, a, out: teacher_rows.append(a[0].shape[0]))
    try:
        trainer.train()  # 8 rows, several epochs: each row is encoded exactly once
    finally:
        handle.remove()
    assert sum(teacher_rows) == len(rows)
    assert trainer.forwards.encoder_cache.misses == len(rows) and trainer.forwards.encoder_cache.hits > 0
    entries = sorted(trainer.forwards.encoder_cache.folder.glob("*/*.safetensors"))
    assert len(entries) == len(rows)

    # A corrupt entry is recomputed, never used.
    entries[0].write_bytes(b"not a safetensors file")
    batch = trainer._prepare_inputs(micro_collate(rows))
    encoder = trainer.teacher.get_encoder()
    with torch.no_grad():
        expected = encoder(batch["input_features"]).last_hidden_state.half().float()  # stored in fp16
    torch.testing.assert_close(trainer.forwards.encoder_cache.encode(encoder, batch["input_features"]), expected)
    assert trainer.forwards.encoder_cache.misses == len(rows) + 1


def _count_rows(encoder, counts: list[int]):
    return encoder.register_forward_hook(lambda module, args, out: counts.append(args[0].shape[0]))


@pytest.mark.parametrize("teacher_cache", [True, False], ids=["teacher_cached", "teacher_runs"])
def test_teacher_encoder_runs_once_per_row_while_the_student_encoder_trains(tmp_path, pair, teacher_cache):
    """With the teacher cache (default on the CPU) the teacher's encoder runs for the rows it misses and its outputs
    are not cached; without it, they are (cache_encoder_outputs, default on the CPU)."""
    student, teacher = pair
    args = _args(
        tmp_path,
        max_steps=6,
        quant_targets="decoder",
        encoder_cache_dir=str(tmp_path / "cache"),
        cache_teacher_outputs=None if teacher_cache else False,
    )
    rows = make_micro_rows(8, seed=3)
    trainer = _trainer(student, teacher, args, rows)
    assert args.cache_encoder_outputs is None and trainer.forwards.cache_encoders  # default: on for CPU training
    teacher_rows, student_rows = [], []
    handles = [_count_rows(teacher.model.encoder, teacher_rows), _count_rows(student.model.encoder, student_rows)]
    try:
        trainer.train()  # 6 steps of 4 rows: 3 epochs of 8 rows
    finally:
        for handle in handles:
            handle.remove()
    assert sum(teacher_rows) == len(rows)  # each row once, though the student's encoder is not the teacher's
    assert sum(student_rows) >= 6 * 4  # it trains: it runs every step
    probe_rows = 2 * 4  # the selection's probe batches
    cache = trainer.forwards.teacher_cache if teacher_cache else trainer.forwards.encoder_cache
    assert cache.misses == len(rows) and cache.hits == 6 * 4 + probe_rows - len(rows)
    assert (trainer.forwards.encoder_cache is None) == teacher_cache


def test_frozen_quantized_student_encoder_outputs_are_cached(tmp_path, pair):
    """A frozen student encoder (weights and clipping ratios) that is quantized, hence not the teacher's: its outputs
    are cached too, under a key that includes its bits, and training follows the one without any cache (its fp16
    entries differ from the fp32 outputs by ~5e-4 relative: the losses by less than 1e-4 relative)."""
    student, teacher = pair
    twin = copy.deepcopy(student)
    rows = make_micro_rows(8, seed=3)
    common = dict(
        max_steps=6,
        freeze_encoder=True,
        quant_targets="encoder,decoder",
        quant_bit_choices="4,8",
        num_distill_layers=1,
        hidden_target="both",
        # The local rule runs the probes' encoder once per batch (counted below); output_kl re-runs it for every
        # encoder unit and bit width it measures.
        selection_cost="local_error",
    )
    cached = _trainer(
        student, teacher, _args(tmp_path / "a", encoder_cache_dir=str(tmp_path / "cache"), **common), rows
    )
    assert cached.plan.quantized("encoder") and not cached.forwards.shares_encoder
    clips = [p for n, p in student.model.encoder.named_parameters() if n.endswith("weight_clip")]
    assert clips and not any(p.requires_grad for p in clips)
    assert cached.forwards.distill_sides == ("decoder",)  # nothing to distil into a frozen encoder
    student_rows = []
    handle = _count_rows(student.model.encoder, student_rows)
    try:
        cached.train()
    finally:
        handle.remove()
    probe_rows = 2 * 4  # the selection probes run the encoder itself (they capture its layers' inputs)
    assert sum(student_rows) == probe_rows + len(rows)
    assert cached.forwards.student_encoder_cache.misses == len(rows)

    uncached = _trainer(twin, teacher, _args(tmp_path / "b", cache_encoder_outputs=False, **common), rows)
    uncached.train()
    assert uncached.forwards.encoder_cache is None and uncached.forwards.student_encoder_cache is None
    assert [e["loss"] for e in _train_logs(cached)] == pytest.approx(
        [e["loss"] for e in _train_logs(uncached)], rel=1e-4
    )

    # Other bits, other entries: never the outputs of the encoder at its former bits.
    from hf_whisper_kdq.quant import set_quant_specs

    encoder = student.get_encoder()
    first = cached.forwards.frozen_encoder_cache(encoder)
    set_quant_specs(student, {name: "int8" for name in cached.plan.module_specs() if ".encoder." in name})
    assert cached.forwards.frozen_encoder_cache(encoder).fingerprint != first.fingerprint


def test_teacher_outputs_are_cached_per_row_and_training_is_the_same(tmp_path, pair):
    """The teacher's decoder runs once per row over 3 epochs (plus the probes' rows before the first epoch wrote
    them), and training with the cache equals training without it."""
    student, teacher = pair
    twin = copy.deepcopy(student)
    rows = make_micro_rows(8, seed=3)
    common = dict(max_steps=6, quant_targets="decoder", num_distill_layers=1, selection_interval=3)
    cached = _trainer(
        student, teacher, _args(tmp_path / "a", encoder_cache_dir=str(tmp_path / "cache"), **common), rows
    )
    assert (
        cached.args.cache_teacher_outputs is None and cached.forwards.teacher_cache is not None
    )  # default: on for CPU
    decoded = []
    handle = teacher.model.decoder.register_forward_hook(
        lambda m, a, kw, out: decoded.append(kw["input_ids"].shape[0]), with_kwargs=True
    )
    try:
        cached.train()  # 6 steps of 4 rows: 3 epochs of 8 rows; selections at steps 0 and 3
    finally:
        handle.remove()
    assert sum(decoded) == len(rows) and cached.forwards.teacher_cache.misses == len(rows)
    assert cached.forwards.teacher_cache.hits == 6 * 4 + 2 * (2 * 4) - len(rows)  # + two selections' probe batches

    uncached = _trainer(
        twin, teacher, _args(tmp_path / "b", cache_encoder_outputs=False, cache_teacher_outputs=False, **common), rows
    )
    uncached.train()
    assert uncached.forwards.teacher_cache is None
    assert [e["loss"] for e in _train_logs(cached)] == pytest.approx(
        [e["loss"] for e in _train_logs(uncached)], rel=1e-5
    )
    for (name, a), b in zip(student.state_dict().items(), twin.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)

    # A teacher changed in place (a user's edit, a test's poison) is never answered from the old entries.
    before = cached.forwards.teacher_cache
    with torch.no_grad():
        teacher.proj_out.weight.mul_(2)
    batch = cached._prepare_inputs(micro_collate(rows[:2]))
    cached.forwards(cached.model, batch, ())
    assert (
        cached.forwards.teacher_cache is not before and cached.forwards.teacher_cache.fingerprint != before.fingerprint
    )
    assert cached.forwards.teacher_cache.misses == 2


@pytest.mark.parametrize("cached", [False, True], ids=["teacher_runs", "teacher_cached"])
def test_training_losses_computed_on_labelled_logits_only_equal_the_full_logits(tmp_path, pair, cached):
    """A training step computes both models' logits at the labelled positions only (packed rows); the loss and its
    gradients equal those from full [B, T, V] logits (what evaluation, ``return_outputs=True``, computes)."""
    student, teacher = pair
    args = _args(
        tmp_path,
        max_steps=1,
        quant_targets="decoder",
        num_distill_layers=1,
        kd_temperature=2.0,
        cache_encoder_outputs=cached,
        cache_teacher_outputs=cached,
        encoder_cache_dir=str(tmp_path / "cache"),
    )
    rows = make_micro_rows(4, seed=9, min_tokens=2, max_tokens=9)
    trainer = _trainer(student, teacher, args, rows)
    trainer.train()  # selection: a plan with a distilled decoder layer, as training computes the hidden term too
    batch = trainer._prepare_inputs(micro_collate(rows))
    assert bool(batch["labels"].eq(IGNORE_INDEX).any())  # padding to skip
    results = []
    for return_outputs in (False, True):
        student.zero_grad()
        loss = trainer.compute_loss(trainer.model, batch, return_outputs=return_outputs, num_items_in_batch=13)
        loss = loss[0] if return_outputs else loss
        loss.backward()
        terms = {name: values[-1] for name, values in trainer._logged_terms["train"].items()}
        results.append(
            (loss.detach(), terms, {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None})
        )
    (packed_loss, packed_terms, packed_grads), (full_loss, full_terms, full_grads) = results
    assert float(packed_terms["hidden"]) > 0 and float(packed_terms["kd"]) > 0
    torch.testing.assert_close(packed_loss, full_loss)
    for name in full_terms:
        torch.testing.assert_close(packed_terms[name], full_terms[name], msg=name)
    assert packed_grads.keys() == full_grads.keys() and len(full_grads) > 0
    for name, grad in full_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, msg=name)


@pytest.mark.parametrize("accounting", ["paper", "on_disk"])
def test_budget_accounting_of_the_embedding(tmp_path, micro_whisper, caplog, accounting):
    """'paper' counts the embedding at its planned bits (and warns that a packed file of several widths stores it in
    fp16);
    'on_disk' counts it in fp16, so it keeps the highest choice and the budget bounds the file."""
    teacher = micro_whisper(decoder_layers=4)
    student = build_student(teacher, decoder_layers=2)
    budget = _student_budget_mb(student, 3)  # the embedding in fp16, the layers' linears at 3 bits on average
    args = _args(
        tmp_path,
        max_steps=1,
        quant_targets="encoder,decoder,embedding",
        quant_bit_choices="2,4,8",
        size_budget_mb=budget,
        size_budget_accounting=accounting,
    )
    trainer = _trainer(student, teacher, args, make_micro_rows(8))
    with caplog.at_level("WARNING", logger="hf_whisper_kdq.callbacks"):
        trainer.train()
    embedding = trainer.plan.unit("embedding")
    warned = "stores the embedding in fp16" in caplog.text
    if accounting == "on_disk":
        assert embedding.bits == 8 and not warned
        embedding_fp16 = sum(p.numel() for p in student.get_decoder().embed_tokens.parameters()) * 2
        assert trainer.plan.size_bytes <= budget * 1e6 and trainer.plan.size_bytes > embedding_fp16
    else:  # the warning is for plans of several widths: one width stores the embedding packed (export.compressed)
        widths = {u.bits for u in trainer.plan.units if u.modules and u.bits < 16}
        assert embedding.bits < 16 and len(widths) > 1 and warned


# ---- the selection callback passed by the user; the processor of the export -----------------------------------


@pytest.mark.parametrize("passed", ["instance", "class"])
def test_a_selection_callback_passed_in_callbacks_is_bound_and_runs_once(tmp_path, pair, passed):
    """Hugging Face users pass callbacks to the constructor: the selection callback given there is the one used."""
    student, teacher = pair
    given = LayerSelectionCallback() if passed == "instance" else LayerSelectionCallback
    args = _args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2)
    trainer = _trainer(student, teacher, args, make_micro_rows(4), callbacks=[given])
    selections = [c for c in trainer.callback_handler.callbacks if isinstance(c, LayerSelectionCallback)]
    assert len(selections) == 1 and selections[0].trainer is trainer
    if passed == "instance":
        assert selections[0] is given
    trainer.train()
    assert trainer.plan.step == 0 and all(u.quant_loss for u in trainer.plan.units if u.modules)
    assert KDQPlan.load(tmp_path / "out" / "checkpoint-2") == trainer.plan

    # Added after construction, it replaces the one the trainer has.
    later = LayerSelectionCallback()
    trainer.add_callback(later)
    assert [c for c in trainer.callback_handler.callbacks if isinstance(c, LayerSelectionCallback)] == [later]
    assert later.trainer is trainer


def test_save_compressed_without_a_processor_writes_nothing_and_names_the_fix(tmp_path, pair):
    student, teacher = pair
    trainer = _trainer(student, teacher, _args(tmp_path, max_steps=1), make_micro_rows(4))
    with pytest.raises(ValueError, match="processing_class=processor"):
        trainer.save_compressed(tmp_path / "compressed")
    assert not (tmp_path / "compressed").exists()


def test_save_compressed_saves_the_processor_of_a_teacher_given_by_name(tmp_path, tiny_whisper):
    from transformers import WhisperProcessor

    from hf_whisper_kdq.sources import save_whisper

    teacher, processor = tiny_whisper
    teacher_folder = save_whisper(teacher, processor, tmp_path / "teacher")
    args = _args(tmp_path, max_steps=1, quant_targets="decoder")
    trainer = DistillQuantTrainer(
        model=build_student(teacher, decoder_layers=1), teacher_model=str(teacher_folder), args=args
    )
    assert trainer.processing_class is None
    folder = trainer.save_compressed(tmp_path / "compressed").folder
    saved = WhisperProcessor.from_pretrained(folder)
    assert saved.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    assert (folder / "preprocessor_config.json").is_file()


def test_distillation_only_saves_a_float_student_that_plain_transformers_loads(tmp_path, tiny_whisper):
    """quant_bit_choices="float" (the distillation-only ablation): nothing is quantized, and save_compressed writes
    the trained student as an fp16 folder with its plan and report instead of refusing after training."""
    from safetensors import safe_open
    from transformers import WhisperForConditionalGeneration

    from hf_whisper_kdq.data import WhisperDataCollator

    teacher, processor = tiny_whisper
    student = build_student(teacher, decoder_layers=1)
    args = _args(tmp_path, max_steps=1, quant_targets="decoder,embedding", quant_bit_choices="float")
    trainer = DistillQuantTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=Dataset.from_list(tiny_speech_rows(processor, [" hello world", " a sentence"])),
        data_collator=WhisperDataCollator(processor, decoder_start_token_id=student.config.decoder_start_token_id),
        processing_class=processor,
    )
    trainer.train()
    report = trainer.save_compressed(tmp_path / "compressed")
    folder = report.folder
    assert set(report.per_layer_bits.values()) <= {16} and report.embedding_quantized is False
    with safe_open(str(folder / "model.safetensors"), framework="pt") as file:
        assert {file.get_tensor(key).dtype for key in file.keys()} == {torch.float16}
    assert (folder / "kdq_plan.json").is_file() and (folder / "preprocessor_config.json").is_file()
    reloaded = WhisperForConditionalGeneration.from_pretrained(folder).eval()
    student = trainer.whole_student().eval()
    features = torch.randn(1, teacher.config.num_mel_bins, 2 * teacher.config.max_source_positions)
    labels = torch.tensor([[teacher.config.decoder_start_token_id, 5, 6]])
    with torch.no_grad():
        expected = student(input_features=features, decoder_input_ids=labels).logits
        got = reloaded(input_features=features, decoder_input_ids=labels).logits
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=2e-2)  # fp16 storage
    card = trainer.create_model_card(report=report).read_text()
    assert "stayed in floating point (distillation only)" in card and "quantization-aware" not in card
    assert "pack-quantized" not in card and "Weight format: safetensors float16" in card


def test_a_frozen_encoder_quantized_by_gptq_keeps_its_codes_through_training_and_export(
    tmp_path, tiny_whisper, monkeypatch
):
    """frozen_encoder_quantizer="gptq": the encoder's codes are GPTQ's (not round-to-nearest's at the same clipping
    ratios), calibrated on gptq_calibration_rows training rows; training leaves them as they are, and the packed
    file stores exactly them."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from transformers import WhisperForConditionalGeneration

    from hf_whisper_kdq import trainer as trainer_module
    from hf_whisper_kdq.data import WhisperDataCollator
    from hf_whisper_kdq.quant import quant_layers, quantize_weight

    calibrated_rows, gptq_layers = [], trainer_module.gptq_layers

    def counting(model, names, batches, **kwargs):
        calibrated_rows.append(sum(len(batch["labels"]) for batch in batches))
        return gptq_layers(model, names, batches, **kwargs)

    monkeypatch.setattr(trainer_module, "gptq_layers", counting)

    teacher, processor = tiny_whisper
    student = build_student(teacher)
    args = _args(
        tmp_path,
        max_steps=2,
        quant_targets="encoder,decoder,embedding",
        quant_bit_choices="4",
        freeze_encoder=True,
        frozen_encoder_quantizer="gptq",
        gptq_calibration_rows=3,
        learnable_clipping=True,
    )
    texts = [" hello world", " a sentence", " another one", " the fourth row"]
    trainer = DistillQuantTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=Dataset.from_list(tiny_speech_rows(processor, texts)),
        data_collator=WhisperDataCollator(processor, decoder_start_token_id=student.config.decoder_start_token_id),
        processing_class=processor,
    )
    assert calibrated_rows == [3]
    layers = quant_layers(trainer.model)
    encoder = [name for name in layers if ".encoder." in name]
    codes = {name: layers[name].fixed_codes() for name in encoder}
    assert encoder and all(q is not None for q in codes.values())
    assert all(layers[name].fixed_codes() is None for name in layers if name not in encoder)
    rounded = {
        name: quantize_weight(teacher.get_submodule(name).weight, layers[name].quant_spec, layers[name].weight_clip)
        for name in encoder
    }
    assert any(not torch.equal(codes[name].codes, rounded[name].codes) for name in encoder)
    trainer.train()
    assert all(layers[name].fixed_codes() is codes[name] for name in encoder)
    folder = trainer.save_compressed(tmp_path / "compressed").folder
    with safe_open(str(folder / "model.safetensors"), framework="pt") as file:
        for name in encoder:
            stored = unpack_from_int32(file.get_tensor(f"{name}.weight_packed"), 4, codes[name].codes.shape)
            assert torch.equal(stored.to(torch.int8), codes[name].codes), name
    reloaded = WhisperForConditionalGeneration.from_pretrained(folder).eval()
    features = torch.tensor(tiny_speech_rows(processor, [" x"])[0]["input_features"])[None]
    with torch.no_grad():
        expected = trainer.whole_student().eval().model.encoder(features).last_hidden_state
        got = reloaded.model.encoder(features).last_hidden_state
    torch.testing.assert_close(got, expected, atol=5e-3, rtol=5e-3)  # biases and norms stored in fp16


def test_gptq_starts_the_trained_decoder_and_training_moves_it(tmp_path, tiny_whisper, monkeypatch):
    """decoder_start_quantizer="gptq": after the frozen encoder's GPTQ (kept codes), the decoder's linears get GPTQ's
    codes as their start (their weights on those codes' grid, clipping ratios at 1, not searched again, no fixed
    codes), the token embedding keeps its searched clipping, and training moves them from there."""
    from hf_whisper_kdq import trainer as trainer_module
    from hf_whisper_kdq.data import WhisperDataCollator
    from hf_whisper_kdq.quant import quant_layers, quantize_weight

    calls, gptq_layers = [], trainer_module.gptq_layers

    def recording(model, names, batches, **kwargs):
        codes = gptq_layers(model, names, batches, **kwargs)
        calls.append((list(names), kwargs.get("keep_codes", True), codes))
        return codes

    monkeypatch.setattr(trainer_module, "gptq_layers", recording)
    teacher, processor = tiny_whisper
    args = _args(
        tmp_path,
        max_steps=2,
        learning_rate=1e-2,
        learnable_clipping=True,
        **GPTQ_INT4_RECIPE,
    )
    texts = [" hello world", " a sentence", " another one", " the fourth row"]
    trainer = DistillQuantTrainer(
        model=build_student(teacher),
        teacher_model=teacher,
        args=args,
        train_dataset=Dataset.from_list(tiny_speech_rows(processor, texts)),
        data_collator=WhisperDataCollator(processor, decoder_start_token_id=teacher.config.decoder_start_token_id),
        processing_class=processor,
    )
    (encoder, encoder_kept, _), (decoder, decoder_kept, codes) = calls
    assert encoder_kept and not decoder_kept and all(".encoder." in name for name in encoder)
    assert decoder and [name for name in decoder if ".decoder.layers." not in name] == []
    layers = quant_layers(trainer.model)
    assert all(layers[name].fixed_codes() is None for name in decoder)
    for name in decoder:
        layer = layers[name]
        assert torch.equal(layer.weight_clip, torch.ones_like(layer.weight_clip)), name
        assert torch.equal(layer.weight.detach(), codes[name].dequantize(layer.weight.dtype)), name
        # Rounding the start again (each training step) gives back GPTQ's codes in every group that kept its extreme
        # code: only groups whose extreme GPTQ's error feedback moved change (0.05% of whisper-base's decoder codes).
        again = quantize_weight(layer.weight.detach(), layer.quant_spec, layer.weight_clip.detach()).codes
        groups = codes[name].codes.unflatten(1, (-1, 32))
        kept_extreme = groups.eq(-8).any(-1)
        assert kept_extreme.float().mean() > 0.5, name
        assert torch.equal(again.unflatten(1, (-1, 32))[kept_extreme], groups[kept_extreme]), name
    rounded = {name: quantize_weight(teacher.get_submodule(name).weight, layers[name].quant_spec) for name in decoder}
    assert any(not torch.equal(codes[name].codes, rounded[name].codes) for name in decoder)
    embedding = trainer.model.model.decoder.embed_tokens
    assert torch.equal(embedding.weight, teacher.model.decoder.embed_tokens.weight)
    assert not torch.equal(embedding.weight_clip, torch.ones_like(embedding.weight_clip))  # searched
    start = {name: layers[name].weight.detach().clone() for name in decoder}
    trainer.train()
    assert all(not torch.equal(layers[name].weight.detach(), start[name]) for name in decoder)


# ---- bitsandbytes: a teacher in 8 or 4 bits, 8-bit optimizers --------------------------------------------------


@pytest.mark.parametrize("load_in", ["8bit", "4bit"])
def test_a_teacher_loaded_in_low_bits_by_bitsandbytes_distils_a_student(tmp_path, tiny_whisper, load_in):
    """teacher_load_in: bitsandbytes quantizes the frozen teacher as it loads; the trainer keeps its dtypes, bills
    its fp16 size from its original shapes, and trains the student from it; optim="adamw_bnb_8bit" too."""
    bnb = pytest.importorskip("bitsandbytes")
    from hf_whisper_kdq.data import WhisperDataCollator
    from hf_whisper_kdq.selection import fp16_bytes
    from hf_whisper_kdq.sources import save_whisper

    teacher, processor = tiny_whisper
    folder = save_whisper(teacher, processor, tmp_path / "teacher")
    student = build_student(teacher, decoder_layers=1)
    rows = tiny_speech_rows(processor, [" hello world", " a longer sentence to transcribe"])
    args = _args(
        tmp_path,
        max_steps=2,
        per_device_train_batch_size=2,
        selection_probe_batches=1,
        quant_targets="decoder",
        teacher_load_in=load_in,
        optim="adamw_bnb_8bit",
    )
    trainer = DistillQuantTrainer(
        model=student,
        teacher_model=str(folder),
        args=args,
        train_dataset=Dataset.from_list(rows),
        data_collator=WhisperDataCollator(processor, decoder_start_token_id=student.config.decoder_start_token_id),
        processing_class=processor,
    )
    linear = trainer.teacher.model.decoder.layers[0].fc1
    assert isinstance(linear, bnb.nn.Linear8bitLt if load_in == "8bit" else bnb.nn.Linear4bit)
    assert fp16_bytes(trainer.teacher) == fp16_bytes(teacher)
    assert not any(p.requires_grad for p in trainer.teacher.parameters())
    trainer.train()
    logs = _train_logs(trainer)
    assert len(logs) == 2 and all(torch.isfinite(torch.tensor(entry["loss_kd"])) for entry in logs)
    states = [state for state in trainer.optimizer.state.values() if "state1" in state]
    assert states and states[0]["state1"].dtype == torch.uint8  # bitsandbytes' 8-bit Adam moments
    with pytest.raises(ValueError, match="pass its name or path"):
        DistillQuantTrainer(model=build_student(teacher, decoder_layers=1), teacher_model=teacher, args=args)


# ---- balanced loss and quantizer parameters -------------------------------------------------------------------


def test_final_decoder_layer_is_distilled_before_the_final_layer_norm(tmp_path, micro_whisper):
    """Hugging Face's last decoder hidden state is the final-LayerNorm output the KD term already matches through the
    logits; at unit scale among tiny inner states it dominated an absolute hidden term. With the default loss the
    last layer is compared as every other layer (its own output) and weighs as much as the others at step 0."""
    teacher = micro_whisper(decoder_layers=4)
    student = copy.deepcopy(teacher)
    # Without the caches, so that the teacher's decoder runs here (a cache of an earlier test may hold its outputs).
    args = _args(
        tmp_path,
        quant_bit_choices="4",
        quant_targets="decoder",
        cache_encoder_outputs=False,
        cache_teacher_outputs=False,
    )
    trainer = DistillQuantTrainer(model=student, teacher_model=teacher, args=args)
    for unit in trainer.plan.layers("decoder"):
        unit.distilled = True
    batch = micro_collate(make_micro_rows(4))
    layer_outputs = {}
    for who, model in (("teacher", teacher), ("student", student)):
        last = model.model.decoder.layers[-1]
        last.register_forward_hook(
            lambda module, args, output, who=who: layer_outputs.__setitem__(
                who, output[0] if isinstance(output, tuple) else output
            )
        )
    _, _, reps = trainer.forwards(trainer.model, batch, ("decoder",))
    mask = batch["labels"].ne(IGNORE_INDEX)
    for who in ("teacher", "student"):
        assert torch.equal(reps[who]["decoder"][-1], layer_outputs[who]), who
    relative = trainer.args.hidden_loss_scale == "relative"
    terms = [
        float(
            hidden_distillation_loss(
                reps["student"]["decoder"][s], reps["teacher"]["decoder"][t], mask=mask, relative=relative
            )
        )
        for s, t in trainer.plan.distilled_pairs("decoder")
    ]
    assert 0 < terms[-1] < 10 * sum(terms[:-1]) / len(terms[:-1]), terms


def test_clipping_ratios_have_their_own_parameter_group(tmp_path, pair):
    student, teacher = pair
    args = _args(tmp_path, max_steps=1, learnable_clipping=True, clip_learning_rate=0.05, weight_decay=0.1)
    trainer = _trainer(student, teacher, args, make_micro_rows(8))
    trainer.create_optimizer()
    clips = {id(p) for n, p in trainer.model.named_parameters() if n.endswith(".weight_clip")}
    assert clips
    groups = [g for g in trainer.optimizer.param_groups if {id(p) for p in g["params"]} & clips]
    assert len(groups) == 1 and {id(p) for p in groups[0]["params"]} == clips
    assert groups[0]["lr"] == 0.05 and groups[0]["weight_decay"] == 0.0
    others = {id(p) for g in trainer.optimizer.param_groups if g is not groups[0] for p in g["params"]}
    assert {id(p) for p in trainer.model.parameters() if p.requires_grad} == clips | others
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if n.endswith(".weight_clip")}
    trainer.train()
    moved = [n for n, p in trainer.model.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert moved


def test_clipping_ratios_start_searched_at_the_widest_uniform_bits_the_budget_allows(tmp_path, pair):
    # Searched when the layers are prepared (before any optimizer holds copies of them): at 8 bits the search
    # returns ratios of ~1, which would leave learnable clipping to start from no clipping at 3 bits.
    student, teacher = pair
    args = _args(tmp_path, max_steps=1, learnable_clipping=True, size_budget_mb=_student_budget_mb(student, 3.2))
    trainer = _trainer(student, teacher, args, make_micro_rows(8))
    assert {u.bits for u in trainer.plan.units if u.modules} == {3}
    searched_below_one = 0
    for module in trainer.model.modules():
        if getattr(module, "weight_clip", None) is not None:
            spec = module.quant_spec
            assert spec.bits == 3
            searched_below_one += int((module.weight_clip < 1).any())
    assert searched_below_one > 0


def test_clipping_ratios_start_searched_on_the_probe_inputs(pair, tmp_path):
    """Before training the ratios minimize the expected output error on the probe batches' inputs (the embedding's on
    its tied output layer's), not the weight error; the step-0 selection leaves them alone."""
    student, teacher = pair
    args = _args(
        tmp_path, max_steps=1, learnable_clipping=True, quant_targets="decoder,embedding", quant_bit_choices="3"
    )
    trainer = _trainer(student, teacher, args, make_micro_rows(8))
    clips = {n: m.weight_clip for n, m in trainer.model.named_modules() if getattr(m, "weight_clip", None) is not None}
    by_weight = {
        n: search_clip_ratios(m.weight.detach(), m.quant_spec, layer=n)
        for n, m in trainer.model.named_modules()
        if getattr(m, "weight_clip", None) is not None and m.quant_spec is not None
    }
    changed = {n for n, ratios in by_weight.items() if not torch.equal(clips[n].detach(), ratios)}
    assert changed and "model.decoder.embed_tokens" in changed, changed
    again = copy.deepcopy(trainer.model)  # the inputs are the float student's: measured again, the same ratios
    calibrate_clipping(again, trainer.plan, trainer.probe_batches(per_optimizer_step=True))
    assert all(torch.equal(m.weight_clip, clips[n]) for n, m in again.named_modules() if n in clips)
    before = {n: c.detach().clone() for n, c in clips.items()}
    _selection_callback(trainer).select(step=0)
    assert all(c is trainer.model.get_submodule(n).weight_clip and torch.equal(c, before[n]) for n, c in clips.items())


def test_no_embedding_size_warning_for_a_plan_of_one_width(tmp_path, micro_whisper, caplog):
    """A one-width plan's export stores the embedding packed (export.compressed): nothing to warn about."""
    teacher = micro_whisper(decoder_layers=4)
    student = build_student(teacher, decoder_layers=2)
    args = _args(
        tmp_path,
        max_steps=1,
        quant_targets="decoder,embedding",
        quant_bit_choices="4",
        size_budget_accounting="paper",
    )
    trainer = _trainer(student, teacher, args, make_micro_rows(8))
    with caplog.at_level("WARNING", logger="hf_whisper_kdq.callbacks"):
        trainer.train()
    assert trainer.plan.unit("embedding").bits == 4
    assert "stores the embedding in fp16" not in caplog.text
