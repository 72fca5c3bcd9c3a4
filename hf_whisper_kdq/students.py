"""Students: spaced layer copies of the teacher, or a smaller pretrained Whisper that shares its tokenizer.

A spaced copy keeps the teacher's width and takes maximally spaced layers, first and last included
(distil-whisper's initialisation). It records where each layer came from in
``config.kdq_teacher_layers``; static layer matching distils each student layer from that teacher layer.

Reaching the paper's sizes: from whisper-small (12+12 layers, d=768) a "base level" student keeps the
width with fewer decoder layers and low bits; from whisper-base (6+6, d=512) a "tiny level" student keeps
e.g. all 6 encoder layers (frozen and shared with the teacher) and 2 decoder layers, quantized to ≤ 4 bits.
Using ``openai/whisper-tiny`` as a student of ``openai/whisper-base`` is the other route: same tokenizer,
narrower layers, matched through adapters.
"""

from __future__ import annotations

import copy

import torch
from transformers import PreTrainedModel, WhisperForConditionalGeneration

TEACHER_LAYERS_KEY = "kdq_teacher_layers"
_SPECIAL_IDS = ("decoder_start_token_id", "eos_token_id", "pad_token_id", "no_timestamps_token_id")


def spaced_layer_indices(teacher_layers: int, student_layers: int) -> list[int]:
    """``student_layers`` indices spread evenly over ``range(teacher_layers)``, first and last included."""
    if not 1 <= student_layers <= teacher_layers:
        raise ValueError(f"a student needs between 1 and {teacher_layers} layers, got {student_layers}")
    return _same_relative_depth(teacher_layers, student_layers)


def _same_relative_depth(teacher_layers: int, student_layers: int) -> list[int]:
    # With more student than teacher layers, neighbouring student layers share a teacher layer.
    if student_layers == 1:
        return [teacher_layers - 1]
    return [round(i * (teacher_layers - 1) / (student_layers - 1)) for i in range(student_layers)]


def check_whisper(model: PreTrainedModel, role: str) -> None:
    if not isinstance(model, WhisperForConditionalGeneration):
        raise TypeError(
            f"the {role} is a {type(model).__name__}, not a WhisperForConditionalGeneration: load it with "
            "hf_whisper_kdq.load_whisper(...) or WhisperForConditionalGeneration.from_pretrained(...)"
        )


def check_same_tokenizer(student: PreTrainedModel, teacher: PreTrainedModel) -> None:
    """Distillation compares token distributions position by position: vocabularies must be identical."""
    problems = []
    if student.config.vocab_size != teacher.config.vocab_size:
        problems.append(f"vocab_size {student.config.vocab_size} vs {teacher.config.vocab_size}")
    for key in _SPECIAL_IDS:
        ours, theirs = getattr(student.generation_config, key, None), getattr(teacher.generation_config, key, None)
        if ours != theirs:
            problems.append(f"{key} {ours} vs {theirs}")
    if problems:
        raise ValueError(
            "student and teacher use different tokenizers (" + "; ".join(problems) + "). Pick a student of the "
            "same family (multilingual with multilingual, English-only with English-only), e.g. "
            "build_student(teacher, decoder_layers=2)."
        )


def teacher_layer_map(student: PreTrainedModel, teacher: PreTrainedModel) -> dict[str, list[int]]:
    """The teacher layer each student layer starts matched to: recorded origins for spaced copies, else the
    same relative depth for independent students (a student deeper than its teacher maps several of its layers
    to one teacher layer)."""
    recorded = getattr(student.config, TEACHER_LAYERS_KEY, None)
    if recorded:
        for side, indices in recorded.items():
            teacher_layers = getattr(teacher.config, f"{side}_layers")
            student_layers = getattr(student.config, f"{side}_layers")
            if len(indices) != student_layers or not all(0 <= i < teacher_layers for i in indices):
                raise ValueError(
                    f"the student's config.{TEACHER_LAYERS_KEY} maps its {student_layers} {side} layers to teacher "
                    f"layers {list(indices)}, which this teacher ({teacher_layers} {side} layers) does not have: the "
                    "student was built from another teacher. Train it with the teacher it was built from (or "
                    f"build_student(this_teacher, ...)), or delete student.config.{TEACHER_LAYERS_KEY} to match "
                    "layers by relative depth"
                )
        return {side: list(indices) for side, indices in recorded.items()}
    return {
        side: _same_relative_depth(getattr(teacher.config, f"{side}_layers"), getattr(student.config, f"{side}_layers"))
        for side in ("encoder", "decoder")
    }


def build_student(
    teacher: WhisperForConditionalGeneration,
    *,
    encoder_layers: int | None = None,
    decoder_layers: int | None = None,
) -> WhisperForConditionalGeneration:
    """A student initialised from maximally spaced teacher layers (``None`` keeps every layer of that side).

    The teacher is not modified; the student shares no tensors with it.
    """
    check_whisper(teacher, "teacher")
    config = copy.deepcopy(teacher.config)
    kept = {
        "encoder": spaced_layer_indices(config.encoder_layers, encoder_layers or config.encoder_layers),
        "decoder": spaced_layer_indices(config.decoder_layers, decoder_layers or config.decoder_layers),
    }
    config.encoder_layers, config.decoder_layers = len(kept["encoder"]), len(kept["decoder"])
    setattr(config, TEACHER_LAYERS_KEY, kept)
    with torch.device("meta"):
        student = WhisperForConditionalGeneration(config)
    state = {}
    for name, tensor in teacher.state_dict().items():
        parts = name.split(".")
        if len(parts) > 3 and parts[0] == "model" and parts[2] == "layers":
            side, index = parts[1], int(parts[3])
            if index not in kept[side]:
                continue
            parts[3] = str(kept[side].index(index))
        state[".".join(parts)] = tensor.clone()
    missing, unexpected = student.load_state_dict(state, strict=False, assign=True)
    if set(missing) - {"proj_out.weight"} or unexpected:
        raise RuntimeError(f"layer copy mismatch: missing {missing}, unexpected {unexpected}")
    student.tie_weights()
    student.generation_config = copy.deepcopy(teacher.generation_config)
    # Alignment heads (for word timestamps) follow their layer into the student, where it was kept.
    student.generation_config.alignment_heads = [
        [kept["decoder"].index(layer), head]
        for layer, head in getattr(student.generation_config, "alignment_heads", None) or []
        if layer in kept["decoder"]
    ] or None
    return student.to(teacher.dtype).train(teacher.training)
