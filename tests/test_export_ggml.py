"""export.ggml: whisper.cpp model files. The block quantizers are compared byte for byte with ggml's own
``ggml_quantize_chunk`` (from the libggml-base that pywhispercpp ships), and the files are loaded and run by
whisper.cpp itself (pywhispercpp)."""

from __future__ import annotations

import copy
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    ggml_quantize_chunk,
    make_tiny_whisper,
    real_whisper_and_english_audios,
    tiny_speech_rows,
    write_tones_manifest,
)

from hf_whisper_kdq.export.ggml import (
    FTYPES,
    GGML_TYPES,
    export_whisper_cpp,
    ggml_file_bytes,
    ggml_tensor_name,
    is_whisper_cpp_file,
    load_whisper_cpp,
    quantize_blocks,
    read_file_type,
    transcribe_whisper_cpp,
)
from hf_whisper_kdq.quant import QuantSpec, convert_qat, default_quant_targets, prepare_qat
from hf_whisper_kdq.quant.ggml_blocks import unpack
from hf_whisper_kdq.quant.spec import as_spec

BLOCK_TYPES = ("q8_0", "q5_0", "q4_0", "q3_K", "q2_K")
K_QUANTS = ("q3_K", "q2_K")
TYPE_NAMES = {code: name for name, code in GGML_TYPES.items()}


def _hard_rows() -> np.ndarray:
    """Weights of very different scales, plus blocks where rounding and tie-breaking decide the codes."""
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((48, 256)) * rng.uniform(1e-6, 4.0, (48, 1))
    rows[0, :32] = 0  # a zero block: scale 0, every code the zero point
    rows[1, :32] = np.arange(-16, 16) + 0.5  # q8_0 with amax 15.5: ... and exact halves in q4_0/q5_0 units
    rows[2, :32] = np.tile([127.0, -127.0, 0.5, -0.5, 1.5, -2.5, 63.5, -0.49999997], 4)  # d = 1: roundf's halves
    rows[3, :32] = np.tile([1.0, -1.0], 16)  # largest magnitude on both signs: the first one wins
    rows[4, :32] = np.tile([-8.0, 7.5, 3.5, -0.5], 8)  # q4_0 with d = 1 exactly
    rows[5, :32] = rng.standard_normal(32) * 1e-9  # scales below float16's range; zeros of both signs after fp16
    rows[6, :32] = rng.standard_normal(32) * 1e-5  # scales in float16's subnormal range
    rows[7, :32] = -0.0
    return rows.astype(np.float32)


@pytest.mark.parametrize("ftype", BLOCK_TYPES)
def test_block_quantizers_are_byte_identical_to_ggml(ftype):
    rows = _hard_rows()
    rows = np.concatenate([rows, rows * 1e-4, rows * 1e-8])  # k-quants: whole super-blocks of tiny, subnormal scales
    for values in (rows, rows.astype(np.float16).astype(np.float32)):  # any float32, and the fp16 the export feeds
        assert quantize_blocks(values, ftype) == ggml_quantize_chunk(values, ftype)


def test_quantize_blocks_refuses_partial_blocks_and_unknown_types():
    with pytest.raises(ValueError, match="blocks of 32"):
        quantize_blocks(np.ones(48, np.float32), "q8_0")
    with pytest.raises(ValueError, match="blocks of 256"):
        quantize_blocks(np.ones(32, np.float32), "q3_K")
    with pytest.raises(ValueError, match="q8_0, q5_0, q4_0, q3_K, q2_K"):
        quantize_blocks(np.ones(32, np.float32), "q6_K")


