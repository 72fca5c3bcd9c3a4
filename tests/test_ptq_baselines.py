"""The post-training baselines of the results table: codes from another quantizer stored in the package's packed
layout (``save_compressed(codes=...)``), read back from any pack-quantized folder (``benchmarks/gptq_baseline.py``),
and GPTQ by llm-compressor in its own venv, run when that venv exists (``../venv-llmc``, or
``HF_WHISPER_KDQ_LLMC_PYTHON``) and skipped otherwise."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("compressed_tensors", minversion="0.20")

from hf_whisper_kdq.evaluation import EvaluationReport  # noqa: E402
from hf_whisper_kdq.export import save_compressed  # noqa: E402
from hf_whisper_kdq.quant import QuantSpec, convert_qat, default_quant_targets, prepare_qat, quantize_weight  # noqa: E402
from hf_whisper_kdq.sources import load_whisper, save_whisper  # noqa: E402

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path[:0] = [str(BENCHMARKS)]

import gptq_baseline  # noqa: E402
import results_rows  # noqa: E402
import results_table  # noqa: E402

EMBEDDING = "model.decoder.embed_tokens"
LLMC_PYTHON = Path(
    os.environ.get("HF_WHISPER_KDQ_LLMC_PYTHON", Path(__file__).resolve().parents[2] / "venv-llmc" / "bin" / "python")
)


def _layout(model, spec: str = "int4-g32") -> None:
    prepare_qat(model, {**dict.fromkeys(default_quant_targets(model), spec), EMBEDDING: spec})


def _other_codes(model, names: list[str], spec: str = "int4-g32") -> dict:
    """Codes that round-to-nearest would not give: each group clipped to 70% of its range."""
    parsed = QuantSpec.parse(spec)
    codes = {}
    for name in names:
        weight = model.get_submodule(name).weight.detach()
        clip = torch.full(parsed.scale_shape(weight.shape), 0.7)
        codes[name] = quantize_weight(weight, parsed, clip, layer=name)
    return codes


def test_given_codes_are_stored_in_the_same_layout_and_bytes(tiny_whisper, tmp_path):
    model, processor = tiny_whisper
    _layout(model)
    first = default_quant_targets(model)[0]
    given = _other_codes(model, [first, "proj_out"])
    rtn = save_compressed(model, processor, tmp_path / "rtn")
    ours = save_compressed(model, processor, tmp_path / "given", codes=given)
    assert ours.weights_bytes == rtn.weights_bytes and ours.embedding_quantized and ours.dense_load
    stored = gptq_baseline.read_packed_codes(tmp_path / "given")
    baked = convert_qat(copy.deepcopy(model))
    # The given codes replace round-to-nearest's, the tied table's through proj_out; every other layer keeps RTN.
    for name, q in given.items():
        key = EMBEDDING if name == "proj_out" else name
        assert torch.equal(stored[key].codes, q.codes) and torch.equal(stored[key].scales, q.scales)
        assert not torch.equal(stored[key].codes, baked[name].codes)
    second = default_quant_targets(model)[1]
    assert torch.equal(stored[second].codes, baked[second].codes)
    loaded, _ = load_whisper(tmp_path / "given")  # dense load: codes × fp16 scales, rounded to fp16
    expected = given[first].dequantize(torch.float32).half().float()
    torch.testing.assert_close(loaded.get_submodule(first).weight, expected, rtol=0, atol=0)
    assert loaded.proj_out.weight is loaded.get_submodule(EMBEDDING).weight


def test_a_compress_run_becomes_a_row_of_the_table(tiny_whisper, tmp_path):
    """`--compress_runs NAME=FOLDER[:EVAL.json]`: the packed folder's bytes, the given evaluation, the training."""
    model, processor = tiny_whisper
    teacher = save_whisper(model, processor, tmp_path / "teacher")
    _layout(model, "int3-g32")
    run = tmp_path / "run"
    packed = save_compressed(model, processor, run / "compressed")
    corpora = [
        {
            "corpus": corpus,
            "language": language,
            "metric": metric,
            "error_rate": rate,
            "errors": 1,
            size: 4,
            "n_utterances": 2,
            "audio_seconds": 4.0,
            "decode_seconds": 1.0,
            "rtf": 0.25,
        }
        for corpus, language, metric, size, rate in (
            ("ljspeech", "en", "wer", "n_reference_words", 0.25),
            ("aishell1-sample", "zh", "cer", "n_reference_chars", 0.5),
        )
    ]
    report = EvaluationReport(None, 1, 1, "disk", 8, 1, "cpu", "float32", corpora=corpora)
    report.summarize()
    report.save_json(tmp_path / "dev.json")
    arguments = {
        "compress": {"teacher": str(teacher), "level": "int3", "max_train_samples": 240, "train_manifest": "a.jsonl"},
        "training": {"max_steps": 30, "per_device_train_batch_size": 8, "learning_rate": 5e-5, "seed": 1},
    }
    summary = {"arguments": arguments, "training_log": [{"train_runtime": 12.5}], "phase_seconds": {"train": 13.0}}
    (run / "compress_summary.json").write_text(json.dumps(summary))
    output = tmp_path / "table"
    argv = [
        "--teacher",
        str(teacher),
        "--output",
        str(output),
        "--compress_runs",
        f"int3-s1={run}:{tmp_path / 'dev.json'}",
    ]
    assert results_table.main(argv) == 0
    row = json.loads((output / "rows" / "int3-s1.json").read_text())
    assert (
        row["sizes"]["bytes_on_disk"]
        == packed.weights_bytes
        == (run / "compressed" / "model.safetensors").stat().st_size
    )
    assert row["training"]["seed"] == 1 and row["training"]["train_runtime_s"] == 12.5
    table = (output / "results.md").read_text()
    assert (
        "| int3-s1 |" in table
        and "25.0%" in table
        and "50.0%" in table
        and "compress --level int3` output run, 30 steps, seed 1" in table
    )
    with pytest.raises(ValueError, match="pass --teacher"):
        results_table.main(["--output", str(output), "--compress_runs", f"other={run}"])


