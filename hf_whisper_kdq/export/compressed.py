"""Packed integer checkpoint of a QAT student in the compressed-tensors ``pack-quantized`` format.

``save_compressed(student, processor, "out/")`` writes a folder that plain transformers loads, with
compressed-tensors installed and without this package::

    model = WhisperForConditionalGeneration.from_pretrained("out/")

How it loads depends on the bit widths (transformers 5, compressed-tensors 0.20):

* **One integer width** (every packed linear at the same bits, strategy and group size, the usual case of a
  uniform plan or of post-training quantization): ``config.json`` declares ``"dequantize": true`` and float32, so
  the plain call above unpacks every layer while loading and gives a dense float32 model on which the usual
  ``model.generate(processor(audio, return_tensors="pt").input_features, language=...)`` runs. A quantized token
  embedding of that same width is stored packed too, once (``proj_out`` is tied to it again on load); one of
  another width (e.g. int8 beside int4 linears) is stored dequantized in fp16. That path multiplies codes
  and scales in fp16 (the scales' dtype), so loaded weights are the fake-quantized ones rounded to fp16.
* **Mixed widths** (a guided plan): that dense load path decodes every layer with the first config group's scheme
  (``get_dense_scheme`` in transformers' compressed-tensors integration), which would be wrong, so the file takes
  the compressed path: it loads in float16, and compressed-tensors unpacks the integer weights in a hook on the
  model's first *top-level* forward, which ``generate(language=...)`` bypasses (it calls the encoder directly) and
  then fails with "'Linear' object has no attribute 'weight'". Unpack first with
  ``model.hf_quantizer.compressor.decompress_model(model)``, as the model card's snippet does, and give features
  of ``model.dtype``. That path cannot load a packed ``nn.Embedding``: the embedding is stored dequantized in fp16.

What is written:

* ``model.safetensors``: every quantized linear as ``weight_packed`` (int32, codes densely bit-packed by
  compressed-tensors' own ``PackedQuantizationCompressor``), ``weight_scale`` (fp16, our scales) and
  ``weight_shape``; every other tensor in fp16.
* ``config.json`` with ``quantization_config`` (``quant_method: compressed-tensors``, ``format: pack-quantized``,
  status ``compressed``): one config group per (bits, strategy, group size), whose ``targets`` are the exact
  module names, and ``ignore`` listing the linears kept in float.
* generation config, tokenizer, processor and preprocessor configs, ``kdq_plan.json`` when a plan is given,
  and ``compression_report.json`` (see :mod:`.report`).

**Exactness.** The codes and scales in the file are those of ``convert_qat``: the compressor is fed
``codes * scale`` (exact in fp32) with our scale, so its ``round(w / scale)`` gives back our codes, and each
layer is unpacked again and compared before anything is written (a mismatch is an error, never a file).
Our codes use compressed-tensors' range ``[-2**(b-1), 2**(b-1) - 1]``, so they pack unchanged; scales are
signed (a negative one is how a positive extreme reaches the code ``-2**(b-1)``, see ``quant.fake_quant``), which
compressed-tensors' ``round(w / scale)`` and ``codes * scale`` handle as they are, and fp16-exact by construction.

**What compressed-tensors supports** (0.20): ``pack-quantized`` packs signed ints of 1–8 bits (2, 3, 4, 8
here), symmetric or not, with ``tensor``, ``channel`` or ``group`` strategies; transformers decompresses
all of them on load. vLLM's kernels for this format cover 4 and 8 bits only. The token embedding is stored
packed only in one-width files (see above); otherwise as its dequantized table in fp16, and the report says so
(``embedding_quantized: false``).
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ..adapters import holds_training_only, is_training_only, merge_lora_layers, strip_training_only
from ..files import atomic_folder, check_output_folder
from ..quant import GGMLSpec, QuantizedWeight, QuantSpec, prepare_qat, quant_specs
from ..selection import KDQPlan
from ..sources import save_processor, write_whisper_files
from .report import (
    EMBEDDING_REASON,
    REPORT_FILE,
    WEIGHTS_FILE,
    CompressionReport,
    build_compression_report,
    is_previous_export,
    stored_specs,
    write_compression_report,
)

logger = logging.getLogger(__name__)

PACK_FORMAT = "pack-quantized"
DENSE_LOAD_KEY = "dequantize"
CT_STRATEGIES = {"per_tensor": "tensor", "per_channel": "channel", "per_group": "group"}


try:
    import compressed_tensors
    from compressed_tensors.compressors import ModelCompressor, PackedQuantizationCompressor
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
    from compressed_tensors.quantization.utils import calculate_range
except ImportError:  # pragma: no cover - an optional dependency (the "export" extra)
    compressed_tensors = None

# The classmethod compressor API (compress(state_dict, scheme)) this module is written and tested against.
MIN_COMPRESSED_TENSORS = "0.20"


def _require_compressed_tensors() -> None:
    from packaging.version import Version

    if compressed_tensors is None or Version(compressed_tensors.__version__) < Version(MIN_COMPRESSED_TENSORS):
        found = "not installed" if compressed_tensors is None else compressed_tensors.__version__
        raise ImportError(
            f"save_compressed needs compressed-tensors >= {MIN_COMPRESSED_TENSORS} (found: {found}): "
            f"pip install -U 'compressed-tensors>={MIN_COMPRESSED_TENSORS}'; readers of the checkpoint need it too"
        )


def _same_spec(a: QuantSpec | None, b: QuantSpec | None) -> bool:
    """Equal as stored (learnable clipping is training-only)."""
    if a is None or b is None:
        return a is b
    return (a.bits, a.granularity, a.group_size) == (b.bits, b.granularity, b.group_size)


def _student_copy(model: nn.Module, plan: KDQPlan | None) -> nn.Module:
    """A CPU copy in eval mode, LoRA layers merged, prepared and checked against ``plan``."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) != "whisper" or not hasattr(model, "generation_config"):
        raise TypeError(
            f"save_compressed expects a WhisperForConditionalGeneration student, got {type(model).__name__}"
        )
    student = copy.deepcopy(model).cpu().eval()
    merge_lora_layers(student)  # a LoRA student's weights are W + B @ A, the weights its quantizer saw
    current = quant_specs(student)
    if plan is not None:
        planned = plan.module_specs()
        if not current:
            prepare_qat(student, planned)  # a float model and a plan: quantize at export (post-training)
        else:
            modules = dict(student.named_modules())
            wrong = [
                f"{n} (plan {planned[n]}, model {current.get(n, 'not prepared')})"
                for n in planned
                if n not in current or not _same_spec(planned[n], current[n])
            ]
            covered = {m.quant_name for n in planned if n in current for m in modules[n]._quant_group.members}
            wrong += [
                f"{n} (model {s}, not in the plan)" for n, s in current.items() if s is not None and n not in covered
            ]
            if wrong:
                more = " ..." if len(wrong) > 5 else ""
                raise ValueError(
                    f"the plan and the model's quantization specs disagree: {wrong[:5]}{more}; "
                    "pass the plan the model was trained with, or apply it first with "
                    "set_quant_specs(model, plan.module_specs())"
                )
    return student


