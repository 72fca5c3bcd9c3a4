"""The figures: the plan and error rate against size on disk, as small PNGs."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from test_card import make_plan

from hf_whisper_kdq.figures import LEGEND_BESIDE_AT_MOST, plot_plan, plot_size_vs_error


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_figures_are_small_pngs(tmp_path):
    width, height = png_size(plot_plan(make_plan(), tmp_path / "plan.png"))
    assert 400 < width < 2000 and 200 < height < 1000
    assert (tmp_path / "plan.png").stat().st_size < 200_000
    rows = [
        {"method": "Whisper-KDQ", "size_mb": 46.5, "error_rate": 0.071},
        {"method": "whisper-base", "size_bytes": 145e6, "wer": 0.083},
        {"method": "teacher", "size_mb": 483, "error_rate": 5.1, "percent": True},
    ]
    png_size(plot_size_vs_error(rows, tmp_path / "sub" / "size.png", title="LibriSpeech"))
    assert (tmp_path / "sub" / "size.png").stat().st_size < 200_000
    # several rows of one method make one curve; labels name the points; a log axis for collapsed models
    curve = [
        {"method": "naive PTQ", "label": f"int{b}", "size_mb": s, "error_rate": e}
        for b, s, e in ((8, 101.3, 0.178), (4, 81.9, 0.203), (3, 76.4, 2.541))
    ]
    png_size(plot_size_vs_error(rows + curve, tmp_path / "curves.png", log_error=True))


def test_size_vs_error_draws_one_panel_per_language_with_one_colour_per_method(tmp_path):
    rows = [
        {"method": method, "panel": panel, "size_mb": size, "error_rate": error, "metric": metric}
        for panel, metric in (("LJSpeech WER", "wer"), ("AISHELL CER", "cer"))
        for method, size, error in (("teacher", 145.2, 0.13), ("KDQ", 34.9, 0.2), ("RTN", 34.9, 0.9))
    ]
    one = png_size(plot_size_vs_error(rows[:3], tmp_path / "one.png"))
    two = png_size(plot_size_vs_error(rows, tmp_path / "two.png", title="both languages", log_error=True))
    assert two[0] > one[0] and two[1] == one[1]  # side by side


def test_size_vs_error_draws_a_reference_line_per_panel(tmp_path, monkeypatch):
    import matplotlib.axes

    lines = []
    draw = matplotlib.axes.Axes.axhline
    monkeypatch.setattr(
        matplotlib.axes.Axes, "axhline", lambda ax, y, **kw: lines.append((y, kw["label"])) or draw(ax, y, **kw)
    )
    rows = [{"method": "KDQ", "panel": p, "size_mb": 34.9, "error_rate": 0.2} for p in ("LJSpeech WER", "AISHELL CER")]
    references = {"LJSpeech WER": ("teacher", 0.132), "AISHELL CER": ("teacher", 0.158)}
    png_size(plot_size_vs_error(rows, tmp_path / "ref.png", references=references))
    assert sorted(lines) == [(pytest.approx(13.2), "teacher"), (pytest.approx(15.8), "teacher")]


def test_a_long_legend_goes_below_the_panels_on_added_height(tmp_path):
    rows = [
        {"method": f"method {i}", "panel": panel, "size_mb": 30.0 + i, "error_rate": 0.1 + i / 100}
        for i in range(LEGEND_BESIDE_AT_MOST + 3)
        for panel in ("LJSpeech WER", "AISHELL CER")
    ]
    beside = png_size(plot_size_vs_error(rows[: 2 * LEGEND_BESIDE_AT_MOST], tmp_path / "beside.png", title="t"))
    below = png_size(plot_size_vs_error(rows, tmp_path / "below.png", title="t"))
    assert below[0] == beside[0] and below[1] > beside[1]
