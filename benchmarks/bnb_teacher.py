"""A teacher loaded in 8 or 4 bits by bitsandbytes (``teacher_load_in``): its memory, and what it changes in the
distillation targets.

    OMP_NUM_THREADS=1 python benchmarks/bnb_teacher.py --per_language 8

whisper-base (the offline pack) in fp32, LLM.int8 (``8bit``) and NF4 (``4bit``, fp32 compute); on the first
``--per_language`` LJSpeech and AISHELL rows of ``dev.jsonl``, teacher-forced on their reference transcripts (the
labels training would use): KL(fp32 teacher ‖ quantized teacher) in nats per label token of the distributions the KD
term distils, at temperature 1 and 2, top-1 agreement, and the forward time of the batch. Memory is
``get_memory_footprint()`` (parameters and buffers).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from method_checks import DEFAULT_MANIFEST, batch, load_rows
from transformers import HfArgumentParser
from transformers.models.whisper.modeling_whisper import shift_tokens_right

from hf_whisper_kdq.data import whisper_label_text
from hf_whisper_kdq.sources import load_whisper


@dataclass
class BnbTeacherArguments:
    """What to measure (``HfArgumentParser``)."""

    teacher: str = field(default="openai/whisper-base", metadata={"help": "any sources.load_whisper source"})
    manifest: str = field(default=str(DEFAULT_MANIFEST), metadata={"help": "dev.jsonl of the shared data"})
    per_language: int = field(default=8, metadata={"help": "dev utterances per language (en, zh)"})
    threads: int = field(default=1, metadata={"help": "torch CPU threads"})


@torch.no_grad()
def logits_at_labels(model, inputs) -> torch.Tensor:
    labels = inputs["labels"]
    decoder_input_ids = shift_tokens_right(labels, model.config.pad_token_id, model.config.decoder_start_token_id)
    logits = model(input_features=inputs["input_features"], decoder_input_ids=decoder_input_ids).logits
    return logits[labels.ne(-100)].float()


def compare(reference: torch.Tensor, quantized: torch.Tensor) -> dict:
    result = {"top1_agreement": float((reference.argmax(-1) == quantized.argmax(-1)).float().mean())}
    for temperature in (1.0, 2.0):
        target = F.log_softmax(reference / temperature, -1)
        ours = F.log_softmax(quantized / temperature, -1)
        kl = F.kl_div(ours, target, log_target=True, reduction="sum") / len(reference)
        result[f"kl_per_token_T{temperature:g}"] = float(kl)
    return result


def main(argv=None) -> None:
    (options,) = HfArgumentParser(BnbTeacherArguments).parse_args_into_dataclasses(args=argv)
    torch.set_num_threads(options.threads)
    rows = load_rows(Path(options.manifest), options.per_language)
    report = {"teacher": options.teacher, "rows": len(rows), "threads": options.threads, "models": {}}
    reference = None
    for load_in in (None, "8bit", "4bit"):
        model, processor = load_whisper(options.teacher, load_in=load_in)
        by_language = {}
        started = time.perf_counter()
        for language in ("en", "zh"):
            chosen = [row for row in rows if row["language"] == language]
            by_language[language] = logits_at_labels(
                model, batch(processor, chosen, [whisper_label_text(r["text"], language) for r in chosen])
            )
        name = load_in or "fp32"
        entry = {"memory_bytes": model.get_memory_footprint(), "forward_seconds": time.perf_counter() - started}
        if reference is None:
            reference = by_language
        else:
            entry.update({language: compare(reference[language], by_language[language]) for language in by_language})
        report["models"][name] = entry
        del model
    print(json.dumps(report, indent=2))
    print("\n| teacher | memory | forward (s) | KL T=1 en / zh | KL T=2 en / zh | top-1 en / zh |")
    print("|---|---:|---:|---|---|---|")
    for name, entry in report["models"].items():
        cells = ["–", "–", "–"]
        if "en" in entry:
            en, zh = entry["en"], entry["zh"]
            cells = [
                f"{en['kl_per_token_T1']:.4f} / {zh['kl_per_token_T1']:.4f}",
                f"{en['kl_per_token_T2']:.4f} / {zh['kl_per_token_T2']:.4f}",
                f"{100 * en['top1_agreement']:.1f}% / {100 * zh['top1_agreement']:.1f}%",
            ]
        print(
            f"| {name} | {entry['memory_bytes'] / 1e6:.1f} MB | {entry['forward_seconds']:.1f} | {' | '.join(cells)} |"
        )


if __name__ == "__main__":
    main()