def _shared_weights(model: nn.Module) -> set[str]:
    """Names of modules whose ``weight`` Parameter is also held by another module."""
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        weight = module._parameters.get("weight")
        if weight is not None:
            owners.setdefault(id(weight), []).append(name)
    return {name for names in owners.values() if len(names) > 1 for name in names}


def _declare_dense_load(folder: Path) -> None:
    """``"dequantize": true`` in ``config.json``'s ``quantization_config``: transformers then builds
    ``CompressedTensorsConfig(dequantize=True)`` from the file and unpacks every layer while loading, so plain
    ``from_pretrained`` gives a dense model. compressed-tensors' own reader ignores the extra key."""
    path = folder / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["quantization_config"][DENSE_LOAD_KEY] = True
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _scheme_key(q: QuantizedWeight) -> tuple[int, str, int | None]:
    strategy = CT_STRATEGIES[q.granularity]
    return q.bits, strategy, q.group_size if strategy == "group" else None


def _group_name(key: tuple[int, str, int | None]) -> str:
    bits, strategy, group_size = key
    return f"w{bits}_{strategy}{group_size or ''}"


def _schemes(packed: dict[str, QuantizedWeight]) -> dict[str, object]:
    """One compressed-tensors ``QuantizationScheme`` per (bits, strategy, group size), exact names as targets."""
    targets: dict[tuple, list[str]] = {}
    for name, q in packed.items():
        targets.setdefault(_scheme_key(q), []).append(name)
    schemes = {}
    for key, names in targets.items():
        bits, strategy, group_size = key
        args = QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy=strategy, group_size=group_size)
        scheme = QuantizationScheme(targets=names, weights=args, format=PACK_FORMAT)
        if not PackedQuantizationCompressor.can_compress(nn.Linear, scheme):
            raise ValueError(
                f"compressed-tensors {compressed_tensors.__version__} cannot pack {bits}-bit {strategy} weights "
                f"({names[0]}, ...): pack-quantized holds signed integers of 1-8 bits; quantize these layers to "
                "2, 3, 4 or 8 bits"
            )
        low, high = (int(v) for v in calculate_range(args, "cpu"))
        ours = QuantSpec(bits)
        if ours.qmin < low or ours.qmax > high:
            raise ValueError(
                f"our {bits}-bit codes [{ours.qmin}, {ours.qmax}] do not fit compressed-tensors' range [{low}, {high}]"
            )
        schemes[_group_name(key)] = scheme
    return schemes


