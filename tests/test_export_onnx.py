"""export.onnx: ONNX Runtime graphs whose quantized weights are the student's own codes. Every graph is run by
onnxruntime itself and compared with transformers' forward of the same (fake-quantized) model."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from hf_whisper_kdq.export.onnx import (
    DECODER_FILE,
    ENCODER_FILE,
    EXPORT_FILE,
    export_onnx,
    onnx_file_bytes,
    pack_nbits,
)
from hf_whisper_kdq.quant import QuantSpec, convert_qat, default_quant_targets, prepare_qat, quantize_weight
from hf_whisper_kdq.quant.spec import as_spec

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from hf_whisper_kdq.evaluation_onnx import OnnxWhisper  # noqa: E402  (needs onnxruntime)
from hf_whisper_kdq.export.onnx import _unpack  # noqa: E402

PROMPT = [50258, 50259, 50359, 50363, 440, 1000, 2221]  # start, <|en|>, transcribe, notimestamps, three words


def _varied(model):
    """A copy of ``model`` with every tensor distinct (the random model's zero biases and unit LayerNorms would test
    nothing, and the exporter stores equal tensors once) and float16-exact: the export stores float tensors in
    float16, so comparisons are then of arithmetic only."""
    model = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter += 0.02 * torch.randn(parameter.shape, generator=generator)
    return model.half().float()


def _student(model, spec: str):
    """A QAT student of ``_varied(model)`` at ``spec`` everywhere, the token embedding included."""
    student = _varied(model)
    prepare_qat(student, {name: QuantSpec.parse(spec) for name in default_quant_targets(student, embedding=True)})
    return student


def _reference_logits(model, features: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model(input_features=features, decoder_input_ids=torch.tensor([PROMPT])).logits[0].numpy()


def _onnx_logits(folder, features: torch.Tensor, splits=(4, 5, 7)) -> tuple[np.ndarray, list[np.ndarray]]:
    """Logits of the whole prompt in one step, and the last-token logits of an incremental decode in ``splits``."""
    whisper = OnnxWhisper(folder, threads=1)
    cross = whisper.encoder.run(None, {"input_features": features.numpy()})
    empty = [whisper._empty_cache] * 2 * whisper.n_layers
    feeds = {"input_ids": np.array([PROMPT])}
    for i in range(whisper.n_layers):
        feeds |= {f"past_key.{i}": empty[0], f"past_value.{i}": empty[0]}
        feeds |= {f"cross_key.{i}": cross[2 * i], f"cross_value.{i}": cross[2 * i + 1]}
    whole = whisper.decoder.run(["logits"], feeds)[0][0]
    steps, past, start = [], empty, 0
    for stop in splits:
        logits, past = whisper._step(np.array([PROMPT[start:stop]]), past, cross)
        steps.append(logits)
        start = stop
    return whole, steps


def _assert_same_logits(folder, model, features):
    reference = _reference_logits(model, features)
    whole, steps = _onnx_logits(folder, features)
    np.testing.assert_allclose(whole, reference, atol=2e-5, rtol=0)
    for logits, position in zip(steps, (3, 4, 6)):
        np.testing.assert_allclose(logits, reference[position], atol=2e-5, rtol=0)


@pytest.mark.parametrize("spec", ["int2-g32", "int3-g32", "int4-g32", "int8-g32", "int4-g64", "int4-per_channel"])
def test_pack_nbits_holds_the_codes_and_scales_exactly(spec):
    q = quantize_weight(torch.randn(48, 256), QuantSpec.parse(spec))
    packed, scales, bits, block = pack_nbits(q)
    assert packed.dtype == torch.uint8 and packed.shape == (48, 256 * bits // 8)
    assert bits == {2: 2, 3: 4, 4: 4, 8: 8}[q.bits]
    assert torch.equal(_unpack(packed, scales, bits, block), q.dequantize(torch.float32))


def test_pack_nbits_refuses_what_onnxruntime_blocks_cannot_hold():
    with pytest.raises(ValueError, match="groups of 8"):
        pack_nbits(quantize_weight(torch.randn(4, 64), QuantSpec.parse("int4-g8")), "fc1")
    q3_k = quantize_weight(torch.randn(4, 256), as_spec("q3_K"))
    with pytest.raises(ValueError, match="whisper.cpp"):
        pack_nbits(q3_k, "fc1")


@pytest.mark.parametrize("spec", ["int4-g32", "int3-g32", "int2-g32", "int8-g32", "int4-per_channel"])
def test_quantized_student_runs_in_onnxruntime_as_in_transformers(short_window_whisper, spec, tmp_path):
    """Whole prompt and step-by-step decoding with the key/value cache give transformers' logits of the
    fake-quantized student: the MatMulNBits / GatherBlockQuantized weights are its codes."""
    model, processor = short_window_whisper
    student = _student(model, spec)
    folder = export_onnx(student, processor, tmp_path / "onnx")
    _assert_same_logits(folder, student, torch.randn(1, 80, 100, generator=torch.Generator().manual_seed(0)))


def test_the_tied_embedding_is_stored_once_packed_and_every_other_tensor_in_float16(short_window_whisper, tmp_path):
    model, processor = short_window_whisper
    model = _varied(model)
    folder = export_onnx(_student(model, "int4-g32"), processor, tmp_path / "onnx")
    decoder = onnx.load(str(folder / DECODER_FILE))
    vocab, width = model.config.vocab_size, model.config.d_model
    packed = [t for t in decoder.graph.initializer if t.data_type == onnx.TensorProto.UINT8]
    assert [tuple(t.dims) for t in packed if t.dims[0] == vocab] == [(vocab, width // 2)]
    encoder = onnx.load(str(folder / ENCODER_FILE))
    config = model.config
    ops = [node.op_type for node in decoder.graph.node]
    assert ops.count("GatherBlockQuantized") == 1 and "Gemm" not in ops
    # Per decoder layer: self-attention q, k, v, out; cross-attention q, out; fc1, fc2; then the output projection.
    assert ops.count("MatMulNBits") == 8 * config.decoder_layers + 1
    # Per encoder layer q, k, v, out, fc1, fc2; and every decoder layer's cross-attention k, v.
    encoder_ops = [node.op_type for node in encoder.graph.node]
    assert encoder_ops.count("MatMulNBits") == 6 * config.encoder_layers + 2 * config.decoder_layers
    for graph in (decoder.graph, encoder.graph):
        assert not [t.name for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT]
    # On disk: the packed codes (half a byte each), a float16 scale per 32 of them, and the float16 rest.
    summary = json.loads((folder / EXPORT_FILE).read_text())
    quantized = sum(model.get_submodule(name).weight.numel() for name in summary["quantized"])
    others = sum(p.numel() for p in model.parameters()) - quantized
    planned = quantized // 2 + quantized // 32 * 2 + 2 * others
    stored = sum(len(t.raw_data) for graph in (decoder.graph, encoder.graph) for t in graph.initializer)
    assert stored == planned
    assert onnx_file_bytes(folder) - stored < 150_000  # the graphs themselves (their nodes and names)
    assert set(summary["files"]) == {ENCODER_FILE, DECODER_FILE}


def test_a_float_model_exports_in_float16_or_round_to_nearest(short_window_whisper, tmp_path):
    model, processor = short_window_whisper
    model = _varied(model)
    features = torch.randn(1, 80, 100, generator=torch.Generator().manual_seed(1))
    _assert_same_logits(export_onnx(model, processor, tmp_path / "float"), model, features)
    # float16 on disk, the tied embedding and output projection once
    assert onnx_file_bytes(tmp_path / "float") < 2 * sum(p.numel() for p in model.parameters()) + 150_000

    folder = export_onnx(model, processor, tmp_path / "int4", quantize="int4-g32")
    rounded = copy.deepcopy(model)
    for name in default_quant_targets(rounded, embedding=True):
        weight = rounded.get_submodule(name).weight
        weight.data = quantize_weight(weight.data, QuantSpec.parse("int4-g32")).dequantize(torch.float32)
    _assert_same_logits(folder, rounded, features)
    assert onnx_file_bytes(folder) < onnx_file_bytes(tmp_path / "float") / 3
    with pytest.raises(ValueError, match="already holds quantized codes"):
        export_onnx(_student(model, "int4-g32"), processor, tmp_path / "twice", quantize="int4-g32")


def test_a_compressed_folder_exports_its_packed_codes(short_window_whisper, tmp_path):
    from hf_whisper_kdq.export import save_compressed

    model, processor = short_window_whisper
    student = _student(model, "int4-g32")
    save_compressed(student, processor, tmp_path / "packed")
    folder = export_onnx(tmp_path / "packed", None, tmp_path / "onnx")
    convert_qat(student)  # the folder's weights: the student's fake-quantized ones
    _assert_same_logits(folder, student, torch.randn(1, 80, 100, generator=torch.Generator().manual_seed(2)))


def test_output_folder_rules(short_window_whisper, tmp_path):
    model, processor = short_window_whisper
    folder = export_onnx(model, processor, tmp_path / "onnx")
    export_onnx(model, processor, folder)  # a previous ONNX export is replaced
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not written by hf_whisper_kdq"):
        export_onnx(model, processor, mine, overwrite=True)
    assert (mine / "notes.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="WhisperProcessor"):
        export_onnx(model, None, tmp_path / "other")


def test_cli_export_onnx(short_window_whisper, tmp_path, capsys):
    from hf_whisper_kdq.cli import main
    from hf_whisper_kdq.sources import save_whisper

    model, processor = short_window_whisper
    source = save_whisper(model, processor, tmp_path / "tiny")
    assert main(["export-onnx", str(source), str(tmp_path / "onnx"), "--quantize", "int4-g32"]) == 0
    assert "MB of ONNX graphs" in capsys.readouterr().out
    assert len(json.loads((tmp_path / "onnx" / EXPORT_FILE).read_text())["quantized"]) == len(
        default_quant_targets(model, embedding=True)
    )
    with pytest.raises(SystemExit):
        main(["export-onnx", str(source), str(tmp_path / "bad"), "--quantize", "int5-g32"])
