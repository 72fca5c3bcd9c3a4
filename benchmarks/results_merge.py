"""The merge of ``results_table.py``: every row JSON under an output folder into ``results.md``, ``results.json`` and
the figure ``wer_vs_bytes.png`` (both languages' error rates against bytes on disk)."""

from __future__ import annotations

import datetime as dt
import json
import logging
from pathlib import Path

from results_rows import ROWS

logger = logging.getLogger("results_table")

COLUMNS = [
    "model",
    "bytes on disk",
    "ratio to teacher fp16",
    "paper accounting ratio",
    "WER LJSpeech",
    "CER AISHELL",
    "CPU real-time factor (transformers)",
    "CT2 int8 RTF",
]


def _corpus(scores_: dict, prefix: str) -> float | None:
    entry = next((e for corpus, e in scores_.items() if corpus.lower().startswith(prefix)), None)
    return None if entry is None else entry.get("error_rate")


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def _num(value, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _mb(value: int | None) -> str:
    return "—" if value is None else f"{value / 1e6:.2f} MB"


def load_rows(output: Path) -> list[dict]:
    rows = [json.loads(path.read_text(encoding="utf-8")) for path in sorted((output / "rows").glob("*.json"))]
    order = {name: i for i, name in enumerate(ROWS)}
    return sorted(rows, key=lambda r: (order.get(r["row"], len(order)), r["row"]))


def table_rows(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        sizes, evaluation, ct2, ggml = r["sizes"], r["evaluation"], r.get("ct2") or {}, r.get("ggml") or {}
        ct2_scores, ggml_scores = ct2.get("scores") or {}, ggml.get("scores") or {}
        out.append(
            {
                "row": r["row"],
                "method": r["method"],
                "bytes_on_disk": sizes["bytes_on_disk"],
                "ratio_to_teacher_fp16": sizes["ratio_to_teacher_fp16"],
                "paper_bytes": sizes["paper_bytes"],
                "paper_ratio": sizes["paper_ratio"],
                "wer_ljspeech": _corpus(evaluation["scores"], "ljspeech"),
                "cer_aishell": _corpus(evaluation["scores"], "aishell"),
                "rtf_transformers": evaluation["rtf"],
                "rtf_ct2_int8": ct2.get("rtf"),
                "ct2_bytes_on_disk": ct2.get("bytes_on_disk"),
                "ct2_wer_ljspeech": _corpus(ct2_scores, "ljspeech"),
                "ct2_cer_aishell": _corpus(ct2_scores, "aishell"),
                "ggml_ftype": ggml.get("ftype"),
                "ggml_bytes_on_disk": ggml.get("bytes_on_disk"),
                "rtf_whisper_cpp": ggml.get("rtf"),
                "ggml_wer_ljspeech": _corpus(ggml_scores, "ljspeech"),
                "ggml_cer_aishell": _corpus(ggml_scores, "aishell"),
                "n_utterances": {c: e["n_utterances"] for c, e in evaluation["scores"].items()},
                "english_only": evaluation["english_only"],
                "smoke": r.get("smoke"),
                "date": r["date"],
            }
        )
    return out


def _row_note(r: dict, t: dict) -> str:
    n = ", ".join(f"{count} {corpus}" for corpus, count in t["n_utterances"].items())
    note = f"- `{t['row']}` ({t['method']}): {r['description']}; eval {n}"
    if r.get("training"):
        tr = r["training"]
        note += f"; trained {tr['train_steps']} steps × batch {tr['batch_size']} on {tr['rows']} rows {tr['corpora']}"
        if tr.get("arguments", {}).get("bf16"):
            note += " in bf16"
    sizes = r["sizes"]
    if sizes.get("planned_bits"):
        on_disk = "quantized" if sizes.get("embedding_quantized_on_disk") else "fp16"
        note += (
            f"; planned bits {sizes['planned_bits']} (16 = float), embedding planned "
            f"{sizes.get('embedding_planned_bits')} bits, on disk {on_disk}"
        )
    machine = r["machine"]
    note += (
        f"; {r['date']}, {machine['cpu_count']} CPUs, {machine['torch_threads']} threads, load "
        f"{machine.get('load_average_before')}"
    )
    return note + (" **(smoke: small subset / short training)**" if t["smoke"] else "")


def markdown(rows: list[dict]) -> str:
    summary = table_rows(rows)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|---|" + "---:|" * (len(COLUMNS) - 1)]
    for t in summary:
        mark = " ¹" if t["english_only"] else ""
        lines.append(
            f"| {t['row']} | {t['bytes_on_disk'] / 1e6:.1f} MB | {t['ratio_to_teacher_fp16']:.2f}× | "
            f"{t['paper_ratio']:.2f}× | {_pct(t['wer_ljspeech'])} | {_pct(t['cer_aishell'])} | "
            f"{_num(t['rtf_transformers'])}{mark} | {_num(t['rtf_ct2_int8'])}{mark} |"
        )
    if any(t["english_only"] for t in summary):
        lines += ["", "¹ English-only model: evaluated (and timed) on LJSpeech only."]
    if any(t["ct2_bytes_on_disk"] for t in summary):
        lines += [
            "",
            "CTranslate2 int8 exports (faster-whisper, one utterance at a time):",
            "",
            "| model | CT2 int8 bytes on disk | WER LJSpeech | CER AISHELL |",
            "|---|---:|---:|---:|",
        ]
        lines += [
            f"| {t['row']} | {t['ct2_bytes_on_disk'] / 1e6:.1f} MB | {_pct(t['ct2_wer_ljspeech'])} | "
            f"{_pct(t['ct2_cer_aishell'])} |"
            for t in summary
            if t["ct2_bytes_on_disk"]
        ]
    if any(t["ggml_bytes_on_disk"] for t in summary):
        lines += [
            "",
            "Bytes on disk per format, and CPU real-time factor of each runtime on the same utterances and threads "
            "(whisper.cpp and faster-whisper one utterance at a time):",
            "",
            "| model | HF folder | whisper.cpp file | CT2 int8 | WER LJSpeech (whisper.cpp) | CER AISHELL (whisper.cpp) "
            "| RTF transformers | RTF whisper.cpp | RTF CT2 int8 |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {t['row']} | {t['bytes_on_disk'] / 1e6:.2f} MB | {t['ggml_bytes_on_disk'] / 1e6:.2f} MB "
            f"({t['ggml_ftype']}) | {_mb(t['ct2_bytes_on_disk'])} | {_pct(t['ggml_wer_ljspeech'])} | "
            f"{_pct(t['ggml_cer_aishell'])} | {_num(t['rtf_transformers'])} | {_num(t['rtf_whisper_cpp'])} | "
            f"{_num(t['rtf_ct2_int8'])} |"
            for t in summary
            if t["ggml_bytes_on_disk"]
        ]
    lines += ["", "Rows:", ""] + [_row_note(r, t) for r, t in zip(rows, summary)]
    limits = {r.get("eval_limit_per_corpus") for r in rows}
    if len(limits) > 1:
        lines += [
            "",
            f"WARNING: rows were evaluated on different subsets (eval_limit per corpus: "
            f"{sorted(limits, key=str)}): their error rates are not directly comparable.",
        ]
    return "\n".join(lines)


def figure(rows: list[dict], path: Path) -> Path | None:
    from hf_whisper_kdq.figures import plot_size_vs_error

    # GPU rows are scored on the whole dev set, CPU rows often on a subset: separate curves.
    points = [
        {
            "method": t["method"] + (" (GPU, full dev set)" if t["row"].endswith("-gpu") else ""),
            "label": t["row"].removesuffix("-gpu"),
            "size_bytes": t["bytes_on_disk"],
            "error_rate": t[column],
            "metric": metric,
            "panel": panel,
        }
        for column, metric, panel in (("wer_ljspeech", "wer", "LJSpeech WER"), ("cer_aishell", "cer", "AISHELL CER"))
        for t in table_rows(rows)
        if t[column] is not None
    ]
    if not points:
        return None
    return plot_size_vs_error(points, path, title="error rate vs bytes on disk (whisper-base teacher)", log_error=True)


def merge(output: Path) -> str | None:
    rows = load_rows(output)
    if not rows:
        print(f"no row results under {output / 'rows'}: compute some with --rows")
        return None
    text = markdown(rows)
    (output / "results.md").write_text(text + "\n", encoding="utf-8")
    merged = {
        "merged_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "columns": COLUMNS,
        "table": table_rows(rows),
        "rows": rows,
    }
    (output / "results.json").write_text(
        json.dumps(merged, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8"
    )
    try:
        picture = figure(rows, output / "wer_vs_bytes.png")
    except Exception as error:  # matplotlib missing: the table still stands
        picture = None
        logger.warning("figure not written: %s", error)
    print(text)
    print(f"\nwritten: {output / 'results.md'}, {output / 'results.json'}" + (f", {picture}" if picture else ""))
    return text
