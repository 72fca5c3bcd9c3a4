"""GPTQ of a Whisper folder with llm-compressor: the step of the results table's GPTQ rows that runs in their venv.

    /work/venv-llmc/bin/python benchmarks/gptq_llmcompressor.py --model TEACHER_FOLDER \\
        --calibration calibration.pt --targets targets.json --bits 4 --group_size 32 --output GPTQ_FOLDER

It imports torch, transformers and llm-compressor only, never hf_whisper_kdq: llm-compressor pins a transformers
older than the project's, so it lives in its own virtual environment (benchmarks/README.md, "Post-training
baselines") and this file is its whole interface. ``benchmarks/ptq_baselines.py`` writes the inputs (an fp32 HF
folder of the teacher, the calibration tensors, the exact module names to quantize) and reads the output folder
(llm-compressor's compressed-tensors ``pack-quantized`` checkpoint) back into the package's own packed format.

The calibration file holds ``{"input_features": [N, 80, 3000] tensor, "decoder_input_ids": [N lists of ids]}``:
the training audio's log-mel features and its reference transcripts as teacher-forced decoder inputs
(``<|startoftranscript|><|lang|><|transcribe|><|notimestamps|> text``), so that the decoder's Hessians see text, not
only the four prompt tokens that llm-compressor's Whisper example feeds it.

Quantization: symmetric signed integers per group of ``--group_size`` input columns, static activation order
(columns visited by decreasing Hessian diagonal, groups kept contiguous: the packed format has no ``g_idx``),
min-max observer, fp16 scales, GPTQ's 1% dampening, every layer's Hessian from one pass of the float model over the
calibration set (``basic`` pipeline; see ``GPTQArguments.pipeline`` for why not ``sequential``).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import HfArgumentParser, WhisperForConditionalGeneration, WhisperProcessor


@dataclass
class GPTQArguments:
    model: str = field(metadata={"help": "HF folder of the float Whisper to quantize"})
    calibration: str = field(metadata={"help": "torch file of calibration inputs (see the module docstring)"})
    targets: str = field(metadata={"help": "JSON file: the exact names of the nn.Linear modules to quantize"})
    output: str = field(metadata={"help": "folder for llm-compressor's compressed-tensors checkpoint"})
    bits: int = field(default=4, metadata={"help": "integer width of the weights"})
    group_size: int = field(default=32, metadata={"help": "input columns per scale"})
    dampening_frac: float = field(default=0.01, metadata={"help": "GPTQ's damping, a fraction of the mean diagonal"})
    # llm-compressor 0.14's "sequential" pipeline traces Whisper into 3 subgraphs where it expects 4 (the encoder is
    # called inside the model's forward) and then fails: "AssertionError: No statistics available. Call observer(value)
    # first." "basic" calibrates every layer in one pass of the float model (no error propagation between layers).
    pipeline: str = field(
        default="basic", metadata={"help": "llm-compressor calibration pipeline (basic; sequential fails on Whisper)"}
    )
    threads: int = field(default=1, metadata={"help": "torch CPU threads"})


def calibration_loader(path: str):
    """One utterance per batch, as llm-compressor's Whisper example calibrates (decoder inputs differ in length)."""
    data = torch.load(path, weights_only=True)
    rows = [
        {"input_features": features[None].float(), "decoder_input_ids": torch.tensor([ids], dtype=torch.long)}
        for features, ids in zip(data["input_features"], data["decoder_input_ids"])
    ]
    return torch.utils.data.DataLoader(rows, batch_size=None, shuffle=False)


def main(argv=None) -> int:
    (args,) = HfArgumentParser(GPTQArguments).parse_args_into_dataclasses(args=argv)
    torch.set_num_threads(args.threads)
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    targets = json.loads(Path(args.targets).read_text(encoding="utf-8"))
    model = WhisperForConditionalGeneration.from_pretrained(args.model, dtype=torch.float32).eval()
    weights = QuantizationArgs(
        num_bits=args.bits,
        type="int",
        symmetric=True,
        strategy="group",
        group_size=args.group_size,
        actorder="static",
        observer="minmax",
        scale_dtype=torch.float16,  # what the packed file stores: GPTQ then rounds against the stored scales
    )
    recipe = GPTQModifier(
        config_groups={"group_0": QuantizationScheme(targets=targets, weights=weights)},
        dampening_frac=args.dampening_frac,
    )
    loader = calibration_loader(args.calibration)
    started = time.perf_counter()
    oneshot(
        model=model,
        processor=WhisperProcessor.from_pretrained(args.model),
        dataset=loader,
        recipe=recipe,
        num_calibration_samples=len(loader),
        pipeline=args.pipeline,
    )
    seconds = time.perf_counter() - started
    model.save_pretrained(args.output, save_compressed=True)
    import llmcompressor

    info = {"llmcompressor": llmcompressor.__version__, "calibration_rows": len(loader), "gptq_seconds": seconds}
    (Path(args.output) / "gptq_run.json").write_text(json.dumps({**vars(args), **info}, indent=2) + "\n")
    print(f"GPTQ of {len(targets)} linears on {len(loader)} utterances: {seconds:.0f} s -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
