"""Evaluate Whisper models: batched decoding, evaluation reports and the ``evaluate`` command. CTranslate2 folders
decoded by faster-whisper are evaluated into the same report by :mod:`hf_whisper_kdq.evaluation_ctranslate2`.

Scores are computed by :mod:`hf_whisper_kdq.scoring` (text normalization, WER/CER), whose public names are
re-exported here.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import soundfile
import torch
from tqdm.auto import tqdm

from . import data
from .audio import SAMPLING_RATE, as_audio_array, load_audio
from .files import atomic_write_text
from .scoring import error_rate, language_code, score
from .sources import load_whisper
from .synthesis import default_prompts, synthesize_dataset

logger = logging.getLogger(__name__)

# Whisper's encoder sees 30 s windows; longer audio needs long-form (sequential, timestamped) decoding.
CHUNK_SECONDS = 30.0
# Weight files counted as the model's size on disk (CTranslate2 folders keep theirs in model.bin[.partN]).
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.bin.part*")
_NOT_WEIGHTS = ("training_args", "optimizer", "scheduler", "rng_state")
# Temperature fallback, the guard openai-whisper's transcribe(), faster-whisper and whisper.cpp decode with by default:
# an utterance whose greedy transcript compresses too well (a loop) or is too unlikely is decoded again by sampling at
# the next temperature. openai-whisper's values (temperatures 0, 0.2, ..., 1.0; mean log-probability -1.0), except the
# compression ratio, which transformers measures on token bytes rather than text, where its docs recommend 1.35.
TEMPERATURE_FALLBACK = {
    "temperature": (0.0, 0.2, 0.4, 0.6, 0.8, 1.0),
    "compression_ratio_threshold": 1.35,
    "logprob_threshold": -1.0,
}
# Sampling draws from torch's global generator: seeded per batch, so a fallback transcript does not depend on what
# ran before it, and the caller's generator is left as it was.
FALLBACK_SEED = 0


# --- Batched decoding ----------------------------------------------------------------------------------
def _duration(audio: Any) -> float:
    """Seconds of audio; files are measured from their header, not decoded."""
    if isinstance(audio, (np.ndarray, torch.Tensor)):
        return len(audio) / SAMPLING_RATE
    if isinstance(audio, dict) and audio.get("array") is not None:
        return len(audio["array"]) / (audio.get("sampling_rate") or SAMPLING_RATE)
    source = audio.get("bytes") or audio.get("path") if isinstance(audio, dict) else audio
    try:
        return float(soundfile.info(io.BytesIO(source) if isinstance(source, bytes) else os.fspath(source)).duration)
    except Exception:  # a format soundfile cannot probe (or a bad file, which load_audio reports properly)
        return len(as_audio_array(audio)) / SAMPLING_RATE


def audio_values(dataset, column: str = "audio") -> list[Any]:
    """A dataset's audio column as path/bytes dicts, never decoded by `datasets` (see ``data``'s docstring)."""
    feature = dataset.features[column]
    if getattr(feature, "decode", False):
        dataset = dataset.cast_column(column, type(feature)(sampling_rate=feature.sampling_rate, decode=False))
    return list(dataset[column])


def language_codes(languages: str | Sequence[str | None] | None, n: int) -> list[str | None]:
    """One Whisper language code (or None: detect) per audio, from the ``languages`` a transcriber takes: one
    language for all, one per audio, or None."""
    per_item = [languages] * n if languages is None or isinstance(languages, str) else list(languages)
    if len(per_item) != n:
        raise ValueError(f"{len(per_item)} languages for {n} audios: pass one per audio, or a single string")
    return [None if lang is None else language_code(lang) for lang in per_item]


def _language_plan(model, languages, n: int, task: str) -> list[str | None]:
    """One Whisper language code (or None: detect / English-only) per item, checked against the model."""
    codes = language_codes(languages, n)
    generation_config = model.generation_config
    if not getattr(generation_config, "is_multilingual", True):
        if others := sorted({code for code in codes if code not in (None, "en")}):
            raise ValueError(
                f"this model is English-only and cannot transcribe language(s) {others}: use a multi"
                "lingual checkpoint (e.g. openai/whisper-base, not whisper-base.en) or drop those rows"
            )
        if task != "transcribe":
            raise ValueError(f"English-only models only transcribe; task={task!r} needs a multilingual checkpoint")
        return [None] * n
    lang_to_id = getattr(generation_config, "lang_to_id", None) or {}
    if lang_to_id and (unknown := sorted({c for c in codes if c is not None and f"<|{c}|>" not in lang_to_id})):
        raise ValueError(f"the model's generation_config.lang_to_id has no token for language(s) {unknown}")
    return codes


def transcribe(
    model,
    processor,
    audios: Sequence[Any],
    *,
    languages: str | Sequence[str | None] | None = None,
    task: str = "transcribe",
    batch_size: int = 8,
    num_beams: int = 1,
    max_new_tokens: int | None = None,
    temperature_fallback: bool = False,
    progress: bool = True,
) -> list[str]:
    """Transcribe ``audios`` (16 kHz arrays, file paths or datasets audio dicts) in batches, in input order; or
    log-mel features extracted beforehand (``[n_mels, frames]`` tensors, e.g. stored in fp16), decoded as they are.

    Batches hold one language (multilingual models get ``language`` and ``task``; ``None`` is detected; English-only
    models get neither and refuse other languages), longest first. Audio over 30 s is decoded long-form. Runs on
    the model's device and dtype under ``torch.inference_mode``; greedy for ``num_beams=1``, else beam search.
    ``temperature_fallback``: utterances whose transcript loops or is unlikely are decoded again by sampling at
    rising temperatures (``TEMPERATURE_FALLBACK``, transformers' own fallback, seeded per batch)."""
    if task not in ("transcribe", "translate") or batch_size < 1 or num_beams < 1:
        raise ValueError(
            f"need task 'transcribe' or 'translate' and batch_size, num_beams >= 1; got {task!r}, "
            f"{batch_size}, {num_beams}"
        )
    n = len(audios)
    codes = _language_plan(model, languages, n, task)
    multilingual = getattr(model.generation_config, "is_multilingual", True)
    # Drives the batching order; files are read per batch. Extracted features all span one window.
    lengths = [0.0 if _is_features(audio) else _duration(audio) for audio in audios]
    groups: dict[str | None, list[int]] = defaultdict(list)
    for i, code in enumerate(codes):
        groups[code].append(i)  # one language per batch: generate takes a single language and task
    parameter = next(model.parameters())
    device, dtype = parameter.device, parameter.dtype if parameter.is_floating_point() else torch.float32
    results: list[str | None] = [None] * n
    with tqdm(total=n, desc="transcribe", unit="utt", disable=not progress) as bar, torch.inference_mode():
        for code, indices in groups.items():
            indices = sorted(indices, key=lambda i: -lengths[i])
            for start in range(0, len(indices), batch_size):
                batch = indices[start : start + batch_size]
                texts = _generate(
                    model,
                    processor,
                    [audios[i] if _is_features(audios[i]) else as_audio_array(audios[i]) for i in batch],
                    device=device,
                    dtype=dtype,
                    language=code if multilingual else None,
                    task=task if multilingual else None,
                    num_beams=num_beams,
                    max_new_tokens=max_new_tokens,
                    temperature_fallback=temperature_fallback,
                )
                for i, text in zip(batch, texts):
                    results[i] = text
                bar.update(len(batch))
    return [text or "" for text in results]


def _is_features(item: Any) -> bool:
    return isinstance(item, torch.Tensor) and item.ndim == 2


def _generate(
    model, processor, arrays, *, device, dtype, language, task, num_beams, max_new_tokens, temperature_fallback
) -> list[str]:
    kwargs: dict[str, Any] = {"num_beams": num_beams}
    kwargs.update(TEMPERATURE_FALLBACK if temperature_fallback else {"do_sample": False})
    long_form = False
    if all(_is_features(item) for item in arrays):
        kwargs["input_features"] = torch.stack(arrays).to(device=device, dtype=dtype)
    else:
        long_form = max(len(a) for a in arrays) > CHUNK_SECONDS * SAMPLING_RATE
        extra = {"truncation": False, "padding": "longest"} if long_form else {}
        features = processor.feature_extractor(
            arrays, sampling_rate=SAMPLING_RATE, return_tensors="pt", return_attention_mask=True, **extra
        )
        kwargs["input_features"] = features.input_features.to(device=device, dtype=dtype)
        kwargs["attention_mask"] = features.attention_mask.to(device)
    optional = {"language": language, "task": task, "max_new_tokens": max_new_tokens}
    kwargs.update({key: value for key, value in optional.items() if value is not None})
    if long_form:
        kwargs.update(return_timestamps=True, condition_on_prev_tokens=False)
    with torch.random.fork_rng(devices=[device] if torch.device(device).type == "cuda" else []):
        torch.manual_seed(FALLBACK_SEED)
        output = model.generate(**kwargs)
    sequences = output if torch.is_tensor(output) else output["sequences"]
    return [text.strip() for text in processor.batch_decode(sequences, skip_special_tokens=True)]


# --- Evaluation reports ---------------------------------------------------------------------------------
def in_memory_bytes(model: torch.nn.Module) -> int:
    """Bytes held by the model's parameters and buffers, each storage counted once."""
    seen: dict[tuple, int] = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        seen[(tensor.device, tensor.data_ptr())] = tensor.numel() * tensor.element_size()
    return sum(seen.values())


def weight_files(folder: str | os.PathLike) -> list[Path]:
    """Weight files of a model folder (``*.safetensors``, ``*.bin``, ``model.bin.partN``), not Trainer state."""
    files = {path for pattern in WEIGHT_PATTERNS for path in Path(folder).glob(pattern) if path.is_file()}
    return sorted(path for path in files if not path.name.startswith(_NOT_WEIGHTS))


def model_size(model: torch.nn.Module, model_path: str | os.PathLike | None = None) -> tuple[int, str]:
    """``(bytes, source)``: the weight files when ``model_path`` is a folder holding some (``"disk"``), else
    the in-memory parameter and buffer bytes (``"memory"``)."""
    files = weight_files(model_path) if model_path is not None and Path(model_path).is_dir() else []
    if files:
        return sum(path.stat().st_size for path in files), "disk"
    return in_memory_bytes(model), "memory"


def _rtf(decode_seconds: float, audio_seconds: float) -> float | None:
    return decode_seconds / audio_seconds if audio_seconds > 0 else None


def _num(value: float | None, digits: int = 1, percent: bool = False) -> str:
    return "-" if value is None else f"{100 * value:.2f}%" if percent else f"{value:.{digits}f}"


@dataclass
class EvaluationReport:
    """Scores and costs of one model on one manifest. ``corpora``: per (corpus, language) ``error_rate`` (also
    as ``wer``/``cer``), jiwer counts, ``n_utterances``, ``audio_seconds``, ``decode_seconds``, ``rtf`` (decode /
    audio seconds). ``languages``: ``macro`` (mean over its corpora) and ``pooled`` error rates. ``model_size_source``
    tells whether ``model_size_bytes`` counts weight files (``"disk"``) or tensors (``"memory"``). ``utterances``
    (per-utterance records) go to JSON on request. Rows without a reference are skipped (``n_unlabeled_skipped``)."""

    model: str | None
    n_parameters: int
    model_size_bytes: int
    model_size_source: str
    batch_size: int
    num_beams: int
    device: str
    dtype: str
    temperature_fallback: bool = False
    corpora: list[dict[str, Any]] = field(default_factory=list)
    languages: dict[str, dict[str, Any]] = field(default_factory=dict)
    n_utterances: int = 0
    n_unlabeled_skipped: int = 0
    audio_seconds: float = 0.0
    decode_seconds: float = 0.0
    rtf: float | None = None
    utterances: list[dict[str, Any]] = field(default_factory=list)

    def summarize(self) -> None:
        """Fill the per-language entries (macro over corpora, pooled) and the totals from ``corpora``."""
        for code in dict.fromkeys(entry["language"] for entry in self.corpora):
            entries = [entry for entry in self.corpora if entry["language"] == code]
            metric = entries[0]["metric"]
            size_key = "n_reference_chars" if metric == "cer" else "n_reference_words"
            audio_seconds, decode_seconds = (
                sum(e[key] for e in entries) for key in ("audio_seconds", "decode_seconds")
            )
            self.languages[code] = {
                "metric": metric,
                "macro": sum(e["error_rate"] for e in entries) / len(entries),
                "pooled": error_rate(sum(e["errors"] for e in entries), sum(e[size_key] for e in entries)),
                "n_corpora": len(entries),
                "n_utterances": sum(e["n_utterances"] for e in entries),
                "audio_seconds": audio_seconds,
                "decode_seconds": decode_seconds,
                "rtf": _rtf(decode_seconds, audio_seconds),
            }
        self.n_utterances = len(self.utterances)
        self.audio_seconds = sum(e["audio_seconds"] for e in self.corpora)
        self.decode_seconds = sum(e["decode_seconds"] for e in self.corpora)
        self.rtf = _rtf(self.decode_seconds, self.audio_seconds)

    def score_transcripts(self) -> EvaluationReport:
        """Score the transcripts in ``utterances`` per (corpus, language) of ``corpora``, then summarize: what
        `evaluate_model` does after decoding, or later and elsewhere for a report made with ``score=False``."""
        for position, entry in enumerate(self.corpora):
            rows = [u for u in self.utterances if (u["corpus"], u["language"]) == (entry["corpus"], entry["language"])]
            references, hypotheses = [u["reference"] for u in rows], [u["hypothesis"] for u in rows]
            result = score(references, hypotheses, entry["language"], per_utterance=True)
            for row, record in zip(rows, result.pop("utterances")):
                row.update(record)
            self.corpora[position] = {
                "corpus": entry["corpus"],
                "language": entry["language"],
                "error_rate": result[result["metric"]],
                **result,
                "audio_seconds": entry["audio_seconds"],
                "decode_seconds": entry["decode_seconds"],
                "rtf": entry["rtf"],
            }
        self.summarize()
        return self

    def to_dict(self, per_utterance: bool = True) -> dict[str, Any]:
        result = asdict(self)
        if not per_utterance:
            del result["utterances"]
        return result

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> EvaluationReport:
        return cls(**values)

    def save_json(self, path: str | os.PathLike, per_utterance: bool = False) -> Path:
        return atomic_write_text(path, json.dumps(self.to_dict(per_utterance), indent=2, ensure_ascii=False) + "\n")

    @classmethod
    def load_json(cls, path: str | os.PathLike) -> EvaluationReport:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))

    def summary_table(self) -> str:
        """Markdown: a row per corpus, then per language (macro over its corpora; pooled when several)."""
        lines = [
            "| corpus | language | metric | error rate | utterances | audio s | decode s | RTF |",
            "|---|---|---|---:|---:|---:|---:|---:|",
        ]
        rows = [(e["corpus"], e["language"], e["metric"], _num(e["error_rate"], percent=True), e) for e in self.corpora]
        for code, e in self.languages.items():
            pooled = f" (pooled {_num(e['pooled'], percent=True)})" if e["n_corpora"] > 1 else ""
            rows.append((f"**all {code}**", code, e["metric"], _num(e["macro"], percent=True) + pooled, e))
        for corpus, code, metric, rate, e in rows:
            lines.append(
                f"| {corpus} | {code} | {metric.upper()} | {rate} | {e['n_utterances']} | {_num(e['audio_seconds'])} "
                f"| {_num(e['decode_seconds'])} | {_num(e['rtf'], 3)} |"
            )
        where = "weight files on disk" if self.model_size_source == "disk" else "in-memory tensors"
        lines += [
            "",
            f"model: {self.model or '(in memory)'} | parameters: {self.n_parameters:,} | size: "
            f"{self.model_size_bytes / 2**20:.1f} MiB ({where}) | {self.device} {self.dtype}, batch size "
            f"{self.batch_size}, beams {self.num_beams} | total: {self.n_utterances} utterances, "
            f"{_num(self.audio_seconds)} s audio, {_num(self.decode_seconds)} s decoding, RTF {_num(self.rtf, 3)}",
        ]
        return "\n".join(lines)


