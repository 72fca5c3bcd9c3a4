"""The evaluation results a model card shows, read into scores and per-model size and speed.

Error rates are *fractions* (as :class:`~hf_whisper_kdq.evaluation.EvaluationReport` stores them; a row with
``"percent": True`` is read as a percentage); ``card`` shows them as percentages.

**``eval_results``** — one of
  * a mapping ``{"compressed": X, "teacher": X, "original": X}`` ("original" = the same-size Whisper, optional),
    each ``X`` an ``EvaluationReport``, its ``to_dict()``, a list of rows, or one row;
  * a list of rows / report dicts, each with ``"role"`` (or ``"model"``) in compressed / teacher / original.

A row: ``corpus`` or ``dataset`` (display name), optional ``dataset_type`` (Hub dataset id, default the name),
``language``, ``split``, ``dataset_config``, ``metric`` (wer/cer, default from the language), ``error_rate`` (or
``wer``/``cer``), optional ``rtf``, ``audio_seconds``/``decode_seconds``, ``n_utterances``, ``size_bytes``.
Only the compressed model's rows go to ``model-index``; teacher and original rows go to the comparison table.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from huggingface_hub import EvalResult

from .hub import public
from .scoring import CER_LANGUAGES, language_code

ROLES = ("compressed", "teacher", "original")


def language_label(code: str | None) -> str | None:
    """Whisper's code of ``code``; an unknown language is kept as written (the card shows it), none is None."""
    try:
        return language_code(code) if code else None
    except ValueError:
        return str(code)


@dataclass
class Score:
    """One error rate of one model on one evaluation set (``value`` is a fraction)."""

    role: str
    name: str
    dataset_type: str
    language: str | None
    split: str | None
    config: str | None
    metric: str
    value: float
    n_utterances: int | None = None

    @property
    def column(self) -> str:
        language = f" ({self.language})" if self.language else ""
        return f"{public(self.name)}{language} {self.metric.upper()} %"


@dataclass
class ModelStats:
    size_bytes: int | None = None
    rtf: float | None = None
    setup: str | None = None


def _as_dict(item: Any) -> dict:
    if isinstance(item, Mapping):
        return dict(item)
    if hasattr(item, "to_dict"):  # EvaluationReport
        return item.to_dict(per_utterance=False)
    raise TypeError(f"an evaluation result must be a dict or an EvaluationReport, got {type(item).__name__}")


def _row_score(role: str, row: Mapping) -> Score:
    name = str(row.get("dataset_name") or row.get("dataset") or row.get("corpus") or "default")
    language = language_label(row.get("language"))
    metric = str(row.get("metric") or ("cer" if language in CER_LANGUAGES else "wer")).lower()
    if metric not in ("wer", "cer"):
        raise ValueError(f"metric {metric!r} of {name!r}: only 'wer' and 'cer' are supported")
    value = row.get("error_rate", row.get(metric))
    if value is None:
        raise ValueError(f"the {role} row for {name!r} has no error_rate (or {metric}) value")
    value = float(value) / (100 if row.get("percent") else 1)
    n = row.get("n_utterances")
    return Score(
        role,
        name,
        public(row.get("dataset_type") or name),
        language,
        row.get("split"),
        row.get("dataset_config"),
        metric,
        value,
        None if n is None else int(n),
    )


def collect_results(eval_results: Any) -> tuple[list[Score], dict[str, ModelStats]]:
    """Normalize ``eval_results`` (see the module docstring) to scores and per-model size / RTF."""
    if not eval_results:  # nothing evaluated on real speech: a card without scores
        return [], {}
    groups: list[tuple[str, Any]] = []
    if isinstance(eval_results, Mapping) and set(eval_results) & set(ROLES):
        if unknown := set(eval_results) - set(ROLES):
            raise ValueError(f"unknown eval_results keys {sorted(unknown)}: use {', '.join(ROLES)}")
        groups = list(eval_results.items())
    else:
        for item in [eval_results] if isinstance(eval_results, Mapping) else list(eval_results or []):
            data = _as_dict(item)
            role = data.get("role") or data.get("model")
            if role not in ROLES:
                raise ValueError(f"each evaluation row needs 'role' set to one of {', '.join(ROLES)}: got {role!r}")
            groups.append((role, data))
    scores: list[Score] = []
    stats: dict[str, ModelStats] = {}
    for role, data in (g for g in groups if g[1] is not None):
        items = data if isinstance(data, Sequence) and not isinstance(data, (str, Mapping)) else [data]
        entry, audio, decode, rtfs = stats.setdefault(role, ModelStats()), 0.0, 0.0, []
        for item in items:
            item = _as_dict(item)
            rows = item["corpora"] if "corpora" in item else [item]
            if "corpora" in item:
                if item.get("model_size_source", "disk") == "disk" and item.get("model_size_bytes"):
                    entry.size_bytes = int(item["model_size_bytes"])
                entry.rtf = item.get("rtf", entry.rtf)
                if item.get("device"):
                    entry.setup = (
                        f"{public(item['device'])} {public(item.get('dtype', ''))}, batch size "
                        f"{item.get('batch_size', '?')}, {item.get('num_beams', 1)} beam(s)"
                        + (", temperature fallback" if item.get("temperature_fallback") else "")
                    )
            for row in rows:
                scores.append(_row_score(role, row))
                entry.size_bytes = row.get("size_bytes", row.get("model_size_bytes")) or entry.size_bytes
                if row.get("audio_seconds") and row.get("decode_seconds") is not None:
                    audio, decode = audio + row["audio_seconds"], decode + row["decode_seconds"]
                elif row.get("rtf") is not None:
                    rtfs.append(row["rtf"])
        if entry.rtf is None and (audio or rtfs):
            entry.rtf = decode / audio if audio else sum(rtfs) / len(rtfs)
    return scores, stats


def eval_results_for_card(scores: list[Score]) -> list[EvalResult]:
    """The compressed model's scores as ``EvalResult``s: percentages, one per (dataset, language, split)."""
    return [
        EvalResult(
            task_type="automatic-speech-recognition",
            task_name="Automatic Speech Recognition",
            dataset_type=s.dataset_type,
            dataset_name=public(s.name),
            dataset_config=s.config,
            dataset_split=s.split,
            dataset_args={"language": s.language} if s.language else None,
            metric_type=s.metric,
            metric_name=f"{s.metric.upper()} (%)",
            metric_value=round(100 * s.value, 2),
        )
        for s in scores
        if s.role == "compressed"
    ]


def rows_of_last_evaluation(log_history: Sequence[Mapping[str, Any]]) -> list[dict]:
    """The last evaluation's wer/cer metrics of a Trainer's log (``eval_wer_en`` ...) as rows of the compressed model."""
    for entry in reversed(log_history):
        rows = [
            {
                "dataset": "evaluation set",
                "language": key.rsplit("_", 1)[1],
                "metric": key.split("_")[1],
                "error_rate": value,
            }
            for key, value in entry.items()
            if key.startswith(("eval_wer_", "eval_cer_"))
        ]
        if rows:
            return rows
    return []
