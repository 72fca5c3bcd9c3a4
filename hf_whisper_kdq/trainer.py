"""``DistillQuantTrainer``: a ``Seq2SeqTrainer`` that distils a quantization-aware Whisper student from a teacher.

Usage is that of any HF trainer, with one extra argument::

    trainer = DistillQuantTrainer(model=student, teacher_model="openai/whisper-base", args=args,
                                  train_dataset=train, data_collator=collator, processing_class=processor)
    trainer.train()
    trainer.plan  # per layer: bits, distilled or not, matched teacher layer, q_l and d_l

``compute_loss`` runs the forwards (:mod:`hf_whisper_kdq.forwards`) and calls the pure loss functions of
:mod:`hf_whisper_kdq.losses`; the guided layer selection (:class:`~hf_whisper_kdq.callbacks.LayerSelectionCallback`)
decides which layers are distilled and how many bits each layer gets.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch import nn
from transformers import Seq2SeqTrainer, TrainerCallback, WhisperForConditionalGeneration, WhisperProcessor

from .adapters import attach_adapters
from .calibration import calibrate_clipping, gptq_layers
from .callbacks import LayerSelectionCallback
from .card import write_model_card
from .card_scores import rows_of_last_evaluation
from .config import DistillQuantArguments
from .export import CompressionReport, save_compressed
from .files import last_complete_checkpoint, tokens_left_out_of_pickles
from .forwards import StudentTeacherForwards, encoders_equal
from .ggml_budget import fit_ggml_budget
from .hub import push_compressed
from .losses import (
    IGNORE_INDEX,
    check_finite_terms,
    cross_entropy_loss,
    hidden_distillation_loss,
    logit_distillation_loss,
    quantization_loss,
    top_k_distillation_loss,
)
from .quant import FakeQuantEmbedding, FakeQuantLinear, prepare_qat, set_quant_specs
from .selection import KDQPlan, check_size_budget, fp16_bytes, starting_plan
from .sharding import check_sharding, whole_student
from .sources import load_whisper
from .students import check_same_tokenizer, check_whisper

logger = logging.getLogger(__name__)

LOSS_TERMS = ("ce", "kd", "hidden", "quant")


def _is_selection_callback(callback) -> bool:
    """A :class:`LayerSelectionCallback`, as an instance or as the class (the Trainer takes both)."""
    kind = callback if isinstance(callback, type) else type(callback)
    return issubclass(kind, LayerSelectionCallback)


class DistillQuantTrainer(Seq2SeqTrainer):
    """Seq2SeqTrainer + a frozen teacher, fake-quantized student layers and guided layer selection.

    Args:
        model: the student ``WhisperForConditionalGeneration`` (e.g. from :func:`~hf_whisper_kdq.build_student`).
            Its selected linears are swapped in place for fake-quant wrappers (same parameter names), and
            small adapters (``model.kdq_adapters``) are attached when its hidden width differs from the
            teacher's.
        teacher_model: the teacher, or a name/path for :func:`~hf_whisper_kdq.load_whisper`. Never trained,
            never saved with the student.
        args: :class:`~hf_whisper_kdq.DistillQuantArguments`.
        data_collator, train_dataset, eval_dataset, processing_class, compute_metrics, optimizers,
            preprocess_logits_for_metrics: as for ``Seq2SeqTrainer``. ``processing_class`` (the
            ``WhisperProcessor``) is saved beside the compressed student; without it, that of a teacher given by
            name is.
        callbacks: as for ``Seq2SeqTrainer``. The guided selection (:class:`LayerSelectionCallback`) is always
            added; one passed here is used instead (bound to this trainer), never twice.
        plan: a previous :class:`~hf_whisper_kdq.selection.KDQPlan` to start from (default: fresh).

    A ``peft.PeftModel`` student (one LoRA adapter), or ``args.lora_r > 0``, trains LoRA adapters inside the
    quantizer (:mod:`~hf_whisper_kdq.peft_students`); ``trainer.peft_model`` is then the PeftModel (None otherwise),
    and ``trainer.model`` the Whisper model peft adapted in place.

    ``Seq2SeqTrainer``'s ``model_init`` and ``compute_loss_func`` are not taken: the student is prepared once,
    here, and the loss is the distillation loss.
    """

    # compute_loss normalizes every term by the accumulated batch itself (num_items_in_batch).
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        model: WhisperForConditionalGeneration | None = None,
        teacher_model: WhisperForConditionalGeneration | str | os.PathLike | None = None,
        args: DistillQuantArguments | None = None,
        *,
        data_collator: Callable | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class: WhisperProcessor | None = None,
        compute_metrics: Callable | None = None,
        callbacks: list[TrainerCallback | type[TrainerCallback]] | None = None,
        optimizers: tuple = (None, None),
        preprocess_logits_for_metrics: Callable | None = None,
        plan: KDQPlan | None = None,
    ):
        if not isinstance(args, DistillQuantArguments):
            raise TypeError("args must be a DistillQuantArguments (it extends Seq2SeqTrainingArguments)")
        if teacher_model is None:
            raise ValueError("teacher_model is required: a WhisperForConditionalGeneration or a name/path")
        # The processor of a teacher loaded by name: what the export saves when no processing_class is given.
        self.teacher_processor = None
        if isinstance(teacher_model, (str, os.PathLike)):
            device = args.device if args.teacher_load_in else None  # bitsandbytes places the layers it loads
            teacher_model, self.teacher_processor = load_whisper(
                teacher_model, load_in=args.teacher_load_in, device=device
            )
        elif args.teacher_load_in:
            raise ValueError(
                f"teacher_load_in={args.teacher_load_in!r} loads a teacher given by name; this one is a model already: "
                "pass its name or path, or load it with quantization_config=BitsAndBytesConfig(...) yourself"
            )
        lora = None
        if args.lora_r or type(model).__module__.partition(".")[0] == "peft":
            from . import peft_students  # imports peft: only for a LoRA student

            model, lora = peft_students.take_apart(model, args)
        check_whisper(model, "student")
        check_whisper(teacher_model, "teacher")
        check_same_tokenizer(model, teacher_model)
        attach_adapters(model, teacher_model.config, args)
        self.plan = plan or starting_plan(model, teacher_model, args)
        check_size_budget(model, self.plan, args, fp16_bytes(teacher_model))
        if args.quant_format == "ggml" and plan is None:
            processor = processing_class or self.teacher_processor
            fit_ggml_budget(self.plan, model, processor, args, fp16_bytes(teacher_model))
        if self.plan.module_specs():
            prepare_qat(model, self.plan.module_specs())
        if args.freeze_encoder:  # after prepare_qat: a quantized encoder's clipping ratios are frozen too
            model.freeze_encoder()
        # LoRA goes on the fake-quant wrappers (inside the quantizer: see peft_students), so after prepare_qat. The
        # trainer trains the Whisper model peft adapted in place; peft_model is the PeftModel around it.
        self.peft_model = None if lora is None else peft_students.attach_lora(model, lora, args)
        # Computed once: a frozen student encoder equal to the teacher's lets both share one encoder pass.
        encoder_matches_teacher = args.freeze_encoder and encoders_equal(model, teacher_model)
        # One selection callback, bound to this trainer: the one passed, else a new one. It joins after the
        # Trainer's own callbacks, as add_callback would add it.
        others = [c for c in callbacks or () if not _is_selection_callback(c)]
        selection = next((c for c in callbacks or () if _is_selection_callback(c)), LayerSelectionCallback)

        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics,
            callbacks=others,
            optimizers=optimizers,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        )
        self.model_accepts_loss_kwargs = True  # so that the Trainer counts num_items_in_batch for us
        check_sharding(self)
        self.teacher = self._prepare_teacher(teacher_model)
        self.forwards = StudentTeacherForwards(
            self.teacher,
            args,
            self.accelerator,
            plan=lambda: self.plan,
            encoder_matches_teacher=encoder_matches_teacher,
            sharded=self.is_fsdp_enabled,
            expected_rows=len(train_dataset) if hasattr(train_dataset, "__len__") else None,
        )
        self._logged_terms: dict[str, dict[str, list[torch.Tensor]]] = {
            "train": defaultdict(list),
            "eval": defaultdict(list),
        }
        self._accumulated_rows = 0  # set by get_batch_samples for each optimizer step
        sized = train_dataset is not None and hasattr(train_dataset, "__len__")
        gptq_sides = [
            side
            for side, on in (
                ("encoder", args.frozen_encoder_quantizer == "gptq"),
                ("decoder", args.decoder_start_quantizer == "gptq"),
            )
            if on
        ]
        if gptq_sides and not sized:
            raise ValueError(
                f"GPTQ ({' and '.join(gptq_sides)}) calibrates on training rows: pass a train_dataset with a length"
            )
        if self.plan.module_specs() and sized:
            started = self._gptq(gptq_sides)
            # Clipping starts searched on the probe batches' inputs, before an optimizer or engine copies the ratios;
            # after GPTQ, so that it measures the decoder's inputs through the quantized encoder (one search serves),
            # and leaving the ratios GPTQ started at 1 alone.
            searched = calibrate_clipping(
                self.unwrapped_student(), self.plan, self.probe_batches(per_optimizer_step=True), skip=started
            )
            if searched:
                logger.info("Clipping ratios of %d layers searched on the probe batches' inputs", len(searched))
        self.add_callback(selection)

    def _gptq(self, sides: list[str]) -> list[str]:
        """GPTQ's codes for the frozen encoder (kept: frozen_encoder_quantizer) and then the decoder's linears (a start
        that training moves: decoder_start_quantizer), on gptq_calibration_rows training rows; returns the names of
        the layers GPTQ started (their clipping stays at 1)."""
        if not sides:
            return []
        specs = self.plan.module_specs()
        student = self.unwrapped_student()
        rows = self.probe_batches(rows=self.args.gptq_calibration_rows)
        n_rows = sum(len(b["labels"]) for b in rows)
        started: list[str] = []
        if "encoder" in sides:
            encoder = [name for name, spec in specs.items() if spec and ".encoder." in name]
            gptq_layers(student, encoder, rows, progress=not self.args.disable_tqdm)
            logger.info("GPTQ codes for the %d frozen encoder layers, on %d training rows", len(encoder), n_rows)
        if "decoder" in sides:
            # The decoder's linears only: a token embedding started by GPTQ as the tied output layer made the trained
            # students loop (benchmarks/README.md, "GPTQ start of the decoder"); it keeps the clip search.
            started = [n for n, spec in specs.items() if spec and ".decoder.layers." in n]
            gptq_layers(student, started, rows, keep_codes=False, progress=not self.args.disable_tqdm)
            logger.info("GPTQ start for the %d trained decoder linears, on %d training rows", len(started), n_rows)
        return started

    def add_callback(self, callback) -> None:
        """As ``Trainer.add_callback``; a :class:`LayerSelectionCallback` (class or instance) is bound to this
        trainer and replaces the one it has, so that one selection runs."""
        if _is_selection_callback(callback):
            callback = callback() if isinstance(callback, type) else callback
            callback.bind(self)
            for existing in [c for c in self.callback_handler.callbacks if _is_selection_callback(c)]:
                self.callback_handler.remove_callback(existing)
        super().add_callback(callback)

    def create_optimizer(self, model=None):
        """The Trainer's optimizer, with the clipping ratios (``*.weight_clip``) in a parameter group of their own:
        learning rate ``clip_learning_rate``, no weight decay (it would pull the ratios towards 0).

        The Trainer builds its groups first (so its decay rules, optimizer choice and sharded-parameter handling
        apply unchanged); the ratios are then moved out of them with ``add_param_group``, before any optimizer
        state exists. DeepSpeed and FSDP call this method too and wrap the optimizer it returns.
        """
        opt_model = self.model if model is None else model
        created = self.optimizer is None
        optimizer = super().create_optimizer(model)
        clips = [p for n, p in opt_model.named_parameters() if n.endswith(".weight_clip") and p.requires_grad]
        if not created or not clips:
            return optimizer
        inner = getattr(optimizer, "optimizer", optimizer)  # sagemaker / accelerate wrappers hold the torch one
        moved = {id(p) for p in clips}
        for group in inner.param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in moved]
        inner.param_groups[:] = [group for group in inner.param_groups if group["params"]]
        inner.add_param_group({"params": clips, "lr": self.args.clip_learning_rate, "weight_decay": 0.0})
        return optimizer

    def _prepare_teacher(self, teacher: WhisperForConditionalGeneration) -> WhisperForConditionalGeneration:
        if getattr(teacher, "hf_quantizer", None) is None:  # a bitsandbytes teacher keeps the dtypes it loaded with
            teacher = teacher.to(dtype=next(self.model.parameters()).dtype)
        teacher.requires_grad_(False)
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            # Under ZeRO-1/2 a frozen model needs no engine (TRL gives its reference model a stage-0 engine, which
            # amounts to this): it is replicated whole on every process, and DeepSpeed never sees it. FSDP would shard
            # it, but its encoder and decoder are called apart, outside any FSDP forward: it is replicated too.
            return teacher.to(self.accelerator.device).eval()
        # evaluation_mode: placed on this process's device but never wrapped in DDP.
        teacher = self.accelerator.prepare_model(teacher, evaluation_mode=True)
        # accelerate hands back a model it prepared before untouched: a teacher reused by a second trainer may have
        # been moved since (found on a GPU: the second trainer's teacher stayed on the CPU).
        return teacher.to(self.accelerator.device).eval()

    # ---- what the guided selection reads and writes (callbacks.SelectionHost) -------------------------
    @property
    def processor(self):
        """The WhisperProcessor exports save and a ggml plan bills: ``processing_class``, else that of a teacher
        given by name (None with neither)."""
        return self.processing_class or self.teacher_processor

    def unwrapped_student(self) -> nn.Module:
        """The student without its distributed wrapper (under FSDP its weights stay sharded)."""
        return self.accelerator.unwrap_model(self.model)

    def apply_plan(self, plan: KDQPlan) -> None:
        """Make ``plan`` the trainer's and set its quantization specs on the student."""
        self.plan = plan
        if plan.module_specs():
            set_quant_specs(self.unwrapped_student(), plan.module_specs())

    def probe_batches(self, per_optimizer_step: bool = False, rows: int | None = None) -> list[dict]:
        """``selection_probe_batches`` batches of fixed, evenly spaced training rows (no RNG consumed), collated and
        placed as training batches are. With ``per_optimizer_step``, as many rows as that many optimizer steps
        take over all processes (the same rows however a launch splits its global batch: clipping calibration);
        with ``rows``, that many (GPTQ's calibration)."""
        dataset = self.train_dataset
        if dataset is None or len(dataset) == 0:
            raise ValueError("layer selection needs a non-empty train_dataset")
        batch_size = self.args.per_device_train_batch_size
        rows_per_batch = batch_size
        if per_optimizer_step:
            rows_per_batch *= self.args.world_size * self.args.gradient_accumulation_steps
        count = min(len(dataset), rows or rows_per_batch * self.args.selection_probe_batches)
        rows = [round(i * (len(dataset) - 1) / max(count - 1, 1)) for i in range(count)]
        collate = self._get_collator_with_removed_columns(self.data_collator, description="probe")
        if hasattr(dataset, "column_names"):
            dataset = self._remove_unused_columns(dataset, description="probe")
        return [
            self._prepare_inputs(collate([dataset[i] for i in rows[start : start + batch_size]]))
            for start in range(0, count, batch_size)
        ]

    # ---- loss -------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        args = self.args
        sides = tuple(side for side in self.forwards.distill_sides if self.plan.distilled_pairs(side))
        labelled = labels.ne(IGNORE_INDEX)
        # Logits nobody outside the losses reads are computed where a label is: in batches of mixed-length
        # utterances much of [B, T] is padding, and each position costs a 51,865-way output layer forward and
        # backward (what skipping them saves: benchmarks/README.md, "CPU step time, session 6"). Evaluation
        # (return_outputs) gets the full [B, T, V] logits it passes on to metrics.
        student_out, teacher_out, reps = self.forwards(
            model,
            inputs,
            sides,
            logits_at=None if return_outputs else labelled,
            adapted_layers={side: {s for s, _ in self.plan.distilled_pairs(side)} for side in sides},
        )
        scored = labels if return_outputs else labels[labelled]

        # With num_items_in_batch, every term is normalized by the accumulated (and gathered) batch, and the
        # sum is multiplied by the number of processes because DDP averages gradients across them.
        accumulated = num_items_in_batch is not None
        processes = self.accelerator.num_processes if accumulated and args.average_tokens_across_devices else 1
        # Only a training micro-batch is a share of an accumulated step. Evaluation passes each batch's own
        # num_items_in_batch, and may run before train() ever set current_gradient_accumulation_steps.
        steps = self.current_gradient_accumulation_steps if accumulated and model.training else 1

        terms = {
            "ce": cross_entropy_loss(student_out.logits, scored, num_items_in_batch),
            "kd": self._distillation_loss(student_out.logits, teacher_out, scored, num_items_in_batch),
        }
        hidden = student_out.logits.new_zeros(())
        for side in sides:
            mask = labelled if side == "decoder" else None
            if side == "decoder":
                normalizer = num_items_in_batch
            else:  # encoder frames of the whole accumulated batch
                frames = reps["teacher"][side][0].shape[1]
                # Rows counted by get_batch_samples: the last micro-batches of an epoch may be smaller.
                rows = self._accumulated_rows if model.training and self._accumulated_rows else labels.shape[0] * steps
                normalizer = frames * rows * processes if accumulated else None
            for student_layer, teacher_layer in self.plan.distilled_pairs(side):
                hidden = hidden + hidden_distillation_loss(
                    reps["student"][side][student_layer],
                    reps["teacher"][side][teacher_layer],
                    mask=mask,
                    normalizer=normalizer,
                    relative=self.args.hidden_loss_scale == "relative",
                )
        terms["hidden"] = hidden
        terms["quant"] = self._quantization_loss(model, student_out.logits) / (steps * processes)
        if model.training:  # before backward: a NaN update would poison the weights and every later checkpoint
            several = self.accelerator.num_processes > 1
            check_finite_terms(
                terms,
                step=self.state.global_step + 1,
                across_processes=partial(self.accelerator.reduce, reduction="sum") if several else None,
            )

        weights = {"ce": args.ce_weight, "kd": args.kd_weight, "hidden": args.hidden_weight, "quant": args.quant_weight}
        loss = sum(weights[name] * value for name, value in terms.items())
        mode = "train" if model.training else "eval"
        for name, value in terms.items():
            # Terms are per micro-batch shares of the step's mean: scaled back so the log shows the mean.
            self._logged_terms[mode][name].append(value.detach().float() * steps * processes)
        loss = loss * processes
        return (loss, student_out) if return_outputs else loss

    def _distillation_loss(self, student_logits, teacher_out, labels, num_items_in_batch):
        """The KD term: on the teacher's logits, or on the top-k form its cache gives without them
        (``teacher_cache_top_k``)."""
        temperature = self.args.kd_temperature
        if teacher_out.logits is None:
            return top_k_distillation_loss(
                student_logits,
                teacher_out.top_logits,
                teacher_out.top_indices,
                teacher_out.log_normaliser,
                labels,
                temperature=temperature,
                num_items_in_batch=num_items_in_batch,
            )
        return logit_distillation_loss(
            student_logits,
            teacher_out.logits,
            labels,
            temperature=temperature,
            num_items_in_batch=num_items_in_batch,
        )

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        # Rows of the whole accumulated batch: the normalizer of frame-level terms, as num_items_in_batch is for
        # token-level ones (micro-batch size × steps would over-count a ragged last accumulation).
        self._accumulated_rows = sum(len(batch["labels"]) for batch in batch_samples if "labels" in batch)
        return batch_samples, num_items_in_batch

    def _quantization_loss(self, model, reference: torch.Tensor) -> torch.Tensor:
        total = reference.new_zeros((), dtype=torch.float32)
        if self.args.quant_weight == 0:
            return total
        seen = set()
        for module in self.accelerator.unwrap_model(model).modules():
            if isinstance(module, (FakeQuantLinear, FakeQuantEmbedding)) and module.quant_spec is not None:
                if id(module.weight) in seen:  # tied weights count once
                    continue
                seen.add(id(module.weight))
                total = total + quantization_loss(module.effective_weight(), module.quantized_weight())
        return total

    # ---- evaluation and logging ---------------------------------------------------------------------
    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None, **gen_kwargs):
        """With ``predict_with_generate``, generate as Seq2SeqTrainer does but report the distillation loss
        (Seq2SeqTrainer would report the student's plain cross-entropy)."""
        if self.is_fsdp_enabled and "synced_gpus" not in gen_kwargs:
            # transformers turns synced_gpus on for its own FSDP wrapping, not for accelerate's: without it, a process
            # that finishes generating first stops joining the others' weight gathers, and they wait forever.
            gen_kwargs = {**(gen_kwargs or getattr(self, "_gen_kwargs", {})), "synced_gpus": True}
        if not self.args.predict_with_generate or prediction_loss_only:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys, **gen_kwargs)
        inputs = self._prepare_inputs(inputs)
        unlabelled = {k: v for k, v in inputs.items() if k not in ("labels", "decoder_input_ids")}
        _, generated, _ = super().prediction_step(model, unlabelled, False, ignore_keys=ignore_keys, **gen_kwargs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs).detach()
        return loss, generated, inputs["labels"]

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        # predict() runs this loop too but logs nothing: its terms must not be averaged into the next eval log.
        self._logged_terms["eval"].clear()
        # evaluate(metric_key_prefix="test") or a dict of eval datasets ("eval_<name>") log under their prefix.
        self._metric_key_prefix = metric_key_prefix
        return super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        eval_prefix = f"{getattr(self, '_metric_key_prefix', 'eval')}_"
        mode = "eval" if any(key.startswith(eval_prefix) for key in logs) else "train"
        prefix = eval_prefix if mode == "eval" else ""
        for name, values in self._logged_terms[mode].items():
            if values:
                mean = torch.stack(values).mean()
                if self.accelerator.num_processes > 1:  # every rank logs (as the Trainer's own loss gather does)
                    mean = self.accelerator.reduce(mean.to(self.accelerator.device), reduction="mean")
                logs[f"{prefix}loss_{name}"] = round(mean.item(), 6)
        self._logged_terms[mode].clear()
        super().log(logs, start_time)

    # ---- export ---------------------------------------------------------------------------------------
    def save_compressed(
        self, output_dir: str | os.PathLike | None = None, *, overwrite: bool = False
    ) -> CompressionReport | None:
        """Write the student as a packed integer checkpoint (compressed-tensors ``pack-quantized``) that plain
        ``WhisperForConditionalGeneration.from_pretrained`` loads, with ``compression_report.json`` and
        ``kdq_plan.json``. Default folder: ``<output_dir>/compressed``.

        Every process must call it (gathering an FSDP-sharded student is collective); the main process alone
        writes, and gets the `CompressionReport` it wrote (``report.folder`` is the folder), the others None.

        The processor saved beside it is ``processing_class``, else that of a teacher given by name; with neither,
        nothing is written (a folder without tokenizer and feature extractor would not transcribe)."""
        processor = self.processor
        if processor is None:
            raise ValueError(
                "save_compressed writes the WhisperProcessor beside the student, and this trainer has none: pass "
                "processing_class=processor to DistillQuantTrainer (the processor load_whisper returned with the "
                "teacher), or give the teacher by name (teacher_model='openai/whisper-base')"
            )
        output_dir = Path(output_dir or Path(self.args.output_dir) / "compressed")
        student = self.whole_student()
        report = None
        if self.is_world_process_zero():
            report = save_compressed(
                student,
                processor,
                output_dir,
                plan=self.plan,
                teacher_fp16_bytes=fp16_bytes(self.teacher),
                overwrite=overwrite,
            )
        self._compressed_export = (output_dir.resolve(), self.state.global_step, report)
        return report

    def whole_student(self) -> nn.Module | None:
        """The student with whole weights (see `sharding.whole_student`): the model itself unless FSDP shards it;
        then every process must call this, and the main process gets an unsharded copy, the others None."""
        return whole_student(self)

    def create_model_card(
        self,
        model_name: str | None = None,
        finetuned_from: str | None = None,
        dataset_tags: str | list[str] | None = None,
        language: str | list[str] | None = None,
        *,
        report: CompressionReport | None = None,
        eval_results=None,
        repo_id: str | None = None,
        synthetic_speech: bool | None = None,
        training_sources=(),
    ) -> Path | None:
        """Write the compressed export's model card (``README.md``) and plan figure beside it, as TRL's trainers
        write theirs; ``push_to_hub`` and ``hf-whisper-kdq compress`` both call it. Only the main process writes;
        it returns the card's path, the others None.

        Args:
            model_name: the model-index name (default: the repo name, else ``<teacher>-kdq``).
            finetuned_from: the teacher's Hub id (default: the name the teacher was loaded under; an unnamed or
                local teacher is shown by name only, never with a made-up ``base_model``).
            dataset_tags / language: the training data's names and languages, shown on the card.
            report: the export to describe (`save_compressed`'s return); default: the last export of this trainer,
                else the one in ``<output_dir>/compressed``.
            eval_results: scores for the card (see :mod:`.card`); default: the last ``evaluate()``'s WER/CER.
            repo_id: the Hub repository the card's snippets load.
            synthetic_speech: whether training used synthesized speech (default: guessed from the dataset names).
            training_sources: what each training source gave (``mixture.describe(...).to_dicts()``).
        """
        from .export import CompressionReport

        if not self.is_world_process_zero():
            return None
        if report is None:
            last = getattr(self, "_compressed_export", None)
            report = last[2] if last is not None else CompressionReport.load(Path(self.args.output_dir) / "compressed")
        teacher = self.accelerator.unwrap_model(self.teacher)
        teacher_id = (
            finetuned_from
            or getattr(teacher, "name_or_path", "")
            or getattr(teacher.config, "_name_or_path", "")
            or "unnamed teacher"
        )

        def as_list(value) -> list:  # HF's card kwargs take a string or a list
            return [value] if isinstance(value, str) else list(value or ())

        return write_model_card(
            report.folder,
            plan=self.plan,
            compression_report=report,
            eval_results={"compressed": rows_of_last_evaluation(self.state.log_history)}
            if eval_results is None
            else eval_results,
            teacher_id=teacher_id,
            training_args=self.args.to_dict(),
            datasets=as_list(dataset_tags),
            languages=as_list(language),
            repo_id=repo_id,
            model_name=model_name,
            synthetic_speech=synthetic_speech,
            training_sources=training_sources,
        )

    def push_to_hub(
        self,
        commit_message: str | None = "End of training",
        blocking: bool = True,
        token=None,
        revision: str | None = None,
        **kwargs,
    ):
        """Push the compressed checkpoint, its model card and figure in one commit — never the teacher, the
        fake-quant training state or the checkpoints. The card's scores come from the last ``evaluate()``."""
        folder = Path(self.args.output_dir) / "compressed"
        # An export of this very step is pushed as it is, with what the user added to it (a CTranslate2 copy, an
        # evaluation report): re-saving would replace the folder. The card describes that export.
        last = getattr(self, "_compressed_export", None)
        if last is None or last[:2] != (folder.resolve(), self.state.global_step):
            self.save_compressed(overwrite=True)
        if not self.is_world_process_zero():
            return None
        repo_id = self.args.hub_model_id or Path(self.args.output_dir).name
        # The card's snippets load the repo pushed to (a name without namespace only names the model).
        naming = {"repo_id": repo_id} if "/" in repo_id else {"model_name": kwargs.get("model_name") or repo_id}
        self.create_model_card(
            finetuned_from=kwargs.get("finetuned_from"),
            dataset_tags=kwargs.get("dataset_tags"),
            language=kwargs.get("language"),
            **naming,
        )
        return push_compressed(
            folder,
            repo_id,
            private=bool(self.args.hub_private_repo),
            token=token or self.args.hub_token,
            commit_message=commit_message,
            revision=revision,
        )

    def _load_callback_state(self) -> None:
        super()._load_callback_state()
        callbacks = [c for c in self.callback_handler.callbacks if isinstance(c, LayerSelectionCallback)]
        # The Trainer re-creates stateful callbacks from their saved state: give ours its trainer back.
        for callback in callbacks:
            callback.bind(self)
        # The plan decides which weights are quantized to how many bits, so a resumed run must continue with the
        # saved one. The Trainer restores callback states only with restore_callback_states_from_checkpoint
        # (False by default); without it, on_train_begin at global_step > 0 would keep the fresh initial plan.
        saved = self.state.stateful_callbacks.get(LayerSelectionCallback.__name__)
        if callbacks and saved and not self.args.restore_callback_states_from_checkpoint:
            saved = saved[0] if isinstance(saved, list) else saved
            callbacks[0].restored_plan = saved.get("attributes", {}).get("restored_plan")

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        # resume_from_checkpoint=True: the Trainer would take the highest-numbered folder, even a partial one.
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No complete checkpoint found in output directory ({self.args.output_dir})")
        return super().train(resume_from_checkpoint, trial, ignore_keys_for_eval, **kwargs)

    def _save(self, output_dir=None, state_dict=None):
        with tokens_left_out_of_pickles(self.args):
            super()._save(output_dir, state_dict)

    def _push_from_checkpoint(self, checkpoint_folder):
        with tokens_left_out_of_pickles(self.args):
            super()._push_from_checkpoint(checkpoint_folder)
