"""The model card of a compressed Whisper: metadata (model-index, base model), tables, the plan figure, usage.

``build_model_card`` renders ``model_cards/kdq_model_card.md.jinja`` with huggingface_hub's
``ModelCard.from_template``; ``write_model_card`` writes ``README.md`` and the plan figure
(:func:`figures.plot_plan`) into the checkpoint folder.

**``eval_results``** (error rates as fractions, one row or report per model): read by
:func:`hf_whisper_kdq.card_scores.collect_results`, whose module docstring gives their shapes. The card, its tables
*and* its ``model-index`` show **percentages** rounded to 2 decimals (``metric_value: 12.34`` means 12.34 % WER), as
OpenAI's Whisper cards do.

**``compression_report``** (written by ``hf_whisper_kdq.export``; every key optional, first alias found wins):
``total_bytes``/``bytes_on_disk``/``size_bytes`` (packed checkpoint), ``files`` ({path: bytes} or
[{path, bytes}]), ``components`` ({name: bytes}), ``teacher_fp16_bytes``/``teacher.fp16_bytes``,
``teacher_fp32_bytes``/``teacher.fp32_bytes``, ``ratio_to_teacher_fp16``/``ratio_to_teacher_fp32`` (a factor > 1
or a fraction ≤ 1), ``paper_accounting`` (dict or text), ``per_layer_bits`` ({unit: bits}),
``embedding_quantized`` + ``embedding_reason``, ``format``, ``ctranslate2`` (bool or {quantization}).

Nothing local reaches the card: local paths become basenames, ``hf_…`` tokens are redacted, and the rendered
text is scrubbed of absolute paths and the home folder before it is returned.
"""

from __future__ import annotations

import json
import math
import re
from collections import namedtuple
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from .card_scores import ROLES, ModelStats, Score, collect_results, eval_results_for_card, language_label
from .export.report import CompressionReport
from .figures import plot_plan
from .files import CT2_EXPORT_MARKER, atomic_write_text
from .hub import hub_model_id, public, scrub
from .quant import FLOAT_BITS
from .selection import KDQPlan

TEMPLATE_NAME = "kdq_model_card.md.jinja"
TAGS = ["whisper", "distillation", "quantization", "hf-whisper-kdq"]
CITATION = """@article{shao2023whisperkdq,
  title   = {Whisper-KDQ: A Lightweight Whisper via Guided Knowledge Distillation and Quantization for Efficient ASR},
  author  = {Shao, Hang and Wang, Wei and Liu, Bei and Gong, Xun and Wang, Haoyu and Qian, Yanmin},
  journal = {arXiv preprint arXiv:2305.10788},
  year    = {2023}
}"""
# Shown when present; other keys of a plain dict are kept unless they name paths, tokens, hub or logging settings.
HYPERPARAMETERS = (
    "learning_rate",
    "num_train_epochs",
    "max_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "warmup_steps",
    "warmup_ratio",
    "lr_scheduler_type",
    "weight_decay",
    "optim",
    "max_grad_norm",
    "seed",
    "fp16",
    "bf16",
    "gradient_checkpointing",
    "label_smoothing_factor",
    "ce_weight",
    "kd_weight",
    "hidden_weight",
    "quant_weight",
    "kd_temperature",
    "hidden_target",
    "hidden_representation",
    "layer_matching",
    "quant_bit_choices",
    "quant_granularity",
    "quant_group_size",
    "quant_symmetric",
    "learnable_clipping",
    "quant_targets",
    "size_budget_mb",
    "size_budget_ratio",
    "num_distill_layers",
    "selection_interval",
    "selection_until",
    "selection_probe_batches",
    "freeze_encoder",
    "teacher_cache_top_k",
)
# Shown only when they differ from these values: at them, the option changes nothing the card should report.
_SHOWN_UNLESS = {"teacher_cache_top_k": 0}  # 0: the exact KD loss; k > 0 trains on a top-k form of it
_HIDDEN_KEY = re.compile(r"dir|path|file|token|hub|url|report_to|run_name|logging|push|resume|cache|device|local_rank")