def test_given_codes_of_another_layout_or_layer_are_refused(tiny_whisper, tmp_path):
    model, processor = tiny_whisper
    _layout(model)
    first = default_quant_targets(model)[0]
    with pytest.raises(ValueError, match="do not have the layer's spec"):
        save_compressed(model, processor, tmp_path / "a", codes=_other_codes(model, [first], "int4-g64"))
    with pytest.raises(ValueError, match="not quantized"):
        save_compressed(model, processor, tmp_path / "b", codes={"model.encoder.conv1": None})
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_gptq_targets_follow_the_row_components(tiny_whisper):
    model, _ = tiny_whisper
    decoder = default_quant_targets(model, encoder=False)
    assert gptq_baseline.gptq_targets(model, ["decoder", "embedding"]) == [*decoder, "proj_out"]
    assert gptq_baseline.gptq_targets(model, ["encoder", "decoder"]) == default_quant_targets(model)


def test_a_missing_venv_or_library_says_how_to_make_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m venv ../venv-llmc"):
        gptq_baseline.check_llmcompressor(tmp_path / "nowhere" / "python")
    if importlib.util.find_spec("llmcompressor") is None:  # the main environment, as it should stay
        with pytest.raises(RuntimeError, match="cannot import llmcompressor"):
            gptq_baseline.check_llmcompressor(sys.executable)


def test_every_gptq_row_has_rtn_and_searched_clip_rows_of_its_layout():
    rows = results_table.ROWS
    for layout in results_rows.BASELINE_LAYOUTS:
        rtn, clip, gptq = rows[f"ptq-{layout}"], rows[f"ptq-clip-{layout}"], rows[f"gptq-{layout}"]
        rtn_table = rows[f"gptq-rtnemb-{layout}"]
        assert gptq["kind"] == rtn_table["kind"] == "gptq" and rtn["kind"] == clip["kind"] == "ptq"
        assert gptq["specs"] == rtn_table["specs"] == rtn["specs"] and rtn_table["tied_embedding"] == "rtn"
        assert {c: QuantSpec.parse(s) for c, s in clip["specs"].items()} == {
            c: QuantSpec.parse(s + "-clip") for c, s in rtn["specs"].items()
        }
        assert rows[f"ptq-oclip-{layout}"]["specs"] == clip["specs"]
        assert results_table.expand_rows(f"baselines-{layout}") == [
            f"{method}-{layout}" for method in ("ptq", "ptq-clip", "ptq-oclip", "gptq", "gptq-rtnemb")
        ]


