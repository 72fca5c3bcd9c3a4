"""Shared fixtures: a tiny random Whisper with the real multilingual tokenizer, and paths to shared data."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from transformers import WhisperConfig, WhisperForConditionalGeneration

from hf_whisper_kdq.sources import OFFLINE_PACKS
from hf_whisper_kdq.sources.processor import (
    align_model_config,
    build_generation_config,
    build_processor,
    tokenizer_from_file,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_SPEECH = REPO_ROOT.parent / "shared" / "data" / "speech"


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


def make_tiny_whisper(tokenizer_folder: Path, *, seed: int = 0, **overrides):
    """A random Whisper of ~3.5 M parameters (mostly the 51,865-token embedding) with real special tokens."""
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
        vocab_size=51865, num_mel_bins=80, max_source_positions=1500, max_target_positions=448, **{**sizes, **overrides}
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
    return model, build_processor(tokenizer, config.num_mel_bins)


@pytest.fixture(scope="session")
def _tiny_whisper_session(base_pack_folder):
    return make_tiny_whisper(base_pack_folder)


@pytest.fixture
def tiny_whisper(_tiny_whisper_session):
    """(model, processor): a fresh copy per test, so tests may train or mutate it freely."""
    model, processor = _tiny_whisper_session
    return copy.deepcopy(model), processor