# ---- inputs ------------------------------------------------------------------------------------------------------


def _get(mapping: Mapping | None, *keys: str, default: Any = None) -> Any:
    """First present, non-None value among dotted ``keys`` (``"teacher.fp16_bytes"`` reads a nested dict)."""
    for key in keys:
        node: Any = mapping
        for part in key.split("."):
            node = node.get(part) if isinstance(node, Mapping) else None
        if node is not None:
            return node
    return default


def _mb(n_bytes: float | None) -> str:
    return "–" if n_bytes is None else f"{n_bytes / 1e6:,.1f} MB"


def _pct(value: float | None) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.2f}"


def _files(report: Mapping) -> dict[str, int]:
    files = _get(report, "files", "bytes_per_file", "checkpoint.files", default={})
    if isinstance(files, Mapping):
        items = [(k, v.get("bytes", v.get("size")) if isinstance(v, Mapping) else v) for k, v in files.items()]
    else:
        items = [(f.get("path") or f.get("name") or f.get("file"), f.get("bytes", f.get("size"))) for f in files]
    return {str(PurePosixPath(str(k).replace("\\", "/"))): int(v) for k, v in items if k and v is not None}


def _factor(report: Mapping, size: int | None, teacher: int | None, key: str) -> float | None:
    if size and teacher:
        return teacher / size
    ratio = _get(report, f"ratio_to_teacher_{key}", f"ratio.teacher_{key}", f"ratios.teacher_{key}")
    return None if not ratio else float(ratio) if float(ratio) > 1 else 1 / float(ratio)


def _freezes_encoder(training_args: Any) -> bool:
    if training_args is None:
        return False
    value = (
        training_args.get("freeze_encoder")
        if isinstance(training_args, Mapping)
        else getattr(training_args, "freeze_encoder", False)
    )
    return str(value).lower() == "true"


def _hyperparameters(training_args: Any) -> list[tuple[str, str]]:
    if training_args is None:
        return []
    values = training_args.to_dict() if hasattr(training_args, "to_dict") else dict(training_args)
    plain = isinstance(training_args, Mapping)
    keys = [k for k in HYPERPARAMETERS if k in values]
    if plain:
        keys += [k for k in values if k not in HYPERPARAMETERS and not _HIDDEN_KEY.search(k.lower())]
    return [
        (public(k), public(json.dumps(v) if isinstance(v, (list, dict, tuple)) else v))
        for k in keys
        if (v := values[k]) is not None and v != "" and not (k in _SHOWN_UNLESS and v == _SHOWN_UNLESS[k])
    ]


def _bits_text(bits: int) -> str:
    return "fp16" if bits >= FLOAT_BITS else str(bits)


def _plan_rows(plan: KDQPlan) -> list[list[str]]:
    def number(value: float | None) -> str:
        return "" if value is None else f"{value:.3g}"

    return [
        [
            public(u.name),
            _bits_text(u.bits),
            "✓" if u.distilled else "",
            "" if u.teacher_layer is None else str(u.teacher_layer),
            number(u.quant_loss.get(u.bits)),
            number(u.distill_loss),
        ]
        for u in plan.units
    ]


def find_template(template_path: str | Path | None = None) -> Path:
    """``template_path``, else the package's one template, ``model_cards/kdq_model_card.md.jinja``: inside the
    installed package (setup.py ships the top-level ``model_cards/`` folder as ``hf_whisper_kdq/model_cards/``), or
    beside it in a checkout and an editable install, which read the folder where it lives."""
    if template_path:
        candidates = [Path(template_path)]
    else:
        here = Path(__file__).resolve().parent
        candidates = [here / "model_cards" / TEMPLATE_NAME, here.parent / "model_cards" / TEMPLATE_NAME]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"model card template not found (looked at {', '.join(map(str, candidates))}): reinstall hf-whisper-kdq, "
        "or pass template_path="
    )


# ---- the card ----------------------------------------------------------------------------------------------------


_Sizes = namedtuple("_Sizes", "size teacher16 teacher32 factor16 factor32 files")


