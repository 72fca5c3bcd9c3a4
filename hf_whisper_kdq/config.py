"""``DistillQuantArguments``: everything guided distillation + quantization adds to the HF training arguments.

A dataclass extending ``Seq2SeqTrainingArguments``, so ``HfArgumentParser`` reads it from the command line or
a JSON/YAML file and the Trainer uses it unchanged. Every field documents itself (``--help``) and
``__post_init__`` rejects bad combinations with a message that names the fix.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from transformers import Seq2SeqTrainingArguments

from .quant import ALLOWED_BITS, FLOAT_BITS, GRANULARITIES

# How the encoder-output cache may store a row (output_cache.EncoderOutputCache).
ENCODER_CACHE_PRECISIONS = ("auto", "fp16", "int8")
# How bitsandbytes may load a teacher (sources.bitsandbytes_config).
BITSANDBYTES_LOADS = ("8bit", "4bit")

MATCHING_MODES = ("static", "dynamic", "dynamic_monotone")
HIDDEN_TARGETS = ("decoder", "encoder", "both", "none")
HIDDEN_REPRESENTATIONS = ("layer_output", "ffn_intermediate")
HIDDEN_LOSS_SCALES = ("absolute", "relative")
BUDGET_ACCOUNTINGS = ("paper", "on_disk")
SELECTION_COSTS = ("output_kl", "local_error")
QUANT_TARGETS = ("encoder", "decoder", "embedding")
QUANT_FORMATS = ("int", "ggml")
# How post-training codes are made: frozen_encoder_quantizer, decoder_start_quantizer.
PTQ_QUANTIZERS = ("round_to_nearest", "gptq")
# quant_format="ggml": the bit choice -> the ggml block type (and whisper.cpp file type) it trains for.
GGML_TYPE_OF_BITS = {2: "q2_K", 3: "q3_K", 4: "q4_0", 8: "q8_0"}


def _launched_on_several_processes() -> bool:
    """Whether a launcher (torchrun, accelerate launch) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def parse_bit_choices(text: str) -> tuple[int, ...]:
    """``"2,3,4,8,float"`` -> ``(2, 3, 4, 8, 16)``; float (16) means "keep this layer unquantized"."""
    choices = []
    for item in str(text).replace(" ", "").split(","):
        if not item:
            continue
        if item.lower() in {"float", "fp16", "16"}:
            choices.append(FLOAT_BITS)
            continue
        if not item.isdigit() or int(item) not in ALLOWED_BITS:
            raise ValueError(
                f"quant_bit_choices={text!r}: bit choice {item!r} is not supported: use a comma-separated subset of "
                f"{', '.join(map(str, ALLOWED_BITS))} and optionally 'float', e.g. --quant_bit_choices 2,3,4,8,float"
            )
        choices.append(int(item))
    if not choices:
        raise ValueError("quant_bit_choices is empty: give e.g. '2,3,4,8,float'")
    return tuple(sorted(set(choices)))


def _split(text: str) -> tuple[str, ...]:
    return tuple(item for item in str(text).replace(" ", "").split(",") if item)


