"""The forwards of one distillation step: the frozen teacher's and the student's, on one batch.

:class:`StudentTeacherForwards` runs both models as the losses and the guided selection read them: it taps the
hidden representations that are distilled (layer outputs or FFN intermediates), maps the student's to the teacher's
width through its adapters, computes logits only where they are scored, and takes what frozen models computed
before from the on-disk caches of :mod:`hf_whisper_kdq.output_cache` (the teacher's decoder states, frozen encoders'
outputs) instead of running them again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import ExitStack, contextmanager

import torch
from torch import nn
from transformers import WhisperForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutput
from transformers.models.whisper.modeling_whisper import shift_tokens_right

from .adapters import SIDES, adapt
from .config import DistillQuantArguments
from .files import cache_root
from .output_cache import CacheFolder, EncoderOutputCache, TeacherOutputCache
from .selection import KDQPlan

logger = logging.getLogger(__name__)


def encoders_equal(student: nn.Module, teacher: nn.Module) -> bool:
    """Whether the student's encoder holds exactly the teacher's weights (names, shapes and values)."""
    ours, theirs = student.get_encoder().state_dict(), teacher.get_encoder().state_dict()
    return ours.keys() == theirs.keys() and all(
        ours[k].shape == theirs[k].shape and torch.equal(ours[k].to(theirs[k].device, theirs[k].dtype), theirs[k])
        for k in ours
    )


@contextmanager
def _tap_ffn(model: nn.Module, side: str):
    """Record the FFN intermediate (``fc1`` output) of every layer of one side: {layer index: tensor}."""
    captured: dict[int, torch.Tensor] = {}
    layers = getattr(model.model, side).layers
    handles = [
        layer.fc1.register_forward_hook(lambda module, args, output, i=i: captured.__setitem__(i, output))
        for i, layer in enumerate(layers)
    ]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def _last_decoder_state_before_norm(model: nn.Module):
    """While active, ``model``'s decoder hidden states end with its last layer's own output, as every other entry
    is, instead of Hugging Face's final-LayerNorm output.

    That normed state is what ``proj_out`` turns into logits, which the KD term already matches; distilled as a
    hidden state too it was counted twice, and being far larger than the other layers' states it made up most of
    the loss (benchmarks/README.md, "Loss balance at step 0").
    """
    decoder = model.model.decoder
    captured: list[torch.Tensor] = []

    def replace_last(module, args, output):
        if captured and getattr(output, "hidden_states", None) is not None:
            output.hidden_states = (*output.hidden_states[:-1], captured[-1])
        captured.clear()
        return output

    handles = [
        decoder.layer_norm.register_forward_pre_hook(lambda module, args: captured.append(args[0])),
        decoder.register_forward_hook(replace_last),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def _output_layer_at(model: nn.Module, positions: torch.Tensor):
    """While active, ``model``'s output layer (``proj_out``) runs on the decoder states at ``positions`` ([B, T]
    bool) only, so its logits are packed ``[N, V]`` rows; ``positions=None`` changes nothing."""
    if positions is None:
        yield
        return
    handle = model.proj_out.register_forward_pre_hook(lambda module, args: (args[0][positions], *args[1:]))
    try:
        yield
    finally:
        handle.remove()


class StudentTeacherForwards:
    """Runs the teacher (no grad) and the student on a batch; owns the caches of frozen models' outputs.

    Args:
        teacher: the frozen teacher, already on its device.
        args: the trainer's arguments (distilled sides and representation, caching).
        accelerator: the trainer's accelerator (unwrapping, autocast).
        plan: returns the current plan (the guided selection replaces it during training).
        encoder_matches_teacher: the student's encoder is frozen and equal to the teacher's, so both can share
            one encoder pass while the plan keeps it in float.
        sharded: FSDP shards the student (its encoder is then never called on its own).
        expected_rows: rows of the training set, for the caches' progress log and projected size.
    """

    def __init__(
        self,
        teacher: WhisperForConditionalGeneration,
        args: DistillQuantArguments,
        accelerator,
        *,
        plan: Callable[[], KDQPlan],
        encoder_matches_teacher: bool,
        sharded: bool,
        expected_rows: int | None = None,
    ):
        self.teacher, self.args, self.accelerator = teacher, args, accelerator
        self.plan = plan
        self.encoder_matches_teacher = encoder_matches_teacher
        self.sharded = sharded
        self.expected_rows = expected_rows
        on_cpu = args.device.type == "cpu"
        self.cache_encoders = bool(args.cache_encoder_outputs or (args.cache_encoder_outputs is None and on_cpu))
        self.encoder_cache = None  # the teacher's encoder outputs (also the student's when it shares that encoder)
        self.teacher_cache = None  # the teacher's decoder hidden states (and logits) per row
        self.student_encoder_cache = None  # a frozen student encoder's outputs
        self._cache_folder = None  # one size bound for all of them
        if args.cache_teacher_outputs or (args.cache_teacher_outputs is None and on_cpu):
            self.teacher_cache = self._new_cache(TeacherOutputCache, teacher)
        elif args.teacher_cache_top_k:
            logger.warning(
                "teacher_cache_top_k=%d has no effect: the teacher cache is off on %s (the KD loss stays exact). "
                "Set --cache_teacher_outputs true to use it",
                args.teacher_cache_top_k,
                args.device.type,
            )

    @property
    def distill_sides(self) -> tuple[str, ...]:
        """The sides whose hidden representations are distilled."""
        chosen = SIDES[self.args.hidden_target]
        if self.args.freeze_encoder:  # a frozen encoder has nothing to learn from the teacher's
            chosen = tuple(side for side in chosen if side != "encoder")
        return chosen if self.args.hidden_weight > 0 else ()

    @property
    def shares_encoder(self) -> bool:
        """Whether the student runs on the teacher's encoder outputs (a frozen, equal encoder kept in float)."""
        return self.encoder_matches_teacher and not self.plan().quantized("encoder")

    def _new_cache(self, kind, model: nn.Module, current=None):
        """``current`` if it still describes ``model``, else a new cache of ``kind`` for it: renewed whenever the
        model's weights (an in-place update, a checkpoint load) or quantization specs (a new plan) change."""
        if current is not None and current.describes(model):
            return current
        if self._cache_folder is None:
            folder = self.args.encoder_cache_dir or cache_root() / "encoder_outputs"
            self._cache_folder = CacheFolder(folder, int(self.args.encoder_cache_max_gb * 1e9))
        options = (
            {"top_k": self.args.teacher_cache_top_k, "temperature": self.args.kd_temperature}
            if kind is TeacherOutputCache
            else {"precision": self.args.encoder_cache_precision}
        )
        return kind(self._cache_folder, model, expected_rows=self.expected_rows, **options)

    def _teacher_encoder(self, features: torch.Tensor, distilled: bool) -> BaseModelOutput:
        """The teacher's encoder outputs, from the encoder cache (``cache_encoder_outputs``) unless its layers are
        ``distilled`` (it then runs, its hidden states returned or its FFN activations tapped)."""
        encoder = self.teacher.get_encoder()
        if distilled or not self.cache_encoders:
            return encoder(
                features, output_hidden_states=distilled and self.args.hidden_representation != "ffn_intermediate"
            )
        self.encoder_cache = self._new_cache(EncoderOutputCache, encoder, self.encoder_cache)
        return BaseModelOutput(last_hidden_state=self.encoder_cache.encode(encoder, features))

    def frozen_encoder_cache(self, encoder: nn.Module):
        """The cache of a frozen student encoder's outputs (see ``_new_cache``)."""
        self.student_encoder_cache = self._new_cache(EncoderOutputCache, encoder, self.student_encoder_cache)
        return self.student_encoder_cache

    def __call__(
        self,
        model,
        inputs,
        hidden_sides: tuple[str, ...],
        *,
        cached_student_encoder=True,
        logits_at=None,
        adapted_layers: dict[str, set[int]] | None = None,
    ):
        """Run teacher (no grad) and student on one batch.

        The teacher's logits and decoder hidden states come from the teacher cache (``cache_teacher_outputs``)
        unless its encoder states or FFN activations are asked for; its encoder then runs only for the rows that
        cache misses, unless the student shares it. Other frozen encoders' outputs come from the encoder cache
        (``cache_encoder_outputs``) when no hidden state of theirs is asked for; ``cached_student_encoder=False``
        runs the student's encoder whatever (the selection probes capture the inputs of its layers). With
        ``teacher_cache_top_k``, a training step's teacher outputs (``logits_at`` given, cache in use) hold the
        top-k form (``output_cache.CachedTeacherOutput``) and no logits.
        ``logits_at`` ([B, T] bool) computes both models' logits at those decoder positions only: ``logits`` are
        then packed ``[N, V]`` rows (N = ``logits_at.sum()``, row-major order).

        Returns:
            (student outputs, teacher outputs, representations) where representations[who][side] lists, per
            layer, the [B, L, D] tensors chosen by ``hidden_representation`` (only for ``hidden_sides``). The
            student's are mapped to the teacher's width by its adapters (`adapters.adapt`): every layer's, or
            those of ``adapted_layers`` ({side: student layer indices}; the others keep the student's width).
        """
        features, labels = inputs["input_features"], inputs["labels"]
        config = self.teacher.config
        decoder_input_ids = inputs.get("decoder_input_ids")
        if decoder_input_ids is None:
            decoder_input_ids = shift_tokens_right(labels, config.pad_token_id, config.decoder_start_token_id)
        ffn = self.args.hidden_representation == "ffn_intermediate"
        want = {side: side in hidden_sides for side in ("encoder", "decoder")}
        unwrapped = self.accelerator.unwrap_model(model)
        with ExitStack() as taps:
            if not ffn:  # the teacher always, so that its cached decoder states are of one kind
                taps.enter_context(_last_decoder_state_before_norm(self.teacher))
                taps.enter_context(_last_decoder_state_before_norm(unwrapped))
            ffn_taps = {
                (who, side): taps.enter_context(_tap_ffn(net, side))
                for who, net in (("teacher", self.teacher), ("student", unwrapped))
                for side in hidden_sides
                if ffn
            }
            student_encoder = unwrapped.get_encoder()
            # Not under FSDP: the student's encoder is called on its own there, outside the sharded model's forward.
            cache_student = (
                cached_student_encoder
                and self.cache_encoders
                and not self.shares_encoder
                and not self.sharded
                and not want["encoder"]
                and not any(p.requires_grad for p in student_encoder.parameters())
            )
            teacher_cached = self.teacher_cache is not None and not want["encoder"] and not ffn
            # The Trainer's autocast lives in accelerate's wrapper of model.forward; the teacher's encoder is
            # called directly, and would otherwise run in fp32 under bf16/fp16 training.
            with torch.no_grad(), self.accelerator.autocast():
                if teacher_cached and not self.shares_encoder:
                    # Only the rows the teacher cache misses need the teacher's encoder: its outputs are not cached
                    # (they would be read once, 1.5 MB a row for whisper-base, next to 14 KB a position).
                    teacher_encoder = None

                    def encode(rows):
                        return self.teacher.get_encoder()(features[rows]).last_hidden_state

                else:
                    teacher_encoder = self._teacher_encoder(features, want["encoder"])

                    def encode(rows):
                        return teacher_encoder.last_hidden_state[rows]

                if teacher_cached:
                    self.teacher_cache = self._new_cache(TeacherOutputCache, self.teacher, self.teacher_cache)
                    teacher_out = self.teacher_cache.forward(
                        self.teacher,
                        features,
                        encode,
                        decoder_input_ids,
                        labels,
                        logits_at=logits_at,
                        # The training step's packed logits are only read by the KD term, which reads the top-k
                        # form instead; evaluation and the selection probes get the exact logits.
                        exact_logits=not (self.teacher_cache.top_k and logits_at is not None),
                    )
                else:
                    with _output_layer_at(self.teacher, logits_at):
                        teacher_out = self.teacher(
                            encoder_outputs=teacher_encoder,
                            decoder_input_ids=decoder_input_ids,
                            output_hidden_states=want["decoder"] and not ffn,
                        )
                if cache_student:
                    student_hidden = self.frozen_encoder_cache(student_encoder).encode(student_encoder, features)
            student_kwargs = dict(
                decoder_input_ids=decoder_input_ids, output_hidden_states=any(want.values()) and not ffn
            )
            taps.enter_context(_output_layer_at(unwrapped, logits_at))
            student_states: dict[str, list[torch.Tensor]] = {}

            def collect_student_states(module, args, output):
                # Adapted inside the student's forward: under FSDP the adapters' weights are whole only then.
                for side in hidden_sides:
                    if ffn:
                        captured = ffn_taps[("student", side)]
                        states = [captured[i] for i in sorted(captured)]
                    else:  # hidden_states[0] is the embedding output; [i + 1] is the output of layer i.
                        states = list(getattr(output, f"{side}_hidden_states")[1:])
                    chosen = range(len(states)) if adapted_layers is None else adapted_layers.get(side, ())
                    student_states[side] = [
                        adapt(unwrapped, side, i, h) if i in chosen else h for i, h in enumerate(states)
                    ]

            if hidden_sides:
                taps.callback(unwrapped.model.register_forward_hook(collect_student_states).remove)
            if self.shares_encoder:
                student_out = model(encoder_outputs=(teacher_encoder.last_hidden_state,), **student_kwargs)
            elif cache_student:
                student_out = model(encoder_outputs=(student_hidden,), **student_kwargs)
            else:
                student_out = model(input_features=features, **student_kwargs)
        representations = {"student": student_states, "teacher": {}}
        for side in hidden_sides:
            if ffn:
                captured = ffn_taps[("teacher", side)]
                representations["teacher"][side] = [captured[i] for i in sorted(captured)]
            else:
                teacher_states = (
                    teacher_encoder.hidden_states if side == "encoder" else teacher_out.decoder_hidden_states
                )
                representations["teacher"][side] = list(teacher_states[1:])
        return student_out, teacher_out, representations
