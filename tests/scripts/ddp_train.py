"""Train a micro student with DistillQuantTrainer for a few steps; run alone or under torchrun.

    python tests/scripts/ddp_train.py OUT BATCH_PER_PROCESS
    torchrun --nproc_per_node 2 tests/scripts/ddp_train.py OUT BATCH_PER_PROCESS

Writes OUT/result.pt (main process only): the logged losses and gradient norms, the plan, the final weights; and
OUT/plan_rank<N>.json from every process.
"""

import json
import os
import sys
from pathlib import Path

import torch
from datasets import Dataset
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for conftest's micro helpers

from conftest import make_micro_rows, make_micro_whisper, micro_collate  # noqa: E402

from hf_whisper_kdq import DistillQuantArguments, DistillQuantTrainer, build_student  # noqa: E402
from hf_whisper_kdq.sharding import end_distributed_process  # noqa: E402


class PoisonTeacher(TrainerCallback):
    def __init__(self, trainer, rank: int, step: int):
        self.trainer, self.rank, self.step = trainer, rank, step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step and args.process_index == self.rank:
            with torch.no_grad():
                self.trainer.teacher.proj_out.weight.fill_(float("nan"))


def main(output: str, batch_size: int) -> None:
    teacher = make_micro_whisper(seed=0, decoder_layers=4)
    narrow = os.environ.get("KDQ_TEST_STUDENT") == "narrow"  # half the teacher's width: distilled through adapters
    if narrow:
        student = make_micro_whisper(seed=1, d_model=16, encoder_ffn_dim=32, decoder_ffn_dim=32)
    else:
        student = build_student(teacher, decoder_layers=2)
    settings = dict(
        output_dir=output,
        per_device_train_batch_size=batch_size,
        max_steps=4,
        learning_rate=1e-3,
        # The clipping ratios' own group at the model's rate: the tolerances of test_distributed were measured there
        # (Adam turns their tiny gradients into lr-sized steps, so summation-order noise shows at that scale).
        clip_learning_rate=1e-3,
        warmup_steps=0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        # Mixed bits under a budget and a re-selection mid-run: a plan that every rank must compute alike.
        quant_targets="decoder",
        quant_bit_choices="2,4,8",
        size_budget_ratio=0.5,
        selection_interval=2,
        num_distill_layers=1,
        # The local rule: this micro model's end-to-end costs (output_kl) are noise (~1e-5 nats), whose ranking
        # FSDP's sharded arithmetic can reorder against one process; q_l separates its layers by orders of magnitude.
        selection_cost="local_error",
        disable_tqdm=True,
        dataloader_drop_last=True,
        remove_unused_columns=False,
        data_seed=0,
        predict_with_generate=True,
        generation_max_length=12,
        per_device_eval_batch_size=3,
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        # More training arguments as JSON, e.g. {"deepspeed": "examples/deepspeed_zero2.json"}: the same run under ZeRO;
        # {"fsdp": true, "fsdp_config": "examples/fsdp2.json"} under FSDP (on CPUs with tests/scripts/fsdp_on_cpu).
    )
    if narrow:  # groups that divide its width; a budget that keeps one quantizable layer in float (its clipping kept)
        settings.update(quant_group_size=16, quant_bit_choices="2,4,8,float", size_budget_ratio=0.17)
    args = DistillQuantArguments(**{**settings, **json.loads(os.environ.get("KDQ_TEST_EXTRA_ARGS", "{}"))})
    trainer = DistillQuantTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=Dataset.from_list(make_micro_rows(32, seed=1)),
        data_collator=micro_collate,
    )
    if "KDQ_TEST_POISON_TEACHER" in os.environ:  # "RANK:STEP": that process's teacher turns NaN before that step
        rank, step = map(int, os.environ["KDQ_TEST_POISON_TEACHER"].split(":"))
        trainer.add_callback(PoisonTeacher(trainer, rank, step))
    trainer.train(resume_from_checkpoint=os.environ.get("KDQ_TEST_RESUME_FROM"))  # a checkpoint folder, or unset
    # Evaluation with generation after training: the trained, fake-quantized weights must be the ones used (the test
    # loss), and under FSDP every process must keep joining the others' weight gathers until the longest generation
    # ends (synced_gpus).
    model = trainer.accelerator.unwrap_model(trainer.model)
    generate, synced = model.generate, set()  # what the trainer asks generation to do across processes

    def recording_generate(*args, **kwargs):
        synced.add(kwargs.get("synced_gpus"))
        return generate(*args, **kwargs)

    model.generate = recording_generate
    predicted = trainer.predict(Dataset.from_list(make_micro_rows(6, seed=2)))
    # Every rank writes its own plan (measurements included): the test checks that they agree exactly.
    plan_file = Path(output) / f"plan_rank{trainer.args.process_index}.json"
    plan_file.write_text(json.dumps(trainer.plan.to_dict(), sort_keys=True))
    student = trainer.whole_student()  # on every process: under FSDP it gathers the shards onto the main one
    if trainer.is_world_process_zero():
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        grad_norms = [entry["grad_norm"] for entry in trainer.state.log_history if "grad_norm" in entry]
        plan = [(u.name, u.bits, u.distilled) for u in trainer.plan.units]
        weights = {k: v.detach().clone() for k, v in student.state_dict().items()}
        specs = {name: str(m.quant_spec) for name, m in student.named_modules() if hasattr(m, "quant_spec")}
        torch.save(
            {
                "losses": losses,
                "grad_norms": grad_norms,
                "plan": plan,
                "weights": weights,
                "test_loss": predicted.metrics["test_loss"],
                "generated": torch.as_tensor(predicted.predictions),
                "synced_gpus": sorted(map(str, synced)),
                "specs": specs,
            },
            Path(output) / "result.pt",
        )
    end_distributed_process()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
