"""How far a frozen, quantized encoder's output is from the teacher's: round-to-nearest with the recipe's searched
clip, this package's GPTQ (``frozen_encoder_quantizer="gptq"``, without clipping; and with ratios searched on its
inputs) and llm-compressor's GPTQ codes when a folder of them is given. The measure is the relative squared error of
the encoder's last hidden state on held-out training rows (never dev rows), over the whole 30 s window and over the
positions of speech alone (the manifest's duration), per language: what the decoder then has to live with.

    python benchmarks/encoder_gptq_error.py --bits 4 --calibration train_en.jsonl:32,train_zh.jsonl:16,synth_zh.jsonl:16 \\
        --llmcompressor_folder benchmarks/results/cache/gptq-int4-g32-<hash>   # results_table.py's GPTQ run

Calibration is what the trainer does, on the first rows of each ``--calibration`` manifest (the trainer's 64 evenly
spaced rows of the 2 : 1 : 1 mixture are about the line above): the clip search (``calibration.calibrate_clipping``)
for the round-to-nearest row, then GPTQ block after block (``calibration.gptq_layers``). Held out:
``--held_out_rows`` later rows of train_en and train_zh.

``--score_manifest dev.jsonl``: also transcribe that manifest with the trainer's GPTQ encoder (the ``gptq_clip_1``
row) under the teacher's float decoder and embedding, and score it (``--score_languages zh`` for one language): how
much of a KDQ student's error the frozen encoder alone costs, which decoder training cannot take back.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch

from hf_whisper_kdq import load_whisper
from hf_whisper_kdq.calibration import calibrate_clipping, gptq_layers
from hf_whisper_kdq.data import WhisperDataCollator, load_manifest, prepare_dataset
from hf_whisper_kdq.evaluation import evaluate_model
from hf_whisper_kdq.quant import default_quant_targets, prepare_qat
from hf_whisper_kdq.selection import initial_plan
from hf_whisper_kdq.students import teacher_layer_map

ROOT = Path(__file__).resolve().parents[1]
SPEECH = ROOT.parent / "shared" / "data" / "speech"


def batches(teacher, processor, manifest: Path, start: int, count: int) -> list[dict]:
    rows = load_manifest(manifest, limit=start + count).select(range(start, start + count))
    features, _ = prepare_dataset(rows, processor, multilingual=True)
    collate = WhisperDataCollator(processor, decoder_start_token_id=teacher.config.decoder_start_token_id)
    result = []
    for j in range(0, count, 8):
        batch = collate([features[i] for i in range(j, min(j + 8, count))])
        # Encoder positions are 20 ms each; the rest of the 30 s window is padding.
        batch["speech_positions"] = [math.ceil(d * 50) + 1 for d in features[j : j + 8]["duration"]]
        result.append(batch)
    return result


@torch.no_grad()
def encoder_error(model, held_out: dict[str, list[dict]], reference: dict[str, list[torch.Tensor]]) -> dict:
    """{language: relative squared error of the encoder's output on that language's held-out rows, over every
    position of the 30 s window (``all``) and over the positions of the speech alone (``speech``)}."""
    errors = {}
    for language, batches_ in held_out.items():
        sums = {"all": [0.0, 0.0], "speech": [0.0, 0.0]}
        for batch, ref in zip(batches_, reference[language], strict=True):
            squared = (model.model.encoder(batch["input_features"]).last_hidden_state - ref).pow(2).sum(-1)
            energy = ref.pow(2).sum(-1)
            sums["all"][0] += float(squared.sum())
            sums["all"][1] += float(energy.sum())
            for row, positions in enumerate(batch["speech_positions"]):
                sums["speech"][0] += float(squared[row, :positions].sum())
                sums["speech"][1] += float(energy[row, :positions].sum())
        errors[language] = {part: round(error / energy, 5) for part, (error, energy) in sums.items()}
    return errors


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="openai/whisper-base")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group_size", type=int, default=32)
    parser.add_argument(
        "--calibration",
        default="train_en.jsonl:32,train_zh.jsonl:16,synth_zh.jsonl:16",
        help="manifest:rows,... (the first rows of each); the default is about the trainer's 64 probe rows of the "
        "2:1:1 mixture",
    )
    parser.add_argument("--held_out_rows", type=int, default=16, help="per language, after the calibration rows")
    parser.add_argument("--speech", type=Path, default=SPEECH, help="folder of train_en.jsonl and train_zh.jsonl")
    parser.add_argument("--llmcompressor_folder", type=Path, help="a pack-quantized folder of llm-compressor's GPTQ")
    parser.add_argument("--score_manifest", type=Path, help="transcribe and score it with the GPTQ encoder")
    parser.add_argument("--score_languages", help="comma-separated: score only these languages of it")
    parser.add_argument("--score_max_new_tokens", type=int, default=444)
    parser.add_argument("--output_json", type=Path)
    args = parser.parse_args(argv)

    teacher, processor = load_whisper(args.teacher)
    calibration = []
    for entry in args.calibration.split(","):
        manifest, _, rows = entry.partition(":")
        calibration += batches(teacher, processor, args.speech / manifest, 0, int(rows))
    held_out = {
        "en": batches(teacher, processor, args.speech / "train_en.jsonl", 3000, args.held_out_rows),
        "zh": batches(teacher, processor, args.speech / "train_zh.jsonl", 150, args.held_out_rows),
    }
    with torch.no_grad():
        reference = {
            language: [teacher.model.encoder(b["input_features"]).last_hidden_state for b in rows]
            for language, rows in held_out.items()
        }

    names = default_quant_targets(teacher, decoder=False)
    plan = initial_plan(
        names,
        teacher_layer_map(teacher, teacher),
        bits=args.bits,
        granularity="per_group",
        group_size=args.group_size,
        learnable_clipping=True,
    )
    rounded = copy.deepcopy(teacher)
    prepare_qat(rounded, plan.module_specs())
    calibrate_clipping(rounded, plan, calibration)
    results = {"round_to_nearest_searched_clip": encoder_error(rounded, held_out, reference)}
    seconds = {}
    for label, clipping in (("gptq_clip_1", "none"), ("gptq_searched_clip", "searched")):  # the first: the trainer's
        model = copy.deepcopy(rounded)
        start = time.perf_counter()
        gptq_layers(model, names, calibration, clipping=clipping)
        seconds[label] = round(time.perf_counter() - start, 1)
        results[label] = encoder_error(model, held_out, reference)
        if args.score_manifest and label == "gptq_clip_1":
            rows = load_manifest(args.score_manifest)
            if args.score_languages:
                rows = rows.filter(lambda row: row["language"] in args.score_languages.split(","))
            report = evaluate_model(model.eval(), processor, rows, max_new_tokens=args.score_max_new_tokens)
            results["gptq_clip_1_float_decoder_scores"] = [
                {
                    key: corpus[key]
                    for key in ("corpus", "metric", "error_rate", "substitutions", "deletions", "insertions")
                }
                for corpus in report.corpora
            ]
    if args.llmcompressor_folder:
        from gptq_baseline import read_packed_codes

        codes = read_packed_codes(args.llmcompressor_folder)
        model = copy.deepcopy(teacher)
        for name in names:
            model.get_submodule(name).weight.data.copy_(codes[name].dequantize(torch.float32))
        run = json.loads((args.llmcompressor_folder / "gptq_run.json").read_text(encoding="utf-8"))
        results["llmcompressor_gptq"] = encoder_error(model, held_out, reference)
        results["llmcompressor_setting"] = {
            key: run.get(key) for key in ("calibration_rows", "pipeline", "llmcompressor")
        }
    summary = {
        "bits": args.bits,
        "group_size": args.group_size,
        "calibration": args.calibration,
        "threads": torch.get_num_threads(),
        "relative_encoder_error": results,
        "gptq_seconds": seconds,
    }
    print(json.dumps(summary, indent=2, ensure_ascii=False, default=str))
    if args.output_json:
        args.output_json.write_text(json.dumps(summary, indent=2, ensure_ascii=False, default=str) + "\n")
    return summary


if __name__ == "__main__":
    main()