def _sizes(report: Mapping, stats: dict[str, ModelStats]) -> _Sizes:
    files = _files(report)
    size = _get(report, "total_bytes", "bytes_on_disk", "size_bytes", "compressed_bytes", "checkpoint.total_bytes")
    if size is None and files:
        size = sum(v for k, v in files.items() if not k.startswith("ctranslate2/"))
    size = size or stats.get("compressed", ModelStats()).size_bytes
    t16 = _get(report, "teacher_fp16_bytes", "teacher.fp16_bytes", "teacher_bytes.fp16")
    t32 = _get(report, "teacher_fp32_bytes", "teacher.fp32_bytes", "teacher_bytes.fp32")
    return _Sizes(size, t16, t32, _factor(report, size, t16, "fp16"), _factor(report, size, t32, "fp32"), files)


def _comparison(scores, stats, sizes: _Sizes, labels: dict[str, str]) -> tuple[list[str], list[list[str]], str]:
    columns = list(dict.fromkeys(s.column for role in ROLES for s in scores if s.role == role))
    rows = []
    for role in ("teacher", "original", "compressed"):
        if role not in stats and role != "compressed" and not (role == "teacher" and sizes.teacher16):
            continue
        st = stats.get(role, ModelStats())
        size = {"compressed": sizes.size, "teacher": sizes.teacher16 or st.size_bytes}.get(role, st.size_bytes)
        label = labels[role] + (" (fp16)" if role == "teacher" and sizes.teacher16 else "")
        factor = f"{sizes.teacher16 / size:.2f}×" if sizes.teacher16 and size else "–"
        values = {s.column: _pct(s.value) for s in scores if s.role == role}
        rtf = "–" if st.rtf is None else f"{st.rtf:.3f}"
        rows.append([label, _mb(size), factor, *(values.get(c, "–") for c in columns), rtf])
    setup = next((stats[r].setup for r in ("compressed", "teacher") if r in stats and stats[r].setup), None)
    note = "RTF = decoding seconds / audio seconds (lower is faster)" + (f", measured with {setup}" if setup else "")
    return columns, rows, note + "; only rows measured on the same machine compare."


def _size_details(report: Mapping, plan: KDQPlan, sizes: _Sizes, teacher: str) -> list[str]:
    details = []
    if sizes.teacher16 or sizes.teacher32:
        details.append(f"Teacher {teacher}: {_mb(sizes.teacher16)} in fp16, {_mb(sizes.teacher32)} in fp32.")
    if sizes.size:
        ratios = [
            f"{f:.2f}× smaller than the teacher in {k}"
            for k, f in (("fp16", sizes.factor16), ("fp32", sizes.factor32))
            if f
        ]
        details.append(
            f"This checkpoint: {_mb(sizes.size)} on disk (weights, config, tokenizer)"
            + "".join(f"; {r}" for r in ratios)
            + "."
        )
    if plan.size_bytes:
        budget = f" (budget {_mb(plan.budget_bytes)})" if plan.budget_bytes else ""
        details.append(f"Plan's weight accounting: {_mb(plan.size_bytes)}{budget}, float layers counted as fp16.")
    paper = _get(report, "paper_accounting", "paper")
    if isinstance(paper, Mapping):
        details += [
            f"Paper accounting, {public(k)}: {_mb(v) if str(k).endswith('bytes') else public(v)}"
            for k, v in paper.items()
        ]
    elif paper:
        details.append(f"Paper accounting: {public(paper)}")
    if fmt := _get(report, "format", "quantization_format"):
        details.append(f"Weight format: {public(fmt)}.")
    if formats := _get(report, "shipped_formats"):
        details.append(
            "Weights on disk per format: " + "; ".join(f"{public(k)} {_mb(v)}" for k, v in formats.items()) + "."
        )
    return details


