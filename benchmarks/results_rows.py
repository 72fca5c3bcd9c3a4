"""The rows of the results table (``results_table.py``): what each row is, and the presets that name groups of them.

Kind "reference": a pretrained Whisper as it is (fp16 on disk). Kind "ptq": round-to-nearest quantization of the
teacher, no training (``prepare_qat`` with one spec per component, then ``save_compressed``). Kind "gptq": GPTQ's
codes of the teacher (llm-compressor) in the packed layout of the "ptq" row with the same specs. Kind "train": a
student trained by ``DistillQuantTrainer``. Budgets "uniform:B" are the paper-accounting size of the same student
with every targeted layer at B bits (per group of 32), so the guided rows, QAT-only and unguided KDQ have equal
planned bytes.
"""

from __future__ import annotations

ALL_TARGETS = "encoder,decoder,embedding"
ROWS: dict[str, dict] = {
    "teacher": dict(kind="reference", method="reference", model="teacher", description="teacher, fp16 on disk"),
    "tiny.en": dict(
        kind="reference",
        method="reference",
        model="tiny",
        description="original whisper-tiny.en, fp16 on disk (English only)",
    ),
    "ptq-int8": dict(
        kind="ptq",
        method="naive PTQ",
        specs={"encoder": "int8", "decoder": "int8", "embedding": "int8"},
        description="teacher, round-to-nearest int8 per channel everywhere",
    ),
    "ptq-int4g32-emb8": dict(
        kind="ptq",
        method="naive PTQ",
        specs={"encoder": "int4-g32", "decoder": "int4-g32", "embedding": "int8"},
        description="teacher, int4 group-32 encoder+decoder, int8 per-channel embedding",
    ),
    "ptq-int4g32": dict(
        kind="ptq",
        method="naive PTQ",
        specs={"encoder": "int4-g32", "decoder": "int4-g32", "embedding": "int4-g32"},
        description="teacher, int4 group-32 everywhere",
    ),
    "ptq-int3g32": dict(
        kind="ptq",
        method="naive PTQ",
        specs={"encoder": "int3-g32", "decoder": "int3-g32", "embedding": "int3-g32"},
        description="teacher, int3 group-32 everywhere",
    ),
    "kdq-base-u4": dict(
        kind="train",
        method="KDQ (guided)",
        decoder_layers=None,
        quant_targets=ALL_TARGETS,
        bits="2,3,4,8",
        budget="uniform:4",
        guided=True,
        description="teacher architecture, guided bits {2,3,4,8} at the uniform-int4 size",
    ),
    "kdq-base-u3": dict(
        kind="train",
        method="KDQ (guided)",
        decoder_layers=None,
        quant_targets=ALL_TARGETS,
        bits="2,3,4,8",
        budget="uniform:3",
        guided=True,
        description="teacher architecture, guided bits {2,3,4,8} at the uniform-int3 size",
    ),
    "kdq-d2-u4": dict(
        kind="train",
        method="KDQ (guided)",
        decoder_layers=2,
        quant_targets=ALL_TARGETS,
        bits="2,3,4,8",
        budget="uniform:4",
        guided=True,
        description="2 spaced decoder layers, guided bits {2,3,4,8} at the uniform-int4 size",
    ),
    "kdq-d2-u3": dict(
        kind="train",
        method="KDQ (guided)",
        decoder_layers=2,
        quant_targets=ALL_TARGETS,
        bits="2,3,4,8",
        budget="uniform:3",
        guided=True,
        description="2 spaced decoder layers, guided bits {2,3,4,8} at the uniform-int3 size",
    ),
    "kdq-d2-decemb-u4": dict(
        kind="train",
        method="KDQ (guided)",
        decoder_layers=2,
        quant_targets="decoder,embedding",
        bits="2,3,4,8",
        budget="uniform:4",
        guided=True,
        description="2 decoder layers; decoder+embedding guided at the uniform-int4 size, "
        "encoder fp16 and shared with the teacher (the cheapest row to train)",
    ),
    "kdq-d2-u4-relhidden": dict(
        kind="train",
        method="KDQ (guided)",
        decoder_layers=2,
        quant_targets=ALL_TARGETS,
        bits="2,3,4,8",
        budget="uniform:4",
        guided=True,
        hidden_loss_scale="relative",
        description="as kdq-d2-u4 with the scale-free hidden loss (hidden_loss_scale="
        "relative): the absolute one outweighs CE and KD ~10× on whisper-base",
    ),
    "kdq-d2-decemb-u4-relhidden": dict(
        kind="train",
        method="KDQ (guided)",
        decoder_layers=2,
        quant_targets="decoder,embedding",
        bits="2,3,4,8",
        budget="uniform:4",
        guided=True,
        hidden_loss_scale="relative",
        description="as kdq-d2-decemb-u4 with the scale-free hidden loss: the CPU counterpart of kdq-d2-u4-relhidden",
    ),
    "distill-d2": dict(
        kind="train",
        method="distillation only",
        decoder_layers=2,
        quant_targets=ALL_TARGETS,
        bits="float",
        budget=None,
        guided=False,
        description="ablation: 2 decoder layers, distillation without quantization (float)",
    ),
    "qat-d2-u4": dict(
        kind="train",
        method="QAT only",
        decoder_layers=2,
        quant_targets=ALL_TARGETS,
        bits="2,3,4,8",
        budget="uniform:4",
        guided=True,
        kd_weight=0.0,
        hidden_weight=0.0,
        description="ablation: as kdq-d2-u4 without distillation (kd_weight=0, hidden_weight=0)",
    ),
    "kdq-unguided-d2-4": dict(
        kind="train",
        method="KDQ (unguided)",
        decoder_layers=2,
        quant_targets=ALL_TARGETS,
        bits="4",
        budget=None,
        guided=False,
        description="ablation: as kdq-d2-u4 with uniform int4 (one bit choice) and static "
        "layer matching, selected once",
    ),
    # The same ablations on the cheap decoder+embedding row (shared fp16 encoder), at kdq-d2-decemb-u4's bytes.
    "qat-d2-decemb-u4": dict(
        kind="train",
        method="QAT only",
        decoder_layers=2,
        quant_targets="decoder,embedding",
        bits="2,3,4,8",
        budget="uniform:4",
        guided=True,
        kd_weight=0.0,
        hidden_weight=0.0,
        description="ablation: as kdq-d2-decemb-u4 without distillation",
    ),
    "kdq-unguided-d2-decemb-4": dict(
        kind="train",
        method="KDQ (unguided)",
        decoder_layers=2,
        quant_targets="decoder,embedding",
        bits="4",
        budget=None,
        guided=False,
        description="ablation: as kdq-d2-decemb-u4 with uniform int4 and static layer matching, selected once",
    ),
    # Teacher architecture with the encoder fp16 and shared: quantization of the decoder and embedding alone, the
    # bytes KDQ can recover from the teacher cheaply (no encoder backward), against round-to-nearest at equal bytes.
    "ptq-decemb-int3g32": dict(
        kind="ptq",
        method="naive PTQ",
        specs={"decoder": "int3-g32", "embedding": "int3-g32"},
        description="teacher, int3 group-32 decoder+embedding, encoder fp16",
    ),
    "kdq-base-decemb-u3": dict(
        kind="train",
        method="KDQ (guided)",
        decoder_layers=None,
        quant_targets="decoder,embedding",
        bits="2,3,4,8",
        budget="uniform:3",
        guided=True,
        description="teacher architecture; decoder+embedding guided at the uniform-int3 size, "
        "encoder fp16 and shared with the teacher",
    ),
    "kdq-unguided-base-decemb-3": dict(
        kind="train",
        method="KDQ (unguided)",
        decoder_layers=None,
        quant_targets="decoder,embedding",
        bits="3",
        budget=None,
        guided=False,
        description="ablation: as kdq-base-decemb-u3 with uniform int3 and static layer matching, selected once",
    ),
    "qat-base-decemb-u3": dict(
        kind="train",
        method="QAT only",
        decoder_layers=None,
        quant_targets="decoder,embedding",
        bits="2,3,4,8",
        budget="uniform:3",
        guided=True,
        kd_weight=0.0,
        hidden_weight=0.0,
        description="ablation: as kdq-base-decemb-u3 without distillation",
    ),
    # The CPU recipe of `hf-whisper-kdq compress --level int3 / int4` (compress.RECIPE_DEFAULTS), as rows that
    # results_table and the GPU script train: the teacher's architecture at one width, the encoder quantized
    # post-training (the trainer's output-error clip search) and frozen, decoder and embedding trained at lr 5e-5,
    # compress's selection (once, at the start) and static matching.
    **{
        f"kdq-recipe-int{bits}": dict(
            kind="train",
            method="KDQ (CPU recipe)",
            decoder_layers=None,
            quant_targets=ALL_TARGETS,
            bits=str(bits),
            budget=None,
            guided=False,
            freeze_encoder=True,
            learning_rate=5e-5,
            warmup_steps=3,
            description=f"the recipe of compress --level int{bits}: int{bits} g32 everywhere, encoder frozen",
        )
        for bits in (3, 4)
    },
}
# Post-training baselines at each layout, stored alike (benchmarks/README.md, "Post-training baselines: GPTQ and
# searched-clip RTN"): round-to-nearest; round-to-nearest with each group's clipping ratio of least weight error
# (ptq-clip: quant.search_clip_ratios, what prepare_qat does for a -clip spec) or of least expected output error on
# the calibration audio (ptq-oclip: calibration.calibrate_clipping); GPTQ by llm-compressor (kind "gptq":
# gptq_baseline.py, calibrated on training audio), the tied embedding as GPTQ's proj_out or round-to-nearest
# (gptq-rtnemb). No training anywhere. Existing rows keep their names.
BASELINE_LAYOUTS = {
    "int4g32": (ALL_TARGETS, "int4-g32", "int4 group-32 everywhere"),
    "int3g32": (ALL_TARGETS, "int3-g32", "int3 group-32 everywhere"),
    "int4g128": (ALL_TARGETS, "int4-g128", "int4 group-128 everywhere"),
    "int3g128": (ALL_TARGETS, "int3-g128", "int3 group-128 everywhere"),
    "decemb-int3g32": ("decoder,embedding", "int3-g32", "int3 group-32 decoder+embedding, encoder fp16"),
}
for _layout, (_components, _spec, _what) in BASELINE_LAYOUTS.items():
    _specs = dict.fromkeys(_components.split(","), _spec)
    ROWS.setdefault(
        f"ptq-{_layout}", dict(kind="ptq", method="naive PTQ", specs=_specs, description=f"teacher, {_what}")
    )
    ROWS[f"ptq-clip-{_layout}"] = dict(
        kind="ptq",
        method="weight-error-clip RTN",
        specs={component: f"{spec}-clip" for component, spec in _specs.items()},
        description=f"teacher, {_what}, each group's clipping ratio searched for least weight error (no training)",
    )
    ROWS[f"ptq-oclip-{_layout}"] = dict(
        kind="ptq",
        method="output-error-clip RTN",
        specs={component: f"{spec}-clip" for component, spec in _specs.items()},
        clip_search="inputs",
        description=f"teacher, {_what}, each group's clipping ratio searched for least expected output error on the "
        "GPTQ calibration audio (calibration.calibrate_clipping; no training)",
    )
    ROWS[f"gptq-{_layout}"] = dict(
        kind="gptq",
        method="GPTQ (llm-compressor)",
        specs=_specs,
        description=f"teacher, GPTQ {_what} (the tied embedding as proj_out), calibrated on training audio",
    )
    # The tied table by GPTQ is calibrated for proj_out alone (the decoder's final states); here it keeps the
    # round-to-nearest codes of the layout, GPTQ doing the linears (the same GPTQ run: layers are independent).
    ROWS[f"gptq-rtnemb-{_layout}"] = dict(
        kind="gptq",
        method="GPTQ (llm-compressor)",
        specs=_specs,
        tied_embedding="rtn",
        description=f"teacher, GPTQ {_what} but the tied embedding round-to-nearest",
    )
PRESETS = {
    "all": list(ROWS),
    "cheap": ["teacher", "tiny.en", "ptq-int8", "ptq-int4g32-emb8", "ptq-int4g32", "ptq-int3g32"],
    "ablations": ["kdq-d2-u4", "distill-d2", "qat-d2-u4", "kdq-unguided-d2-4"],
    "ablations-decemb": ["kdq-d2-decemb-u4", "qat-d2-decemb-u4", "kdq-unguided-d2-decemb-4", "distill-d2"],
    "base-decemb": ["ptq-decemb-int3g32", "kdq-base-decemb-u3", "kdq-unguided-base-decemb-3", "qat-base-decemb-u3"],
    "recipe": ["ptq-oclip-int3g32", "kdq-recipe-int3", "ptq-oclip-int4g32", "kdq-recipe-int4"],
    **{
        f"baselines-{layout}": [
            f"{method}-{layout}" for method in ("ptq", "ptq-clip", "ptq-oclip", "gptq", "gptq-rtnemb")
        ]
        for layout in BASELINE_LAYOUTS
    },
}