# --- The file ---------------------------------------------------------------------------------------------
def _read_ggml(path: Path) -> dict:
    """Header, mel filters, vocabulary and tensor table of a whisper.cpp file, read as its loader reads them."""
    data = Path(path).read_bytes()
    magic, *hparams = struct.unpack_from("<I11i", data, 0)
    offset = 48
    n_mel, n_fft = struct.unpack_from("<2i", data, offset)
    offset += 8
    filters = np.frombuffer(data, np.float32, n_mel * n_fft, offset).reshape(n_mel, n_fft)
    offset += filters.nbytes
    (n_tokens,) = struct.unpack_from("<i", data, offset)
    offset += 4
    tokens = []
    for _ in range(n_tokens):
        (length,) = struct.unpack_from("<i", data, offset)
        tokens.append(data[offset + 4 : offset + 4 + length])
        offset += 4 + length
    tensors = {}
    while offset < len(data):
        n_dims, length, ttype = struct.unpack_from("<3i", data, offset)
        shape = struct.unpack_from(f"<{n_dims}i", data, offset + 12)
        name = data[offset + 12 + 4 * n_dims : offset + 12 + 4 * n_dims + length].decode()
        offset += 12 + 4 * n_dims + length
        n_values = int(np.prod(shape))
        kind = TYPE_NAMES[ttype]
        size = {"f32": 4 * n_values, "f16": 2 * n_values}.get(kind) or len(quantize_blocks(np.zeros(n_values), kind))
        tensors[name] = (kind, shape, data[offset : offset + size])
        offset += size
    return dict(magic=magic, hparams=hparams, filters=filters, tokens=tokens, tensors=tensors)


def _ggml_whisper(base_pack_folder, **overrides):
    """The tiny random Whisper of conftest with whisper.cpp's feed-forward width (4 * d_model)."""
    width = 4 * overrides.get("d_model", 64)
    return make_tiny_whisper(base_pack_folder, encoder_ffn_dim=width, decoder_ffn_dim=width, **overrides)


@pytest.fixture(scope="module")
def ggml_whisper(base_pack_folder):
    return _ggml_whisper(base_pack_folder)


def test_file_holds_what_whisper_cpp_quantize_writes(ggml_whisper, tmp_path):
    model, processor = ggml_whisper
    path = export_whisper_cpp(model, processor, tmp_path / "ggml-q5_0.bin", ftype="q5_0")
    file = _read_ggml(path)
    config = model.config
    assert file["magic"] == 0x67676D6C
    assert file["hparams"] == [51865, 1500, 64, 4, 2, 448, 64, 4, 2, 80, 2000 + FTYPES["q5_0"]]
    np.testing.assert_array_equal(file["filters"], np.asarray(processor.feature_extractor.mel_filters, np.float32).T)
    # Multilingual: 50,257 BPE tokens without <|endoftext|>, the last one empty; whisper.cpp names the rest.
    assert len(file["tokens"]) == 50257 and file["tokens"][-1] == b""
    assert file["tokens"][processor.tokenizer.convert_tokens_to_ids("Ġhello")] == b" hello"
    tensors = file["tensors"]
    # Encoder: positions, 2 convolutions, final LayerNorm, 15 per layer; decoder: positions, embedding, final
    # LayerNorm, 24 per layer; no output layer (tied).
    assert len(tensors) == 7 + 15 * 2 + 4 + 24 * 2 and "decoder.proj.weight" not in tensors
    kinds = {name: kind for name, (kind, _, _) in tensors.items()}
    assert kinds["decoder.token_embedding.weight"] == "q5_0"
    assert kinds["encoder.blocks.0.attn.query.weight"] == kinds["decoder.blocks.1.cross_attn.out.weight"] == "q5_0"
    assert kinds["encoder.conv1.weight"] == kinds["encoder.conv2.weight"] == "f16"
    for name in ("encoder.conv1.bias", "encoder.positional_embedding", "decoder.positional_embedding"):
        assert kinds[name] == "f32"
    assert {kind for name, kind in kinds.items() if name.endswith(".bias") or "_ln" in name or ".ln" in name} == {"f32"}
    assert tensors["encoder.conv1.bias"][1] == (1, 64) and tensors["encoder.conv1.weight"][1] == (3, 80, 64)
    # The weights went through float16 before quantization, as convert-h5-to-ggml.py then quantize do.
    embedding = model.model.decoder.embed_tokens.weight.detach().numpy().astype(np.float16).astype(np.float32)
    assert tensors["decoder.token_embedding.weight"][2] == quantize_blocks(embedding, "q5_0")
    assert tensors["decoder.token_embedding.weight"][1] == (64, config.vocab_size)


def test_mel_filters_are_whisper_own(ggml_whisper):
    """The filters written (the feature extractor's) are OpenAI's mel_filters.npz, which whisper.cpp's converters
    write, to float32 rounding."""
    whisper = pytest.importorskip("whisper")
    _, processor = ggml_whisper
    reference = np.load(Path(whisper.__file__).parent / "assets" / "mel_filters.npz")["mel_80"]
    np.testing.assert_allclose(np.asarray(processor.feature_extractor.mel_filters).T, reference, rtol=0, atol=1e-8)