def _usage(repo: str, language: str, dense_load: bool) -> tuple[str, str]:
    from .evaluation import TEMPERATURE_FALLBACK  # the decoding the card's scores used: one home for its values

    fallback = ", ".join(f"{key}={value}" for key, value in TEMPERATURE_FALLBACK.items())
    if dense_load:  # one-width export: transformers unpacks every layer while loading (see export.compressed)
        loading = """model = WhisperForConditionalGeneration.from_pretrained(repo)  # needs compressed-tensors; float32
"""
        to_model = ""
    else:
        loading = """model = WhisperForConditionalGeneration.from_pretrained(repo)  # needs compressed-tensors
if getattr(model, "hf_quantizer", None) is not None:
    # Unpack the integer weights now: generate() with a language skips the unpacking on first use.
    model.hf_quantizer.compressor.decompress_model(model)
"""
        to_model = ".to(model.device, model.dtype)  # the checkpoint loads in float16"
    transformers_code = f'''import soundfile as sf
from transformers import WhisperForConditionalGeneration, WhisperProcessor

repo = "{repo}"
processor = WhisperProcessor.from_pretrained(repo)
{loading}
audio, sampling_rate = sf.read("audio.wav", dtype="float32")  # 16 kHz mono
inputs = processor(audio, sampling_rate=16000, return_tensors="pt")
features = inputs.input_features{to_model}
ids = model.generate(
    features,
    language="{language}",
    task="transcribe",
    # decode again by sampling where a transcript loops or is unlikely (openai-whisper's fallback)
    {fallback},
)
print(processor.batch_decode(ids, skip_special_tokens=True)[0])'''
    ctranslate2_code = f'''import os
from faster_whisper import WhisperModel
from huggingface_hub import snapshot_download

folder = snapshot_download("{repo}", allow_patterns="ctranslate2/*")
model = WhisperModel(os.path.join(folder, "ctranslate2"), device="cpu", compute_type="int8")
segments, info = model.transcribe("audio.wav", language="{language}", task="transcribe")
print("".join(segment.text for segment in segments))'''
    return transformers_code, ctranslate2_code


def _limitations(report, plan, scores, codes, ct2_quant: str | None, synthetic: bool) -> list[str]:
    items = [
        "Whisper's own limitations carry over (hallucinated text on silence or noise, uneven quality across "
        "languages and accents), and a smaller student is more exposed to them than its teacher.",
        f"Trained and evaluated for transcription in {', '.join(codes) or 'the listed languages'} only; other "
        'languages and speech translation (`task="translate"`) were not tuned or measured.',
        "The size gain is on disk and in download; whether inference runs on packed integers depends on the "
        "runtime (compressed-tensors in transformers may dequantize at load time).",
    ]
    if ct2_quant:
        items.append(
            f"CTranslate2 has no 2–4-bit weights: the `ctranslate2/` copy is {ct2_quant}, larger than the "
            "packed checkpoint, and its error rates may differ slightly from the table."
        )
    quantized = _get(report, "embedding_quantized", "embedding.quantized")
    if quantized is None:
        quantized = any(u.side == "embedding" and u.bits < FLOAT_BITS for u in plan.units)
    reason = _get(report, "embedding_reason", "embedding_quantized_reason", "embedding.reason")
    if not quantized:
        items.append(
            "The token embedding (tied to the output projection) is kept in fp16"
            + (f": {public(reason)}." if reason else "; it is a large share of a small Whisper's size.")
        )
    if synthetic:
        items.append(
            "Part of the training audio is synthetic (text-to-speech) speech: it lacks the noise, "
            "reverberation, disfluencies and speaker variety of real recordings, so expect higher error "
            "rates on real-world audio than on clean read speech; evaluate on your own data."
        )
    if n_eval := sum(s.n_utterances or 0 for s in scores if s.role == "compressed"):
        items.append(
            f"The error rates above come from {n_eval} utterances; differences of a point or less "
            "between models may be noise."
        )
    exported = _get(report, "per_layer_bits", "layer_bits", default={}) or {}
    if differ := [public(u.name) for u in plan.units if u.name in exported and int(exported[u.name]) != u.bits]:
        items.append(f"The exported bits differ from the plan for {', '.join(differ)}.")
    return items


def _quantizes(plan: KDQPlan) -> bool:
    return any(plan.quantized(side) for side in ("encoder", "decoder", "embedding"))


