"""Quantization-aware training: quantizer math, wrappers, prepare/convert on a tiny Whisper, sizes."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from torch import nn

from hf_whisper_kdq.quant import (
    ALLOWED_BITS,
    FakeQuantEmbedding,
    FakeQuantLinear,
    QuantSpec,
    convert_qat,
    default_quant_targets,
    fake_quantize,
    prepare_qat,
    quant_specs,
    quantize_weight,
    quantized_size_bytes,
    search_clip_ratios,
    search_clips_on_inputs,
    set_quant_specs,
    weight_bytes,
)

EMBED = "model.decoder.embed_tokens"
GRANULARITY_SPECS = {
    "per_tensor": dict(granularity="per_tensor"),
    "per_channel": dict(granularity="per_channel"),
    "per_group": dict(granularity="per_group", group_size=16),
}


def _weight(rows: int = 16, cols: int = 64, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    # Rows of very different magnitudes, so per-channel/group scales actually differ.
    return torch.randn(rows, cols, generator=generator) * torch.logspace(-2, 0, rows).unsqueeze(1)


def _element_scale(q, shape) -> torch.Tensor:
    """Each element's scale, ``[rows, cols]``."""
    rows, cols = shape
    return q.scales.repeat_interleave(q.group_size, dim=1).expand(rows, cols)


def _inputs(model):
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(2, model.config.num_mel_bins, 3000, generator=generator)
    decoder_ids = torch.tensor([[50258, 50259, 50359, 50363, 440, 2068], [50258, 50259, 50359, 50363, 1029, 13]])
    return features, decoder_ids


def _logits(model) -> torch.Tensor:
    features, decoder_ids = _inputs(model)
    with torch.no_grad():
        return model(input_features=features, decoder_input_ids=decoder_ids).logits


# ---------------------------------------------------------------------------------------------- spec


def test_spec_rejects_bad_bits_and_granularity():
    with pytest.raises(ValueError, match=r"\[2, 3, 4, 8\]"):
        QuantSpec(bits=5)
    with pytest.raises(ValueError, match=r"QuantSpec.bits must be one of \[2, 3, 4, 8\], got 4.0"):
        QuantSpec(bits=4.0)
    with pytest.raises(ValueError, match="bits"):
        QuantSpec.parse("int5")
    with pytest.raises(ValueError, match="granularity"):
        QuantSpec(bits=4, granularity="per_row")
    with pytest.raises(ValueError, match="group_size"):
        QuantSpec(bits=4, granularity="per_group")
    with pytest.raises(ValueError, match="group_size"):
        QuantSpec(bits=4, granularity="per_channel", group_size=32)
    with pytest.raises(ValueError, match="symmetric"):
        QuantSpec(bits=4, symmetric=False)


def test_spec_parse_round_trips():
    assert QuantSpec.parse("int4-g32") == QuantSpec(4, "per_group", 32)
    assert QuantSpec.parse("int8") == QuantSpec(8, "per_channel")
    assert QuantSpec.parse("int2-tensor-clip") == QuantSpec(2, "per_tensor", learnable_clipping=True)
    for text in ("int4-g32", "int8", "int3-tensor", "int2-g64-clip"):
        assert str(QuantSpec.parse(text)) == text
    with pytest.raises(ValueError, match="unknown part"):
        QuantSpec.parse("int4-g32-foo")
    assert QuantSpec(4).qmax == 7 and QuantSpec(4).qmin == -8 and QuantSpec(2).qmax == 1 and QuantSpec(2).qmin == -2


def test_group_size_must_divide_width():
    with pytest.raises(ValueError, match=r"my\.layer.*48.*\[1, 2, 3, 4, 6, 8, 12, 16, 24, 48\]"):
        fake_quantize(torch.randn(4, 48), QuantSpec(4, "per_group", 32), layer="my.layer")
    with pytest.raises(ValueError, match="48"):
        weight_bytes((4, 48), QuantSpec(4, "per_group", 32))


# ---------------------------------------------------------------------------------------------- math


