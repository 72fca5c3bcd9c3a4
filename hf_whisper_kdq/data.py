"""Speech data for Whisper-KDQ: loading manifests and `datasets` corpora, building training rows.

Every corpus is brought to one row shape, the *manifest* columns::

    id, corpus, language, audio, duration, text

where ``audio`` is a ``datasets.Audio(sampling_rate=16000, decode=False)`` column ({"path", "bytes"}), decoded by
``audio.load_audio`` (soundfile + soxr), never by `datasets`.

Training rows (``prepare_dataset``) add ``input_features`` (log-mel) and ``labels`` (token ids that start
with ``<|startoftranscript|>``, following the Hugging Face Whisper fine-tuning convention);
``WhisperDataCollator`` pads them and strips that start token, which the model re-inserts when it shifts the
labels right. Rows that would fail or mislead training (unreadable, empty, silent or over-long audio,
missing text, too many tokens) are dropped up front and counted per reason in a ``PreparationReport``, so a
bad file never surfaces as an obscure error deep inside torch.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import datasets
import numpy as np
import soundfile as sf
import torch
from datasets import Audio, Dataset, Features, List, Value
from transformers import WhisperProcessor, WhisperTokenizer
from transformers.models.whisper.tokenization_whisper import LANGUAGES, TO_LANGUAGE_CODE

from .audio import SAMPLING_RATE, AudioError, is_silent, load_audio

logger = logging.getLogger(__name__)

MAX_AUDIO_SECONDS = 30.0  # Whisper's encoder sees exactly 30 s; longer audio would be silently truncated.
MAX_LABEL_TOKENS = 448  # max_target_positions of every Whisper checkpoint.
# Written without spaces between words: scored by character error rate (as in the Whisper paper, plus Cantonese),
# and their transcripts start without a leading space (whisper-base on AISHELL: 0 of 8 greedy transcripts do).
UNSPACED_LANGUAGES = frozenset({"zh", "yue", "ja", "th", "lo", "my"})
# English-only Whisper reuses GPT-2's vocabulary, whose last byte-pair token is <|endoftext|> = 50256;
# multilingual vocabularies have one more byte-pair token, which moves every special token up by one.
_ENGLISH_ONLY_EOT_ID = 50256

AUDIO_FEATURE = Audio(sampling_rate=SAMPLING_RATE, decode=False)
MANIFEST_FEATURES = Features(
    {
        "id": Value("string"),
        "corpus": Value("string"),
        "language": Value("string"),
        "audio": AUDIO_FEATURE,
        "duration": Value("float64"),
        "text": Value("string"),
    }
)
# Datasets are built with a plain struct and cast to Audio afterwards: encoding into an Audio column imports
# torchcodec even when nothing needs decoding, while a cast only relabels the Arrow storage.
_STORAGE_FEATURES = Features({**MANIFEST_FEATURES, "audio": {"bytes": Value("binary"), "path": Value("string")}})


class ManifestError(ValueError):
    """A manifest with rows that cannot be loaded; the message lists them."""


def manifest_dataset(columns: dict[str, list]) -> Dataset:
    """A Dataset with the manifest columns from plain lists (``audio`` as ``{"bytes", "path"}`` dicts),
    cast to ``Audio(decode=False)`` without ever encoding audio (which would need torchcodec)."""
    return Dataset.from_dict(columns, features=_STORAGE_FEATURES).cast_column("audio", AUDIO_FEATURE)


@dataclass
class LoadReport:
    """What ``load_manifest_with_report`` read: ``skipped`` counts bad rows per reason (``invalid_json``,
    ``no_id``, ``no_audio``, ``missing_file``), ``problems`` describes the first few of them."""

    source: str
    rows_read: int = 0
    rows_kept: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def rows_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        reasons = ", ".join(f"{reason}: {n}" for reason, n in sorted(self.skipped.items())) or "none"
        return f"{self.source}: kept {self.rows_kept} of {self.rows_read} rows read; skipped {reasons}"


_PROBLEMS_SHOWN = 5


def load_manifest_with_report(
    path: str | os.PathLike,
    *,
    languages: list[str] | tuple[str, ...] | None = None,
    corpora: list[str] | tuple[str, ...] | None = None,
    limit: int | None = None,
    on_bad_rows: Literal["raise", "skip"] = "raise",
) -> tuple[Dataset, LoadReport]:
    """``load_manifest`` that also returns its ``LoadReport``.

    A manifest is JSONL, one object per line with ``id``, ``audio`` (a path, relative to the manifest's
    folder or absolute) and optionally ``corpus``, ``language``, ``duration`` and ``text`` (null for
    unlabeled audio). ``languages`` / ``corpora`` keep only matching rows; ``limit`` stops reading after that
    many kept rows. Bad rows (invalid JSON, no id, no audio, audio file missing) raise one ``ManifestError``
    listing them, or with ``on_bad_rows="skip"`` are left out, logged and counted in the report.
    """
    if on_bad_rows not in ("raise", "skip"):
        raise ValueError(f"on_bad_rows must be 'raise' or 'skip', not {on_bad_rows!r}")
    path = Path(path).expanduser().absolute()
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    report = LoadReport(source=str(path))
    columns: dict[str, list] = {name: [] for name in MANIFEST_FEATURES}
    bad = Counter()

    def reject(reason: str, problem: str) -> None:
        bad[reason] += 1
        if len(report.problems) < _PROBLEMS_SHOWN:
            report.problems.append(problem)

    with path.open(encoding="utf-8") as lines:
        for line_number, line in enumerate(lines, start=1):
            if limit is not None and len(columns["id"]) >= limit:
                break
            if not line.strip():
                continue
            report.rows_read += 1
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                reject("invalid_json", f"line {line_number}: not valid JSON ({err})")
                continue
            if not isinstance(row, dict):
                reject("invalid_json", f"line {line_number}: not a JSON object")
                continue
            if (languages is not None and row.get("language") not in languages) or (
                corpora is not None and row.get("corpus") not in corpora
            ):
                continue
            row_id = row.get("id")
            if row_id in (None, ""):
                reject("no_id", f"line {line_number}: no id")
                continue
            row_id = str(row_id)
            if not row.get("audio"):
                reject("no_audio", f"row {row_id!r} (line {line_number}): no audio path")
                continue
            audio = os.path.normpath(path.parent / row["audio"])
            if not os.path.isfile(audio):
                reject("missing_file", f"row {row_id!r} (line {line_number}): audio file not found: {audio}")
                continue
            columns["id"].append(row_id)
            columns["corpus"].append(row.get("corpus"))
            columns["language"].append(row.get("language"))
            columns["audio"].append({"bytes": None, "path": audio})
            columns["duration"].append(None if row.get("duration") is None else float(row["duration"]))
            columns["text"].append(None if row.get("text") is None else str(row["text"]))
    report.rows_kept = len(columns["id"])
    report.skipped = dict(bad)
    if bad and on_bad_rows == "raise":
        more = bad.total() - len(report.problems)
        listing = "\n  ".join(report.problems + ([f"... and {more} more"] if more else []))
        raise ManifestError(
            f"{path}: {bad.total()} bad row(s):\n  {listing}\n"
            "Fix: correct these rows, or pass on_bad_rows='skip' to leave them out."
        )
    if bad:
        logger.warning("%s (first: %s)", report.summary(), "; ".join(report.problems))
    else:
        logger.info(report.summary())
    return manifest_dataset(columns), report


def load_manifest(
    path: str | os.PathLike,
    *,
    languages: list[str] | tuple[str, ...] | None = None,
    corpora: list[str] | tuple[str, ...] | None = None,
    limit: int | None = None,
    on_bad_rows: Literal["raise", "skip"] = "raise",
) -> Dataset:
    """A JSONL manifest as a `Dataset` with the manifest columns (see ``load_manifest_with_report``)."""
    dataset, _ = load_manifest_with_report(
        path, languages=languages, corpora=corpora, limit=limit, on_bad_rows=on_bad_rows
    )
    return dataset


def _audio_duration(audio: dict) -> float | None:
    """Seconds, from the file header only; None when unreadable (``prepare_dataset`` reports those rows)."""
    try:
        return float(sf.info(io.BytesIO(audio["bytes"]) if audio.get("bytes") else audio["path"]).duration)
    except (sf.LibsndfileError, RuntimeError, TypeError, KeyError):
        return None


def _to_manifest_rows(
    batch: dict[str, list],
    indices: list[int],
    *,
    audio_column: str,
    text_column: str | None,
    language: str | None,
    language_column: str | None,
    id_column: str | None,
    corpus: str,
    split: str,
) -> dict[str, list]:
    audios = [{"bytes": a.get("bytes"), "path": a.get("path")} for a in batch[audio_column]]
    n = len(audios)
    return {
        "id": [str(i) for i in batch[id_column]] if id_column else [f"{corpus}/{split}/{i}" for i in indices],
        "corpus": [corpus] * n,
        "language": [lang or language for lang in batch[language_column]] if language_column else [language] * n,
        "audio": audios,
        "duration": [_audio_duration(a) for a in audios],
        "text": [None if t is None else str(t) for t in batch[text_column]] if text_column else [None] * n,
    }


def load_speech_dataset(
    name_or_path: str | os.PathLike,
    *,
    split: str = "train",
    config: str | None = None,
    audio_column: str = "audio",
    text_column: str | None = "text",
    language: str | None = None,
    language_column: str | None = None,
    id_column: str | None = None,
    corpus: str | None = None,
    limit: int | None = None,
    num_proc: int | None = None,
    **load_kwargs: Any,
) -> Dataset:
    """Any speech corpus as a `Dataset` with the manifest columns, its audio left undecoded.

    ``name_or_path`` is a ``.jsonl`` manifest (passed to ``load_manifest``; the column arguments do not
    apply), a folder written by ``save_to_disk``, or anything ``datasets.load_dataset`` accepts (a Hub id or a
    local data folder; ``config`` and ``load_kwargs`` go to it). ``text_column=None`` loads unlabeled audio.
    ``language`` is the language of rows that have none (all rows when ``language_column`` is None). Ids come
    from ``id_column``, else ``"{corpus}/{split}/{index}"``; ``corpus`` defaults to the dataset's name;
    ``duration`` is read from each file's header.
    """
    if str(name_or_path).endswith(".jsonl"):
        dataset = load_manifest(name_or_path, limit=limit)
        if language is None:
            return dataset
        return dataset.map(lambda lang: {"language": lang or language}, input_columns="language", desc="language")
    path = Path(name_or_path).expanduser()
    if path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
        raw = datasets.load_from_disk(str(path))
    else:
        raw = datasets.load_dataset(str(name_or_path), config, split=split, **load_kwargs)
    if isinstance(raw, datasets.DatasetDict):
        if split not in raw:
            raise ValueError(f"{name_or_path} has no split {split!r}; its splits are {list(raw)}")
        raw = raw[split]
    if not isinstance(raw, Dataset):
        raise TypeError(f"{name_or_path} loaded as {type(raw).__name__}; streaming datasets are not supported")
    wanted = {"audio_column": audio_column, "text_column": text_column}
    wanted |= {"language_column": language_column, "id_column": id_column}
    missing = {arg: column for arg, column in wanted.items() if column is not None and column not in raw.column_names}
    if missing:
        raise ValueError(
            f"{name_or_path} has no column {', '.join(map(repr, missing.values()))}; its columns are "
            f"{raw.column_names}. Fix: pass the right {', '.join(f'{arg}=' for arg in missing)}"
        )
    # Before anything reads a row: an Audio(decode=True) column would call torchcodec on access.
    raw = raw.cast_column(audio_column, AUDIO_FEATURE)
    if limit is not None:
        raw = raw.select(range(min(limit, len(raw))))
    rows = raw.map(
        partial(
            _to_manifest_rows,
            audio_column=audio_column,
            text_column=text_column,
            language=language,
            language_column=language_column,
            id_column=id_column,
            corpus=corpus or (f"{path.name}/{config}" if config else path.name),
            split=split,
        ),
        batched=True,
        with_indices=True,
        remove_columns=raw.column_names,
        features=_STORAGE_FEATURES,
        num_proc=num_proc,
        desc="manifest columns",
    )
    return rows.cast_column("audio", AUDIO_FEATURE)


_IDS_SHOWN = 5
# What to do about the rows dropped for each reason (``{seconds}`` / ``{tokens}``: prepare_dataset's limits).
_DROP_FIXES = {
    "no_text": "give these rows a transcript, or have the teacher label them (labelling.pseudo_label, "
    "--unlabeled_manifest)",
    "unknown_language": "set their language to a Whisper language code such as 'en' or 'zh'",
    "labels_too_long": "split these utterances so that each transcript fits in {tokens} tokens (Whisper's decoder "
    "limit, start token included)",
    "audio_too_long": "cut this audio into segments of at most {seconds:g} s (Whisper's encoder sees 30 s)",
    "silent_audio": "replace or remove these silent files",
    "missing_audio": "correct these audio paths (manifest paths are relative to the manifest's folder)",
    "unreadable_audio": "re-encode these files as WAV or FLAC (e.g. `ffmpeg -i in -ar 16000 out.flac`)",
    "empty_audio": "remove these rows",
    "non_finite_audio": "re-export these files from their source",
}


@dataclass
class PreparationReport:
    """Rows in and out of ``prepare_dataset``; ``dropped`` counts removed rows per reason and ``dropped_ids``
    names them."""

    rows_in: int
    rows_kept: int
    dropped: dict[str, int]
    dropped_ids: dict[str, list[str]] = field(default_factory=dict)

    def summary(self) -> str:
        def ids(reason: str) -> str:
            names = self.dropped_ids.get(reason, [])
            if not names:
                return ""
            more = f", ... and {len(names) - _IDS_SHOWN} more" if len(names) > _IDS_SHOWN else ""
            return f" ({', '.join(names[:_IDS_SHOWN])}{more})"

        reasons = ", ".join(f"{reason}: {n}{ids(reason)}" for reason, n in sorted(self.dropped.items())) or "none"
        return f"kept {self.rows_kept} of {self.rows_in} rows; dropped {reasons}"


# ISO 639-2/3 codes that corpora use for Whisper's languages (AISHELL and Common Voice write Mandarin "cmn").
_ISO_639_3 = {"cmn": "zh", "zho": "zh", "chi": "zh", "eng": "en"}


def language_code(language: str | None) -> str | None:
    """Whisper's code for ``language`` ("en", "English", "en-US", "mandarin", "cmn" -> "zh"), None if unknown."""
    if not language:
        return None
    name = language.strip().lower()
    if name in LANGUAGES:
        return name
    if name in _ISO_639_3:
        return _ISO_639_3[name]
    if name in TO_LANGUAGE_CODE:
        return TO_LANGUAGE_CODE[name]
    base = name.replace("_", "-").split("-")[0]
    return base if base in LANGUAGES else None


