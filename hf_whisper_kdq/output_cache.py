"""Bounded on-disk caches of frozen models' outputs, so that epochs after the first skip those passes.

The teacher is frozen, and so is a student's encoder under ``freeze_encoder`` (its weights and, when it is
quantized, its clipping): on a CPU their passes are most of a training step. Two caches share one folder and one
size bound:

* :class:`EncoderOutputCache`: a frozen encoder's last hidden state per utterance, stored in fp16 (1,500 × 512
  values for whisper-base: 1.5 MB instead of 3.1 MB), or in int8 with a scale per frame (0.8 MB) when the training
  set would not fit the bound in fp16 (a 6,220-row set: 9.6 GB in fp16, 4.8 GB in int8; what the rounding changes:
  benchmarks/README.md, "Output caches for six thousand utterances");
* :class:`TeacherOutputCache`: the teacher's decoder hidden states per training row (utterance and label tokens),
  which spares its whole decoder: as much as the student's forward and backward together for a 2-decoder-layer
  student of whisper-base, because every decoder layer projects 1,500 encoder frames. Its logits are not stored
  (51,865 fp32 values, 207 KB, per position) but recomputed from its last decoder state by its frozen output layer:
  the same numbers, 14 KB per position for whisper-base.

Entries are keyed by the exact inputs of one row *and* a fingerprint of the model (weights and quantization specs),
so a different model, checkpoint, bit width, audio or transcript never hits another's entry, and a rerun of the
same training finds every entry again. Each entry is one safetensors file written atomically (temp + rename) that
records the fingerprint of the model that computed it; an unreadable entry, or one of another model (a copied or
colliding folder), is recomputed and rewritten, never used. When the folder grows past its bound, the least
recently used entries are removed, with a warning that says how to make the training set fit.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers.modeling_outputs import Seq2SeqLMOutput

from .config import ENCODER_CACHE_PRECISIONS
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


def _gb(n_bytes: float) -> str:
    return f"{n_bytes / 1e9:.2f} GB"


class CacheFolder:
    """One cache folder and its size bound, shared by every cache that writes into it (one byte count)."""

    def __init__(self, root: str | os.PathLike, max_bytes: int):
        self.root, self.max_bytes = Path(root), max_bytes
        self.bytes = sum(f.stat().st_size for f in self.root.glob("*/*/*.safetensors"))
        self.evicted = 0  # entries removed by the bound in this run

    def added(self, size: int) -> None:
        self.bytes += size
        if self.bytes <= self.max_bytes:
            return
        if not self.evicted:  # once: every later write evicts too
            logger.warning(
                "the output cache %s reached its bound of %s: its least recently used entries are removed, and the "
                "rows they held are computed again when they come back (every epoch when the training set does not "
                "fit). Fix: raise --encoder_cache_max_gb (the projected size of each cache is logged when it starts "
                "filling), point --encoder_cache_dir at a disk with room, or turn a cache off "
                "(--cache_encoder_outputs false / --cache_teacher_outputs false)",
                self.root,
                _gb(self.max_bytes),
            )
        for entry in sorted(self.root.glob("*/*/*.safetensors"), key=lambda f: f.stat().st_mtime):
            if self.bytes <= 0.9 * self.max_bytes:
                break
            size = entry.stat().st_size
            entry.unlink(missing_ok=True)
            self.bytes -= size
            self.evicted += 1


class _OutputCache:
    """Per-row entries (a dict of tensors) of one frozen model, in ``folder/<fingerprint[:16]>/``.

    Args:
        folder: cache folder (or a shared :class:`CacheFolder`).
        model: the frozen model whose outputs are cached.
        max_bytes: size bound of the whole folder (all models together), when ``folder`` is a path.
        expected_rows: rows of the training set, for the progress log and the projected size; None: unknown.
    """

    # What an entry holds, part of its key: entries written with another meaning are never read back.
    LAYOUT = ""
    # What the progress log calls these entries.
    NAME = ""

    def __init__(
        self,
        folder: str | os.PathLike | CacheFolder,
        model: torch.nn.Module,
        max_bytes: int | None = None,
        *,
        expected_rows: int | None = None,
    ):
        if not isinstance(folder, CacheFolder) and max_bytes is None:
            raise TypeError("give max_bytes (the folder's size bound) with a folder path, or a shared CacheFolder")
        self.fingerprint, self.state = module_fingerprint(model), module_state(model)
        self.store = folder if isinstance(folder, CacheFolder) else CacheFolder(folder, max_bytes)
        self.root = self.store.root
        self.folder = self.root / self.fingerprint[:16]
        self.folder.mkdir(parents=True, exist_ok=True)
        self.hits = self.misses = 0
        self.expected_rows = expected_rows
        self.entries = sum(1 for _ in self.folder.glob("*/*.safetensors"))  # rows cached, by any run
        self.written_bytes = self.written_rows = 0  # by this run
        if self.entries:
            logger.info("%s: reusing the %d rows cached in %s", self.NAME, self.entries, self.folder)

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
        new = not path.exists()  # else a damaged or foreign entry, rewritten
        with atomic_file(path) as temporary:
            save_file(
                {**{k: v.detach().cpu().contiguous() for k, v in tensors.items()}, "fingerprint": fingerprint},
                str(temporary),
            )
        size = path.stat().st_size
        self._progress(size, new)
        self.store.added(size)

    def _progress(self, size: int, new: bool) -> None:
        """Log the projected size at the first write of this run, then every tenth of the training set."""
        first = not self.written_bytes
        self.written_bytes += size
        self.entries += new
        self.written_rows += new
        expected = self.expected_rows
        if first and expected:
            projected = size * expected
            logger.info(
                "%s: caching about %.1f KB per row, %s for the %d training rows (folder bound %s)",
                self.NAME,
                size / 1e3,
                _gb(projected),
                expected,
                _gb(self.store.max_bytes),
            )
            if projected > self.store.max_bytes:
                logger.warning(
                    "%s would need about %s for the %d training rows, more than the cache's bound of %s: rows "
                    "beyond it are computed again every epoch. Fix: --encoder_cache_max_gb %.0f or more (on a disk "
                    "with room: --encoder_cache_dir), or fewer training rows",
                    self.NAME,
                    _gb(projected),
                    expected,
                    _gb(self.store.max_bytes),
                    projected * 1.15 / 1e9 + 1,
                )
        step = max(1, expected // 10) if expected else 500
        if new and self.written_rows % step == 0:
            # Progress counts this run's rows: the folder also holds rows of earlier runs on other data.
            logger.info(
                "%s: %d%s rows cached by this run (%s; the folder: %d rows, %s of %s)",
                self.NAME,
                self.written_rows,
                f" of {expected}" if expected else "",
                _gb(self.written_bytes),
                self.entries,
                _gb(self.store.bytes + size),
                _gb(self.store.max_bytes),
            )

    def _lookup(self, paths: list[Path], required: tuple[str, ...]) -> tuple[list, list[int]]:
        cached = [self._read(path) for path in paths]
        cached = [entry if entry is not None and all(k in entry for k in required) else None for entry in cached]
        missing = [i for i, entry in enumerate(cached) if entry is None]
        self.hits += len(paths) - len(missing)
        self.misses += len(missing)
        return cached, missing


def int8_per_frame(hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., frames, width] -> (int8 codes, fp32 scale per frame): symmetric, the frame's largest value at 127."""
    scale = hidden.float().abs().amax(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny) / 127
    return (hidden.float() / scale).round().clamp(-127, 127).to(torch.int8), scale