def evaluate_model(
    model,
    processor,
    dataset,
    *,
    features: Sequence[torch.Tensor] | None = None,
    batch_size: int = 8,
    num_beams: int = 1,
    max_new_tokens: int | None = None,
    temperature_fallback: bool = False,
    model_path: str | os.PathLike | None = None,
    progress: bool = True,
    warmup: bool = True,
    score: bool = True,
) -> EvaluationReport:
    """Transcribe a manifest dataset (``id``, ``corpus``, ``language``, ``audio``, ``text``; see
    ``data.load_manifest``) and score it per corpus and per language. Each corpus's audio is read before its
    clock starts, so ``decode_seconds`` and the real-time factor cover feature extraction and generation;
    with ``warmup``, one utterance is decoded first, off the clock (first passes pick kernels, allocate).

    ``features``: the rows' log-mel features, extracted beforehand (``features[i]``, a ``[n_mels, frames]`` tensor,
    for row ``i``); the dataset then needs ``duration`` instead of ``audio``, and the clock covers generation only.
    ``score=False`` returns the transcripts unscored (no error rates), for `EvaluationReport.score_transcripts`
    to score later, e.g. where the scoring dependencies are installed."""
    rows = ManifestRows.of(dataset, features)
    parameter = next(model.parameters())
    size_bytes, size_source = model_size(model, model_path)
    report = EvaluationReport(
        model=None if model_path is None else str(model_path),
        n_parameters=sum(p.numel() for p in model.parameters()),
        model_size_bytes=size_bytes,
        model_size_source=size_source,
        batch_size=batch_size,
        num_beams=num_beams,
        device=str(parameter.device),
        dtype=str(parameter.dtype).removeprefix("torch."),
        temperature_fallback=temperature_fallback,
        n_unlabeled_skipped=rows.unlabeled,
    )

    def transcriber(arrays: list[np.ndarray], code: str, warmup: bool) -> list[str]:
        if warmup:
            return transcribe(model, processor, arrays, languages=code, max_new_tokens=8, progress=False)
        return transcribe(
            model,
            processor,
            arrays,
            languages=code,
            batch_size=batch_size,
            num_beams=num_beams,
            max_new_tokens=max_new_tokens,
            temperature_fallback=temperature_fallback,
            progress=progress,
        )

    rows.transcribe(report, transcriber, warmup=warmup)
    return report.score_transcripts() if score else report


