"""Multi-process training: 2 processes × batch 2 (torchrun, gloo on CPU) against 1 process × batch 4."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parent / "scripts" / "ddp_train.py"


def _run(command: list[str], cwd: Path) -> None:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    _run([sys.executable, str(SCRIPT), str(tmp_path / "one"), "4"], tmp_path)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    _run([*torchrun, str(SCRIPT), str(tmp_path / "two"), "2"], tmp_path)
    one, two = (torch.load(tmp_path / name / "result.pt") for name in ("one", "two"))

    assert one["plan"] == two["plan"]  # the selection is deterministic: every rank holds the same plan
    assert len(one["losses"]) == 4
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-5)
    # Gradient norms (before clipping) check the loss normalization across processes: Adam would hide a wrong scale.
    assert two["grad_norms"] == pytest.approx(one["grad_norms"], rel=1e-4)
    for name, weight in one["weights"].items():
        # Learnable clipping ratios get tiny LSQ gradients, which Adam normalizes to full-size steps, so summation
        # order differences between 1 and 2 processes show there (observed ≤ 1.5e-3 after 4 steps at lr 1e-3) and,
        # through the quantization grid they move, in the quantized weights (observed ≤ 2.5e-4); float weights agree
        # to rounding.
        tolerance = 5e-3 if name.endswith("weight_clip") else 1e-3
        torch.testing.assert_close(two["weights"][name], weight, atol=tolerance, rtol=0)
