"""``DistillQuantArguments``: every check of ``__post_init__`` refuses its bad value with a message that names the
field and the fix, and what it accepts is kept as given."""

from __future__ import annotations

import pytest

from hf_whisper_kdq.config import DistillQuantArguments


@pytest.fixture
def arguments(tmp_path):
    """``arguments(**fields)``: DistillQuantArguments for a quiet CPU run, with ``fields`` on top."""

    def build(**fields) -> DistillQuantArguments:
        return DistillQuantArguments(**{"output_dir": str(tmp_path / "out"), "report_to": "none", **fields})

    return build


OUT_OF_RANGE = [
    *[({name: -1}, rf"{name} must be ≥ 0, got -1") for name in ("ce_weight", "kd_weight", "hidden_weight")],
    ({"quant_weight": -0.5}, r"quant_weight must be ≥ 0, got -0.5"),
    ({"num_distill_layers": -1}, r"num_distill_layers must be ≥ 0, got -1"),
    ({"selection_interval": -2}, r"selection_interval must be ≥ 0, got -2"),
    ({"selection_probe_batches": 0}, r"selection_probe_batches must be ≥ 1, got 0"),
    (
        {"ce_weight": 0, "kd_weight": 0, "hidden_weight": 0, "quant_weight": 1},
        r"ce_weight, kd_weight and hidden_weight are all 0: nothing would train the student; give one of them a "
        r"weight > 0",
    ),
    ({"kd_temperature": 0}, r"kd_temperature must be > 0, got 0"),
    ({"clip_learning_rate": 0}, r"clip_learning_rate must be > 0, got 0: e.g. 1e-2; .*learnable_clipping=False"),
    ({"quant_granularity": "per_group", "quant_group_size": 0}, r"quant_group_size must be > 0 with per_group"),
    ({"quant_symmetric": False}, r"asymmetric quantization is not supported yet: set quant_symmetric=True"),
    ({"encoder_cache_max_gb": 0}, r"encoder_cache_max_gb must be > 0, got 0"),
    ({"encoder_cache_precision": "int4"}, r"encoder_cache_precision=.int4.: choose one of auto, fp16, int8"),
    ({"teacher_load_in": "2bit"}, r"teacher_load_in=.2bit.: choose one of 8bit, 4bit"),
    ({"teacher_cache_top_k": -1}, r"teacher_cache_top_k must be ≥ 0, got -1: 0 for the exact"),
    ({"teacher_cache_top_k": 64, "cache_teacher_outputs": False}, r"needs the teacher cache.*drop one of them"),
    ({"frozen_encoder_quantizer": "awq"}, r"frozen_encoder_quantizer=.awq.: choose one of round_to_nearest, gptq"),
    (
        {"frozen_encoder_quantizer": "gptq", "quant_targets": "encoder,decoder", "quant_bit_choices": "4"},
        r"quantizes a frozen encoder: set freeze_encoder=True",
    ),
    (
        {"frozen_encoder_quantizer": "gptq", "freeze_encoder": True, "quant_targets": "decoder"},
        r"put encoder in quant_targets",
    ),
    (
        {"frozen_encoder_quantizer": "gptq", "freeze_encoder": True, "quant_targets": "encoder,decoder"},
        r"needs one integer width.*Fix: e.g. --quant_bit_choices 4",
    ),
    ({"decoder_start_quantizer": "awq"}, r"decoder_start_quantizer=.awq.: choose one of round_to_nearest, gptq"),
    (
        {"decoder_start_quantizer": "gptq", "quant_targets": "encoder,embedding", "quant_bit_choices": "4"},
        r"starts the quantized decoder's linears: put decoder in quant_targets",
    ),
    (
        {"decoder_start_quantizer": "gptq", "quant_targets": "decoder", "quant_bit_choices": "4", "lora_r": 8},
        r"rewrites the decoder's weights, which lora_r=8 freezes",
    ),
    (
        {"decoder_start_quantizer": "gptq", "quant_targets": "decoder,embedding", "quant_bit_choices": "4,8"},
        r"decoder_start_quantizer='gptq' needs one integer width.*Fix: e.g. --quant_bit_choices 4",
    ),
    *[
        ({"selection_until": fraction}, rf"selection_until={fraction} must be a fraction of training in \(0, 1\]")
        for fraction in (0, 1.5)
    ],
]

NOT_A_CHOICE = [
    ({"hidden_target": "decoders"}, r"hidden_target='decoders': choose one of decoder, encoder, both, none"),
    (
        {"hidden_representation": "attention"},
        r"hidden_representation='attention': choose one of layer_output, ffn_intermediate",
    ),
    ({"hidden_loss_scale": "normalized"}, r"hidden_loss_scale='normalized': choose one of absolute, relative"),
    ({"layer_matching": "greedy"}, r"layer_matching='greedy': choose one of static, dynamic, dynamic_monotone"),
    (
        {"quant_granularity": "per_row"},
        r"quant_granularity='per_row': choose one of per_tensor, per_channel, per_group",
    ),
    ({"size_budget_accounting": "disk"}, r"size_budget_accounting='disk': choose one of paper, on_disk"),
    (
        {"quant_targets": "encoder,ffn,lm_head"},
        r"quant_targets \['ffn', 'lm_head'\] unknown: choose from encoder, decoder, embedding",
    ),
    *[
        (
            {"quant_bit_choices": choices},
            rf"quant_bit_choices='{choices}': bit choice .* is not supported: use a comma-separated subset of "
            r"2, 3, 4, 8 and optionally 'float', e.g. --quant_bit_choices 2,3,4,8,float",
        )
        for choices in ("2,4,5", "4.5", "int4", "1")
    ],
    *[
        ({"quant_bit_choices": empty}, r"quant_bit_choices is empty: give e.g. '2,3,4,8,float'")
        for empty in ("", " , ")
    ],
]