@dataclass
class ManifestRows:
    """The labelled rows of a manifest dataset, grouped by (corpus, language): what every evaluator transcribes.
    ``features`` (optional): each row's log-mel features, extracted beforehand, decoded instead of its audio."""

    ids: list[str]
    references: list[str | None]
    audio: list[Any] | None
    groups: dict[tuple[str, str], list[int]]
    unlabeled: int
    features: Sequence[torch.Tensor] | None = None
    durations: list[float] | None = None

    @classmethod
    def of(cls, dataset, features: Sequence[torch.Tensor] | None = None) -> ManifestRows:
        columns = set(dataset.column_names)
        needed = {"text", "language", "duration" if features is not None else "audio"}
        if missing := needed - columns:
            raise ValueError(f"the dataset lacks column(s) {sorted(missing)}: load it with data.load_manifest")
        n = len(dataset)
        if features is not None and len(features) != n:
            raise ValueError(f"{len(features)} feature rows for {n} dataset rows: pass one per row")
        ids = list(dataset["id"]) if "id" in columns else [str(i) for i in range(n)]
        corpora = list(dataset["corpus"]) if "corpus" in columns else [None] * n
        references = list(dataset["text"])
        languages = [language_code(lang) for lang in dataset["language"]]
        groups: dict[tuple[str, str], list[int]] = defaultdict(list)
        for i in range(n):
            if references[i] is not None:
                groups[(corpora[i] or "default", languages[i])].append(i)
        if unlabeled := n - sum(map(len, groups.values())):
            logger.warning("%d of %d rows have no reference text and are not evaluated", unlabeled, n)
        if features is not None:
            return cls(ids, references, None, dict(groups), unlabeled, features, list(dataset["duration"]))
        return cls(ids, references, audio_values(dataset), dict(groups), unlabeled)

    def inputs(self, indices: list[int]) -> tuple[list[Any], float]:
        """What the transcriber decodes for these rows (audio arrays or features) and their seconds of audio."""
        if self.features is not None:
            return [self.features[i] for i in indices], sum(self.durations[i] for i in indices)
        arrays = [load_audio(self.audio[i], row_id=self.ids[i]) for i in indices]
        return arrays, sum(len(a) for a in arrays) / SAMPLING_RATE

    def transcribe(self, report: EvaluationReport, transcriber, *, warmup: bool) -> EvaluationReport:
        """Fill ``report`` per corpus with the transcripts of ``transcriber(inputs, language, warmup) -> texts`` and
        their timing (scores: `EvaluationReport.score_transcripts`).

        Each corpus's audio is read before its clock starts, so ``decode_seconds`` covers feature extraction and
        decoding only; with ``warmup``, one utterance is decoded first, off the clock."""
        if warmup and self.groups:
            (_, code), indices = next(iter(self.groups.items()))
            transcriber(self.inputs(indices[:1])[0], code, True)
        for (corpus, code), indices in self.groups.items():
            inputs, audio_seconds = self.inputs(indices)
            start = time.perf_counter()
            hypotheses = transcriber(inputs, code, False)
            decode_seconds = time.perf_counter() - start
            del inputs  # one corpus in memory at a time
            report.utterances += [
                {
                    "id": self.ids[i],
                    "corpus": corpus,
                    "language": code,
                    "reference": self.references[i],
                    "hypothesis": h,
                }
                for i, h in zip(indices, hypotheses)
            ]
            report.corpora.append(
                {
                    "corpus": corpus,
                    "language": code,
                    "audio_seconds": audio_seconds,
                    "decode_seconds": decode_seconds,
                    "rtf": _rtf(decode_seconds, audio_seconds),
                }
            )
        return report

    def transcribe_and_score(self, report: EvaluationReport, transcriber, *, warmup: bool) -> EvaluationReport:
        """`transcribe`, then `EvaluationReport.score_transcripts`."""
        return self.transcribe(report, transcriber, warmup=warmup).score_transcripts()


