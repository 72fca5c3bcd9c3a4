"""Shared fixtures: a tiny random Whisper with the real multilingual tokenizer, and paths to shared data."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration
from transformers import logging as hf_logging

from hf_whisper_kdq.config import DistillQuantArguments
from hf_whisper_kdq.sources import OFFLINE_PACKS
from hf_whisper_kdq.sources.processor import (
    align_model_config,
    build_generation_config,
    build_processor,
    tokenizer_from_file,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_SPEECH = REPO_ROOT.parent / "shared" / "data" / "speech"


# Files whose tests take most of the suite's time, scheduled first so that pytest-xdist's workers end together.
SLOWEST_FILES = ("test_distributed.py",)


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: item.path.name not in SLOWEST_FILES)  # stable: the rest keep their order


@pytest.fixture(scope="session", autouse=True)
def _one_thread_per_worker():
    """Under pytest-xdist (setup.cfg runs one worker per core) each worker takes one intra-op thread: two workers of
    two threads each on two cores spend the tiny models' ops in OpenMP barriers (see ``single_thread``)."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        yield
        return
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:  # and the processes tests start, which some compare with this one
        patch.setenv("OMP_NUM_THREADS", "1")
        yield


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Converted packs and synthesized audio go to a per-session folder, never the user's cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_WHISPER_KDQ_CACHE", str(tmp_path_factory.mktemp("hf_whisper_kdq_cache")))
        yield


@pytest.fixture(scope="session")
def shared_speech() -> Path:
    """../shared/data/speech, present in CI and on developer machines, absent on a user's fresh machine."""
    if not (SHARED_SPEECH / "dev.jsonl").is_file():
        pytest.skip("shared speech data (../shared/data/speech) is not available on this machine")
    return SHARED_SPEECH


@pytest.fixture(scope="session")
def base_pack_folder(tmp_path_factory) -> Path:
    """The whisper-base offline pack gathered into one CTranslate2 folder (symlinks, no copies)."""
    folder = tmp_path_factory.mktemp("whisper_base_ct2")
    for file in OFFLINE_PACKS["openai/whisper-base"].files():
        (folder / file.name).symlink_to(file)
    return folder


def ggml_quantize_chunk(values: np.ndarray, ggml_type: str) -> bytes:
    """ggml's own blocks of ``values`` (float32 ``[rows, cols]``), from the libggml-base pywhispercpp ships; skips the
    test without it."""
    from hf_whisper_kdq.export.ggml_codes import GGML_TYPES, ggml_library

    library = ggml_library()
    if library is None:
        pytest.skip("pywhispercpp (with its libggml-base) is not installed")
    values = np.ascontiguousarray(values, dtype=np.float32)
    rows, width = values.shape
    code = GGML_TYPES[ggml_type]
    out = np.zeros(library.ggml_row_size(code, width) * rows, np.uint8)
    assert library.ggml_quantize_chunk(code, values.ctypes.data, out.ctypes.data, 0, rows, width, None) == out.size
    return out.tobytes()


def real_whisper_and_english_audios(name: str, speech: Path, n: int):
    """``(model, processor, audios)``: the offline pack ``name`` and the first ``n`` English dev clips of ``speech``
    (paths); skips the test when the pack is not installed."""
    from hf_whisper_kdq.sources import PackNotInstalledError, load_whisper

    try:
        model, processor = load_whisper(name)
    except PackNotInstalledError as error:
        pytest.skip(str(error))
    rows = [json.loads(line) for line in (speech / "dev.jsonl").read_text().splitlines()]
    return model, processor, [speech / row["audio"] for row in rows if row["language"] == "en"][:n]


def make_tiny_whisper(tokenizer_folder: Path, *, seed: int = 0, window_seconds: int = 30, **overrides):
    """A random Whisper of ~3.5 M parameters (mostly the 51,865-token embedding) with real special tokens.

    ``window_seconds``: the audio its encoder sees at once, 30 s as every real Whisper; its processor's feature
    extractor pads and cuts audio to the same window (100 frames a second, 2 per encoder position)."""
    tokenizer = tokenizer_from_file(tokenizer_folder / "tokenizer.json", vocab_size=51865)
    ct2_config = json.loads((tokenizer_folder / "config.json").read_text())
    sizes = dict(
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
    )
    config = WhisperConfig(
        vocab_size=51865,
        num_mel_bins=80,
        max_source_positions=window_seconds * 50,
        max_target_positions=448,
        **{**sizes, **overrides},
    )
    generation_config = build_generation_config(
        tokenizer,
        config,
        suppress_tokens=ct2_config["suppress_ids"],
        begin_suppress_tokens=ct2_config["suppress_ids_begin"],
        lang_ids=ct2_config["lang_ids"],
    )
    align_model_config(config, generation_config)
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(config).eval()
    model.generation_config = generation_config
    processor = build_processor(tokenizer, config.num_mel_bins)
    processor.feature_extractor = WhisperFeatureExtractor(feature_size=config.num_mel_bins, chunk_length=window_seconds)
    return model, processor


# Tests of short clips that do not depend on Whisper's 30 s window use a 1 s one: the encoder then runs over 100 frames
# instead of 3,000.
SHORT_WINDOW_SECONDS = 1


@pytest.fixture(scope="session")
def _tiny_whisper_session(base_pack_folder):
    return make_tiny_whisper(base_pack_folder)


@pytest.fixture(scope="session")
def _short_window_whisper_session(base_pack_folder):
    return make_tiny_whisper(base_pack_folder, window_seconds=SHORT_WINDOW_SECONDS)


