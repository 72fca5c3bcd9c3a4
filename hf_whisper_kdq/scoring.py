"""Text normalization and WER/CER scoring, as in the Whisper paper, and the ``compute_metrics`` of a
``Seq2SeqTrainer`` that scores generated transcripts the same way (:func:`make_compute_metrics`).

Both sides are normalized before scoring: English with Whisper's ``EnglishTextNormalizer``, languages written
without spaces (zh, ja, th ...) at the character level, others with ``BasicTextNormalizer``. For Mandarin, Whisper
writes traditional characters and Arabic numerals ("2008年") while AISHELL references are simplified with numbers
spelled out ("二零零八年"): both are mapped to simplified (OpenCC ``t2s``) and Chinese numerals (cn2an, plus the
reading rules of :func:`chinese_numerals`).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import re
import unicodedata
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jiwer
import numpy as np
import regex
from transformers.models.whisper.english_normalizer import BasicTextNormalizer, EnglishTextNormalizer

from . import data

# Scored by character error rate, as in the Whisper paper (plus Cantonese, written like Mandarin).
CER_LANGUAGES = data.UNSPACED_LANGUAGES
# The Mandarin path (traditional -> simplified, Arabic -> Chinese numerals) applies to these.
CHINESE_LANGUAGES = frozenset({"zh", "yue"})


# --- Normalization -------------------------------------------------------------------------------------
def language_code(language: str) -> str:
    """``"en"``, ``"English"``, ``"zh-CN"``, ``"mandarin"``, ``"<|zh|>"`` -> Whisper's code; ValueError if unknown."""
    text = language.strip().removeprefix("<|").removesuffix("|>") if isinstance(language, str) else ""
    code = data.language_code(text)
    if code is None:
        raise ValueError(f"unknown language {language!r}: use a Whisper language code such as 'en', 'zh' or 'ja'")
    return code


def uses_cer(language: str) -> bool:
    """True where words are not separated by spaces and the error rate is counted in characters."""
    return language_code(language) in CER_LANGUAGES


def _english_spelling_mapping_file() -> Path | None:
    """OpenAI's British -> American spelling table, ``english.json``: the Hub repos' ``normalizer.json`` (the
    tokenizer's ``english_spelling_normalizer``), absent from offline packs and CTranslate2 folders. It ships
    unchanged in ``whisper-normalizer`` and ``openai-whisper``, located here without importing them."""
    for package in ("whisper_normalizer", "whisper"):
        spec = importlib.util.find_spec(package)  # top-level names: None when absent, nothing imported
        for location in (spec.submodule_search_locations or []) if spec else []:
            if (candidate := Path(location) / "normalizers" / "english.json").is_file():
                return candidate
    return None


@functools.lru_cache(maxsize=1)
def english_spelling_mapping() -> dict[str, str]:
    path = _english_spelling_mapping_file()
    if path is None:
        message = "Whisper's English spelling table (english.json) was not found: British and American spellings "
        warnings.warn(message + "count as errors. Fix: pip install whisper-normalizer", stacklevel=2)
        return {}
    return json.loads(path.read_text(encoding="utf-8"))


@functools.lru_cache(maxsize=1)
def _english_normalizer() -> EnglishTextNormalizer:
    return EnglishTextNormalizer(english_spelling_mapping())


_basic_normalizer = BasicTextNormalizer()


@functools.lru_cache(maxsize=1)
def _t2s():
    from opencc import OpenCC

    return OpenCC("t2s")


_THOUSANDS_SEPARATOR = re.compile(r"(?<=[0-9]),(?=[0-9]{3}(?![0-9]))")
_FRACTION = re.compile(r"([0-9]+)/([0-9]+)")
_RANGE = re.compile(r"(?<=[0-9])\s*[-~～]\s*(?=[0-9])")  # 25-35岁: 二十五到三十五岁
_NUMBER = re.compile(r"[0-9]+(?:\.[0-9]+)?%?")
_LIANG_BEFORE = set("个元块辆次位只年天倍人家条种岁周台部张件项场批百千万亿")
_DIGIT_NAMES = str.maketrans("0123456789", "零一二三四五六七八九")
_BRACKETED = re.compile(r"\[[^\]]*\]|<[^>]*>|\([^)]*\)")  # [Music], <unk>, (laughs); NFKC maps （） to ()


