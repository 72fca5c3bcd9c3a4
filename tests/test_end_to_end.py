"""End to end, the "done when" of the export work, on a tiny random Whisper with the real multilingual tokenizer:

1. DistillQuantTrainer trains a 2-decoder-layer student of a 4-decoder-layer teacher on tone/noise rows under a
   size budget (mixed bits), then ``evaluate()`` generates and scores WER with ``make_compute_metrics``;
2. ``trainer.save_compressed`` writes a packed checkpoint that a fresh Python process loads with plain
   transformers + compressed-tensors, without importing this package, and generates the same ids;
3. the CTranslate2 int8 copy transcribes with faster-whisper;
4. ``write_model_card`` writes README.md + figure holding the evaluation's scores and nothing local;
5. ``trainer.push_to_hub()`` commits exactly the checkpoint, card and figure to a local Hub stand-in.

One module-scoped training run (about 5 s of training); the whole file takes well under 90 s on 2 CPU cores.
"""

from __future__ import annotations

import copy
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import soundfile as sf
import torch
from torch import nn

pytest.importorskip("compressed_tensors", minversion="0.20")
from conftest import WITHOUT_OUR_PACKAGE, make_tiny_whisper  # noqa: E402
from hub_standin import HubStandIn  # noqa: E402
from huggingface_hub import ModelCard  # noqa: E402
from safetensors import safe_open  # noqa: E402
from transformers import logging as hf_logging  # noqa: E402

from hf_whisper_kdq.adapters import ADAPTERS_ATTRIBUTE  # noqa: E402
from hf_whisper_kdq.card import build_model_card, write_model_card  # noqa: E402
from hf_whisper_kdq.config import DistillQuantArguments  # noqa: E402
from hf_whisper_kdq.data import SAMPLING_RATE, WhisperDataCollator, manifest_dataset, prepare_dataset  # noqa: E402
from hf_whisper_kdq.quant import convert_qat  # noqa: E402
from hf_whisper_kdq.scoring import make_compute_metrics  # noqa: E402
from hf_whisper_kdq.students import build_student  # noqa: E402
from hf_whisper_kdq.trainer import DistillQuantTrainer  # noqa: E402

TEACHER_ID = "openai/whisper-base"
REPO = "kdq-org/whisper-tiny-kdq"
FAKE_TOKEN = "hf_EndToEndStandInToken0123456789abcdef"
ROWS = [  # (id, audio kind, seconds, frequency, text)
    ("tone-440", "tone", 1.0, 440.0, " a low tone"),
    ("tone-660", "tone", 0.8, 660.0, " a higher tone"),
    ("noise", "noise", 0.7, None, " some noise"),
    ("tone-330", "tone", 1.2, 330.0, " the lowest tone"),
]
EVAL_ROWS = [0, 2]
GENERATE = dict(language="en", task="transcribe", max_new_tokens=6, do_sample=False, num_beams=1)
EXPORTED_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "preprocessor_config.json",
    "processor_config.json",
    "compression_report.json",
    "kdq_plan.json",
}


def tone(seconds: float = 1.0, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * SAMPLING_RATE)) / SAMPLING_RATE
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _audio(kind: str, seconds: float, freq: float | None) -> np.ndarray:
    if kind == "tone":
        return tone(seconds, freq)
    return (0.05 * np.random.default_rng(0).standard_normal(int(seconds * SAMPLING_RATE))).astype(np.float32)


def _wav(audio: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, audio, SAMPLING_RATE, format="WAV", subtype="FLOAT")
    return buffer.getvalue()


def _budget_mb(student: nn.Module, average_bits: float) -> float:
    """About ``average_bits`` per quantizable layer weight (+ one fp16 scale per group of 32), the rest fp16."""
    total = sum(p.numel() for p in student.parameters())
    linears = sum(
        m.weight.numel() for name, m in student.named_modules() if isinstance(m, nn.Linear) and ".layers." in name
    )
    return ((total - linears) * 2 + linears * average_bits / 8 + linears / 32 * 2) / 1e6


