"""Bounded on-disk caches of frozen models' outputs, so that epochs after the first skip those passes.

The teacher is frozen, and so is a student's encoder under ``freeze_encoder`` (its weights and, when it is
quantized, its clipping): on a CPU their passes are most of a training step. Two caches share one folder and one
size bound:

* :class:`EncoderOutputCache`: a frozen encoder's last hidden state per utterance;
* :class:`TeacherOutputCache`: the teacher's logits and decoder hidden states per training row (utterance and
  label tokens), which spares its whole decoder: as much as the student's forward and backward together for a
  2-decoder-layer student of whisper-base, because every decoder layer projects 1,500 encoder frames.

Entries are keyed by the exact inputs of one row *and* a fingerprint of the model (weights and quantization specs),
so a different model, checkpoint, bit width, audio or transcript never hits another's entry. Each entry is one
safetensors file written atomically (temp + rename) that records the fingerprint of the model that computed it; an
unreadable entry, or one of another model (a copied or colliding folder), is recomputed and rewritten, never used.
When the folder grows past its bound, the least recently used entries are removed.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers.modeling_outputs import Seq2SeqLMOutput

from .files import atomic_file
from .losses import IGNORE_INDEX
from .quant import quant_specs

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


def module_state(module: torch.nn.Module) -> tuple:
    """What changes when a module's weights are updated in place (parameter version counters, bumped by any
    in-place write such as an optimizer step or a checkpoint load) or its quantization specs change: a cheap check,
    per step, that a cache still describes the module."""
    return (tuple((id(p), p._version) for p in module.parameters()), tuple(map(str, quant_specs(module).values())))


class CacheFolder:
    """One cache folder and its size bound, shared by every cache that writes into it (one byte count)."""

    def __init__(self, root: str | os.PathLike, max_bytes: int):
        self.root, self.max_bytes = Path(root), max_bytes
        self.bytes = sum(f.stat().st_size for f in self.root.glob("*/*/*.safetensors"))

    def added(self, size: int) -> None:
        self.bytes += size
        if self.bytes > self.max_bytes:
            for entry in sorted(self.root.glob("*/*/*.safetensors"), key=lambda f: f.stat().st_mtime):
                if self.bytes <= 0.9 * self.max_bytes:
                    break
                size = entry.stat().st_size
                entry.unlink(missing_ok=True)
                self.bytes -= size


class _OutputCache:
    """Per-row entries (a dict of tensors) of one frozen model, in ``folder/<fingerprint[:16]>/``."""

    # What an entry holds, part of its key: entries written with another meaning are never read back.
    LAYOUT = ""

    def __init__(self, folder: str | os.PathLike | CacheFolder, model: torch.nn.Module, max_bytes: int | None = None):
        if not isinstance(folder, CacheFolder) and max_bytes is None:
            raise TypeError("give max_bytes (the folder's size bound) with a folder path, or a shared CacheFolder")
        self.fingerprint, self.state = module_fingerprint(model), module_state(model)
        self.store = folder if isinstance(folder, CacheFolder) else CacheFolder(folder, max_bytes)
        self.root = self.store.root
        self.folder = self.root / self.fingerprint[:16]
        self.folder.mkdir(parents=True, exist_ok=True)
        self.hits = self.misses = 0

    def describes(self, model: torch.nn.Module) -> bool:
        """False once ``model`` changed since this cache was made for it (a new cache, new fingerprint, is due)."""
        return module_state(model) == self.state

    def _path(self, *inputs: torch.Tensor) -> Path:
        digest = hashlib.sha1(self.LAYOUT.encode())
        # The precision the outputs are computed in belongs to the key: bf16 outputs are not an fp32 run's.
        device = inputs[0].device.type
        if torch.is_autocast_enabled(device):
            digest.update(f"autocast:{torch.get_autocast_dtype(device)}".encode())
        for tensor in inputs:
            digest.update(f"{tensor.dtype}:{tuple(tensor.shape)}".encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        key = digest.hexdigest()
        return self.folder / key[:2] / f"{key}.safetensors"

    def _read(self, path: Path) -> dict[str, torch.Tensor] | None:
        try:
            tensors = load_file(path)
        except FileNotFoundError:
            return None
        except Exception as error:  # truncated or corrupt file: recompute, never use it
            logger.warning("cache entry %s is unreadable (%s): recomputing it", path.name, error)
            return None
        fingerprint = tensors.pop("fingerprint", None)
        if fingerprint is None or bytes(fingerprint.tolist()).hex() != self.fingerprint:
            logger.warning("cache entry %s is not from this model: recomputing it", path.name)
            return None
        os.utime(path)  # recency for the LRU bound
        return tensors

    def _write(self, path: Path, tensors: dict[str, torch.Tensor]) -> None:
        fingerprint = torch.frombuffer(bytearray(bytes.fromhex(self.fingerprint)), dtype=torch.uint8)
        with atomic_file(path) as temporary:
            save_file(
                {**{k: v.detach().cpu().contiguous() for k, v in tensors.items()}, "fingerprint": fingerprint},
                str(temporary),
            )
        self.store.added(path.stat().st_size)

    def _lookup(self, paths: list[Path], required: str) -> tuple[list, list[int]]:
        cached = [self._read(path) for path in paths]
        cached = [entry if entry is not None and required in entry else None for entry in cached]
        missing = [i for i, entry in enumerate(cached) if entry is None]
        self.hits += len(paths) - len(missing)
        self.misses += len(missing)
        return cached, missing


class EncoderOutputCache(_OutputCache):
    """``encode(encoder, features) -> last_hidden_state`` with per-utterance entries on disk.

    Args:
        folder: cache folder (or a shared :class:`CacheFolder`); entries of one encoder live in
            ``folder/<fingerprint[:16]>/``.
        encoder: the frozen encoder whose outputs are cached.
        max_bytes: size bound of the whole folder (all models together), when ``folder`` is a path.
    """

    @torch.no_grad()
    def encode(self, encoder: torch.nn.Module, features: torch.Tensor) -> torch.Tensor:
        """[B, mels, frames] features -> [B, frames / 2, d_model] encoder output, from disk where cached."""
        paths = [self._path(row) for row in features]
        cached, missing = self._lookup(paths, "last_hidden_state")
        if missing:
            computed = encoder(features[missing]).last_hidden_state
            for i, hidden in zip(missing, computed):
                cached[i] = {"last_hidden_state": hidden}
                self._write(paths[i], cached[i])
        parameter = next(encoder.parameters())
        return torch.stack([entry["last_hidden_state"].to(parameter.device, parameter.dtype) for entry in cached])


class TeacherOutputCache(_OutputCache):
    """The teacher's logits and decoder hidden states per row, for the row's labelled positions.

    A row's entry covers its decoder positions up to its last label that is not ``-100``: with causal
    self-attention they do not depend on the padding after them, so an entry serves the row in any batch. The
    positions after it (padding, masked out of every loss) are returned as zeros. The decoder states are whatever
    the teacher returns while it is called: the trainer makes the last one its last layer's output before the
    final layer norm.
    """

    LAYOUT = "decoder states: the last one before the final layer norm"

    @torch.no_grad()
    def forward(
        self,
        teacher: torch.nn.Module,
        features: torch.Tensor,
        encoder_hidden: torch.Tensor,
        decoder_input_ids: torch.Tensor,
        labels: torch.Tensor,
        logits_at: torch.Tensor | None = None,
    ) -> Seq2SeqLMOutput:
        """Outputs of ``teacher(encoder_outputs=encoder_hidden, decoder_input_ids=..., output_hidden_states=True)``:
        ``logits`` [B, T, V] and ``decoder_hidden_states`` (num_layers + 1 tensors [B, T, D]). With ``logits_at``
        ([B, T] bool, inside the labelled positions), ``logits`` are only those positions' rows, packed ``[N, V]``
        as ``forwards.StudentTeacherForwards`` packs them."""
        labelled = labels.ne(IGNORE_INDEX)
        positions = torch.arange(1, labels.shape[1] + 1, device=labels.device)
        lengths = (labelled * positions).amax(dim=1).tolist()  # 1 + the last labelled position; 0 for none
        paths = [self._path(features[i], decoder_input_ids[i, :n]) for i, n in enumerate(lengths)]
        cached, missing = self._lookup(paths, "logits")
        if missing:
            out = teacher(
                encoder_outputs=(encoder_hidden[missing],),
                decoder_input_ids=decoder_input_ids[missing],
                output_hidden_states=True,
            )
            for row, i in enumerate(missing):
                n = lengths[i]
                cached[i] = {
                    "logits": out.logits[row, :n],
                    "decoder_hidden_states": torch.stack([h[row, :n] for h in out.decoder_hidden_states]),
                }
                self._write(paths[i], cached[i])
        batch, length = decoder_input_ids.shape
        first = cached[0]
        hidden = first["decoder_hidden_states"].new_zeros(
            first["decoder_hidden_states"].shape[0],
            batch,
            length,
            first["decoder_hidden_states"].shape[-1],
            device=labels.device,
        )
        for i, (entry, n) in enumerate(zip(cached, lengths)):
            hidden[:, i, :n] = entry["decoder_hidden_states"].to(labels.device)
        if logits_at is not None:
            if bool((logits_at & ~labelled).any()):
                raise ValueError("logits_at must select labelled positions only: the cache holds no others")
            logits = torch.cat(
                [
                    entry["logits"].to(labels.device)[logits_at[i, :n]]
                    for i, (entry, n) in enumerate(zip(cached, lengths))
                ]
            )
        else:
            logits = first["logits"].new_zeros(batch, length, first["logits"].shape[-1], device=labels.device)
            for i, (entry, n) in enumerate(zip(cached, lengths)):
                logits[i, :n] = entry["logits"].to(labels.device)
        return Seq2SeqLMOutput(logits=logits, decoder_hidden_states=tuple(hidden))
