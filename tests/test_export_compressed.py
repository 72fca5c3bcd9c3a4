"""save_compressed: a QAT student as a packed compressed-tensors checkpoint that plain transformers loads."""

from __future__ import annotations

import copy
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("compressed_tensors", minversion="0.20")
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32  # noqa: E402
from conftest import WITHOUT_OUR_PACKAGE
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from hf_whisper_kdq.export import (
    EMBEDDING_REASON,
    REPORT_FILE,
    CompressionReport,
    build_compression_report,
    save_compressed,
)
from hf_whisper_kdq.export import compressed as compressed_module
from hf_whisper_kdq.export.report import _safetensors_layout
from hf_whisper_kdq.quant import (
    FakeQuantEmbedding,
    FakeQuantLinear,
    QuantSpec,
    convert_qat,
    default_quant_targets,
    prepare_qat,
    quant_specs,
    quantized_size_bytes,
    weight_bytes,
)
from hf_whisper_kdq.selection import initial_plan
from hf_whisper_kdq.sources import save_whisper

FLOAT_LAYER = "model.decoder.layers.1.fc2"
EMBEDDING = "model.decoder.embed_tokens"
TEACHER_FP16_BYTES = 145_000_000
# (encoder spec, decoder spec, embedding spec or None)
VARIANTS = {
    "mixed": ("int8", "int4-g32-clip", "int4-g32-clip"),  # + FLOAT_LAYER kept in float
    "low": ("int2-tensor", "int3-g32", None),
}


def _prepare(model: nn.Module, variant: str) -> nn.Module:
    encoder, decoder, embedding = VARIANTS[variant]
    specs = {name: encoder if ".encoder." in name else decoder for name in default_quant_targets(model)}
    if variant == "mixed":
        specs[FLOAT_LAYER] = None
        specs[EMBEDDING] = embedding
    prepare_qat(model, specs)
    with torch.no_grad():  # learned clipping that is not 1 everywhere, so the exported codes depend on it
        for module in model.modules():
            if isinstance(module, (FakeQuantLinear, FakeQuantEmbedding)) and module.weight_clip is not None:
                module.weight_clip.uniform_(0.7, 1.0, generator=torch.Generator().manual_seed(3))
    # Training-only state the trainer attaches: hidden-state adapters.
    model.add_module("kdq_adapters", nn.ModuleDict({"encoder_1": nn.Linear(64, 64)}))
    return model


def _reference(model: nn.Module):
    """The converted student as the checkpoint should hold it: packed linears exact, every other tensor through fp16."""
    reference = copy.deepcopy(model)
    del reference.kdq_adapters
    codes = convert_qat(reference)
    packed = {n: q for n, q in codes.items() if isinstance(reference.get_submodule(n), nn.Linear) and n != "proj_out"}
    packed.pop(EMBEDDING, None)
    with torch.no_grad():
        for name, param in reference.named_parameters():  # the tied embedding/proj_out weight once
            if name.rpartition(".")[0] not in packed:
                param.copy_(param.half().float())
    return reference.eval(), packed


@pytest.fixture(scope="module")
def exports(_tiny_whisper_session, tmp_path_factory):
    base, processor = _tiny_whisper_session
    result = {}
    for variant in VARIANTS:
        model = _prepare(copy.deepcopy(base), variant)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        out = tmp_path_factory.mktemp(variant) / "student-kdq"
        report = save_compressed(model, processor, out, teacher_fp16_bytes=TEACHER_FP16_BYTES)
        reference, packed = _reference(model)
        result[variant] = SimpleNamespace(
            model=model, processor=processor, out=out, before=before, reference=reference, packed=packed, report=report
        )
    return result


def _quantization_config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())["quantization_config"]


def test_caller_model_is_not_modified(exports):
    export = exports["mixed"]
    model = export.model
    assert isinstance(model.model.encoder.layers[0].fc1, FakeQuantLinear)
    assert hasattr(model, "kdq_adapters")
    after = model.state_dict()
    assert after.keys() == export.before.keys()
    assert all(torch.equal(after[k], v) for k, v in export.before.items())


