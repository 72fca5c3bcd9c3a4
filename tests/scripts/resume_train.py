"""Train a narrow micro student (adapters, learnable clipping, dropout, dynamic matching, re-selection every 2
steps) for 10 steps with a checkpoint every 3; optionally die by SIGKILL, or resume.

    python tests/scripts/resume_train.py OUT run                # uninterrupted
    python tests/scripts/resume_train.py OUT kill-in-save 9     # SIGKILL while checkpoint-9 is half written
    python tests/scripts/resume_train.py OUT resume             # train(resume_from_checkpoint=True)
    python tests/scripts/resume_train.py OUT run --lora         # any of them with a LoRA student (lora_r=4)

Writes OUT/result.pt when training ends: the log history, the plan and every state_dict tensor.
"""

import os
import signal
import sys
from pathlib import Path

import torch
from datasets import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for conftest's micro helpers

from conftest import make_micro_rows, make_micro_whisper, micro_collate  # noqa: E402

from hf_whisper_kdq import DistillQuantArguments, DistillQuantTrainer  # noqa: E402

MAX_STEPS = 10
SAVE_STEPS = 3


def main(output: str, mode: str, kill_step: int | None, lora: bool) -> None:
    torch.set_num_threads(1)  # one summation order in every run, so that resumed and uninterrupted runs agree bitwise
    teacher = make_micro_whisper(seed=0, decoder_layers=4)
    # A narrower student gets adapters to the teacher's width; dropout makes every step consume the torch RNG.
    dropout = dict(dropout=0.1, attention_dropout=0.1, activation_dropout=0.1)
    student = make_micro_whisper(seed=1, d_model=16, encoder_ffn_dim=32, decoder_ffn_dim=32, **dropout)
    # A size budget of 3.5 bits per layer weight on average (+ fp16 scales per 16, the rest fp16): mixed bits.
    linears = sum(
        m.weight.numel() for name, m in student.named_modules() if ".layers." in name and isinstance(m, torch.nn.Linear)
    )
    budget = ((sum(p.numel() for p in student.parameters()) - linears) * 2 + linears * 3.5 / 8 + linears / 16 * 2) / 1e6
    args = DistillQuantArguments(
        output_dir=output,
        per_device_train_batch_size=4,
        max_steps=MAX_STEPS,
        learning_rate=1e-2,
        warmup_steps=2,
        lr_scheduler_type="linear",
        logging_steps=1,
        save_strategy="steps",
        save_steps=SAVE_STEPS,
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        remove_unused_columns=False,
        quant_weight=0.1,
        hidden_target="both",
        num_distill_layers=1,
        layer_matching="dynamic",
        selection_interval=2,
        learnable_clipping=True,
        quant_group_size=16,
        size_budget_mb=budget,
        selection_cost="local_error",  # the micro model's output_kl costs are noise: they keep a uniform plan
        lora_r=4 if lora else 0,
    )
    # 16 rows in batches of 4: checkpoint-6 lies in the middle of the second (shuffled) epoch.
    trainer = DistillQuantTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=Dataset.from_list(make_micro_rows(16, seed=3)),
        data_collator=micro_collate,
    )
    if mode == "kill-in-save":
        save_rng_state = trainer._save_rng_state

        def dying_save_rng_state(folder):
            # Model weights, optimizer and scheduler of this checkpoint are on disk; RNG and trainer state are not.
            if trainer.state.global_step == kill_step:
                os.kill(os.getpid(), signal.SIGKILL)
            save_rng_state(folder)

        trainer._save_rng_state = dying_save_rng_state
    trainer.train(resume_from_checkpoint=True if mode == "resume" else None)
    weights = {k: v.detach().clone() for k, v in trainer.accelerator.unwrap_model(trainer.model).state_dict().items()}
    result = {"log_history": trainer.state.log_history, "plan": trainer.plan.to_dict(), "weights": weights}
    torch.save(result, Path(output) / "result.pt")


if __name__ == "__main__":
    arguments = [a for a in sys.argv[1:] if a != "--lora"]
    main(arguments[0], arguments[1], int(arguments[2]) if len(arguments) > 2 else None, "--lora" in sys.argv)