def _pack(name: str, q: QuantizedWeight, scheme) -> dict[str, torch.Tensor]:
    """``weight_packed``/``weight_scale``/``weight_shape`` of one layer, written by the library's compressor and
    checked to hold exactly our codes and scales."""
    scale = q.scales.reshape(1) if q.granularity == "per_tensor" else q.scales
    # codes * scale is exact in fp32 (<= 8-bit integer times an fp16 value), so round(w / scale) gives our codes.
    dense = {"weight": q.dequantize(torch.float32), "weight_scale": scale.float()}
    out = PackedQuantizationCompressor.compress(dense, scheme)
    codes = unpack_from_int32(out["weight_packed"], q.bits, q.codes.shape)
    if not torch.equal(codes, q.codes):
        raise RuntimeError(
            f"{name}: compressed-tensors packed codes that differ from ours ({int((codes != q.codes).sum())} of "
            f"{q.codes.numel()}); nothing was written. This compressed-tensors version quantizes differently: pin "
            "the version this package was tested with"
        )
    scale16 = out["weight_scale"].to(torch.float16)
    if not torch.equal(scale16.float(), scale.float()):
        raise RuntimeError(f"{name}: scales are not exactly representable in fp16; they must come from convert_qat")
    return {
        "weight_packed": out["weight_packed"].contiguous(),
        "weight_scale": scale16.contiguous(),
        "weight_shape": out["weight_shape"],
    }


