"""Step time of DistillQuantTrainer against a plain Seq2SeqTrainer on the same student and batches.

    python benchmarks/step_time.py --teacher base --decoder_layers 2 --batch_size 4 --steps 6
    python benchmarks/step_time.py --teacher small --decoder_layers 4 --batch_size 32 --bf16   # on a GPU

Random weights with real Whisper shapes (throughput does not depend on the values). Four runs, each timed over
optimizer steps after ``--warmup`` untimed ones (layer selection at train begin is excluded):

  plain         Seq2SeqTrainer fine-tune of the student, encoder trainable
  plain_frozen  the same with the encoder frozen
  kdq           DistillQuantTrainer, encoder trainable (teacher and student encoders both run)
  kdq_shared    DistillQuantTrainer, frozen student encoder equal to the teacher's: one encoder pass per step

Targets of the issue: kdq ≤ 1.6 × plain, kdq_shared ≤ 1.2 × plain. Ratios are printed, not asserted. The on-disk
caches of frozen outputs are off in these runs: with one pass over fresh rows they would only add their disk writes.
``--cached`` adds a fifth run, ``kdq_cached``: kdq_shared with the encoder-output and teacher-output caches on,
over ``batch_size × warmup`` rows, so that the warmup steps fill the caches and every timed step reads them (later
epochs, as in training on a small dataset).
On a GPU each run also reports its peak allocated GPU memory (teacher included where the run needs it).
``gpu/gpu_throughput.py`` runs these comparisons for several teacher shapes on one GPU.
"""

from __future__ import annotations

import gc
import json
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field

import torch
from transformers import (
    HfArgumentParser,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    TrainerCallback,
    WhisperConfig,
    WhisperForConditionalGeneration,
)

from hf_whisper_kdq import DistillQuantArguments, DistillQuantTrainer, build_student

SHAPES = {
    "tiny": dict(
        d_model=384,
        encoder_layers=4,
        decoder_layers=4,
        encoder_attention_heads=6,
        decoder_attention_heads=6,
        encoder_ffn_dim=1536,
        decoder_ffn_dim=1536,
    ),
    "base": dict(
        d_model=512,
        encoder_layers=6,
        decoder_layers=6,
        encoder_attention_heads=8,
        decoder_attention_heads=8,
        encoder_ffn_dim=2048,
        decoder_ffn_dim=2048,
    ),
    "small": dict(
        d_model=768,
        encoder_layers=12,
        decoder_layers=12,
        encoder_attention_heads=12,
        decoder_attention_heads=12,
        encoder_ffn_dim=3072,
        decoder_ffn_dim=3072,
    ),
    # CPU smoke runs of the benchmark scripts: 64 input frames instead of 3000, so that a step takes milliseconds.
    "micro": dict(
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_source_positions=32,
    ),
}
KINDS = ("plain", "plain_frozen", "kdq", "kdq_shared")
ALL_KINDS = (*KINDS, "kdq_cached")  # kdq_cached only with --cached (or --runs)
# Multilingual Whisper's special tokens: <|startoftranscript|> <|en|> <|transcribe|> <|notimestamps|>, <|endoftext|>.
START, PREFIX, END = 50258, (50259, 50359, 50363), 50257


@dataclass
class Workload:
    """What every run of one comparison trains: the student's depth, the batches and how many steps are timed."""

    decoder_layers: int = 2
    batch_size: int = 4
    label_tokens: int = 24
    steps: int = 5
    warmup: int = 1
    quant_targets: str = "decoder"  # of the KDQ runs, at int4
    bf16: bool = False
    use_cpu: bool = not torch.cuda.is_available()


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
    config = WhisperConfig(
        vocab_size=51865,
        num_mel_bins=80,
        decoder_start_token_id=START,
        pad_token_id=END,
        eos_token_id=END,
        bos_token_id=END,
        **SHAPES[shape],
    )
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(config)
    model.generation_config.decoder_start_token_id = START
    model.generation_config.eos_token_id = model.generation_config.pad_token_id = END
    model.generation_config.no_timestamps_token_id = PREFIX[-1]
    return model