@pytest.mark.parametrize("granularity", list(GRANULARITY_SPECS))
def test_fake_quant_error_bounded_by_half_scale_and_shrinks_with_bits(granularity):
    weight = _weight()
    mean_errors = []
    for bits in ALLOWED_BITS:
        spec = QuantSpec(bits, **GRANULARITY_SPECS[granularity])
        q = quantize_weight(weight, spec)
        fake = fake_quantize(weight, spec)
        assert torch.equal(fake, q.dequantize())
        assert q.codes.dtype == torch.int8 and q.codes.shape == weight.shape
        assert q.scales.dtype == torch.float32 and tuple(q.scales.shape) == spec.scale_shape(weight.shape)
        assert int(q.codes.min()) == spec.qmin and int(q.codes.max()) <= spec.qmax  # max|w| maps to qmin
        # Scales are fp16-exact, so the export's fp16 cast is lossless.
        assert torch.equal(q.scales.half().float(), q.scales)
        error = (fake - weight).abs()
        scale = _element_scale(q, weight.shape)
        # Half a step inside the code range; the side opposite to max|w| is clipped at qmax steps, one step short.
        inside = (weight / scale >= spec.qmin - 0.5) & (weight / scale <= spec.qmax + 0.5)
        assert bool((error[inside] <= scale.abs()[inside] * (0.5 + 1e-6)).all()), (bits, granularity)
        assert bool((error <= scale.abs() * (1 + 1e-6)).all()), (bits, granularity)
        mean_errors.append(float(error.mean()))
    assert mean_errors == sorted(mean_errors, reverse=True) and len(set(mean_errors)) == len(mean_errors)


def test_ste_gradient_is_identity_inside_clip_range_and_zero_outside():
    weight = _weight(8, 64).requires_grad_(True)
    spec = QuantSpec(4, "per_group", group_size=32)
    clip = torch.full(spec.scale_shape(weight.shape), 0.5)
    fake_quantize(weight, spec, clip).backward(torch.ones_like(weight))
    scale = _element_scale(quantize_weight(weight, spec, clip), weight.shape)
    ratio = weight.detach() / scale
    inside = (ratio >= spec.qmin) & (ratio <= spec.qmax)
    assert 0 < int(inside.sum()) < weight.numel()
    assert torch.equal(weight.grad[inside], torch.ones_like(weight.grad[inside]))
    assert torch.equal(weight.grad[~inside], torch.zeros_like(weight.grad[~inside]))
    # The clip range is clip * max|w| of the group on the side of the largest |w| (the scale is only rounded up to
    # fp16), and qmax / -qmin of it on the other side.
    group_max = weight.detach().abs().reshape(8, 2, 32).amax(-1, keepdim=True).expand(8, 2, 32).reshape(8, 64)
    assert bool(inside[weight.detach().abs() <= 0.499 * group_max * spec.qmax / -spec.qmin].all())
    assert not bool(inside[weight.detach().abs() > 0.501 * group_max].any())


@pytest.mark.parametrize("granularity", list(GRANULARITY_SPECS))
def test_learnable_clip_gets_gradient_and_matches_quantize_weight(granularity):
    weight = _weight()
    spec = QuantSpec(3, learnable_clipping=True, **GRANULARITY_SPECS[granularity])
    clip = torch.full(spec.scale_shape(weight.shape), 0.8, requires_grad=True)
    fake = fake_quantize(weight, spec, clip)
    (fake - weight).pow(2).sum().backward()
    assert clip.grad is not None and bool(torch.isfinite(clip.grad).all())
    assert float(clip.grad.abs().sum()) > 0
    assert torch.equal(fake.detach(), quantize_weight(weight, spec, clip).dequantize())


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


def _composite_fake_quantize(weight, spec, clip):
    """The quantizer written as plain autograd over div/clamp/round/mul, the way the module docstring states it:
    the reference for `fake_quantize`'s hand-written backward."""
    from hf_whisper_kdq.quant.fake_quant import _grouped_scale

    grouped, scale = _grouped_scale(weight, spec, clip, "<reference>")
    codes = _RoundSTE.apply(torch.clamp(grouped / scale, spec.qmin, spec.qmax))
    return (codes * scale).reshape(weight.shape)


