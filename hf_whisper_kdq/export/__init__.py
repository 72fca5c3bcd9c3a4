"""Export a trained student: a packed integer checkpoint plain transformers loads, and its size report.

    from hf_whisper_kdq.export import save_compressed

    report = save_compressed(student, processor, "whisper-kdq/", plan=trainer.plan, teacher_fp16_bytes=...)
    # anywhere with transformers + compressed-tensors, without hf_whisper_kdq:
    model = WhisperForConditionalGeneration.from_pretrained("whisper-kdq/")
    model.hf_quantizer.compressor.decompress_model(model)  # before generate(language=...): see .compressed

The checkpoint uses compressed-tensors' ``pack-quantized`` format (see :mod:`.compressed`); the folder also
holds ``compression_report.json`` (see :mod:`.report`). The CTranslate2 / faster-whisper export lives in
:mod:`hf_whisper_kdq.export.ctranslate2` (imported on its own: it needs ctranslate2), the whisper.cpp (ggml) export
in :mod:`hf_whisper_kdq.export.ggml`, the ONNX Runtime export in :mod:`hf_whisper_kdq.export.onnx` (it needs onnx).
No torchao variant.
"""

from .compressed import CT_STRATEGIES, PACK_FORMAT, save_compressed
from .report import (
    EMBEDDING_REASON,
    REPORT_FILE,
    CompressionReport,
    build_compression_report,
    component_of,
    is_previous_export,
    write_compression_report,
)

__all__ = [
    "CT_STRATEGIES",
    "EMBEDDING_REASON",
    "CompressionReport",
    "PACK_FORMAT",
    "REPORT_FILE",
    "build_compression_report",
    "component_of",
    "is_previous_export",
    "save_compressed",
    "write_compression_report",
]
