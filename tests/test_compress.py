"""``hf-whisper-kdq compress``: the whole job, shortened (tiny teacher, a few synthetic utterances, 2 steps)."""

from __future__ import annotations

import json

import pytest
from huggingface_hub import ModelCard
from transformers import HfArgumentParser

from hf_whisper_kdq.cli import main
from hf_whisper_kdq.compress import (
    LEVELS,
    TRAINING_DEFAULTS,
    CompressArguments,
    apply_level,
    warn_untrained_languages,
    with_training_defaults,
)
from hf_whisper_kdq.config import DistillQuantArguments
from hf_whisper_kdq.sources import save_whisper


def test_training_defaults_fill_only_missing_flags():
    argv = with_training_defaults(["--level", "none", "--max_steps", "3", "--output_dir=x"])
    assert argv.count("--max_steps") == 1 and "--output_dir" not in argv
    assert argv[argv.index("--learning_rate") + 1] == TRAINING_DEFAULTS["learning_rate"]


def test_the_int4_level_trains_manifests_on_the_teachers_transcripts_unless_told_otherwise():
    def labels(argv):
        resolved = with_training_defaults(argv)
        return resolved[resolved.index("--train_labels") + 1] if "--train_labels" in resolved else None

    manifest = ["--train_manifest", "a.jsonl,b.jsonl"]
    assert labels(manifest) == labels(["--level", "int4", *manifest]) == "teacher"  # int4 is the default level
    assert labels(["--train_manifest=a.jsonl"]) == "teacher"
    assert labels([]) is None  # the embedded synthetic speech keeps its prompt texts; no manifest, no flag
    assert labels(["--train_manifest", ""]) is None
    assert labels(["--level", "int3", *manifest]) is None
    assert labels([*manifest, "--train_labels", "reference"]) == "reference"
    compress = HfArgumentParser(CompressArguments).parse_args_into_dataclasses(
        with_training_defaults(manifest), return_remaining_strings=True
    )[0]
    assert compress.train_labels == "teacher"


def test_levels_set_budget_and_layers_without_mutating_arguments(tmp_path):
    compress = CompressArguments(level="tiny")
    args = DistillQuantArguments(output_dir=str(tmp_path), report_to="none")
    layers, resolved = apply_level(compress, args)
    assert layers == LEVELS["tiny"]["decoder_layers"]
    assert resolved.size_budget_ratio == pytest.approx(1 / 10.48)
    assert args.size_budget_ratio is None and compress.decoder_layers is None
    explicit = DistillQuantArguments(output_dir=str(tmp_path), report_to="none", size_budget_mb=30)
    assert apply_level(CompressArguments(level="base"), explicit)[1].size_budget_mb == 30
    with pytest.raises(ValueError, match="--level"):
        CompressArguments(level="huge")


def test_paper_levels_quantize_every_part_unless_the_command_line_says_otherwise():
    def value(argv, flag):
        return argv[argv.index(flag) + 1]

    for level in (["--level", "tiny"], ["--level=base"]):
        argv = with_training_defaults(level)
        assert value(argv, "--quant_targets") == "encoder,decoder,embedding"
        assert value(argv, "--quant_bit_choices") == "2,3,4,8" and value(argv, "--freeze_encoder") == "false"
    argv = with_training_defaults(["--level", "base", "--quant_bit_choices", "3,4,8", "--freeze_encoder", "true"])
    assert argv.count("--quant_bit_choices") == argv.count("--freeze_encoder") == 1
    assert value(argv, "--quant_bit_choices") == "3,4,8" and value(argv, "--freeze_encoder") == "true"
    assert value(with_training_defaults(["--level", "smoke"]), "--quant_targets") == TRAINING_DEFAULTS["quant_targets"]


