"""LoRA students (hf_whisper_kdq.peft_students): adapters train inside the quantizer with the guided selection, and
every export of the merged student holds exactly the codes the LoRA student ran with. (Resume: test_resume.py.)"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import (
    SHORT_WINDOW_SECONDS,
    make_micro_rows,
    make_micro_whisper,
    make_tiny_whisper,
    micro_collate,
    micro_training_args,
    tiny_speech_rows,
)
from datasets import Dataset
from safetensors.torch import load_file

peft = pytest.importorskip("peft")

from hf_whisper_kdq import DistillQuantTrainer, WhisperDataCollator  # noqa: E402
from hf_whisper_kdq.adapters import merge_lora_layers  # noqa: E402
from hf_whisper_kdq.peft_students import QuantLoraLinear, attach_lora, take_apart  # noqa: E402
from hf_whisper_kdq.quant import (  # noqa: E402
    FakeQuantLinear,
    QuantSpec,
    convert_qat,
    default_quant_targets,
    prepare_qat,
    quant_layers,
)


def _micro_trainer(tmp_path, student, **overrides) -> DistillQuantTrainer:
    args = micro_training_args(
        tmp_path,
        max_steps=6,
        quant_targets="encoder,decoder,embedding",
        quant_bit_choices="2,4,8",
        quant_group_size=16,
        selection_interval=3,
        selection_cost="local_error",  # moves bits on the micro model (its output_kl costs are noise)
        size_budget_mb=0.06,
        remove_unused_columns=False,
        **overrides,
    )
    return DistillQuantTrainer(
        model=student,
        teacher_model=make_micro_whisper(seed=0, decoder_layers=4),
        args=args,
        train_dataset=Dataset.from_list(make_micro_rows(16, seed=3)),
        data_collator=micro_collate,
    )


def test_lora_student_trains_only_adapters_and_clipping_while_the_selection_runs(tmp_path):
    trainer = _micro_trainer(tmp_path, make_micro_whisper(seed=1), lora_r=4)
    student = trainer.model
    assert isinstance(trainer.peft_model, peft.PeftModel) and trainer.peft_model.get_base_model() is student
    # Every attention (decoders: self and cross) and feed-forward linear is a LoRA layer over its fake-quant wrapper,
    # under its own name.
    linears = [n for n in quant_layers(student) if "embed_tokens" not in n and "proj_out" not in n]
    assert len(linears) == 2 * 6 + 2 * 10 and all(
        isinstance(student.get_submodule(n), QuantLoraLinear) for n in linears
    )
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n or n.endswith("weight_clip") for n in trainable)
    frozen = {n: p.detach().clone() for n, p in student.named_parameters() if n not in trainable}

    trainer.train()

    assert trainer.plan.step == 3 and len({u.bits for u in trainer.plan.units}) > 1  # re-selected, mixed bits
    assert all(torch.equal(p, frozen[n]) for n, p in student.named_parameters() if n in frozen)
    fc1 = student.get_submodule("model.decoder.layers.0.fc1")
    assert fc1.lora_B["default"].weight.abs().sum() > 0  # the adapters learned
    # What the layer quantizes is W + B·A, and the quantization loss compares with that weight.
    base = fc1.get_base_layer()
    torch.testing.assert_close(base.effective_weight(), base.weight + fc1.get_delta_weight("default"))
    logged = trainer.state.log_history[0]
    assert {"loss_ce", "loss_kd", "loss_hidden", "loss_quant"} <= set(logged)
    # peft saves the adapters alone, under peft's own names.
    trainer.peft_model.save_pretrained(tmp_path / "adapters")
    saved = load_file(str(tmp_path / "adapters" / "adapter_model.safetensors"))
    assert saved and all(".lora_A." in key or ".lora_B." in key for key in saved)


def test_a_peft_model_student_keeps_its_adapters_and_config(tmp_path):
    student = make_micro_whisper(seed=1)
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    given = peft.get_peft_model(student, config)
    with torch.no_grad():
        given.base_model.model.model.decoder.layers[1].self_attn.v_proj.lora_B["default"].weight.fill_(0.01)
    trainer = _micro_trainer(tmp_path, given)
    v_proj = trainer.model.get_submodule("model.decoder.layers.1.self_attn.v_proj")
    assert isinstance(v_proj, QuantLoraLinear) and v_proj.r["default"] == 2 and v_proj.scaling["default"] == 2.0
    assert torch.all(v_proj.lora_B["default"].weight == 0.01)  # put back on the wrapper
    assert not hasattr(trainer.model.get_submodule("model.decoder.layers.1.fc1"), "lora_A")

    with pytest.raises(ValueError, match="drop lora_r"):
        _micro_trainer(tmp_path, peft.get_peft_model(make_micro_whisper(seed=1), config), lora_r=4)
    with pytest.raises(ValueError, match="lora_dropout=0.0"):
        dropping = peft.LoraConfig(r=2, target_modules=["q_proj"], lora_dropout=0.1)
        _micro_trainer(tmp_path, peft.get_peft_model(make_micro_whisper(seed=1), dropping))
    with pytest.raises(ValueError, match="Target the decoder's linears only"):
        _micro_trainer(tmp_path, peft.get_peft_model(make_micro_whisper(seed=1), config), freeze_encoder=True)


def _adapted(model) -> dict[str, FakeQuantLinear]:
    """The fake-quant wrappers under a LoRA layer, by layer name."""
    return {n: m.get_base_layer() for n, m in model.named_modules() if isinstance(m, QuantLoraLinear)}


@pytest.fixture(scope="module")
def lora_student(base_pack_folder, tmp_path_factory):
    """A tiny Whisper (whisper.cpp's shapes, 1 s window), every linear and the embedding at int4-g32 (one width: the
    packed folder packs the embedding too, whisper.cpp takes int4-g32 codes as q4_0), with non-zero LoRA updates large
    enough to move codes, and its processor."""
    width = 4 * 64
    model, processor = make_tiny_whisper(
        base_pack_folder, window_seconds=SHORT_WINDOW_SECONDS, encoder_ffn_dim=width, decoder_ffn_dim=width
    )
    prepare_qat(model, dict.fromkeys(default_quant_targets(model, embedding=True), QuantSpec.parse("int4-g32")))
    args = micro_training_args(tmp_path_factory.mktemp("lora"), lora_r=8)
    model, setup = take_apart(model, args)
    attach_lora(model, setup, args)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, QuantLoraLinear):
                module.lora_B["default"].weight.normal_(0, 0.05, generator=generator)
    return model.eval(), processor


def _without_offset(layer: FakeQuantLinear) -> FakeQuantLinear:
    plain = copy.deepcopy(layer)
    plain.attach_weight_offset(None)
    return plain


def test_merging_changes_no_quantized_weight_and_no_output(lora_student):
    model, processor = lora_student
    features = torch.tensor(tiny_speech_rows(processor, ["a"])[0]["input_features"])[None]
    ids = torch.tensor([[50258, 50259, 50359, 257, 1029]])
    with torch.no_grad():
        before = {n: m.quantized_weight().clone() for n, m in quant_layers(model).items()}
        logits = model(input_features=features, decoder_input_ids=ids).logits
        merged = copy.deepcopy(model)
        assert sorted(merge_lora_layers(merged)) == sorted(_adapted(model))
        after = {n: m.quantized_weight() for n, m in quant_layers(merged).items()}
        # The adapters moved the codes of every adapted layer (against round-to-nearest of the weights under them) ...
        for name, layer in _adapted(model).items():
            assert not torch.equal(before[name], FakeQuantLinear.quantized_weight(_without_offset(layer))), name
        # ... and the merged student quantizes to the very same values, so its outputs are the LoRA student's.
        assert all(torch.equal(after[n], before[n]) for n in before)
        assert torch.equal(merged(input_features=features, decoder_input_ids=ids).logits, logits)
    assert isinstance(merged.get_submodule("model.decoder.layers.0.fc1"), FakeQuantLinear)
    with pytest.raises(RuntimeError, match="merge the adapters first"):
        convert_qat(copy.deepcopy(model))


def test_packed_folder_holds_the_lora_students_codes(lora_student, tmp_path):
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    from hf_whisper_kdq.export import save_compressed

    model, processor = lora_student
    save_compressed(model, processor, tmp_path / "packed")
    tensors = load_file(str(tmp_path / "packed" / "model.safetensors"))
    assert not any(".lora_" in key or "base_layer" in key for key in tensors)
    for name, layer in _adapted(model).items():
        rows, cols = layer.weight.shape
        codes = unpack_from_int32(tensors[f"{name}.weight_packed"], 4, (rows, cols)).float()
        scales = tensors[f"{name}.weight_scale"].float().repeat_interleave(32, dim=1)
        assert torch.equal(codes * scales, layer.quantized_weight().detach()), name
    assert isinstance(model.get_submodule("model.decoder.layers.0.fc1"), QuantLoraLinear)  # the caller's is kept


def test_whisper_cpp_and_ctranslate2_exports_hold_the_lora_students_weights(lora_student, tmp_path):
    pytest.importorskip("ctranslate2")
    from test_export_ggml import _read_ggml

    from hf_whisper_kdq.export.ctranslate2 import export_ctranslate2
    from hf_whisper_kdq.export.ggml import export_whisper_cpp, ggml_tensor_name
    from hf_whisper_kdq.quant.ggml_blocks import unpack
    from hf_whisper_kdq.sources import load_whisper

    model, processor = lora_student
    # ftype auto: the student's own int4-g32 codes as q4_0 blocks (the export compares them with its weights).
    tensors = _read_ggml(export_whisper_cpp(model, processor, tmp_path / "model.bin", ftype="auto"))["tensors"]
    exported, _ = load_whisper(export_ctranslate2(model, processor, tmp_path / "ct2", quantization="float32"))
    for name, layer in _adapted(model).items():
        fake = layer.quantized_weight().detach()
        kind, _, data = tensors[ggml_tensor_name(f"{name}.weight")]
        assert kind == "q4_0"
        np.testing.assert_array_equal(unpack(data, "q4_0", tuple(fake.shape)), fake.numpy())
        assert torch.equal(exported.get_submodule(name).weight, fake), name


def test_trained_lora_student_saves_exact_codes_through_the_trainer(tmp_path, base_pack_folder):
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    teacher, processor = make_tiny_whisper(base_pack_folder, window_seconds=SHORT_WINDOW_SECONDS)
    student, _ = make_tiny_whisper(base_pack_folder, seed=1, window_seconds=SHORT_WINDOW_SECONDS, decoder_layers=1)
    rows = tiny_speech_rows(processor, ["hello world", "a test", "one two three", "four"])
    args = micro_training_args(
        tmp_path, max_steps=2, per_device_train_batch_size=2, lora_r=4, quant_bit_choices="4,8", learning_rate=1e-2
    )
    trainer = DistillQuantTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=Dataset.from_list(rows),
        data_collator=WhisperDataCollator(processor, student.config.decoder_start_token_id),
        processing_class=processor,
    )
    trainer.train()
    report = trainer.save_compressed()
    tensors = load_file(str(report.folder / "model.safetensors"))
    quantized = {n: m for n, m in quant_layers(trainer.model).items() if m.quant_spec is not None}
    assert quantized
    for name, layer in quantized.items():
        spec = layer.quant_spec
        rows_, cols = layer.weight.shape
        codes = unpack_from_int32(tensors[f"{name}.weight_packed"], spec.bits, (rows_, cols)).float()
        group = spec.group_size or cols
        scales = tensors[f"{name}.weight_scale"].float().repeat_interleave(group, dim=1)
        assert torch.equal(codes * scales, layer.quantized_weight().detach()), name


def test_compress_trains_a_lora_student(tmp_path, base_pack_folder):
    """compress --lora_r: the packed folder and the whisper.cpp file of a LoRA student (both check their codes)."""
    pytest.importorskip("piper")
    from hf_whisper_kdq.cli import main
    from hf_whisper_kdq.sources import save_whisper

    model, processor = make_tiny_whisper(
        base_pack_folder, window_seconds=SHORT_WINDOW_SECONDS, encoder_ffn_dim=256, decoder_ffn_dim=256
    )
    teacher = save_whisper(model, processor, tmp_path / "teacher")
    arguments = (
        "--level smoke --synthetic_prompts 4 --max_eval_samples 2 --max_steps 2 --per_device_train_batch_size 2 "
    )
    arguments += "--per_device_eval_batch_size 2 --decoder_layers 1 --eval_max_new_tokens 4 --disable_tqdm true "
    arguments += "--ctranslate2_quantization none --evaluate_teacher false --quant_format ggml --lora_r 4"
    output = tmp_path / "run"
    assert main(["compress", str(teacher), "--output_dir", str(output), *arguments.split()]) == 0
    assert (output / "compressed" / "ggml-model.bin").is_file()
    assert (output / "compressed" / "model.safetensors").is_file()