@pytest.fixture(scope="module")
def llmcompressor_int3_run(_tiny_whisper_session, tmp_path_factory):
    """(model, processor, calibration tensors, llm-compressor's int3 g32 GPTQ codes of every linear and the tied
    embedding): one llm-compressor run on the tiny Whisper, shared by the tests below."""
    if not LLMC_PYTHON.is_file():
        pytest.skip(f"no llm-compressor venv at {LLMC_PYTHON}")
    gptq_baseline.check_llmcompressor(LLMC_PYTHON)
    model, processor = _tiny_whisper_session
    tmp_path = tmp_path_factory.mktemp("llmc")
    save_whisper(model, processor, tmp_path / "teacher")
    generator = torch.Generator().manual_seed(0)
    calibration = {
        "input_features": torch.randn(3, 80, 3000, generator=generator).half(),
        "decoder_input_ids": [[50258, 50259, 50359, 50363, 400, 1200], [50258, 50260, 50359, 50363, 7], [50258]],
    }
    torch.save(calibration, tmp_path / "calibration.pt")
    targets = gptq_baseline.gptq_targets(model, ["encoder", "decoder", "embedding"])
    run = gptq_baseline.run_llmcompressor(
        LLMC_PYTHON,
        tmp_path / "teacher",
        tmp_path / "calibration.pt",
        targets,
        tmp_path / "gptq",
        bits=3,
        group_size=32,
    )
    assert run["calibration_rows"] == 3 and run["pipeline"] == "basic"
    codes = gptq_baseline.read_packed_codes(tmp_path / "gptq")
    assert sorted(codes) == sorted(targets)
    return copy.deepcopy(model), processor, calibration, codes


def test_llmcompressor_gptq_codes_land_unchanged_in_the_rtn_layout(llmcompressor_int3_run, tmp_path):
    model, processor, _, codes = llmcompressor_int3_run
    targets = sorted(codes)
    layout = copy.deepcopy(model)
    _layout(layout, "int3-g32")
    rtn = save_compressed(layout, processor, tmp_path / "rtn")
    ours = save_compressed(layout, processor, tmp_path / "ours", codes=codes)
    assert ours.weights_bytes == rtn.weights_bytes
    stored = gptq_baseline.read_packed_codes(tmp_path / "ours")
    for name, q in codes.items():
        key = EMBEDDING if name == "proj_out" else name
        assert torch.equal(stored[key].codes, q.codes) and torch.equal(stored[key].scales, q.scales), name
    # GPTQ is not round-to-nearest: its error feedback moves codes.
    baked = convert_qat(copy.deepcopy(layout))
    assert any(not torch.equal(codes[n].codes, baked[n].codes) for n in targets)
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["quantization_config"]["dequantize"] is True


def test_our_gptq_is_as_good_as_llmcompressors_on_the_same_inputs(llmcompressor_int3_run):
    """quant.gptq against llm-compressor's GPTQ (its basic pipeline: every linear calibrated on the float model's
    inputs) on the same calibration rows: the output error ``tr(ΔW H ΔWᵀ)`` of our codes (no clipping, our grid) is
    no worse than theirs over the encoder and decoder linears, and both are well below round-to-nearest's."""
    from hf_whisper_kdq.quant.gptq import InputHessian, gptq_quantize

    model, _, calibration, codes = llmcompressor_int3_run
    names = default_quant_targets(model)
    hessians = {name: InputHessian(model.get_submodule(name).in_features) for name in names}
    handles = [
        model.get_submodule(name).register_forward_hook(lambda m, args, out, h=hessians[name]: h.add(args[0]))
        for name in names
    ]
    with torch.no_grad():
        for features, ids in zip(calibration["input_features"], calibration["decoder_input_ids"], strict=True):
            model(input_features=features[None].float(), decoder_input_ids=torch.tensor([ids]))
    for handle in handles:
        handle.remove()
    spec = QuantSpec.parse("int3-g32")
    errors = {"ours": 0.0, "llm-compressor": 0.0, "round-to-nearest": 0.0}
    for name in names:
        weight, hessian = model.get_submodule(name).weight.detach(), hessians[name].matrix()
        for method, q in (
            ("ours", gptq_quantize(weight, hessian, spec, layer=name)),
            ("llm-compressor", codes[name]),
            ("round-to-nearest", quantize_weight(weight, spec)),
        ):
            delta = q.dequantize(torch.float32) - weight
            errors[method] += float(torch.einsum("ij,jk,ik->", delta, hessian, delta))
    assert errors["ours"] <= 1.02 * errors["llm-compressor"], errors
    assert errors["llm-compressor"] < 0.9 * errors["round-to-nearest"], errors


