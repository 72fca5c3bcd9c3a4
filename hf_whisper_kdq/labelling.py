"""Pseudo-labelling: a teacher Whisper transcribes unlabeled (or weakly labeled) audio for distillation.

This follows Distil-Whisper's recipe: the teacher's transcripts become the student's training targets, and
where a reference transcript exists, rows on which the teacher disagrees with it by more than a normalized
WER threshold are dropped (they are likely mis-transcribed, misaligned or noisy). Rows whose transcript is
empty after normalization (silence, music, ``[BLANK_AUDIO]``) carry nothing to learn and are dropped too.

    dataset = data.load_manifest("../shared/data/speech/unlabeled.jsonl")
    labelled, report = pseudo_label(dataset, teacher, processor, batch_size=16, wer_threshold=0.1)
    print(report.summary())

Decoding goes through :func:`hf_whisper_kdq.evaluation.transcribe` and agreement through
:func:`hf_whisper_kdq.scoring.score`, so the labels and the evaluation see the same normalization.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import defaultdict
from collections.abc import Callable, Collection
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import datasets

from . import evaluation, scoring
from .data import MANIFEST_FEATURES, load_manifest
from .files import atomic_folder, atomic_write_text

logger = logging.getLogger(__name__)

REFERENCE_TEXT_COLUMN = "reference_text"
ERROR_RATE_COLUMN = "teacher_error_rate"


@dataclass
class LabellingReport:
    """What :func:`pseudo_label` did.

    ``n_input`` rows went in and ``n_kept`` came out; ``n_dropped_empty`` had an empty transcript and
    ``n_dropped_wer`` disagreed with their reference beyond ``wer_threshold``. ``n_with_reference`` rows had a
    reference to compare with; ``teacher_scores`` gives, per language, the teacher's error rate against those
    references over all of them (before any row is dropped). ``dropped`` lists the dropped row ids by reason.
    """

    n_input: int
    n_kept: int = 0
    n_dropped_empty: int = 0
    n_dropped_wer: int = 0
    n_with_reference: int = 0
    wer_threshold: float | None = None
    decode_seconds: float = 0.0
    teacher_scores: dict[str, dict[str, Any]] = field(default_factory=dict)
    dropped: dict[str, list[str]] = field(default_factory=lambda: {"empty": [], "wer": []})

    @property
    def n_dropped(self) -> int:
        return self.n_dropped_empty + self.n_dropped_wer

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> LabellingReport:
        return cls(**values)

    def save_json(self, path: str | os.PathLike) -> Path:
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n")

    def summary(self) -> str:
        threshold = "no WER filter" if self.wer_threshold is None else f"WER threshold {self.wer_threshold:g}"
        scores = ", ".join(
            f"{code} {entry['metric'].upper()} {100 * entry['error_rate']:.2f}% over {entry['n_utterances']}"
            for code, entry in self.teacher_scores.items()
        )
        return (
            f"pseudo-labelled {self.n_input} rows in {self.decode_seconds:.1f} s: kept {self.n_kept}, dropped "
            f"{self.n_dropped_empty} empty and {self.n_dropped_wer} over the threshold ({threshold}); "
            f"{self.n_with_reference} had a reference" + (f" (teacher vs reference: {scores})" if scores else "")
        )


def _row_languages(dataset: datasets.Dataset, language_column: str | None) -> list[str | None]:
    if not language_column or language_column not in dataset.column_names:
        return [None] * len(dataset)
    return [scoring.language_code(lang) if lang else None for lang in dataset[language_column]]


def pseudo_label(
    dataset: datasets.Dataset,
    model,
    processor,
    *,
    batch_size: int = 8,
    num_beams: int = 1,
    language_column: str | None = "language",
    wer_threshold: float | None = None,
    reference_column: str | None = "text",
    audio_column: str = "audio",
    max_new_tokens: int | None = None,
    progress: bool = True,
) -> tuple[datasets.Dataset, LabellingReport]:
    """Transcribe every row of ``dataset`` with the teacher ``model`` and use that as the row's ``text``.

    Args:
        dataset: rows with an ``audio`` column (``data.load_manifest`` gives path dicts) and optionally a
            language and a reference transcript.
        language_column: per-row language passed to a multilingual teacher (``None`` values, or no such
            column, let the teacher detect the language; English-only teachers accept only English).
        wer_threshold: drop rows whose transcript's normalized error rate (WER, or CER for languages scored
            by characters) against their reference exceeds this, e.g. 0.1 as in Distil-Whisper. Rows without
            a reference (or a language to score it in) are kept.
        reference_column: the reference transcripts. When it holds any, they are kept in ``reference_text``
            and each row's error rate against its reference in ``teacher_error_rate``.

    Returns:
        ``(dataset, report)``: the kept rows with ``text`` holding the teacher transcript (other columns kept,
        ``text`` in its original place), and a :class:`LabellingReport`. Empty transcripts are always dropped.
    """
    if wer_threshold is not None and not wer_threshold >= 0:
        raise ValueError(f"wer_threshold must be >= 0 (e.g. 0.1) or None to keep every row, got {wer_threshold}")
    columns = dataset.column_names
    if audio_column not in columns:
        raise ValueError(
            f"the dataset has no {audio_column!r} column: load it with data.load_manifest "
            f"or pass audio_column= (columns: {columns})"
        )
    n = len(dataset)
    ids = [str(i) for i in dataset["id"]] if "id" in columns else [str(i) for i in range(n)]
    languages = _row_languages(dataset, language_column)
    has_reference_column = bool(reference_column) and reference_column in columns
    references = list(dataset[reference_column]) if has_reference_column else [None] * n

    start = time.perf_counter()
    hypotheses = evaluation.transcribe(
        model,
        processor,
        evaluation.audio_values(dataset, audio_column),
        languages=languages,
        batch_size=batch_size,
        num_beams=num_beams,
        max_new_tokens=max_new_tokens,
        progress=progress,
    )
    report = LabellingReport(n_input=n, wer_threshold=wer_threshold, decode_seconds=time.perf_counter() - start)

    # English-only teachers take no language; their rows are English.
    english_only = not getattr(model.generation_config, "is_multilingual", True)
    scoring_languages = [lang or ("en" if english_only else None) for lang in languages]
    error_rates: list[float | None] = [None] * n
    by_language: dict[str, list[int]] = defaultdict(list)
    for i, (reference, code) in enumerate(zip(references, scoring_languages)):
        if code is not None and reference is not None and scoring.normalize_text(reference, code):
            by_language[code].append(i)
    for code, indices in by_language.items():
        result = scoring.score(
            [references[i] for i in indices], [hypotheses[i] for i in indices], code, per_utterance=True
        )
        for i, record in zip(indices, result["utterances"]):
            error_rates[i] = record["error_rate"]
        report.teacher_scores[code] = {
            "metric": result["metric"],
            "error_rate": result[result["metric"]],
            "n_utterances": result["n_utterances"],
        }
    report.n_with_reference = sum(map(len, by_language.values()))

    kept = []
    for i, hypothesis in enumerate(hypotheses):
        # Without a language, Whisper's English normalizer still keeps any letters and drops filler-only text.
        if not scoring.normalize_text(hypothesis, scoring_languages[i] or "en"):
            report.dropped["empty"].append(ids[i])
        elif wer_threshold is not None and error_rates[i] is not None and error_rates[i] > wer_threshold:
            report.dropped["wer"].append(ids[i])
        else:
            kept.append(i)
    report.n_dropped_empty, report.n_dropped_wer = len(report.dropped["empty"]), len(report.dropped["wer"])
    report.n_kept = len(kept)

    new_columns: dict[str, tuple[list, datasets.Value]] = {"text": (hypotheses, datasets.Value("string"))}
    if any(reference is not None for reference in references):
        new_columns[REFERENCE_TEXT_COLUMN] = (references, datasets.Value("string"))
        new_columns[ERROR_RATE_COLUMN] = (error_rates, datasets.Value("float64"))
    out = dataset.remove_columns([name for name in new_columns if name in columns])
    for name, (values, feature) in new_columns.items():
        out = out.add_column(name, values, feature=feature)
    out = out.select_columns(columns + [name for name in new_columns if name not in columns]).select(kept)
    logger.info(report.summary())
    return out, report


def labels_folder(output_dir: str | os.PathLike, manifest: str | os.PathLike) -> Path:
    """Where :func:`cached_pseudo_labels` keeps the teacher's labels of ``manifest``: one folder per manifest path
    under ``output_dir/teacher_labels``."""
    digest = hashlib.sha256(str(Path(manifest).absolute()).encode()).hexdigest()[:8]
    return Path(output_dir) / "teacher_labels" / f"{Path(manifest).stem}-{digest}"


def cached_pseudo_labels(
    manifest: str | os.PathLike,
    teacher,
    processor,
    *,
    ids: Collection[str] | None = None,
    wer_threshold: float | None = None,
    output_dir: str | os.PathLike | None = None,
    timer: Callable[[str], AbstractContextManager] | None = None,
) -> datasets.Dataset:
    """:func:`pseudo_label` of ``manifest``'s rows, or of its rows ``ids`` only (the rows a capped mixture drew:
    labelling is the slowest data phase on a CPU, seconds a row), in the columns ``id``, ``corpus``, ``language``,
    ``audio``, ``duration``, ``text``. The labels are kept row by row under :func:`labels_folder` of ``output_dir``
    while the manifest, the teacher's weights and the threshold are unchanged, and a later call labels only the rows
    not labelled yet: the other processes of a multi-process launch (the main process labels first), a rerun, and a
    run drawing other rows all reuse them. Rows that labelling drops (empty, over the threshold) are not returned.
    ``timer(name)`` (e.g. ``compress.PhaseTimer``) times the labelling."""
    weights = hashlib.sha256()
    for name, tensor in sorted(teacher.state_dict().items()):
        weights.update(name.encode())
        weights.update(tensor.detach().float().cpu().numpy().tobytes())
    key = {
        "manifest_sha256": hashlib.sha256(Path(manifest).read_bytes()).hexdigest(),
        "teacher_weights_sha256": weights.hexdigest(),
        "wer_threshold": wer_threshold,
    }
    rows = load_manifest(manifest)
    if ids is not None:
        wanted = {str(i) for i in ids}
        rows = rows.select([i for i, row_id in enumerate(rows["id"]) if str(row_id) in wanted])
    folder = labels_folder(output_dir, manifest) if output_dir else None  # "" as None: no cache, as compress had it
    kept, labelled_ids, reports = None, set(), []
    if folder is not None and (folder / "key.json").is_file() and json.loads((folder / "key.json").read_text()) == key:
        kept = datasets.load_from_disk(str(folder / "dataset"))
        labelled_ids = set(json.loads((folder / "labelled_ids.json").read_text()))
        reports = json.loads((folder / "labelling_reports.json").read_text())
    todo = [i for i, row_id in enumerate(rows["id"]) if str(row_id) not in labelled_ids]
    if todo:
        with (timer or (lambda name: nullcontext()))(
            f"label {len(todo)} rows of {Path(manifest).name} with the teacher"
        ):
            pending = rows.select(todo)
            labelled, report = pseudo_label(pending, teacher, processor, wer_threshold=wer_threshold)
        labelled = labelled.select_columns(list(MANIFEST_FEATURES))
        kept = labelled if kept is None else datasets.concatenate_datasets([kept, labelled])
        labelled_ids |= {str(row_id) for row_id in pending["id"]}
        reports.append(report.to_dict())
        if folder is not None:
            with atomic_folder(folder) as staging:
                kept.save_to_disk(str(staging / "dataset"))
                atomic_write_text(staging / "labelled_ids.json", json.dumps(sorted(labelled_ids)) + "\n")
                atomic_write_text(staging / "labelling_reports.json", json.dumps(reports, indent=2) + "\n")
                (staging / "key.json").write_text(json.dumps(key, indent=2) + "\n")
            kept = datasets.load_from_disk(str(folder / "dataset"))  # not the replaced folder's files
    else:
        logger.info("reusing the teacher's labels of %d rows of %s in %s", len(rows), manifest, folder)
    if kept is None:  # no row asked for
        return rows.select_columns(list(MANIFEST_FEATURES))
    requested = {str(row_id) for row_id in rows["id"]}
    return kept.filter(lambda row: str(row["id"]) in requested, desc="labelled rows drawn")
