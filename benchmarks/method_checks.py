"""Teacher-forced checks of the quantizer grid, the loss balance, clip initialisation and label spacing on real
whisper-base (issue 15, findings 3-6). CPU only; reads the dev manifest at run time and prints numbers.

    PYTHONPATH=$PWD python benchmarks/method_checks.py grid    # restricted vs full signed grid, decoder at int2/3/4/8
    PYTHONPATH=$PWD python benchmarks/method_checks.py loss    # each loss term at step 0 (int3 student, 2-layer one)
    PYTHONPATH=$PWD python benchmarks/method_checks.py clip    # output error of a decoder fc1 vs its clip ratio
    PYTHONPATH=$PWD python benchmarks/method_checks.py labels  # teacher CE at position 0, with/without leading space

``--rows N`` sets the utterances per language (default 8), ``--manifest`` the dev manifest
(default ../shared/data/speech/dev.jsonl); for ``loss``, ``--scales`` the hidden-loss scales (default both) and
``--decoder_layers`` the students (default 6,2: the teacher's architecture and a spaced 2-layer copy).
"""

from __future__ import annotations

import copy
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import HfArgumentParser
from transformers.models.whisper.modeling_whisper import shift_tokens_right

from hf_whisper_kdq.audio import load_audio
from hf_whisper_kdq.data import whisper_label_text
from hf_whisper_kdq.quant import QuantSpec, default_quant_targets, fake_quantize
from hf_whisper_kdq.sources import load_whisper

DEFAULT_MANIFEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "speech" / "dev.jsonl"


def load_rows(manifest: Path, per_language: int) -> list[dict]:
    rows = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    chosen = []
    for language in ("en", "zh"):
        chosen += [row for row in rows if row["language"] == language][:per_language]
    for row in chosen:
        row["samples"] = load_audio(manifest.parent / row["audio"], row_id=row["id"])
    return chosen


def batch(processor, rows: list[dict], texts: list[str]) -> dict[str, torch.Tensor]:
    """Features and labels ``<|sot|><|lang|><|transcribe|><|notimestamps|> text <|eot|>`` padded with -100."""
    tokenizer = processor.tokenizer
    features = processor.feature_extractor(
        [row["samples"] for row in rows], sampling_rate=16000, return_tensors="pt"
    ).input_features
    labels = []
    for row, text in zip(rows, texts):
        prefix = tokenizer.convert_tokens_to_ids(
            ["<|startoftranscript|>", f"<|{row['language']}|>", "<|transcribe|>", "<|notimestamps|>"]
        )
        labels.append(prefix + tokenizer(text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id])
    width = max(map(len, labels))
    padded = torch.full((len(labels), width), -100)
    for i, row_labels in enumerate(labels):
        padded[i, : len(row_labels)] = torch.tensor(row_labels)
    # The collator strips <|startoftranscript|>; the model re-inserts it when shifting the labels right.
    return {"input_features": features, "labels": padded[:, 1:]}


@torch.no_grad()
def kl_top1(teacher, student, inputs, encoder_states) -> tuple[float, float]:
    """KL(teacher ‖ student) in nats per label token and top-1 agreement, teacher-forced."""
    labels = inputs["labels"]
    config = teacher.config
    decoder_input_ids = shift_tokens_right(labels, config.pad_token_id, config.decoder_start_token_id)
    mask = labels.ne(-100)
    t = teacher(encoder_outputs=(encoder_states,), decoder_input_ids=decoder_input_ids).logits[mask]
    s = student(encoder_outputs=(encoder_states,), decoder_input_ids=decoder_input_ids).logits[mask]
    kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="sum") / mask.sum()
    return float(kl), float((s.argmax(-1) == t.argmax(-1)).float().mean())


