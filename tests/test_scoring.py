"""Tests for hf_whisper_kdq.scoring: text normalization (English, Mandarin, others) and WER/CER."""

from __future__ import annotations

import numpy as np
import pytest

from hf_whisper_kdq import scoring
from hf_whisper_kdq.scoring import chinese_numerals, normalize_text, score, uses_cer

# --- Normalization -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Mr. Smith's 2 cats.", "mister smith is 2 cats"),
        ("Mister Smith is two cats", "mister smith is 2 cats"),
        ("The colour of the theatre", "the color of the theater"),  # needs Whisper's spelling table
        ("I'm gonna win, OK?", "i am going to win ok"),
        ("Uh, twenty one [laughs] dollars", "$21"),
        ("Hello,   World!", "hello world"),
    ],
)
def test_english_normalizer(text, expected):
    assert normalize_text(text, "en") == expected
    assert normalize_text(text, "English") == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("這兩個內因指標，叫做「居民」部門。", "这两个内因指标叫做居民部门"),  # t2s, punctuation
        ("2008年", "二零零八年"),  # years digit by digit, as AISHELL writes them
        ("3.5", "三点五"),
        ("50%", "百分之五十"),
        ("增长了3.5%", "增长了百分之三点五"),
        ("15岁", "十五岁"),
        ("2,000元", "两千元"),  # thousands separator dropped; 两 leads 千/万/亿
        ("2个", "两个"),
        ("第2个2月", "第二个二月"),
        ("过去30年", "过去三十年"),  # a duration, not a year (cn2an.transform says 三零年)
        ("90后 00後", "九零后零零后"),
        ("2016底", "二零一六底"),
        ("1.2萬元", "一点二万元"),
        ("25-35岁", "二十五到三十五岁"),
        ("1/2", "二分之一"),
        ("3.30新政", "三点三零新政"),
        ("２０２０年", "二零二零年"),  # full-width digits
        ("电话13812345678901", "电话一三八一二三四五六七八九零一"),  # beyond cn2an's range: digit by digit
        ("Hello 世界 OK!", "hello世界ok"),
        ("(笑声) 我们 [Music]", "我们"),
    ],
)
def test_chinese_normalizer(text, expected):
    assert normalize_text(text, "zh") == expected


def test_chinese_numerals_leave_text_without_digits_alone():
    assert chinese_numerals("二零零八年的房价") == "二零零八年的房价"


def test_references_keep_parenthesized_words():
    reference = "In England about this time, an attempt was made (notably by Caslon)"
    assert normalize_text(reference, "en") == "in england about this time an attempt was made"
    assert normalize_text(reference, "en", keep_parenthesized=True).endswith("made notably by caslon")
    assert score([reference], ["in England about this time an attempt was made, notably by Caslon"], "en")["wer"] == 0
    assert score(["music please"], ["(upbeat music) music please"], "en")["wer"] == 0  # non-speech tags go


def test_other_languages():
    assert normalize_text("Ça va, Monsieur ?", "fr") == "ça va monsieur"
    assert normalize_text("日本語、テスト。3つ", "ja") == "日本語テスト3つ"  # no t2s, no numeral rewriting
    assert normalize_text("ภาษาไทย ครับ!", "th") == "ภาษาไทยครับ"  # vowel marks kept
    assert normalize_text(None, "en") == ""


def test_uses_cer_and_language_codes():
    assert all(uses_cer(lang) for lang in ("zh", "Chinese", "zh-CN", "mandarin", "<|ja|>", "th", "yue", "my", "lo"))
    assert not any(uses_cer(lang) for lang in ("en", "en-US", "fr", "German", "ko"))
    with pytest.raises(ValueError, match="unknown language 'klingon'"):
        uses_cer("klingon")


