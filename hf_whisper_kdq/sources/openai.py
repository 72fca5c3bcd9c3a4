"""OpenAI `whisper` checkpoints (`tiny.pt`, `base.en.pt`, ...) to Hugging Face parameters.

The checkpoint is a dict ``{"dims": ModelDimensions, "model_state_dict": ...}`` (openai/whisper,
whisper/__init__.py). It is read with ``torch.load(weights_only=True)``: pickles can run code, and a
checkpoint needs none. transformers 5 no longer ships its conversion script, hence this module.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from transformers import WhisperConfig

# OpenAI module path fragment -> HF module path fragment, applied in order.
_RENAMES = (
    (r"^encoder\.blocks\.", "model.encoder.layers."),
    (r"^decoder\.blocks\.", "model.decoder.layers."),
    (r"^encoder\.ln_post\.", "model.encoder.layer_norm."),
    (r"^decoder\.ln\.", "model.decoder.layer_norm."),
    (r"^encoder\.conv", "model.encoder.conv"),
    (r"^decoder\.token_embedding\.", "model.decoder.embed_tokens."),
    (r"\.cross_attn_ln\.", ".encoder_attn_layer_norm."),
    (r"\.cross_attn\.", ".encoder_attn."),
    (r"\.attn_ln\.", ".self_attn_layer_norm."),
    (r"\.attn\.", ".self_attn."),
    (r"\.mlp_ln\.", ".final_layer_norm."),
    (r"\.mlp\.0\.", ".fc1."),
    (r"\.mlp\.2\.", ".fc2."),
    (r"\.query\.", ".q_proj."),
    (r"\.key\.", ".k_proj."),
    (r"\.value\.", ".v_proj."),
    (r"\.out\.", ".out_proj."),
)


class OpenAICheckpointError(ValueError):
    """The file is not an OpenAI Whisper checkpoint."""


def load_openai_checkpoint(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or "dims" not in checkpoint or "model_state_dict" not in checkpoint:
        raise OpenAICheckpointError(
            f"{path} is not an OpenAI Whisper checkpoint (expected a dict with 'dims' and 'model_state_dict')"
        )
    return dict(checkpoint["dims"]), checkpoint["model_state_dict"]


def whisper_config_from_dims(dims: dict) -> WhisperConfig:
    return WhisperConfig(
        vocab_size=dims["n_vocab"],
        num_mel_bins=dims["n_mels"],
        d_model=dims["n_audio_state"],
        encoder_layers=dims["n_audio_layer"],
        encoder_attention_heads=dims["n_audio_head"],
        decoder_layers=dims["n_text_layer"],
        decoder_attention_heads=dims["n_text_head"],
        encoder_ffn_dim=4 * dims["n_audio_state"],
        decoder_ffn_dim=4 * dims["n_text_state"],
        max_source_positions=dims["n_audio_ctx"],
        max_target_positions=dims["n_text_ctx"],
    )


def openai_to_hf_state_dict(dims: dict, state_dict: dict[str, torch.Tensor]):
    """Rename OpenAI parameters to `WhisperForConditionalGeneration`'s; returns (config, state_dict)."""
    if dims["n_audio_state"] != dims["n_text_state"]:
        raise OpenAICheckpointError("encoder and decoder widths differ; HF Whisper needs one d_model")
    state = {}
    for name, tensor in state_dict.items():
        if name == "alignment_heads":
            continue
        if name == "encoder.positional_embedding":
            state["model.encoder.embed_positions.weight"] = tensor
            continue
        if name == "decoder.positional_embedding":
            state["model.decoder.embed_positions.weight"] = tensor
            continue
        hf_name = name
        for pattern, replacement in _RENAMES:
            hf_name = re.sub(pattern, replacement, hf_name)
        state[hf_name] = tensor
    return whisper_config_from_dims(dims), state