@pytest.fixture(scope="module")
def k_quant_whisper(base_pack_folder):
    """A tiny random Whisper whose rows fill the k-quants' 256-weight super-blocks (d_model 256)."""
    return _ggml_whisper(base_pack_folder, d_model=256, encoder_layers=1, decoder_layers=1)


@pytest.mark.parametrize("ftype", list(FTYPES))
def test_whisper_cpp_loads_and_runs_a_tiny_random_whisper(request, tmp_path, ftype):
    pytest.importorskip("pywhispercpp")
    model, processor = request.getfixturevalue("k_quant_whisper" if ftype in K_QUANTS else "ggml_whisper")
    path = export_whisper_cpp(model, processor, tmp_path / f"ggml-{ftype}.bin", ftype=ftype)
    noise = np.random.default_rng(0).normal(0, 0.1, 16000).astype(np.float32)
    (text,) = transcribe_whisper_cpp(path, [noise], "en", n_threads=1)
    assert isinstance(text, str)


def test_the_evaluate_command_scores_a_whisper_cpp_file(ggml_whisper, tmp_path, capsys):
    pytest.importorskip("pywhispercpp")
    import json

    import soundfile

    from hf_whisper_kdq.cli import main

    model, processor = ggml_whisper
    path = export_whisper_cpp(model, processor, tmp_path / "ggml-q4_0.bin", ftype="q4_0")
    assert is_whisper_cpp_file(path) and not is_whisper_cpp_file(tmp_path)
    soundfile.write(tmp_path / "noise.wav", np.random.default_rng(0).normal(0, 0.1, 16000), 16000)
    row = {"id": "n0", "corpus": "noise", "language": "en", "audio": "noise.wav", "duration": 1.0, "text": "hi"}
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text(json.dumps(row) + "\n")
    command = ["evaluate", str(path), "--manifest", str(manifest), "--progress", "false"]
    assert main([*command, "--output_json", str(tmp_path / "report.json")]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["dtype"] == "whisper.cpp q4_0" and report["model_size_bytes"] == path.stat().st_size
    # Every tensor once (proj_out is the tied embedding; conv biases written as (n, 1)): the model's parameters.
    assert report["n_parameters"] == model.num_parameters()
    assert report["n_utterances"] == 1 and "| noise | en | WER |" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--num_beams 1"):
        main([*command, "--num_beams", "2"])
    # whisper.cpp's own fallback: this random model's greedy transcript of noise loops, so it is sampled again.
    utterances = {}
    for fallback in ([], ["--temperature_fallback"]):
        out = tmp_path / f"report{len(fallback)}.json"
        assert main([*command, *fallback, "--per_utterance", "--output_json", str(out)]) == 0
        report = json.loads(out.read_text())
        assert report["temperature_fallback"] == bool(fallback)
        utterances[bool(fallback)] = report["utterances"][0]["hypothesis"]
    assert utterances[True] != utterances[False]
    with pytest.raises(ValueError, match="--max_new_tokens"):
        main([*command, "--max_new_tokens", "4"])
    other = tmp_path / "ggml-q5_1.bin"  # a whisper.cpp type this package does not size: refused with the fix
    data = bytearray(path.read_bytes())
    struct.pack_into("<i", data, 44, 2000 + 9)
    other.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"file type 9 is not one this package reads .*export-ggml --ftype"):
        main(["evaluate", str(other), "--manifest", str(manifest), "--progress", "false"])


def test_load_refuses_a_file_whisper_cpp_only_half_reads(ggml_whisper, tmp_path):
    """pywhispercpp returns a context for a truncated file (an empty model): the load check turns it into an error."""
    pytest.importorskip("pywhispercpp")
    model, processor = ggml_whisper
    path = export_whisper_cpp(model, processor, tmp_path / "ggml-f16.bin", ftype="f16")
    truncated = tmp_path / "truncated.bin"
    truncated.write_bytes(path.read_bytes()[:100_000])  # header, filters and part of the vocabulary
    with pytest.raises(ValueError, match="no tensors loaded"):
        load_whisper_cpp(truncated)
    wrong = tmp_path / "wrong.bin"
    data = bytearray(path.read_bytes())
    struct.pack_into("<i", data, 44, 2000 + FTYPES["q8_0"])  # the header claims q8_0, the tensors are f16
    wrong.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="wrong size"):
        load_whisper_cpp(wrong)