def _summary(name, teacher, plan: KDQPlan, sizes: _Sizes, scores: list[Score], frozen_encoder: bool) -> str:
    bits = "/".join(_bits_text(b) for b in sorted({u.bits for u in plan.units if u.modules})) or "float"
    n_enc, n_dec = len(plan.layers("encoder")), len(plan.layers("decoder"))
    quantized = _quantizes(plan)
    trained = "its weights were quantization-aware trained"
    if not quantized:  # quant_bit_choices "float": the distillation-only ablation
        trained = "its weights stayed in floating point (distillation only)"
    elif frozen_encoder and plan.quantized("encoder"):
        # a frozen encoder keeps the clipping searched before training: post-training quantization
        trained = "its decoder was quantization-aware trained and its frozen encoder quantized post-training"
    text = (
        f"**{name}** is a [Whisper-KDQ](https://arxiv.org/abs/2305.10788) compression of {teacher}: a "
        f"{n_enc}+{n_dec}-layer student distilled from the teacher (logits, and the hidden states of "
        f"{sum(u.distilled for u in plan.units)} guided layer(s)) while {trained}"
        + (f" to {bits} bits per layer." if quantized else ".")
    )
    if sizes.size:
        smaller = f", {sizes.factor16:.2f}× smaller than the teacher in fp16" if sizes.factor16 else ""
        text += f" It takes {_mb(sizes.size)} on disk{smaller}."
    if main := next((s for s in scores if s.role == "compressed"), None):
        ref = next((s for s in scores if s.role == "teacher" and s.column == main.column), None)
        text += f" On {public(main.name)} it scores {main.metric.upper()} {_pct(main.value)} %"
        text += f" (teacher: {_pct(ref.value)} %)." if ref else "."
    return text


