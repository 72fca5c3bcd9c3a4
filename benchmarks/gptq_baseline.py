"""GPTQ codes of a Whisper through llm-compressor, for the results table's GPTQ rows (``results_table.py``).

llm-compressor pins a transformers older than this project's, so it runs in its own virtual environment, made once:

    python -m venv ../venv-llmc && ../venv-llmc/bin/pip install torch==2.13.0 llmcompressor==0.14.0

(``torch==2.13.0`` keeps the CPU build the project's machines have; never install it into the main environment).
This module, in the main environment, prepares the inputs, runs ``gptq_llmcompressor.py`` with that venv's python
in a subprocess and reads its compressed-tensors folder back as `QuantizedWeight` codes, which
``export.save_compressed(..., codes=...)`` stores in the package's own packed format, at the layout of the
round-to-nearest rows (bytes on disk equal by construction):

* calibration: the first ``rows`` utterances of each training manifest (English and Mandarin by default), their
  log-mel features and reference transcripts from ``prepare_dataset`` (the decoder is calibrated teacher-forced on
  the text, ``labels[:-1]``);
* targets: the Whisper linears of the quantized components (``quant.default_quant_targets``), and ``proj_out``
  when the embedding is quantized: its GPTQ codes, calibrated on the decoder's final states, are the tied token
  table's, stored once and packed as in the RTN rows.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SCRIPT = Path(__file__).resolve().with_name("gptq_llmcompressor.py")
VENV_COMMAND = "python -m venv ../venv-llmc && ../venv-llmc/bin/pip install torch==2.13.0 llmcompressor==0.14.0"
TIED_HEAD = "proj_out"


def check_llmcompressor(python: str | Path) -> str:
    """llm-compressor's version in the venv of ``python``; FileNotFoundError / RuntimeError saying how to make it."""
    if not Path(python).is_file():
        raise FileNotFoundError(
            f"no python at {python} for llm-compressor (GPTQ rows): make its venv with `{VENV_COMMAND}` (from the "
            "repository root) or pass --llmcompressor_python"
        )
    probe = subprocess.run(
        [str(python), "-c", "import llmcompressor; print(llmcompressor.__version__)"],
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        raise RuntimeError(
            f"{python} cannot import llmcompressor ({probe.stderr.strip().splitlines()[-1:]}): install it there "
            f"with `{Path(python).parent / 'pip'} install llmcompressor==0.14.0`"
        )
    return probe.stdout.strip().splitlines()[-1]  # llm-compressor logs a warning line on import without a GPU


def gptq_targets(model, components: list[str]) -> list[str]:
    """The module names GPTQ quantizes for ``components`` (``encoder`` / ``decoder`` / ``embedding``)."""
    from hf_whisper_kdq.quant import default_quant_targets

    linears = []
    if {"encoder", "decoder"} & set(components):
        linears = default_quant_targets(model, encoder="encoder" in components, decoder="decoder" in components)
    return linears + ([TIED_HEAD] if "embedding" in components else [])


def write_calibration(manifests: list[Path], rows: int, processor, path: Path) -> dict:
    """Calibration tensors of the first ``rows`` utterances of each manifest at ``path``; returns what they hold."""
    from collections import Counter

    from datasets import concatenate_datasets

    from hf_whisper_kdq import load_manifest, prepare_dataset

    dataset = concatenate_datasets([load_manifest(manifest, limit=rows) for manifest in manifests])
    prepared, report = prepare_dataset(dataset, processor, multilingual=True)
    items = list(prepared.select_columns(["input_features", "labels"]))
    # fp16 halves the file (0.5 MB a row); GPTQ runs them in fp32. The decoder reads the labels without their end.
    features = torch.stack([torch.from_numpy(row["input_features"]) for row in items]).half()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"input_features": features, "decoder_input_ids": [row["labels"][:-1].tolist() for row in items]}, path)
    return {
        "manifests": [manifest.name for manifest in manifests],
        "rows_per_manifest": rows,
        "rows": len(prepared),
        "languages": dict(Counter(prepared["language"])),
        "audio_seconds": round(sum(prepared["duration"]), 1),
        "preparation": report.summary(),
    }