def restricted_fake_quantize(weight: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """The previous grid: codes in [-(2**(b-1) - 1), 2**(b-1) - 1], scale max|w| / (2**(b-1) - 1)."""
    rows, cols = weight.shape
    grouped = weight.reshape(rows, cols // group_size, group_size)
    qmax = 2 ** (bits - 1) - 1
    scale = (grouped.abs().amax(-1, keepdim=True) / qmax).clamp_min(1e-12)
    return (torch.round(torch.clamp(grouped / scale, -qmax, qmax)) * scale).reshape(rows, cols)


def check_grid(teacher, processor, rows) -> None:
    inputs = batch(processor, rows, [whisper_label_text(row["text"], row["language"]) for row in rows])
    encoder_states = teacher.get_encoder()(inputs["input_features"]).last_hidden_state
    names = default_quant_targets(teacher, encoder=False)
    modules = dict(teacher.named_modules())
    print("grid        bits  weight rel. err  KL (nats/token)  top-1")
    for bits in (2, 3, 4, 8):
        spec = QuantSpec(bits, "per_group", 32)
        for grid in ("restricted", "full"):
            student = copy.deepcopy(teacher)
            errors = []
            for name in names:
                weight = modules[name].weight.detach()
                if grid == "full":
                    quantized = fake_quantize(weight, spec)
                else:
                    quantized = restricted_fake_quantize(weight, bits, 32)
                errors.append(float((quantized - weight).pow(2).sum() / weight.pow(2).sum()))
                student.get_submodule(name).weight.data.copy_(quantized)
            kl, top1 = kl_top1(teacher, student, inputs, encoder_states)
            print(f"{grid:<11} {bits:>4}  {sum(errors) / len(errors):15.4f}  {kl:15.3f}  {top1:5.1%}")


def check_loss(teacher, processor, rows, scales: tuple[str, ...], decoder_layers: tuple[int, ...]) -> None:
    """Each loss term at step 0 (weights 1), the last two decoder layers distilled: the guided choice's usual pick,
    the final layer included."""
    from hf_whisper_kdq import DistillQuantArguments, DistillQuantTrainer
    from hf_whisper_kdq.students import build_student

    inputs = batch(processor, rows, [whisper_label_text(row["text"], row["language"]) for row in rows])
    for layers in decoder_layers:
        label = f"{layers} decoder layers, int3"
        student = teacher if layers == teacher.config.decoder_layers else build_student(teacher, decoder_layers=layers)
        for scale in scales:
            training = DistillQuantArguments(
                output_dir="/tmp/method-checks",
                report_to="none",
                use_cpu=True,
                quant_bit_choices="3",
                quant_targets="decoder",
                hidden_loss_scale=scale,
                ce_weight=1.0,
                kd_weight=1.0,
                hidden_weight=1.0,
                cache_encoder_outputs=False,
                cache_teacher_outputs=False,
            )
            trainer = DistillQuantTrainer(model=copy.deepcopy(student), teacher_model=teacher, args=training)
            decoder_units = [unit for unit in trainer.plan.units if unit.side == "decoder"]
            for unit in decoder_units[-2:]:
                unit.distilled = True
            trainer.model.train()
            with torch.no_grad():
                trainer.compute_loss(trainer.model, dict(inputs))
            terms = {name: float(values[-1]) for name, values in trainer._logged_terms["train"].items()}
            shown = ", ".join(f"{name} {value:.3f}" for name, value in terms.items() if name != "quant")
            print(f"{label:<28} hidden_loss_scale={scale:<8} {shown}")


def check_clip(teacher, processor, rows) -> None:
    from hf_whisper_kdq.quant import search_clip_ratios

    inputs = batch(processor, rows, [whisper_label_text(row["text"], row["language"]) for row in rows])
    name = "model.decoder.layers.3.fc1"
    captured = []
    handle = teacher.get_submodule(name).register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    with torch.no_grad():
        teacher(input_features=inputs["input_features"], labels=inputs["labels"].clamp_min(0))
    handle.remove()
    x = captured[0][inputs["labels"].ne(-100)]  # the layer's inputs at the labelled positions
    weight = teacher.get_submodule(name).weight.detach()
    reference = x @ weight.T
    for bits in (3, 4):
        spec = QuantSpec(bits, "per_group", 32, learnable_clipping=True)
        ones = torch.ones(spec.scale_shape(weight.shape))
        searched = search_clip_ratios(weight, spec)

        def output_error(clip, spec=spec):
            out = x @ fake_quantize(weight, spec, clip).T
            return float((out - reference).pow(2).sum() / reference.pow(2).sum())

        print(
            f"{name} int{bits}-g32: output rel. err clip 1.0 {output_error(ones):.4f}, "
            f"searched {output_error(searched):.4f} (mean ratio {float(searched.mean()):.3f})"
        )
        for start_name, start in (("1.0", ones), ("searched", searched)):
            for lr in (1e-4, 1e-2):
                clip = start.clone().requires_grad_(True)
                optimizer = torch.optim.AdamW([clip], lr=lr, weight_decay=0.0)
                for _ in range(200):  # the clip alone, on the layer's output error
                    optimizer.zero_grad()
                    out = x @ fake_quantize(weight, spec, clip).T
                    ((out - reference).pow(2).sum() / reference.pow(2).sum()).backward()
                    optimizer.step()
                print(
                    f"    from {start_name:<8} 200 AdamW steps at lr {lr:g}: output rel. err "
                    f"{output_error(clip.detach()):.4f} (mean ratio {float(clip.detach().clamp(0.01, 1).mean()):.3f})"
                )


def check_labels(teacher, processor, rows) -> None:
    tokenizer = processor.tokenizer
    with torch.no_grad():
        features = processor.feature_extractor(
            [row["samples"] for row in rows], sampling_rate=16000, return_tensors="pt"
        ).input_features
        transcripts = []
        for row, row_features in zip(rows, features):
            ids = teacher.generate(row_features[None], language=row["language"], task="transcribe")[0]
            transcripts.append(tokenizer.decode(ids, skip_special_tokens=True))
    spaced = sum(text.startswith(" ") for text in transcripts)
    print(f"teacher greedy transcripts starting with a space: {spaced}/{len(transcripts)}")
    for label, texts in (
        ("stripped (old)", [text.strip() for text in transcripts]),
        ("always spaced", [" " + text.strip() for text in transcripts]),
        (
            "whisper_label_text (new)",
            [whisper_label_text(text, row["language"]) for text, row in zip(transcripts, rows)],
        ),
    ):
        inputs = batch(processor, rows, texts)
        labels = inputs["labels"]
        decoder_input_ids = shift_tokens_right(labels, 50257, teacher.config.decoder_start_token_id)
        with torch.no_grad():
            logits = teacher(input_features=inputs["input_features"], decoder_input_ids=decoder_input_ids).logits
        first = 3  # after <|lang|><|transcribe|><|notimestamps|>
        ce = F.cross_entropy(logits[:, first], labels[:, first], reduction="none")
        for language in ("en", "zh"):
            chosen = torch.tensor([row["language"] == language for row in rows])
            print(f"{label:<26} {language}: mean CE of the first text token {float(ce[chosen].mean()):.3f} nats")


CHECKS = ("grid", "loss", "clip", "labels")


@dataclass
class CheckArguments:
    """Which check to run (``HfArgumentParser``; a leading bare word is ``--check``)."""

    check: str = field(metadata={"help": "the check to run", "choices": CHECKS})
    rows: int = field(default=8, metadata={"help": "utterances per language"})
    manifest: str = field(default=str(DEFAULT_MANIFEST), metadata={"help": "the dev manifest"})
    scales: str = field(default="absolute,relative", metadata={"help": "loss: the hidden_loss_scale values to show"})
    decoder_layers: str = field(
        default="6,2", metadata={"help": "loss: the students' decoder layers (6: the teacher's)"}
    )


def parse_args(argv=None) -> CheckArguments:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-"):
        argv = ["--check", *argv]  # the check comes first, without its flag, as in the examples above
    (args,) = HfArgumentParser(CheckArguments, description=__doc__).parse_args_into_dataclasses(args=argv)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.manual_seed(0)
    teacher, processor = load_whisper("openai/whisper-base")
    rows = load_rows(Path(args.manifest), args.rows)
    if args.check == "grid":
        check_grid(teacher, processor, rows)
    elif args.check == "loss":
        check_loss(
            teacher,
            processor,
            rows,
            tuple(args.scales.split(",")),
            tuple(int(n) for n in args.decoder_layers.split(",")),
        )
    elif args.check == "clip":
        check_clip(teacher, processor, rows)
    else:
        check_labels(teacher, processor, rows)


if __name__ == "__main__":
    main()