@pytest.fixture(scope="module")
def run(base_pack_folder, tmp_path_factory):
    """Train, evaluate with generation and save the packed checkpoint once for the module."""
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    root = tmp_path_factory.mktemp("end_to_end")
    teacher, processor = make_tiny_whisper(base_pack_folder, decoder_layers=4)
    # Named as from_pretrained("openai/whisper-base") names it: push_to_hub's card takes the base model from here.
    teacher.config.name_or_path = TEACHER_ID
    student = build_student(teacher, decoder_layers=2)

    audios = [_audio(kind, seconds, freq) for _, kind, seconds, freq, _ in ROWS]
    raw = manifest_dataset(
        {
            "id": [row[0] for row in ROWS],
            "corpus": ["tones"] * len(ROWS),
            "language": ["en"] * len(ROWS),
            "audio": [{"bytes": _wav(a), "path": None} for a in audios],
            "duration": [len(a) / SAMPLING_RATE for a in audios],
            "text": [row[4] for row in ROWS],
        }
    )
    prepared, report = prepare_dataset(raw, processor, multilingual=True)
    assert report.rows_kept == len(ROWS)

    args = DistillQuantArguments(
        output_dir=str(root / "training"),
        per_device_train_batch_size=2,
        per_device_eval_batch_size=2,
        max_steps=2,
        learning_rate=1e-3,
        warmup_steps=0,
        seed=0,
        report_to="none",
        use_cpu=True,
        logging_steps=1,
        disable_tqdm=True,
        # a checkpoint of the training state, so that the output folder holds what a push must leave out
        save_strategy="steps",
        save_steps=2,
        quant_targets="encoder,decoder",
        size_budget_mb=_budget_mb(student, 3.5),
        # the local rule always mixes widths under this budget (the default may keep a uniform plan of lower probe
        # KL): the mixed-width export path is what this module tests
        selection_cost="local_error",
        quant_weight=0.1,
        selection_probe_batches=1,
        predict_with_generate=True,
        generation_max_length=8,
        hub_model_id=REPO,
        hub_token=FAKE_TOKEN,
    )
    trainer = DistillQuantTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=prepared,
        eval_dataset=prepared.select(EVAL_ROWS),
        processing_class=processor,
        data_collator=WhisperDataCollator(processor, decoder_start_token_id=student.config.decoder_start_token_id),
        compute_metrics=make_compute_metrics(processor, "en"),
    )
    trainer.train()
    metrics = trainer.evaluate()
    export = trainer.save_compressed(root / "export").folder
    yield {"trainer": trainer, "processor": processor, "metrics": metrics, "export": export, "root": root}
    hf_logging.set_verbosity(verbosity)


def _converted(trainer) -> tuple[nn.Module, dict]:
    """The trainer's student as the export means it: a deep copy with its quantization baked in (convert_qat)."""
    model = copy.deepcopy(trainer.accelerator.unwrap_model(trainer.model)).cpu().eval()
    if hasattr(model, ADAPTERS_ATTRIBUTE):
        delattr(model, ADAPTERS_ATTRIBUTE)
    return model, convert_qat(model)


# ---- 1. training and evaluation ----------------------------------------------------------------------------


def test_training_under_budget_and_generate_evaluation(run):
    trainer, metrics = run["trainer"], run["metrics"]
    plan = trainer.plan
    bits = {u.bits for u in plan.units if u.modules}
    assert len(bits) > 1 and max(bits) < 16, plan  # mixed integer bits: the budget forced some layers down
    assert plan.size_bytes <= plan.budget_bytes
    assert any(u.distilled for u in plan.units)
    assert {"eval_wer_en", "eval_wer", "eval_loss", "eval_loss_kd"} <= set(metrics)
    assert metrics["eval_wer_en"] == metrics["eval_wer"] >= 0
    checkpoint = Path(trainer.args.output_dir) / "checkpoint-2"
    assert (checkpoint / "optimizer.pt").is_file() and (checkpoint / "trainer_state.json").is_file()


# ---- 2. the packed checkpoint, loaded without this package --------------------------------------------------

