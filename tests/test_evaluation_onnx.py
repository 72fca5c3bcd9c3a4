"""evaluation_onnx: greedy decoding of an ONNX export in onnxruntime, against transformers' generate of the same
model, and its evaluation report."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import real_whisper_and_english_audios
from test_export_onnx import _student

from hf_whisper_kdq.evaluation import transcribe
from hf_whisper_kdq.export.onnx import export_onnx, onnx_file_bytes

pytest.importorskip("onnxruntime")
from hf_whisper_kdq.evaluation_onnx import OnnxWhisper, evaluate_onnx, transcribe_onnx  # noqa: E402


def _audios(n: int, seed: int = 0) -> list[np.ndarray]:
    generator = np.random.default_rng(seed)
    return [(0.1 * generator.standard_normal(16000)).astype(np.float32) for _ in range(n)]


@pytest.fixture
def exported(short_window_whisper, tmp_path):
    model, processor = short_window_whisper
    student = _student(model, "int4-g32")
    return student, processor, export_onnx(student, processor, tmp_path / "onnx")


def test_greedy_transcripts_equal_transformers_generate(exported):
    """The prompt (start, language, task, no timestamps), suppressed tokens and the stop give generate()'s tokens."""
    student, processor, folder = exported
    audios = _audios(3)
    for language in ("en", "zh", None):  # None: the language is detected, by both, from the same logits
        expected = transcribe(student, processor, audios, languages=language, max_new_tokens=12, progress=False)
        assert transcribe_onnx(folder, audios, language, threads=1, max_new_tokens=12) == expected


def test_an_english_only_model_gets_its_prompt_and_refuses_other_languages(exported):
    student, processor, folder = exported
    whisper = OnnxWhisper(folder, threads=1)
    for config in (whisper.generation_config, student.generation_config):  # as openai/whisper-tiny.en's
        config.is_multilingual = False
        del config.lang_to_id
    audios = _audios(2, seed=1)
    expected = transcribe(student, processor, audios, max_new_tokens=6, progress=False)
    assert whisper.transcribe(audios, "en", max_new_tokens=6) == expected
    with pytest.raises(ValueError, match="English-only"):
        whisper.transcribe(audios[:1], "zh")


def test_evaluate_onnx_reports_scores_speed_and_graph_bytes(exported):
    from datasets import Dataset

    _, _, folder = exported
    dataset = Dataset.from_list(
        [
            {
                "id": f"u{i}",
                "corpus": "noise",
                "language": "en",
                "audio": {"array": audio, "sampling_rate": 16000},
                "duration": 1.0,
                "text": "hello world",
            }
            for i, audio in enumerate(_audios(2))
        ]
    )
    report = evaluate_onnx(folder, dataset, threads=1, max_new_tokens=4)
    assert report.model_size_bytes == onnx_file_bytes(folder) and report.model_size_source == "disk"
    assert report.n_utterances == 2 and report.corpora[0]["rtf"] > 0
    assert 0 <= report.corpora[0]["error_rate"]


def test_the_evaluate_command_decodes_an_export_folder_with_onnxruntime(exported, tmp_path, capsys):
    import soundfile

    from hf_whisper_kdq.cli import main

    _, _, folder = exported
    soundfile.write(tmp_path / "noise.wav", _audios(1)[0], 16000)
    row = {"id": "n0", "corpus": "noise", "language": "en", "audio": "noise.wav", "duration": 1.0, "text": "hi"}
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text(json.dumps(row) + "\n")
    report_path = tmp_path / "report.json"
    command = ["evaluate", str(folder), "--manifest", str(manifest), "--max_new_tokens", "4", "--progress", "false"]
    assert main([*command, "--output_json", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert report["dtype"] == "onnxruntime" and report["model_size_bytes"] == onnx_file_bytes(folder)
    assert report["n_utterances"] == 1 and "| noise | en | WER |" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--num_beams 1"):
        main([*command, "--num_beams", "2"])
    with pytest.raises(ValueError, match="leave the flag out"):
        main([*command, "--temperature_fallback"])


def test_a_folder_without_graphs_is_refused_with_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="export_onnx"):
        OnnxWhisper(tmp_path)


@pytest.mark.slow
def test_real_tiny_en_at_int8_transcribes_like_transformers(shared_speech, tmp_path):
    """whisper-tiny.en (offline pack), quantized to int8 blocks on export, transcribes real LJSpeech clips in
    onnxruntime as the float transformers model does: near word-for-word."""
    from hf_whisper_kdq.scoring import score

    model, processor, audios = real_whisper_and_english_audios("openai/whisper-tiny.en", shared_speech, 4)
    folder = export_onnx(model, processor, tmp_path / "onnx", quantize="int8-g32")
    texts = transcribe_onnx(folder, audios, "en", threads=2)
    reference = transcribe(model, processor, audios, progress=False)
    assert all(texts)
    assert score(reference, texts, "en")["wer"] <= 0.1, (reference, texts)