def test_missing_spelling_table_warns(monkeypatch):
    monkeypatch.setattr(scoring, "_english_spelling_mapping_file", lambda: None)
    scoring.english_spelling_mapping.cache_clear()
    try:
        with pytest.warns(UserWarning, match="pip install whisper-normalizer"):
            assert scoring.english_spelling_mapping() == {}
    finally:
        monkeypatch.undo()
        scoring.english_spelling_mapping.cache_clear()
        scoring._english_normalizer.cache_clear()
    assert len(scoring.english_spelling_mapping()) > 1000


# --- Scoring -----------------------------------------------------------------------------------------


def test_score_one_substitution_in_four_words():
    result = score(["the cat sat down"], ["The bat sat down."], "en")
    assert result["metric"] == "wer" and result["wer"] == 0.25
    assert (result["substitutions"], result["deletions"], result["insertions"], result["hits"]) == (1, 0, 0, 3)
    assert result["n_reference_words"] == 4 and result["errors"] == 1


def test_score_is_corpus_level():
    result = score(["a b c", "d e f g h i j"], ["a c d e", "d e f g h i j"], "en", per_utterance=True)
    assert result["errors"] == 3 and result["n_reference_words"] == 10 and result["wer"] == pytest.approx(0.3)
    first, second = result["utterances"]
    assert first["errors"] == 3 and first["error_rate"] == 1.0 and second["error_rate"] == 0.0
    assert first["normalized_hypothesis"] == "a c d e"


def test_score_chinese_cer():
    reference = "其中有两个是内因的指标"
    assert score([reference], ["其中有兩個是內因的指標。"], "zh")["cer"] == 0.0
    result = score([reference], ["其中有两个是外因的指标"], "zh")
    assert result["metric"] == "cer" and result["n_reference_chars"] == 11
    assert result["cer"] == pytest.approx(1 / 11) and result["substitutions"] == 1
    assert score(["二零零八年的房价上涨了百分之五十"], ["2008年的房價上漲了50%"], "zh")["cer"] == 0.0


def test_score_empty_references():
    only_insertions = score([""], ["a b"], "en")
    assert only_insertions["insertions"] == 2 and only_insertions["wer"] == 1.0
    assert only_insertions["n_empty_references"] == 1
    assert score([""], [None], "en")["wer"] == 0.0
    assert score(["a b", ""], ["a b", "x"], "en")["wer"] == 0.5
    assert score(["a b"], [""], "en")["deletions"] == 2
    with pytest.raises(ValueError, match="one per reference"):
        score(["a"], [], "en")


# --- Trainer metrics ---------------------------------------------------------------------------------


def test_make_compute_metrics_decodes_and_scores(tiny_whisper):
    from transformers import EvalPrediction

    from hf_whisper_kdq.scoring import make_compute_metrics

    _, processor = tiny_whisper
    tokenizer = processor.tokenizer
    references = ["the cat sat on the mat", "hello world again"]
    hypotheses = ["the cat sat on a mat", "hello world again"]
    width = 16

    def encode(texts, pad):
        rows = [tokenizer(" " + t).input_ids for t in texts]
        return np.array([row + [pad] * (width - len(row)) for row in rows])

    prediction = EvalPrediction(
        predictions=encode(hypotheses, tokenizer.pad_token_id), label_ids=encode(references, -100)
    )
    metrics = make_compute_metrics(processor, "en")(prediction)
    assert metrics == {"wer_en": pytest.approx(1 / 9), "wer": pytest.approx(1 / 9)}

    mixed = make_compute_metrics(processor, ["en", "zh"])(prediction)
    assert set(mixed) == {"wer_en", "cer_zh"} and mixed["wer_en"] == pytest.approx(1 / 6)
    with pytest.raises(ValueError, match="languages given"):
        make_compute_metrics(processor, ["en"])(prediction)
    logits = EvalPrediction(predictions=np.zeros((2, width, 8)), label_ids=prediction.label_ids)
    with pytest.raises(ValueError, match="predict_with_generate=True"):
        make_compute_metrics(processor, "en")(logits)