LOADER = (
    WITHOUT_OUR_PACKAGE
    + r"""
import contextlib, io, json, runpy
import numpy as np, torch
from transformers import WhisperForConditionalGeneration, WhisperProcessor

folder, work = sys.argv[1], sys.argv[2]
# The model card's transformers snippet, as a user runs it (its repo id pointed at the folder).
printed = io.StringIO()
with contextlib.redirect_stdout(printed):
    runpy.run_path(f"{work}/snippet.py", run_name="__main__")

processor = WhisperProcessor.from_pretrained(folder)
tone = np.load(f"{work}/tone.npy")
np.save(f"{work}/tone_features.npy", processor(tone, sampling_rate=16000, return_tensors="np").input_features)
features = torch.from_numpy(np.load(f"{work}/features.npy"))
model = WhisperForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
quantized = sum(hasattr(m, "quantization_scheme") for m in model.modules())
if getattr(model, "hf_quantizer", None) is not None:  # a mixed-width file; as the card says, before generate
    model.hf_quantizer.compressor.decompress_model(model)
with torch.no_grad():
    ids = model.generate(features, language="en", task="transcribe", max_new_tokens=6, do_sample=False, num_beams=1)
    logits = model(input_features=features, decoder_input_ids=ids).logits
np.save(f"{work}/ids.npy", ids.numpy())
np.save(f"{work}/logits.npy", logits.numpy())
json.dump({"quantized_modules": quantized, "texts": processor.batch_decode(ids, skip_special_tokens=True),
           "snippet_output": printed.getvalue(), "compressed_tensors": "compressed_tensors" in sys.modules,
           "hf_whisper_kdq": sorted(m for m in sys.modules if m.partition(".")[0] == "hf_whisper_kdq")},
          open(f"{work}/loaded.json", "w"))
"""
)


def _fixed_features(processor) -> torch.Tensor:
    """The 1 s tone as the processor sees it, plus three random log-mel inputs (seeded)."""
    generator = torch.Generator().manual_seed(1)
    heard = torch.from_numpy(processor(tone(), sampling_rate=SAMPLING_RATE, return_tensors="np").input_features)
    return torch.cat([heard, torch.randn(3, 80, 3000, generator=generator)])


def _eval_rows(metrics: dict) -> list[dict]:
    return [
        {
            "corpus": "tones",
            "language": "en",
            "metric": "wer",
            "error_rate": metrics["eval_wer_en"],
            "n_utterances": len(EVAL_ROWS),
        }
    ]


def _card_snippet(run, folder: Path) -> str:
    """The card's transformers snippet, loading ``folder`` instead of the Hub repo (decoding at most 8 tokens)."""
    report = json.loads((run["export"] / "compression_report.json").read_text())
    card = build_model_card(
        plan=run["trainer"].plan,
        compression_report=report,
        teacher_id=TEACHER_ID,
        eval_results={"compressed": _eval_rows(run["metrics"])},
        repo_id=REPO,
    )
    code = re.findall(r"```python\n(.*?)```", card.text, re.S)[0]
    assert f'repo = "{REPO}"' in code and 'task="transcribe",' in code
    return code.replace(f'repo = "{REPO}"', f"repo = {str(folder)!r}").replace(
        'task="transcribe",', 'task="transcribe", max_new_tokens=8,'
    )


