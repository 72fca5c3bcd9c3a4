"""The model card: metadata and model-index round trip, tables, figure, nothing local, and code that runs."""

from __future__ import annotations

import getpass
import os
import re
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import soundfile as sf
from huggingface_hub import ModelCard

from hf_whisper_kdq.card import build_model_card, write_model_card
from hf_whisper_kdq.card_scores import rows_of_last_evaluation
from hf_whisper_kdq.evaluation import EvaluationReport
from hf_whisper_kdq.selection import KDQPlan, UnitPlan

REPO = "kdq-org/whisper-small-kdq"
FAKE_TOKEN = "hf_" + "Q" * 34


def make_plan() -> KDQPlan:
    units = [
        UnitPlan(
            f"encoder.{i}",
            "encoder",
            i,
            [f"model.encoder.layers.{i}.fc1"],
            bits,
            distilled=i == 2,
            teacher_layer=3 * i + 2,
            quant_loss={bits: 0.01 * (i + 1), 16: 0.0},
            distill_loss=0.05 * (i + 1),
        )
        for i, bits in enumerate((4, 8, 16, 3))
    ]
    units += [
        UnitPlan(
            f"decoder.{i}",
            "decoder",
            i,
            [f"model.decoder.layers.{i}.fc1"],
            bits,
            distilled=i == 1,
            teacher_layer=(5, 11)[i],
            quant_loss={bits: 0.1},
            distill_loss=0.2,
        )
        for i, bits in enumerate((2, 4))
    ]
    units.append(UnitPlan("embedding", "embedding", None, ["model.decoder.embed_tokens"], 16))
    return KDQPlan(units, "per_group", 32, True, budget_bytes=60_000_000, size_bytes=55_000_000, step=300)


REPORT = {
    "total_bytes": 46_500_000,
    "teacher_fp16_bytes": 483_000_000,
    "teacher_fp32_bytes": 967_000_000,
    "files": {
        "model.safetensors": 44_000_000,
        "tokenizer.json": 2_480_000,
        "config.json": 20_000,
        "ctranslate2/model.bin": 90_000_000,
    },
    "components": {"encoder": 20_000_000, "decoder": 5_000_000, "embedding": 19_000_000},
    "paper_accounting": {"size_bytes": 30_100_000, "note": "quantized weights + fp16 rest, as in the paper"},
    "embedding_quantized": False,
    "embedding_reason": "compressed-tensors cannot quantize the tied embedding",
    "ctranslate2": {"quantization": "int8"},
}
EVALS = {
    "compressed": [
        {
            "corpus": "LibriSpeech test-clean",
            "dataset_type": "openslr/librispeech_asr",
            "split": "test",
            "language": "en",
            "error_rate": 0.0712,
            "n_utterances": 200,
            "audio_seconds": 100.0,
            "decode_seconds": 5.0,
        },
        {
            "corpus": "AISHELL-1",
            "dataset_type": "aishell",
            "language": "zh",
            "metric": "cer",
            "error_rate": 0.1234,
            "n_utterances": 100,
            "audio_seconds": 50.0,
            "decode_seconds": 3.0,
        },
    ],
    "teacher": [
        {"corpus": "LibriSpeech test-clean", "language": "en", "error_rate": 0.051, "rtf": 0.2},
        {"corpus": "AISHELL-1", "language": "zh", "error_rate": 0.10, "rtf": 0.2},
    ],
    "original": [
        {"corpus": "LibriSpeech test-clean", "language": "en", "error_rate": 0.083, "size_bytes": 145_000_000}
    ],
}


def card_kwargs(**overrides):
    return {
        "plan": make_plan(),
        "compression_report": REPORT,
        "eval_results": EVALS,
        "teacher_id": "openai/whisper-small",
        "training_args": {"learning_rate": 1e-4, "kd_weight": 1.0},
        "datasets": ["kdq-org/synthetic-tts-en", "aishell"],
        "languages": ["en", "zh"],
        "repo_id": REPO,
        "original_id": "openai/whisper-base",
        **overrides,
    }


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    return write_model_card(tmp_path_factory.mktemp("card") / "whisper-small-kdq", **card_kwargs())


