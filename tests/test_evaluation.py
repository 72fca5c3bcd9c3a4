"""Tests for hf_whisper_kdq.evaluation: batched decoding, reports and the CLI entry."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from transformers import HfArgumentParser

from hf_whisper_kdq import evaluation
from hf_whisper_kdq.data import load_manifest
from hf_whisper_kdq.evaluation import (
    EvaluationArguments,
    EvaluationReport,
    evaluate_model,
    in_memory_bytes,
    model_size,
    run_evaluation,
    score,
    transcribe,
)

RATE = 16000


def tone(seconds: float, freq: float = 300.0, rate: int = RATE) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def write_manifest(folder: Path, rows: list[tuple[str, str, str, float, str | None]]) -> Path:
    """rows: (id, corpus, language, seconds, text); audio files are tones written beside the manifest."""
    lines = []
    for i, (row_id, corpus, language, seconds, text) in enumerate(rows):
        rate = RATE if i % 2 == 0 else 22050  # exercise resampling too
        sf.write(folder / f"{row_id}.wav", tone(seconds, 200 + 50 * i, rate), rate)
        lines.append(
            {
                "id": row_id,
                "corpus": corpus,
                "language": language,
                "audio": f"{row_id}.wav",
                "duration": seconds,
                "text": text,
            }
        )
    path = folder / "manifest.jsonl"
    path.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines), encoding="utf-8")
    return path


class GenerateSpy:
    """Wraps ``model.generate``: records each call's kwargs and batch, and either calls the real method or
    (``fake=True``) returns the tokens of each row's number of audio frames, which identifies the row."""

    def __init__(self, model, processor, fake: bool = False):
        self.real, self.tokenizer, self.fake, self.calls = model.generate, processor.tokenizer, fake, []
        model.generate = self

    def __call__(self, input_features, attention_mask=None, **kwargs):
        frames = attention_mask.sum(-1).tolist()
        self.calls.append(
            {"frames": frames, "shape": tuple(input_features.shape), "dtype": input_features.dtype, **kwargs}
        )
        if not self.fake:
            return self.real(input_features, attention_mask=attention_mask, **kwargs)
        ids = [self.tokenizer(f" {n}", add_special_tokens=False).input_ids for n in frames]
        width = max(map(len, ids))
        eos = self.tokenizer.eos_token_id
        return torch.tensor([row + [eos] * (width - len(row)) for row in ids])


# --- Batched decoding --------------------------------------------------------------------------------