def test_export_folder_and_quantization_config(run):
    export = run["export"]
    assert EXPORTED_FILES <= {p.name for p in export.iterdir()}
    config = json.loads((export / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["quantization_status"] == "compressed"
    planned = {u.bits for u in run["trainer"].plan.units if u.modules}
    assert {group["weights"]["num_bits"] for group in qc["config_groups"].values()} == planned
    with safe_open(str(export / "model.safetensors"), "pt") as file:
        keys = list(file.keys())
    assert any(k.endswith(".weight_packed") for k in keys)
    assert not [k for k in keys if "weight_clip" in k or k.startswith(ADAPTERS_ATTRIBUTE)]
    assert not [k for k in keys if k.startswith("model.decoder.layers.") and int(k.split(".")[3]) >= 2]  # no teacher
    report = json.loads((export / "compression_report.json").read_text())
    assert report["weights_bytes"] == (export / "model.safetensors").stat().st_size
    assert json.loads((export / "kdq_plan.json").read_text())["units"]


def test_plain_transformers_generates_the_students_ids(run, tmp_path):
    trainer, processor, export = run["trainer"], run["processor"], run["export"]
    features = _fixed_features(processor)
    np.save(tmp_path / "features.npy", features.numpy())
    np.save(tmp_path / "tone.npy", tone())
    sf.write(tmp_path / "audio.wav", tone(), SAMPLING_RATE)  # what the card's snippet transcribes
    (tmp_path / "snippet.py").write_text(_card_snippet(run, export))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    result = subprocess.run(
        [sys.executable, "-c", LOADER, str(export), str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    loaded = json.loads((tmp_path / "loaded.json").read_text())
    assert loaded["hf_whisper_kdq"] == [] and loaded["compressed_tensors"]
    assert loaded["snippet_output"].endswith("\n")  # the snippet printed its transcript (any text: random model)
    assert loaded["quantized_modules"] == sum(len(u.modules) for u in trainer.plan.units if u.bits < 16)
    assert np.array_equal(np.load(tmp_path / "tone_features.npy"), features[:1].numpy())  # same processor
    ids = torch.from_numpy(np.load(tmp_path / "ids.npy"))

    # The trainer's student with its quantization baked in (convert_qat), in fp32: the same greedy ids.
    converted, codes = _converted(trainer)
    with torch.no_grad():
        expected = converted.generate(features, **GENERATE)
        logits = converted(input_features=features, decoder_input_ids=ids).logits
    assert torch.equal(ids, expected)
    # The file holds the packed layers exactly and every other tensor in fp16, so the loaded logits differ from
    # the fp32 student's by that rounding only (2**-11 relative per float weight): measured 3.5e-4 on logits of
    # magnitude ~1. The tolerance leaves 10x room yet stays far below the smallest top-1/top-2 gap, which is
    # why the greedy ids above agree exactly.
    loaded_logits = torch.from_numpy(np.load(tmp_path / "logits.npy"))
    torch.testing.assert_close(loaded_logits, logits, rtol=0, atol=5e-3)
    top2 = logits.topk(2, dim=-1).values
    assert (top2[..., 0] - top2[..., 1]).min() > 10 * 5e-3

    # Rounding the student's float tensors through fp16 as the file does gives the loaded model bit for bit:
    # only the order of floating-point reductions may differ between processes.
    packed = {n for n in codes if isinstance(converted.get_submodule(n), nn.Linear) and n != "proj_out"}
    with torch.no_grad():
        for name, param in converted.named_parameters():
            if not (name.endswith(".weight") and name.removesuffix(".weight") in packed):
                param.copy_(param.half().float())
        exact = converted(input_features=features, decoder_input_ids=ids).logits
    torch.testing.assert_close(loaded_logits, exact, rtol=0, atol=1e-5)
    assert loaded["texts"] == processor.batch_decode(ids, skip_special_tokens=True)


# ---- 3. CTranslate2 / faster-whisper -----------------------------------------------------------------------


def test_ctranslate2_int8_copy_transcribes(run):
    pytest.importorskip("ctranslate2")
    pytest.importorskip("faster_whisper")
    from hf_whisper_kdq.evaluation_ctranslate2 import transcribe_faster_whisper
    from hf_whisper_kdq.export.ctranslate2 import export_ctranslate2

    trainer = run["trainer"]
    student = trainer.accelerator.unwrap_model(trainer.model)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    folder = export_ctranslate2(student, run["processor"], run["export"] / "ctranslate2", quantization="int8")
    assert {"model.bin", "config.json", "tokenizer.json", "preprocessor_config.json"} <= {
        p.name for p in folder.iterdir()
    }
    texts = transcribe_faster_whisper(folder, [tone()], "en", max_new_tokens=8)
    assert len(texts) == 1 and isinstance(texts[0], str)
    after = student.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


# ---- 4. the model card ---------------------------------------------------------------------------------------


def _local_strings(*folders: Path) -> list[str]:
    strings = {tempfile.gettempdir(), str(Path.home())}
    for folder in folders:
        strings |= {str(folder), str(folder.resolve())}
    return sorted(s for s in strings if len(s) > 1)


def test_model_card_with_the_evaluation_scores(run):
    trainer, export, metrics = run["trainer"], run["export"], run["metrics"]
    report = json.loads((export / "compression_report.json").read_text())
    readme = write_model_card(
        export,
        plan=trainer.plan,
        compression_report=report,
        eval_results={"compressed": _eval_rows(metrics)},
        teacher_id=TEACHER_ID,
        training_args=trainer.args,
        datasets=["tones"],
        languages=["en"],
        repo_id=REPO,
    )
    assert readme == export / "README.md"
    assert (export / "kdq_plan.png").read_bytes().startswith(b"\x89PNG")
    card = ModelCard.load(readme)
    assert card.data.base_model == TEACHER_ID and card.data.language == ["en"]
    (result,) = card.data.eval_results
    assert result.metric_type == "wer" and result.dataset_name == "tones"
    assert result.metric_value == round(100 * metrics["eval_wer_en"], 2)
    text = readme.read_text()
    assert "](kdq_plan.png)" in text and f'repo = "{REPO}"' in text
    if (export / "ctranslate2" / "model.bin").is_file():  # exported by the test above: its usage is shown
        assert "from faster_whisper import WhisperModel" in text
    for local in _local_strings(export, run["root"]):
        assert local not in text, local


# ---- 5. Trainer.push_to_hub against the local Hub stand-in ---------------------------------------------------


@pytest.fixture
def hub(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)  # the token must come from args.hub_token
    with HubStandIn() as standin:
        monkeypatch.setenv("HF_ENDPOINT", standin.endpoint)
        yield standin


def test_push_to_hub_commits_checkpoint_card_and_figure_only(run, hub):
    trainer, metrics = run["trainer"], run["metrics"]
    info = trainer.push_to_hub()
    assert hub.unexpected == [] and len(hub.commits) == 1
    assert info.commit_url.startswith(hub.endpoint)
    assert all(r["authorization"] == f"Bearer {FAKE_TOKEN}" for r in hub.requests)
    commit = hub.commits[0]
    assert commit["repo"] == REPO and commit["revision"] == "main"
    files = commit["files"]
    assert set(files) == EXPORTED_FILES | {"README.md", "kdq_plan.png"}
    assert files["kdq_plan.png"].startswith(b"\x89PNG")
    folder = Path(trainer.args.output_dir) / "compressed"
    for name, content in files.items():
        assert content == (folder / name).read_bytes(), name
    # Training-only state stays home: it is in the output folder, but not in the commit.
    training = Path(trainer.args.output_dir)
    assert (training / "checkpoint-2" / "optimizer.pt").is_file()
    assert not [n for n in files if n.endswith((".pt", ".pth", ".bin")) or "trainer_state" in n or "teacher" in n]
    with tempfile.TemporaryDirectory() as scratch:
        (Path(scratch) / "model.safetensors").write_bytes(files["model.safetensors"])
        with safe_open(str(Path(scratch) / "model.safetensors"), "pt") as weights:
            keys = list(weights.keys())
    assert not [k for k in keys if "weight_clip" in k or k.startswith(ADAPTERS_ATTRIBUTE)]
    assert not [k for k in keys if k.startswith("model.decoder.layers.") and int(k.split(".")[3]) >= 2]
    # The card: the last evaluation's scores in model-index, the teacher as base model, nothing local.
    readme = files["README.md"].decode()
    card = ModelCard(readme)
    assert card.data.base_model == TEACHER_ID and card.data.language == ["en"]
    (result,) = card.data.eval_results
    assert result.metric_type == "wer" and result.metric_value == round(100 * metrics["eval_wer_en"], 2)
    assert card.data.model_name == REPO.split("/")[1] and f'repo = "{REPO}"' in readme  # snippets load this repo
    assert FAKE_TOKEN not in readme
    for local in _local_strings(training, run["root"]):
        assert local not in readme, local


def test_push_to_hub_card_metadata_from_kwargs_and_unnamed_teacher(run, hub, monkeypatch):
    trainer = run["trainer"]
    monkeypatch.setattr(trainer.teacher.config, "_name_or_path", "")  # a teacher built in memory has no name
    trainer.push_to_hub(finetuned_from=TEACHER_ID, language="en", dataset_tags="tones")  # HF's own kwargs
    trainer.push_to_hub()
    named, unnamed = (ModelCard(c["files"]["README.md"].decode()).data for c in hub.commits)
    assert named.base_model == TEACHER_ID and named.language == ["en"] and named.datasets == ["tones"]
    assert unnamed.base_model is None  # no made-up Hub id for an unnamed teacher
    assert unnamed.eval_results and unnamed.language == ["en"]


def test_push_to_hub_keeps_what_was_added_to_this_steps_export(run, hub):
    """A CTranslate2 copy (or any file) added to ``compressed/`` after ``save_compressed`` is pushed, not wiped by a
    re-save; a new training step would make the export stale and is re-saved."""
    trainer = run["trainer"]
    folder = trainer.save_compressed(overwrite=True).folder
    (folder / "ctranslate2").mkdir()
    (folder / "ctranslate2" / "notes.txt").write_text("added by the user")
    trainer.push_to_hub()
    assert "ctranslate2/notes.txt" in hub.commits[-1]["files"]
    trainer.state.global_step += 1  # as if training went on
    try:
        trainer.push_to_hub()
    finally:
        trainer.state.global_step -= 1
    assert "ctranslate2/notes.txt" not in hub.commits[-1]["files"] and not (folder / "ctranslate2").exists()