def build_model_card(
    *,
    plan: KDQPlan | Mapping | str | Path,
    compression_report: CompressionReport | Mapping | None,
    eval_results: Any,
    teacher_id: str,
    training_args: Any = None,
    datasets: Sequence[str] = (),
    languages: Sequence[str] = (),
    repo_id: str | None = None,
    figure_path: str = "kdq_plan.png",
    original_id: str | None = None,
    model_name: str | None = None,
    synthetic_speech: bool | None = None,
    include_ctranslate2: bool | None = None,
    template_path: str | Path | None = None,
    training_sources: Sequence[Mapping] = (),
) -> ModelCard:
    """The model card of a Whisper-KDQ checkpoint (see the module docstring for the inputs' shapes).

    Args:
        teacher_id: Hub id of the teacher (becomes ``base_model``; a local path is shown by its basename only).
        repo_id: where the card will live (used in the code snippets; default ``<namespace>/<model_name>``).
        original_id: the same-size original Whisper whose "original" scores are given, for the table.
        model_name: the model-index name (default: the repo name, else ``<teacher>-kdq``).
        synthetic_speech: training used TTS audio (default: guessed from dataset names: synth/tts/piper).
        include_ctranslate2: show the faster-whisper snippet (default: when the report lists ``ctranslate2/``
            files or a ``ctranslate2`` entry, or lists no files at all).
        template_path: another Jinja template (default ``model_cards/kdq_model_card.md.jinja``).
        training_sources: what each training source gave (``mixture.describe(...).to_dicts()``): a table on the card.
    """
    plan = KDQPlan.coerce(plan)
    report = _report_dict(compression_report)
    scores, stats = collect_results(eval_results)
    hub_teacher, teacher = hub_model_id(teacher_id), public(teacher_id)
    repo = hub_model_id(repo_id) if repo_id else None
    if repo_id and repo is None:
        raise ValueError(f"repo_id {public(repo_id)!r} is not a Hub repo id such as 'user/whisper-small-kdq'")
    name = public(model_name or (repo.split("/")[-1] if repo else f"{teacher.split('/')[-1]}-kdq"))
    codes = [c for c in dict.fromkeys(map(language_label, languages or [s.language for s in scores])) if c]
    data_names = [public(d) for d in datasets]
    if synthetic_speech is None:
        synthetic_speech = any(re.search(r"synth|tts|piper", d, re.I) for d in data_names)
    sizes = _sizes(report, stats)
    labels = {
        "teacher": f"teacher: {teacher}",
        "compressed": f"**{name}** (this model)",
        "original": f"original: {public(original_id or 'same-size Whisper')}",
    }
    columns, rows, note = _comparison(scores, stats, sizes, labels)
    components = {
        k: v
        for k, v in (_get(report, "components", "bytes_per_component") or {}).items()
        if isinstance(v, (int, float))
    }
    total = sum(components.values()) or 1
    ct2 = _get(report, "ctranslate2")
    if include_ctranslate2 is None:
        include_ctranslate2 = bool(ct2) or any(k.startswith("ctranslate2/") for k in sizes.files) or not sizes.files
    ct2_quant = public(_get(ct2, "quantization", "compute_type") or "int8") if isinstance(ct2, Mapping) else "int8"
    transformers_code, ctranslate2_code = _usage(
        repo or f"<namespace>/{name}", codes[0] if codes else "en", bool(_get(report, "dense_load"))
    )
    n_enc, n_dec = len(plan.layers("encoder")), len(plan.layers("decoder"))
    group = f", groups of {plan.group_size}" if plan.granularity == "per_group" and plan.group_size else ""
    selection_rule = (
        "were chosen by their measured output cost (the change of teacher-forced KL(teacher ‖ student) with that unit "
        "alone quantized); bits were allocated from the same costs per byte saved."
        if any(u.output_cost for u in plan.units)
        else "were chosen by the quantization loss q_l; bits were allocated from the distillation loss d_l."
    )
    plan_description = (
        f"{n_enc} encoder and {n_dec} decoder layers; weights quantized {plan.granularity.replace('_', ' ')}{group}, "
        f"{'learned' if plan.learnable_clipping else 'fixed'} clipping; plan of step {plan.step}. Distilled layers "
        f"(hidden-state loss against the matched teacher layer) {selection_rule}"
    )
    evals = eval_results_for_card(scores)
    card_data = ModelCardData(
        language=codes or None,
        license="mit",
        library_name="transformers",
        pipeline_tag="automatic-speech-recognition",
        tags=list(TAGS),
        base_model=hub_teacher,
        datasets=data_names or None,
        model_name=name if evals else None,
        metrics=sorted({s.metric for s in scores}) or ["wer"],
        eval_results=evals or None,
        **({"base_model_relation": "quantized" if _quantizes(plan) else "finetune"} if hub_teacher else {}),
    )
    card = ModelCard.from_template(
        card_data,
        template_path=str(find_template(template_path)),
        model_name=name,
        summary=_summary(name, teacher, plan, sizes, scores, _freezes_encoder(training_args)),
        score_columns=columns,
        comparison_rows=rows,
        comparison_note=note,
        size_details=_size_details(report, plan, sizes, teacher),
        component_rows=[[public(k), f"{v / 1e6:,.2f}", f"{100 * v / total:.1f} %"] for k, v in components.items()],
        file_rows=[[f"`{public(k)}`", f"{v / 1e6:,.2f}"] for k, v in sorted(sizes.files.items(), key=lambda i: -i[1])],
        plan_description=plan_description,
        plan_rows=_plan_rows(plan),
        figure_path=_figure_ref(figure_path).as_posix(),
        teacher_link=f"[{hub_teacher}](https://huggingface.co/{hub_teacher})" if hub_teacher else teacher,
        datasets_text=", ".join(data_names) or "not recorded",
        source_rows=_source_rows(training_sources),
        languages_text=", ".join(codes) or "not recorded",
        hyperparameters=_hyperparameters(training_args),
        transformers_code=transformers_code,
        ctranslate2_code=ctranslate2_code if include_ctranslate2 else None,
        ctranslate2_note=f"{ct2_quant} weights",
        limitations=_limitations(
            report, plan, scores, codes, ct2_quant if include_ctranslate2 else None, synthetic_speech
        ),
        citation=CITATION,
    )
    return ModelCard(re.sub(r"\n{3,}", "\n\n", scrub(str(card))))  # no runs of blank lines from the template


