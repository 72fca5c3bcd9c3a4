"""The package's import surface (hf_whisper_kdq/__init__.py): every public name, imported from its module on first
use, so that the command line starts without torch and transformers."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import hf_whisper_kdq
from hf_whisper_kdq.trainer import DistillQuantTrainer as TrainerFromItsModule


def test_importing_the_cli_loads_neither_torch_nor_transformers_and_the_api_still_imports():
    # The command's loaders import a command's modules only when it runs: worth nothing if the package did it first.
    script = "import sys, hf_whisper_kdq.cli; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
    from hf_whisper_kdq import DistillQuantTrainer

    assert DistillQuantTrainer is TrainerFromItsModule


def test_each_public_name_comes_from_the_module_type_checkers_are_shown():
    """The ``if TYPE_CHECKING:`` imports (what IDEs read) and the lazy table name the same objects."""
    tree = ast.parse(Path(hf_whisper_kdq.__file__).read_text())
    block = next(node for node in tree.body if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING")
    shown = {alias.name: "." + node.module for node in block.body for alias in node.names}
    assert shown == hf_whisper_kdq._HOMES and sorted(hf_whisper_kdq.__all__) == sorted(shown)
    for name, home in shown.items():
        assert getattr(hf_whisper_kdq, name) is getattr(importlib.import_module(home, "hf_whisper_kdq"), name), name
    assert set(hf_whisper_kdq.__all__) <= set(dir(hf_whisper_kdq))
    with pytest.raises(AttributeError, match="has no attribute 'DistillQuantTrainr'"):
        hf_whisper_kdq.DistillQuantTrainr  # noqa: B018


def test_subpackages_are_attributes_of_the_package_as_before_it_was_lazy():
    script = (
        "import hf_whisper_kdq as h; print(h.quant.QuantSpec.__name__, h.export.save_compressed.__name__)\n"
        "try:\n    h.no_such_module\nexcept AttributeError:\n    print('refused')"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["QuantSpec", "save_compressed", "refused"]
