"""Tests for hf_whisper_kdq.files: a folder is replaced whole, and a failed replacement keeps the previous one."""

from __future__ import annotations

from pathlib import Path

import pytest

from hf_whisper_kdq.files import COMPLETE_MARKER, atomic_folder, replace_folder


def _folder(path: Path, text: str) -> Path:
    path.mkdir()
    (path / "weights").write_text(text)
    return path


def test_replace_folder_swaps_in_the_new_folder_and_drops_the_old(tmp_path):
    output = _folder(tmp_path / "out", "old")
    replace_folder(_folder(tmp_path / ".out.staging", "new"), output)
    assert (output / "weights").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_replace_folder_restores_the_previous_folder_when_the_new_one_cannot_move_in(tmp_path):
    output = _folder(tmp_path / "out", "old")
    with pytest.raises(FileNotFoundError):
        replace_folder(tmp_path / ".out.staging", output)  # e.g. removed by another process meanwhile
    assert (output / "weights").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_folder_keeps_the_previous_folder_when_the_swap_fails(tmp_path, monkeypatch):
    output = tmp_path / "out"
    with atomic_folder(output) as staging:
        (staging / "weights").write_text("old")
    rename = Path.rename

    def failing_rename(self, target):
        if Path(target) == output and self.name != ".out.old":  # the new folder moving in; the restore works
            raise OSError("no space left on device")
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", failing_rename)
    with pytest.raises(OSError, match="no space left"), atomic_folder(output) as staging:
        (staging / "weights").write_text("new")
    assert (output / "weights").read_text() == "old" and (output / COMPLETE_MARKER).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # neither staging nor backup left behind