def _source_rows(sources: Sequence[Mapping]) -> list[list[str]]:
    """The training-data table's rows; a source given as a local path is shown by its file name."""
    rows = []
    for source in sources:
        hours = source.get("hours_drawn")
        rows.append(
            [
                public(PurePosixPath(str(source["source"]).replace("\\", "/")).name or str(source["source"])),
                public(", ".join(source.get("corpora") or ())),
                ", ".join(source.get("languages") or ()),
                str(source.get("labels") or ""),
                f"{source.get('rows_distinct', 0):,}",
                f"{source.get('rows_drawn', 0):,}",
                "" if hours is None else f"{hours:.2f}",
                "" if source.get("weight") is None else f"{source['weight']:g}",
            ]
        )
    return rows


def _report_dict(report: CompressionReport | Mapping | None) -> dict:
    return report.to_dict() if isinstance(report, CompressionReport) else dict(report or {})


def _figure_ref(figure_path: str | Path) -> PurePosixPath:
    """The figure's place relative to the card: an absolute or escaping path keeps only its file name."""
    figure = PurePosixPath(str(figure_path).replace("\\", "/"))
    return PurePosixPath(figure.name) if figure.is_absolute() or ".." in figure.parts else figure


def write_model_card(output_dir: str | Path, **kwargs) -> Path:
    """Write ``README.md`` (from :func:`build_model_card` with ``kwargs``) and the plan figure into ``output_dir``.

    Returns the path of README.md. The figure goes to ``output_dir / figure_path`` (default kdq_plan.png).
    A ``ctranslate2/`` copy already in ``output_dir`` (``export_ctranslate2``) is described on the card (its
    faster-whisper snippet and weight type) unless ``include_ctranslate2`` or the report's ``ctranslate2`` says
    otherwise: the compression report is written before that copy exists, so it cannot list it."""
    output_dir = Path(output_dir)
    report = _report_dict(kwargs.get("compression_report"))
    if kwargs.get("include_ctranslate2") is None and _get(report, "ctranslate2") is None:
        if (ct2 := _ctranslate2_copy(output_dir)) is not None:
            report = {**report, "ctranslate2": ct2}
    if formats := _shipped_formats(output_dir):
        report = {**report, "shipped_formats": formats}
    kwargs = {**kwargs, "compression_report": report}
    text = str(build_model_card(**kwargs))
    output_dir.mkdir(parents=True, exist_ok=True)
    plot_plan(kwargs["plan"], output_dir / _figure_ref(kwargs.get("figure_path", "kdq_plan.png")))
    for local in sorted({str(output_dir.resolve()), str(output_dir.absolute())}, key=len, reverse=True):
        text = text.replace(local, output_dir.name)
    return atomic_write_text(output_dir / "README.md", scrub(text))


def _shipped_formats(folder: Path) -> dict[str, int]:
    """Bytes of the weights of each runtime's copy in ``folder``: the packed folder's safetensors, the CTranslate2
    copy's model.bin, whisper.cpp files (``ggml*.bin``); the exports write them after the compression report."""
    formats = {}
    if (packed := folder / "model.safetensors").is_file():
        formats["transformers (model.safetensors)"] = packed.stat().st_size
    if (ct2 := folder / "ctranslate2" / "model.bin").is_file():
        formats["CTranslate2 (ctranslate2/model.bin)"] = ct2.stat().st_size
    for ggml in sorted(folder.glob("ggml*.bin")):
        formats[f"whisper.cpp ({ggml.name})"] = ggml.stat().st_size
    return formats


def _ctranslate2_copy(folder: Path) -> dict | bool | None:
    """The report's ``ctranslate2`` entry for the ``ctranslate2/`` copy in ``folder`` (None: there is none)."""
    ct2 = folder / "ctranslate2"
    if not (ct2 / "model.bin").is_file():
        return None
    try:
        quantization = json.loads((ct2 / CT2_EXPORT_MARKER).read_text(encoding="utf-8")).get("quantization")
    except (OSError, ValueError, AttributeError):
        quantization = None  # converted by other means: the card's default weight type (int8) is shown
    return {"quantization": quantization} if quantization else True
