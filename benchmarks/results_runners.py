"""How the rows of ``results_table.py`` are computed: the state rows share (`Context`: the teacher, the evaluation
sets, the training data), the measurement of one model (error rates, speed, bytes on disk) and one runner per kind
of row (reference, PTQ, GPTQ, training). ``results_table.py`` parses the command line, runs rows and merges them."""

from __future__ import annotations

import copy
import gc
import json
import logging
import tempfile
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from results_table import TableArguments

    from hf_whisper_kdq.export import CompressionReport

GROUP_SIZE = 32  # DistillQuantArguments.quant_group_size default; used by the uniform budgets and PTQ specs

logger = logging.getLogger("results_table")


# ---- shared state ----------------------------------------------------------------------------------------------------
class Context:
    """What rows share within one invocation: the teacher, the evaluation sets, the training data."""

    def __init__(self, args: TableArguments):
        from hf_whisper_kdq.compress import PhaseTimer

        self.args = args
        self.data = Path(args.data)
        self.output = Path(args.output)
        self.cache = self.output / "cache"
        self.cache.mkdir(parents=True, exist_ok=True)
        self._teacher = None
        self._eval_sets: dict[bool, object] = {}
        self._train = None
        self.timer = PhaseTimer()

    def teacher(self):
        """(model fp32, processor), loaded once; rows work on copies."""
        if self._teacher is None:
            from hf_whisper_kdq import load_whisper

            with self.timer("load teacher"):
                self._teacher = load_whisper(self.args.teacher)
        return self._teacher

    def eval_set(self, english_only: bool):
        """The first ``eval_limit`` utterances of each corpus of dev.jsonl (English ones only if asked)."""
        if english_only not in self._eval_sets:
            from datasets import concatenate_datasets

            from hf_whisper_kdq import load_manifest

            manifest = self.data / "dev.jsonl"
            corpora = {}
            for line in manifest.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    row = json.loads(line)
                    corpora.setdefault(row.get("corpus"), row.get("language"))
            parts = [
                load_manifest(manifest, corpora=[corpus], limit=self.args.eval_limit)
                for corpus, language in corpora.items()
                if not english_only or language == "en"
            ]
            self._eval_sets[english_only] = concatenate_datasets(parts) if len(parts) > 1 else parts[0]
        return self._eval_sets[english_only]

    def teacher_sizes(self) -> dict:
        """The teacher's fp16 weights file on disk and its fp16 parameter bytes, measured once per teacher."""
        path = self.cache / "teacher_sizes.json"
        known = json.loads(path.read_text()) if path.is_file() else {}
        if self.args.teacher not in known:
            model, processor = self.teacher()
            known[self.args.teacher] = {
                "fp16_bytes_on_disk": fp16_weights_bytes(model, processor),
                "fp16_parameter_bytes": 2 * n_parameters(model),
            }
            path.write_text(json.dumps(known, indent=2) + "\n")
        return known[self.args.teacher]

    def training_data(self):
        """The --train_manifest mixture, else teacher-labelled LibriSpeech (labels cached); + synthetic speech; via
        compress.training_data."""
        if self._train is None:
            from hf_whisper_kdq import load_manifest
            from hf_whisper_kdq.compress import CompressArguments, training_data

            if self.args.train_manifest:
                names = [name.strip() for name in self.args.train_manifest.split(",") if name.strip()]
                manifests = ",".join(str(self.data / name) for name in names)
            else:
                manifests = str(self.labelled_manifest())
            compress = CompressArguments(
                teacher=self.args.teacher,
                level="none",
                train_manifest=manifests,
                train_weights=self.args.train_weights,
                max_train_samples=self.args.max_train_samples,
                synthetic_prompts=self.args.synthetic_rows,
                synthetic_text=self.args.synthetic_text,
            )
            model, processor = self.teacher()
            if not self.args.train_manifest and len(load_manifest(manifests)) == 0 and not compress.synthetic_prompts:
                raise ValueError("no training data: every teacher label was empty and --synthetic_rows is 0")
            self._train = training_data(compress, model, processor, timer=self.timer)
        return self._train

    def labelled_manifest(self) -> Path:
        """A manifest of the first ``train_rows`` unlabeled utterances with the teacher's transcripts as text."""
        from hf_whisper_kdq import load_manifest
        from hf_whisper_kdq.labelling import pseudo_label

        unlabeled = load_manifest(self.data / "unlabeled.jsonl", limit=self.args.train_rows)
        slug = safe_name(self.args.teacher)
        cache_path = self.cache / f"labels-{slug}.json"  # {id: teacher transcript, or null when it was empty}
        labels = json.loads(cache_path.read_text(encoding="utf-8")) if cache_path.is_file() else {}
        todo = [i for i, row_id in enumerate(unlabeled["id"]) if row_id not in labels]
        if todo:
            model, processor = self.teacher()
            with self.timer(f"label {len(todo)} utterances with the teacher"):
                labelled, report = pseudo_label(
                    unlabeled.select(todo), model, processor, batch_size=self.args.batch_size, progress=False
                )
            logger.info("%s", report.summary())
            got = dict(zip(labelled["id"], labelled["text"]))
            for i in todo:
                labels[unlabeled[i]["id"]] = got.get(unlabeled[i]["id"])
            cache_path.write_text(json.dumps(labels, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        manifest = self.cache / f"train-{slug}-{len(unlabeled)}.jsonl"
        with manifest.open("w", encoding="utf-8") as file:
            for row in unlabeled:
                if labels.get(row["id"]):
                    entry = {key: row[key] for key in ("id", "corpus", "language", "duration")}
                    file.write(
                        json.dumps(
                            {**entry, "audio": row["audio"]["path"], "text": labels[row["id"]]}, ensure_ascii=False
                        )
                        + "\n"
                    )
        return manifest


def safe_name(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-._" else "--" for ch in text).strip("-.") or "model"


def n_parameters(model) -> int:
    from hf_whisper_kdq.adapters import ADAPTERS_ATTRIBUTE

    return sum(p.numel() for name, p in model.named_parameters() if not name.startswith(f"{ADAPTERS_ATTRIBUTE}."))


def fp16_weights_bytes(model, processor) -> int:
    """Bytes of the weight files of an fp16 HF copy of ``model`` (save_whisper in a temporary folder)."""
    from hf_whisper_kdq import save_whisper
    from hf_whisper_kdq.evaluation import weight_files

    with tempfile.TemporaryDirectory() as scratch:
        folder = save_whisper(copy.deepcopy(model).half(), processor, Path(scratch) / "fp16")
        return sum(path.stat().st_size for path in weight_files(folder))


def inference_copy(model):
    """A plain fp32 model for decoding: fake-quant wrappers baked in (convert_qat), training adapters dropped."""
    from hf_whisper_kdq.adapters import strip_training_only

    plain = copy.deepcopy(model).cpu()
    strip_training_only(plain)
    return plain.float().eval()


# ---- measuring one model ---------------------------------------------------------------------------------------------
def scores(report) -> dict:
    keys = ("metric", "error_rate", "n_utterances", "audio_seconds", "decode_seconds", "rtf")
    return {entry["corpus"]: {key: entry[key] for key in keys} for entry in report.corpora}


def evaluation_entry(report, english_only: bool) -> dict:
    """A row JSON's ``evaluation``: an ``EvaluationReport``'s scores per corpus and its costs."""
    return {
        "english_only": english_only,
        "scores": scores(report),
        "rtf": report.rtf,
        "n_utterances": report.n_utterances,
        "audio_seconds": report.audio_seconds,
        "batch_size": report.batch_size,
        "num_beams": report.num_beams,
        "dtype": report.dtype,
    }


def measure(ctx: Context, name: str, model, processor, row_dir: Path, result: dict) -> None:
    """Transformers evaluation of ``model`` (QAT wrappers baked in), then the optional CTranslate2 int8 run."""
    from hf_whisper_kdq import evaluate_model

    english_only = not getattr(model.generation_config, "is_multilingual", True)
    dataset = ctx.eval_set(english_only)
    plain = inference_copy(model)
    with ctx.timer(f"{name}: evaluate (transformers)"):
        report = evaluate_model(
            plain,
            processor,
            dataset,
            batch_size=ctx.args.batch_size,
            max_new_tokens=ctx.args.max_new_tokens,
            progress=False,
        )
    del plain
    gc.collect()
    report.save_json(row_dir / "eval_transformers.json", per_utterance=True)
    result["evaluation"] = {**evaluation_entry(report, english_only), "max_new_tokens": ctx.args.max_new_tokens}
    result["ct2"] = None
    if ctx.args.ct2:
        from hf_whisper_kdq.evaluation import weight_files
        from hf_whisper_kdq.evaluation_ctranslate2 import evaluate_faster_whisper
        from hf_whisper_kdq.export.ctranslate2 import export_ctranslate2

        with ctx.timer(f"{name}: CTranslate2 int8 export + evaluate"):
            folder = export_ctranslate2(
                model, processor, row_dir / "ctranslate2-int8", quantization="int8", overwrite=True
            )
            ct2 = evaluate_faster_whisper(
                folder, dataset, cpu_threads=ctx.args.threads, max_new_tokens=ctx.args.max_new_tokens
            )
        ct2.save_json(row_dir / "eval_ct2.json", per_utterance=True)
        result["ct2"] = {
            "quantization": "int8",
            "compute_type": ct2.dtype,
            "rtf": ct2.rtf,
            "scores": scores(ct2),
            "bytes_on_disk": sum(path.stat().st_size for path in weight_files(folder)),
        }
    result["ggml"] = measure_whisper_cpp(ctx, name, model, processor, dataset, row_dir) if ctx.args.ggml else None


def measure_whisper_cpp(ctx: Context, name: str, model, processor, dataset, row_dir: Path) -> dict:
    """``model`` written as a whisper.cpp file of type ``--ggml`` and scored and timed by whisper.cpp itself."""
    from hf_whisper_kdq.export.ggml import evaluate_whisper_cpp, export_whisper_cpp, read_file_type

    ftype = ctx.args.ggml
    with ctx.timer(f"{name}: whisper.cpp {ftype} export + evaluate"):
        path = export_whisper_cpp(
            model, processor, row_dir / f"ggml-{ftype}.bin", ftype=ftype, requantize=ftype != "auto", overwrite=True
        )
        report = evaluate_whisper_cpp(path, dataset, n_threads=ctx.args.threads)
    report.save_json(row_dir / "eval_whisper_cpp.json", per_utterance=True)
    return {
        "ftype": read_file_type(path),  # what "auto" chose
        "rtf": report.rtf,
        "scores": scores(report),
        "bytes_on_disk": path.stat().st_size,
    }


def sizes_from_report(report: CompressionReport, teacher: dict) -> dict:
    planned = report.paper_accounting["planned_bytes"]
    return {
        "bytes_on_disk": report.weights_bytes,
        "all_files_bytes": report.total_bytes,
        "paper_bytes": planned,
        "paper_as_stored_bytes": report.paper_accounting["as_stored_bytes"],
        "ratio_to_teacher_fp16": teacher["fp16_bytes_on_disk"] / report.weights_bytes,
        "paper_ratio": teacher["fp16_parameter_bytes"] / planned,
        "embedding_quantized_on_disk": report.embedding_quantized,
        "embedding_planned_bits": report.embedding_planned_bits,
        "embedding_reason": report.embedding_reason,
        "per_layer_bits": report.per_layer_bits,
        "planned_bits": sorted({m["planned_bits"] for m in report.modules.values()}),
    }


def float_sizes(model, processor, teacher: dict) -> dict:
    on_disk = fp16_weights_bytes(model, processor)
    paper = 2 * n_parameters(model)
    return {
        "bytes_on_disk": on_disk,
        "paper_bytes": paper,
        "stored": "fp16 safetensors (save_whisper)",
        "ratio_to_teacher_fp16": teacher["fp16_bytes_on_disk"] / on_disk,
        "paper_ratio": teacher["fp16_parameter_bytes"] / paper,
    }


# ---- the three kinds of rows -----------------------------------------------------------------------------------------
def run_reference(ctx: Context, name: str, row: dict, row_dir: Path, result: dict) -> None:
    from hf_whisper_kdq import load_whisper

    teacher_sizes = ctx.teacher_sizes()
    if row["model"] == "teacher":
        model, processor = ctx.teacher()
        source = ctx.args.teacher
    else:
        source = ctx.args.tiny
        with ctx.timer(f"{name}: load"):
            model, processor = load_whisper(source)
    result["model"] = source
    result["sizes"] = float_sizes(model, processor, teacher_sizes)
    measure(ctx, name, model, processor, row_dir, result)


def ptq_model(teacher, component_specs: dict[str, str]):
    """A copy of ``teacher`` with round-to-nearest fake quantization: one spec (``"int4-g32"``…) per component
    (``encoder`` / ``decoder`` / ``embedding``); components left out stay float."""
    from hf_whisper_kdq.quant import default_quant_targets, prepare_qat

    model = copy.deepcopy(teacher)
    specs = {}
    for component, spec in component_specs.items():
        targets = default_quant_targets(
            model, encoder=component == "encoder", decoder=component == "decoder", embedding=component == "embedding"
        )
        specs.update(dict.fromkeys(targets, spec))
    prepare_qat(model, specs)  # the tied proj_out follows the embedding
    return model


def packed_sizes(model, processor, teacher_sizes: dict, folder: Path, plan=None, codes=None) -> dict:
    """The table's sizes of a quantized row (PTQ, GPTQ's ``codes``, or trained with its ``plan``), from its packed
    checkpoint."""
    from hf_whisper_kdq import save_compressed

    report = save_compressed(
        model,
        processor,
        folder,
        plan=plan,
        teacher_fp16_bytes=teacher_sizes["fp16_parameter_bytes"],
        overwrite=True,
        codes=codes,
    )
    return sizes_from_report(report, teacher_sizes)


def calibration_batches(ctx: Context, batch_size: int = 8) -> list[dict]:
    """The GPTQ calibration utterances (``--calibration_manifests``, ``--calibration_rows`` each) as training
    batches: what the output-error clip search weighs the weights' errors with."""
    from datasets import concatenate_datasets

    from hf_whisper_kdq import WhisperDataCollator, load_manifest, prepare_dataset

    teacher, processor = ctx.teacher()
    names = [part.strip() for part in ctx.args.calibration_manifests.split(",") if part.strip()]
    rows = concatenate_datasets([load_manifest(ctx.data / n, limit=ctx.args.calibration_rows) for n in names])
    prepared, _ = prepare_dataset(rows, processor, multilingual=True)
    collate = WhisperDataCollator(processor, teacher.config.decoder_start_token_id)
    return [
        collate(list(prepared.select(range(i, min(i + batch_size, len(prepared))))))
        for i in range(0, len(prepared), batch_size)
    ]


def clip_on_inputs(ctx: Context, model) -> None:
    """Search ``model``'s clipping ratios for least expected output error on the calibration audio, as training
    does before its first step (``calibration.calibrate_clipping`` on a one-width plan of the prepared layers)."""
    from hf_whisper_kdq.calibration import calibrate_clipping
    from hf_whisper_kdq.quant import quant_specs
    from hf_whisper_kdq.selection import initial_plan

    specs = {name: spec for name, spec in quant_specs(model).items() if spec is not None and name != "proj_out"}
    (spec,) = set(specs.values())
    config = model.config
    layers = {"encoder": list(range(config.encoder_layers)), "decoder": list(range(config.decoder_layers))}
    plan = initial_plan(
        list(specs),
        layers,
        bits=spec.bits,
        granularity=spec.granularity,
        group_size=spec.group_size,
        learnable_clipping=True,
    )
    calibrate_clipping(model, plan, calibration_batches(ctx))


def run_ptq(ctx: Context, name: str, row: dict, row_dir: Path, result: dict) -> None:
    teacher, processor = ctx.teacher()
    model = ptq_model(teacher, row["specs"])
    if row.get("clip_search") == "inputs":
        with ctx.timer(f"{name}: clip search on the calibration audio"):
            clip_on_inputs(ctx, model)
    result["model"] = f"{ctx.args.teacher} + round-to-nearest {row['specs']}"
    with ctx.timer(f"{name}: save_compressed"):
        result["sizes"] = packed_sizes(model, processor, ctx.teacher_sizes(), row_dir / "compressed")
    measure(ctx, name, model, processor, row_dir, result)


def run_gptq(ctx: Context, name: str, row: dict, row_dir: Path, result: dict) -> None:
    """GPTQ's codes (llm-compressor in its venv, gptq_baseline.py) in the packed layout of the RTN row with the same
    specs, evaluated from the folder as a user loads it (plain from_pretrained: weights unpacked to fp32)."""
    from gptq_baseline import TIED_HEAD, gptq_codes

    from hf_whisper_kdq import load_whisper
    from hf_whisper_kdq.quant import QuantSpec

    teacher, processor = ctx.teacher()
    (spec,) = {QuantSpec.parse(text) for text in row["specs"].values()}  # one layout: one GPTQ run
    manifests = [ctx.data / part.strip() for part in ctx.args.calibration_manifests.split(",") if part.strip()]
    with ctx.timer(f"{name}: GPTQ (llm-compressor)"):
        codes, result["gptq"] = gptq_codes(
            ctx.args.llmcompressor_python,
            teacher,
            processor,
            list(row["specs"]),
            bits=spec.bits,
            group_size=spec.group_size,
            manifests=manifests,
            calibration_rows=ctx.args.calibration_rows,
            cache=ctx.cache,
            threads=ctx.args.threads,
        )
    if row.get("tied_embedding") == "rtn":
        codes.pop(TIED_HEAD, None)
    result["model"] = f"{ctx.args.teacher} + GPTQ (llm-compressor) {row['specs']}"
    folder = row_dir / "compressed"
    with ctx.timer(f"{name}: save_compressed"):
        model = ptq_model(teacher, row["specs"])  # the layout; its round-to-nearest codes give way to GPTQ's
        result["sizes"] = packed_sizes(model, processor, ctx.teacher_sizes(), folder, codes=codes)
    loaded, _ = load_whisper(folder)
    measure(ctx, name, loaded, processor, row_dir, result)


def uniform_budget_mb(student, targets: str, bits: int) -> float:
    """Paper-accounting MB of ``student`` with every targeted layer at ``bits`` (per group of 32), plus one byte."""
    from hf_whisper_kdq.quant import default_quant_targets, quantized_size_bytes

    chosen = set(targets.split(","))
    names = default_quant_targets(
        student, encoder="encoder" in chosen, decoder="decoder" in chosen, embedding="embedding" in chosen
    )
    size = quantized_size_bytes(student, dict.fromkeys(names, f"int{bits}-g{GROUP_SIZE}"))
    return (size + 1) / 1e6


def quantizes_encoder(row: dict) -> bool:
    return "encoder" in row["quant_targets"].split(",") and row["bits"] != "float"


def student_description(teacher: str, student) -> str:
    return f"student of {teacher}: {student.config.encoder_layers} encoder / {student.config.decoder_layers} decoder layers"


def training_arguments(
    row: dict,
    student,
    output_dir: Path,
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    **extra,
):
    """The DistillQuantArguments of a trained row (compress's training defaults for the rest); ``extra`` adds or
    overrides fields (the GPU script's bf16, loaders, device)."""
    from dataclasses import replace

    from transformers import HfArgumentParser

    from hf_whisper_kdq import DistillQuantArguments
    from hf_whisper_kdq.compress import with_training_defaults

    fields = dict(
        output_dir=str(output_dir),
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        learning_rate=row.get("learning_rate", learning_rate),
        warmup_steps=row.get("warmup_steps", min(10, steps // 10)),
        seed=seed,
        logging_steps=max(1, min(10, steps // 5)),
        disable_tqdm=True,
        quant_targets=row["quant_targets"],
        quant_bit_choices=row["bits"],
        quant_group_size=GROUP_SIZE,
        quant_granularity="per_group",
        kd_weight=row.get("kd_weight", 1.0),
        hidden_weight=row.get("hidden_weight", 1.0),
        hidden_loss_scale=row.get("hidden_loss_scale", "absolute"),
        # compress freezes the encoder by default, which means round-to-nearest for a quantized one (its clipping
        # frozen too): a row that quantizes the encoder trains it, as the method does.
        freeze_encoder=row.get("freeze_encoder", not quantizes_encoder(row)),
    )
    if row["guided"]:
        # Re-planning late undid training on the GPU (loss 0.57 → 2.38 after the re-plan at step 250 of 500):
        # the second half keeps the plan of the first.
        fields.update(layer_matching="dynamic_monotone", selection_interval=max(1, steps // 4), selection_until=0.5)
    else:
        fields.update(layer_matching="static", selection_interval=0)
    if row["budget"]:
        bits = int(row["budget"].split(":")[1])
        fields["size_budget_mb"] = round(uniform_budget_mb(student, row["quant_targets"], bits), 6)
    # The rows' budgets are paper-accounting sizes: compress's defaults under --level smoke (the paper's accounting),
    # each row then setting its own layout.
    compress_defaults = with_training_defaults(["--level", "smoke"])[2:]
    (defaults,) = HfArgumentParser(DistillQuantArguments).parse_args_into_dataclasses(args=compress_defaults)
    return replace(defaults, **fields, **extra)


def run_training(ctx: Context, name: str, row: dict, row_dir: Path, result: dict) -> None:
    from hf_whisper_kdq import build_student, prepare_dataset
    from hf_whisper_kdq.compress import train_student

    args = ctx.args
    teacher, processor = ctx.teacher()
    teacher_sizes = ctx.teacher_sizes()
    train = ctx.training_data()
    student = build_student(teacher, decoder_layers=row["decoder_layers"])
    training_args = training_arguments(
        row,
        student,
        row_dir / "trainer",
        steps=args.train_steps,
        batch_size=args.train_batch_size,
        learning_rate=args.learning_rate,
        seed=args.seed,
        **({"bf16": True, "use_cpu": True} if args.bf16 else {}),
    )
    with ctx.timer(f"{name}: features and labels"):
        multilingual = bool(teacher.generation_config.is_multilingual)
        features, preparation = prepare_dataset(train, processor, multilingual=multilingual)
    with ctx.timer(f"{name}: train"):
        trainer = train_student(student, teacher, processor, features, training_args)
    student = trainer.whole_student().eval()
    plan, output = trainer.plan, trainer.state.log_history[-1]  # the Trainer logs its run's totals last
    logger.info("%s plan:\n%s", name, plan.summary())
    result["model"] = student_description(args.teacher, student)
    result["training"] = {
        "train_steps": args.train_steps,
        "batch_size": args.train_batch_size,
        "learning_rate": args.learning_rate,
        "rows": len(features),
        "corpora": dict(Counter(features["corpus"])),
        "preparation": preparation.summary(),
        "train_runtime_s": output.get("train_runtime"),
        "final_train_loss": output.get("train_loss"),
        "log_history": trainer.state.log_history,
        "arguments": {k: v for k, v in training_args.to_dict().items() if k in TRAINING_KEYS},
    }
    result["plan"] = plan.to_dict()
    result["plan_summary"] = plan.summary()
    if plan.module_specs():
        with ctx.timer(f"{name}: save_compressed"):
            result["sizes"] = packed_sizes(student, processor, teacher_sizes, row_dir / "compressed", plan=plan)
    else:  # distillation only: a float student
        result["sizes"] = float_sizes(inference_copy(student), processor, teacher_sizes)
    measure(ctx, name, student, processor, row_dir, result)
    del trainer
    gc.collect()


TRAINING_KEYS = {
    "max_steps",
    "per_device_train_batch_size",
    "learning_rate",
    "warmup_steps",
    "seed",
    "ce_weight",
    "kd_weight",
    "hidden_weight",
    "quant_weight",
    "kd_temperature",
    "layer_matching",
    "quant_bit_choices",
    "quant_granularity",
    "quant_group_size",
    "learnable_clipping",
    "quant_targets",
    "size_budget_mb",
    "num_distill_layers",
    "selection_interval",
    "selection_until",
    "selection_probe_batches",
    "freeze_encoder",
    "bf16",
}


RUNNERS = {"reference": run_reference, "ptq": run_ptq, "gptq": run_gptq, "train": run_training}