def test_the_default_level_is_the_cpu_recipe_at_int4(tmp_path):
    """The teacher's architecture, one width everywhere (the packed embedding's layout), encoder frozen."""

    def value(argv, flag):
        return argv[argv.index(flag) + 1]

    argv = with_training_defaults([])
    assert value(argv, "--quant_targets") == "encoder,decoder,embedding"
    assert value(argv, "--quant_bit_choices") == "4" and value(argv, "--freeze_encoder") == "true"
    assert (value(argv, "--max_steps"), value(argv, "--learning_rate")) == ("30", "5e-5")
    assert value(with_training_defaults(["--level", "int3"]), "--quant_bit_choices") == "3"
    # int4's encoder codes come from GPTQ, unless the command line trains the encoder or widens the choices (then
    # round-to-nearest as before, not an error about a flag it never gave); int3 keeps the clip search.
    assert value(argv, "--frozen_encoder_quantizer") == "gptq" and value(argv, "--decoder_start_quantizer") == "gptq"
    others = (
        ["--freeze_encoder", "false"],
        ["--quant_bit_choices", "4,8"],
        ["--level", "int3"],
        ["--quant_format", "ggml"],
    )
    for other in others:
        resolved = with_training_defaults(other)
        assert "--frozen_encoder_quantizer" not in resolved and "--decoder_start_quantizer" not in resolved, other
    # the decoder's start rewrites weights LoRA freezes, and needs the decoder quantized: the encoder's GPTQ stays
    for other in (["--lora_r", "16"], ["--quant_targets", "encoder,embedding"]):
        resolved = with_training_defaults(other)
        assert "--decoder_start_quantizer" not in resolved and value(resolved, "--frozen_encoder_quantizer") == "gptq"
    given = with_training_defaults(["--frozen_encoder_quantizer", "round_to_nearest"])
    assert value(given, "--frozen_encoder_quantizer") == "round_to_nearest"
    # GPTQ on ggml's blocks when asked for (one type: q3_K here)
    ggml = [
        "--level",
        "int3",
        "--quant_format",
        "ggml",
        "--quant_bit_choices",
        "3",
        "--frozen_encoder_quantizer",
        "gptq",
    ]
    parsed = HfArgumentParser(DistillQuantArguments).parse_args_into_dataclasses(
        [a for a in with_training_defaults(ggml) if a not in ("--level", "int3")] + ["--output_dir", str(tmp_path)]
    )[0]
    assert (parsed.frozen_encoder_quantizer, parsed.quant_format, parsed.bit_choices) == ("gptq", "ggml", (3,))
    args = DistillQuantArguments(output_dir=str(tmp_path), report_to="none")
    layers, resolved = apply_level(CompressArguments(), args)
    assert layers is None and resolved.size_budget_ratio is None and resolved.size_budget_mb is None


def test_an_unreachable_level_fails_before_the_data_phase(tmp_path, short_window_whisper):
    model, processor = short_window_whisper
    teacher = save_whisper(model, processor, tmp_path / "teacher")
    output = tmp_path / "run"
    with pytest.raises(
        ValueError,
        match=r"--level tiny \(budget teacher/10\.48 = [\d.]+ MB, the paper's ratio from "
        r"whisper-small\) is out of reach from .*teacher: this student needs at least ([\d.]+) MB",
    ) as caught:
        main(["compress", str(teacher), "--level", "tiny", "--output_dir", str(output), "--synthetic_prompts", "4"])
    assert "--size_budget_mb" in str(caught.value)
    assert not output.exists() or not any(output.iterdir())  # nothing synthesized, labelled or trained


def test_compress_end_to_end_on_a_tiny_teacher(tmp_path, short_window_whisper, capsys, monkeypatch):
    pytest.importorskip("piper")
    pytest.importorskip("ctranslate2")
    from hf_whisper_kdq.trainer import DistillQuantTrainer

    # compress exports and writes its card through the trainer's own methods, as push_to_hub does: one path.
    calls = {}

    def spy(name: str, original):
        def recorded(self, *args, **kwargs):
            calls.setdefault(name, []).append(result := original(self, *args, **kwargs))
            return result

        return recorded

    for method in ("save_compressed", "create_model_card"):
        monkeypatch.setattr(DistillQuantTrainer, method, spy(method, getattr(DistillQuantTrainer, method)))
    model, processor = short_window_whisper
    teacher = save_whisper(model, processor, tmp_path / "teacher")
    output = tmp_path / "run"
    code = main(
        [
            "compress",
            str(teacher),
            "--level",
            "smoke",
            "--output_dir",
            str(output),
            "--synthetic_prompts",
            "4",
            "--max_eval_samples",
            "2",
            "--max_steps",
            "2",
            "--per_device_train_batch_size",
            "2",
            "--per_device_eval_batch_size",
            "2",
            "--quant_targets",
            "encoder,decoder,embedding",
            "--size_budget_ratio",
            "0.6",
            "--decoder_layers",
            "1",
            "--eval_max_new_tokens",
            "8",
            "--disable_tqdm",
            "true",
        ]
    )
    assert code == 0
    compressed = output / "compressed"
    for name in (
        "config.json",
        "model.safetensors",
        "compression_report.json",
        "kdq_plan.json",
        "README.md",
        "kdq_plan.png",
        "eval_report.json",
        "ctranslate2/model.bin",
    ):
        assert (compressed / name).is_file(), name
    config = json.loads((compressed / "config.json").read_text())
    assert config["quantization_config"]["format"] == "pack-quantized"
    summary = json.loads((output / "compress_summary.json").read_text())
    phases = {"load teacher", "prepare the quantized student", "train", "evaluate", "export packed checkpoint"}
    assert phases | {"model card"} <= set(summary["phase_seconds"])
    assert summary["evaluation"]["smoke_run"] is True
    evaluated = json.loads((compressed / "eval_report.json").read_text())
    assert evaluated["compressed"]["temperature_fallback"] and evaluated["teacher"]["temperature_fallback"]
    card = ModelCard.load(compressed / "README.md")
    assert not card.data.eval_results  # synthetic-speech scores are never published as results
    (report,) = calls["save_compressed"]
    assert report.folder == compressed and calls["create_model_card"] == [compressed / "README.md"]
    assert summary["compression"]["total_bytes"] == report.total_bytes == report.to_dict()["total_bytes"]
    out = capsys.readouterr().out
    assert "SMOKE RUN" in out and "| compressed |" in out and "| teacher |" in out