# --- Command line: hf-whisper-kdq evaluate MODEL --manifest ... ----------------------------------------

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _split_list(value: str | None) -> list[str] | None:
    items = [item.strip() for item in (value or "").split(",") if item.strip()]
    return items or None


def _arg(text: str, **kwargs):
    return field(metadata={"help": text}, **kwargs)


SMOKE_RUN_BANNER = (
    "SMOKE RUN: synthetic speech from the package's held-out prompts. It checks that the pipeline works; its "
    "error rates are not results. Pass --manifest for a real evaluation."
)


@dataclass
class EvaluationArguments:
    """Arguments of ``hf-whisper-kdq evaluate`` (parse them with ``HfArgumentParser(EvaluationArguments)``)."""

    model_name_or_path: str = _arg(
        "Model to evaluate: a Hub id (openai/whisper-base), a local HF folder, an OpenAI "
        ".pt file, a CTranslate2 folder, a folder written by `export-onnx` (decoded by ONNX Runtime) or a "
        "whisper.cpp file (decoded by whisper.cpp).",
        default="openai/whisper-base",
    )
    manifest: str | None = _arg(
        "JSONL manifest (id, corpus, language, audio, duration, text per line), e.g. "
        "../shared/data/speech/dev.jsonl. Without one, a smoke run on speech synthesized "
        "offline from the package's held-out prompts (checks the pipeline; not a result).",
        default=None,
    )
    batch_size: int = _arg("Utterances decoded together.", default=8)
    num_beams: int = _arg("1 for greedy decoding, more for beam search.", default=1)
    languages: str | None = _arg("Comma-separated language codes to keep, e.g. 'en,zh' (default: all).", default=None)
    corpora: str | None = _arg("Comma-separated corpus names to keep (default: all).", default=None)
    limit: int | None = _arg("Read at most this many manifest rows.", default=None)
    max_new_tokens: int | None = _arg("Cap on generated tokens per utterance (default: the model's).", default=None)
    temperature_fallback: bool = _arg(
        "Decode again, sampling at rising temperatures, an utterance whose transcript loops (compresses too well) or "
        "is unlikely: the guard openai-whisper, faster-whisper and whisper.cpp use by default (transformers' "
        "implementation; a whisper.cpp file: whisper.cpp's own; refused for ONNX folders).",
        default=False,
    )
    output_json: str | None = _arg("Write the report as JSON to this path.", default=None)
    per_utterance: bool = _arg("Include per-utterance references, hypotheses and errors in the JSON.", default=False)
    device: str | None = _arg("cpu, cuda, cuda:1 ... (default: cuda when available, else cpu).", default=None)
    dtype: str = _arg(f"Parameter dtype, one of: {', '.join(_DTYPES)}.", default="float32")
    progress: bool = _arg("Show a progress bar.", default=True)

    def __post_init__(self):
        checks = [
            (
                str(self.model_name_or_path or "").strip(),
                "model_name_or_path is empty: name a model, e.g. `hf-whisper-kdq evaluate openai/whisper-base`",
            ),
            (
                self.manifest is None or Path(self.manifest).is_file(),
                f"manifest {self.manifest!r} is not a file: pass --manifest path/to/dev.jsonl",
            ),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}: pass e.g. --batch_size 8"),
            (self.num_beams >= 1, f"num_beams must be >= 1, got {self.num_beams}: pass --num_beams 1 for greedy"),
            (
                self.limit is None or self.limit >= 1,
                f"limit must be >= 1, got {self.limit}: pass a positive --limit or leave it out",
            ),
            (
                self.max_new_tokens is None or 1 <= self.max_new_tokens <= 444,
                "max_new_tokens must be in 1..444 "
                f"(Whisper's 448 positions less the prompt), got {self.max_new_tokens}",
            ),
            (self.dtype in _DTYPES, f"dtype {self.dtype!r} is not supported: pass --dtype {' or '.join(_DTYPES)}"),
        ]
        if failed := [message for ok, message in checks if not ok]:
            raise ValueError(failed[0])
        if self.device is not None:
            try:
                torch.device(self.device)
            except RuntimeError:
                raise ValueError(f"device {self.device!r} is not a torch device: pass --device cpu or cuda") from None
        try:
            languages = [language_code(lang) for lang in _split_list(self.languages) or []]
        except ValueError as error:
            raise ValueError(f"{error} (in --languages {self.languages!r})") from None
        self.languages = ",".join(languages) or None
        self.corpora = ",".join(_split_list(self.corpora) or []) or None