def test_kdq_on_a_gptq_encoder_ships_the_given_encoder_codes(tiny_whisper, tmp_path, monkeypatch):
    """benchmarks/gptq_init_kdq.py with GPTQ's codes stood in for by other codes (llm-compressor is not in this
    environment): the frozen encoder trains on their values, the folder stores them exactly and loads them, the
    decoder and the embedding are packed at the recipe's width."""
    import gptq_init_kdq
    from conftest import write_tones_manifest
    from safetensors import safe_open

    model, processor = tiny_whisper
    teacher_folder = save_whisper(model, processor, tmp_path / "teacher")
    encoder = default_quant_targets(model, decoder=False)
    decoder = default_quant_targets(model, encoder=False)
    given = _other_codes(model, encoder + decoder)
    calls = []

    def fake_gptq(python, teacher, processor_, components, **kwargs):
        calls.append((components, kwargs["bits"], kwargs["group_size"]))
        return dict(given), {"stand_in": True}

    monkeypatch.setattr(gptq_init_kdq, "gptq_codes", fake_gptq)
    manifest = write_tones_manifest(tmp_path)
    argv = ["--teacher", str(teacher_folder), "--train_manifest", str(manifest), "--level", "int4"]
    argv += ["--train_labels", "reference"]  # a random teacher's transcripts loop past 448 tokens
    argv += ["--max_steps", "2", "--per_device_train_batch_size", "2", "--output_dir", str(tmp_path / "run")]
    summary = gptq_init_kdq.main(argv)
    assert calls == [(["encoder", "decoder", "embedding"], 4, 32)]
    folder = Path(summary["folder"])
    stored = gptq_baseline.read_packed_codes(folder)
    for name in encoder:
        assert torch.equal(stored[name].codes, given[name].codes) and torch.equal(
            stored[name].scales, given[name].scales
        )
    assert all(stored[name].bits == 4 for name in decoder)
    with safe_open(str(folder / "model.safetensors"), "pt") as tensors:  # the embedding packed once
        assert "model.decoder.embed_tokens.weight_packed" in tensors.keys()
    from transformers import WhisperForConditionalGeneration

    loaded = WhisperForConditionalGeneration.from_pretrained(folder).eval()
    for name in encoder:  # the dense load multiplies codes by scales in fp16
        expected = given[name].dequantize(torch.float16).float()
        torch.testing.assert_close(loaded.get_submodule(name).weight, expected, rtol=0, atol=0)
    trained = json.loads((tmp_path / "run" / "gptq_init_kdq.json").read_text())
    assert trained["plan"]["units"] and trained["gptq"] == {"stand_in": True}
    with pytest.raises(ValueError, match="--freeze_encoder true"):
        gptq_init_kdq.main([*argv, "--freeze_encoder", "false"])

    class Started(Exception):
        pass

    def record_start(student, *args, **kwargs):
        starts.update({name: student.get_submodule(name).weight.detach().clone() for name in decoder})
        raise Started

    for flags, expected in (([], "teacher"), (["--decoder_from_gptq"], "gptq")):
        starts = {}
        monkeypatch.setattr(gptq_init_kdq, "train_student", record_start)
        with pytest.raises(Started):
            gptq_init_kdq.main([*argv, *flags])
        for name in decoder:
            start = given[name].dequantize(torch.float32) if expected == "gptq" else model.get_submodule(name).weight
            assert torch.equal(starts[name], start), (flags, name)
