"""``compression_report.json``: what a packed export really weighs, next to the paper's accounting.

Everything "as stored" is read back from the folder itself (file sizes, the safetensors header, the
``quantization_config`` in ``config.json``), so the report cannot flatter the checkpoint:

* ``files`` / ``total_bytes``: bytes on disk of every file (the report itself excluded);
  ``weights_bytes``: the ``model.safetensors`` file.
* ``components``: tensor bytes per component as stored (``encoder``, ``decoder``, ``embedding`` = the token
  embedding tied to ``proj_out``, ``other``), the safetensors header apart (``safetensors.header_bytes``).
  Packed layers count their ``weight_packed`` + ``weight_scale`` + ``weight_shape`` tensors.
* ``parameters``: logical parameter counts per component (a packed weight counts its ``weight_shape``
  elements; scales are not parameters), quantized vs float.
* ``paper_accounting``: the paper's size model, fp16 for everything except quantized weights, which count
  their packed codes (whole 32-bit words per row) plus 2 bytes per scale (`weight_bytes`): ``planned_bytes`` with the plan's bits
  (a planned-but-float embedding at its planned bits), ``as_stored_bytes`` with what the file holds,
  ``fp16_bytes`` for the same model entirely in fp16.
* ``teacher_fp16_bytes`` / ``teacher_fp32_bytes`` and ``ratio_to_teacher_fp16`` / ``_fp32`` (teacher bytes /
  ``weights_bytes``, a factor > 1 when smaller); ``ratios`` has them against all files and the paper's size.
* ``per_layer_bits`` per plan unit (``encoder.3``, ``decoder.0``, ``embedding``; 16 = float, a weighted mean
  when a unit mixes widths), ``modules`` per layer, ``embedding_quantized`` + ``embedding_reason``.
* ``dense_load``: ``config.json`` asks transformers to unpack every layer while loading (one-width exports, see
  :mod:`.compressed`): plain ``from_pretrained`` then gives a dense float32 model.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from torch import nn

from ..files import atomic_write_text
from ..quant import QuantSpec, quant_specs, weight_bytes
from ..quant.spec import as_spec
from ..selection import KDQPlan, fp16_bytes, group_units

REPORT_FILE = "compression_report.json"
WEIGHTS_FILE = "model.safetensors"
WRITER = "hf_whisper_kdq.export"
FORMAT = "compressed-tensors pack-quantized"
FLOAT_FORMAT = "safetensors float16 (nothing quantized)"
COMPONENTS = ("encoder", "decoder", "embedding", "other")
EMBEDDING_MODULES = ("model.decoder.embed_tokens", "proj_out")
EMBEDDING_REASON = (
    "transformers loads a packed token embedding only through its dense load path, which decodes every layer with "
    "one scheme: an embedding of another width than the packed linears, or in a file whose linears mix widths, is "
    "stored dequantized in fp16 (the tied proj_out and weight initialisation of the compressed path need a `weight`)"
)
_GRANULARITY = {"tensor": "per_tensor", "channel": "per_channel", "group": "per_group"}

Source = KDQPlan | nn.Module | Mapping | None


@dataclass(frozen=True)
class CompressionReport:
    """``compression_report.json`` of one export, typed (the module docstring says what each field holds).

    `save_compressed` returns the report it wrote, so that the export's callers (``compress``, the model card, the
    benchmarks) read it from here instead of from the file; `load` reads a folder written earlier.
    ``to_dict()`` is the JSON on disk, key for key.
    """

    folder: Path = field(metadata={"json": False})  # where the export lives; not written into the file
    writer: str
    report_version: int
    format: str
    total_bytes: int
    weights_bytes: int
    files: dict[str, int]
    files_note: str
    components: dict[str, int]
    safetensors: dict[str, int]
    parameters: dict[str, int]
    paper_accounting: dict[str, Any]
    paper_components: dict[str, dict[str, int]]
    teacher_fp16_bytes: int | None
    teacher_fp32_bytes: int | None
    ratio_to_teacher_fp16: float | None
    ratio_to_teacher_fp32: float | None
    ratios: dict[str, Any]
    per_layer_bits: dict[str, float]
    modules: dict[str, dict[str, Any]]
    embedding_quantized: bool
    embedding_planned_bits: int
    embedding_reason: str | None
    config_groups: dict[str, dict[str, Any]]
    ignore: list[str]
    dense_load: bool = False  # reports written before it existed: the compressed load path

    def to_dict(self) -> dict:
        """The report as ``compression_report.json`` holds it."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata.get("json", True)}

    @classmethod
    def from_dict(cls, report: Mapping, folder: str | os.PathLike) -> CompressionReport:
        return cls(folder=Path(folder), **report)

    @classmethod
    def load(cls, folder: str | os.PathLike) -> CompressionReport:
        """The report of the export in ``folder``."""
        return cls.from_dict(json.loads((Path(folder) / REPORT_FILE).read_text(encoding="utf-8")), folder)