@pytest.mark.parametrize("granularity", list(GRANULARITY_SPECS))
def test_fused_backward_equals_autograd_over_the_formula(granularity):
    spec = QuantSpec(4, learnable_clipping=True, **GRANULARITY_SPECS[granularity])
    grads = []
    for quantizer in (fake_quantize, _composite_fake_quantize):
        weight = _weight().requires_grad_(True)
        generator = torch.Generator().manual_seed(3)
        clip = (0.5 + 0.5 * torch.rand(spec.scale_shape(weight.shape), generator=generator)).requires_grad_(True)
        output = quantizer(weight, spec, clip)
        output.backward(torch.randn(weight.shape, generator=generator))
        grads.append((output.detach(), weight.grad, clip.grad))
    (fused_out, fused_weight, fused_clip), (ref_out, ref_weight, ref_clip) = grads
    assert torch.equal(fused_out, ref_out)
    # The reference's weight gradient is (grad * scale) / scale, the same up to rounding; the clipped set is equal.
    torch.testing.assert_close(fused_weight, ref_weight, rtol=1e-6, atol=0)
    assert torch.equal(fused_weight == 0, ref_weight == 0)
    assert 0 < int((fused_weight == 0).sum()) < fused_weight.numel()  # some elements clipped, some not
    torch.testing.assert_close(fused_clip, ref_clip, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("spec", ["int4-g16-clip", "int3-clip", "int4-g16", "int8-per_tensor-clip"])
def test_embedding_quantizes_looked_up_rows_like_the_whole_table(spec):
    ids = torch.tensor([[3, 1, 3, 0, 0], [5, 3, 2, 0, 0]])  # repeated tokens and padding (0)
    grads = {}
    for path in ("rows", "table"):
        embedding = FakeQuantEmbedding.from_float(nn.Embedding(8, 64, padding_idx=0), name="embed")
        with torch.no_grad():
            embedding.weight.copy_(_weight(8, 64))
        embedding.set_quant_spec(spec)
        if embedding.weight_clip is not None:
            with torch.no_grad():
                embedding.weight_clip.uniform_(0.5, 1.0, generator=torch.Generator().manual_seed(0))
        if path == "rows":
            output = embedding(ids)
        else:  # the whole table, quantized then looked up
            table = fake_quantize(embedding.weight, embedding.quant_spec, embedding.weight_clip)
            output = nn.functional.embedding(ids, table, padding_idx=0)
        output.backward(torch.randn(output.shape, generator=torch.Generator().manual_seed(1)))
        grads[path] = (output.detach(), embedding.weight.grad, embedding.weight_clip)
    (rows_out, rows_weight, rows_clip), (table_out, table_weight, table_clip) = grads["rows"], grads["table"]
    assert torch.equal(rows_out, table_out)
    torch.testing.assert_close(rows_weight, table_weight, rtol=1e-6, atol=0)
    assert float(rows_weight[0].abs().sum()) == 0 and float(rows_weight[3].abs().sum()) > 0  # padding row: no gradient
    if rows_clip is not None:
        torch.testing.assert_close(rows_clip.grad, table_clip.grad, rtol=1e-5, atol=1e-7)


def test_weight_bytes_and_nbytes_packed():
    int4_g32 = QuantSpec.parse("int4-g32")
    assert weight_bytes((64, 64), int4_g32) == 64 * 64 // 2 + 64 * 2 * 2
    assert quantize_weight(torch.randn(64, 64), int4_g32).nbytes_packed == 64 * 64 // 2 + 64 * 2 * 2
    assert weight_bytes((64, 64), None) == 64 * 64 * 2
    assert weight_bytes((3, 7), QuantSpec(3)) == 3 * 4 + 3 * 2  # each row's 21 bits take a whole 32-bit word
    assert weight_bytes((64, 64), QuantSpec(8, "per_tensor")) == 64 * 64 + 2
    shapes = {"a": (64, 64), "b": (64, 64)}
    assert quantized_size_bytes(shapes, {"a": int4_g32}) == 2304 + 64 * 64 * 2
    with pytest.raises(KeyError):
        quantized_size_bytes(shapes, {"c": int4_g32})


def test_two_bit_codes_have_four_levels():
    weight = _weight(16, 64)
    for spec in (QuantSpec(2, "per_group", 16), QuantSpec(2), QuantSpec(2, "per_tensor")):
        q = quantize_weight(weight, spec)
        assert sorted(q.codes.unique().tolist()) == [-2, -1, 0, 1], spec
        # Each scale's fake-quantized values take four levels too (not three with a spare code).
        values = fake_quantize(weight, spec).reshape(-1, q.group_size if spec.granularity != "per_tensor" else 64)
        assert max(len(row.unique()) for row in values) == 4, spec


@pytest.mark.parametrize("bits", ALLOWED_BITS)
@pytest.mark.parametrize("shape", [(8, 64), (5, 48), (3, 20)])
def test_billed_bytes_equal_packed_bytes(bits, shape):
    """What the budget bills for a layer is what compressed-tensors' pack-quantized format stores for it."""
    pack = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    spec = QuantSpec(bits, "per_group", 4) if shape[1] % 4 == 0 else QuantSpec(bits)
    q = quantize_weight(_weight(*shape), spec)
    packed = pack.pack_to_int32(q.codes, bits)
    stored = packed.numel() * packed.element_size() + q.scales.numel() * 2  # the scales are stored in fp16
    assert weight_bytes(shape, spec) == stored == q.nbytes_packed


def test_clip_search_lowers_the_error_of_a_weight_with_outliers():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(32, 64, generator=generator)
    weight[torch.rand(weight.shape, generator=generator) < 0.02] *= 8.0  # a few outliers per row
    for spec in (QuantSpec(3, "per_group", 32, learnable_clipping=True), QuantSpec(4, learnable_clipping=True)):
        searched = search_clip_ratios(weight, spec)
        assert searched.shape == spec.scale_shape(weight.shape) and bool((searched <= 1).all())

        def error(clip, spec=spec):
            return float((fake_quantize(weight, spec, clip) - weight).pow(2).sum())

        assert error(searched) < error(torch.ones_like(searched)) and float(searched.min()) < 1, spec


def test_clip_search_on_inputs_minimizes_the_expected_output_error():
    """Weighted by E[x_j²], the search keeps the weight that meets large inputs; by weight error it clips it."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(32, 64, generator=generator)
    weight[:, 5] = 6.0  # the extreme of its group (columns 0-31) in every row
    spec = QuantSpec(3, "per_group", 32, learnable_clipping=True)
    loud_input = torch.ones(64)
    loud_input[5] = 1e4  # column 5 meets inputs 100 times larger (x² 10⁴ times) than the others

    def output_error(clip):
        return float(((fake_quantize(weight, spec, clip) - weight).pow(2) * loud_input).sum())

    by_weight = search_clip_ratios(weight, spec)
    by_output = search_clip_ratios(weight, spec, input_mean_square=loud_input)
    assert float(by_weight[:, 0].min()) < 1.0  # the weight error clips the outlier column...
    assert bool((by_output[:, 0] == 1.0).all())  # ...whose error, weighted by its inputs, costs most
    assert output_error(by_output) < output_error(by_weight)
    # Alike inputs weigh every column alike: the weight-error search again.
    assert torch.equal(search_clip_ratios(weight, spec, input_mean_square=torch.full((64,), 3.0)), by_weight)
    with pytest.raises(ValueError, match=r"input_mean_square must have shape \[64\]"):
        search_clip_ratios(weight, spec, input_mean_square=torch.ones(32))


def test_search_clips_on_inputs_rewrites_the_ratios_in_place():
    model = nn.ModuleDict({"a": nn.Linear(64, 32), "b": nn.Linear(64, 32)})
    with torch.no_grad():
        model["a"].weight[:, 5] = 6.0
    prepare_qat(model, {"a": "int3-g32-clip", "b": "int3-g32-clip"})
    clip_a, clip_b = model["a"].weight_clip, model["b"].weight_clip.detach().clone()
    loud_input = torch.ones(64)
    loud_input[5] = 1e4
    searched = search_clips_on_inputs(model, quant_specs(model), {"a": loud_input})
    assert searched == ["a"]
    assert model["a"].weight_clip is clip_a  # the Parameter an optimizer holds
    expected = search_clip_ratios(model["a"].weight.detach(), model["a"].quant_spec, input_mean_square=loud_input)
    assert torch.equal(clip_a.detach(), expected)
    assert torch.equal(model["b"].weight_clip.detach(), clip_b)  # no inputs measured: kept


def test_new_clip_parameter_starts_at_the_searched_ratios():
    linear = FakeQuantLinear(64, 32, spec=None, name="layer")
    with torch.no_grad():
        linear.weight.copy_(torch.randn(32, 64) * (1 + 7 * (torch.rand(32, 64) < 0.02)))
    linear.set_quant_spec("int3-g32-clip")
    assert torch.equal(linear.weight_clip.detach(), search_clip_ratios(linear.weight.detach(), linear.quant_spec))
    assert float(linear.weight_clip.min()) < 1.0


# ---------------------------------------------------------------------------------------------- wrappers


def test_set_quant_spec_resizes_or_keeps_clip():
    layer = FakeQuantLinear(64, 8, spec="int4-g32-clip", name="toy")
    assert layer.weight_clip.shape == (8, 2)
    clip = layer.weight_clip
    layer.set_quant_spec("int3-g32-clip")  # same shape: same Parameter, optimizers keep tracking it
    assert layer.weight_clip is clip
    layer.set_quant_spec(None)  # float, learned clip kept for later
    assert layer.weight_clip is clip and "quant=float" in repr(layer)
    layer.set_quant_spec("int4-clip")  # per channel: new shape, restarts at the searched ratios
    assert layer.weight_clip.shape == (8, 1)
    assert torch.equal(layer.weight_clip, search_clip_ratios(layer.weight.detach(), layer.quant_spec))
    layer.set_quant_spec("int4-g16")
    assert layer.weight_clip is None and "weight_clip" not in layer.state_dict()
    assert "bits=4, granularity=per_group, group_size=16" in repr(layer)
    with pytest.raises(ValueError, match="toy.*64"):
        layer.set_quant_spec("int4-g48")
    embedding = FakeQuantEmbedding(10, 64, spec="int8-clip")
    assert embedding.weight_clip.shape == (10, 1)  # one scale per token
    assert embedding(torch.tensor([[1, 2]])).shape == (1, 2, 64)


# ---------------------------------------------------------------------------------------------- tiny Whisper


def test_default_quant_targets(tiny_whisper):
    model, _ = tiny_whisper
    names = default_quant_targets(model)
    assert len(names) == 2 * 6 + 2 * 10  # encoder: self-attn + FFN; decoder: + cross-attn
    assert all(isinstance(model.get_submodule(n), nn.Linear) for n in names)
    assert not any(part in n for n in names for part in ("conv", "layer_norm", "embed", "proj_out"))
    decoder_only = default_quant_targets(model, encoder=False)
    assert len(decoder_only) == 20 and all(".decoder." in n for n in decoder_only)
    assert default_quant_targets(model, embedding=True) == names[:12] + [EMBED] + names[12:]
    assert default_quant_targets(model.model, encoder=False, decoder=False, embedding=True) == ["decoder.embed_tokens"]


def test_prepare_rejects_unknown_and_unsupported_modules(tiny_whisper):
    model, _ = tiny_whisper
    with pytest.raises(KeyError, match="model.encoder.nope"):
        prepare_qat(model, {"model.encoder.nope": QuantSpec(4)})
    for name in ("model.encoder.conv1", "model.encoder.layer_norm", "model.decoder.embed_positions"):
        with pytest.raises(TypeError, match=name):
            prepare_qat(model, {name: QuantSpec(4)})
    with pytest.raises(ValueError, match="model.encoder.layers.0.fc2.*128.*valid group sizes"):
        prepare_qat(model, {"model.encoder.layers.0.fc1": "int4-g32", "model.encoder.layers.0.fc2": "int4-g48"})
    with pytest.raises(ValueError, match="share one weight"):
        prepare_qat(model, {EMBED: "int4", "proj_out": "int8"})
    # Nothing was swapped by the failed calls.
    assert not any(isinstance(m, (FakeQuantLinear, FakeQuantEmbedding)) for m in model.modules())


def test_prepare_keeps_names_parameters_and_ties(tiny_whisper):
    model, _ = tiny_whisper
    keys = list(model.state_dict())
    params = dict(model.named_parameters())
    optimizer_before = torch.optim.SGD(model.parameters(), lr=0.1)
    targets = default_quant_targets(model)
    specs = {name: QuantSpec.parse("int8") for name in targets}
    specs[targets[0]] = QuantSpec.parse("int4-g32-clip")
    specs[EMBED] = QuantSpec.parse("int4-g16-clip")

    swapped = prepare_qat(model, specs)

    assert swapped == [n for n, _ in model.named_modules() if n in set(targets) | {EMBED, "proj_out"}]
    assert isinstance(model.proj_out, FakeQuantLinear)
    assert isinstance(model.model.decoder.embed_tokens, FakeQuantEmbedding)
    clip_keys = {f"{targets[0]}.weight_clip", f"{EMBED}.weight_clip", "proj_out.weight_clip"}
    assert set(model.state_dict()) == set(keys) | clip_keys
    assert [k for k in model.state_dict() if k not in clip_keys] == keys
    for name, param in model.named_parameters():
        if not name.endswith("weight_clip"):
            assert param is params[name], name
    assert model.proj_out.weight is model.model.decoder.embed_tokens.weight
    assert model.proj_out.weight_clip is model.model.decoder.embed_tokens.weight_clip
    assert model.proj_out.quant_spec == specs[EMBED]
    # A spec change on either side of the tie applies to both.
    model.proj_out.set_quant_spec("int8-g32")
    assert model.model.decoder.embed_tokens.quant_spec == QuantSpec.parse("int8-g32")
    assert quant_specs(model)["proj_out"] == quant_specs(model)[EMBED]
    # An optimizer built before prepare still drives the (shared) weights.
    before = model.proj_out.weight.detach().clone()
    model.proj_out.weight.grad = torch.ones_like(model.proj_out.weight)
    optimizer_before.step()
    assert not torch.equal(model.model.decoder.embed_tokens.weight, before)

    convert_qat(model)
    assert type(model.proj_out) is nn.Linear and type(model.model.decoder.embed_tokens) is nn.Embedding
    assert model.proj_out.weight is model.model.decoder.embed_tokens.weight
    assert list(model.state_dict()) == keys


def test_prepare_vs_convert_logits_are_equal(tiny_whisper):
    model, _ = tiny_whisper
    float_logits = _logits(model)
    targets = default_quant_targets(model)
    bits_cycle = ["int8", "int4-g32-clip", "int3-g16", "int2-tensor", "int4-clip", "int8-g64"]
    specs = {name: bits_cycle[i % len(bits_cycle)] for i, name in enumerate(targets)}
    specs[EMBED] = "int4-g16-clip"
    prepare_qat(model, specs)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():  # learned-looking clips, so clipping is exercised by convert too
        for module in model.modules():
            if getattr(module, "weight_clip", None) is not None:
                module.weight_clip.copy_(0.6 + 0.4 * torch.rand(module.weight_clip.shape, generator=generator))
    prepared_logits = _logits(model)
    assert not torch.allclose(prepared_logits, float_logits, atol=1e-3)

    codes = convert_qat(model)

    converted_logits = _logits(model)
    assert float((converted_logits - prepared_logits).abs().max()) <= 1e-6
    assert set(codes) == set(targets) | {EMBED, "proj_out"}
    assert codes["proj_out"] is codes[EMBED]
    assert codes[EMBED].scales.shape == (model.config.vocab_size, 64 // 16)
    for name, q in codes.items():
        assert torch.equal(model.get_submodule(name).weight, q.dequantize()), name
        assert -(2 ** (q.bits - 1)) <= q.codes.min() and q.codes.max() <= 2 ** (q.bits - 1) - 1
    assert not any(isinstance(m, (FakeQuantLinear, FakeQuantEmbedding)) for m in model.modules())


def test_optimizer_step_updates_weights_and_clip(tiny_whisper):
    model, _ = tiny_whisper
    model.train()
    prepare_qat(model, {name: "int4-g32-clip" for name in default_quant_targets(model, embedding=True)})
    layer = model.model.encoder.layers[0].fc1
    weight, clip = layer.weight.detach().clone(), layer.weight_clip.detach().clone()
    embed_clip = model.proj_out.weight_clip.detach().clone()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    features, decoder_ids = _inputs(model)
    loss = model(input_features=features, decoder_input_ids=decoder_ids[:, :-1], labels=decoder_ids[:, 1:]).loss
    loss.backward()
    assert float(layer.weight_clip.grad.abs().sum()) > 0 and float(layer.weight.grad.abs().sum()) > 0
    optimizer.step()
    assert not torch.equal(layer.weight, weight)
    assert not torch.equal(layer.weight_clip, clip)
    assert not torch.equal(model.proj_out.weight_clip, embed_clip)


def test_float_spec_reproduces_float_model(tiny_whisper):
    model, _ = tiny_whisper
    float_logits = _logits(model)
    names = prepare_qat(model, {name: "int2-g32-clip" for name in default_quant_targets(model, embedding=True)})
    quantized_logits = _logits(model)
    assert not torch.allclose(quantized_logits, float_logits, atol=1e-3)
    set_quant_specs(model, {name: None for name in names})
    assert torch.equal(_logits(model), float_logits)
    set_quant_specs(model, {name: "int2-g32-clip" for name in names})
    assert torch.equal(_logits(model), quantized_logits)
    with pytest.raises(TypeError, match="not prepared"):
        set_quant_specs(model, {"model.encoder.embed_positions": None})


def test_quantized_size_bytes_of_tiny_whisper(tiny_whisper):
    model, _ = tiny_whisper
    unique = {id(p): p for p in model.parameters()}.values()
    float_bytes = 2 * sum(p.numel() for p in unique)
    assert quantized_size_bytes(model) == float_bytes
    fc1 = "model.encoder.layers.0.fc1"  # weight [128, 64]
    int4_g32 = QuantSpec.parse("int4-g32")
    saving = 128 * 64 * 2 - weight_bytes((128, 64), int4_g32)
    assert quantized_size_bytes(model, {fc1: int4_g32}) == float_bytes - saving
    # The tied embedding/proj_out weight is counted once, whichever name carries the spec.
    vocab = model.config.vocab_size
    embed_saving = vocab * 64 * 2 - weight_bytes((vocab, 64), QuantSpec(8))
    assert quantized_size_bytes(model, {"proj_out": QuantSpec(8)}) == float_bytes - embed_saving
    # A prepared model reports its current specs; learnable clips are not counted.
    prepare_qat(model, {fc1: "int4-g32-clip", EMBED: "int8"})
    assert quantized_size_bytes(model) == float_bytes - saving - embed_saving


def test_clip_out_of_range_is_clamped_and_pulled_back():
    weight = _weight(4, 32)
    spec = QuantSpec(4, learnable_clipping=True)
    clip = torch.tensor([[1.5], [1.5], [0.5], [0.001]], requires_grad=True)
    fake = fake_quantize(weight, spec, clip)
    assert torch.equal(fake, fake_quantize(weight, spec, clip.detach().clamp(0.01, 1.0)))
    upstream = -weight.sign()
    fake.backward(upstream)
    inside = clip.detach().clamp(0.01, 1.0).requires_grad_(True)  # the same ratios, in range
    fake_quantize(weight, spec, inside).backward(upstream)
    # A gradient step that would push a ratio further out of [0.01, 1] is blocked; every other one passes.
    outward = ((clip > 1) & (inside.grad < 0)) | ((clip < 0.01) & (inside.grad > 0))
    assert bool(outward.any()) and bool((inside.grad != 0).all())
    assert torch.equal(clip.grad, torch.where(outward, torch.zeros_like(inside.grad), inside.grad))


def test_deepcopy_of_prepared_model_keeps_ties(tiny_whisper):
    import copy

    model, _ = tiny_whisper
    prepare_qat(model, {EMBED: "int4-g32-clip"})
    clone = copy.deepcopy(model)
    assert clone.proj_out.weight is clone.model.decoder.embed_tokens.weight
    assert clone.proj_out.weight_clip is clone.model.decoder.embed_tokens.weight_clip
    assert clone.proj_out.weight_clip is not model.proj_out.weight_clip
    clone.proj_out.set_quant_spec("int8")
    assert clone.model.decoder.embed_tokens.quant_spec == QuantSpec(8)
    assert model.model.decoder.embed_tokens.quant_spec == QuantSpec.parse("int4-g32-clip")


def test_no_grad_cache_never_outlives_a_fused_optimizer_step():
    # torch's fused AdamW (transformers 5's default optim) updates weights without bumping their version counters.
    layer = FakeQuantLinear.from_float(torch.nn.Linear(64, 8), name="layer")
    layer.set_quant_spec("int4-g32-clip")
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1, fused=True)
    x = torch.randn(3, 64)
    for _ in range(2):
        with torch.no_grad():
            layer(x)  # fills the cache
        layer(x).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            expected = fake_quantize(layer.weight, layer.quant_spec, layer.weight_clip)
            assert torch.equal(layer.quantized_weight(), expected)


def test_no_grad_forwards_reuse_the_quantized_weight_until_it_changes():
    layer = FakeQuantLinear.from_float(torch.nn.Linear(64, 8), name="layer")
    layer.set_quant_spec("int4-g32")
    x = torch.randn(3, 64)
    with torch.no_grad():
        first = layer.quantized_weight()
        assert layer.quantized_weight() is first  # cached while nothing changed
        layer.weight.mul_(2)  # an optimizer step or load_state_dict bumps the version
        changed = layer.quantized_weight()
        assert changed is not first
        torch.testing.assert_close(
            layer(x), torch.nn.functional.linear(x, fake_quantize(layer.weight, layer.quant_spec), layer.bias)
        )
    assert layer.quantized_weight() is not changed  # with autograd: always recomputed, with a graph
    assert layer.quantized_weight().requires_grad


# ---- ggml's block formats (GGMLSpec) -----------------------------------------------------------------------
GGML_SPECS = ("q8_0", "q4_0", "q3_K", "q2_K")


def _ggml_weight(seed: int = 0) -> torch.Tensor:
    """[24, 512]: rows of very different scales, a zero super-block, a tiny one, and blocks with ties and halves."""
    weight = _weight(24, 512, seed) * 3
    weight[0, :256] = 0
    weight[1, :256] *= 1e-7
    weight[2, :32] = torch.tensor([1.0, -1.0]).repeat(16)  # the largest magnitude on both signs: the first wins
    weight[3, :32] = torch.arange(-16, 16) + 0.5
    return weight


@pytest.mark.parametrize("name", GGML_SPECS)
def test_ggml_spec_parses_prints_and_counts_ggml_bytes(name):
    from hf_whisper_kdq.quant import GGMLSpec
    from hf_whisper_kdq.quant.spec import as_spec

    spec = as_spec(name)
    assert spec == GGMLSpec(name) and str(spec) == name and as_spec(name.upper()) == spec
    assert spec.bits == {"q8_0": 8, "q4_0": 4, "q3_K": 3, "q2_K": 2}[name] and not spec.learnable_clipping
    assert spec.symmetric == (name != "q2_K")
    per_block = {"q8_0": 34 / 32, "q4_0": 18 / 32, "q3_K": 110 / 256, "q2_K": 84 / 256}[name]
    assert weight_bytes((64, 512), spec) == 64 * 512 * per_block
    with pytest.raises(ValueError, match="blocks of"):
        spec.check_shape((4, 48))
    with pytest.raises(ValueError, match="GGMLSpec.type must be one of q2_K, q3_K, q4_0, q8_0"):
        GGMLSpec("q6_K")


@pytest.mark.parametrize("name", GGML_SPECS)
def test_ggml_fake_quantization_equals_the_packed_codes_and_ggml_own_bytes(name):
    """fake == packed, and the codes and scales are ggml's: packed, they are ggml_quantize_chunk's bytes."""
    from conftest import ggml_quantize_chunk

    from hf_whisper_kdq.quant import GGMLSpec
    from hf_whisper_kdq.quant.ggml_blocks import pack, unpack

    spec, weight = GGMLSpec(name), _ggml_weight()
    fake = fake_quantize(weight, spec)
    quantized = quantize_weight(weight, spec)
    assert torch.equal(fake, quantized.dequantize()) and quantized.ggml_type == name
    lowest = 0 if name == "q2_K" else -(2 ** (spec.bits - 1))  # q2_K's codes are unsigned, with a minimum
    assert lowest <= int(quantized.codes.min()) <= int(quantized.codes.max()) < lowest + 2**spec.bits
    data = pack(quantized, name)
    assert data == ggml_quantize_chunk(weight.numpy(), name)
    assert torch.equal(torch.from_numpy(unpack(data, name, tuple(weight.shape))), fake)


def test_q3_k_search_is_ggml_own_on_sub_blocks_that_need_every_pass():
    """q3_K's coordinate descent visits only the sub-blocks the previous pass changed: on heavy-tailed weights, where
    some sub-blocks change in every one of the five passes, the bytes are still ggml's."""
    from conftest import ggml_quantize_chunk

    from hf_whisper_kdq.quant.ggml_blocks import _q3_pass, ggml_quantize, pack

    torch.manual_seed(0)
    weight = torch.distributions.StudentT(2.0).sample((64, 1024)) * 0.02
    changed = []

    def counting_pass(*args):
        result = _q3_pass(*args)
        changed.append(int(result[2].sum()))
        return result

    with mock.patch("hf_whisper_kdq.quant.ggml_blocks._q3_pass", counting_pass):
        quantized = ggml_quantize(weight, "q3_K")
    assert len(changed) == 5 and changed[0] > changed[3] > 0  # the fifth pass visits the few the fourth changed
    assert pack(quantized, "q3_K") == ggml_quantize_chunk(weight.numpy(), "q3_K")


@pytest.mark.parametrize("name", ["q3_K", "q2_K"])
def test_k_quant_searches_are_ggml_own_on_many_sub_blocks(name):
    """Two million weights, Gaussian and heavy-tailed: the k-quants' searches end one float32 ulp apart from ggml's
    in rare sub-blocks if any step rounds differently (torch's ``3 / t`` is ``t.reciprocal() * 3``), which moves
    a super-block scale's fp16 rounding; the bytes must be ggml's everywhere."""
    from conftest import ggml_quantize_chunk

    from hf_whisper_kdq.quant.ggml_blocks import ggml_quantize, pack

    generator = torch.Generator().manual_seed(1)
    gaussian = torch.randn(4000, 256, generator=generator) * 0.02
    heavy = torch.distributions.StudentT(2.0).sample((4000, 256)) * 0.02
    for weight in (gaussian, heavy):
        assert pack(ggml_quantize(weight, name), name) == ggml_quantize_chunk(weight.numpy(), name)


@pytest.mark.parametrize("name", GGML_SPECS)
def test_ggml_fake_quantization_trains_through_a_straight_through_gradient(name):
    from hf_whisper_kdq.quant import GGMLSpec

    weight = _ggml_weight().requires_grad_(True)
    fake_quantize(weight, GGMLSpec(name)).sum().backward()
    assert set(weight.grad.unique().tolist()) <= {0.0, 1.0} and weight.grad.mean() > 0.9
    if name == "q8_0":  # amax / 127: nothing is clipped
        assert torch.equal(weight.grad, torch.ones_like(weight))


@pytest.mark.parametrize("name", GGML_SPECS)
def test_ggml_specs_prepare_train_and_convert_like_int_specs(name):
    """The tied embedding and a linear at a ggml spec: the embedding's row lookup quantizes as the whole table does
    (blocks run along rows), and convert_qat bakes the forward's values."""
    from hf_whisper_kdq.quant import GGMLSpec

    torch.manual_seed(0)
    embedding, linear = nn.Embedding(40, 256), nn.Linear(256, 16)
    model = nn.ModuleDict({"embed": embedding, "proj": linear})
    prepare_qat(model, {"embed": GGMLSpec(name), "proj": name})
    ids = torch.tensor([[1, 5, 39], [0, 5, 7]])
    with torch.enable_grad():
        looked_up = model["embed"](ids)
    table = fake_quantize(embedding.weight.detach(), GGMLSpec(name))
    assert torch.equal(looked_up.detach(), table[ids])
    x = torch.randn(3, 256)
    before = model["proj"](x).detach()
    codes = convert_qat(model)
    assert codes["proj"].ggml_type == name and torch.equal(model["proj"](x), before)
    assert torch.equal(model["embed"].weight.detach(), table)