def _cardinal(number: str) -> str:
    """``cn2an.an2cn`` ("3.5" -> "三点五"), with 两 leading 千/万/亿 as spoken ("2000" -> "两千")."""
    import cn2an

    text = cn2an.an2cn(number, "low")
    return "两" + text[1:] if re.match(r"二[千万亿]", text) else text


def _spell_number(match: re.Match) -> str:
    token, after = match.group(0), match.string[match.end() : match.end() + 1]
    if token.endswith("%"):
        return "百分之" + _cardinal(token[:-1])
    integer = token.partition(".")[0]
    if token == "2" and after in _LIANG_BEFORE and match.string[match.start() - 1 : match.start()] != "第":
        return "两"  # 两个, 两万, 两年 (but 第二, 二月)
    if (
        (len(integer) == 4 and "." not in token and after in ("年", "底"))  # years: 二零零八年, 二零一六底
        or (len(integer) == 2 and after == "后")  # generations: 九零后, 零零后
        or (len(integer) > 1 and integer.startswith("0"))  # codes: 015
        or len(integer) > 12  # phone and ID numbers
    ):
        return token.translate(_DIGIT_NAMES)
    return _cardinal(token)


def chinese_numerals(text: str) -> str:
    """Arabic -> Chinese numerals as AISHELL spells them (rules checked on whisper-base's AISHELL output):
    years and generations digit by digit ("2008年" -> "二零零八年", "90后" -> "九零后"), other numbers as
    cardinals ("30年" -> "三十年", "2,000元" -> "两千元", "3.5" -> "三点五"), "50%" -> "百分之五十", "1/2" ->
    "二分之一", "25-35" -> "二十五到三十五". (cn2an's ``transform`` reads any number before 年 digit by digit.)"""
    if not any("0" <= ch <= "9" for ch in text):
        return text
    text = _RANGE.sub("到", _THOUSANDS_SEPARATOR.sub("", text))
    text = _FRACTION.sub(lambda m: f"{_cardinal(m.group(2))}分之{_cardinal(m.group(1))}", text)
    return _NUMBER.sub(_spell_number, text)


def normalize_cjk(text: str, language: str = "zh") -> str:
    """The character-level path: NFKC (full-width -> ASCII), lower case, bracketed tags removed, for
    Chinese t2s and numerals, then punctuation and all spaces removed."""
    text = _BRACKETED.sub("", unicodedata.normalize("NFKC", text).lower())
    if language_code(language) in CHINESE_LANGUAGES:
        text = chinese_numerals(_t2s().convert(text))
    # Drop punctuation, symbols, spaces and controls; keep marks (Thai and Burmese vowels are marks).
    return "".join(ch for ch in text if unicodedata.category(ch)[0] not in "PSZC")


def normalize_text(text: str | None, language: str, *, keep_parenthesized: bool = False) -> str:
    """Normalize for scoring: English with Whisper's ``EnglishTextNormalizer`` (spelling table included),
    character-scored languages with :func:`normalize_cjk` (no spaces), others with ``BasicTextNormalizer``.
    Whisper's normalizers drop parenthesized text, which Whisper emits for non-speech ("(upbeat music)"); in
    references parentheses wrap spoken words (LJSpeech), so :func:`score` passes ``keep_parenthesized=True``."""
    code = language_code(language)
    if text is None:
        return ""
    if keep_parenthesized:
        text = re.sub(r"[()（）]", " ", text)
    if code == "en":
        return _english_normalizer()(text).strip()
    if code in CER_LANGUAGES:
        return normalize_cjk(text, code)
    return re.sub(r"\s+", " ", _basic_normalizer(text)).strip()


# --- Scoring -------------------------------------------------------------------------------------------
def _units(normalized: str, cer: bool) -> list[str]:
    """Words, or for CER grapheme clusters (a Thai consonant with its vowel marks is one character)."""
    return regex.findall(r"\X", re.sub(r"\s+", "", normalized)) if cer else normalized.split()


def _counts(reference: list[str], hypothesis: list[str]) -> dict[str, int]:
    if not reference or not hypothesis:  # jiwer 3 refuses empty references
        return {"substitutions": 0, "deletions": len(reference), "insertions": len(hypothesis), "hits": 0}
    # jiwer's default transform splits on spaces: units are joined with spaces, so characters score as words.
    out = jiwer.process_words(" ".join(reference), " ".join(hypothesis))
    return {key: getattr(out, key) for key in ("substitutions", "deletions", "insertions", "hits")}


def error_rate(errors: int, n_reference: int) -> float:
    """errors / reference length; with an empty reference, 0.0 when nothing was inserted, else 1.0."""
    return errors / n_reference if n_reference else float(errors > 0)