@pytest.fixture
def tiny_whisper(_tiny_whisper_session):
    """(model, processor): a fresh copy per test, so tests may train or mutate it freely."""
    model, processor = _tiny_whisper_session
    return copy.deepcopy(model), processor


@pytest.fixture
def short_window_whisper(_short_window_whisper_session):
    """``tiny_whisper`` with a 1 s window (model and feature extractor); longer audio is cut to it."""
    model, processor = _short_window_whisper_session
    return copy.deepcopy(model), processor


# ---- A micro Whisper for the DistillQuantTrainer tests (test_trainer.py, test_selection.py) -----------------
# The real-tokenizer tiny model above has a 51,865-token vocabulary and 3,000-frame inputs (100 with the short
# window), which makes one training step take seconds on a laptop CPU. These models have a 64-token vocabulary and
# 32-frame inputs: a step takes milliseconds, so the trainer tests can run many of them.

MICRO_VOCAB = 64
MICRO_MELS = 8
MICRO_FRAMES = 32  # = 2 * max_source_positions (the encoder's second convolution has stride 2)


def make_micro_whisper(*, seed: int = 0, **overrides) -> WhisperForConditionalGeneration:
    """A random Whisper of ~70 k parameters; ids 0/1/2 are pad / start / end of text."""
    sizes = dict(
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
    )
    config = WhisperConfig(
        vocab_size=MICRO_VOCAB,
        num_mel_bins=MICRO_MELS,
        max_source_positions=MICRO_FRAMES // 2,
        max_target_positions=32,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
        begin_suppress_tokens=None,
        suppress_tokens=None,
        **{**sizes, **overrides},
    )
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(config).eval()
    model.generation_config.max_length = 12
    return model


def make_micro_rows(count: int, *, seed: int = 0, min_tokens: int = 2, max_tokens: int = 10) -> list[dict]:
    """Training rows with random features and labels of different lengths (each ending with id 2)."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(count):
        length = int(torch.randint(min_tokens, max_tokens + 1, (1,), generator=generator))
        tokens = torch.randint(3, MICRO_VOCAB, (length,), generator=generator).tolist() + [2]
        features = torch.randn(MICRO_MELS, MICRO_FRAMES, generator=generator)
        rows.append({"input_features": features.tolist(), "labels": tokens})
    return rows


def micro_collate(rows: list[dict]) -> dict[str, torch.Tensor]:
    """Stack the features and right-pad the labels with -100."""
    width = max(len(row["labels"]) for row in rows)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, row in enumerate(rows):
        labels[i, : len(row["labels"])] = torch.tensor(row["labels"])
    features = torch.stack([torch.as_tensor(row["input_features"], dtype=torch.float32) for row in rows])
    return {"input_features": features, "labels": labels}


# The start of a script for a fresh Python process that must not import this package: what an export promises is
# that plain transformers loads it.
WITHOUT_OUR_PACKAGE = r"""
import importlib.abc, sys

class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "hf_whisper_kdq":
            raise ImportError("the export must load without hf_whisper_kdq")

sys.meta_path.insert(0, _Block())
"""


# The int4 recipe's quantization on tiny models: GPTQ codes for the frozen encoder, GPTQ's start for the decoder.
GPTQ_INT4_RECIPE = dict(
    quant_targets="encoder,decoder,embedding",
    quant_bit_choices="4",
    freeze_encoder=True,
    frozen_encoder_quantizer="gptq",
    decoder_start_quantizer="gptq",
    gptq_calibration_rows=3,
)


def micro_training_args(tmp_path: Path, **overrides) -> DistillQuantArguments:
    """Training arguments for micro/tiny models on CPU: quick, quiet, deterministic; ``overrides`` win."""
    defaults = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        report_to="none",
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
        learning_rate=1e-3,
        warmup_steps=0,
        quant_weight=0.1,
    )
    return DistillQuantArguments(**{**defaults, **overrides})


def write_tones_manifest(folder: Path) -> Path:
    """Two 1 s tones labelled "hello world", as an English manifest in ``folder``."""
    import soundfile

    rows = []
    for i in range(2):
        tone = 0.1 * np.sin(2 * np.pi * 220 * (i + 1) * np.arange(16000) / 16000)
        soundfile.write(folder / f"tone{i}.wav", tone, 16000)
        rows.append({"id": f"t{i}", "corpus": "tones", "language": "en", "audio": f"tone{i}.wav", "duration": 1.0,
                     "text": "hello world"})  # fmt: skip
    manifest = folder / "tones.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return manifest


def tiny_speech_rows(processor, texts: list[str], *, seed: int = 0) -> list[dict]:
    """Rows for the real-tokenizer tiny Whisper: log-mel features of 0.5 s of noise and each text's label ids."""
    generator = np.random.default_rng(seed)
    return [
        {
            "input_features": processor.feature_extractor(
                generator.normal(0, 0.1, 8000).astype(np.float32), sampling_rate=16000
            ).input_features[0],
            "labels": processor.tokenizer(text).input_ids,
        }
        for text in texts
    ]


@pytest.fixture
def quiet_transformers():
    """transformers' own warnings (e.g. about generation settings) at error level for the test."""
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    yield
    hf_logging.set_verbosity(verbosity)


@pytest.fixture
def micro_whisper():
    """Factory ``micro_whisper(seed=0, **config_overrides)`` of micro Whisper models (see make_micro_whisper)."""
    return make_micro_whisper


@pytest.fixture
def single_thread():
    """Run a test with one intra-op thread. Micro models gain nothing from more, and on a busy 2-core machine
    OpenMP's barriers turn each of their tiny ops into milliseconds (a 0.1 s layer selection takes 5 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