def run_evaluation(
    args: EvaluationArguments, evaluate: Callable[[Any], EvaluationReport] | None = None
) -> EvaluationReport:
    """Load the model (``sources.load_whisper``) and the manifest (``data.load_manifest``), evaluate, print the
    summary table and write the JSON report. ``evaluate`` (dataset → report) decodes with another engine instead,
    e.g. an ONNX export's (the command line passes it for such a folder); the model is then not loaded."""
    if args.manifest is None:
        print(SMOKE_RUN_BANNER)
        dataset = synthesize_dataset(default_prompts("eval")[: args.limit])
    else:
        dataset = data.load_manifest(
            args.manifest, languages=_split_list(args.languages), corpora=_split_list(args.corpora), limit=args.limit
        )
    if len(dataset) == 0:
        raise ValueError(f"no rows selected from {args.manifest}: check --languages / --corpora against it")
    if evaluate is None:
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        model, processor = load_whisper(args.model_name_or_path, dtype=_DTYPES[args.dtype], device=device)
        report = evaluate_model(
            model,
            processor,
            dataset,
            batch_size=args.batch_size,
            num_beams=args.num_beams,
            max_new_tokens=args.max_new_tokens,
            temperature_fallback=args.temperature_fallback,
            model_path=args.model_name_or_path,
            progress=args.progress,
        )
    else:
        report = evaluate(dataset)
    print(report.summary_table())
    if args.manifest is None:
        print(SMOKE_RUN_BANNER)
    if args.output_json:
        print(f"report written to {report.save_json(args.output_json, per_utterance=args.per_utterance)}")
    return report
