"""Sizes of the frozen-output caches for the shared training mixture, and what their compact forms change.

    OMP_NUM_THREADS=1 python benchmarks/teacher_cache_size.py --rows 8

On real whisper-base (offline, through hf_whisper_kdq.sources) and real utterances of the shared data:

1. **Sizes.** Entries of the teacher cache (exact, and with ``teacher_cache_top_k``) and of the encoder cache are
   written for ``--rows`` utterances into a temporary folder; their bytes per position / per row, and the size
   projected for the whole mixture (``--manifests``: token counts of every transcript, with Whisper's tokenizer and
   the label prefix training uses), against the former layout (fp32 logits per position) and the default bound.
2. **Top-k.** On those rows, two students: a 2-decoder-layer one (``build_student``, as compress trains it, far
   from the teacher at the start) and the teacher with its decoder's linears at int4 (groups of 32, close to it):
   the KD loss at ``--temperature`` from the exact logits and from the top-k form for each of ``--top_k``, and the
   cosine between their gradients with respect to the student's decoder parameters; and the time of the teacher's
   output layer on the rows' positions, which the top-k form skips.
3. **Encoder outputs in fp16** (how the encoder cache stores them), bf16 and int8 (per frame): the teacher's KL
   against its exact outputs, and the student's CE and KD change.

Audio is decoded with soundfile (hf_whisper_kdq.audio), never torchcodec. Prints one report; ``--json`` also
writes the numbers.
"""

from __future__ import annotations

import copy
import json
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import HfArgumentParser

from hf_whisper_kdq import output_cache
from hf_whisper_kdq.audio import load_audio
from hf_whisper_kdq.data import language_code, whisper_label_text
from hf_whisper_kdq.losses import logit_distillation_loss, top_k_distillation_loss
from hf_whisper_kdq.output_cache import EncoderOutputCache, TeacherOutputCache, output_logits
from hf_whisper_kdq.quant import prepare_qat
from hf_whisper_kdq.sources import load_whisper
from hf_whisper_kdq.students import build_student

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "speech"
MANIFESTS = ",".join(str(DATA / name) for name in ("train_en.jsonl", "train_zh.jsonl", "synth_zh.jsonl"))
BOUND_GB = 8.0  # encoder_cache_max_gb's default


def read_manifests(paths: str) -> list[dict]:
    rows = []
    for path in paths.split(","):
        with open(path, encoding="utf-8") as handle:
            rows += [dict(json.loads(line), folder=str(Path(path).parent)) for line in handle if line.strip()]
    return rows


def label_ids(tokenizer, row: dict) -> list[int]:
    """The row's labels as training builds them: ``<|sot|><|lang|><|transcribe|><|notimestamps|> text <|eot|>``."""
    tokenizer.set_prefix_tokens(language=language_code(row["language"]), task="transcribe", predict_timestamps=False)
    return tokenizer(whisper_label_text(row["text"], row["language"])).input_ids


def batch_of(rows: list[dict], processor) -> dict[str, torch.Tensor]:
    """Features, decoder inputs and labels of ``rows`` (labels without the start token, as the collator gives)."""
    audio = [load_audio(str(Path(row["folder"]) / row["audio"])) for row in rows]
    features = processor.feature_extractor(audio, sampling_rate=16_000, return_tensors="pt").input_features
    ids = [label_ids(processor.tokenizer, row) for row in rows]
    width = max(map(len, ids))
    padded = torch.full((len(rows), width), -100)
    for i, row_ids in enumerate(ids):
        padded[i, : len(row_ids)] = torch.tensor(row_ids)
    decoder_input_ids = padded[:, :-1].masked_fill(padded[:, :-1].eq(-100), processor.tokenizer.pad_token_id)
    return {"input_features": features, "decoder_input_ids": decoder_input_ids, "labels": padded[:, 1:]}


def entry_bytes(cache) -> list[int]:
    return [path.stat().st_size for path in sorted(cache.folder.glob("*/*.safetensors"))]


