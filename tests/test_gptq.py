"""GPTQ on the package's grid (quant.gptq), the layers that hold its codes (``fix_codes``) and the block-by-block
calibration that gives a frozen encoder its codes (calibration.gptq_layers)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import make_micro_rows, micro_collate

from hf_whisper_kdq.calibration import gptq_layers
from hf_whisper_kdq.quant import (
    QuantSpec,
    convert_qat,
    default_quant_targets,
    prepare_qat,
    quant_layers,
    quantize_weight,
    search_clip_ratios,
)
from hf_whisper_kdq.quant.gptq import InputHessian, gptq_quantize

pytestmark = pytest.mark.usefixtures("single_thread")

SPECS = [
    QuantSpec(4, "per_group", 32, learnable_clipping=True),
    QuantSpec(3, "per_channel"),
    QuantSpec(4, "per_tensor"),
]


def _correlated_inputs(columns: int, rows: int = 3000, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(columns, columns, generator=generator) / columns**0.5
    return torch.randn(rows, columns, generator=generator) @ mixing + 0.1 * torch.randn(
        rows, columns, generator=generator
    )


def _output_error(x: torch.Tensor, weight: torch.Tensor, quantized) -> float:
    reference = x @ weight.T
    return float((x @ quantized.dequantize(torch.float32).T - reference).pow(2).sum() / reference.pow(2).sum())


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_gptq_with_uncorrelated_inputs_is_round_to_nearest(spec):
    # A diagonal Hessian carries no error to other columns: GPTQ is then exactly quantize_weight (same grid and
    # scales, the clipping ratios included), which pins its grid to the one fake quantization trains on.
    weight = torch.randn(48, 128, generator=torch.Generator().manual_seed(1))
    clip = search_clip_ratios(weight, spec) if spec.learnable_clipping else None
    expected = quantize_weight(weight, spec, clip)
    got = gptq_quantize(weight, torch.eye(128) * 3.0, spec, clip)
    assert torch.equal(got.codes, expected.codes)
    assert torch.equal(got.scales, expected.scales)
    assert (got.bits, got.group_size, got.granularity) == (expected.bits, expected.group_size, expected.granularity)


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_gptq_lowers_the_output_error_on_correlated_inputs(spec):
    weight = torch.randn(48, 128, generator=torch.Generator().manual_seed(2))
    x = _correlated_inputs(128)
    hessian = InputHessian(128)
    for chunk in x.split(1000):
        hessian.add(chunk)
    gptq = gptq_quantize(weight, hessian.matrix(), spec)
    rtn = quantize_weight(weight, spec)
    assert gptq.codes.abs().max() <= 2 ** (spec.bits - 1)
    assert _output_error(x, weight, gptq) < 0.8 * _output_error(x, weight, rtn)


def test_gptq_gives_columns_without_input_code_zero_and_refuses_bad_shapes():
    weight = torch.randn(8, 64)
    x = _correlated_inputs(64, rows=500)
    x[:, 5] = 0
    hessian = InputHessian(64)
    hessian.add(x)
    quantized = gptq_quantize(weight, hessian.matrix(), QuantSpec(4, "per_group", 32))
    assert quantized.codes[:, 5].eq(0).all()
    with pytest.raises(ValueError, match="Hessian must be"):
        gptq_quantize(weight, torch.eye(32), QuantSpec(4, "per_group", 32))
    with pytest.raises(ValueError, match="no input rows"):
        InputHessian(64).matrix()


def test_a_layer_holding_fixed_codes_runs_and_converts_them_as_they_are():
    torch.manual_seed(0)
    spec = QuantSpec(4, "per_group", 32, learnable_clipping=True)
    model = torch.nn.Sequential(torch.nn.Linear(64, 16))
    prepare_qat(model, {"0": spec})
    layer = model[0]
    x = _correlated_inputs(64, rows=400)
    hessian = InputHessian(64)
    hessian.add(x)
    codes = gptq_quantize(layer.weight, hessian.matrix(), spec, layer.weight_clip)
    assert not torch.equal(codes.codes, quantize_weight(layer.weight, spec, layer.weight_clip).codes)
    layer.fix_codes(codes)
    # Re-rounding GPTQ's values would move codes: the forward (with and without autograd) uses them as they are.
    assert torch.equal(layer(x), F.linear(x, codes.dequantize(), layer.bias))
    with torch.no_grad():
        assert torch.equal(layer(x), F.linear(x, codes.dequantize(), layer.bias))
    layer.set_quant_spec(None)  # float while other layers are probed: the codes stay
    layer.set_quant_spec(spec)
    assert layer.fixed_codes() is codes
    assert convert_qat(copy.deepcopy(model))["0"].codes.equal(codes.codes)
    with torch.no_grad():
        layer.weight.add_(1e-3)
    with pytest.raises(RuntimeError, match="changed after fix_codes"):
        layer.fixed_codes()
    layer.set_quant_spec(QuantSpec(8, "per_group", 32, learnable_clipping=True))  # another layout: released
    assert layer.fixed_codes() is None
    with pytest.raises(ValueError, match="do not have the layer's spec"):
        layer.fix_codes(codes)


def test_frozen_layers_get_gptq_codes_block_after_block(micro_whisper):
    """Each encoder block is calibrated on the outputs of the blocks before it holding their codes (and its own
    layers in float); the codes lower the encoder's output error against round-to-nearest at the same clipping
    ratios."""
    teacher = micro_whisper()
    spec = QuantSpec(3, "per_group", 32, learnable_clipping=True)
    names = default_quant_targets(teacher, decoder=False)
    student = copy.deepcopy(teacher)
    prepare_qat(student, dict.fromkeys(names, spec))
    rtn = copy.deepcopy(student)
    layers = quant_layers(student)
    seen = []

    def record(module, args):  # what the second block's first layer sees: the first block quantized, itself float
        first, second = layers["model.encoder.layers.0.fc2"], layers["model.encoder.layers.1.fc1"]
        seen.append((first.fixed_codes() is not None, second.fixed_codes() is None, module.quant_spec is None))

    layers["model.encoder.layers.1.self_attn.q_proj"].register_forward_pre_hook(record)
    batches = [micro_collate(make_micro_rows(4, seed=seed)) for seed in (1, 2)]
    codes = gptq_layers(student, names, batches)
    assert seen and set(seen) == {(True, True, True)}
    assert set(codes) == set(names)
    assert all(layers[name].fixed_codes() is codes[name] for name in names)
    assert all(layers[name].quant_spec == spec for name in names)
    held_out = micro_collate(make_micro_rows(4, seed=3))["input_features"]
    with torch.no_grad():
        reference = teacher.model.encoder(held_out).last_hidden_state

        def error(model) -> float:
            return float((model.model.encoder(held_out).last_hidden_state - reference).pow(2).mean())

        assert error(student) < error(rtn)


def test_decoder_layers_start_from_gptq_on_encoder_states_computed_once(micro_whisper, monkeypatch):
    """keep_codes=False (a decoder that trains from GPTQ's start): each layer's weight becomes its codes' values and
    no codes are fixed; the decoder's blocks are calibrated on encoder states computed once per row, which gives
    the codes of the plain path that runs the whole model for every block."""
    from hf_whisper_kdq import calibration

    teacher = micro_whisper()
    spec = QuantSpec(4, "per_group", 32, learnable_clipping=True)
    names = default_quant_targets(teacher, encoder=False, embedding=False)
    batches = [micro_collate(make_micro_rows(4, seed=seed)) for seed in (1, 2)]

    def started(model):
        student = copy.deepcopy(model)
        prepare_qat(student, dict.fromkeys(names, spec))
        return student, gptq_layers(student, names, batches, keep_codes=False)

    encoder_runs = []
    real_encoder_forward = type(teacher.model.encoder).forward
    monkeypatch.setattr(
        type(teacher.model.encoder),
        "forward",
        lambda self, *a, **k: encoder_runs.append(1) or real_encoder_forward(self, *a, **k),
    )
    student, codes = started(teacher)
    rows = sum(int(batch["labels"].ne(-100).any(1).sum()) for batch in batches)
    assert len(encoder_runs) == rows  # once per row, not once per block
    layers = quant_layers(student)
    assert set(codes) == set(names) and all(layers[name].fixed_codes() is None for name in names)
    assert all(torch.equal(layers[name].weight, codes[name].dequantize()) for name in names)
    monkeypatch.setattr(calibration, "_encoder_states", lambda model, batches: None)
    _, plain = started(teacher)
    assert all(torch.equal(plain[name].codes, codes[name].codes) for name in names)


@pytest.mark.parametrize("side", ["encoder", "decoder"])
def test_blocks_calibrated_on_kept_outputs_get_the_codes_of_whole_model_passes(micro_whisper, side):
    """Each block runs on the previous block's kept outputs (with its codes) instead of the model running from its
    input up to every block: the same codes as calibrating one block per call, where each block's inputs come from
    a forward of the whole model with the earlier blocks' codes."""
    from hf_whisper_kdq.calibration import _blocks

    teacher = micro_whisper()
    spec = QuantSpec(4, "per_group", 32, learnable_clipping=True)
    names = default_quant_targets(teacher, encoder=side == "encoder", decoder=side == "decoder")
    batches = [micro_collate(make_micro_rows(4, seed=seed)) for seed in (1, 2)]
    keep_codes = side == "encoder"  # as the trainer calibrates each side

    def prepared():
        student = copy.deepcopy(teacher)
        prepare_qat(student, dict.fromkeys(names, spec))
        return student

    student = prepared()
    runs = []
    student.model.register_forward_pre_hook(lambda module, args: runs.append(1))
    codes = gptq_layers(student, names, batches, keep_codes=keep_codes)
    rows = sum(int(batch["labels"].ne(-100).any(1).sum()) for batch in batches)
    assert len(_blocks(names)) > 1 and len(runs) == rows  # one forward per row, not one per block
    per_block, expected = prepared(), {}
    for block_names in _blocks(names).values():
        expected |= gptq_layers(per_block, block_names, batches, keep_codes=keep_codes)
    assert all(torch.equal(expected[name].codes, codes[name].codes) for name in names)
    assert all(torch.equal(expected[name].scales, codes[name].scales) for name in names)


GGML_TYPES = ["q4_0", "q8_0", "q3_K", "q2_K"]


@pytest.mark.parametrize("ggml_type", GGML_TYPES)
def test_gptq_on_a_ggml_type_rounds_on_ggmls_own_block_scales(ggml_type):
    # With a diagonal Hessian GPTQ has ggml's reference quantizer's scales (the k-quants' super- and sub-block scales,
    # q2_K's minimums, included) and rounds each weight on them as ggml does; q8_0 and q4_0 round on the fp16 scale the file stores
    # where ggml rounds on the float32 one, which moves a code only at a near tie. On correlated inputs it lowers
    # the output error, with the same kind of blocks (codes in the type's range, ggml's scales), which
    # export_whisper_cpp writes as they are.
    from hf_whisper_kdq.quant import GGMLSpec
    from hf_whisper_kdq.quant.ggml_blocks import group_offsets, round_to_scales

    spec = GGMLSpec(ggml_type)
    weight = torch.randn(16, 512, generator=torch.Generator().manual_seed(3))
    expected = quantize_weight(weight, spec)
    plain = gptq_quantize(weight, torch.eye(512), spec)
    assert plain.ggml_type == ggml_type and torch.equal(plain.scales, expected.scales)
    offsets = group_offsets(expected)
    if offsets is not None:
        offsets = offsets.repeat_interleave(spec.group_size, dim=1)
    on_stored_scales = round_to_scales(
        weight, expected.scales.repeat_interleave(spec.group_size, dim=1), ggml_type, offsets
    )
    assert torch.equal(plain.codes, on_stored_scales.to(torch.int8))
    # Where a sub-block's scale is 0 ggml keeps its search's codes and GPTQ writes 0: the same values.
    scaled = expected.scales.repeat_interleave(spec.group_size, dim=1) != 0
    assert (plain.codes - expected.codes)[scaled].abs().max() <= 1
    assert (plain.dequantize() != expected.dequantize()).float().mean() < 0.01
    for field in ("super_scales", "sub_scales", "super_mins", "sub_mins"):
        ours, ggml = getattr(plain, field), getattr(expected, field)
        assert (ours is None and ggml is None) or torch.equal(ours, ggml)
    x = _correlated_inputs(512, rows=4000)
    hessian = InputHessian(512)
    hessian.add(x)
    gptq = gptq_quantize(weight, hessian.matrix(), spec)
    lowest, highest = {"q8_0": (-127, 127), "q4_0": (-8, 7), "q3_K": (-4, 3), "q2_K": (0, 3)}[ggml_type]
    assert lowest <= int(gptq.codes.min()) and int(gptq.codes.max()) <= highest
    assert _output_error(x, weight, gptq) < 0.8 * _output_error(x, weight, expected)
    with pytest.raises(ValueError, match="takes no clipping ratios"):
        gptq_quantize(weight, hessian.matrix(), spec, torch.ones(16, 512 // spec.group_size))
    if ggml_type == "q2_K":
        with pytest.raises(ValueError, match="pass offsets"):
            round_to_scales(weight, expected.scales.repeat_interleave(spec.group_size, dim=1), ggml_type)


def test_gptq_layers_shows_a_bar_over_the_blocks_unless_told_not_to(micro_whisper, capsys):
    teacher = micro_whisper()
    names = default_quant_targets(teacher, decoder=False)
    batches = [micro_collate(make_micro_rows(2, seed=1))]
    for progress in (True, False):
        student = copy.deepcopy(teacher)
        prepare_qat(student, dict.fromkeys(names, QuantSpec(4, "per_group", 32)))
        gptq_layers(student, names, batches, progress=progress)
        shown = capsys.readouterr().err
        blocks = len({name.split(".self_attn")[0].split(".fc")[0] for name in names})
        assert (f"GPTQ (encoder, {len(names)} linears)" in shown and f"{blocks}/{blocks}" in shown) is progress