def is_previous_export(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds a report written by this exporter."""
    try:
        report = json.loads((Path(folder) / REPORT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(report, dict) and report.get("writer") == WRITER


def component_of(key: str) -> str:
    """``encoder`` / ``decoder`` / ``embedding`` / ``other`` for a state-dict key of WhisperForConditionalGeneration."""
    if key.startswith(tuple(f"{m}." for m in EMBEDDING_MODULES)):
        return "embedding"
    for side in ("encoder", "decoder"):
        if key.startswith(f"model.{side}."):
            return side
    return "other"


def _safetensors_layout(path: Path) -> tuple[int, dict[str, tuple[list[int], int]]]:
    """Header bytes (length prefix included) and ``{key: (shape, stored bytes)}``, without reading the data."""
    with open(path, "rb") as file:
        (length,) = struct.unpack("<Q", file.read(8))
        header = json.loads(file.read(length))
    header.pop("__metadata__", None)
    tensors = {k: (list(v["shape"]), v["data_offsets"][1] - v["data_offsets"][0]) for k, v in header.items()}
    return 8 + length, tensors


def stored_specs(folder: Path, tensors: Mapping) -> tuple[dict[str, QuantSpec], dict[str, str], dict, list[str]]:
    """Spec and config group of every packed layer, from ``config.json``'s ``quantization_config``."""
    config = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("quantization_config") or {}
    groups = config.get("config_groups") or {}
    specs: dict[str, QuantSpec] = {}
    group_of: dict[str, str] = {}
    for key in tensors:
        if not key.endswith(".weight_packed"):
            continue
        layer = key[: -len(".weight_packed")]
        for group, scheme in groups.items():
            if any(t == layer or (t.startswith("re:") and re.match(t[3:], layer)) for t in scheme.get("targets", [])):
                weights = scheme["weights"]
                granularity = _GRANULARITY[weights["strategy"]]
                size = weights.get("group_size") if granularity == "per_group" else None
                specs[layer], group_of[layer] = QuantSpec(int(weights["num_bits"]), granularity, size), group
                break
        else:
            raise ValueError(f"{folder}: packed layer {layer} matches no config group by name")
    return specs, group_of, groups, list(config.get("ignore") or [])


def _planned_specs(source: Source) -> dict[str, QuantSpec | None] | None:
    if source is None:
        return None
    if isinstance(source, KDQPlan):
        return source.module_specs()
    if isinstance(source, nn.Module):
        specs = quant_specs(source)
        if not specs:
            raise ValueError("the model has no fake-quant wrappers: pass it before convert_qat, or pass its plan")
        return specs
    if isinstance(source, Mapping):
        return {name: as_spec(spec) for name, spec in source.items()}
    raise TypeError(
        f"expected a KDQPlan, a QAT-prepared model, a {{layer: spec}} mapping or None, got {type(source).__name__}"
    )


def _bits(spec: QuantSpec | None) -> int:
    return 16 if spec is None else spec.bits


def _ratios(teacher: int | None, size: int) -> dict[str, float | None]:
    if not teacher or not size:
        return {"fp16": None, "fp32": None}
    return {"fp16": round(teacher / size, 4), "fp32": round(2 * teacher / size, 4)}


def build_compression_report(
    output_dir: str | os.PathLike,
    source: Source = None,
    *,
    teacher: nn.Module | None = None,
    teacher_fp16_bytes: int | None = None,
) -> dict:
    """The size report of an export folder (see the module docstring for every key).

    Args:
        output_dir: a folder written by `save_compressed` (or any compressed-tensors Whisper folder whose
            ``targets`` name layers exactly or by ``re:`` pattern).
        source: the plan's specs: a `KDQPlan`, the QAT-prepared model (before `convert_qat`), a mapping
            layer → spec, or None (planned = as stored).
        teacher / teacher_fp16_bytes: the teacher model (its parameters count 2 bytes each) or its fp16 weight
            bytes, for the ratios; at most one.
    """
    folder = Path(output_dir)
    if teacher is not None and teacher_fp16_bytes is not None:
        raise ValueError("pass teacher or teacher_fp16_bytes, not both")
    if teacher is not None:
        teacher_fp16_bytes = fp16_bytes(teacher)
    planned = _planned_specs(source)
    weights_path = folder / WEIGHTS_FILE
    header_bytes, tensors = _safetensors_layout(weights_path)
    packed, group_of, groups, ignore = stored_specs(folder, tensors)
    quantization_config = (
        json.loads((folder / "config.json").read_text(encoding="utf-8")).get("quantization_config") or {}
    )
    shapes = {}
    if packed:
        from safetensors import safe_open

        with safe_open(str(weights_path), framework="pt") as file:
            shapes = {layer: [int(x) for x in file.get_tensor(f"{layer}.weight_shape").tolist()] for layer in packed}

    zero = dict.fromkeys(COMPONENTS, 0)
    stored, as_stored, paper, params = dict(zero), dict(zero), dict(zero), dict(zero)
    quantized_params = 0
    numel_of: dict[str, int] = {}
    for key, (shape, nbytes) in tensors.items():
        layer, _, leaf = key.rpartition(".")
        component = component_of(key)
        stored[component] += nbytes
        if layer in packed and leaf in ("weight_scale", "weight_shape"):
            continue  # scales are counted by weight_bytes, weight_shape only on disk
        if layer in packed and leaf == "weight_packed":
            shape = shapes[layer]
            spec = packed[layer]
            planned_spec = planned.get(layer, spec) if planned is not None else spec
            as_stored[component] += weight_bytes(shape, spec, layer=layer)
            paper[component] += weight_bytes(shape, planned_spec, layer=layer)
            quantized_params += math.prod(shape)
        else:
            planned_spec = planned.get(layer) if planned is not None and leaf == "weight" else None
            as_stored[component] += 2 * math.prod(shape)
            paper[component] += weight_bytes(shape, planned_spec, layer=layer)
        params[component] += math.prod(shape)
        if leaf in ("weight", "weight_packed"):
            numel_of[layer] = math.prod(shape)

    planned_of = planned if planned is not None else dict(packed)
    modules = {}
    for name in dict.fromkeys([*planned_of, *packed, *ignore]):
        spec = packed.get(name)
        intended = planned_of.get(name, spec)
        modules[name] = {
            "bits": _bits(spec),
            "planned_bits": _bits(intended),
            "granularity": None if spec is None else spec.granularity,
            "group_size": None if spec is None else spec.group_size,
            "stored": "pack-quantized" if spec is not None else "float16",
            "config_group": group_of.get(name),
        }
    per_layer_bits = {}
    for unit, names in group_units(list(modules)).items():
        widths = {modules[n]["bits"] for n in names}
        weighted = [(modules[n]["bits"], numel_of[n]) for n in names if n in numel_of]  # tied copies: no own tensor
        if len(widths) == 1 or not weighted:
            per_layer_bits[unit] = max(widths)
        else:  # mixed widths: mean bits per weight
            per_layer_bits[unit] = round(sum(b * n for b, n in weighted) / sum(n for _, n in weighted), 2)

    embedding_packed = any(m in packed for m in EMBEDDING_MODULES)
    embedding_plan = next((planned_of[m] for m in EMBEDDING_MODULES if planned_of.get(m) is not None), None)
    if embedding_packed:
        embedding_reason = None
    elif embedding_plan is not None:
        embedding_reason = EMBEDDING_REASON
    else:
        embedding_reason = "not quantized by the plan: kept in fp16"

    files = {}
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if path.is_file() and path.name != REPORT_FILE and not any(p.startswith(".") for p in relative.parts):
            files[relative.as_posix()] = path.stat().st_size
    total_bytes = sum(files.values())
    weights_bytes = files[WEIGHTS_FILE]
    planned_bytes, as_stored_bytes, total_params = sum(paper.values()), sum(as_stored.values()), sum(params.values())
    ratios = _ratios(teacher_fp16_bytes, weights_bytes)
    return {
        "writer": WRITER,
        "report_version": 1,
        "format": FORMAT if packed else FLOAT_FORMAT,
        "total_bytes": total_bytes,
        "weights_bytes": weights_bytes,
        "files": files,
        "files_note": f"bytes on disk; {REPORT_FILE} itself excluded",
        "components": stored,
        "safetensors": {"header_bytes": header_bytes, "tensor_bytes": sum(stored.values())},
        "parameters": {
            **params,
            "total": total_params,
            "quantized": quantized_params,
            "float": total_params - quantized_params,
        },
        "paper_accounting": {
            "planned_bytes": planned_bytes,
            "as_stored_bytes": as_stored_bytes,
            "fp16_bytes": 2 * total_params,
            "note": "fp16 for everything except quantized weights: each row's codes in whole 32-bit words "
            "(rows * ceil(cols * bits / 32) * 4) + 2 bytes per scale; "
            "tied weights once; planned = the plan's bits, as stored = what the file holds",
        },
        "paper_components": {"planned": paper, "as_stored": as_stored},
        "teacher_fp16_bytes": teacher_fp16_bytes,
        "teacher_fp32_bytes": None if teacher_fp16_bytes is None else 2 * teacher_fp16_bytes,
        "ratio_to_teacher_fp16": ratios["fp16"],
        "ratio_to_teacher_fp32": ratios["fp32"],
        "ratios": {
            "basis": "teacher bytes / these bytes (weights file, all files, the paper's planned size)",
            "weights_file": ratios,
            "all_files": _ratios(teacher_fp16_bytes, total_bytes),
            "paper_planned": _ratios(teacher_fp16_bytes, planned_bytes),
        },
        "per_layer_bits": per_layer_bits,
        "modules": modules,
        "embedding_quantized": embedding_packed,
        "embedding_planned_bits": _bits(embedding_plan),
        "embedding_reason": embedding_reason,
        "config_groups": {
            name: {
                "num_bits": g["weights"]["num_bits"],
                "strategy": g["weights"]["strategy"],
                "group_size": g["weights"].get("group_size"),
                "layers": len(g.get("targets", [])),
            }
            for name, g in groups.items()
        },
        "ignore": ignore,
        "dense_load": bool(quantization_config.get("dequantize")),
    }


def write_compression_report(output_dir: str | os.PathLike, report: dict) -> Path:
    """Write ``report`` as ``compression_report.json`` in ``output_dir`` (atomically: it marks a finished export)."""
    return atomic_write_text(Path(output_dir) / REPORT_FILE, json.dumps(report, indent=2) + "\n")


__all__ = [
    "EMBEDDING_REASON",
    "CompressionReport",
    "REPORT_FILE",
    "WEIGHTS_FILE",
    "build_compression_report",
    "component_of",
    "is_previous_export",
    "write_compression_report",
]