class RandomSpeech(torch.utils.data.Dataset):
    """Rows of random log-mel features and labels for ``config``'s input size; row i is the same in every run
    (seeded by i), so that all runs of a comparison train on the same batches. Built on access: a stored copy of
    the rows of a large GPU batch would take gigabytes."""

    def __init__(self, config: WhisperConfig, rows: int, label_tokens: int):
        self.shape = (config.num_mel_bins, 2 * config.max_source_positions)  # the encoder's convolutions halve it
        self.rows, self.label_tokens = rows, label_tokens

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, index: int) -> dict:
        generator = torch.Generator().manual_seed(index)
        tokens = torch.randint(0, 50000, (self.label_tokens,), generator=generator).tolist()
        return {
            "input_features": torch.randn(self.shape, generator=generator),
            "labels": [START, *PREFIX, *tokens, END],
        }


def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
    return {
        "input_features": torch.stack([r["input_features"] for r in rows]),
        "labels": torch.tensor([r["labels"][1:] for r in rows]),  # the model prepends the start token itself
    }


def release(model: torch.nn.Module) -> None:
    """Move a model back to the CPU and free the GPU's cache, so that the next run's peak memory is its own."""
    model.to("cpu")
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run(kind: str, teacher: WhisperForConditionalGeneration, work: Workload, extra_callbacks: tuple = ()) -> dict:
    """Train ``kind`` (one of KINDS) for warmup + steps steps; the median step time, steps/s and peak GPU memory.
    ``extra_callbacks`` join the step timer (a profiler, say)."""
    student = build_student(teacher, decoder_layers=work.decoder_layers)
    timer = StepTimer()
    cached = kind == "kdq_cached"
    rows = work.batch_size * (max(1, work.warmup) if cached else work.warmup + work.steps)
    data = RandomSpeech(teacher.config, rows, work.label_tokens)
    gpu = not work.use_cpu and torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as scratch:
        common = dict(
            output_dir=scratch,
            per_device_train_batch_size=work.batch_size,
            max_steps=work.warmup + work.steps,
            learning_rate=1e-5,
            report_to="none",
            save_strategy="no",
            logging_strategy="no",
            bf16=work.bf16,
            use_cpu=work.use_cpu,
            dataloader_num_workers=0,
            remove_unused_columns=False,
            disable_tqdm=True,
        )
        if kind.startswith("plain"):
            if kind == "plain_frozen":
                student.freeze_encoder()
            trainer = Seq2SeqTrainer(
                model=student,
                args=Seq2SeqTrainingArguments(**common),
                train_dataset=data,
                data_collator=collate,
                callbacks=[timer, *extra_callbacks],
            )
        else:
            args = DistillQuantArguments(
                **common,
                freeze_encoder=kind != "kdq",
                quant_targets=work.quant_targets,
                quant_bit_choices="4",
                num_distill_layers=work.decoder_layers,
                selection_probe_batches=1,
                cache_encoder_outputs=cached,
                cache_teacher_outputs=cached,
                encoder_cache_dir=f"{scratch}/cache",
            )
            trainer = DistillQuantTrainer(
                model=student,
                teacher_model=teacher,
                args=args,
                train_dataset=data,
                data_collator=collate,
                callbacks=[timer, *extra_callbacks],
            )
            assert trainer.forwards.shares_encoder == (kind != "kdq")
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
        peak = torch.cuda.max_memory_allocated() if gpu else None
    del trainer
    release(student)
    release(teacher)
    times = timer.times[work.warmup :]
    median = statistics.median(times)
    return {"median_step_s": median, "steps_per_s": 1 / median, "timed_steps": len(times), "peak_memory_bytes": peak}


def ratios(runs: dict[str, dict]) -> dict[str, float]:
    """Step-time ratios of the comparison (> 1: the first is slower), for the pairs whose runs are there."""
    step = {kind: result["median_step_s"] for kind, result in runs.items()}
    pairs = [
        ("kdq", "plain"),
        ("kdq_shared", "plain"),
        ("kdq_shared", "plain_frozen"),
        ("kdq_shared", "kdq"),
        ("kdq_cached", "kdq_shared"),
        ("kdq_cached", "plain_frozen"),
    ]
    return {f"{a}/{b}": step[a] / step[b] for a, b in pairs if a in step and b in step}