SIZE_BUDGETS = [
    ({"size_budget_mb": 5.0, "size_budget_ratio": 0.3}, r"give size_budget_mb or size_budget_ratio, not both"),
    *[({"size_budget_mb": mb}, rf"size_budget_mb must be > 0, got {mb}") for mb in (0, -1.0)],
    *[
        ({"size_budget_ratio": ratio}, rf"size_budget_ratio must be in \(0, 1\], got {ratio}")
        for ratio in (0, -0.1, 1.5)
    ],
    (
        {"quant_bit_choices": "float", "size_budget_mb": 5.0},
        r"size_budget_mb=5.0 cannot be met: quant_bit_choices='float' keeps every layer in float\. Allow integer "
        r"bits \(e\.g\. --quant_bit_choices 2,3,4,8,float\) or drop size_budget_mb",
    ),
    (
        {"quant_targets": "", "size_budget_ratio": 0.3},
        r"size_budget_ratio=0.3 cannot be met: quant_targets is empty, so nothing is quantized\. Name what to "
        r"quantize \(e\.g\. --quant_targets encoder,decoder\) or drop size_budget_ratio",
    ),
]


LORA = [
    ({"lora_r": -1}, r"lora_r must be ≥ 0, got -1: 0 trains every weight, e.g. 16 trains LoRA"),
    ({"lora_alpha": 32}, r"lora_alpha=32 scales LoRA adapters, and lora_r is 0: set lora_r \(e.g. 16\)"),
    ({"lora_r": 16, "lora_alpha": 0}, r"lora_alpha must be > 0, got 0: e.g. 16"),
    ({"lora_r": 16, "deepspeed": {"zero_optimization": {"stage": 2}}}, r"train LoRA on one process .* or set lora_r=0"),
]

REFUSED = OUT_OF_RANGE + NOT_A_CHOICE + SIZE_BUDGETS + LORA


@pytest.mark.parametrize(
    "fields, message",
    REFUSED,
    ids=[",".join(f"{name}={value!r}" for name, value in fields.items()) for fields, _ in REFUSED],
)
def test_each_bad_value_is_refused_naming_the_field_and_the_fix(arguments, fields, message):
    with pytest.raises(ValueError, match=message):
        arguments(**fields)


def test_the_edges_of_each_range_are_accepted(arguments):
    arguments(
        ce_weight=0,
        kd_weight=0,
        hidden_weight=1,
        quant_weight=0,
        num_distill_layers=0,
        selection_interval=0,
        selection_probe_batches=1,
        selection_until=1.0,
        size_budget_ratio=1.0,
    )
    arguments(quant_granularity="per_channel", quant_group_size=0)  # the group size only matters per group
    arguments(quant_bit_choices="float")  # no budget: keeping every layer in float is a valid (baseline) run


def test_accepted_values_are_kept_as_given(arguments):
    """Validation parses but does not rewrite: the arguments (and what a run's config records) are the user's."""
    args = arguments(quant_bit_choices="8, 2,float", quant_targets="decoder, embedding", size_budget_ratio=0.5)
    assert (args.quant_bit_choices, args.quant_targets) == ("8, 2,float", "decoder, embedding")
    assert args.bit_choices == (2, 8, 16) and args.quant_target_set == {"decoder", "embedding"}
    assert args.size_budget_mb is None and args.budget_bytes(1_000_000) == 500_000
    # A single process on a machine that may have no accelerator: use_cpu stays what was asked.
    assert arguments().use_cpu is False and arguments(use_cpu=True).use_cpu is True


ALL_TARGETS = "encoder,decoder,embedding"


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"quant_format": "gguf"}, r"quant_format='gguf': choose one of int, ggml"),
        (
            {"quant_format": "ggml", "quant_bit_choices": "4,8,float", "quant_targets": ALL_TARGETS},
            r"bits 2, 3, 4, 8 \(q2_K, q3_K, q4_0, q8_0\).* also has float .*Fix: --quant_bit_choices 4,8",
        ),
        (
            {"quant_format": "ggml", "quant_bit_choices": "4,8", "quant_targets": "decoder,embedding"},
            r"quant_format='ggml' needs quant_targets=encoder,decoder,embedding .*Fix: --quant_targets "
            r"encoder,decoder,embedding",
        ),
    ],
)
def test_quant_format_ggml_is_refused_with_what_its_file_cannot_hold(arguments, fields, message):
    with pytest.raises(ValueError, match=message):
        arguments(**fields)


def test_quant_format_ggml_keeps_its_bits(arguments):
    args = arguments(quant_format="ggml", quant_bit_choices="3,4,8", quant_targets=ALL_TARGETS)
    assert args.quant_format == "ggml" and args.bit_choices == (3, 4, 8)
    assert arguments().quant_format == "int"
