"""Figures of the model card and the benchmarks: the KDQ plan (bits, losses, distilled layers per unit) and error
rate against size on disk, one curve per method. PNGs drawn on an Agg canvas of their own (no pyplot: the caller's
backend and global state stay untouched), written atomically, every label passed through :func:`hub.public` (no
token or local path reaches a published figure).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from .files import atomic_file
from .hub import public
from .quant import FLOAT_BITS
from .selection import KDQPlan

# Methods a size-vs-error legend lists beside its panels; more go below them, two to a row of this height.
LEGEND_BESIDE_AT_MOST = 10
LEGEND_ROW_INCHES = 0.16


def _figure(width: float, height: float):
    # An Agg canvas of our own: no pyplot, so the caller's backend and global state stay untouched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    return FigureCanvasAgg(Figure(figsize=(width, height), dpi=100)).figure


def _save(figure, path: str | Path, top: float = 1.0, bottom: float = 0.0) -> Path:
    figure.tight_layout(rect=(0, bottom, 1, top))
    with atomic_file(path) as temporary:
        figure.savefig(temporary, format="png", dpi=100, metadata={"Software": None})
    return Path(path)


def plot_plan(plan: KDQPlan | Mapping | str | Path, path: str | Path) -> Path:
    """PNG of the plan: bits per unit as bars (hatched: kept in fp16), ``q_l`` at the assigned bits and ``d_l``
    as lines on a second, logarithmic axis, stars above distilled layers. Typically 30–60 KB."""
    plan = KDQPlan.coerce(plan)
    units = plan.units
    x = list(range(len(units)))
    bits = [u.bits for u in units]
    figure = _figure(max(6.0, 0.42 * len(units) + 2.5), 3.8)
    ax = figure.add_subplot()
    colors = {"encoder": "#4C72B0", "decoder": "#DD8452", "embedding": "#55A868"}
    bars = ax.bar(x, bits, color=[colors.get(u.side, "#8C8C8C") for u in units], alpha=0.75, width=0.7)
    for bar, unit in zip(bars, units):
        if unit.bits >= FLOAT_BITS:  # kept in float
            bar.set(hatch="//", alpha=0.35)
        if unit.distilled:
            bar.set(edgecolor="black", linewidth=1.5)
    if marked := [(i, u.bits) for i, u in zip(x, units) if u.distilled]:
        ax.plot(
            [i for i, _ in marked],
            [b + 1.0 for _, b in marked],
            linestyle="none",
            marker="*",
            markersize=13,
            color="gold",
            markeredgecolor="black",
            label="distilled",
            zorder=5,
        )
    ax.set_ylim(0, FLOAT_BITS + 3)
    ax.set_yticks(sorted({2, 4, 8, FLOAT_BITS, *bits}))
    ax.set_ylabel("bits (16 = fp16)")
    ax.set_xticks(x, [u.name for u in units], rotation=60, ha="right", fontsize=8)
    ax.set_xlim(-0.6, len(units) - 0.4)
    second = ax.twinx()
    q = [v if (v := u.quant_loss.get(u.bits) or 0) > 0 else math.nan for u in units]  # log axis: no zeros
    d = [v if (v := u.distill_loss or 0) > 0 else math.nan for u in units]
    second.plot(x, q, marker="o", color="#C44E52", label="q_l at assigned bits")
    second.plot(x, d, marker="s", linestyle="--", color="#8172B3", label="d_l (vs matched teacher layer)")
    if any(not math.isnan(v) for v in q + d):
        second.set_yscale("log")
    second.set_ylabel("relative error (log)")
    handles = [h for axis in (ax, second) for h in axis.get_legend_handles_labels()[0]]
    figure.legend(handles=handles, loc="upper center", fontsize=7, ncol=3, frameon=False)
    return _save(figure, path, top=0.93)


def plot_size_vs_error(
    rows: Sequence[Mapping],
    path: str | Path,
    *,
    title: str | None = None,
    log_error: bool = False,
    references: Mapping[str, tuple[str, float]] | None = None,
) -> Path:
    """Size (MB) against error rate (%): one curve per method (its points joined in size order), for benchmark
    write-ups.

    ``rows``: dicts with ``method``, ``size_mb`` or ``size_bytes``, and ``error_rate`` (fraction; or ``wer``/``cer``;
    ``"percent": True`` for percentages), optional ``metric``, ``label`` (written beside the point) and ``panel``
    (rows of each panel, e.g. each language, get their own plot, side by side, one method one colour in all).
    ``log_error``: a logarithmic error axis, for rows from near the teacher to collapsed models. ``references``:
    panel → ``(label, error rate)`` drawn as a dashed line across it (e.g. the teacher, whose size would otherwise
    stretch the size axis far from the compressed rows)."""
    panels: dict[str, list[Mapping]] = {}
    for row in rows:
        panels.setdefault(str(row.get("panel") or ""), []).append(row)
    figure = _figure(8.5 if len(panels) == 1 else 4.6 * len(panels) + 2.4, 4.2)
    colours: dict[str, int] = {}
    for index, (panel, panel_rows) in enumerate(panels.items()):
        ax = figure.add_subplot(1, len(panels), index + 1)
        _size_error_curves(ax, panel_rows, colours, log_error)
        if references and panel in references:
            label, rate = references[panel]
            ax.axhline(100 * rate, color="0.4", linestyle="--", linewidth=1, label=public(label), zorder=1)
        if panel:
            ax.set_title(public(panel), fontsize=9)
    handles = {label: handle for ax in figure.axes for handle, label in zip(*ax.get_legend_handles_labels())}
    bottom = 0.0
    if len(handles) <= LEGEND_BESIDE_AT_MOST:
        figure.axes[-1].legend(
            handles.values(), handles.keys(), fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False
        )  # beside: no point hidden
    else:
        # A long legend beside the panels would squeeze them into a corner: below them, in two columns, on
        # height added for it.
        width, height = figure.get_size_inches()
        legend_height = LEGEND_ROW_INCHES * math.ceil(len(handles) / 2) + 0.1
        figure.set_size_inches(width, height + legend_height)
        bottom = legend_height / (height + legend_height)
        figure.legend(handles.values(), handles.keys(), fontsize=7, loc="lower left", ncol=2, frameon=False)
    if title:
        figure.suptitle(public(title), fontsize=10)
    return _save(figure, path, top=1 - 0.3 / figure.get_size_inches()[1] if title else 1.0, bottom=bottom)


def _size_error_curves(ax, rows: Sequence[Mapping], colours: dict[str, int], log_error: bool) -> None:
    metrics, curves = set(), {}
    for i, row in enumerate(rows):
        size = float(row["size_mb"]) if row.get("size_mb") is not None else float(row["size_bytes"]) / 1e6
        metric = str(row.get("metric") or ("cer" if "cer" in row else "wer")).lower()
        value = float(row.get("error_rate", row.get(metric))) * (1 if row.get("percent") else 100)
        metrics.add(metric.upper())
        curves.setdefault(public(row.get("method", f"model {i}")), []).append((size, value, row.get("label")))
    markers = "osD^vP*X"
    for method, points in curves.items():
        i = colours.setdefault(method, len(colours))
        points.sort(key=lambda point: point[0])
        ax.plot(
            [p[0] for p in points],
            [p[1] for p in points],
            marker=markers[i % len(markers)],
            color=f"C{i % 10}",
            label=method,
            zorder=3,
        )
        for size, value, label in points:
            if label:
                ax.annotate(
                    public(label),
                    (size, value),
                    textcoords="offset points",
                    xytext=(4, 3),
                    fontsize=6,
                    color=f"C{i % 10}",
                )
    if log_error:
        from matplotlib.ticker import FuncFormatter

        ax.set_yscale("log")
        plain = FuncFormatter(lambda value, _: f"{value:g}")  # 20 and 60, not 2×10¹ and 6×10¹
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
    ax.set_xlabel("size on disk (MB)")
    ax.set_ylabel(f"{'/'.join(sorted(metrics)) or 'WER'} (%)")
    ax.grid(True, alpha=0.3, which="both")
    ax.margins(0.12)