def tokenizer_is_multilingual(tokenizer: WhisperTokenizer) -> bool:
    """Decided by the position of ``<|endoftext|>``: counting tokens fails, because English-only vocabularies
    also contain language tokens and some tokenizer files lack the timestamp tokens."""
    return tokenizer.convert_tokens_to_ids("<|endoftext|>") > _ENGLISH_ONLY_EOT_ID


def whisper_label_text(text: str, language: str | None = None) -> str:
    """``text`` as Whisper writes a transcript: trimmed, with one leading space (``" Hello."``), except in
    `UNSPACED_LANGUAGES`, whose transcripts Whisper starts without one.

    Whisper's byte-level BPE has separate tokens for a word with and without its leading space; a label spaced
    otherwise than the model writes makes its first target a token the teacher gives almost no probability
    (benchmarks/README.md, "Label spacing"). Every label path goes through here (`prepare_dataset`).
    """
    text = text.strip()
    return text if language_code(language) in UNSPACED_LANGUAGES else " " + text


def _label_prefix(tokenizer: WhisperTokenizer, language: str | None, task: str, multilingual: bool) -> list[int] | None:
    """``<|startoftranscript|>[<|lang|><|task|>]<|notimestamps|>``; None when the language has no token."""
    tokens = ["<|startoftranscript|>"]
    if multilingual:
        code = language_code(language)
        if code is None or tokenizer.convert_tokens_to_ids(f"<|{code}|>") in (None, tokenizer.unk_token_id):
            return None
        tokens += [f"<|{code}|>", f"<|{task}|>"]
    return tokenizer.convert_tokens_to_ids(tokens + ["<|notimestamps|>"])