def _replace_codes(
    student: nn.Module, converted: dict[str, QuantizedWeight], codes: Mapping[str, QuantizedWeight]
) -> None:
    """Put codes computed elsewhere (e.g. by GPTQ) in place of round-to-nearest's, in ``converted`` and in the
    student's weights (what a layer stored in fp16 holds). Each must have its layer's shape and stored scheme, so that
    the file's layout, hence its bytes, is the one the student's specs describe; a tied layer's codes replace those of
    every layer tied to it."""
    unknown = sorted(set(codes) - set(converted))
    if unknown:
        raise ValueError(
            f"codes given for layers that are not quantized: {unknown}; prepare them (prepare_qat) with the spec "
            "the codes have"
        )
    for name, q in codes.items():
        old = converted[name]
        if q.codes.shape != old.codes.shape or _scheme_key(q) != _scheme_key(old) or q.scales.shape != old.scales.shape:
            raise ValueError(
                f"{name}: the given codes ({q.bits} bits, {q.granularity}, groups of {q.group_size}, "
                f"{list(q.codes.shape)}) do not have the layer's spec ({old.bits} bits, {old.granularity}, groups of "
                f"{old.group_size}, {list(old.codes.shape)})"
            )
        spec = QuantSpec(q.bits)
        if int(q.codes.min()) < spec.qmin or int(q.codes.max()) > spec.qmax:
            raise ValueError(f"{name}: codes outside the {q.bits}-bit range [{spec.qmin}, {spec.qmax}]")
        for other, value in converted.items():
            if value is old:
                converted[other] = q
        weight = student.get_submodule(name).weight
        with torch.no_grad():
            weight.copy_(q.dequantize(weight.dtype))


def _state_dict(student: nn.Module, packed: dict[str, QuantizedWeight], schemes: dict) -> dict[str, torch.Tensor]:
    """fp16 state dict with the packed layers' tensors instead of their weights, each tied tensor once."""
    tied = dict(getattr(student, "all_tied_weights_keys", None) or getattr(student, "_tied_weights_keys", None) or {})
    state: dict[str, torch.Tensor] = {}
    seen: dict[tuple, str] = {}
    for key, tensor in student.state_dict().items():
        identity = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if tensor.numel() and identity in seen:
            if key not in tied:
                raise ValueError(f"{key} shares its storage with {seen[identity]} but the model does not tie them")
            continue
        seen[identity] = key
        if is_training_only(key):
            raise RuntimeError(f"training-only tensor {key} survived conversion")
        if tensor.is_floating_point():
            tensor = tensor.to(torch.float16)
            if not torch.isfinite(tensor).all():
                raise ValueError(f"{key} overflows fp16 (|x| > 65504): it cannot be stored in fp16")
        state[key] = tensor.contiguous()
    group_of = {name: group for group, scheme in schemes.items() for name in scheme.targets}
    for name, q in packed.items():
        del state[f"{name}.weight"]
        for leaf, tensor in _pack(name, q, schemes[group_of[name]]).items():
            state[f"{name}.{leaf}"] = tensor
    return state