def test_qat_student_is_exported_from_its_dequantized_weights(ggml_whisper, tmp_path):
    model, processor = ggml_whisper
    student = copy.deepcopy(model)
    specs = {name: QuantSpec.parse("int4-g32") for name in default_quant_targets(student)}
    prepare_qat(student, specs)
    student.add_module("kdq_adapters", torch.nn.ModuleDict({"encoder_1": torch.nn.Linear(64, 64)}))
    before = {name: value.clone() for name, value in student.state_dict().items()}
    path = export_whisper_cpp(student, processor, tmp_path / "student.bin", ftype="f16")
    assert all(before[name].equal(value) for name, value in student.state_dict().items())  # caller's model kept
    baked = copy.deepcopy(student)
    del baked.kdq_adapters
    convert_qat(baked)
    tensors = _read_ggml(path)["tensors"]
    expected = baked.model.decoder.layers[0].fc1.weight.detach().numpy().astype(np.float16).tobytes()
    assert tensors["decoder.blocks.0.mlp.0.weight"][2] == expected
    plain = model.model.decoder.layers[0].fc1.weight.detach().numpy().astype(np.float16).tobytes()
    assert expected != plain


def test_compressed_folder_requantized_exports_like_the_student_it_holds(ggml_whisper, tmp_path):
    pytest.importorskip("compressed_tensors")
    from hf_whisper_kdq.export import save_compressed

    model, processor = ggml_whisper
    student = copy.deepcopy(model)
    # Two widths: the folder keeps compressed-tensors' packed layers, which the export unpacks (decompress_model).
    widths = {
        name: QuantSpec.parse("int8" if ".encoder." in name else "int4-g32") for name in default_quant_targets(student)
    }
    prepare_qat(student, widths)
    folder = tmp_path / "student-kdq"
    save_compressed(student, processor, folder)
    # int8 per channel and int4 groups: no file type holds both, so they are re-quantized (refused without it).
    with pytest.raises(ValueError, match="cannot be written exactly as q8_0.*--requantize"):
        export_whisper_cpp(folder, None, tmp_path / "folder.bin", ftype="q8_0")
    from_folder = export_whisper_cpp(folder, None, tmp_path / "folder.bin", ftype="q8_0", requantize=True)
    from_model = export_whisper_cpp(student, processor, tmp_path / "model.bin", ftype="q8_0", requantize=True)
    # The same tensors (the folder's model lists a weight after its bias: another order, which whisper.cpp allows).
    folder_file, model_file = _read_ggml(from_folder), _read_ggml(from_model)
    assert folder_file["tensors"] == model_file["tensors"]
    assert folder_file["hparams"] == model_file["hparams"] and folder_file["tokens"] == model_file["tokens"]


def _all_quantized(model, spec):
    """A copy of ``model`` with every weight whisper.cpp quantizes (linears and the tied embedding) at ``spec``."""
    student = copy.deepcopy(model)
    prepare_qat(student, dict.fromkeys(default_quant_targets(student, embedding=True), as_spec(spec)))
    return student