def test_metadata_and_eval_results_round_trip(written):
    built = build_model_card(**card_kwargs())
    loaded = ModelCard.load(written)
    assert loaded.data.to_dict() == built.data.to_dict()
    data = loaded.data
    assert data.license == "mit" and data.library_name == "transformers"
    assert data.pipeline_tag == "automatic-speech-recognition"
    assert data.tags == ["whisper", "distillation", "quantization", "hf-whisper-kdq"]
    assert data.base_model == "openai/whisper-small" and data["base_model_relation"] == "quantized"
    assert data.language == ["en", "zh"] and data.metrics == ["cer", "wer"]
    assert data.datasets == ["kdq-org/synthetic-tts-en", "aishell"]
    assert data.model_name == "whisper-small-kdq"
    assert loaded.data.eval_results == built.data.eval_results
    got = [
        (
            r.task_type,
            r.dataset_type,
            r.dataset_name,
            r.dataset_split,
            r.dataset_args,
            r.metric_type,
            r.metric_name,
            r.metric_value,
        )
        for r in data.eval_results
    ]
    # percentages, and only the compressed model's scores
    assert got == [
        (
            "automatic-speech-recognition",
            "openslr/librispeech_asr",
            "LibriSpeech test-clean",
            "test",
            {"language": "en"},
            "wer",
            "WER (%)",
            7.12,
        ),
        ("automatic-speech-recognition", "aishell", "AISHELL-1", None, {"language": "zh"}, "cer", "CER (%)", 12.34),
    ]


def test_body_tables_figure_usage_and_citation(written):
    text = written.read_text()
    assert "are **percentages**" in text
    header = (
        "| model | size on disk | smaller than teacher (fp16) | LibriSpeech test-clean (en) WER % "
        "| AISHELL-1 (zh) CER % | RTF |"
    )
    assert header in text
    assert "| teacher: openai/whisper-small (fp16) | 483.0 MB | 1.00× | 5.10 | 10.00 | 0.200 |" in text
    assert "| original: openai/whisper-base | 145.0 MB | 3.33× | 8.30 | – | – |" in text
    assert "| **whisper-small-kdq** (this model) | 46.5 MB | 10.39× | 7.12 | 12.34 | 0.053 |" in text
    assert "| encoder.2 | fp16 | ✓ | 8 | 0 | 0.15 |" in text and "| decoder.0 | 2 |  | 5 | 0.1 | 0.2 |" in text
    assert "| embedding | fp16 |  |  |  |  |" in text
    assert "![Per-layer bits" in text and "](kdq_plan.png)" in text
    assert (written.parent / "kdq_plan.png").is_file()
    assert "| `learning_rate` | 0.0001 |" in text and "Paper accounting, size_bytes: 30.1 MB" in text
    assert "WhisperForConditionalGeneration.from_pretrained(repo)" in text and "compressed-tensors" in text
    assert f'snapshot_download("{REPO}", allow_patterns="ctranslate2/*")' in text
    assert 'language="en", task="transcribe"' in text
    assert "synthetic (text-to-speech)" in text and "cannot quantize the tied embedding" in text
    assert "arXiv:2305.10788" in text and "@article{shao2023whisperkdq" in text