def test_quant_format_ggml_trains_every_weight_at_q4_0_or_q8_0_and_refuses_q3_k():
    def value(argv, flag):
        return argv[argv.index(flag) + 1]

    argv = with_training_defaults(["--quant_format", "ggml"])
    assert value(argv, "--quant_targets") == "encoder,decoder,embedding" and value(argv, "--quant_bit_choices") == "4,8"
    assert (
        value(with_training_defaults(["--quant_format=ggml", "--quant_bit_choices", "8"]), "--quant_bit_choices") == "8"
    )
    for choices, types in (("3,4,8", "q3_K"), ("2,4", "q2_K")):
        with pytest.raises(ValueError, match=f"can train {types}.*cannot hold the k-quants.*--quant_bit_choices 4,8"):
            main(["compress", "--quant_format", "ggml", "--quant_bit_choices", choices, "--output_dir", "unused"])


def test_compress_with_quant_format_ggml_writes_the_whisper_cpp_file(tmp_path, base_pack_folder):
    """The whisper.cpp file beside the packed folder: the plan's one type, of exactly the plan's bytes."""
    pytest.importorskip("piper")
    from conftest import SHORT_WINDOW_SECONDS, make_tiny_whisper

    from hf_whisper_kdq.export.ggml import read_file_type
    from hf_whisper_kdq.selection import KDQPlan

    model, processor = make_tiny_whisper(
        base_pack_folder, window_seconds=SHORT_WINDOW_SECONDS, encoder_ffn_dim=256, decoder_ffn_dim=256
    )
    teacher = save_whisper(model, processor, tmp_path / "teacher")
    output = tmp_path / "run"
    arguments = (
        "--level smoke --synthetic_prompts 4 --max_eval_samples 2 --max_steps 2 --per_device_train_batch_size 2 "
    )
    arguments += "--per_device_eval_batch_size 2 --decoder_layers 1 --eval_max_new_tokens 4 --disable_tqdm true "
    arguments += "--ctranslate2_quantization none --evaluate_teacher false --quant_format ggml"
    assert main(["compress", str(teacher), "--output_dir", str(output), *arguments.split()]) == 0
    compressed = output / "compressed"
    plan = KDQPlan.load(compressed)
    ggml_file = compressed / "ggml-model.bin"
    assert plan.quant_format == "ggml" and read_file_type(ggml_file) in ("q4_0", "q8_0")
    assert ggml_file.stat().st_size == plan.size_bytes <= plan.budget_bytes
    assert (compressed / "model.safetensors").is_file()


def test_evaluation_languages_missing_from_training_are_named_with_the_fix(caplog):
    with caplog.at_level("WARNING", logger="hf_whisper_kdq.compress"):
        assert warn_untrained_languages(["en", "en", None], ["en", "zh", "zh", "de"]) == ["de", "zh"]
    assert "the evaluation has de, zh speech, the training data none" in caplog.text
    assert "Add de, zh training speech (--train_manifest" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="hf_whisper_kdq.compress"):
        assert warn_untrained_languages(["zh", "en"], ["en", "zh"]) == []
    assert not caplog.records


