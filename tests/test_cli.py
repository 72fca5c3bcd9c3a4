"""The ``hf-whisper-kdq`` command line: dispatch, help, positional arguments, config files, evaluate."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

from hf_whisper_kdq.cli import COMMANDS, main
from hf_whisper_kdq.sources import save_whisper


@pytest.fixture
def tiny_folder(tmp_path, short_window_whisper):
    model, processor = short_window_whisper
    return save_whisper(model, processor, tmp_path / "tiny")


@pytest.fixture
def tone_manifest(tmp_path):
    rows = []
    for i, language in enumerate(["en", "zh"]):
        audio = 0.1 * np.sin(2 * np.pi * 220 * (i + 1) * np.arange(16000) / 16000)
        sf.write(tmp_path / f"tone{i}.wav", audio, 16000)
        rows.append(
            {
                "id": f"tone{i}",
                "corpus": "tones",
                "language": language,
                "audio": f"tone{i}.wav",
                "duration": 1.0,
                "text": "hello world" if language == "en" else "你好",
            }
        )
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("\n".join(json.dumps(row, ensure_ascii=False) for row in rows) + "\n")
    return manifest


def test_usage_lists_commands(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "convert" in out and "evaluate" in out


def test_unknown_command_exits_2(capsys):
    assert main(["distil-everything"]) == 2
    assert "unknown command" in capsys.readouterr().err


def test_console_script_help_documents_every_flag():
    result = subprocess.run(["hf-whisper-kdq", "evaluate", "--help"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    for flag in ("--model_name_or_path", "--manifest", "--batch_size", "--num_beams", "--languages", "--output_json"):
        assert flag in result.stdout


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_prints_its_help(command, capsys):
    # argparse %-formats help strings: one stray "%" in a field's help crashed `compress --help`.
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"hf-whisper-kdq {command}" in capsys.readouterr().out


def test_evaluate_positional_model_and_json_report(tiny_folder, tone_manifest, tmp_path, capsys):
    report_path = tmp_path / "report.json"
    code = main(
        [
            "evaluate",
            str(tiny_folder),
            "--manifest",
            str(tone_manifest),
            "--max_new_tokens",
            "4",
            "--output_json",
            str(report_path),
            "--progress",
            "false",
        ]
    )
    assert code == 0
    report = json.loads(report_path.read_text())
    assert report["n_utterances"] == 2
    assert {c["corpus"] for c in report["corpora"]} == {"tones"}
    assert set(report["languages"]) == {"en", "zh"}
    assert report["model_size_source"] == "disk"
    assert "| tones | en | WER |" in capsys.readouterr().out


def test_evaluate_from_a_yaml_file(tiny_folder, tone_manifest, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model_name_or_path: {tiny_folder}\nmanifest: {tone_manifest}\nlanguages: en\nmax_new_tokens: 3\n"
        f"output_json: {tmp_path / 'out.json'}\nprogress: false\n"
    )
    assert main(["evaluate", str(config)]) == 0
    assert json.loads((tmp_path / "out.json").read_text())["n_utterances"] == 1


def test_evaluate_bad_flag_value_names_the_fix(tiny_folder, tone_manifest, capsys):
    with pytest.raises(SystemExit):
        main(["evaluate", str(tiny_folder), "--manifest", str(tone_manifest), "--batch_size", "0"])
    assert "--batch_size" in capsys.readouterr().err


def test_evaluate_without_manifest_is_a_labelled_smoke_run(tiny_folder, capsys):
    pytest.importorskip("piper")
    code = main(["evaluate", str(tiny_folder), "--limit", "2", "--max_new_tokens", "3", "--progress", "false"])
    assert code == 0
    out = capsys.readouterr().out
    assert out.count("SMOKE RUN") == 2  # before and after the table, so nobody mistakes it for a result
    assert "synthetic-piper" in out


def test_python_dash_m_entry_point():
    result = subprocess.run([sys.executable, "-m", "hf_whisper_kdq.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "commands:" in result.stdout


# Run without hf_whisper_kdq imported: a user's script loading the converted folder with plain transformers.
PLAIN_LOAD_AND_GENERATE = """
import sys, numpy as np, torch
from transformers import WhisperForConditionalGeneration, WhisperProcessor
model = WhisperForConditionalGeneration.from_pretrained(sys.argv[1])
processor = WhisperProcessor.from_pretrained(sys.argv[1])
features = processor(np.zeros(16000, dtype=np.float32), sampling_rate=16000, return_tensors="pt").input_features
assert features.dtype == torch.float32
model.generate(features, max_new_tokens=3)
assert "hf_whisper_kdq" not in sys.modules
print(model.dtype)
"""


def test_converted_fp16_folder_runs_the_usual_generate_in_plain_transformers(tiny_folder, tmp_path):
    """``convert --dtype float16`` stores fp16 weights, yet the folder declares float32 as the Hub's openai/whisper-*
    configs do: transformers 5 loads the declared dtype, and fp16 weights would refuse the processor's float32
    features ("Input type (float) and bias type (c10::Half) should be the same")."""
    from safetensors import safe_open

    output = tmp_path / "converted"
    assert main(["convert", str(tiny_folder), str(output), "--dtype", "float16"]) == 0
    with safe_open(str(output / "model.safetensors"), framework="pt") as weights:
        assert {weights.get_tensor(key).dtype for key in weights.keys()} == {torch.float16}
    result = subprocess.run(
        [sys.executable, "-c", PLAIN_LOAD_AND_GENERATE, str(output)], capture_output=True, text=True, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("torch.float32")
