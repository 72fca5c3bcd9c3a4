"""A LoRA student against full KDQ at equal steps, on real whisper-base (issue 18 §1).

    python benchmarks/lora_students.py --mode full  --output full.json     # one process per mode: its own peak memory
    python benchmarks/lora_students.py --mode lora  --output lora.json --lora_r 16
    python benchmarks/lora_students.py --compare full.json lora.json       # the table of benchmarks/README.md

The student is whisper-base itself with its decoder and tied embedding fake-quantized at int3 (groups of 32,
learnable clipping), its encoder frozen and shared with the teacher: the setting where round-to-nearest breaks the
model (benchmarks/README.md, "Guided bits against uniform bits") and training has something to repair. Both modes
train ``--steps`` steps of ``DistillQuantTrainer`` on the first ``--train_per_language`` rows of ``train_en.jsonl`` and
``train_zh.jsonl`` with the same arguments (``--lora_r 0`` or r); the selection runs once at the start (one bit
choice: it plans nothing, but measures every unit, as a guided run does). Measured per mode:

* trainable parameters, and the optimizer's state after training (bytes of every tensor AdamW keeps);
* the process's peak resident memory (``ru_maxrss``) when the trainer is built (teacher, student, data, caches) and at
  the end of training: their difference is what training added (gradients, optimizer state, activations);
* seconds per step, the mean training loss (and KD term) of the last quarter of the steps;
* teacher-forced KL(teacher ‖ student) in nats per label token and top-1 agreement on the first ``--per_language``
  English (LJSpeech) and Mandarin (AISHELL) rows of ``dev.jsonl``, before and after training.
"""

from __future__ import annotations

import copy
import json
import resource
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import concatenate_datasets
from guided_vs_uniform import LANGUAGES, SPEECH, DevSet, rows
from transformers import HfArgumentParser

from hf_whisper_kdq import DistillQuantArguments, DistillQuantTrainer, WhisperDataCollator, load_whisper


@dataclass
class LoraBenchmarkArguments:
    """One mode's run, or ``--compare`` of runs (``HfArgumentParser``: ``--help`` lists every field)."""

    mode: str = field(default="lora", metadata={"help": "full (every weight trains) or lora"})
    output: str = field(default="lora.json", metadata={"help": "where the run's measurements go (JSON)"})
    compare: list[str] = field(default_factory=list, metadata={"help": "JSON files of runs: print their table"})
    teacher: str = field(default="openai/whisper-base", metadata={"help": "any sources.load_whisper source"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank of --mode lora"})
    bits: str = field(default="3", metadata={"help": "quant_bit_choices (one width: a uniform plan)"})
    steps: int = field(default=16, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=4, metadata={"help": "training and scoring batch size"})
    learning_rate: float = field(default=1e-4, metadata={"help": "compress's default"})
    train_per_language: int = field(default=32, metadata={"help": "training rows per language"})
    per_language: int = field(default=8, metadata={"help": "dev utterances per language"})
    threads: int = field(default=1, metadata={"help": "CPU threads"})


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def optimizer_state_bytes(optimizer) -> int:
    inner = getattr(optimizer, "optimizer", optimizer)
    return sum(
        value.numel() * value.element_size()
        for state in inner.state.values()
        for value in state.values()
        if torch.is_tensor(value)
    )


def run(options: LoraBenchmarkArguments) -> dict:
    torch.set_num_threads(options.threads)
    torch.manual_seed(0)
    teacher, processor = load_whisper(options.teacher)
    teacher.eval()
    dev = DevSet(teacher, processor, options.per_language, options.batch_size)
    train = concatenate_datasets(
        [rows(SPEECH / f"train_{lang}.jsonl", lang, options.train_per_language, processor) for lang in LANGUAGES]
    )
    folder = tempfile.mkdtemp()
    args = DistillQuantArguments(
        output_dir=folder,
        per_device_train_batch_size=options.batch_size,
        report_to="none",
        use_cpu=True,
        remove_unused_columns=False,
        quant_targets="decoder,embedding",
        quant_bit_choices=options.bits,
        freeze_encoder=True,
        selection_probe_batches=1,
        encoder_cache_dir=str(Path(folder) / "cache"),
        max_steps=options.steps,
        learning_rate=options.learning_rate,
        warmup_steps=0,
        logging_steps=1,
        save_strategy="no",
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
        lora_r=options.lora_r if options.mode == "lora" else 0,
    )
    trainer = DistillQuantTrainer(
        model=copy.deepcopy(teacher),
        teacher_model=teacher,
        args=args,
        train_dataset=train,
        data_collator=WhisperDataCollator(processor, teacher.config.decoder_start_token_id),
    )
    student = trainer.model
    unique = {id(p): p for p in student.parameters()}.values()
    before = dev.score(student)
    built_mb = peak_rss_mb()
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    steps = [entry for entry in trainer.state.log_history if "loss" in entry]
    last = steps[-max(1, len(steps) // 4) :]
    return {
        "mode": options.mode,
        "lora_r": args.lora_r,
        "steps": options.steps,
        "learning_rate": options.learning_rate,
        "trainable_parameters": sum(p.numel() for p in unique if p.requires_grad),
        "parameters": sum(p.numel() for p in unique),
        "optimizer_state_bytes": optimizer_state_bytes(trainer.optimizer),
        "peak_rss_mb_built": built_mb,
        "peak_rss_mb_trained": peak_rss_mb(),
        "seconds_per_step": seconds / options.steps,
        "train_loss_last_quarter": sum(e["loss"] for e in last) / len(last),
        "train_kd_last_quarter": sum(e["loss_kd"] for e in last) / len(last),
        "dev_before": before,
        "dev_after": dev.score(student),
    }


def compare(files: list[str]) -> None:
    runs = [json.loads(Path(name).read_text()) for name in files]
    print(
        "| run | trainable params | optimizer state | peak RSS built → trained | s/step | loss (KD) last quarter "
        "| KL en / zh before → after | top-1 en / zh after |"
    )
    print("|---|---:|---:|---|---:|---|---|---|")
    for r in runs:
        name = ("full KDQ" if r["mode"] == "full" else f"LoRA r={r['lora_r']}") + f", lr {r['learning_rate']:g}"
        b, a = r["dev_before"], r["dev_after"]
        print(
            f"| {name} | {r['trainable_parameters'] / 1e6:.2f} M of {r['parameters'] / 1e6:.2f} M "
            f"| {r['optimizer_state_bytes'] / 2**20:.1f} MiB "
            f"| {r['peak_rss_mb_built']:.0f} → {r['peak_rss_mb_trained']:.0f} MiB | {r['seconds_per_step']:.1f} "
            f"| {r['train_loss_last_quarter']:.3f} ({r['train_kd_last_quarter']:.3f}) "
            f"| {b['kl_en']:.3f} / {b['kl_zh']:.3f} → {a['kl_en']:.3f} / {a['kl_zh']:.3f} "
            f"| {a['top1_en']:.1%} / {a['top1_zh']:.1%} |"
        )


def main() -> None:
    (options,) = HfArgumentParser(LoraBenchmarkArguments, description=__doc__).parse_args_into_dataclasses()
    if options.compare:
        compare(options.compare)
        return
    if options.mode not in ("full", "lora"):
        raise ValueError(f"--mode must be full or lora, got {options.mode!r}")
    result = run(options)
    Path(options.output).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2), flush=True)


if __name__ == "__main__":
    main()