def run_llmcompressor(
    python: str | Path,
    model_folder: Path,
    calibration: Path,
    targets: list[str],
    output: Path,
    *,
    bits: int,
    group_size: int,
    threads: int = 1,
) -> dict:
    """GPTQ in the llm-compressor venv (a subprocess, its log beside ``output``); returns its ``gptq_run.json``."""
    output.parent.mkdir(parents=True, exist_ok=True)
    targets_file = output.with_name(output.name + "-targets.json")
    targets_file.write_text(json.dumps(targets) + "\n", encoding="utf-8")
    log = output.with_name(output.name + ".log")
    command = [
        str(python),
        str(SCRIPT),
        f"--model={model_folder}",
        f"--calibration={calibration}",
        f"--targets={targets_file}",
        f"--output={output}",
        f"--bits={bits}",
        f"--group_size={group_size}",
        f"--threads={threads}",
    ]
    logger.info("GPTQ (llm-compressor): %s > %s", " ".join(command), log)
    with log.open("w", encoding="utf-8") as stream:
        done = subprocess.run(
            command, stdout=stream, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": str(threads)}
        )
    if done.returncode != 0:
        tail = "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-15:])
        raise RuntimeError(f"llm-compressor GPTQ failed (exit {done.returncode}; log {log}):\n{tail}")
    return json.loads((output / "gptq_run.json").read_text(encoding="utf-8"))


def read_packed_codes(folder: Path) -> dict:
    """Module name → `QuantizedWeight` of every packed layer of a compressed-tensors ``pack-quantized`` folder
    (llm-compressor's, or ``save_compressed``'s): symmetric int codes, contiguous groups, fp16-exact scales."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from safetensors import safe_open

    from hf_whisper_kdq.quant import QuantizedWeight

    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))["quantization_config"]
    codes = {}
    with safe_open(str(folder / "model.safetensors"), "pt") as tensors:
        for group in config["config_groups"].values():
            weights = group["weights"]
            if not weights["symmetric"] or weights["strategy"] != "group" or weights.get("actorder") == "group":
                raise ValueError(f"{folder}: only symmetric contiguous-group codes are read, got {weights}")
            for name in group["targets"]:
                shape = torch.Size(tensors.get_tensor(f"{name}.weight_shape").tolist())
                packed = unpack_from_int32(tensors.get_tensor(f"{name}.weight_packed"), weights["num_bits"], shape)
                scales = tensors.get_tensor(f"{name}.weight_scale").float()
                if not torch.equal(scales.half().float(), scales):
                    raise ValueError(f"{folder}: {name}'s scales are not fp16 values; the packed format stores fp16")
                codes[name] = QuantizedWeight(
                    codes=packed.to(torch.int8),
                    scales=scales,
                    bits=weights["num_bits"],
                    group_size=weights["group_size"],
                    granularity="per_group",
                )
    return codes


def gptq_codes(
    python: str | Path,
    teacher,
    processor,
    components: list[str],
    *,
    bits: int,
    group_size: int,
    manifests: list[Path],
    calibration_rows: int,
    cache: Path,
    threads: int = 1,
) -> tuple[dict, dict]:
    """GPTQ codes of ``teacher``'s ``components`` at ``bits`` / ``group_size``, computed once per setting under
    ``cache`` (the teacher's fp32 folder, the calibration tensors and llm-compressor's folder stay there for reruns).

    Returns:
        (module name → `QuantizedWeight`, the run's description: llm-compressor version, targets, calibration, time).
    """
    from hf_whisper_kdq import save_whisper

    version = check_llmcompressor(python)
    targets = gptq_targets(teacher, components)
    calibration_key = hashlib.sha256(json.dumps([[str(m) for m in manifests], calibration_rows]).encode()).hexdigest()
    calibration = cache / f"calibration-{calibration_key[:12]}.pt"
    calibration_info = calibration.with_suffix(".json")
    if not calibration.is_file():
        calibration_info.write_text(
            json.dumps(write_calibration(manifests, calibration_rows, processor, calibration), indent=2) + "\n"
        )
    model_folder = cache / "teacher-fp32"
    if not (model_folder / "model.safetensors").is_file():
        save_whisper(teacher, processor, model_folder)
    setting = json.dumps([targets, bits, group_size, calibration_key, version])
    output = cache / f"gptq-int{bits}-g{group_size}-{hashlib.sha256(setting.encode()).hexdigest()[:12]}"
    if not (output / "gptq_run.json").is_file():
        run_llmcompressor(
            python, model_folder, calibration, targets, output, bits=bits, group_size=group_size, threads=threads
        )
    run = json.loads((output / "gptq_run.json").read_text(encoding="utf-8"))
    codes = read_packed_codes(output)
    missing = sorted(set(targets) - set(codes))
    if missing:
        raise RuntimeError(f"llm-compressor's folder {output} lacks codes for {missing}")
    description = {
        "llmcompressor": version,
        "targets": len(targets),
        "folder": str(output),
        "folder_weights_bytes": (output / "model.safetensors").stat().st_size,
        "gptq_seconds": round(run["gptq_seconds"], 1),
        "pipeline": run["pipeline"],
        "dampening_frac": run["dampening_frac"],
        "calibration": json.loads(calibration_info.read_text()),
        "python": str(python),
    }
    return codes, description