def sizes(teacher, batch, encoder_hidden, positions_all: list[int], top_ks: list[int], temperature: float) -> dict:
    """Bytes per position (entry size over the entry's positions, by a least-squares line through the entries) and
    the projected sizes for the mixture."""
    labels = batch["labels"]
    positions = labels.ne(-100).sum(1).tolist()
    report = {"rows": len(positions_all), "positions": sum(positions_all)}
    with tempfile.TemporaryDirectory() as folder:
        for k in [0, *top_ks]:
            cache = TeacherOutputCache(
                Path(folder) / f"top{k}", teacher, max_bytes=10**12, top_k=k, temperature=temperature
            )
            cache.forward(
                teacher, batch["input_features"], lambda rows: encoder_hidden[rows], batch["decoder_input_ids"], labels
            )
            # Each entry is one file: n positions × a fixed size, plus its header and fingerprint.
            files = entry_bytes(cache)
            per_position = (max(files) - min(files)) / (max(positions) - min(positions))
            overhead = statistics.mean(f - per_position * n for f, n in zip(files, positions))
            projected = per_position * sum(positions_all) + overhead * len(positions_all)
            report[f"teacher_top{k}"] = {
                "bytes_per_position": per_position,
                "bytes_per_entry_overhead": overhead,
                "mean_bytes_per_row": projected / len(positions_all),
                "projected_gb": projected / 1e9,
            }
        for precision in ("fp16", "int8"):
            encoder = EncoderOutputCache(
                Path(folder) / f"encoder-{precision}", teacher.get_encoder(), max_bytes=10**12, precision=precision
            )
            encoder.encode(teacher.get_encoder(), batch["input_features"][:1])
            (row_bytes,) = entry_bytes(encoder)
            report[f"encoder_{precision}"] = {
                "bytes_per_row": row_bytes,
                "projected_gb": row_bytes * len(positions_all) / 1e9,
            }
    frames, width = encoder_hidden.shape[1:]
    report["encoder_fp32_projected_gb"] = frames * width * 4 * len(positions_all) / 1e9
    vocabulary, layers = teacher.config.vocab_size, teacher.config.decoder_layers + 1
    report["former_layout_projected_gb"] = (vocabulary + layers * width) * 4 * sum(positions_all) / 1e9
    return report


def student_losses(student, encoder_hidden, batch, teacher_logits, temperature):
    labels = batch["labels"]
    mask = labels.ne(-100)
    logits = student(encoder_outputs=(encoder_hidden,), decoder_input_ids=batch["decoder_input_ids"]).logits[mask]
    ce = F.cross_entropy(logits.float(), labels[mask])
    kd = logit_distillation_loss(logits, teacher_logits, labels[mask], temperature=temperature)
    return logits, ce, kd


def gradient(student, loss) -> torch.Tensor:
    parameters = [p for p in student.parameters() if p.requires_grad]
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, parameters, retain_graph=True)])


def top_k_comparison(teacher, student, batch, encoder_hidden, top_ks, temperature) -> dict:
    mask = batch["labels"].ne(-100)
    with torch.no_grad():
        states = teacher.model.decoder(
            input_ids=batch["decoder_input_ids"], encoder_hidden_states=encoder_hidden
        ).last_hidden_state
        teacher_logits = teacher.proj_out(states)[mask]
        start = time.perf_counter()
        head_runs = 3
        for _ in range(head_runs):  # what the exact form recomputes every step (from the pre-norm state)
            output_logits(teacher, states[mask])
        head_seconds = (time.perf_counter() - start) / head_runs
    logits, _, exact = student_losses(student, encoder_hidden, batch, teacher_logits, temperature)
    exact_grad = gradient(student, exact)
    labels = batch["labels"][mask]
    report = {"temperature": temperature, "positions": int(mask.sum()), "exact_kd": float(exact.detach())}
    report["teacher_output_layer_seconds"] = head_seconds
    for k in top_ks:
        top = teacher_logits.topk(k, dim=-1)
        normaliser = torch.logsumexp(teacher_logits / temperature, dim=-1)
        loss = top_k_distillation_loss(logits, top.values, top.indices, normaliser, labels, temperature=temperature)
        cosine = F.cosine_similarity(
            gradient(student, loss).double(), exact_grad.double(), dim=0
        )  # fp32 sums drift above 1
        tail = 1 - torch.softmax(teacher_logits / temperature, -1).gather(-1, top.indices).sum(-1)
        report[f"top{k}"] = {
            "kd": float(loss.detach()),
            "kd_change": float(loss / exact - 1),
            "gradient_cosine": float(cosine),
            "teacher_mass_outside_top_k": float(tail.mean()),
        }
    return report