def test_transcribe_groups_sorts_and_restores_order(tiny_whisper):
    model, processor = tiny_whisper
    spy = GenerateSpy(model, processor, fake=True)
    seconds = [0.5, 2.0, 1.0, 3.0, 1.5, 2.5, 0.8]
    languages = ["en", "zh", "en", "en", "zh", "en", None]
    audios = [tone(s) for s in seconds]
    texts = transcribe(model, processor, audios, languages=languages, batch_size=2, progress=False)
    assert texts == [str(int(s * RATE) // 160) for s in seconds]  # each item got its own transcript back
    assert [len(call["frames"]) for call in spy.calls] == [2, 2, 2, 1]  # en: 4 items, zh: 2, detect: 1
    assert [call.get("language") for call in spy.calls] == ["en", "en", "zh", None]
    assert all(call["task"] == "transcribe" and call["num_beams"] == 1 for call in spy.calls)
    frames = [f for call in spy.calls[:2] for f in call["frames"]]
    assert frames == sorted(frames, reverse=True)  # longest first inside a language
    assert all(call["shape"][-1] == 3000 and call["dtype"] == torch.float32 for call in spy.calls)


def test_transcribe_real_decoding_matches_across_batch_sizes(tiny_whisper):
    model, processor = tiny_whisper
    audios = [tone(s, f) for s, f in [(1.0, 200), (2.0, 900), (0.5, 3000)]]
    batched = transcribe(model, processor, audios, languages="zh", batch_size=3, max_new_tokens=4, progress=False)
    single = transcribe(model, processor, audios, languages="zh", batch_size=1, max_new_tokens=4, progress=False)
    assert batched == single and all(isinstance(text, str) and text for text in batched)
    assert transcribe(model, processor, [], progress=False) == []


def test_temperature_fallback_decodes_loops_again_reproducibly(tiny_whisper):
    model, processor = tiny_whisper
    audios = [tone(s, f) for s, f in [(1.0, 200), (2.0, 900), (0.5, 3000)]]
    options = dict(languages="en", batch_size=3, max_new_tokens=24, progress=False)
    greedy = transcribe(model, processor, audios, **options)
    ids = [processor.tokenizer(text, add_special_tokens=False).input_ids for text in greedy]
    ratio = model._retrieve_compression_ratio  # transformers' own measure, the one the fallback thresholds
    assert all(ratio(torch.tensor(row), model.config.vocab_size) > 1.35 for row in ids)  # a random model loops
    spy = GenerateSpy(model, processor)
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    guarded = transcribe(model, processor, audios, temperature_fallback=True, **options)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's generator is left as it was
    assert {k: spy.calls[0][k] for k in evaluation.TEMPERATURE_FALLBACK} == evaluation.TEMPERATURE_FALLBACK
    assert "do_sample" not in spy.calls[0]
    assert guarded != greedy  # the loops were sampled again
    assert transcribe(model, processor, audios, temperature_fallback=True, **options) == guarded  # seeded


def test_transcribe_dtype_follows_model(tiny_whisper):
    model, processor = tiny_whisper
    model.to(torch.bfloat16)
    spy = GenerateSpy(model, processor)
    texts = transcribe(model, processor, [tone(1.0)], languages="en", max_new_tokens=3, progress=False)
    assert spy.calls[0]["dtype"] == torch.bfloat16 and len(texts) == 1


def test_english_only_model_refuses_other_languages(tiny_whisper):
    model, processor = tiny_whisper
    model.generation_config.is_multilingual = False
    with pytest.raises(ValueError, match=r"English-only .*\['zh'\].*multilingual checkpoint"):
        transcribe(model, processor, [tone(1.0), tone(1.0)], languages=["en", "zh"], progress=False)
    with pytest.raises(ValueError, match="English-only models only transcribe"):
        transcribe(model, processor, [tone(1.0)], task="translate", progress=False)
    spy = GenerateSpy(model, processor)
    texts = transcribe(
        model, processor, [tone(1.0), tone(0.5)], languages=["en", None], num_beams=2, max_new_tokens=3, progress=False
    )
    assert len(texts) == 2 and len(spy.calls) == 1
    assert "language" not in spy.calls[0] and "task" not in spy.calls[0] and spy.calls[0]["num_beams"] == 2


def test_transcribe_argument_errors(tiny_whisper):
    model, processor = tiny_whisper
    with pytest.raises(ValueError, match="2 languages for 1 audios"):
        transcribe(model, processor, [tone(1.0)], languages=["en", "zh"], progress=False)
    with pytest.raises(ValueError, match="unknown language 'xx'"):
        transcribe(model, processor, [tone(1.0)], languages="xx", progress=False)
    model.generation_config.lang_to_id = {"<|en|>": 50259}
    with pytest.raises(ValueError, match=r"lang_to_id has no token for language\(s\) \['zh'\]"):
        transcribe(model, processor, [tone(1.0)], languages="zh", progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        transcribe(model, processor, [tone(1.0)], batch_size=0, progress=False)


def test_transcribe_long_form_and_files(tiny_whisper, tmp_path):
    model, processor = tiny_whisper
    sf.write(tmp_path / "short.flac", tone(1.0, rate=22050), 22050)
    spy = GenerateSpy(model, processor)
    texts = transcribe(
        model,
        processor,
        [tone(31.0), str(tmp_path / "short.flac")],
        languages="en",
        batch_size=2,
        max_new_tokens=3,
        progress=False,
    )
    assert len(texts) == 2
    assert spy.calls[0]["return_timestamps"] is True and spy.calls[0]["shape"][-1] > 3000


# --- Reports -----------------------------------------------------------------------------------------


ROWS = [
    ("a1", "synth-a", "en", 1.0, "the quick brown fox"),
    ("a2", "synth-a", "en", 0.6, "jumps over"),
    ("b1", "synth-b", "en", 0.8, "a lazy dog sleeps"),
    ("z1", "synth-zh", "zh", 0.9, "其中有两个"),
    ("z2", "synth-zh", "zh", 0.7, "二零零八年"),
    ("u1", "synth-a", "en", 0.5, None),
]


@pytest.fixture
def manifest(tmp_path) -> Path:
    return write_manifest(tmp_path, ROWS)


def test_evaluate_model_aggregates(tiny_whisper, manifest, monkeypatch):
    """Hypotheses are planted (decoding is not the point here) to check every number of the report."""
    model, processor = tiny_whisper
    planted = {"a1": "the quick brown box", "a2": "jumps over", "b1": "a lazy", "z1": "其中有兩個", "z2": "2008年"}
    by_length = {int(round(seconds * RATE)): planted[row_id] for row_id, *_, seconds, _ in ROWS if row_id in planted}
    calls = []

    def fake_transcribe(model, processor, arrays, *, languages, **kwargs):
        calls.append(languages)
        return [by_length[len(array)] for array in arrays]

    monkeypatch.setattr(evaluation, "transcribe", fake_transcribe)
    report = evaluate_model(
        model, processor, load_manifest(manifest), batch_size=4, num_beams=1, progress=False, warmup=False
    )
    assert calls == ["en", "en", "zh"] and report.n_unlabeled_skipped == 1 and report.n_utterances == 5
    corpora = {entry["corpus"]: entry for entry in report.corpora}
    assert corpora["synth-a"]["wer"] == pytest.approx(1 / 6) and corpora["synth-a"]["n_utterances"] == 2
    assert corpora["synth-b"]["error_rate"] == 0.5 and corpora["synth-b"]["deletions"] == 2
    assert corpora["synth-zh"]["cer"] == 0.0 and corpora["synth-zh"]["n_reference_chars"] == 10
    english = report.languages["en"]
    assert english["macro"] == pytest.approx((1 / 6 + 0.5) / 2) and english["pooled"] == pytest.approx(3 / 10)
    assert english["n_corpora"] == 2 and report.languages["zh"]["metric"] == "cer"
    assert corpora["synth-a"]["audio_seconds"] == pytest.approx(1.6, abs=1e-3)
    assert report.audio_seconds == pytest.approx(4.0, abs=1e-3)
    assert report.rtf == pytest.approx(report.decode_seconds / report.audio_seconds)
    assert report.n_parameters == sum(p.numel() for p in model.parameters())
    assert (report.model_size_bytes, report.model_size_source) == (in_memory_bytes(model), "memory")
    record = next(r for r in report.utterances if r["id"] == "z2")
    assert record["normalized_hypothesis"] == "二零零八年" and record["error_rate"] == 0.0
    table = report.summary_table()
    assert "| synth-b | en | WER | 50.00% | 1 |" in table
    assert "| **all en** | en | WER | 33.33% (pooled 30.00%) | 3 |" in table
    assert "| **all zh** | zh | CER | 0.00% | 2 |" in table and "in-memory tensors" in table


def test_evaluate_model_real_decoding_and_json_round_trip(tiny_whisper, manifest, tmp_path):
    model, processor = tiny_whisper
    weights = tmp_path / "model"
    weights.mkdir()
    (weights / "model.safetensors").write_bytes(b"x" * 100)
    (weights / "training_args.bin").write_bytes(b"x" * 7)
    dataset = load_manifest(manifest, limit=5)
    report = evaluate_model(
        model, processor, dataset, batch_size=2, num_beams=1, max_new_tokens=3, model_path=weights, progress=False
    )
    assert (report.model_size_bytes, report.model_size_source) == (100, "disk")
    assert report.n_utterances == 5 and all(isinstance(r["hypothesis"], str) for r in report.utterances)
    for entry in report.corpora:  # each corpus score is the score of its own utterances
        records = [r for r in report.utterances if r["corpus"] == entry["corpus"]]
        expected = score([r["reference"] for r in records], [r["hypothesis"] for r in records], entry["language"])
        assert entry["error_rate"] == pytest.approx(expected[expected["metric"]])
        assert entry["decode_seconds"] > 0 and entry["rtf"] > 0
    full = EvaluationReport.load_json(report.save_json(tmp_path / "out" / "full.json", per_utterance=True))
    assert full == report
    brief_path = report.save_json(tmp_path / "brief.json")
    assert "utterances" not in json.loads(brief_path.read_text())
    assert EvaluationReport.load_json(brief_path).utterances == []


def test_evaluate_model_on_extracted_features_scores_as_on_audio(tiny_whisper, manifest):
    """Features extracted beforehand (stored in fp16, as the GPU script packs them) decode and score as the audio
    does; ``score=False`` keeps the transcripts unscored, and ``score_transcripts`` later gives the same report."""
    from hf_whisper_kdq.audio import load_audio

    model, processor = tiny_whisper
    dataset = load_manifest(manifest, limit=5)
    options = dict(batch_size=2, max_new_tokens=3, progress=False, warmup=False)
    on_audio = evaluate_model(model, processor, dataset, **options)
    arrays = [load_audio(row["audio"]) for row in dataset]
    features = processor.feature_extractor(arrays, sampling_rate=RATE, return_tensors="pt").input_features.half()
    metadata = dataset.remove_columns("audio")
    later = evaluate_model(model, processor, metadata, features=list(features), score=False, **options)
    assert all("error_rate" not in entry for entry in later.corpora) and later.languages == {}
    assert [u["hypothesis"] for u in later.utterances] == [u["hypothesis"] for u in on_audio.utterances]
    later.score_transcripts()
    assert [
        {k: v for k, v in e.items() if k not in ("audio_seconds", "decode_seconds", "rtf")} for e in later.corpora
    ] == [{k: v for k, v in e.items() if k not in ("audio_seconds", "decode_seconds", "rtf")} for e in on_audio.corpora]
    assert later.utterances == on_audio.utterances and later.audio_seconds == pytest.approx(
        on_audio.audio_seconds, 1e-3
    )
    with pytest.raises(ValueError, match="4 feature rows for 5 dataset rows"):
        evaluate_model(model, processor, metadata, features=list(features[:4]), **options)


def test_model_size(tiny_whisper, tmp_path):
    model, _ = tiny_whisper
    for name, size in [
        ("model-00001-of-00002.safetensors", 10),
        ("pytorch_model.bin", 20),
        ("model.bin.part1", 5),
        ("optimizer.bin", 1000),
        ("training_args.bin", 1000),
        ("config.json", 1000),
    ]:
        (tmp_path / name).write_bytes(b"x" * size)
    assert model_size(model, tmp_path) == (35, "disk")
    assert model_size(model, "openai/whisper-base") == (in_memory_bytes(model), "memory")
    tied = model.model.decoder.embed_tokens.weight
    assert model.proj_out.weight.data_ptr() == tied.data_ptr()  # counted once
    assert in_memory_bytes(model) < sum(t.numel() * 4 for t in model.state_dict().values())


# --- Command line ------------------------------------------------------------------------------------


def test_evaluation_arguments(manifest):
    args = EvaluationArguments("m", str(manifest), languages=" en, Chinese ", corpora="a,,b")
    assert args.languages == "en,zh" and args.corpora == "a,b"
    (parsed,) = HfArgumentParser(EvaluationArguments).parse_args_into_dataclasses(
        [
            "--model_name_or_path",
            "m",
            "--manifest",
            str(manifest),
            "--languages",
            "en,zh",
            "--limit",
            "3",
            "--per_utterance",
            "--output_json",
            "r.json",
        ]
    )
    assert (parsed.languages, parsed.limit, parsed.per_utterance, parsed.batch_size) == ("en,zh", 3, True, 8)
    assert all(f.metadata.get("help") for f in EvaluationArguments.__dataclass_fields__.values())


@pytest.mark.parametrize(
    "overrides, fix",
    [
        ({"manifest": "nowhere.jsonl"}, "--manifest"),
        ({"batch_size": 0}, "--batch_size"),
        ({"num_beams": 0}, "--num_beams"),
        ({"limit": 0}, "--limit"),
        ({"languages": "en,xx"}, "--languages"),
        ({"dtype": "float8"}, "--dtype"),
        ({"max_new_tokens": 1000}, "max_new_tokens"),
        ({"device": "gpu:x"}, "--device"),
        ({"model_name_or_path": " "}, "hf-whisper-kdq evaluate"),
    ],
)
def test_evaluation_arguments_errors_name_the_fix(manifest, overrides, fix):
    values = {"model_name_or_path": "m", "manifest": str(manifest), **overrides}
    with pytest.raises(ValueError, match=fix):
        EvaluationArguments(**values)


def test_run_evaluation(tiny_whisper, manifest, tmp_path, capsys):
    from hf_whisper_kdq.sources import save_whisper

    folder = save_whisper(*tiny_whisper, tmp_path / "tiny")
    args = EvaluationArguments(
        str(folder),
        str(manifest),
        batch_size=4,
        languages="en",
        limit=2,
        max_new_tokens=3,
        temperature_fallback=True,
        output_json=str(tmp_path / "report.json"),
        per_utterance=True,
        progress=False,
    )
    report = run_evaluation(args)
    written = json.loads((tmp_path / "report.json").read_text())
    assert report.temperature_fallback and written["temperature_fallback"]  # the report says how it decoded
    assert report.n_utterances == 2 and len(written["utterances"]) == 2 and list(written["languages"]) == ["en"]
    assert report.model_size_source == "disk"
    assert report.model_size_bytes == (folder / "model.safetensors").stat().st_size
    assert "| **all en** | en | WER |" in capsys.readouterr().out


# --- Real weights ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_whisper_base_on_real_speech(shared_speech):
    from hf_whisper_kdq.sources import PackNotInstalledError, load_whisper

    try:
        model, processor = load_whisper("openai/whisper-base")
    except PackNotInstalledError as error:
        pytest.skip(f"whisper-base weights are not installed: {error}")
    import datasets

    manifest = shared_speech / "dev.jsonl"
    parts = [load_manifest(manifest, languages=[lang], limit=4) for lang in ("en", "zh")]
    dataset = datasets.concatenate_datasets(parts)
    report = evaluate_model(model, processor, dataset, batch_size=4, num_beams=1, progress=False)
    print("\n" + report.summary_table())
    assert report.languages["en"]["n_utterances"] == 4 and report.languages["zh"]["n_utterances"] == 4
    assert report.languages["en"]["pooled"] < 0.25
    assert report.languages["zh"]["pooled"] < 0.25