def compare(teacher: WhisperForConditionalGeneration, work: Workload, cached: bool = False, kinds=None) -> dict:
    """Every kind of KINDS (and ``kdq_cached``), or only ``kinds``, on the same student and batches:
    {"runs": {kind: run(...)}, "ratios": ratios(...)}."""
    runs = {}
    for kind in kinds or (ALL_KINDS if cached else KINDS):
        runs[kind] = run(kind, teacher, work)
        memory = runs[kind]["peak_memory_bytes"]
        print(
            f"{kind:<13} median step {runs[kind]['median_step_s'] * 1000:8.1f} ms over {runs[kind]['timed_steps']} "
            f"steps" + ("" if memory is None else f", peak GPU memory {memory / 2**30:.2f} GiB"),
            flush=True,
        )
    return {"runs": runs, "ratios": ratios(runs)}


def device_name(work: Workload) -> str:
    if not work.use_cpu and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({torch.get_num_threads()} threads)"


def print_ratios(values: dict[str, float]) -> None:
    targets = {"kdq/plain": "  (target ≤ 1.6)", "kdq_shared/plain": "  (target ≤ 1.2)"}
    for name, value in values.items():
        print(f"{name:<25} = {value:.2f}{targets.get(name, '')}")


@dataclass
class StepTimeArguments:
    """Which comparison to time (``HfArgumentParser``: ``--help`` lists every field)."""

    teacher: str = field(
        default="base", metadata={"help": f"Whisper shape of the random teacher: {', '.join(sorted(SHAPES))}"}
    )
    decoder_layers: int = field(default=2, metadata={"help": "decoder layers of the spaced student"})
    batch_size: int = field(default=4, metadata={"help": "rows per optimizer step"})
    label_tokens: int = field(default=24, metadata={"help": "text tokens per label row"})
    steps: int = field(default=5, metadata={"help": "timed optimizer steps per run"})
    warmup: int = field(default=1, metadata={"help": "untimed steps before them (kernel choice, allocation)"})
    quant_targets: str = field(
        default="decoder",
        metadata={"help": "what the KDQ runs quantize at int4 (e.g. decoder,embedding, as compress does)"},
    )
    bf16: bool = field(default=False, metadata={"help": "bf16 mixed precision (GPUs and recent CPUs)"})
    cached: bool = field(
        default=False, metadata={"help": "also time kdq_shared with the frozen-output caches filled (see above)"}
    )
    runs: str | None = field(
        default=None,
        metadata={
            "help": f"only these runs, comma-separated from {', '.join(ALL_KINDS)} (e.g. kdq_cached alone, to follow "
            "the cached KDQ step across changes)"
        },
    )
    json: str | None = field(default=None, metadata={"help": "also write the results to this file"})

    def __post_init__(self):
        if self.teacher not in SHAPES:
            raise ValueError(f"--teacher {self.teacher!r}: choose from {', '.join(sorted(SHAPES))}")
        if self.runs and not set(self.runs.split(",")) <= set(ALL_KINDS):
            raise ValueError(f"--runs: unknown run(s) {sorted(set(self.runs.split(',')) - set(ALL_KINDS))}")


def main(argv=None) -> None:
    (cli,) = HfArgumentParser(StepTimeArguments, description=__doc__).parse_args_into_dataclasses(args=argv)
    kinds = cli.runs.split(",") if cli.runs else None
    work = Workload(
        decoder_layers=cli.decoder_layers,
        batch_size=cli.batch_size,
        label_tokens=cli.label_tokens,
        steps=cli.steps,
        warmup=cli.warmup,
        quant_targets=cli.quant_targets,
        bf16=cli.bf16,
    )
    result = compare(random_teacher(cli.teacher), work, cached=cli.cached, kinds=kinds)
    device = device_name(work)
    print(f"\n{cli.teacher} teacher → {cli.decoder_layers}-decoder-layer student, batch {cli.batch_size}, {device}")
    print_ratios(result["ratios"])
    if cli.json:
        with open(cli.json, "w") as handle:
            json.dump({"config": asdict(cli), "workload": asdict(work), "device": device, **result}, handle, indent=2)


if __name__ == "__main__":
    main()