def score(
    references: Sequence[str | None],
    hypotheses: Sequence[str | None],
    language: str,
    *,
    normalize: bool = True,
    per_utterance: bool = False,
) -> dict[str, Any]:
    """Corpus-level WER (CER where :func:`uses_cer`): errors summed over utterances / total reference length.

    Returns ``metric``, ``wer`` or ``cer``, jiwer's ``substitutions``/``deletions``/``insertions``/``hits``,
    ``errors``, ``n_reference_words`` or ``n_reference_chars``, ``n_utterances``, ``n_empty_references`` and
    with ``per_utterance`` the normalized texts and errors of each. Empty references count as all insertions."""
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses: pass one per reference")
    code = language_code(language)
    cer = code in CER_LANGUAGES
    metric = "cer" if cer else "wer"
    # jiwer directly: `evaluate.load("wer")` fetches its metric script from the Hub, which fails offline.
    totals = dict.fromkeys(("substitutions", "deletions", "insertions", "hits"), 0)
    n_reference, n_empty, records = 0, 0, []
    for reference, hypothesis in zip(references, hypotheses):
        ref_text = normalize_text(reference, code, keep_parenthesized=True) if normalize else (reference or "")
        hyp_text = normalize_text(hypothesis, code) if normalize else (hypothesis or "")
        ref_units, hyp_units = _units(ref_text, cer), _units(hyp_text, cer)
        counts = _counts(ref_units, hyp_units)
        for key, value in counts.items():
            totals[key] += value
        n_reference += len(ref_units)
        n_empty += not ref_units
        if per_utterance:
            errors = counts["substitutions"] + counts["deletions"] + counts["insertions"]
            records.append(
                {
                    "normalized_reference": ref_text,
                    "normalized_hypothesis": hyp_text,
                    "errors": errors,
                    "n_reference": len(ref_units),
                    "error_rate": error_rate(errors, len(ref_units)),
                }
            )
    errors = totals["substitutions"] + totals["deletions"] + totals["insertions"]
    result: dict[str, Any] = {
        "metric": metric,
        metric: error_rate(errors, n_reference),
        **totals,
        "errors": errors,
        f"n_reference_{'chars' if cer else 'words'}": n_reference,
        "n_utterances": len(references),
        "n_empty_references": n_empty,
    }
    if per_utterance:
        result["utterances"] = records
    return result


# --- Trainer metrics -----------------------------------------------------------------------------------
def make_compute_metrics(processor, language: str | Sequence[str] = "en"):
    """A ``compute_metrics`` for ``Seq2SeqTrainer(predict_with_generate=True)``: normalized WER (or CER) of the
    generated transcripts against the labels.

    Args:
        processor: the model's ``WhisperProcessor`` (its tokenizer decodes predictions and labels).
        language: the evaluation set's language, or one language per example in evaluation order; the
            metric is reported per language (``wer_en``, ``cer_zh``) and, for one language, also as
            ``wer`` / ``cer``.
    """
    tokenizer = processor.tokenizer

    def compute_metrics(prediction) -> dict[str, float]:
        predictions, labels = prediction.predictions, prediction.label_ids
        if isinstance(predictions, tuple):
            predictions = predictions[0]
        if np.ndim(predictions) != 2:
            raise ValueError(
                "compute_metrics scores generated transcripts, but received logits: set predict_with_generate=True "
                "in the training arguments (and generation_max_length)"
            )
        pad = tokenizer.pad_token_id
        predictions = np.where(predictions < 0, pad, predictions)
        labels = np.where(labels < 0, pad, labels)
        hypotheses = tokenizer.batch_decode(predictions, skip_special_tokens=True)
        references = tokenizer.batch_decode(labels, skip_special_tokens=True)
        languages = [language] * len(references) if isinstance(language, str) else list(language)
        if len(languages) != len(references):
            raise ValueError(f"{len(languages)} languages given for {len(references)} evaluation examples")
        metrics = {}
        for code in sorted(set(languages)):
            rows = [i for i, lang in enumerate(languages) if lang == code]
            result = score([references[i] for i in rows], [hypotheses[i] for i in rows], code)
            metrics[f"{result['metric']}_{language_code(code)}"] = result[result["metric"]]
        if len(metrics) == 1:
            ((name, value),) = metrics.items()
            metrics[name.split("_")[0]] = value
        return metrics

    return compute_metrics