def test_nothing_local_reaches_the_card(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    teacher = tmp_path / "teachers" / "whisper-small"
    teacher.mkdir(parents=True)
    report = {**REPORT, "format": f"packed at {tmp_path}/out/model.safetensors"}
    args = {
        "learning_rate": 3e-5,
        "output_dir": str(tmp_path / "out"),
        "hub_token": FAKE_TOKEN,
        "logging_dir": str(Path.home() / "logs"),
        "notes": f"manifest {tmp_path}/data/train.jsonl, {FAKE_TOKEN}",
    }
    compressed = EvaluationReport(
        model=str(tmp_path / "out"),
        n_parameters=1,
        model_size_bytes=46_000_000,
        model_size_source="disk",
        batch_size=8,
        num_beams=1,
        device="cpu",
        dtype="float32",
        temperature_fallback=True,
        corpora=[{"corpus": "dev", "language": "en", "metric": "wer", "error_rate": 0.25, "n_utterances": 4}],
        rtf=0.1,
    )
    path = write_model_card(
        tmp_path / "out",
        **card_kwargs(
            teacher_id=str(teacher),
            training_args=args,
            eval_results={"compressed": compressed},
            datasets=[str(tmp_path / "data" / "train.jsonl")],
            figure_path=str(tmp_path / "figs" / "plan.png"),
            compression_report=report,
        ),
    )
    text = path.read_text()
    for secret in (str(tmp_path), str(Path.home()), os.environ.get("HOME", str(Path.home()))):
        assert secret not in text
    user = getpass.getuser()
    assert not re.search(rf"\b{re.escape(user)}\b", text), f"user name {user!r} in the card"
    assert not re.search(r"hf_[A-Za-z0-9]{16,}", text)
    assert "manifest train.jsonl" in text and "`output_dir`" not in text and "`hub_token`" not in text
    assert "](plan.png)" in text and (tmp_path / "out" / "plan.png").is_file()
    card = ModelCard.load(path)
    assert card.data.base_model is None and "base_model_relation" not in card.data.to_dict()  # local teacher
    assert card.data.datasets == ["train.jsonl"] and card.data.eval_results[0].metric_value == 25.0
    assert "| **whisper-small-kdq** (this model) | 46.5 MB | 10.39× | 25.00 | 0.100 |" in text
    assert "measured with cpu float32, batch size 8, 1 beam(s), temperature fallback" in text


def test_training_sources_table_names_every_source_without_local_paths(tmp_path):
    sources = [
        {
            "source": f"{tmp_path}/data/train_en.jsonl",
            "corpora": ["speechocean762"],
            "languages": ["en"],
            "labels": "reference",
            "rows_distinct": 5000,
            "rows_drawn": 5000,
            "hours_drawn": 5.567,
            "weight": 2.0,
        },
        {
            "source": f"{tmp_path}/data/train_zh.jsonl",
            "corpora": ["aishell1-sample"],
            "languages": ["zh"],
            "labels": "teacher",
            "rows_distinct": 220,
            "rows_drawn": 2500,
            "hours_drawn": None,
            "weight": 1.0,
        },
    ]
    text = str(build_model_card(**card_kwargs(training_sources=sources)))
    assert "| train_en.jsonl | speechocean762 | en | reference | 5,000 | 5,000 | 5.57 | 2 |" in text
    assert "| train_zh.jsonl | aishell1-sample | zh | teacher | 220 | 2,500 |  | 1 |" in text
    assert str(tmp_path) not in text
    assert "| source | corpora |" not in str(build_model_card(**card_kwargs()))  # no table without sources


def test_row_lists_with_roles_and_errors():
    rows = [
        {"role": "compressed", "dataset": "dev", "language": "English", "wer": 0.5},
        {"model": "teacher", "dataset": "dev", "language": "en", "error_rate": 40.0, "percent": True},
    ]
    card = build_model_card(**card_kwargs(eval_results=rows, compression_report=None, repo_id=None))
    assert [r.metric_value for r in card.data.eval_results] == [50.0]
    assert card.data.model_name == "whisper-small-kdq" and "<namespace>/whisper-small-kdq" in card.text
    assert "| teacher: openai/whisper-small | – | – | 40.00 | – |" in card.text
    with pytest.raises(ValueError, match="role"):
        build_model_card(**card_kwargs(eval_results=[{"dataset": "dev", "wer": 0.1}]))
    with pytest.raises(ValueError, match="no error_rate"):
        build_model_card(**card_kwargs(eval_results={"compressed": {"dataset": "dev"}}))
    with pytest.raises(ValueError, match="not a Hub repo id"):
        build_model_card(**card_kwargs(repo_id="/tmp/not/a/repo"))


def test_training_arguments_show_hyperparameters_only(tmp_path):
    from hf_whisper_kdq import DistillQuantArguments

    args = DistillQuantArguments(
        output_dir=str(tmp_path / "run"),
        learning_rate=2e-5,
        report_to=[],
        hub_token=FAKE_TOKEN,
        size_budget_ratio=0.2,
        num_distill_layers=3,
    )
    text = build_model_card(**card_kwargs(training_args=args)).text
    assert "| `learning_rate` | 2e-05 |" in text and "| `size_budget_ratio` | 0.2 |" in text
    assert "| `num_distill_layers` | 3 |" in text and "| `quant_granularity` | per_group |" in text
    assert "output_dir" not in text and "hub_token" not in text and FAKE_TOKEN not in text
    assert "teacher_cache_top_k" not in text  # 0: the exact KD loss, nothing to report
    top_k = DistillQuantArguments(output_dir=str(tmp_path / "run"), report_to=[], teacher_cache_top_k=64)
    assert "| `teacher_cache_top_k` | 64 |" in build_model_card(**card_kwargs(training_args=top_k)).text


# ---- the usage snippets run, against a local Hub cache (offline) -------------------------------------------------


def snippets(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, re.S)


def fake_hub_repo(cache: Path, repo_id: str, files: dict[str, Path]) -> Path:
    """Lay ``files`` out as a cached snapshot of ``repo_id`` (what a download would leave) and return it."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = root / "snapshots" / commit
    for name, source in files.items():
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).symlink_to(source)
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    cache = tmp_path / "hub-cache"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    sf.write(tmp_path / "audio.wav", (0.01 * np.random.default_rng(0).standard_normal(16000)).astype("float32"), 16000)
    return cache


def test_transformers_snippet_runs(tiny_whisper, offline_hub, tmp_path, capsys, single_thread):
    from hf_whisper_kdq.sources import save_whisper

    model, processor = tiny_whisper
    model.generation_config.max_length = 24
    folder = save_whisper(model, processor, tmp_path / "saved")
    fake_hub_repo(offline_hub, REPO, {p.name: p for p in folder.iterdir() if p.is_file()})
    code = snippets(build_model_card(**card_kwargs()).text)[0]
    assert "WhisperForConditionalGeneration" in code and "compression_ratio_threshold=1.35" in code
    exec(compile(code, "<card snippet>", "exec"), {"__name__": "__card__"})
    assert isinstance(capsys.readouterr().out, str)


@pytest.mark.slow
def test_faster_whisper_snippet_runs(offline_hub, capsys):
    pytest.importorskip("faster_whisper")
    from hf_whisper_kdq.sources import OFFLINE_PACKS, PackNotInstalledError

    try:  # a CTranslate2 whisper-tiny.en (one model.bin) stands in for the exported ctranslate2/ copy
        files = OFFLINE_PACKS["openai/whisper-tiny.en"].files()
    except PackNotInstalledError as error:
        pytest.skip(str(error))
    fake_hub_repo(offline_hub, REPO, {f"ctranslate2/{p.name}": p for p in files})
    code = snippets(build_model_card(**card_kwargs()).text)[1]
    assert "WhisperModel" in code
    exec(compile(code, "<card snippet>", "exec"), {"__name__": "__card__"})
    capsys.readouterr()


REPO_ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = REPO_ROOT / "model_cards" / "kdq_model_card.md.jinja"


def test_one_template_in_the_checkout_and_the_card_reads_it():
    """One template, in the top-level model_cards/ folder: a second copy elsewhere would be silently ignored."""
    from hf_whisper_kdq.card import find_template

    assert sorted(p.relative_to(REPO_ROOT) for p in REPO_ROOT.glob("**/*.jinja") if ".git" not in p.parts) == [
        TEMPLATE.relative_to(REPO_ROOT)
    ]
    assert find_template() == TEMPLATE


@pytest.mark.slow
def test_the_installed_package_ships_and_reads_the_model_cards_template(tmp_path):
    """A wheel built from the checkout holds model_cards/'s template as package data, once, and the installed
    package (imported from where pip put it, not from the checkout) renders its cards from that file."""
    import shutil
    import subprocess
    import sys
    import zipfile

    source = tmp_path / "source"  # a copy of the tracked files: the build writes build/ and egg-info beside them
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    for name in tracked.stdout.splitlines():
        if (REPO_ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", tmp_path, source], check=True)
    (wheel,) = tmp_path.glob("hf_whisper_kdq-*.whl")
    templates = [name for name in zipfile.ZipFile(wheel).namelist() if name.endswith(".jinja")]
    assert templates == ["hf_whisper_kdq/model_cards/kdq_model_card.md.jinja"]

    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", site, wheel], check=True)
    found = subprocess.run(
        [sys.executable, "-c", "import hf_whisper_kdq.card as c; print(c.__file__); print(c.find_template())"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(site)},
        capture_output=True,
        text=True,
    )
    assert found.returncode == 0, found.stderr[-2000:]
    module, template = (Path(line) for line in found.stdout.split()[-2:])
    assert module.is_relative_to(site.resolve()) and template.is_relative_to(site.resolve())
    assert template.read_bytes() == TEMPLATE.read_bytes()


def test_transformers_snippet_of_a_one_width_export_is_the_usual_call(tiny_whisper, offline_hub, tmp_path, capsys):
    """A one-width export loads dense (export.compressed): its card's snippet has no unpacking step and no dtype
    cast, and it runs against the packed folder."""
    pytest.importorskip("compressed_tensors", minversion="0.20")
    from hf_whisper_kdq.export import save_compressed
    from hf_whisper_kdq.quant import default_quant_targets, prepare_qat

    model, processor = tiny_whisper
    model.generation_config.max_length = 24
    specs = dict.fromkeys([*default_quant_targets(model), "model.decoder.embed_tokens"], "int4-g32")
    prepare_qat(model, specs)
    report = save_compressed(model, processor, tmp_path / "packed")
    assert report.dense_load
    fake_hub_repo(offline_hub, REPO, {p.name: p for p in report.folder.iterdir() if p.is_file()})
    code = snippets(build_model_card(**card_kwargs(compression_report=report)).text)[0]
    assert "decompress_model" not in code and "model.dtype" not in code
    exec(compile(code, "<card snippet>", "exec"), {"__name__": "__card__"})
    assert isinstance(capsys.readouterr().out, str)


def test_card_rows_come_from_the_last_evaluation_of_the_log():
    log_history = [
        {"eval_wer_en": 0.5, "eval_loss": 1.0, "step": 10},
        {"eval_wer_en": 0.2, "eval_cer_zh": 0.3, "step": 20},
        {"loss": 0.7, "step": 21},  # a training log after the evaluation is not an evaluation
    ]
    rows = rows_of_last_evaluation(log_history)
    assert sorted((row["language"], row["metric"], row["error_rate"]) for row in rows) == [
        ("en", "wer", 0.2),
        ("zh", "cer", 0.3),
    ]
    assert rows_of_last_evaluation([{"loss": 1.0}]) == []


def test_the_summary_says_a_frozen_quantized_encoder_was_quantized_post_training():
    trained = str(build_model_card(**card_kwargs()))
    assert "its weights were quantization-aware trained" in trained
    frozen = str(build_model_card(**card_kwargs(training_args={"freeze_encoder": True, "learning_rate": 5e-5})))
    assert "its decoder was quantization-aware trained and its frozen encoder quantized post-training" in frozen


def test_the_card_lists_the_weights_of_every_runtime_copy_in_its_folder(tmp_path):
    folder = tmp_path / "compressed"
    (folder / "ctranslate2").mkdir(parents=True)
    for name, size in (
        ("model.safetensors", 3_000_000),
        ("ctranslate2/model.bin", 5_000_000),
        ("ggml-model.bin", 2_500_000),
    ):
        (folder / name).write_bytes(b"\0" * size)
    text = write_model_card(folder, **card_kwargs()).read_text()
    line = next(line for line in text.splitlines() if "Weights on disk per format" in line)
    assert "transformers (model.safetensors) 3.0 MB" in line and "CTranslate2 (ctranslate2/model.bin) 5.0 MB" in line
    assert "whisper.cpp (ggml-model.bin) 2.5 MB" in line