def test_synthetic_text_file_is_synthesized_in_order(tmp_path, monkeypatch):
    """--synthetic_text: training speech from the user's own sentences instead of the embedded prompts."""
    pytest.importorskip("piper")
    from hf_whisper_kdq.compress import PhaseTimer, training_data

    monkeypatch.setenv("HF_WHISPER_KDQ_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "sentences.tsv"
    text.write_text("a1\tThe press yard was quiet.\na2\tNine feet by six.\na3\tNot this one.\n", encoding="utf-8")
    compress = CompressArguments(synthetic_prompts=2, synthetic_text=str(text))
    dataset = training_data(compress, None, None, timer=PhaseTimer())
    assert dataset["text"] == ["The press yard was quiet.", "Nine feet by six."]
    assert all(duration > 0.5 for duration in dataset["duration"])
    with pytest.raises(ValueError, match="--synthetic_text .*no such file"):
        CompressArguments(synthetic_text=str(tmp_path / "missing.tsv"))


def test_budgets_count_bytes_on_disk_except_in_the_paper_presets(tmp_path):
    """A budget of one's own bounds the file; the presets are the paper's ratios, in the paper's accounting."""
    assert DistillQuantArguments(output_dir=str(tmp_path), report_to="none").size_budget_accounting == "on_disk"
    for level in ("base", "tiny", "smoke"):
        argv = with_training_defaults(["--level", level])
        assert argv[argv.index("--size_budget_accounting") + 1] == "paper", level
    assert "--size_budget_accounting" not in with_training_defaults(["--level", "none"])
    parsed = HfArgumentParser(DistillQuantArguments).parse_args_into_dataclasses(
        with_training_defaults(["--level", "none"]), return_remaining_strings=True
    )[0]
    assert parsed.size_budget_accounting == "on_disk" and parsed.hidden_loss_scale == "relative"
    assert parsed.clip_learning_rate > parsed.learning_rate


def test_max_steps_0_packs_the_student_as_quantized_post_training(tmp_path, tiny_whisper, monkeypatch):
    """``--max_steps 0`` is the post-training baseline of a recipe: the student prepared (GPTQ of the frozen encoder
    and of the decoder's start, the searched clip of the embedding) is packed without a step, where the Trainer
    itself would read 0 as "train num_train_epochs"."""
    import torch
    from conftest import GPTQ_INT4_RECIPE, micro_training_args, tiny_speech_rows
    from datasets import Dataset
    from transformers import WhisperForConditionalGeneration

    from hf_whisper_kdq.compress import train_student
    from hf_whisper_kdq.quant import quant_layers
    from hf_whisper_kdq.students import build_student
    from hf_whisper_kdq.trainer import DistillQuantTrainer

    def no_training(self, *args, **kwargs):
        raise AssertionError("max_steps 0 must not train")

    monkeypatch.setattr(DistillQuantTrainer, "train", no_training)
    teacher, processor = tiny_whisper
    args = micro_training_args(tmp_path, max_steps=0, **GPTQ_INT4_RECIPE)
    rows = tiny_speech_rows(processor, [" hello world", " a sentence", " another one", " the fourth row"])
    trainer = train_student(build_student(teacher), teacher, processor, Dataset.from_list(rows), args)
    assert trainer.state.global_step == 0
    decoder = [name for name in quant_layers(trainer.model) if ".decoder.layers." in name]
    assert decoder and all(
        not torch.equal(trainer.model.get_submodule(name).weight, teacher.get_submodule(name).weight)
        for name in decoder
    )  # quantized post-training: GPTQ's values, not the teacher's
    report = trainer.save_compressed(tmp_path / "packed")
    packed = WhisperForConditionalGeneration.from_pretrained(report.folder, dtype=torch.float32).eval()
    features = torch.tensor(rows[0]["input_features"])[None]
    tokens = torch.tensor([rows[0]["labels"][:-1]])
    with torch.no_grad():
        expected = trainer.whole_student().eval()(input_features=features, decoder_input_ids=tokens).logits
        loaded = packed(input_features=features, decoder_input_ids=tokens).logits
    # The folder stores the unquantized tensors (LayerNorms, biases, convolutions) in fp16, the student holds fp32.
    torch.testing.assert_close(loaded, expected, rtol=0, atol=1e-3)