def _prepare_batch(
    batch: dict[str, list],
    *,
    processor: WhisperProcessor,
    multilingual: bool,
    task: str,
    max_samples: int,
    max_label_tokens: int,
    worker: bool,
) -> dict[str, list]:
    if worker:
        # Forked workers inherit torch's thread pool in a broken state (the feature extractor's STFT hangs in
        # its first parallel region); one thread per worker is also what num_proc asks for.
        torch.set_num_threads(1)
    tokenizer = processor.tokenizer
    reasons, labels, audios = [], [], []
    for row_id, audio, text, language in zip(batch["id"], batch["audio"], batch["text"], batch["language"]):
        reason, row_labels, samples = "", [], None
        prefix = _label_prefix(tokenizer, language, task, multilingual)
        if text is None or not text.strip():
            reason = "no_text"
        elif prefix is None:
            reason = "unknown_language"
        else:
            text_ids = tokenizer(whisper_label_text(text, language), add_special_tokens=False).input_ids
            row_labels = prefix + text_ids + [tokenizer.eos_token_id]
            if len(row_labels) > max_label_tokens:
                reason, row_labels = "labels_too_long", []
        if not reason:
            try:
                samples = load_audio(audio, row_id=row_id)
            except AudioError as err:
                reason = err.reason
                logger.debug("dropping %s", err)
            else:
                if is_silent(samples):
                    reason = "silent_audio"
                elif samples.size > max_samples:
                    reason = "audio_too_long"
        if reason:
            row_labels, samples = [], None
        reasons.append(reason)
        labels.append(row_labels)
        audios.append(samples)
    kept = [samples for samples in audios if samples is not None]
    extract = processor.feature_extractor
    mels = iter(extract(kept, sampling_rate=SAMPLING_RATE, return_tensors="np").input_features if kept else [])
    dropped = np.zeros((extract.feature_size, 0), np.float32)
    features = [dropped if samples is None else next(mels) for samples in audios]
    return {"input_features": features, "labels": labels, "drop_reason": reasons}