@pytest.mark.parametrize("spec", ["q4_0", "q8_0", "int4-g32", "int8-g32"])
def test_student_codes_are_written_exactly_from_the_model_and_from_its_packed_folder(ggml_whisper, tmp_path, spec):
    """A ggml-trained student (and an int4 / int8 one with groups of 32) goes into the file as its own codes: every
    quantized tensor dequantizes to the student's fake-quantized weight, from the model object and from the packed
    folder save_compressed wrote (one width: the embedding is packed there too)."""
    pytest.importorskip("compressed_tensors")
    from hf_whisper_kdq.export import save_compressed

    model, processor = ggml_whisper
    student = _all_quantized(model, spec)
    ftype = {"int4-g32": "q4_0", "int8-g32": "q8_0"}.get(spec, spec)
    from_model = export_whisper_cpp(student, processor, tmp_path / "model.bin", ftype="auto")
    save_compressed(student, processor, tmp_path / "packed")
    from_folder = export_whisper_cpp(tmp_path / "packed", None, tmp_path / "folder.bin", ftype="auto")
    model_tensors, folder_tensors = _read_ggml(from_model)["tensors"], _read_ggml(from_folder)["tensors"]
    assert _read_ggml(from_model)["hparams"][-1] == 2000 + FTYPES[ftype]
    modules = dict(student.named_modules())
    for name in default_quant_targets(student, embedding=True):
        ggml_name = ggml_tensor_name(f"{name}.weight")
        kind, _, data = model_tensors[ggml_name]
        assert kind == ftype and folder_tensors[ggml_name][2] == data
        fake = modules[name].quantized_weight().detach()
        np.testing.assert_array_equal(unpack(data, ftype, tuple(fake.shape)), fake.numpy())
    if spec.startswith("int"):
        # Re-quantized by ggml's rule instead: int4's grid (signed scale |e|/8) is q4_0's, so nothing changes; int8's
        # (|e|/128) is not q8_0's (amax/127): nearly every value moves.
        naive = export_whisper_cpp(student, processor, tmp_path / "naive.bin", ftype=ftype, requantize=True)
        fc1 = student.model.decoder.layers[0].fc1
        written = unpack(
            _read_ggml(naive)["tensors"]["decoder.blocks.0.mlp.0.weight"][2], ftype, tuple(fc1.weight.shape)
        )
        changed = float(np.mean(written != fc1.quantized_weight().detach().numpy()))
        assert changed == 0 if ftype == "q4_0" else changed > 0.9


@pytest.mark.parametrize("ftype", K_QUANTS)
def test_k_quant_student_is_written_exactly_and_runs(k_quant_whisper, tmp_path, ftype):
    pytest.importorskip("pywhispercpp")
    model, processor = k_quant_whisper
    student = _all_quantized(model, ftype)
    path = export_whisper_cpp(student, processor, tmp_path / f"{ftype}.bin", ftype="auto")
    tensors = _read_ggml(path)["tensors"]
    fc1 = student.model.encoder.layers[0].fc1
    kind, _, data = tensors["encoder.blocks.0.mlp.0.weight"]
    assert kind == ftype
    np.testing.assert_array_equal(unpack(data, ftype, tuple(fc1.weight.shape)), fc1.quantized_weight().detach().numpy())
    # The student's codes are ggml's own blocks of its float32 weights.
    assert data == ggml_quantize_chunk(fc1.weight.detach().numpy(), ftype)
    noise = np.random.default_rng(0).normal(0, 0.1, 16000).astype(np.float32)
    (text,) = transcribe_whisper_cpp(path, [noise], "en", n_threads=1)
    assert isinstance(text, str)


@pytest.mark.parametrize("ftype", list(FTYPES))
def test_file_bytes_are_counted_without_writing(request, tmp_path, ftype):
    model, processor = request.getfixturevalue("k_quant_whisper" if ftype in K_QUANTS else "ggml_whisper")
    student = _all_quantized(model, "int8")  # clipping ratios and wrappers are not in the file
    path = export_whisper_cpp(student, processor, tmp_path / "model.bin", ftype=ftype, requantize=True)
    assert ggml_file_bytes(student, processor, ftype) == path.stat().st_size


def test_refusals_name_the_fix_and_write_nothing(base_pack_folder, ggml_whisper, tmp_path):
    model, processor = ggml_whisper
    narrow, _ = make_tiny_whisper(base_pack_folder)  # feed-forward width 2 * d_model
    target = tmp_path / "out.bin"
    with pytest.raises(ValueError, match="encoder_ffn_dim is 128, whisper.cpp computes 4 \\* d_model = 256"):
        export_whisper_cpp(narrow, processor, target)
    untied = copy.deepcopy(model)
    untied.config.tie_word_embeddings = False
    untied.proj_out.weight = torch.nn.Parameter(untied.proj_out.weight.detach() * 2)
    with pytest.raises(ValueError, match="proj_out is not tied"):
        export_whisper_cpp(untied, processor, target)
    with pytest.raises(ValueError, match="f16, q8_0, q5_0, q4_0"):
        export_whisper_cpp(model, processor, target, ftype="q6_K")
    with pytest.raises(ValueError, match="WhisperProcessor"):
        export_whisper_cpp(model, None, target)
    assert list(tmp_path.iterdir()) == []
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    with pytest.raises(FileExistsError, match="not a ggml model file"):
        export_whisper_cpp(model, processor, notes, ftype="f16", overwrite=True)
    assert notes.read_text() == "mine"
    export_whisper_cpp(model, processor, target, ftype="f16")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_whisper_cpp(model, processor, target, ftype="q8_0")
    export_whisper_cpp(model, processor, target, ftype="q8_0", overwrite=True)
    assert _read_ggml(target)["hparams"][-1] == 2000 + FTYPES["q8_0"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "out.bin"]  # no temporary file left