class EncoderOutputCache(_OutputCache):
    """``encode(encoder, features) -> last_hidden_state`` with per-utterance entries on disk.

    ``precision`` "fp16" stores fp16 (an entry whose outputs overflow fp16 stays fp32); "int8" stores int8 codes with
    one scale per frame, half those bytes; "auto" (the default) takes fp16 unless the training set's projected fp16
    entries exceed the folder's bound, and int8 then (what each changes in the losses: benchmarks/README.md, "Output
    caches for six thousand utterances"). A row computed now is returned as it is stored, so that the first epoch
    sees the same encoder outputs as the later ones and as a rerun.
    """

    NAME = "encoder outputs"

    def __init__(self, *args, precision: str = "auto", **kwargs):
        if precision not in ENCODER_CACHE_PRECISIONS:
            raise ValueError(f"precision {precision!r}: choose one of {', '.join(ENCODER_CACHE_PRECISIONS)}")
        super().__init__(*args, **kwargs)
        self.precision = precision

    @property
    def LAYOUT(self) -> str:  # noqa: N802 (the base class's name for an entry's meaning, part of its key)
        return "last hidden state, fp16 where finite" if self.precision == "fp16" else "last hidden state, int8/frame"

    def _choose_precision(self, encoder: torch.nn.Module, features: torch.Tensor) -> None:
        """Resolve "auto" from the first batch's shape: fp16 while the projected training set fits the bound."""
        if self.precision != "auto":
            return
        if not self.expected_rows:  # a training set of unknown size: nothing to project
            self.precision = "fp16"
            return
        frames, width = features.shape[-1] // 2, encoder.config.d_model  # Whisper's second conv has stride 2
        projected = self.expected_rows * frames * width * 2
        self.precision = "int8" if projected > self.store.max_bytes else "fp16"
        if self.precision == "int8":
            logger.info(
                "%s: %d rows in fp16 would take about %s, over the cache's bound of %s: storing int8 with a scale "
                "per frame (half the bytes; --encoder_cache_precision fp16 to keep fp16, with a larger "
                "--encoder_cache_max_gb)",
                self.NAME,
                self.expected_rows,
                _gb(projected),
                _gb(self.store.max_bytes),
            )

    def _stored(self, hidden: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The entry of one row and the values it gives back."""
        if self.precision == "int8":
            codes, scale = int8_per_frame(hidden)
            entry = {"codes": codes, "scale": scale}
        else:
            stored = hidden.half()
            entry = {"last_hidden_state": stored if bool(stored.isfinite().all()) else hidden}
        return entry, self._values(entry)

    @staticmethod
    def _values(entry: dict[str, torch.Tensor]) -> torch.Tensor:
        return entry["codes"].float() * entry["scale"] if "codes" in entry else entry["last_hidden_state"]

    @torch.no_grad()
    def encode(self, encoder: torch.nn.Module, features: torch.Tensor) -> torch.Tensor:
        """[B, mels, frames] features -> [B, frames / 2, d_model] encoder output, from disk where cached."""
        self._choose_precision(encoder, features)
        paths = [self._path(row) for row in features]
        required = ("codes", "scale") if self.precision == "int8" else ("last_hidden_state",)
        cached, missing = self._lookup(paths, required)
        values = [None if entry is None else self._values(entry) for entry in cached]
        if missing:
            computed = encoder(features[missing]).last_hidden_state
            for i, hidden in zip(missing, computed):
                entry, values[i] = self._stored(hidden)
                self._write(paths[i], entry)
        parameter = next(encoder.parameters())
        return torch.stack([value.to(parameter.device, parameter.dtype) for value in values])


@dataclass
class CachedTeacherOutput(Seq2SeqLMOutput):
    """The teacher's outputs as :class:`TeacherOutputCache` gives them: ``logits`` (None where only the top-k form
    is asked for) and ``decoder_hidden_states`` as the teacher's forward returns them, and with
    ``teacher_cache_top_k`` the stored top-k form: ``top_logits`` and ``top_indices`` [..., k] (the k largest
    logits and their token ids) and ``log_normaliser`` [...] (logsumexp of all logits / temperature)."""

    top_logits: torch.FloatTensor | None = None
    top_indices: torch.LongTensor | None = None
    log_normaliser: torch.FloatTensor | None = None


def output_logits(teacher: torch.nn.Module, last_state: torch.Tensor) -> torch.Tensor:
    """[..., D] last decoder layer's output (before the final layer norm) -> [..., V] logits, as the teacher's
    forward computes them."""
    return teacher.proj_out(teacher.model.decoder.layer_norm(last_state))


class TeacherOutputCache(_OutputCache):
    """The teacher's decoder hidden states per row, at the row's positions up to its last label; its logits are
    recomputed from them (:func:`output_logits`).

    A row's entry covers its decoder positions up to its last label that is not ``-100``: with causal
    self-attention they do not depend on the padding after them, so an entry serves the row in any batch. The
    positions after it (padding, masked out of every loss) are returned as zeros. The decoder states are the
    teacher's ``decoder_hidden_states`` with the last one its last layer's output *before* the final layer norm
    (what ``forwards`` distils, and what :func:`output_logits` turns into logits).

    Args:
        top_k: 0 (exact): the logits are recomputed from the stored states. k > 0: entries also keep the k largest
            logits, their token ids and the log-normaliser at ``temperature``, which the k + 1-bucket distillation
            loss (``losses.top_k_distillation_loss``) reads instead of recomputing the output layer.
        temperature: the distillation temperature of that log-normaliser (part of the key with ``top_k``).
        (and those of :class:`_OutputCache`)
    """

    NAME = "teacher outputs"

    def __init__(self, *args, top_k: int = 0, temperature: float = 1.0, **kwargs):
        if top_k < 0:
            raise ValueError(f"top_k must be ≥ 0 (0: exact logits), got {top_k}")
        self.top_k, self.temperature = top_k, float(temperature)
        self.LAYOUT = "decoder states, the last before the final layer norm" + (
            f"; top {top_k} logits, log-normaliser at T={self.temperature!r}" if top_k else ""
        )
        super().__init__(*args, **kwargs)

    def _compute(
        self, teacher: torch.nn.Module, encoder_hidden: torch.Tensor, decoder_input_ids: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        """The teacher decoder's hidden states, the last one taken before the final layer norm (whatever hooks the
        caller has on the teacher)."""
        captured = []
        handle = teacher.model.decoder.layer_norm.register_forward_pre_hook(
            lambda module, args: captured.append(args[0])
        )
        try:
            states = teacher.model(
                encoder_outputs=(encoder_hidden,), decoder_input_ids=decoder_input_ids, output_hidden_states=True
            ).decoder_hidden_states
        finally:
            handle.remove()
        return (*states[:-1], captured[-1])

    def _top(self, teacher: torch.nn.Module, last_state: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = output_logits(teacher, last_state).float()
        top = logits.topk(self.top_k, dim=-1)
        return {
            "top_logits": top.values,
            "top_indices": top.indices.int(),  # 4 bytes: Whisper's vocabulary fits
            "log_normaliser": torch.logsumexp(logits / self.temperature, dim=-1),
        }

    @torch.no_grad()
    def forward(
        self,
        teacher: torch.nn.Module,
        features: torch.Tensor,
        encode: Callable[[list[int]], torch.Tensor],
        decoder_input_ids: torch.Tensor,
        labels: torch.Tensor,
        *,
        logits_at: torch.Tensor | None = None,
        exact_logits: bool = True,
    ) -> CachedTeacherOutput:
        """The teacher's outputs on a batch, from disk where cached.

        Args:
            teacher: the frozen teacher.
            features: [B, mels, frames] (part of each row's key).
            encode: rows (batch indices) -> their [len(rows), S, D] teacher encoder outputs; called for the rows
                the cache misses only, so that the teacher's encoder need not run (or be cached) for the others.
            decoder_input_ids: [B, T].
            labels: [B, T], ``-100`` where nothing is predicted.
            logits_at: [B, T] bool inside the labelled positions: ``logits`` (and the top-k fields) are then only
                those positions' rows, packed ``[N, V]`` as ``forwards.StudentTeacherForwards`` packs them.
            exact_logits: recompute ``logits``; False (with ``top_k``) leaves them None.

        Returns:
            ``logits`` [B, T, V] (or packed [N, V]), ``decoder_hidden_states`` (num_layers + 1 tensors [B, T, D]),
            and with ``top_k`` the top-k fields of :class:`CachedTeacherOutput`.
        """
        labelled = labels.ne(IGNORE_INDEX)
        if logits_at is not None and bool((logits_at & ~labelled).any()):
            raise ValueError("logits_at must select labelled positions only: the cache holds no others")
        positions = torch.arange(1, labels.shape[1] + 1, device=labels.device)
        lengths = (labelled * positions).amax(dim=1).tolist()  # 1 + the last labelled position; 0 for none
        paths = [self._path(features[i], decoder_input_ids[i, :n]) for i, n in enumerate(lengths)]
        required = ("decoder_hidden_states", "top_logits") if self.top_k else ("decoder_hidden_states",)
        cached, missing = self._lookup(paths, required)
        if missing:
            states = torch.stack(self._compute(teacher, encode(missing), decoder_input_ids[missing]), dim=2)
            for row, i in enumerate(missing):
                entry = {"decoder_hidden_states": states[row, : lengths[i]]}  # [n, num_layers + 1, D]
                if self.top_k:
                    entry |= self._top(teacher, entry["decoder_hidden_states"][:, -1])
                cached[i] = entry
                self._write(paths[i], entry)

        def batched(key: str) -> torch.Tensor:
            """[B, T, ...] of one entry field, zeros after each row's positions."""
            shape = cached[0][key].shape[1:]
            out = cached[0][key].new_zeros(len(cached), labels.shape[1], *shape, device=labels.device)
            for i, (entry, n) in enumerate(zip(cached, lengths)):
                out[i, :n] = entry[key].to(labels.device)
            return out

        states = batched("decoder_hidden_states")
        covered = positions.le(torch.tensor(lengths, device=labels.device)[:, None])  # [B, T]: the entries' positions
        at = covered if logits_at is None else logits_at

        def shaped(packed: torch.Tensor) -> torch.Tensor:
            """Rows at ``at`` -> as asked: packed [N, ...], or [B, T, ...] with zeros elsewhere."""
            if logits_at is not None:
                return packed
            return packed.new_zeros(*labels.shape, *packed.shape[1:]).index_put_((at,), packed)

        out = CachedTeacherOutput(decoder_hidden_states=tuple(states.unbind(2)))
        if exact_logits:
            out.logits = shaped(output_logits(teacher, states[at][:, -1]))
        if self.top_k:
            out.top_logits = shaped(batched("top_logits")[at])
            out.top_indices = shaped(batched("top_indices")[at].long())
            out.log_normaliser = shaped(batched("log_normaliser")[at])
        return out
