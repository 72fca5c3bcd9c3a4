"""Students: spaced layer copies of the teacher and the tokenizer / model-type checks (hf_whisper_kdq.students)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from hf_whisper_kdq.students import (
    TEACHER_LAYERS_KEY,
    build_student,
    check_same_tokenizer,
    check_whisper,
    spaced_layer_indices,
    teacher_layer_map,
)

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize(
    "teacher_layers, student_layers, expected",
    [
        (6, 2, [0, 5]),
        (12, 4, [0, 4, 7, 11]),
        (32, 2, [0, 31]),
        (4, 4, [0, 1, 2, 3]),
        (4, 3, [0, 2, 3]),
        (12, 6, [0, 2, 4, 7, 9, 11]),
        (6, 1, [5]),
    ],
)
def test_spaced_layer_indices(teacher_layers, student_layers, expected):
    assert spaced_layer_indices(teacher_layers, student_layers) == expected


def test_spaced_layer_indices_keep_first_and_last_and_increase():
    for teacher in range(2, 33):
        for student in range(2, teacher + 1):
            kept = spaced_layer_indices(teacher, student)
            assert kept[0] == 0 and kept[-1] == teacher - 1
            assert all(a < b for a, b in zip(kept, kept[1:])), (teacher, student, kept)


@pytest.mark.parametrize("student_layers", [0, 7, -1])
def test_spaced_layer_indices_rejects_impossible_counts(student_layers):
    with pytest.raises(ValueError, match="between 1 and 6"):
        spaced_layer_indices(6, student_layers)


@pytest.fixture
def teacher(base_pack_folder):
    from conftest import make_tiny_whisper

    model, _ = make_tiny_whisper(base_pack_folder, encoder_layers=3, decoder_layers=4)
    # alignment heads in layers 1 (dropped by a 2-layer student) and 3 (kept, becomes layer 1)
    model.generation_config.alignment_heads = [[1, 0], [3, 2], [3, 1]]
    return model


def _layer_tensors(model, side, index):
    return {name: t for name, t in getattr(model.model, side).layers[index].state_dict().items()}


def test_build_student_copies_the_spaced_layers(teacher):
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = build_student(teacher, encoder_layers=2, decoder_layers=2)

    assert student.config.encoder_layers == 2 and student.config.decoder_layers == 2
    assert len(student.model.encoder.layers) == 2 and len(student.model.decoder.layers) == 2
    assert getattr(student.config, TEACHER_LAYERS_KEY) == {"encoder": [0, 2], "decoder": [0, 3]}
    assert teacher_layer_map(student, teacher) == {"encoder": [0, 2], "decoder": [0, 3]}
    for side, kept in (("encoder", [0, 2]), ("decoder", [0, 3])):
        for k, t in enumerate(kept):
            ours, theirs = _layer_tensors(student, side, k), _layer_tensors(teacher, side, t)
            assert ours.keys() == theirs.keys()
            for name in ours:
                assert torch.equal(ours[name], theirs[name]), (side, k, name)
        # and not the neighbouring layer
        assert not torch.equal(student.model.decoder.layers[1].fc1.weight, teacher.model.decoder.layers[2].fc1.weight)
    # everything outside the layers is copied too
    for name in ("model.encoder.conv1.weight", "model.decoder.embed_tokens.weight", "model.decoder.layer_norm.weight"):
        assert torch.equal(student.state_dict()[name], teacher.state_dict()[name])

    # no tensor is shared with the teacher, nothing was left on the meta device, the output projection is tied
    teacher_storages = {t.untyped_storage().data_ptr() for t in teacher.state_dict().values()}
    for name, tensor in student.state_dict().items():
        assert tensor.device.type == "cpu", name
        assert tensor.untyped_storage().data_ptr() not in teacher_storages, name
    assert student.proj_out.weight is student.model.decoder.embed_tokens.weight

    # the teacher is unchanged, even after the student is trained a little
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    after = teacher.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert teacher.config.decoder_layers == 4 and not hasattr(teacher.config, TEACHER_LAYERS_KEY)


def test_build_student_outputs_match_teacher_when_all_layers_kept(teacher):
    student = build_student(teacher)
    assert student.training == teacher.training
    features = torch.randn(1, 80, 3000)
    ids = torch.tensor([[teacher.config.decoder_start_token_id, 50259, 50359]])
    with torch.no_grad():
        assert torch.equal(
            student(input_features=features, decoder_input_ids=ids).logits,
            teacher(input_features=features, decoder_input_ids=ids).logits,
        )


def test_build_student_remaps_alignment_heads(teacher):
    student = build_student(teacher, decoder_layers=2)  # keeps decoder layers [0, 3]
    assert student.generation_config.alignment_heads == [[1, 2], [1, 1]]
    assert teacher.generation_config.alignment_heads == [[1, 0], [3, 2], [3, 1]]
    # no head survives: None rather than an empty list
    teacher.generation_config.alignment_heads = [[1, 0]]
    assert build_student(teacher, decoder_layers=2).generation_config.alignment_heads is None


def test_student_keeps_generation_and_tokenizer_settings(teacher):
    student = build_student(teacher, decoder_layers=1)
    check_same_tokenizer(student, teacher)  # no error
    assert student.generation_config.lang_to_id == teacher.generation_config.lang_to_id
    assert student.generation_config is not teacher.generation_config


def test_check_same_tokenizer_english_only_vs_multilingual(tiny_whisper):
    multilingual, _ = tiny_whisper
    english = copy.deepcopy(multilingual)
    # English-only Whisper: 51864 tokens, every special token one id lower
    english.config.vocab_size = 51864
    for key in ("decoder_start_token_id", "eos_token_id", "pad_token_id", "no_timestamps_token_id"):
        value = getattr(english.generation_config, key)
        setattr(english.generation_config, key, value - 1)
    with pytest.raises(ValueError) as error:
        check_same_tokenizer(english, multilingual)
    message = str(error.value)
    assert "different tokenizers" in message and "vocab_size 51864 vs 51865" in message
    assert "decoder_start_token_id 50257 vs 50258" in message
    assert "English-only with English-only" in message


def test_check_same_tokenizer_catches_a_single_special_id(tiny_whisper):
    model, _ = tiny_whisper
    other = copy.deepcopy(model)
    other.generation_config.no_timestamps_token_id += 1
    with pytest.raises(ValueError, match="no_timestamps_token_id"):
        check_same_tokenizer(other, model)


def test_non_whisper_models_are_rejected(tiny_whisper):
    model, _ = tiny_whisper
    with pytest.raises(TypeError, match="not a WhisperForConditionalGeneration"):
        build_student(model.model)  # a WhisperModel, without the LM head
    with pytest.raises(TypeError, match="student is a Linear"):
        check_whisper(nn.Linear(2, 2), "student")
