"""Optional dependencies (the ``export`` extra: ctranslate2, faster-whisper, pywhispercpp; the ``peft`` extra: peft;
the ``bnb`` extra: bitsandbytes; the ``onnx`` extra: onnx, onnxruntime),
imported where they are used, so that the package imports without them and a missing one is reported with the
command that installs it.
"""

from __future__ import annotations

import importlib
from types import ModuleType

EXPORT_INSTALL_HINT = 'pip install "hf-whisper-kdq[export]"'
PEFT_INSTALL_HINT = 'pip install "hf-whisper-kdq[peft]"'
ONNX_INSTALL_HINT = 'pip install "hf-whisper-kdq[onnx]"'
BNB_INSTALL_HINT = 'pip install "hf-whisper-kdq[bnb]"'


def import_optional(module: str, package: str, install_hint: str = EXPORT_INSTALL_HINT) -> ModuleType:
    """``importlib.import_module(module)``, or an ImportError naming ``install_hint``, the command that installs
    ``package``."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(f"{package} is not installed ({error}). Fix: {install_hint}") from error
