"""Step time of DistillQuantTrainer against a plain Seq2SeqTrainer on the same student and batches.

    python benchmarks/step_time.py --teacher base --decoder_layers 2 --batch_size 4 --steps 6
    python benchmarks/step_time.py --teacher small --decoder_layers 4 --batch_size 32 --bf16   # on a GPU

Random weights with real Whisper shapes (throughput does not depend on the values). Four runs, each timed over
optimizer steps after ``--warmup`` untimed ones (layer selection at train begin is excluded):

  plain         Seq2SeqTrainer fine-tune of the student, encoder trainable
  plain_frozen  the same with the encoder frozen
  kdq           DistillQuantTrainer, encoder trainable (teacher and student encoders both run)
  kdq_shared    DistillQuantTrainer, frozen student encoder equal to the teacher's: one encoder pass per step

Targets of the issue: kdq ≤ 1.6 × plain, kdq_shared ≤ 1.2 × plain. Ratios are printed, not asserted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import numpy as np
import torch
from datasets import Dataset
from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments, TrainerCallback, WhisperConfig, WhisperForConditionalGeneration

from hf_whisper_kdq import DistillQuantArguments, DistillQuantTrainer, build_student

SHAPES = {
    "tiny": dict(d_model=384, encoder_layers=4, decoder_layers=4, encoder_attention_heads=6, decoder_attention_heads=6,
                 encoder_ffn_dim=1536, decoder_ffn_dim=1536),
    "base": dict(d_model=512, encoder_layers=6, decoder_layers=6, encoder_attention_heads=8, decoder_attention_heads=8,
                 encoder_ffn_dim=2048, decoder_ffn_dim=2048),
    "small": dict(d_model=768, encoder_layers=12, decoder_layers=12, encoder_attention_heads=12,
                  decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072),
}  # fmt: skip


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times, self._start = [], None

    def on_step_begin(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self._start)


def random_teacher(shape: str) -> WhisperForConditionalGeneration:
    config = WhisperConfig(vocab_size=51865, num_mel_bins=80, decoder_start_token_id=50258, pad_token_id=50257,
                           eos_token_id=50257, bos_token_id=50257, **SHAPES[shape])  # fmt: skip
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(config)
    model.generation_config.decoder_start_token_id = 50258
    model.generation_config.eos_token_id = model.generation_config.pad_token_id = 50257
    model.generation_config.no_timestamps_token_id = 50363
    return model


def dataset(rows: int, label_tokens: int) -> Dataset:
    rng = np.random.default_rng(0)
    return Dataset.from_dict(
        {
            "input_features": [rng.standard_normal((80, 3000), dtype=np.float32) for _ in range(rows)],
            "labels": [[50258, 50259, 50359, 50363, *rng.integers(0, 50000, label_tokens).tolist(), 50257] for _ in range(rows)],
        }
    )


def collate(rows):
    return {
        "input_features": torch.tensor(np.stack([r["input_features"] for r in rows]), dtype=torch.float32),
        "labels": torch.tensor([r["labels"][1:] for r in rows]),  # the model prepends the start token itself
    }


def run(kind: str, teacher, cli) -> list[float]:
    student = build_student(teacher, decoder_layers=cli.decoder_layers)
    timer = StepTimer()
    common = dict(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=cli.batch_size, max_steps=cli.warmup + cli.steps,
        learning_rate=1e-5, report_to="none", save_strategy="no", logging_strategy="no", bf16=cli.bf16,
        use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, remove_unused_columns=False,
    )  # fmt: skip
    data = dataset(cli.batch_size * (cli.warmup + cli.steps), cli.label_tokens)
    if kind.startswith("plain"):
        if kind == "plain_frozen":
            student.freeze_encoder()
        trainer = Seq2SeqTrainer(model=student, args=Seq2SeqTrainingArguments(**common), train_dataset=data,
                                 data_collator=collate, callbacks=[timer])  # fmt: skip
    else:
        args = DistillQuantArguments(**common, freeze_encoder=kind == "kdq_shared", quant_targets="decoder",
                                     quant_bit_choices="4", num_distill_layers=cli.decoder_layers,
                                     selection_probe_batches=1)  # fmt: skip
        trainer = DistillQuantTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data,
                                      data_collator=collate, callbacks=[timer])  # fmt: skip
        assert trainer.shares_encoder == (kind == "kdq_shared")
    trainer.train()
    return timer.times[cli.warmup :]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", choices=sorted(SHAPES), default="base")
    parser.add_argument("--decoder_layers", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--label_tokens", type=int, default=24)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--json", help="also write the results to this file")
    cli = parser.parse_args()
    teacher = random_teacher(cli.teacher)
    if torch.cuda.is_available():
        teacher = teacher.cuda()
    results = {}
    for kind in ("plain", "plain_frozen", "kdq", "kdq_shared"):
        times = run(kind, teacher, cli)
        results[kind] = statistics.median(times)
        print(f"{kind:<13} median step {results[kind] * 1000:8.1f} ms over {len(times)} steps")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\n{cli.teacher} teacher → {cli.decoder_layers}-decoder-layer student, batch {cli.batch_size}, {device}")
    print(f"kdq / plain               = {results['kdq'] / results['plain']:.2f}  (target ≤ 1.6)")
    print(f"kdq_shared / plain        = {results['kdq_shared'] / results['plain']:.2f}  (target ≤ 1.2)")
    print(f"kdq_shared / plain_frozen = {results['kdq_shared'] / results['plain_frozen']:.2f}")
    if cli.json:
        with open(cli.json, "w") as handle:
            json.dump({"config": vars(cli), "device": device, "median_step_seconds": results}, handle, indent=2)


if __name__ == "__main__":
    main()