def test_cli_export_ggml(ggml_whisper, tmp_path, capsys):
    from hf_whisper_kdq.cli import main
    from hf_whisper_kdq.sources import save_whisper

    model, processor = ggml_whisper
    folder = save_whisper(model, processor, tmp_path / "hf")
    assert main(["export-ggml", str(folder), str(tmp_path / "ggml.bin"), "--ftype", "q4_0"]) == 0
    assert "q4_0" in capsys.readouterr().out
    assert _read_ggml(tmp_path / "ggml.bin")["tensors"]["decoder.token_embedding.weight"][0] == "q4_0"
    with pytest.raises(SystemExit):
        main(["export-ggml", str(folder), str(tmp_path / "other.bin"), "--ftype", "q6_K"])


@pytest.mark.slow
def test_real_tiny_en_at_q8_0_transcribes_like_transformers(shared_speech, tmp_path):
    """whisper-tiny.en (offline pack) at q8_0 in whisper.cpp transcribes real LJSpeech clips as the transformers model
    does: the whisper.cpp transcripts, scored against the transformers ones, are near word-for-word."""
    pytest.importorskip("pywhispercpp")
    from hf_whisper_kdq.evaluation import transcribe
    from hf_whisper_kdq.scoring import score

    model, processor, audios = real_whisper_and_english_audios("openai/whisper-tiny.en", shared_speech, 4)
    path = export_whisper_cpp(model, processor, tmp_path / "ggml-tiny.en-q8_0.bin", ftype="q8_0")
    whisper_cpp = transcribe_whisper_cpp(path, audios, "en", n_threads=2)
    transformers = transcribe(model, processor, audios, progress=False)
    assert all(whisper_cpp)
    assert score(transformers, whisper_cpp, "en")["wer"] <= 0.1, (transformers, whisper_cpp)


def _ggml_trainer(student, teacher, processor, tmp_path, **overrides):
    """A DistillQuantTrainer of ``student`` for whisper.cpp (quant_format='ggml', every part quantized) on two tiny
    speech rows, batch 2, one probe batch; ``overrides`` are further DistillQuantArguments."""
    from datasets import Dataset

    from hf_whisper_kdq import DistillQuantArguments, DistillQuantTrainer
    from hf_whisper_kdq.data import WhisperDataCollator

    args = DistillQuantArguments(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=2,
        selection_probe_batches=1,
        report_to="none",
        use_cpu=True,
        quant_format="ggml",
        quant_targets="encoder,decoder,embedding",
        **overrides,
    )
    rows = tiny_speech_rows(processor, [" hello world", " a longer sentence to transcribe"])
    return DistillQuantTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=Dataset.from_list(rows),
        data_collator=WhisperDataCollator(processor, decoder_start_token_id=student.config.decoder_start_token_id),
        processing_class=processor,
    )


