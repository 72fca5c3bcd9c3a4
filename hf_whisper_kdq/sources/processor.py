"""Tokenizer, feature extractor and generation config for Whisper models that arrive without them.

CTranslate2 folders carry a `tokenizer.json` and a small `config.json` (suppressed ids, language ids,
alignment heads); OpenAI checkpoints carry neither. Everything `WhisperForConditionalGeneration.generate`
needs (special token ids, `lang_to_id`, `task_to_id`, suppression lists) is rebuilt here from the
tokenizer itself, following the conventions of the `openai/whisper-*` repositories on the Hub.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from tokenizers import AddedToken
from transformers import GenerationConfig, WhisperConfig, WhisperFeatureExtractor, WhisperProcessor, WhisperTokenizer

# OpenAI's rule (whisper/model.py: `is_multilingual = n_vocab >= 51865`).
MULTILINGUAL_MIN_VOCAB = 51865
_LANGUAGE_TOKEN = re.compile(r"<\|([a-z]{2,3}|haw)\|>")


def is_multilingual(vocab_size: int) -> bool:
    return vocab_size >= MULTILINGUAL_MIN_VOCAB


def tokenizer_from_file(tokenizer_file: str | Path, vocab_size: int | None = None) -> WhisperTokenizer:
    """A `WhisperTokenizer` from a `tokenizers` JSON file, with every `<|...|>` token registered as special.

    Registering them matters: `decode(skip_special_tokens=True)` and the timestamp logic
    (`all_special_ids[-1] + 1` is the first timestamp token) rely on it. Files that stop before the
    timestamp tokens (faster-whisper's tiny.en) get them appended up to `vocab_size`, as on the Hub.
    """
    added = json.loads(Path(tokenizer_file).read_text(encoding="utf-8"))["added_tokens"]
    eos = "<|endoftext|>"
    extra = [t["content"] for t in sorted(added, key=lambda t: t["id"]) if t["special"] and t["content"] != eos]
    tokenizer = WhisperTokenizer(
        tokenizer_file=str(tokenizer_file),
        unk_token=eos,
        bos_token=eos,
        eos_token=eos,
        pad_token=eos,
        extra_special_tokens=extra,
        model_max_length=1024,
    )
    if vocab_size is not None and len(tokenizer) < vocab_size:
        first = len(tokenizer) - (_token_id(tokenizer, "<|notimestamps|>") + 1)
        tokenizer.add_tokens(
            [
                AddedToken(f"<|{i * 0.02:.2f}|>", normalized=False, special=False)
                for i in range(first, first + vocab_size - len(tokenizer))
            ]
        )
    return tokenizer


def _token_id(tokenizer: WhisperTokenizer, token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id and token != tokenizer.unk_token:
        raise ValueError(f"the tokenizer has no {token} token: is this a Whisper tokenizer?")
    return token_id


def special_token_ids(tokenizer: WhisperTokenizer) -> dict[str, int]:
    """Ids of Whisper's control tokens, looked up by name (they shift by one between English-only and
    multilingual vocabularies)."""
    names = {
        "eos_token_id": "<|endoftext|>",
        "decoder_start_token_id": "<|startoftranscript|>",
        "no_timestamps_token_id": "<|notimestamps|>",
        "prev_sot_token_id": "<|startofprev|>",
    }
    return {key: _token_id(tokenizer, token) for key, token in names.items()}


def language_ids(tokenizer: WhisperTokenizer) -> dict[str, int]:
    vocab = tokenizer.get_vocab()
    return dict(sorted(((t, i) for t, i in vocab.items() if _LANGUAGE_TOKEN.fullmatch(t)), key=lambda kv: kv[1]))


def default_alignment_heads(decoder_layers: int, decoder_heads: int) -> list[list[int]]:
    """All heads of the second half of the decoder: the fallback of OpenAI and CTranslate2 alike."""
    return [[layer, head] for layer in range(decoder_layers // 2, decoder_layers) for head in range(decoder_heads)]


def build_generation_config(
    tokenizer: WhisperTokenizer,
    config: WhisperConfig,
    *,
    suppress_tokens: list[int],
    begin_suppress_tokens: list[int],
    alignment_heads: list[list[int]] | None = None,
    lang_ids: list[int] | None = None,
) -> GenerationConfig:
    """The generation config that `openai/whisper-*` repositories ship, rebuilt from the tokenizer.

    `lang_ids` (CTranslate2's list) restricts `lang_to_id` to the languages the model was trained on; it is
    ignored for English-only models, whose vocabulary still contains language tokens.
    """
    ids = special_token_ids(tokenizer)
    multilingual = is_multilingual(config.vocab_size)
    kwargs = dict(
        bos_token_id=ids["eos_token_id"],
        eos_token_id=ids["eos_token_id"],
        pad_token_id=ids["eos_token_id"],
        decoder_start_token_id=ids["decoder_start_token_id"],
        no_timestamps_token_id=ids["no_timestamps_token_id"],
        prev_sot_token_id=ids["prev_sot_token_id"],
        suppress_tokens=list(suppress_tokens),
        begin_suppress_tokens=list(begin_suppress_tokens),
        alignment_heads=alignment_heads
        or default_alignment_heads(config.decoder_layers, config.decoder_attention_heads),
        is_multilingual=multilingual,
        max_initial_timestamp_index=50,
        max_length=config.max_target_positions,
        return_timestamps=False,
    )
    if multilingual:
        languages = language_ids(tokenizer)
        if lang_ids:
            wanted = set(lang_ids)
            languages = {token: i for token, i in languages.items() if i in wanted}
        kwargs["lang_to_id"] = languages
        kwargs["task_to_id"] = {task: _token_id(tokenizer, f"<|{task}|>") for task in ("transcribe", "translate")}
    return GenerationConfig(**kwargs)


def align_model_config(config: WhisperConfig, generation_config: GenerationConfig) -> None:
    """Copy the token ids into the model config too: some Trainer and pipeline code reads them there."""
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id"):
        setattr(config, key, getattr(generation_config, key))
    config.suppress_tokens = list(generation_config.suppress_tokens)
    config.begin_suppress_tokens = list(generation_config.begin_suppress_tokens)


def build_processor(tokenizer: WhisperTokenizer, num_mel_bins: int) -> WhisperProcessor:
    return WhisperProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=num_mel_bins), tokenizer=tokenizer)
