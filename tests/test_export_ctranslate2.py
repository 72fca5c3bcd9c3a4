"""CTranslate2 export (CTranslate2's own converter) and faster-whisper evaluation."""

from __future__ import annotations

import copy
import json
import sys

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("ctranslate2")
faster_whisper = pytest.importorskip("faster_whisper")

from hf_whisper_kdq import data  # noqa: E402
from hf_whisper_kdq.evaluation_ctranslate2 import evaluate_faster_whisper, transcribe_faster_whisper  # noqa: E402
from hf_whisper_kdq.export.ctranslate2 import QUANTIZATIONS, export_ctranslate2  # noqa: E402
from hf_whisper_kdq.files import CT2_EXPORT_MARKER  # noqa: E402
from hf_whisper_kdq.quant import FakeQuantLinear, QuantSpec, convert_qat, prepare_qat  # noqa: E402
from hf_whisper_kdq.sources import load_whisper, save_whisper  # noqa: E402

SR = data.SAMPLING_RATE


def _tone(seconds: float = 1.0, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _logits(model, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(1, model.config.num_mel_bins, 3000, generator=generator)
    tokens = torch.tensor([[50258, 50259, 50359, 50363, 440, 2068, 3699, 291]])
    with torch.no_grad():
        return model(input_features=features, decoder_input_ids=tokens).logits


@pytest.fixture(scope="module")
def exported(_tiny_whisper_session, tmp_path_factory):
    """The tiny random model exported once per weight type: {quantization: folder}."""
    model, processor = _tiny_whisper_session
    root = tmp_path_factory.mktemp("ct2_exports")
    return {q: export_ctranslate2(model, processor, root / q, quantization=q) for q in ("float32", "int8")}


def test_export_writes_a_faster_whisper_folder(exported, _tiny_whisper_session):
    folder = exported["int8"]
    names = {path.name for path in folder.iterdir()}
    assert {"model.bin", "config.json", "tokenizer.json", "preprocessor_config.json", CT2_EXPORT_MARKER} <= names
    assert any(name.startswith("vocabulary.") for name in names)
    assert json.loads((folder / CT2_EXPORT_MARKER).read_text())["quantization"] == "int8"
    config = json.loads((folder / "config.json").read_text())
    generation_config = _tiny_whisper_session[0].generation_config
    assert config["suppress_ids"] == list(generation_config.suppress_tokens)
    assert config["lang_ids"] == sorted(generation_config.lang_to_id.values())
    # int8 weights are about 4x smaller than float32 ones
    assert (folder / "model.bin").stat().st_size < 0.4 * (exported["float32"] / "model.bin").stat().st_size
    # nothing left beside the target (staging and HF temp folders are removed)
    assert sorted(path.name for path in folder.parent.iterdir()) == ["float32", "int8"]


def test_float32_export_reproduces_the_logits(exported, _tiny_whisper_session):
    model, _ = _tiny_whisper_session
    reloaded, processor = load_whisper(exported["float32"])  # the package's own CTranslate2 reader
    torch.testing.assert_close(_logits(reloaded), _logits(model), atol=1e-5, rtol=1e-5)
    assert processor.tokenizer.convert_tokens_to_ids("<|startoftranscript|>") == 50258


def test_int8_export_logits_are_close(exported, _tiny_whisper_session):
    model, _ = _tiny_whisper_session
    reloaded, _ = load_whisper(exported["int8"])
    expected, actual = _logits(model), _logits(reloaded)
    assert not torch.equal(actual, expected)  # really quantized
    assert (actual - expected).abs().max() < 0.05 * expected.abs().max()
    cosine = torch.nn.functional.cosine_similarity(actual.flatten(), expected.flatten(), dim=0)
    assert cosine > 0.999


def test_faster_whisper_transcribes_the_export(exported):
    whisper = faster_whisper.WhisperModel(str(exported["int8"]), device="cpu", compute_type="int8")
    segments, info = whisper.transcribe(
        _tone(),
        language="en",
        beam_size=1,
        without_timestamps=True,
        condition_on_previous_text=False,
        vad_filter=False,
        max_new_tokens=16,
    )
    assert all(isinstance(segment.text, str) for segment in segments)
    assert info.language == "en"
    texts = transcribe_faster_whisper(exported["int8"], [_tone(), _tone(0.5, 880.0)], "en", max_new_tokens=8)
    assert len(texts) == 2 and all(isinstance(text, str) for text in texts)
    with pytest.raises(ValueError, match="2 audios"):
        transcribe_faster_whisper(whisper, [_tone(), _tone()], ["en"])


def test_qat_student_exports_its_dequantized_weights(tiny_whisper, tmp_path):
    model, processor = tiny_whisper
    names = [f"model.decoder.layers.{i}.{leaf}" for i in range(2) for leaf in ("fc1", "fc2")]
    names += ["model.encoder.layers.0.self_attn.q_proj"]
    prepare_qat(model, {name: QuantSpec.parse("int4-g32") for name in names})
    model.add_module("kdq_adapters", nn.ModuleDict({"encoder": nn.Linear(64, 64)}))
    reference = copy.deepcopy(model)
    del reference.kdq_adapters
    convert_qat(reference)

    folder = export_ctranslate2(model, processor, tmp_path / "qat", quantization="float32")

    assert isinstance(model.model.decoder.layers[0].fc1, FakeQuantLinear) and hasattr(model, "kdq_adapters")
    exported, _ = load_whisper(folder)
    for name in names:
        weight = exported.get_submodule(name).weight
        torch.testing.assert_close(weight, reference.get_submodule(name).weight, atol=0, rtol=0)
        assert not torch.equal(weight, model.get_submodule(name).weight)  # not the float weights
        assert len(torch.unique(weight[0, :32])) <= 15  # int4: at most 15 levels per group
    torch.testing.assert_close(_logits(exported), _logits(reference), atol=1e-5, rtol=1e-5)


def test_export_from_an_hf_folder(tiny_whisper, tmp_path):
    model, processor = tiny_whisper
    hf_folder = save_whisper(model, processor, tmp_path / "hf")
    folder = export_ctranslate2(hf_folder, None, tmp_path / "ct2", quantization="float32")
    reloaded, _ = load_whisper(folder)
    torch.testing.assert_close(_logits(reloaded), _logits(model), atol=1e-5, rtol=1e-5)
    # A CTranslate2 folder is a source too: re-quantize it.
    requantized = export_ctranslate2(folder, output_dir=tmp_path / "ct2-int16", quantization="int16")
    assert json.loads((requantized / CT2_EXPORT_MARKER).read_text())["source"] == str(folder)


@pytest.mark.parametrize("quantization", ["int4", "fp8", "INT8", ""])
def test_bad_quantization_is_refused_before_anything_is_written(tiny_whisper, tmp_path, quantization):
    model, processor = tiny_whisper
    with pytest.raises(ValueError, match="int8_float16"):
        export_ctranslate2(model, processor, tmp_path / "out", quantization=quantization)
    assert list(tmp_path.iterdir()) == []
    assert "bfloat16" in QUANTIZATIONS


def test_model_without_processor_is_refused(tiny_whisper, tmp_path):
    with pytest.raises(ValueError, match="WhisperProcessor"):
        export_ctranslate2(tiny_whisper[0], None, tmp_path / "out")


def test_foreign_folder_is_refused_even_with_overwrite(tiny_whisper, tmp_path):
    model, processor = tiny_whisper
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match="not written by hf_whisper_kdq"):
            export_ctranslate2(model, processor, foreign, quantization="float32", overwrite=overwrite)
    assert [path.name for path in foreign.iterdir()] == ["notes.txt"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["foreign"]  # no staging left behind

    # another folder of ours (a save_whisper copy) is replaced only with overwrite=True
    target = save_whisper(model, processor, tmp_path / "target")
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        export_ctranslate2(model, processor, target, quantization="float32")
    export_ctranslate2(model, processor, target, quantization="int8", overwrite=True)
    assert (target / "model.bin").is_file() and not (target / "model.safetensors").exists()
    # a previous export is replaced without overwrite; an empty folder is simply used
    export_ctranslate2(model, processor, target, quantization="float32")
    assert json.loads((target / CT2_EXPORT_MARKER).read_text())["quantization"] == "float32"
    (tmp_path / "empty").mkdir()
    export_ctranslate2(model, processor, tmp_path / "empty", quantization="int8")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["empty", "foreign", "target"]
    (tmp_path / "file").write_text("")
    with pytest.raises(FileExistsError, match="not a folder"):
        export_ctranslate2(model, processor, tmp_path / "file")


def test_missing_ctranslate2_gives_the_install_hint(tiny_whisper, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ctranslate2.converters", None)
    with pytest.raises(ImportError, match=r'pip install "hf-whisper-kdq\[export\]"'):
        export_ctranslate2(*tiny_whisper, tmp_path / "out")
    monkeypatch.setitem(sys.modules, "faster_whisper", None)
    with pytest.raises(ImportError, match=r"hf-whisper-kdq\[export\]"):
        transcribe_faster_whisper(tmp_path, [_tone()], "en")


def test_evaluate_faster_whisper_report(exported, tmp_path):
    import soundfile

    paths = []
    for i, freq in enumerate((440.0, 660.0)):
        paths.append(str(tmp_path / f"tone{i}.wav"))
        soundfile.write(paths[-1], _tone(1.0, freq), SR)
    dataset = data.manifest_dataset(
        {
            "id": ["a", "b", "c"],
            "corpus": ["tones", "tones", "hanzi"],
            "language": ["en", "en", "zh"],
            "audio": [{"path": p, "bytes": None} for p in (*paths, paths[0])],
            "duration": [1.0, 1.0, 1.0],
            "text": ["a tone", "another tone", "音调"],
        }
    )
    report = evaluate_faster_whisper(exported["int8"], dataset, max_new_tokens=8)
    assert [(e["corpus"], e["language"], e["metric"]) for e in report.corpora] == [
        ("tones", "en", "wer"),
        ("hanzi", "zh", "cer"),
    ]
    assert set(report.languages) == {"en", "zh"} and report.n_utterances == 3
    assert report.audio_seconds == pytest.approx(3.0) and report.rtf > 0
    assert report.model_size_bytes == (exported["int8"] / "model.bin").stat().st_size
    assert report.batch_size == 1 and report.num_beams == 1 and report.dtype.startswith("int8")
    assert "| tones | en | WER |" in report.summary_table()


@pytest.mark.slow
def test_whisper_tiny_en_int8_transcribes_ljspeech(shared_speech, tmp_path):
    model, processor = load_whisper("openai/whisper-tiny.en")
    folder = export_ctranslate2(model, processor, tmp_path / "tiny.en-int8", quantization="int8")
    dataset = data.load_manifest(shared_speech / "dev.jsonl", corpora=["ljspeech"], limit=3)
    assert len(dataset) == 3
    report = evaluate_faster_whisper(folder, dataset, compute_type="int8")
    hypotheses = [u["hypothesis"] for u in report.utterances]
    assert all(hypotheses), hypotheses
    assert report.languages["en"]["pooled"] < 0.3, report.utterances
    with pytest.raises(ValueError, match="cannot transcribe language"):
        transcribe_faster_whisper(folder, [_tone()], "zh")