def prepare_dataset(
    dataset: Dataset,
    processor: WhisperProcessor,
    *,
    max_audio_seconds: float = MAX_AUDIO_SECONDS,
    max_label_tokens: int = MAX_LABEL_TOKENS,
    num_proc: int | None = None,
    task: Literal["transcribe", "translate"] = "transcribe",
    multilingual: bool | None = None,
    batch_size: int = 16,
) -> tuple[Dataset, PreparationReport]:
    """Training rows from a dataset with the manifest columns: adds ``input_features`` and ``labels``.

    ``labels`` are ``<|startoftranscript|>[<|lang|><|task|>]<|notimestamps|> text <|endoftext|>``, the text
    spaced as Whisper writes it (`whisper_label_text`, whatever the row's own spacing: manifests,
    ``datasets`` corpora, teacher transcripts and synthetic prompts all come through here), the language and
    task tokens only for multilingual models: pass the model's
    ``generation_config.is_multilingual`` as ``multilingual``, else it is read from the tokenizer. Rows are
    dropped, and counted and named per reason (``report.dropped``, ``report.dropped_ids`` and the log), for:
    no text, a language the tokenizer lacks (multilingual only), more than ``max_label_tokens`` labels (start
    token included), audio that is missing, unreadable, empty, non-finite, silent or longer than
    ``max_audio_seconds``. Raises ``ValueError`` for an empty dataset and when no row survives (naming the
    dropped rows and the fix for each reason).
    The result is in numpy format for ``input_features`` and ``labels``; other columns are kept as they are.
    """
    missing = [column for column in ("id", "audio", "text", "language") if column not in dataset.column_names]
    if missing:
        raise ValueError(f"prepare_dataset needs the manifest columns; missing {missing} (see load_speech_dataset)")
    if len(dataset) == 0:
        raise ValueError(
            "prepare_dataset: the dataset has no rows. Fix: check its source and the filters that built it "
            "(load_manifest's languages / corpora / limit, load_speech_dataset's split)"
        )
    if isinstance(dataset.features["audio"], Audio) and dataset.features["audio"].decode:
        dataset = dataset.cast_column("audio", AUDIO_FEATURE)
    if multilingual is None:
        multilingual = tokenizer_is_multilingual(processor.tokenizer)
    features = dataset.features.copy()
    features["input_features"] = List(List(Value("float32")))
    features["labels"] = List(Value("int32"))
    features["drop_reason"] = Value("string")
    marked = dataset.map(
        partial(
            _prepare_batch,
            processor=processor,
            multilingual=multilingual,
            task=task,
            max_samples=int(round(max_audio_seconds * SAMPLING_RATE)),
            max_label_tokens=max_label_tokens,
            worker=bool(num_proc and num_proc > 1),
        ),
        batched=True,
        batch_size=batch_size,
        # Each row holds ~1 MB of log-mel: flush often rather than buffer datasets' default 1000 rows.
        writer_batch_size=64,
        features=features,
        num_proc=num_proc,
        desc="log-mel features and labels",
    )
    dropped_ids: dict[str, list[str]] = {}
    for row_id, reason in zip(marked["id"], marked["drop_reason"]):
        if reason:
            dropped_ids.setdefault(reason, []).append(row_id)
    dropped = {reason: len(ids) for reason, ids in dropped_ids.items()}
    kept = len(dataset) - sum(dropped.values())
    report = PreparationReport(rows_in=len(dataset), rows_kept=kept, dropped=dropped, dropped_ids=dropped_ids)
    (logger.warning if dropped else logger.info)("prepare_dataset: %s", report.summary())
    if kept == 0:
        limits = {"seconds": max_audio_seconds, "tokens": max_label_tokens}
        fixes = "; ".join(
            f"{reason}: {_DROP_FIXES.get(reason, 'correct or remove these rows').format(**limits)}"
            for reason in sorted(dropped)
        )
        raise ValueError(
            f"prepare_dataset: no usable rows: all {len(dataset)} rows were dropped ({report.summary()}). Fix: {fixes}"
        )
    prepared = marked.filter(lambda reason: reason == "", input_columns="drop_reason", num_proc=num_proc)
    prepared = prepared.remove_columns("drop_reason")
    return prepared.with_format("numpy", columns=["input_features", "labels"], output_all_columns=True), report


@dataclass
class WhisperDataCollator:
    """Batches ``prepare_dataset`` rows for ``Trainer``: stacks the log-mel features, right-pads the labels with
    -100 (ignored by the loss) and drops a leading ``decoder_start_token_id`` shared by every row, because the
    model prepends it itself when it shifts the labels into decoder inputs."""

    processor: WhisperProcessor
    decoder_start_token_id: int

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.processor.feature_extractor.pad(
            [{"input_features": row["input_features"]} for row in features], return_tensors="pt"
        )
        padded = self.processor.tokenizer.pad(
            [{"input_ids": row["labels"]} for row in features], return_tensors="pt", padding_side="right"
        )
        # Masked by attention, not by id: the pad token is <|endoftext|>, which every label row ends with.
        labels = padded["input_ids"].masked_fill(padded["attention_mask"].ne(1), -100)
        if labels.shape[1] > 0 and bool((labels[:, 0] == self.decoder_start_token_id).all()):
            labels = labels[:, 1:]
        return {"input_features": batch["input_features"].to(torch.float32), "labels": labels}