def test_config_groups_ignore_and_dtypes(exports):
    export = exports["mixed"]
    config = json.loads((export.out / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors"
    assert qc["format"] == "pack-quantized" and qc["quantization_status"] == "compressed"
    assert set(qc["config_groups"]) == {"w8_channel", "w4_group32"}
    encoder = [n for n in default_quant_targets(export.model) if ".encoder." in n]
    decoder = [n for n in default_quant_targets(export.model) if ".decoder." in n and n != FLOAT_LAYER]
    w8, w4 = qc["config_groups"]["w8_channel"], qc["config_groups"]["w4_group32"]
    assert w8["targets"] == encoder and w4["targets"] == decoder
    assert (w8["weights"]["num_bits"], w8["weights"]["strategy"], w8["weights"]["group_size"]) == (8, "channel", None)
    assert (w4["weights"]["num_bits"], w4["weights"]["strategy"], w4["weights"]["group_size"]) == (4, "group", 32)
    assert all(
        g["weights"]["symmetric"] and g["weights"]["type"] == "int" and g["format"] == "pack-quantized"
        for g in qc["config_groups"].values()
    )
    assert qc["ignore"] == [FLOAT_LAYER, "proj_out"]  # the float linears; the embedding is in no group
    assert config["dtype"] == "float16" and config["tie_word_embeddings"] is True
    low = _quantization_config(exports["low"].out)["config_groups"]
    assert {k: (g["weights"]["num_bits"], g["weights"]["strategy"]) for k, g in low.items()} == {
        "w2_tensor": (2, "tensor"),
        "w3_group32": (3, "group"),
    }


def test_safetensors_holds_packed_codes_and_no_training_state(exports):
    export = exports["mixed"]
    with safe_open(str(export.out / "model.safetensors"), framework="pt") as file:
        tensors = {key: file.get_tensor(key) for key in file.keys()}
    assert not [k for k in tensors if "weight_clip" in k or k.startswith("kdq_adapters")]
    assert "proj_out.weight" not in tensors  # tied: stored once
    assert tensors[f"{EMBEDDING}.weight"].dtype == torch.float16
    for name in export.packed:
        assert f"{name}.weight" not in tensors
        assert tensors[f"{name}.weight_packed"].dtype == torch.int32
        assert tensors[f"{name}.weight_scale"].dtype == torch.float16
        assert tensors[f"{name}.weight_shape"].tolist() == list(export.packed[name].shape)
    floats = [k for k in tensors if k.rpartition(".")[0] not in export.packed]
    assert all(tensors[k].dtype == torch.float16 for k in floats)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_written_codes_and_scales_are_exactly_ours(exports, variant):
    export = exports[variant]
    tensors = load_file(str(export.out / "model.safetensors"))
    assert export.packed
    for name, q in export.packed.items():
        rows, cols = q.shape
        packed = tensors[f"{name}.weight_packed"]
        assert packed.shape == (rows, math.ceil(cols * q.bits / 32))  # dense: bits per code, nothing wasted
        codes = unpack_from_int32(packed, q.bits, q.shape)
        assert torch.equal(codes, q.codes), name
        # The full signed range, all 2**bits levels: -2**(bits-1) is every group's largest-magnitude weight.
        assert int(codes.min()) == -(2 ** (q.bits - 1)) and int(codes.max()) <= 2 ** (q.bits - 1) - 1
        scale = tensors[f"{name}.weight_scale"].float()
        assert torch.equal(scale.reshape(q.scales.shape), q.scales), name


LOADER = (
    WITHOUT_OUR_PACKAGE
    + r"""
import numpy as np, torch
from safetensors.torch import save_file
from transformers import WhisperForConditionalGeneration

work = sys.argv[1]
features = torch.from_numpy(np.load(f"{work}/features.npy"))
ids = torch.from_numpy(np.load(f"{work}/decoder_ids.npy"))
for index, folder in enumerate(sys.argv[2:]):
    model = WhisperForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    assert sum(hasattr(m, "quantization_scheme") for m in model.modules()) > 0
    with torch.no_grad():
        generated = model.generate(features, max_new_tokens=6, do_sample=False, num_beams=1)
        logits = model(input_features=features, decoder_input_ids=ids).logits
    np.save(f"{work}/logits_{index}.npy", logits.numpy())
    np.save(f"{work}/generated_{index}.npy", generated.numpy())
    weights = {k: v.contiguous() for k, v in model.state_dict().items() if k != "proj_out.weight"}
    save_file(weights, f"{work}/loaded_{index}.safetensors")
assert "hf_whisper_kdq" not in sys.modules
"""
)


def test_plain_transformers_loads_the_export(exports, tmp_path):
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(2, 80, 3000, generator=generator)
    ids = torch.tensor([[50258, 50259, 50359, 50363, 400, 1200, 7000]] * 2)
    np.save(tmp_path / "features.npy", features.numpy())
    np.save(tmp_path / "decoder_ids.npy", ids.numpy())
    variants = list(VARIANTS)
    result = subprocess.run(
        [sys.executable, "-c", LOADER, str(tmp_path), *(str(exports[v].out) for v in variants)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    for index, variant in enumerate(variants):
        reference = exports[variant].reference
        loaded = load_file(str(tmp_path / f"loaded_{index}.safetensors"))
        # Bit-identical weights: packed layers decompress to codes * scale exactly, float tensors are fp16 values.
        for key, value in reference.state_dict().items():
            if key != "proj_out.weight":
                assert torch.equal(loaded[key], value), (variant, key)
        with torch.no_grad():
            logits = reference(input_features=features, decoder_input_ids=ids).logits
            generated = reference.generate(features, max_new_tokens=6, do_sample=False, num_beams=1)
        # Same weights bit for bit: only the order of floating-point reductions may differ between processes.
        loaded_logits = torch.from_numpy(np.load(tmp_path / f"logits_{index}.npy"))
        torch.testing.assert_close(loaded_logits, logits, rtol=0, atol=1e-5)
        assert np.array_equal(np.load(tmp_path / f"generated_{index}.npy"), generated.numpy()), variant


def test_save_compressed_returns_the_typed_report_it_wrote(exports, tmp_path):
    export = exports["mixed"]
    on_disk = json.loads((export.out / REPORT_FILE).read_text())
    assert isinstance(export.report, CompressionReport) and export.report.folder == export.out
    assert export.report.to_dict() == on_disk and list(export.report.to_dict()) == list(on_disk)  # the JSON unchanged
    assert CompressionReport.load(export.out) == export.report
    assert export.report.weights_bytes == (export.out / "model.safetensors").stat().st_size


def test_report_sizes_bits_and_embedding(exports):
    export = exports["mixed"]
    report = json.loads((export.out / REPORT_FILE).read_text())
    assert report["embedding_quantized"] is False and report["embedding_reason"] == EMBEDDING_REASON
    assert report["embedding_planned_bits"] == 4
    bits = report["per_layer_bits"]
    assert bits["encoder.0"] == bits["encoder.1"] == 8 and bits["decoder.0"] == 4 and bits["embedding"] == 16
    assert 4 < bits["decoder.1"] < 16  # fc2 kept in float
    assert report["modules"][FLOAT_LAYER]["stored"] == "float16"
    assert report["modules"][EMBEDDING] == {**report["modules"][EMBEDDING], "bits": 16, "planned_bits": 4}

    # Honest bytes: every file's size on disk; components + header = the weights file.
    files = {
        p.name: p.stat().st_size for p in export.out.iterdir() if p.name != REPORT_FILE and not p.name.startswith(".")
    }
    assert report["files"] == files and report["total_bytes"] == sum(files.values())
    assert report["weights_bytes"] == files["model.safetensors"]
    assert sum(report["components"].values()) + report["safetensors"]["header_bytes"] == report["weights_bytes"]
    # Paper accounting: the plan's size (= quantized_size_bytes of the prepared student) and the stored one.
    student = copy.deepcopy(export.model)
    del student.kdq_adapters
    paper = report["paper_accounting"]
    assert paper["planned_bytes"] == quantized_size_bytes(student)
    assert paper["as_stored_bytes"] == quantized_size_bytes(student, {EMBEDDING: None, "proj_out": None})
    assert report["parameters"]["total"] == sum(p.numel() for p in export.reference.parameters())
    assert paper["fp16_bytes"] == 2 * report["parameters"]["total"]
    # As stored, a packed component is the paper's count plus 16 bytes of weight_shape per packed layer.
    for side in ("encoder", "decoder"):
        n_packed = sum(1 for n in export.packed if n.startswith(f"model.{side}."))
        assert report["components"][side] == report["paper_components"]["as_stored"][side] + 16 * n_packed
    assert report["parameters"]["quantized"] == sum(q.codes.numel() for q in export.packed.values())
    # Ratios against the teacher, on the weights file.
    assert report["teacher_fp32_bytes"] == 2 * TEACHER_FP16_BYTES
    assert report["ratio_to_teacher_fp16"] == round(TEACHER_FP16_BYTES / report["weights_bytes"], 4)
    assert report["ratio_to_teacher_fp32"] == round(2 * TEACHER_FP16_BYTES / report["weights_bytes"], 4)
    # Rebuilt from the folder and the prepared model alone, the report is the same.
    again = build_compression_report(export.out, export.model, teacher_fp16_bytes=TEACHER_FP16_BYTES)
    assert again == report


def test_smaller_than_the_fp16_save_by_the_expected_factor(exports, tmp_path):
    export = exports["mixed"]
    fp16 = save_whisper(copy.deepcopy(export.reference).half(), export.processor, tmp_path / "fp16")
    _, float_tensors = _safetensors_layout(fp16 / "model.safetensors")
    _, packed_tensors = _safetensors_layout(export.out / "model.safetensors")
    specs = quant_specs(export.model)
    for side, bits, overhead in (("encoder", 8, 2 / 64), ("decoder", 4, 2 / 32)):
        names = [n for n in export.packed if n.startswith(f"model.{side}.")]
        before = sum(float_tensors[f"{n}.weight"][1] for n in names)
        after = sum(packed_tensors[f"{n}.{leaf}"][1] for n in names for leaf in ("weight_packed", "weight_scale"))
        assert after == sum(weight_bytes(export.packed[n].shape, specs[n]) for n in names)  # billed = stored
        # int8 per channel: 1 byte per weight + one fp16 scale per row (64 or 128 wide); int4-g32: 0.5 + 2 per 32.
        assert bits / 16 < after / before <= bits / 16 + overhead / 2, side
    saved = sum(
        float_tensors[f"{n}.weight"][1]
        - sum(packed_tensors[f"{n}.{leaf}"][1] for leaf in ("weight_packed", "weight_scale", "weight_shape"))
        for n in export.packed
    )
    assert sum(v[1] for v in float_tensors.values()) - sum(v[1] for v in packed_tensors.values()) == saved
    assert (export.out / "model.safetensors").stat().st_size < (fp16 / "model.safetensors").stat().st_size - 0.9 * saved


def test_interrupted_export_keeps_the_previous_one(exports, tmp_path, monkeypatch):
    export = exports["mixed"]
    out = tmp_path / "student-kdq"
    shutil.copytree(export.out, out)
    snapshot = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def failing_writer(tensors, path, metadata=None):
        Path(path).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(compressed_module, "save_file", failing_writer)
    with pytest.raises(OSError, match="disk full"):
        save_compressed(export.model, export.processor, out)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == snapshot
    assert [p.name for p in tmp_path.iterdir()] == ["student-kdq"]  # no staging folder left behind

    monkeypatch.undo()
    save_compressed(export.model, export.processor, out)  # a previous export is replaced without overwrite=True
    assert (out / REPORT_FILE).is_file() and [p.name for p in tmp_path.iterdir()] == ["student-kdq"]


def test_foreign_folder_refused_even_with_overwrite_and_plan_quantizes_a_float_student(tiny_whisper, tmp_path):
    model, processor = tiny_whisper
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    plan = initial_plan(
        default_quant_targets(model),
        {"encoder": [0, 1], "decoder": [0, 1]},
        bits=4,
        granularity="per_channel",
        group_size=None,
        learnable_clipping=False,
    )
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match="not written by hf_whisper_kdq"):
            save_compressed(model, processor, target, plan=plan, overwrite=overwrite)
    assert [p.name for p in target.iterdir()] == ["notes.txt"] and (target / "notes.txt").read_text() == "keep me"

    # another folder of ours (a float save_whisper copy) is replaced only with overwrite=True
    target = save_whisper(model, processor, tmp_path / "float")
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        save_compressed(model, processor, target, plan=plan)
    save_compressed(model, processor, target, plan=plan, overwrite=True)
    assert (target / "kdq_plan.json").is_file()
    assert quant_specs(model) == {}  # the float student itself stays float
    assert set(_quantization_config(target)["config_groups"]) == {"w4_channel"}
    report = json.loads((target / REPORT_FILE).read_text())
    assert report["per_layer_bits"] == {**{u.name: 4 for u in plan.units}, "embedding": 16}
    assert report["embedding_quantized"] is False and "not quantized by the plan" in report["embedding_reason"]


def test_clear_errors_and_nothing_written(exports, tiny_whisper, tmp_path, monkeypatch):
    model, processor = tiny_whisper
    target = tmp_path / "out"
    with pytest.raises(ValueError, match="no quantized layers"):
        save_compressed(model, processor, target)
    plan = initial_plan(
        default_quant_targets(model),
        {"encoder": [0, 1], "decoder": [0, 1]},
        bits=8,
        granularity="per_channel",
        group_size=None,
        learnable_clipping=False,
    )
    with pytest.raises(ValueError, match="disagree"):
        save_compressed(exports["low"].model, processor, target, plan=plan)
    with pytest.raises(TypeError, match="WhisperForConditionalGeneration"):
        save_compressed(nn.Linear(4, 4), processor, target)
    # A width the installed compressed-tensors could not pack is refused, not written some other way.
    packer = compressed_module.PackedQuantizationCompressor
    monkeypatch.setattr(packer, "can_compress", classmethod(lambda cls, module_type, scheme: False))
    with pytest.raises(ValueError, match="cannot pack 2-bit tensor weights .* 2, 3, 4 or 8 bits"):
        save_compressed(exports["low"].model, processor, target)
    assert not target.exists() and list(tmp_path.iterdir()) == []
    assert (QuantSpec.parse("int4-g32").qmin, QuantSpec.parse("int4-g32").qmax) == (-8, 7)  # compressed-tensors' range


@pytest.mark.slow
def test_real_weights_packed_export_transcribes_real_clips_identically(shared_speech, tmp_path, monkeypatch):
    """whisper-tiny.en quantized (int8 encoder, int4 g32 decoder), exported, reloaded by plain transformers in a
    fresh process: greedy transcripts of real LJSpeech clips equal the QAT model's (convert_qat) ones."""
    import copy
    import json

    from hf_whisper_kdq.audio import load_audio
    from hf_whisper_kdq.quant import QuantSpec, convert_qat, default_quant_targets, prepare_qat
    from hf_whisper_kdq.sources import load_whisper

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, processor = load_whisper("openai/whisper-tiny.en")
    specs = {name: QuantSpec(8, "per_channel") for name in default_quant_targets(model, decoder=False)}
    specs.update({name: QuantSpec(4, "per_group", 32) for name in default_quant_targets(model, encoder=False)})
    prepare_qat(model, specs)
    out = save_compressed(model, processor, tmp_path / "packed").folder

    rows = [json.loads(line) for line in (shared_speech / "dev.jsonl").read_text().splitlines()[:3]]
    features = processor(
        [load_audio(shared_speech / r["audio"]) for r in rows], sampling_rate=16000, return_tensors="pt"
    ).input_features
    np.save(tmp_path / "features.npy", features.numpy())
    converted = copy.deepcopy(model)
    convert_qat(converted)
    with torch.no_grad():
        expected = processor.batch_decode(converted.generate(features, max_new_tokens=64), skip_special_tokens=True)

    script = f"""
import sys, json, numpy as np, torch
sys.modules["hf_whisper_kdq"] = None  # importing it would fail: prove the checkpoint stands alone
from transformers import WhisperForConditionalGeneration, WhisperProcessor
model = WhisperForConditionalGeneration.from_pretrained({str(out)!r}, dtype=torch.float32)
processor = WhisperProcessor.from_pretrained({str(out)!r})
model.hf_quantizer.compressor.decompress_model(model)
features = torch.from_numpy(np.load({str(tmp_path / "features.npy")!r}))
with torch.no_grad():
    ids = model.generate(features, max_new_tokens=64)
print(json.dumps(processor.batch_decode(ids, skip_special_tokens=True)))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == expected


# ---- One integer width: the dense load path, the token embedding packed ------------------------------------

ONE_WIDTH = "int4-g32-clip"

DENSE_LOADER = (
    WITHOUT_OUR_PACKAGE
    + r"""
import numpy as np, torch
from transformers import WhisperForConditionalGeneration

work, folder = sys.argv[1], sys.argv[2]
features = torch.from_numpy(np.load(f"{work}/features.npy"))
ids = torch.from_numpy(np.load(f"{work}/decoder_ids.npy"))
model = WhisperForConditionalGeneration.from_pretrained(folder).eval()  # no dtype, no unpacking step: the usual call
assert model.dtype == torch.float32, model.dtype
assert model.proj_out.weight.data_ptr() == model.model.decoder.embed_tokens.weight.data_ptr(), "proj_out not tied"
with torch.no_grad():
    np.save(f"{work}/logits.npy", model(input_features=features, decoder_input_ids=ids).logits.numpy())
    generated = model.generate(features, language="en", task="transcribe", max_new_tokens=6, do_sample=False)
np.save(f"{work}/generated.npy", generated.numpy())
assert "hf_whisper_kdq" not in sys.modules
"""
)


def _load_dense_in_a_subprocess(folder: Path, work: Path, features: torch.Tensor, ids: torch.Tensor) -> None:
    """Run DENSE_LOADER on ``folder`` (no import of this package): ``work`` then holds its logits.npy and
    generated.npy."""
    np.save(work / "features.npy", features.numpy())
    np.save(work / "decoder_ids.npy", ids.numpy())
    result = subprocess.run(
        [sys.executable, "-c", DENSE_LOADER, str(work), str(folder)],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.fixture(scope="module")
def one_width_export(_tiny_whisper_session, tmp_path_factory):
    base, processor = _tiny_whisper_session
    model = copy.deepcopy(base)
    prepare_qat(model, {**dict.fromkeys(default_quant_targets(model), ONE_WIDTH), EMBEDDING: ONE_WIDTH})
    with torch.no_grad():  # learned clipping that is not 1 everywhere, so the stored codes depend on it
        for module in model.modules():
            if isinstance(module, (FakeQuantLinear, FakeQuantEmbedding)) and module.weight_clip is not None:
                module.weight_clip.uniform_(0.7, 1.0, generator=torch.Generator().manual_seed(5))
    out = tmp_path_factory.mktemp("one-width") / "student-kdq"
    report = save_compressed(model, processor, out, teacher_fp16_bytes=TEACHER_FP16_BYTES)
    reference = copy.deepcopy(model).eval()
    packed = {n for n, q in convert_qat(reference).items() if n != "proj_out"}
    # The file holds our codes and fp16 scales exactly, but transformers' dense load multiplies them in fp16 (the
    # scale's dtype): every loaded weight is the fake-quantized one rounded to fp16, as the float tensors are.
    with torch.no_grad():
        for param in reference.parameters():
            param.copy_(param.half().float())
    return SimpleNamespace(model=model, out=out, report=report, reference=reference, packed=packed)


def test_one_width_export_stores_the_embedding_packed_once_and_declares_a_dense_load(one_width_export):
    export = one_width_export
    config = json.loads((export.out / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["dequantize"] is True and list(qc["config_groups"]) == ["w4_group32"]
    assert EMBEDDING in qc["config_groups"]["w4_group32"]["targets"] and qc["ignore"] == ["proj_out"]
    assert config["dtype"] == "float32" and config["tie_word_embeddings"] is True
    with safe_open(str(export.out / "model.safetensors"), framework="pt") as file:
        keys = set(file.keys())
    assert {f"{EMBEDDING}.weight_packed", f"{EMBEDDING}.weight_scale"} <= keys
    assert f"{EMBEDDING}.weight" not in keys and not [k for k in keys if k.startswith("proj_out.")]
    report = export.report
    assert report.dense_load and report.embedding_quantized and report.embedding_reason is None
    assert report.per_layer_bits["embedding"] == 4
    # The bytes on disk are the planned bytes: the paper's count of this plan, plus each packed layer's 16-byte
    # weight_shape and the safetensors header, nothing kept in fp16 behind the plan's back.
    paper = report.paper_accounting
    assert paper["as_stored_bytes"] == paper["planned_bytes"]
    overhead = 16 * len(export.packed) + report.safetensors["header_bytes"]
    assert report.weights_bytes == paper["planned_bytes"] + overhead


def test_one_width_export_loads_dense_with_plain_from_pretrained(one_width_export, tmp_path):
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(2, 80, 3000, generator=generator)
    ids = torch.tensor([[50258, 50259, 50359, 50363, 400, 1200, 7000]] * 2)
    _load_dense_in_a_subprocess(one_width_export.out, tmp_path, features, ids)
    reference = one_width_export.reference
    with torch.no_grad():
        logits = reference(input_features=features, decoder_input_ids=ids).logits
        generated = reference.generate(features, language="en", task="transcribe", max_new_tokens=6, do_sample=False)
    torch.testing.assert_close(torch.from_numpy(np.load(tmp_path / "logits.npy")), logits, rtol=0, atol=1e-5)
    assert np.array_equal(np.load(tmp_path / "generated.npy"), generated.numpy())


def test_an_embedding_of_another_width_keeps_the_dense_load_and_is_stored_in_fp16(_tiny_whisper_session, tmp_path):
    """int4 linears and an int8 embedding (the issue's best PTQ row): the linears share one scheme, so the file still
    loads dense with the plain call; the embedding, of another width, is stored dequantized in fp16."""
    base, processor = _tiny_whisper_session
    model = copy.deepcopy(base)
    prepare_qat(model, {**dict.fromkeys(default_quant_targets(model), "int4-g32"), EMBEDDING: "int8"})
    report = save_compressed(model, processor, tmp_path / "emb8")
    assert report.dense_load and not report.embedding_quantized and report.embedding_reason == EMBEDDING_REASON
    assert list(_quantization_config(report.folder)["config_groups"]) == ["w4_group32"]
    with safe_open(str(report.folder / "model.safetensors"), framework="pt") as file:
        assert file.get_tensor(f"{EMBEDDING}.weight").dtype == torch.float16
    reference = copy.deepcopy(model).eval()
    convert_qat(reference)
    with torch.no_grad():
        for param in reference.parameters():
            param.copy_(param.half().float())
    features = torch.randn(1, 80, 3000, generator=torch.Generator().manual_seed(2))
    ids = torch.tensor([[50258, 50259, 50359, 50363, 400, 1200]])
    _load_dense_in_a_subprocess(report.folder, tmp_path, features, ids)
    with torch.no_grad():
        logits = reference(input_features=features, decoder_input_ids=ids).logits
    torch.testing.assert_close(torch.from_numpy(np.load(tmp_path / "logits.npy")), logits, rtol=0, atol=1e-5)
