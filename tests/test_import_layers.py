"""The package's modules import each other in one direction: no cycle, and no import from a lower layer to a higher
one. Read from the source (every ``import`` statement, function-local ones too), nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hf_whisper_kdq"

# Lowest first. A module may import from its own layer and the layers below it. Keys are the first name under
# hf_whisper_kdq ("quant" covers hf_whisper_kdq.quant.*); "" is the package's __init__.
LAYERS = (
    ("files, optional imports and quantization", {"files", "optional", "quant"}),
    ("inputs and settings", {"sources", "audio", "students", "losses", "hub", "config"}),
    ("data and measures", {"data", "mixture", "scoring", "synthesis", "adapters", "output_cache"}),
    ("planning and evaluation", {"selection", "calibration", "evaluation", "evaluation_ctranslate2", "labelling"}),
    (
        "training parts and exports",
        {
            "forwards",
            "callbacks",
            "sharding",
            "figures",
            "card",
            "card_scores",
            "export",
            "evaluation_onnx",
            "ggml_budget",
            "peft_students",
        },
    ),
    ("trainer", {"trainer"}),
    ("pipeline", {"compress"}),
    ("command line", {"cli"}),
    ("public API", {""}),
)


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(root: Path = PACKAGE) -> dict[str, set[str]]:
    """Module → the package's modules it imports anywhere in its source (``from .x import y`` names module
    ``x.y`` when that is a module, else ``x``)."""
    modules = {_module_name(path, root): path for path in root.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                found |= {f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source for a in node.names}
            elif isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
        graph[name] = {target for target in found if target in modules and target != name}
    return graph


def _layer(module: str) -> int:
    key = module.split(".")[1] if "." in module else ""
    for index, (_, members) in enumerate(LAYERS):
        if key in members:
            return index
    raise AssertionError(f"{module} is in no layer: add it to LAYERS in {Path(__file__).name}")


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of ``graph``: one path per strongly connected component of more than one module."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle():
    assert _cycles(_imports()) == []


def test_no_import_from_a_higher_layer():
    upward = [
        f"{module} ({LAYERS[_layer(module)][0]}) imports {target} ({LAYERS[_layer(target)][0]})"
        for module, targets in sorted(_imports().items())
        for target in sorted(targets)
        if _layer(target) > _layer(module)
    ]
    assert upward == []


@pytest.mark.parametrize(
    ("edges", "expected"),
    [({"a": {"b"}, "b": {"c"}, "c": {"a"}}, [["a", "b", "c"]]), ({"a": {"b"}, "b": set(), "c": {"a"}}, [])],
)
def test_cycles_are_found(edges, expected):
    assert _cycles(edges) == expected


def test_function_local_and_relative_imports_are_read(tmp_path):
    package = tmp_path / "hf_whisper_kdq"
    (package / "export").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "trainer.py").write_text("def save():\n    from .export import compressed\n")
    (package / "export" / "__init__.py").write_text("")
    (package / "export" / "compressed.py").write_text("from ..trainer import ADAPTERS\n")
    graph = _imports(package)
    assert graph["hf_whisper_kdq.trainer"] == {"hf_whisper_kdq.export.compressed"}
    assert graph["hf_whisper_kdq.export.compressed"] == {"hf_whisper_kdq.trainer"}
    assert _cycles(graph) == [["hf_whisper_kdq.export.compressed", "hf_whisper_kdq.trainer"]]
