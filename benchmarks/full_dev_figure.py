"""The README's figure of the full-dev-set results: LJSpeech WER and AISHELL CER against bytes on disk.

    python benchmarks/full_dev_figure.py                       # full_dev_results.json -> docs/full_dev_error_vs_bytes.png

``full_dev_results.json`` is the README's "Full dev set" table in machine-readable form: one entry per model with
its bytes on disk, its error rates on the 254 LJSpeech + 380 AISHELL rows of ``dev.jsonl`` and the command (or run)
that measured them. Rows of several seeds are separate entries of one method, drawn as separate points, unlabelled
(a dozen rows share 43.76 MB: their labels would cover each other; the legend names the methods).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from hf_whisper_kdq.figures import plot_size_vs_error

HERE = Path(__file__).resolve().parent
PANELS = (("wer_ljspeech", "wer", "LJSpeech WER"), ("cer_aishell", "cer", "AISHELL CER"))


def references(entries: list[dict]) -> dict[str, tuple[str, float]]:
    """The teacher's error rate in each panel (a dashed line: its size would stretch the size axis fourfold)."""
    teacher = next(entry for entry in entries if entry["method"] == "teacher")
    return {panel: (f"teacher ({teacher['label']})", teacher[column]) for column, _, panel in PANELS}


def points(entries: list[dict]) -> list[dict]:
    return [
        {
            "method": entry["method"],
            "size_bytes": entry["bytes_on_disk"],
            "error_rate": entry[column],
            "metric": metric,
            "panel": panel,
        }
        for column, metric, panel in PANELS
        for entry in entries
        if entry.get(column) is not None and not entry["method"].startswith("teacher")
    ]


def main(argv: list[str] | None = None) -> Path:
    argv = sys.argv[1:] if argv is None else argv
    source = Path(argv[0]) if argv else HERE / "full_dev_results.json"
    output = Path(argv[1]) if len(argv) > 1 else HERE.parent / "docs" / "full_dev_error_vs_bytes.png"
    entries = json.loads(source.read_text(encoding="utf-8"))["rows"]
    path = plot_size_vs_error(
        points(entries),
        output,
        title="full dev set: error rate vs bytes on disk (whisper-base teacher: 145.2 MB)",
        log_error=True,
        references=references(entries),
    )
    print(f"figure written to {path}")
    return path


if __name__ == "__main__":
    main()