def test_a_student_trained_for_ggml_ships_its_own_codes_in_a_file_of_the_planned_bytes(base_pack_folder, tmp_path):
    """quant_format='ggml': 2 training steps on the real-tokenizer tiny Whisper; the plan takes the widest type whose
    file fits the budget (q4_0 here: q8_0's file is over it), billed at the file's bytes, still distils a layer; the
    export writes the trained codes (ftype auto) into a file of exactly those bytes, which whisper.cpp runs."""
    pytest.importorskip("pywhispercpp")
    from hf_whisper_kdq import build_student

    teacher, processor = _ggml_whisper(base_pack_folder, decoder_layers=4)
    student = build_student(teacher, decoder_layers=2)
    q4_0, q8_0 = (ggml_file_bytes(student, processor, ftype) for ftype in ("q4_0", "q8_0"))
    trainer = _ggml_trainer(
        student,
        teacher,
        processor,
        tmp_path,
        max_steps=2,
        num_distill_layers=1,
        quant_bit_choices="4,8",
        size_budget_mb=(q4_0 + q8_0) / 2e6,
    )
    trainer.train()
    plan = trainer.plan
    assert {u.bits for u in plan.units if u.modules} == {4} and plan.size_bytes == q4_0
    assert any(u.distilled for u in plan.units)
    assert {str(spec) for spec in plan.module_specs().values()} == {"q4_0"}
    path = export_whisper_cpp(trainer.model, processor, tmp_path / "student.bin", ftype="auto")
    assert path.stat().st_size == plan.size_bytes
    fc1 = trainer.model.model.decoder.layers[1].fc1
    data = _read_ggml(path)["tensors"]["decoder.blocks.1.mlp.0.weight"][2]
    np.testing.assert_array_equal(
        unpack(data, "q4_0", tuple(fc1.weight.shape)), fc1.quantized_weight().detach().numpy()
    )
    noise = np.random.default_rng(0).normal(0, 0.1, 16000).astype(np.float32)
    (text,) = transcribe_whisper_cpp(path, [noise], "en", n_threads=1)
    assert isinstance(text, str)


def test_a_frozen_encoder_quantized_by_gptq_for_ggml_ships_gptqs_codes_in_the_file(base_pack_folder, tmp_path):
    """quant_format='ggml' with frozen_encoder_quantizer='gptq': the frozen encoder gets GPTQ's codes on q4_0's own
    block scales (not ggml's rounding of them), training leaves them, and the whisper.cpp file holds exactly them."""
    pytest.importorskip("pywhispercpp")
    from hf_whisper_kdq import build_student
    from hf_whisper_kdq.quant import quant_layers, quantize_weight

    teacher, processor = _ggml_whisper(base_pack_folder)
    trainer = _ggml_trainer(
        build_student(teacher),
        teacher,
        processor,
        tmp_path,
        max_steps=1,
        quant_bit_choices="4",
        freeze_encoder=True,
        frozen_encoder_quantizer="gptq",
        gptq_calibration_rows=2,
    )
    layers = quant_layers(trainer.model)
    fc1 = "model.encoder.layers.1.fc1"
    codes = layers[fc1].fixed_codes()
    assert codes is not None and codes.ggml_type == "q4_0"
    assert not torch.equal(
        codes.codes, quantize_weight(teacher.get_submodule(fc1).weight, layers[fc1].quant_spec).codes
    )
    trainer.train()
    assert layers[fc1].fixed_codes() is codes
    path = export_whisper_cpp(trainer.model, processor, tmp_path / "student.bin", ftype="auto")
    data = _read_ggml(path)["tensors"]["encoder.blocks.1.mlp.0.weight"][2]
    np.testing.assert_array_equal(unpack(data, "q4_0", tuple(codes.codes.shape)), codes.dequantize().numpy())
    noise = np.random.default_rng(0).normal(0, 0.1, 16000).astype(np.float32)
    (text,) = transcribe_whisper_cpp(path, [noise], "en", n_threads=1)
    assert isinstance(text, str)


def test_benchmark_trains_a_student_into_a_whisper_cpp_file_and_scores_it(ggml_whisper, tmp_path):
    """benchmarks/ggml_student.py: compress's arguments and training path into a whisper.cpp file, for the type
    compress refuses (q3_K; here q4_0, whose fake quantization of the tiny model's embedding is 5× cheaper)."""
    pytest.importorskip("pywhispercpp")
    import json
    import sys

    from hf_whisper_kdq.sources import save_whisper

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import ggml_student

    model, processor = ggml_whisper
    teacher = save_whisper(model, processor, tmp_path / "teacher")
    manifest = write_tones_manifest(tmp_path)
    argv = ["--teacher", str(teacher), "--train_manifest", str(manifest), "--eval_manifest", str(manifest)]
    argv += ["--quant_bit_choices", "4", "--max_steps", "1", "--per_device_train_batch_size", "2"]
    argv += ["--train_labels", "reference", "--output_dir", str(tmp_path / "run")]  # a random teacher's labels loop
    with pytest.raises(ValueError, match="--quant_format ggml"):
        ggml_student.main(argv)
    summary = ggml_student.main([*argv, "--quant_format", "ggml"])
    path = tmp_path / "run" / "ggml-model.bin"
    assert summary["file_type"] == read_file_type(path) == "q4_0"
    assert summary["file_bytes"] == path.stat().st_size == ggml_file_bytes(model, processor, "q4_0")
    assert summary["evaluation"]["n_utterances"] == 2 and summary["plan"]["quant_format"] == "ggml"
    assert summary["evaluation"]["temperature_fallback"]  # compress's evaluation default, in whisper.cpp's terms
    assert json.loads((tmp_path / "run" / "ggml_student.json").read_text())["file_type"] == "q4_0"