def save_compressed(
    model: nn.Module,
    processor,
    output_dir: str | os.PathLike,
    *,
    plan: KDQPlan | None = None,
    teacher_fp16_bytes: int | None = None,
    overwrite: bool = False,
    codes: Mapping[str, QuantizedWeight] | None = None,
) -> CompressionReport:
    """Write ``model`` (a QAT-prepared Whisper student) as a packed compressed-tensors checkpoint.

    Args:
        model: ``WhisperForConditionalGeneration`` with fake-quant wrappers (`prepare_qat`), or a float one
            when ``plan`` is given (quantized here from the plan's specs). Never modified: a deep copy is
            converted, without ``weight_clip`` and the ``kdq_adapters`` submodule.
        processor: the ``WhisperProcessor`` saved beside it.
        output_dir: target folder, written atomically (staging folder beside it, then rename): an interrupted
            export leaves a previous folder intact.
        plan: the `KDQPlan` the model was trained with; checked against the model's specs, saved as
            ``kdq_plan.json`` and used for the report's planned bits.
        teacher_fp16_bytes: the teacher's fp16 weight bytes, for the report's compression ratios.
        overwrite: replace another folder this package wrote (e.g. by ``save_whisper``). A previous packed export
            is always replaced; a non-empty folder of anything else never is, whatever ``overwrite`` says.
        codes: layer name → `QuantizedWeight` computed by another quantizer (GPTQ: ``benchmarks/ptq_baselines.py``),
            stored instead of the round-to-nearest codes of the model's specs; each needs its layer's shape, bits and
            groups (ValueError otherwise), so the file is laid out, and weighs, as without them. A tied layer's codes
            (``proj_out``) are the tied embedding's too.

    Returns:
        The `CompressionReport` written as ``compression_report.json`` (``report.folder`` is ``output_dir``). The
        folder loads with ``WhisperForConditionalGeneration.from_pretrained(output_dir)`` wherever transformers and
        compressed-tensors are installed.

    Raises:
        FileExistsError: ``output_dir`` holds files this package did not write, or another of its outputs and
            ``overwrite`` is False.
        ValueError: plan and model disagree, nothing is quantized, or a spec cannot be packed.
    """
    output_dir = Path(output_dir)
    check_output_folder(
        output_dir,
        kind=f"packed export (no {REPORT_FILE})",
        same_kind=is_previous_export(output_dir),
        overwrite=overwrite,
    )
    _require_compressed_tensors()

    student = _student_copy(model, plan)
    specs = quant_specs(student)
    if not any(spec is not None for spec in specs.values()):
        if plan is None:
            raise ValueError(
                "nothing to export as packed integers: the model has no quantized layers. Pass a QAT-prepared "
                "student (prepare_qat) or plan= (a float student is then quantized at export), or use save_whisper "
                "for a float copy"
            )
        # The plan (applied by _student_copy) quantizes nothing: quant_bit_choices "float", distillation only. Such
        # a student ships as a float folder, in fp16 like the teacher, for any post-training quantizer to take.
        strip_training_only(student)
        student.half()
        with atomic_folder(output_dir) as staging:
            write_whisper_files(student, processor, staging)
            plan.save(staging)
            report = build_compression_report(staging, plan, teacher_fp16_bytes=teacher_fp16_bytes)
            write_compression_report(staging, report)
        logger.info("The plan quantizes nothing: exported the float student to %s", output_dir)
        return CompressionReport.from_dict(report, output_dir)
    k_quant = [
        (name, spec.type) for name, spec in specs.items() if isinstance(spec, GGMLSpec) and spec.type[-2:] == "_K"
    ]
    if k_quant:
        raise ValueError(
            f"{k_quant[0][0]} and {len(k_quant) - 1} more layers are {k_quant[0][1]}, which the compressed-tensors "
            "pack-quantized format cannot hold: the k-quants' 16-weight sub-block scales are 6- or 4-bit multiples of "
            "an fp16 super-block scale, and their products are not fp16 values (the format stores one fp16 scale per "
            "group; q2_K adds a minimum per sub-block). Export such a student with export_whisper_cpp "
            "(hf-whisper-kdq export-ggml), or train with q4_0 / q8_0 (quant_bit_choices 4,8)"
        )
    shared = _shared_weights(student)
    converted = strip_training_only(student)
    if codes:
        _replace_codes(student, converted, codes)
    # transformers' dense load path (quantization_config "dequantize": true) decodes every packed layer with the
    # first config group's scheme, so only a file whose packed linears share one scheme can take it. That path is
    # also the only one that loads a packed token embedding (its compressed path needs the Embedding's `weight`),
    # re-tying proj_out (not stored): the embedding is packed when it has that scheme too, else stored in fp16.
    own_linears = {n for n in converted if isinstance(student.get_submodule(n), nn.Linear) and n not in shared}
    linear_schemes = {_scheme_key(converted[n]) for n in own_linears}
    dense_load = len(linear_schemes) <= 1

    def stored_packed(name: str, q: QuantizedWeight) -> bool:
        if name in own_linears:
            return True
        embedding = isinstance(student.get_submodule(name), nn.Embedding)
        return dense_load and embedding and (not linear_schemes or _scheme_key(q) in linear_schemes)

    packed = {n: q for n, q in converted.items() if stored_packed(n, q)}
    kept = sorted(n for n, q in converted.items() if n not in packed and not any(q is p for p in packed.values()))
    if kept:
        # Their weights hold the dequantized values (convert_qat baked them in); fp16 rounds them slightly.
        logger.warning("%s: quantized in training, stored dequantized in fp16 (%s)", ", ".join(kept), EMBEDDING_REASON)
    schemes = _schemes(packed)
    ignore = [n for n, m in student.named_modules() if isinstance(m, nn.Linear) and n not in packed]
    quantization_config = QuantizationConfig(
        config_groups=schemes, format=PACK_FORMAT, quantization_status="compressed", ignore=ignore
    )
    state = _state_dict(student, packed, schemes)

    config = copy.deepcopy(student.config)
    # Dense loads unpack to the declared dtype: float32 lets the usual generate(processor(...).input_features) run.
    config.dtype = torch.float32 if dense_load else torch.float16
    with atomic_folder(output_dir) as staging:
        save_file(state, str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
        config.save_pretrained(staging)
        ModelCompressor(quantization_config=quantization_config).update_config(str(staging))
        if dense_load:
            _declare_dense_load(staging)
        student.generation_config.save_pretrained(staging)
        save_processor(processor, staging)
        if plan is not None:
            plan.save(staging)
        report = build_compression_report(
            staging, plan if plan is not None else specs, teacher_fp16_bytes=teacher_fp16_bytes
        )
        write_compression_report(staging, report)
    logger.info(
        "Exported %d packed layers (%s) to %s: %.2f MB of weights",
        len(packed),
        ", ".join(schemes),
        output_dir,
        report["weights_bytes"] / 1e6,
    )
    return CompressionReport.from_dict(report, output_dir)


def float_model_and_codes(model_or_folder, processor) -> tuple[nn.Module, Any, dict[str, QuantizedWeight]]:
    """What an export reads from ``model_or_folder``, as ``(model, processor, codes)``: a plain float Whisper (QAT layers baked, adapters dropped, packed
    compressed-tensors weights unpacked) and the integer codes its quantized layers hold (``convert_qat``'s, or a
    packed folder's; empty for a float model). The caller's model is never modified."""
    if isinstance(model_or_folder, nn.Module):
        if processor is None:
            raise ValueError("exporting a model object needs its WhisperProcessor (the vocabulary and mel filters)")
        if not holds_training_only(model_or_folder):
            return model_or_folder, processor, {}
        student = copy.deepcopy(model_or_folder)
        return student, processor, strip_training_only(student)
    from ..sources import load_whisper

    model, loaded_processor = load_whisper(model_or_folder, dtype=None)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # a compressed folder of mixed widths (one width loads dense, unpacked already)
        quantizer.compressor.decompress_model(model)
    return model, processor or loaded_processor, read_packed_codes(model_or_folder)


def read_packed_codes(folder: str | os.PathLike) -> dict[str, QuantizedWeight]:
    """The codes and scales of every packed layer of a folder `save_compressed` wrote (the student's, checked when
    they were written), by module name; empty for a folder without packed layers or that is not a local folder.
    The whisper.cpp export writes them as they are where its file type holds them."""
    folder = Path(folder)
    if not (folder / WEIGHTS_FILE).is_file() or not (folder / "config.json").is_file():
        return {}
    if "quantization_config" not in json.loads((folder / "config.json").read_text(encoding="utf-8")):
        return {}
    _require_compressed_tensors()
    from safetensors.torch import load_file

    tensors = load_file(str(folder / WEIGHTS_FILE))
    codes = {}
    for layer, spec in stored_specs(folder, tensors)[0].items():
        shape = torch.Size(int(size) for size in tensors[f"{layer}.weight_shape"])
        scales = tensors[f"{layer}.weight_scale"].float()
        codes[layer] = QuantizedWeight(
            codes=unpack_from_int32(tensors[f"{layer}.weight_packed"], spec.bits, shape).to(torch.int8),
            scales=scales.reshape(1, 1) if spec.granularity == "per_tensor" else scales.reshape(shape[0], -1),
            bits=spec.bits,
            group_size=shape[1] // spec.num_groups(shape),
            granularity=spec.granularity,
        )
    return codes


__all__ = ["CT_STRATEGIES", "PACK_FORMAT", "float_model_and_codes", "read_packed_codes", "save_compressed"]