@dataclass
class DistillQuantArguments(Seq2SeqTrainingArguments):
    """Training arguments of :class:`~hf_whisper_kdq.DistillQuantTrainer` (all of ``Seq2SeqTrainingArguments``,
    plus the loss weights, the quantization scheme, the size budget and the guided layer selection)."""

    # ---- loss weights -------------------------------------------------------------------------------
    ce_weight: float = field(default=1.0, metadata={"help": "Weight of the cross-entropy loss on the labels."})
    kd_weight: float = field(
        default=1.0, metadata={"help": "Weight of the logit distillation loss T²·KL(teacher ‖ student)."}
    )
    hidden_weight: float = field(
        default=1.0, metadata={"help": "Weight of the hidden-state loss over the selected distillation layers."}
    )
    quant_weight: float = field(
        default=0.0,
        metadata={"help": "Weight of the quantization loss ‖w − q(w)‖²/‖w‖² summed over the quantized layers."},
    )
    kd_temperature: float = field(default=2.0, metadata={"help": "Softmax temperature of the logit distillation."})
    hidden_target: str = field(
        default="decoder",
        metadata={"help": f"Which hidden states are distilled: one of {', '.join(HIDDEN_TARGETS)}."},
    )
    hidden_loss_scale: str = field(
        default="relative",
        metadata={
            "help": "How hidden states are compared: 'relative' (the squared error of each position divided by the "
            "teacher state's mean square: scale-free, about 1 for an unrelated student, so the hidden term does not "
            "outweigh CE and KD) or 'absolute' (mean squared error, the paper's loss; it grows with the size of "
            "the states, which is large in Whisper's deeper decoder layers). A decoder's last layer is compared "
            "before the final layer norm, whose output the KD term already matches through the logits."
        },
    )
    hidden_representation: str = field(
        default="layer_output",
        metadata={
            "help": "What of a layer is matched: 'layer_output' (the layer's output hidden state) or "
            "'ffn_intermediate' (the FFN's inner activation, as in the authors' code)."
        },
    )
    layer_matching: str = field(
        default="static",
        metadata={
            "help": "How student layers find their teacher layer: 'static' (spaced copy positions), 'dynamic' "
            "(argmin hidden loss, re-chosen at each selection) or 'dynamic_monotone' (same, teacher indices "
            "non-decreasing)."
        },
    )

    # ---- quantization -------------------------------------------------------------------------------
    quant_bit_choices: str = field(
        default="2,3,4,8,float",
        metadata={"help": "Bits a layer may get, comma-separated from 2,3,4,8 plus 'float' (unquantized)."},
    )
    quant_format: str = field(
        default="int",
        metadata={
            "help": "The grid quantized layers train on. 'int': signed integers with one fp16 scale per group "
            "(quant_granularity, quant_group_size, learnable_clipping), for the packed compressed-tensors folder. "
            "'ggml': the block format of the whisper.cpp file they ship in, scales and codes by ggml's own rule: "
            "bits 2, 3, 4, 8 are q2_K, q3_K, q4_0, q8_0. whisper.cpp holds one type for every 2-D weight of a file, so every "
            "layer and the embedding are quantized (quant_targets encoder,decoder,embedding), the selection picks "
            "the widest type whose file fits the size budget (billed as the file's real bytes) and still chooses the "
            "distilled layers, and export_whisper_cpp writes the student's own codes. quant_granularity, "
            "quant_group_size, learnable_clipping and size_budget_accounting do not apply."
        },
    )
    quant_granularity: str = field(
        default="per_group", metadata={"help": f"Scale granularity: one of {', '.join(GRANULARITIES)}."}
    )
    quant_group_size: int = field(
        default=32, metadata={"help": "Input columns per scale with per_group granularity (must divide widths)."}
    )
    quant_symmetric: bool = field(
        default=True, metadata={"help": "Signed symmetric integers (the only scheme supported for now)."}
    )
    learnable_clipping: bool = field(
        default=True,
        metadata={
            "help": "Learn a clipping ratio per scale (LSQ/PACT style) during training, starting from the ratio of "
            "least expected output error among 1.0, 0.95, ..., 0.5: each weight's error weighted by the mean square "
            "of its inputs on the selection's probe batches (AWQ's clip search), searched when the trainer is built."
        },
    )
    clip_learning_rate: float = field(
        default=1e-2,
        metadata={
            "help": "Learning rate of the clipping ratios, in their own optimizer parameter group (no weight "
            "decay, same schedule as learning_rate). Ratios live in (0, 1]: at a model's learning rate such as "
            "1e-4 they barely move in a short run."
        },
    )
    quant_targets: str = field(
        default="encoder,decoder",
        metadata={"help": "What may be quantized, comma-separated from encoder, decoder, embedding."},
    )
    size_budget_mb: float | None = field(
        default=None,
        metadata={"help": "Largest size of the student on disk in MB (1e6 bytes), fp16 for what stays float."},
    )
    size_budget_ratio: float | None = field(
        default=None,
        metadata={"help": "Alternatively: the budget as a fraction of the teacher's fp16 size, e.g. 0.2."},
    )
    size_budget_accounting: str = field(
        default="on_disk",
        metadata={
            "help": "How the budget counts the token embedding: 'on_disk' in fp16, as a packed checkpoint of mixed "
            "widths stores it (only a one-width export stores it packed), so that the budget bounds the file; or "
            "'paper' at its planned bits (the paper's accounting, used by compress's --level presets)."
        },
    )

    # ---- guided layer selection ---------------------------------------------------------------------
    selection_cost: str = field(
        default="output_kl",
        metadata={
            "help": "What the selection minimizes under the size budget, and ranks distillation layers by: "
            "'output_kl' (for every unit and bit width, the change of teacher-forced KL(teacher ‖ student) on the "
            "probe batches with that unit alone quantized: its end-to-end damage) or 'local_error' (the previous "
            "rule: the relative output error of the unit's own linears weighted by its float hidden-state distance "
            "d_l; it let the tied embedding drop to 2 bits, which destroys the output)."
        },
    )
    num_distill_layers: int = field(
        default=2,
        metadata={
            "help": "How many student layers get hidden-state distillation: those quantization damages most at their "
            "bits (see selection_cost)."
        },
    )
    selection_interval: int = field(
        default=0,
        metadata={"help": "Re-run the layer selection every N optimizer steps (0: only at the start)."},
    )
    selection_until: float = field(
        default=1.0,
        metadata={
            "help": "Re-select only during this fraction of max_steps (0 < x ≤ 1); the plan then stays fixed, "
            "so that the rest of training adapts to one set of bits. A re-plan late in training can undo "
            "progress and leaves few steps to recover. 1.0: re-select throughout, every selection_interval "
            "steps."
        },
    )
    selection_probe_batches: int = field(
        default=2, metadata={"help": "Training batches used to measure quantization and distillation losses."}
    )
    freeze_encoder: bool = field(
        default=False,
        metadata={
            "help": "Freeze the student's encoder: its weights and, when it is quantized, its clipping ratios (it is "
            "then quantized post-training, by frozen_encoder_quantizer, and never distilled). When it equals the "
            "teacher's, the encoder runs once per step for both; otherwise its outputs are cached like the teacher's."
        },
    )
    frozen_encoder_quantizer: str = field(
        default="round_to_nearest",
        metadata={
            "help": "How a frozen, quantized encoder (freeze_encoder, 'encoder' in quant_targets) gets its codes: "
            "'round_to_nearest' (its clipping ratios searched for least expected output error on the probe "
            "batches) or 'gptq' (GPTQ's column-by-column rounding with second-order error feedback from the inputs "
            "each layer meets on gptq_calibration_rows training rows, layer after layer, without clipping; the "
            "codes then stay as GPTQ made them and are the ones exported). 'gptq' needs one integer width in "
            "quant_bit_choices; with quant_format 'ggml' it rounds on that ggml type's own block scales."
        },
    )
    decoder_start_quantizer: str = field(
        default="round_to_nearest",
        metadata={
            "help": "Where the trained decoder's quantized linears start: 'round_to_nearest' (their clipping ratios "
            "searched for least expected output error on the probe batches) or 'gptq' (GPTQ's codes from the inputs "
            "they meet on gptq_calibration_rows training rows, through the encoder as it will train; clipping ratios at "
            "1). Training then moves them as any weight; the token embedding keeps the clip search. Needs one integer "
            "width in quant_bit_choices (benchmarks/README.md, 'GPTQ start of the decoder')."
        },
    )

    gptq_calibration_rows: int = field(
        default=256,
        metadata={
            "help": "Training rows (evenly spaced, the same on every process; every row of a smaller training set) "
            "whose inputs calibrate the 'gptq' quantizers. The decoder's linears see one input per label token "
            "(~14 a row in the results table's mixture), so 64 rows left whisper-base's fc2 (2,048 inputs) with a "
            "rank-deficient Hessian; 240 lowered the int4 student's error on three seeds (benchmarks/README.md, "
            "'All 240 training rows as GPTQ's calibration'). Each row costs a few CPU seconds, mostly the encoder's "
            "input Hessians."
        },
    )
    lora_r: int = field(
        default=0,
        metadata={
            "help": "0 (default): train every weight of the student. r > 0: train rank-r LoRA adapters (peft; pip "
            "install 'hf-whisper-kdq[peft]') on the attention and feed-forward linears of the sides that train (the "
            "decoder, and the encoder unless freeze_encoder), with the clipping ratios and width adapters; every "
            "other weight is frozen. The update sits inside the quantizer (it sees W + B·A), so the merged weights "
            "are the ones trained on the grid and the exports stay exact. The token embedding stays frozen (its "
            "clipping still learns). A PeftModel student given to the trainer is trained the same way."
        },
    )
    lora_alpha: float | None = field(
        default=None,
        metadata={"help": "LoRA's scaling numerator (the update is B·A·lora_alpha/lora_r); default: lora_r (scale 1)."},
    )

    cache_encoder_outputs: bool | None = field(
        default=None,
        metadata={
            "help": "Keep the outputs of frozen encoders (the student's under freeze_encoder; the teacher's when the "
            "teacher cache is off or the student shares its encoder) in a bounded on-disk cache, keyed by audio and "
            "encoder, so that later epochs skip them. Stored in fp16 (1.5 MB per utterance for whisper-base: "
            "6,220 utterances take 9.6 GB, more than the default bound; a warning gives the size to set). An "
            "encoder whose hidden states are distilled always runs. Default: on when training on the CPU, where those passes are "
            "most of a step; off on accelerators, where a pass costs little next to writing its output to disk."
        },
    )
    cache_teacher_outputs: bool | None = field(
        default=None,
        metadata={
            "help": "Keep the teacher's decoder hidden states per training row (utterance and labels) in the same "
            "bounded cache, so that later epochs skip the teacher's encoder and decoder: on the CPU more time than "
            "the student's forward and backward of a 2-decoder-layer whisper-base student. Its logits are "
            "recomputed from its last state by its output layer (exact): about 14 KB per label token for "
            "whisper-base, 1.05 GB for 6,220 utterances. Not used while the teacher's encoder states or FFN "
            "activations are distilled. Default: on when training on the CPU, off on accelerators."
        },
    )
    teacher_cache_top_k: int = field(
        default=0,
        metadata={
            "help": "0 (default): the KD term uses the teacher's exact logits. k > 0, with the teacher cache: entries "
            "also keep the teacher's k largest logits and its log-normaliser at kd_temperature, and the training KD "
            "term becomes T²·KL over k + 1 buckets (those k tokens and one for all the others), which skips "
            "recomputing the teacher's output layer. It changes the loss, much at T=2 and little at T=1 "
            "(benchmarks/README.md, 'Output caches for six thousand utterances'): use it at T=1 if at all. "
            "Evaluation and the layer selection still use the exact logits."
        },
    )
    teacher_load_in: str | None = field(
        default=None,
        metadata={
            "help": "Load a teacher given by name quantized by bitsandbytes: 8bit (LLM.int8) or 4bit (NF4), for "
            "teachers too large for the memory at hand (it is frozen: no gradient passes its quantized weights). It "
            "changes the KD targets (benchmarks/README.md, 'A teacher in 8 or 4 bits'). Needs the bnb extra. For a "
            "teacher given as a model, load it with BitsAndBytesConfig yourself."
        },
    )
    encoder_cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "Folder of the encoder-output and teacher-output caches (default: "
            "$HF_WHISPER_KDQ_CACHE/encoder_outputs)."
        },
    )
    encoder_cache_max_gb: float = field(
        default=8.0,
        metadata={
            "help": "Size bound of that folder in GB (all caches together); least recently used entries go, with a "
            "warning, and a training set that does not fit is partly recomputed every epoch."
        },
    )
    encoder_cache_precision: str = field(
        default="auto",
        metadata={
            "help": "How the encoder-output cache stores a row: fp16 (exact to ~2e-4), int8 with one scale per "
            "frame (half the bytes; changes the losses by ~1e-4 relative, benchmarks/README.md 'Output caches for "
            "six thousand utterances'), or auto (default): fp16 unless the training set would exceed "
            "encoder_cache_max_gb in fp16, int8 then."
        },
    )

    def __post_init__(self):
        if not self.use_cpu and _launched_on_several_processes() and not torch.accelerator.is_available():
            # accelerate makes CPU processes one distributed job only when told they are CPU processes: without it,
            # each process of `torchrun` on a machine without GPUs trained its own model, none of them synchronized.
            self.use_cpu = True
        super().__post_init__()
        for name, minimum in (
            ("ce_weight", 0),
            ("kd_weight", 0),
            ("hidden_weight", 0),
            ("quant_weight", 0),
            ("num_distill_layers", 0),
            ("selection_interval", 0),
            ("selection_probe_batches", 1),
            ("gptq_calibration_rows", 1),
        ):
            if getattr(self, name) < minimum:
                raise ValueError(f"{name} must be ≥ {minimum}, got {getattr(self, name)}")
        if self.ce_weight + self.kd_weight + self.hidden_weight == 0:
            raise ValueError(
                "ce_weight, kd_weight and hidden_weight are all 0: nothing would train the student; give one of "
                "them a weight > 0"
            )
        if not self.clip_learning_rate > 0:
            raise ValueError(
                f"clip_learning_rate must be > 0, got {self.clip_learning_rate}: e.g. 1e-2; to keep the clipping "
                "ratios fixed, set learnable_clipping=False"
            )
        if self.kd_temperature <= 0:
            raise ValueError(f"kd_temperature must be > 0, got {self.kd_temperature}")
        for name, allowed in (
            ("hidden_target", HIDDEN_TARGETS),
            ("hidden_representation", HIDDEN_REPRESENTATIONS),
            ("hidden_loss_scale", HIDDEN_LOSS_SCALES),
            ("layer_matching", MATCHING_MODES),
            ("quant_granularity", GRANULARITIES),
            ("size_budget_accounting", BUDGET_ACCOUNTINGS),
            ("selection_cost", SELECTION_COSTS),
            ("quant_format", QUANT_FORMATS),
            ("frozen_encoder_quantizer", PTQ_QUANTIZERS),
            ("decoder_start_quantizer", PTQ_QUANTIZERS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}: choose one of {', '.join(allowed)}")
        parse_bit_choices(self.quant_bit_choices)
        unknown = set(_split(self.quant_targets)) - set(QUANT_TARGETS)
        if unknown:
            raise ValueError(f"quant_targets {sorted(unknown)} unknown: choose from {', '.join(QUANT_TARGETS)}")
        if self.quant_granularity == "per_group" and self.quant_group_size <= 0:
            raise ValueError(f"quant_group_size must be > 0 with per_group granularity, got {self.quant_group_size}")
        if not self.quant_symmetric:
            raise ValueError("asymmetric quantization is not supported yet: set quant_symmetric=True")
        if self.size_budget_mb is not None and self.size_budget_ratio is not None:
            raise ValueError("give size_budget_mb or size_budget_ratio, not both")
        if self.size_budget_mb is not None and self.size_budget_mb <= 0:
            raise ValueError(f"size_budget_mb must be > 0, got {self.size_budget_mb}")
        if self.size_budget_ratio is not None and not 0 < self.size_budget_ratio <= 1:
            raise ValueError(f"size_budget_ratio must be in (0, 1], got {self.size_budget_ratio}")
        budget = "size_budget_mb" if self.size_budget_mb is not None else "size_budget_ratio"
        if getattr(self, budget) is not None:
            # Without a quantized layer the budget would be silently ignored.
            if not any(bits < FLOAT_BITS for bits in self.bit_choices):
                raise ValueError(
                    f"{budget}={getattr(self, budget)} cannot be met: quant_bit_choices={self.quant_bit_choices!r} "
                    "keeps every layer in float. Allow integer bits (e.g. --quant_bit_choices 2,3,4,8,float) or "
                    f"drop {budget}"
                )
            if not self.quant_target_set:
                raise ValueError(
                    f"{budget}={getattr(self, budget)} cannot be met: quant_targets is empty, so nothing is "
                    f"quantized. Name what to quantize (e.g. --quant_targets encoder,decoder) or drop {budget}"
                )
        if self.quant_format == "ggml":
            self._check_ggml()
        if self.teacher_load_in is not None and self.teacher_load_in not in BITSANDBYTES_LOADS:
            raise ValueError(
                f"teacher_load_in={self.teacher_load_in!r}: choose one of {', '.join(BITSANDBYTES_LOADS)} (or leave it unset)"
            )
        if self.encoder_cache_precision not in ENCODER_CACHE_PRECISIONS:
            raise ValueError(
                f"encoder_cache_precision={self.encoder_cache_precision!r}: choose one of "
                f"{', '.join(ENCODER_CACHE_PRECISIONS)}"
            )
        if self.encoder_cache_max_gb <= 0:
            raise ValueError(f"encoder_cache_max_gb must be > 0, got {self.encoder_cache_max_gb}")
        if self.teacher_cache_top_k < 0:
            raise ValueError(
                f"teacher_cache_top_k must be ≥ 0, got {self.teacher_cache_top_k}: 0 for the exact KD loss, or e.g. "
                "64 for the top-k form"
            )
        if self.teacher_cache_top_k and self.cache_teacher_outputs is False:
            raise ValueError(
                f"teacher_cache_top_k={self.teacher_cache_top_k} needs the teacher cache, which "
                "cache_teacher_outputs=False turns off: drop one of them"
            )
        self._check_lora()
        self._check_frozen_encoder_quantizer()
        self._check_decoder_start_quantizer()
        if not 0 < self.selection_until <= 1:
            raise ValueError(
                f"selection_until={self.selection_until} must be a fraction of training in (0, 1]: e.g. 0.5 stops "
                "re-selecting halfway, 1.0 re-selects throughout"
            )

    def _check_lora(self) -> None:
        if self.lora_r < 0:
            raise ValueError(f"lora_r must be ≥ 0, got {self.lora_r}: 0 trains every weight, e.g. 16 trains LoRA")
        if self.lora_alpha is not None and not self.lora_r:
            raise ValueError(
                f"lora_alpha={self.lora_alpha} scales LoRA adapters, and lora_r is 0: set lora_r (e.g. 16)"
            )
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise ValueError(f"lora_alpha must be > 0, got {self.lora_alpha}: e.g. {self.lora_r} (a scale of 1)")
        if self.lora_r and (self.fsdp or self.deepspeed):
            raise ValueError(
                "lora_r with FSDP or DeepSpeed is not supported (untested: frozen weights in sharded or offloaded "
                "groups): train LoRA on one process or several with DDP, or set lora_r=0"
            )

    def _check_frozen_encoder_quantizer(self) -> None:
        if self.frozen_encoder_quantizer != "gptq":
            return
        if not self.freeze_encoder or "encoder" not in self.quant_target_set:
            raise ValueError(
                "frozen_encoder_quantizer='gptq' quantizes a frozen encoder: set freeze_encoder=True and put encoder "
                f"in quant_targets (got freeze_encoder={self.freeze_encoder}, quant_targets={self.quant_targets!r}); "
                "a trained encoder learns its codes (quantization-aware training)"
            )
        self._check_one_gptq_width("frozen_encoder_quantizer")

    def _check_decoder_start_quantizer(self) -> None:
        if self.decoder_start_quantizer != "gptq":
            return
        if "decoder" not in self.quant_target_set:
            raise ValueError(
                "decoder_start_quantizer='gptq' starts the quantized decoder's linears: put decoder in quant_targets "
                f"(got {self.quant_targets!r})"
            )
        if self.lora_r:
            raise ValueError(
                f"decoder_start_quantizer='gptq' rewrites the decoder's weights, which lora_r={self.lora_r} freezes: "
                "drop one of them"
            )
        self._check_one_gptq_width("decoder_start_quantizer")

    def _check_one_gptq_width(self, option: str) -> None:
        if len(self.bit_choices) != 1 or self.bit_choices[0] == FLOAT_BITS:
            raise ValueError(
                f"{option}='gptq' needs one integer width (got quant_bit_choices={self.quant_bit_choices!r}): GPTQ's "
                "codes are computed once, for one width that the layer selection must not change. Fix: e.g. "
                "--quant_bit_choices 4"
            )

    def _check_ggml(self) -> None:
        """quant_format='ggml': bits a ggml type trains for, and every weight whisper.cpp's file quantizes."""
        wrong = [bits for bits in self.bit_choices if bits not in GGML_TYPE_OF_BITS]
        if wrong:
            choices = ",".join(str(b) for b in self.bit_choices if b in GGML_TYPE_OF_BITS) or "4,8"
            raise ValueError(
                f"quant_format='ggml' trains for ggml's block types, bits {', '.join(map(str, GGML_TYPE_OF_BITS))} "
                f"({', '.join(GGML_TYPE_OF_BITS.values())}); quant_bit_choices={self.quant_bit_choices!r} also has "
                f"{', '.join('float' if b == FLOAT_BITS else str(b) for b in wrong)} (a whisper.cpp file stores every "
                f"2-D weight in one quantized type). Fix: --quant_bit_choices {choices}"
            )
        if self.quant_target_set != set(QUANT_TARGETS):
            raise ValueError(
                f"quant_format='ggml' needs quant_targets={','.join(QUANT_TARGETS)} (got {self.quant_targets!r}): "
                "whisper.cpp's file quantizes every 2-D weight, the token embedding included, so training for it "
                f"quantizes them all. Fix: --quant_targets {','.join(QUANT_TARGETS)}"
            )

    @property
    def bit_choices(self) -> tuple[int, ...]:
        return parse_bit_choices(self.quant_bit_choices)

    @property
    def quant_target_set(self) -> frozenset[str]:
        return frozenset(_split(self.quant_targets))

    def budget_bytes(self, teacher_fp16_bytes: int) -> int | None:
        """The size budget in bytes, ``size_budget_ratio`` taken of the teacher's fp16 weight bytes; None without
        a budget."""
        if self.size_budget_mb is not None:
            return int(self.size_budget_mb * 1e6)
        if self.size_budget_ratio is not None:
            return int(self.size_budget_ratio * teacher_fp16_bytes)
        return None