def test_ftypes_benchmark_puts_whisper_cpp_beside_faster_whisper_and_transformers(
    ggml_whisper, tmp_path, single_thread
):
    """benchmarks/whisper_cpp_ftypes.py: the same utterances through transformers, a whisper.cpp file and
    faster-whisper int8, each row with its file's bytes, error rate and CPU and wall seconds per audio second
    (``single_thread``: the benchmark sets torch's threads, which the fixture restores)."""
    pytest.importorskip("pywhispercpp")
    pytest.importorskip("faster_whisper")
    import sys

    from hf_whisper_kdq.sources import save_whisper

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import whisper_cpp_ftypes

    model, processor = ggml_whisper
    folder = save_whisper(model, processor, tmp_path / "model")
    args = whisper_cpp_ftypes.parse_args(
        [str(folder), "--manifest", str(write_tones_manifest(tmp_path)), "--corpus", "tones", "--limit", "2"]
        + ["--ftypes", "q8_0", "--threads", "1", "--keep", str(tmp_path / "files")]
    )
    rows = {row["format"]: row for row in whisper_cpp_ftypes.run(args)}
    assert list(rows) == ["transformers float32", "whisper.cpp q8_0", "faster-whisper int8"]
    assert rows["whisper.cpp q8_0"]["file_bytes"] == (tmp_path / "files" / "ggml-q8_0.bin").stat().st_size
    assert (
        rows["faster-whisper int8"]["file_bytes"] == (tmp_path / "files" / "ctranslate2" / "model.bin").stat().st_size
    )
    assert all(row["metric"] == "wer" and row["cpu_seconds_per_audio_second"] > 0 for row in rows.values())


def test_results_table_puts_the_whisper_cpp_file_beside_the_other_formats(ggml_whisper, tmp_path, single_thread):
    """benchmarks/results_table.py --ggml: each row also written as a whisper.cpp file, scored and timed by
    whisper.cpp; the row JSON holds the file's bytes, and results.md a table of bytes per format and RTF per runtime."""
    pytest.importorskip("pywhispercpp")
    import json
    import sys

    from hf_whisper_kdq.sources import save_whisper

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import results_table

    model, processor = ggml_whisper
    teacher = save_whisper(model, processor, tmp_path / "teacher")
    data = tmp_path / "data"
    data.mkdir()
    rows = [json.loads(line) for line in write_tones_manifest(data).read_text().splitlines()]
    (data / "dev.jsonl").write_text("".join(json.dumps({**row, "corpus": "ljspeech"}) + "\n" for row in rows))
    output = tmp_path / "table"
    argv = ["--teacher", str(teacher), "--data", str(data), "--output", str(output), "--rows", "ptq-int4g32"]
    assert results_table.main([*argv, "--no_ct2", "--ggml", "q4_0", "--threads", "1", "--keep_exports"]) == 0
    row = json.loads((output / "rows" / "ptq-int4g32.json").read_text())
    written = output / "ptq-int4g32" / "ggml-q4_0.bin"
    assert row["ggml"]["ftype"] == "q4_0" and row["ggml"]["bytes_on_disk"] == written.stat().st_size
    assert row["ggml"]["rtf"] > 0 and set(row["ggml"]["scores"]) == {"ljspeech"}
    table = (output / "results.md").read_text()
    assert (
        f"| ptq-int4g32 | {row['sizes']['bytes_on_disk'] / 1e6:.2f} MB | {written.stat().st_size / 1e6:.2f} MB (q4_0)"
        in table
    )
    with pytest.raises(ValueError, match="--ggml 'q6_K': give one of"):
        results_table.main([*argv, "--ggml", "q6_K"])
