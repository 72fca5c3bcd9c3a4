"""hf-whisper-kdq: compress OpenAI Whisper by guided knowledge distillation and quantization.

The public API, in the order a script uses it::

    teacher, processor = load_whisper("openai/whisper-base")        # Hub, .pt, CTranslate2, offline pack
    student = build_student(teacher, decoder_layers=2)               # spaced layer copy
    trainer = DistillQuantTrainer(model=student, teacher_model=teacher, args=DistillQuantArguments(...), ...)
    trainer.train()                                                  # trainer.plan: bits and distilled layers

Each name is imported from its module on first use (PEP 562), so that ``import hf_whisper_kdq.cli`` and
``hf-whisper-kdq --help`` do not load torch and transformers.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what IDEs and type checkers read
    from .callbacks import LayerSelectionCallback
    from .config import DistillQuantArguments
    from .data import WhisperDataCollator, load_manifest, load_speech_dataset, prepare_dataset
    from .evaluation import evaluate_model, transcribe
    from .export import save_compressed
    from .hub import push_compressed
    from .losses import NonFiniteLossError
    from .scoring import make_compute_metrics
    from .selection import KDQPlan
    from .sources import load_whisper, save_whisper
    from .students import build_student
    from .trainer import DistillQuantTrainer

__version__ = "0.1.0.dev0"

# public name -> the module it lives in
_HOMES = {
    "DistillQuantArguments": ".config",
    "DistillQuantTrainer": ".trainer",
    "KDQPlan": ".selection",
    "LayerSelectionCallback": ".callbacks",
    "NonFiniteLossError": ".losses",
    "WhisperDataCollator": ".data",
    "build_student": ".students",
    "evaluate_model": ".evaluation",
    "load_manifest": ".data",
    "load_speech_dataset": ".data",
    "load_whisper": ".sources",
    "make_compute_metrics": ".scoring",
    "prepare_dataset": ".data",
    "push_compressed": ".hub",
    "save_compressed": ".export",
    "save_whisper": ".sources",
    "transcribe": ".evaluation",
}

# A literal list, as type checkers and linters read it; tests/test_package.py keeps it, _HOMES and the imports above
# naming the same objects.
__all__ = [
    "DistillQuantArguments",
    "DistillQuantTrainer",
    "KDQPlan",
    "LayerSelectionCallback",
    "NonFiniteLossError",
    "WhisperDataCollator",
    "build_student",
    "evaluate_model",
    "load_manifest",
    "load_speech_dataset",
    "load_whisper",
    "make_compute_metrics",
    "prepare_dataset",
    "push_compressed",
    "save_compressed",
    "save_whisper",
    "transcribe",
]


def __getattr__(name: str):
    if name not in _HOMES:
        # hf_whisper_kdq.quant, .export ... as the eager package gave them (importing one sets it as an attribute).
        if importlib.util.find_spec(f"{__name__}.{name}") is None:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        return importlib.import_module(f".{name}", __name__)
    value = getattr(importlib.import_module(_HOMES[name], __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