def encoder_precision(teacher, student, batch, encoder_hidden, temperature) -> dict:
    def int8_per_frame(x):  # as the encoder cache stores int8 entries
        codes, scale = output_cache.int8_per_frame(x)
        return codes.float() * scale

    mask = batch["labels"].ne(-100)

    def teacher_logits(hidden):
        return teacher(encoder_outputs=(hidden,), decoder_input_ids=batch["decoder_input_ids"]).logits[mask]

    with torch.no_grad():
        reference = teacher_logits(encoder_hidden)
        _, ce, kd = student_losses(student, encoder_hidden, batch, reference, temperature)
        report = {"student_ce": float(ce), "student_kd": float(kd)}
        for name, rounded in (
            ("fp16", encoder_hidden.half().float()),
            ("bf16", encoder_hidden.bfloat16().float()),
            ("int8_per_frame", int8_per_frame(encoder_hidden)),
        ):
            logits = teacher_logits(rounded)
            teacher_kl = F.kl_div(
                F.log_softmax(logits, -1), F.log_softmax(reference, -1), log_target=True, reduction="batchmean"
            )
            _, ce_r, kd_r = student_losses(student, rounded, batch, logits, temperature)
            report[name] = {
                "relative_error": float((rounded - encoder_hidden).norm() / encoder_hidden.norm()),
                "teacher_kl_per_token": float(teacher_kl),
                "student_ce_change": float(ce_r / ce - 1),
                "student_kd_change": float(kd_r / kd - 1),
            }
    return report


@dataclass
class SizeArguments:
    """What to measure (``HfArgumentParser``)."""

    manifests: str = field(default=MANIFESTS, metadata={"help": "comma-separated manifests of the training mixture"})
    rows: int = field(default=8, metadata={"help": "utterances run through the models (half en, half zh)"})
    top_k: str = field(default="16,64,256", metadata={"help": "comma-separated k of the top-k form"})
    temperature: float = field(default=2.0, metadata={"help": "KD temperature (compress: 2)"})
    json: str | None = field(default=None, metadata={"help": "also write the numbers here"})


def main(argv: list[str] | None = None) -> None:
    (options,) = HfArgumentParser(SizeArguments, description=__doc__).parse_args_into_dataclasses(args=argv)
    top_ks = [int(k) for k in options.top_k.split(",")]
    torch.manual_seed(0)

    teacher, processor = load_whisper("openai/whisper-base")
    rows = read_manifests(options.manifests)
    positions_all = [len(label_ids(processor.tokenizer, row)) - 1 for row in rows]
    english = [row for row in rows if row["language"] == "en"]
    chinese = [row for row in rows if row["language"] != "en"]
    step = max(1, len(chinese) // (options.rows - options.rows // 2))  # real and synthetic Mandarin alike
    sample = english[: options.rows // 2] + chinese[::step][: options.rows - options.rows // 2]
    batch = batch_of(sample, processor)
    with torch.no_grad():
        encoder_hidden = teacher.get_encoder()(batch["input_features"]).last_hidden_state
    student = build_student(teacher, decoder_layers=2).train()
    quantized = copy.deepcopy(teacher).train()
    layers = quantized.model.decoder.layers
    prepare_qat(
        quantized,
        {f"model.decoder.layers.{n}": "int4-g32" for n, m in layers.named_modules() if isinstance(m, torch.nn.Linear)},
    )
    for model in (student, quantized):
        model.model.encoder.requires_grad_(False)  # compress's recipe: the decoder trains

    report = {
        "sizes": sizes(teacher, batch, encoder_hidden, positions_all, top_ks, options.temperature),
        "top_k": {
            name: top_k_comparison(teacher, model, batch, encoder_hidden, top_ks, options.temperature)
            for name, model in (("student_2_decoder_layers", student), ("teacher_decoder_int4", quantized))
        },
        "encoder_precision": encoder_precision(teacher, student.eval(), batch, encoder_hidden, options.temperature),
    }
    report["sizes"]["mean_positions_per_row"] = statistics.mean(positions_all)
    print(json.dumps(report, indent=2))
    if options.json:
        Path(options.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
