"""A weighted mixture of training sources: several manifests (or `datasets` corpora) drawn in chosen shares.

A multilingual student needs every language it will be asked to write in its training data, in a share that
stops the large source (5,000 English utterances) from drowning the small one (220 real Mandarin ones): a
decoder trained on English alone forgets to write Chinese even with ``<|zh|>`` forced. Each source keeps its
rows' own language (the language token of each label), and says where its labels come from: its reference
transcripts, or the teacher's transcripts of its audio (Distil-Whisper's pseudo-labels, filtered by their error
rate against the reference where there is one: ``labelling.pseudo_label``).

Shares are drawn by ``datasets.interleave_datasets`` with ``stopping_strategy="all_exhausted"``: rows are drawn
from source *i* with probability ``weight_i / Σ weights`` until every source has given each of its rows at least
once, so a small source with a large weight is repeated (oversampled) and nothing of a large one is left out.
Without weights the sources are simply concatenated, each row once.

    sources = parse_sources("train_en.jsonl,train_zh.jsonl,synth_zh.jsonl", weights="2,1,1")
    parts = [load_manifest(s.location) for s in sources]
    train = mix(parts, sources, seed=0)
    print(describe(train, {s.location: s.weight for s in sources}).table())
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Literal

from datasets import Dataset, concatenate_datasets, interleave_datasets

from .data import MANIFEST_FEATURES

logger = logging.getLogger(__name__)

LABEL_ORIGINS = ("reference", "teacher")


@dataclass(frozen=True)
class TrainingSource:
    """One source of training rows.

    Args:
        location: a JSONL manifest (see ``data.load_manifest``).
        weight: its share of the mixture, relative to the other sources' weights (None: concatenated as is).
        labels: ``"reference"`` (the manifest's transcripts) or ``"teacher"`` (the teacher transcribes the audio;
            rows whose transcript's error rate against their reference exceeds the threshold are dropped).
    """

    location: str
    weight: float | None = None
    labels: Literal["reference", "teacher"] = "reference"


def _split(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def parse_sources(locations: str, weights: str | None = None, labels: str | None = None) -> list[TrainingSource]:
    """Sources from the command line's comma-separated lists: ``a.jsonl,b.jsonl`` with weights ``3,1`` and labels
    ``reference,teacher`` (one value applies to every source)."""
    names = _split(locations)
    if not names:
        raise ValueError("no training manifest given: --train_manifest a.jsonl[,b.jsonl,...]")

    def per_source(values: list[str], flag: str) -> list[str | None]:
        if not values:
            return [None] * len(names)
        if len(values) == 1:
            return values * len(names)
        if len(values) != len(names):
            raise ValueError(
                f"{flag} has {len(values)} values for {len(names)} manifests: give one per manifest, in the order "
                "of --train_manifest, or one for all"
            )
        return values

    sources = []
    for name, weight, origin in zip(
        names, per_source(_split(weights), "--train_weights"), per_source(_split(labels), "--train_labels")
    ):
        try:
            share = None if weight is None else float(weight)
        except ValueError:
            raise ValueError(f"--train_weights: {weight!r} is not a number (e.g. --train_weights 3,1)") from None
        if share is not None and not share > 0:
            raise ValueError(f"--train_weights: every weight must be > 0, got {weight} for {name}")
        if origin is not None and origin not in LABEL_ORIGINS:
            raise ValueError(f"--train_labels: {origin!r} for {name}; choose one of {', '.join(LABEL_ORIGINS)}")
        sources.append(TrainingSource(name, share, origin or "reference"))
    return sources


@dataclass
class SourceReport:
    """What one source gave the mixture (one row of the model card's training-data table)."""

    source: str
    corpora: list[str]
    languages: list[str]
    labels: str
    rows_distinct: int
    rows_drawn: int
    hours_drawn: float | None
    weight: float | None


@dataclass
class MixtureReport:
    sources: list[SourceReport]

    @property
    def rows(self) -> int:
        return sum(s.rows_drawn for s in self.sources)

    def to_dicts(self) -> list[dict]:
        return [asdict(s) for s in self.sources]

    def table(self) -> str:
        """The mixture as a Markdown table (the card's and the log's)."""
        lines = [
            "| source | corpora | languages | labels | distinct rows | rows drawn | hours drawn | weight |",
            "|---|---|---|---|---:|---:|---:|---:|",
        ]
        for s in self.sources:
            hours = "" if s.hours_drawn is None else f"{s.hours_drawn:.2f}"
            weight = "" if s.weight is None else f"{s.weight:g}"
            lines.append(
                f"| {s.source} | {', '.join(s.corpora)} | {', '.join(s.languages)} | {s.labels} | "
                f"{s.rows_distinct:,} | {s.rows_drawn:,} | {hours} | {weight} |"
            )
        return "\n".join(lines)


PROVENANCE_COLUMNS = ("source", "labels")


def with_provenance(dataset: Dataset, source: str, labels: str, language: str | None = None) -> Dataset:
    """``dataset`` in the manifest columns plus ``source`` and ``labels`` (where its rows and their transcripts come
    from: what the model card's training-data table is built from); rows without a language get ``language``."""
    return (
        dataset.select_columns(list(MANIFEST_FEATURES))
        .cast(MANIFEST_FEATURES)
        .map(
            lambda row: {"source": source, "labels": labels, "language": row["language"] or language},
            desc=f"provenance: {source}",
        )
    )


def mix(parts: list[Dataset], sources: list[TrainingSource], *, seed: int = 0, language: str | None = None) -> Dataset:
    """One training dataset from ``parts`` (the rows of each of ``sources``, in order), in the sources' shares when
    they have weights (see the module docstring), else concatenated; with provenance columns
    (`with_provenance`)."""
    if len(parts) != len(sources):
        raise ValueError(f"{len(parts)} datasets for {len(sources)} sources")
    weighted = [s.weight is not None for s in sources]
    if any(weighted) and not all(weighted):
        raise ValueError("give every source a weight, or none (--train_weights: one per manifest, or one for all)")
    for part, source in zip(parts, sources):
        if len(part) == 0:
            raise ValueError(f"{source.location}: no training rows (check its languages, corpora and limit)")
    tagged = [with_provenance(part, s.location, s.labels, language) for part, s in zip(parts, sources)]
    if len(tagged) == 1:
        return tagged[0]
    if not all(weighted):
        return concatenate_datasets(tagged)
    total = sum(s.weight for s in sources)
    return interleave_datasets(
        tagged, probabilities=[s.weight / total for s in sources], seed=seed, stopping_strategy="all_exhausted"
    )


def describe(dataset: Dataset, weights: dict[str, float] | None = None) -> MixtureReport:
    """Per source of ``dataset`` (rows with provenance columns): its corpora, languages, label origin, rows (distinct
    and drawn) and hours drawn. ``weights``: the sources' weights, to show beside them."""
    groups: dict[str, dict] = {}
    for row in dataset.select_columns(["id", "corpus", "language", "duration", *PROVENANCE_COLUMNS]):
        group = groups.setdefault(
            row["source"],
            {"corpora": set(), "languages": set(), "labels": set(), "ids": set(), "rows": 0, "hours": 0.0},
        )
        group["corpora"].add(row["corpus"] or "")
        group["languages"].add(row["language"] or "")
        group["labels"].add(row["labels"])
        group["ids"].add(row["id"])
        group["rows"] += 1
        group["hours"] = (
            None if group["hours"] is None or row["duration"] is None else group["hours"] + row["duration"] / 3600
        )
    report = MixtureReport(
        [
            SourceReport(
                source=name,
                corpora=sorted(c for c in g["corpora"] if c),
                languages=sorted(lang for lang in g["languages"] if lang),
                labels=", ".join(sorted(g["labels"])),
                rows_distinct=len(g["ids"]),
                rows_drawn=g["rows"],
                hours_drawn=g["hours"],
                weight=(weights or {}).get(name),
            )
            for name, g in groups.items()
        ]
    )
    return report
