"""A bounded on-disk cache of frozen encoder outputs, so that epochs after the first never re-run the encoder.

The teacher's encoder is frozen, and so is a student's under ``freeze_encoder`` (its weights and, when it is
quantized, its clipping): on a CPU those encoder passes are most of a training step. Entries are keyed by the
exact input features of one utterance *and* a fingerprint of the encoder (weights and quantization specs), so a
different model, checkpoint, bit width or audio never hits another's entry. Each entry is one safetensors file
written atomically (temp + rename) that records the fingerprint of the encoder that computed it; an unreadable
entry, or one of another encoder (a copied or colliding folder), is recomputed and rewritten, never used. When the folder grows past ``max_bytes``, the
least recently used entries are removed.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .quant import quant_specs
from .sources import atomic_file

logger = logging.getLogger(__name__)


def module_fingerprint(module: torch.nn.Module) -> str:
    """SHA-1 over every parameter's name, dtype, shape and bytes, and the quantization spec of every fake-quantized
    layer (≈ 0.1 s for whisper-base's encoder)."""
    digest = hashlib.sha1()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    for name, spec in quant_specs(module).items():
        digest.update(f"{name}:{spec}".encode())
    return digest.hexdigest()


class EncoderOutputCache:
    """``encode(encoder, features) -> last_hidden_state`` with per-utterance entries on disk.

    Args:
        folder: cache folder; entries of one encoder live in ``folder/<fingerprint[:16]>/``.
        encoder: the frozen encoder whose outputs are cached.
        max_bytes: size bound of the whole folder (all encoders together).
    """

    def __init__(self, folder: str | os.PathLike, encoder: torch.nn.Module, max_bytes: int):
        self.fingerprint = module_fingerprint(encoder)
        self.root = Path(folder)
        self.folder = self.root / self.fingerprint[:16]
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.hits = self.misses = 0
        self._bytes = sum(f.stat().st_size for f in self.root.glob("*/*/*.safetensors"))

    def _path(self, features: torch.Tensor) -> Path:
        key = hashlib.sha1(features.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()
        return self.folder / key[:2] / f"{key}.safetensors"

    def _read(self, path: Path) -> torch.Tensor | None:
        try:
            tensors = load_file(path)
        except FileNotFoundError:
            return None
        except Exception as error:  # truncated or corrupt file: recompute, never use it
            logger.warning("encoder cache entry %s is unreadable (%s): recomputing it", path.name, error)
            return None
        hidden, fingerprint = tensors.get("last_hidden_state"), tensors.get("fingerprint")
        if hidden is None or fingerprint is None or bytes(fingerprint.tolist()).hex() != self.fingerprint:
            logger.warning("encoder cache entry %s is not from this encoder: recomputing it", path.name)
            return None
        os.utime(path)  # recency for the LRU bound
        return hidden

    def _write(self, path: Path, hidden: torch.Tensor) -> None:
        fingerprint = torch.frombuffer(bytearray(bytes.fromhex(self.fingerprint)), dtype=torch.uint8)
        with atomic_file(path) as temporary:
            save_file({"last_hidden_state": hidden.contiguous(), "fingerprint": fingerprint}, str(temporary))
        self._bytes += path.stat().st_size
        if self._bytes > self.max_bytes:
            self._evict()

    def _evict(self) -> None:
        entries = sorted(self.root.glob("*/*/*.safetensors"), key=lambda f: f.stat().st_mtime)
        for entry in entries:
            if self._bytes <= 0.9 * self.max_bytes:
                break
            size = entry.stat().st_size
            entry.unlink(missing_ok=True)
            self._bytes -= size

    @torch.no_grad()
    def encode(self, encoder: torch.nn.Module, features: torch.Tensor) -> torch.Tensor:
        """[B, mels, frames] features -> [B, frames / 2, d_model] encoder output, from disk where cached."""
        paths = [self._path(row) for row in features]
        cached = [self._read(path) for path in paths]
        missing = [i for i, hidden in enumerate(cached) if hidden is None]
        self.hits += len(paths) - len(missing)
        self.misses += len(missing)
        if missing:
            computed = encoder(features[missing]).last_hidden_state
            for i, hidden in zip(missing, computed):
                cached[i] = hidden
                self._write(paths[i], hidden.cpu())
        parameter = next(encoder.parameters())
        return torch.stack([h.to(parameter.device, parameter.dtype) for h in cached])
