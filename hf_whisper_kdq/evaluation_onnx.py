"""Run and evaluate ONNX Runtime folders written by ``export.onnx.export_onnx``, into the same
:class:`~hf_whisper_kdq.evaluation.EvaluationReport` as ``evaluation.evaluate_model``::

    from hf_whisper_kdq.evaluation_onnx import OnnxWhisper, evaluate_onnx

    whisper = OnnxWhisper("kdq-onnx/", threads=2)
    texts = whisper.transcribe(["audio.wav"], "en")
    report = evaluate_onnx("kdq-onnx/", load_manifest("dev.jsonl"), threads=2)

Decoding matches ``evaluation.transcribe`` (greedy, no timestamps, one 30 s window): the prompt is Whisper's
start token, language and task tokens and ``<|notimestamps|>`` (start and ``<|notimestamps|>`` for an English-only
model), the generation config's ``suppress_tokens`` are never chosen and its ``begin_suppress_tokens`` not first,
and decoding stops at the end-of-text token or at Whisper's 448 positions. A ``None`` language is detected from the
first step's language-token logits. ``onnxruntime`` is optional: ``pip install "hf-whisper-kdq[onnx]"``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .audio import SAMPLING_RATE, as_audio_array
from .evaluation import EvaluationReport, ManifestRows, language_codes
from .export.onnx import DECODER_FILE, ENCODER_FILE, EXPORT_FILE, onnx_file_bytes
from .optional import ONNX_INSTALL_HINT, import_optional

__all__ = ["OnnxWhisper", "evaluate_onnx", "transcribe_onnx"]


class OnnxWhisper:
    """The two sessions of an ONNX export and the processor and generation config decoding needs."""

    def __init__(self, folder: str | os.PathLike, *, threads: int = 0):
        """``threads``: onnxruntime's intra-op threads (0: its default, one per core)."""
        ort = import_optional("onnxruntime", "onnxruntime", ONNX_INSTALL_HINT)
        from transformers import GenerationConfig, WhisperConfig, WhisperProcessor

        self.folder = Path(folder)
        if not (self.folder / ENCODER_FILE).is_file() or not (self.folder / DECODER_FILE).is_file():
            raise FileNotFoundError(f"{folder} holds no {ENCODER_FILE} and {DECODER_FILE}: export one with export_onnx")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only: the contrib ops' shape-inference notes are not warnings

        def session(name: str):
            return ort.InferenceSession(str(self.folder / name), options, providers=["CPUExecutionProvider"])

        self.encoder, self.decoder = session(ENCODER_FILE), session(DECODER_FILE)
        self.config = WhisperConfig.from_pretrained(self.folder)
        self.generation_config = GenerationConfig.from_pretrained(self.folder)
        self.processor = WhisperProcessor.from_pretrained(self.folder)
        self.n_layers = self.config.decoder_layers
        heads = self.config.decoder_attention_heads
        self._empty_cache = np.zeros((1, heads, 0, self.config.d_model // heads), dtype=np.float32)
        vocab = self.config.vocab_size
        self._suppressed = self._mask(self.generation_config.suppress_tokens, vocab)
        self._suppressed_first = self._suppressed | self._mask(self.generation_config.begin_suppress_tokens, vocab)

    @staticmethod
    def _mask(tokens, vocab: int) -> np.ndarray:
        mask = np.zeros(vocab, dtype=bool)
        mask[[t for t in tokens or () if t < vocab]] = True
        return mask

    @property
    def multilingual(self) -> bool:
        return getattr(self.generation_config, "is_multilingual", True)

    def _step(self, ids: np.ndarray, past: list[np.ndarray], cross: list[np.ndarray]) -> tuple[np.ndarray, list]:
        feeds = {"input_ids": ids}
        for i in range(self.n_layers):
            feeds[f"past_key.{i}"], feeds[f"past_value.{i}"] = past[2 * i], past[2 * i + 1]
            feeds[f"cross_key.{i}"], feeds[f"cross_value.{i}"] = cross[2 * i], cross[2 * i + 1]
        logits, *present = self.decoder.run(None, feeds)
        return logits[0, -1], present

    def _prompt(self, code: str | None, cross: list[np.ndarray]) -> list[int]:
        config = self.generation_config
        start = config.decoder_start_token_id
        if not self.multilingual:
            if code not in (None, "en"):
                raise ValueError(f"this model is English-only: it cannot transcribe {code!r}")
            return [start, config.no_timestamps_token_id]
        if code is None:  # detect: the most likely language token after the start token
            logits, _ = self._step(np.array([[start]]), [self._empty_cache] * 2 * self.n_layers, cross)
            language_ids = list(config.lang_to_id.values())
            language = language_ids[int(np.argmax(logits[language_ids]))]
        else:
            token = f"<|{code}|>"
            if token not in config.lang_to_id:
                raise ValueError(f"this model cannot transcribe language {code!r}")
            language = config.lang_to_id[token]
        return [start, language, config.task_to_id["transcribe"], config.no_timestamps_token_id]

    def generate(
        self, input_features: np.ndarray, language: str | None, max_new_tokens: int | None = None
    ) -> list[int]:
        """Greedy token ids (prompt excluded) for one utterance's ``input_features`` ``[1, n_mels, 3000]``."""
        cross = self.encoder.run(None, {"input_features": input_features.astype(np.float32)})
        prompt = self._prompt(language, cross)
        limit = self.config.max_target_positions - len(prompt)
        limit = limit if max_new_tokens is None else min(limit, max_new_tokens)
        ids, past, generated = np.array([prompt]), [self._empty_cache] * 2 * self.n_layers, []
        eos = self.generation_config.eos_token_id
        while len(generated) < limit:
            logits, past = self._step(ids, past, cross)
            logits[self._suppressed_first if not generated else self._suppressed] = -np.inf
            token = int(np.argmax(logits))
            if token == eos:
                break
            generated.append(token)
            ids = np.array([[token]])
        return generated

    def transcribe(
        self, audios: Sequence[Any], languages: str | Sequence[str | None] | None = None, *, max_new_tokens=None
    ) -> list[str]:
        """Transcribe ``audios`` (16 kHz arrays, paths or datasets audio dicts) one by one; ``languages`` one code
        for all, one per audio, or None to detect. Audio over 30 s is cut to its first 30 s window."""
        extractor, tokenizer = self.processor.feature_extractor, self.processor.tokenizer
        texts = []
        for audio, code in zip(audios, language_codes(languages, len(audios))):
            features = extractor(as_audio_array(audio), sampling_rate=SAMPLING_RATE, return_tensors="np").input_features
            ids = self.generate(features, code, max_new_tokens)
            texts.append(tokenizer.decode(ids, skip_special_tokens=True).strip())
        return texts


def transcribe_onnx(
    folder, audios: Sequence[Any], languages=None, *, threads: int = 0, max_new_tokens=None
) -> list[str]:
    """:meth:`OnnxWhisper.transcribe` of the export in ``folder`` (or of an ``OnnxWhisper``)."""
    whisper = folder if isinstance(folder, OnnxWhisper) else OnnxWhisper(folder, threads=threads)
    return whisper.transcribe(audios, languages, max_new_tokens=max_new_tokens)


def evaluate_onnx(
    folder: str | os.PathLike, dataset, *, threads: int = 0, max_new_tokens: int | None = None, warmup: bool = True
) -> EvaluationReport:
    """``evaluation.evaluate_model`` for an ONNX export: the same manifest dataset, scoring, per corpus and per
    language entries and real-time factor (audio read before the clock starts; one warm-up utterance off the
    clock). Size: the bytes of the two graphs; ``batch_size`` 1."""
    rows = ManifestRows.of(dataset)
    whisper = OnnxWhisper(folder, threads=threads)
    summary = json.loads((Path(folder) / EXPORT_FILE).read_text(encoding="utf-8"))
    report = EvaluationReport(
        model=str(folder),
        n_parameters=summary["n_parameters"],
        model_size_bytes=onnx_file_bytes(folder),
        model_size_source="disk",
        batch_size=1,
        num_beams=1,
        device="cpu",
        dtype="onnxruntime",
        n_unlabeled_skipped=rows.unlabeled,
    )

    def transcriber(arrays, code: str, warmup: bool) -> list[str]:
        return whisper.transcribe(arrays, code, max_new_tokens=8 if warmup else max_new_tokens)

    return rows.transcribe_and_score(report, transcriber, warmup=warmup)
