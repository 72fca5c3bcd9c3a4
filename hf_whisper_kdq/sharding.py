"""Sharded and multi-process training: which sharding the trainer accepts, the whole student it exports from a
sharded one, and how a process of a multi-process launch ends.

Under DDP and DeepSpeed ZeRO-1/2 every process holds the whole student. FSDP (version 2, ``fully_shard``) keeps
only a shard of each weight on each process and gathers a layer's weight for the duration of that layer's forward
and backward. The trainer reads whole weights at three places, and each is placed where FSDP provides them:

* the guided selection's quantization losses are measured in forward hooks (`calibration.measure_quantization_losses`);
* the adapters that map student states to the teacher's width run inside the student's forward;
* the export gathers the full state dict onto the main process and rebuilds an unsharded student there
  (`whole_student`).

The teacher is never sharded: it is frozen, and replicated whole on every process as under ZeRO-1/2 (the trainer
calls its encoder and decoder separately, outside any wrapper's forward).
"""

from __future__ import annotations

import copy
import logging
import os
import sys

import torch
from torch import nn
from transformers import WhisperForConditionalGeneration

from .adapters import attach_adapters
from .quant import ALLOWED_BITS, prepare_qat, set_quant_specs

logger = logging.getLogger(__name__)

ZERO2_EXAMPLE = "examples/deepspeed_zero2.json"
FSDP2_EXAMPLE = "examples/fsdp2.json"


def fsdp_version(trainer) -> int | None:
    """1 or 2 when the trainer's accelerator runs FSDP, else None."""
    if not trainer.is_fsdp_enabled:
        return None
    return int(getattr(trainer.accelerator.state.fsdp_plugin, "fsdp_version", 1))


def check_sharding(trainer) -> None:
    """Refuse, before training, the sharding set-ups that would hand the trainer one shard where it needs the whole
    weight, with the alternative that works."""
    version = fsdp_version(trainer)
    if version == 1:
        raise NotImplementedError(
            "FSDP version 1 (FullyShardedDataParallel) is not supported: use FSDP version 2 (fully_shard), e.g. "
            f'--fsdp --fsdp_config {FSDP2_EXAMPLE} (its "version": 2), or DDP'
        )
    if version == 2 and trainer.args.quant_weight > 0:
        raise NotImplementedError(
            "quant_weight > 0 compares every whole weight with its quantized copy outside the forward pass, which "
            "FSDP shards: set quant_weight=0 (the default) under FSDP, or train with DDP or DeepSpeed ZeRO-1/2"
        )
    if trainer.is_deepspeed_enabled and trainer.accelerator.state.deepspeed_plugin.zero_stage == 3:
        raise NotImplementedError(
            "DeepSpeed ZeRO-3 shards the student's weights, which the guided selection and fake quantization read "
            f"whole: use ZeRO stage 1 or 2 ({ZERO2_EXAMPLE}), which shard optimizer state and gradients, or FSDP "
            f"version 2 ({FSDP2_EXAMPLE})"
        )
    if (
        trainer.is_deepspeed_enabled
        and trainer.args.learnable_clipping
        and "optimizer" in trainer.accelerator.state.deepspeed_plugin.deepspeed_config
    ):
        raise ValueError(
            'the DeepSpeed config has an "optimizer" section: DeepSpeed then builds the optimizer itself, and the '
            "learnable clipping ratios would train at the weights' learning rate instead of clip_learning_rate. "
            'Remove the "optimizer" section (DeepSpeed then wraps the trainer\'s AdamW, whose clipping ratios have '
            f"their own parameter group, as with {ZERO2_EXAMPLE}), or set learnable_clipping=False"
        )


def is_sharded(model: nn.Module) -> bool:
    """Whether FSDP2 (``fully_shard``) manages any part of ``model``."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(module, FSDPModule) for module in model.modules())


def whole_student(trainer) -> nn.Module | None:
    """The trained student with whole weights, as the export and evaluation read it.

    Unsharded students are returned as they are. An FSDP-sharded student is gathered: every process must call this
    (the gather is collective); the main process gets an unsharded copy (its fake-quant layers under the plan's
    specs, learned clipping ratios, adapters and generation config) and the others None.
    """
    model = trainer.unwrapped_student()
    if not is_sharded(model):
        return model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not trainer.is_world_process_zero():
        return None
    # The student's own dtype (the teacher was cast to it): FSDP under mixed precision keeps fp32 master weights.
    dtype = next(trainer.teacher.parameters()).dtype
    whole = WhisperForConditionalGeneration(copy.deepcopy(model.config)).to(dtype)  # not FSDP's subclass
    attach_adapters(whole, trainer.teacher.config, trainer.args)  # as the trainer attached the student's
    specs = trainer.plan.module_specs()
    if specs:
        # Wrapped at integer bits first, so that layers the plan keeps in float get the clipping ratios they kept
        # from earlier plans (and which the state holds); the plan's own specs are set once the state is loaded.
        prepare_qat(whole, dict.fromkeys(specs, trainer.plan.spec(min(ALLOWED_BITS))))
    whole.load_state_dict(state)
    if specs:
        set_quant_specs(whole, specs)
    whole.generation_config = copy.deepcopy(model.generation_config)
    whole.name_or_path = getattr(model, "name_or_path", "")
    logger.info("gathered the FSDP-sharded student onto the main process (%d tensors)", len(state))
    return whole.eval()


def end_distributed_process() -> None:
    """End a process of a torchrun / accelerate launch once its work is done and written; nothing in one process.

    Every process waits for the others, then closes its process group: a process that exits while another still
    writes can abort inside gloo's threads. Even then, about one 2-process CPU run in 20–45 aborted *after* all
    Python code had finished ("terminate called without an active exception", in the interpreter's native
    teardown), and the launcher reported a failed job whose outputs were complete. The process therefore ends
    without that teardown, after flushing what Python still buffers. ``hf-whisper-kdq`` ends this way, and so can a
    script of your own, as the last call of its main function.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
