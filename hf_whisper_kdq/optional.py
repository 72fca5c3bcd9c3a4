"""Optional dependencies (the ``export`` extra: ctranslate2, faster-whisper, pywhispercpp), imported where they are
used, so that the package imports without them and a missing one is reported with the command that installs it.
"""

from __future__ import annotations

import importlib
from types import ModuleType

EXPORT_INSTALL_HINT = 'pip install "hf-whisper-kdq[export]"'


def import_optional(module: str, package: str) -> ModuleType:
    """``importlib.import_module(module)``, or an ImportError naming the extra that installs ``package``."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(f"{package} is not installed ({error}). Fix: {EXPORT_INSTALL_HINT}") from error
