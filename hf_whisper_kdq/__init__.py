"""hf-whisper-kdq: compress OpenAI Whisper by guided knowledge distillation and quantization.

The public API, in the order a script uses it::

    teacher, processor = load_whisper("openai/whisper-base")        # Hub, .pt, CTranslate2, offline pack
    student = build_student(teacher, decoder_layers=2)               # spaced layer copy
    trainer = DistillQuantTrainer(model=student, teacher_model=teacher, args=DistillQuantArguments(...), ...)
    trainer.train()                                                  # trainer.plan: bits and distilled layers
"""

from .callbacks import LayerSelectionCallback
from .config import DistillQuantArguments
from .data import WhisperDataCollator, load_manifest, load_speech_dataset, prepare_dataset
from .evaluation import evaluate_model, make_compute_metrics, transcribe
from .export import save_compressed
from .hub import push_compressed
from .losses import NonFiniteLossError
from .selection import KDQPlan
from .sources import load_whisper, save_whisper
from .students import build_student
from .trainer import DistillQuantTrainer

__version__ = "0.1.0.dev0"

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
