"""What the quantized weights of a whisper.cpp file hold: a student's own codes, written exactly and checked, or
ggml's rule applied to float weights.

* **Exact.** A layer whose codes a ggml type holds as they are is written from its codes and scales, without
  re-quantization: a `GGMLSpec` layer in its own type, an int4 / int8 layer with groups of 32 (fp16 scales, codes
  in [-8, 7] / [-128, 127]) as q4_0 / q8_0. Every tensor written that way is read back and dequantized (numpy, and
  ggml's own ``dequantize_row_*`` where pywhispercpp ships libggml-base) and compared with the student's
  fake-quantized weight: a mismatch is an error, never a file.
* **Re-quantized.** A float weight is quantized by ggml's reference quantizer (`quantize_blocks`, byte-identical to
  ``ggml_quantize_chunk``), as whisper.cpp's ``quantize`` tool would. A source that holds codes but not codes of the
  file's type is refused unless re-quantization is asked for (``requantize``): re-rounding trained codes to another
  grid changes them (int8's ``max/128`` grid against q8_0's ``amax/127`` changed ~99% of the values).

Why the file type is one: whisper.cpp's loader sizes every 2-D weight from the header's one type, so the codes of
every quantized layer must fit that one type (`file_type_of` finds it, ``ftype="auto"``).
"""

from __future__ import annotations

import ctypes
import importlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from ..quant import QuantizedWeight
from ..quant.ggml_blocks import ggml_quantize, pack, unpack
from ..quant.spec import GGML_BLOCKS

# ggml_type codes (ggml.h) of the tensor types the export writes.
GGML_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q5_0": 6, "q8_0": 8, "q2_K": 10, "q3_K": 11}
BLOCK_TYPES = ("q8_0", "q5_0", "q4_0", "q3_K", "q2_K")
# Types whose blocks an int layer of ours (groups of 32, fp16 scales, signed codes) fills exactly.
_INT_LAYOUTS = {(4, 32): "q4_0", (8, 32): "q8_0"}


def quantize_blocks(values: np.ndarray, ftype: str) -> bytes:
    """``values`` (float32, rows of a multiple of the block, row-major) in ggml's ``ftype`` blocks: the bytes
    ``ggml_quantize_chunk`` writes for them."""
    if ftype not in BLOCK_TYPES:
        raise ValueError(f"{ftype!r} is not a block type: use one of {', '.join(BLOCK_TYPES)}")
    values = np.ascontiguousarray(values, dtype=np.float32)
    block = GGML_BLOCKS[ftype][0]
    if values.size % block:
        raise ValueError(f"{values.size} values do not fill blocks of {block}")
    # Blocks are consecutive and independent: any row width that is a multiple of the block gives the same bytes.
    return pack(ggml_quantize(torch.from_numpy(values.reshape(-1, block)), ftype), ftype)


def ggml_type_of(quantized: QuantizedWeight) -> str | None:
    """The ggml type that holds ``quantized``'s codes and scales exactly, or None."""
    if quantized.ggml_type is not None:
        return quantized.ggml_type
    if quantized.granularity != "per_group":
        return None
    return _INT_LAYOUTS.get((quantized.bits, quantized.group_size))


def _describe(quantized: QuantizedWeight) -> str:
    if quantized.ggml_type is not None:
        return quantized.ggml_type
    group = f"-g{quantized.group_size}" if quantized.granularity == "per_group" else f" {quantized.granularity}"
    return f"int{quantized.bits}{group}"


def file_type_of(codes: Mapping[str, QuantizedWeight]) -> str:
    """``ftype="auto"``: the one ggml type that holds every layer's codes exactly."""
    if not codes:
        raise ValueError(
            "ftype='auto' takes the file type from the source's quantized codes, and it holds none (a float model): "
            "give the type, e.g. --ftype q5_0"
        )
    found = {ggml_type_of(q) for q in codes.values()}
    if len(found) == 1 and None not in found:
        return found.pop()
    kinds = sorted({_describe(q) for q in codes.values()})
    raise ValueError(
        f"ftype='auto': the source's codes ({', '.join(kinds)}) fit no single ggml type, and whisper.cpp holds one "
        "type per file (q4_0 holds int4 with groups of 32, q8_0 int8 with groups of 32, q3_K and q2_K only a "
        "layer trained on them). Fix: give --ftype and --requantize, or train with quant_format='ggml'"
    )


def exact_codes(
    codes: Mapping[str, QuantizedWeight], weights: list[str], ftype: str, *, requantize: bool
) -> dict[str, QuantizedWeight]:
    """The codes to write as they are, per state-dict key among ``weights`` (the keys the file stores in ``ftype``).

    Empty when ``requantize``, or when the source holds no codes (a float model: ggml's rule quantizes it).
    ValueError naming the layers (and the fix) when the source holds codes but some of those weights cannot be
    written exactly: their codes are of another grid, or they stayed float in training.
    """
    if requantize or not codes:
        return {}
    exact, problems = {}, []
    for key in weights:
        module = key.removesuffix(".weight")
        quantized = codes.get(module)
        if quantized is None:
            problems.append(f"{module} (float)")
        elif ggml_type_of(quantized) != ftype:
            problems.append(f"{module} ({_describe(quantized)})")
        else:
            exact[key] = quantized
    if problems:
        more = f" and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise ValueError(
            f"{len(problems)} weights cannot be written exactly as {ftype}: {', '.join(problems[:5])}{more}. "
            f"whisper.cpp stores every 2-D weight in the file's one type, and re-rounding them to {ftype}'s grid "
            "changes what was trained. Fix: pass requantize=True (--requantize) to quantize their values with ggml's "
            "rule, choose the type the student was trained for (--ftype auto), or train every layer for it "
            "(quant_format='ggml', quant_targets encoder,decoder,embedding)"
        )
    return exact


# --- ggml's own library, to check what was written ----------------------------------------------------------
def ggml_library() -> ctypes.CDLL | None:
    """libggml-base as pywhispercpp bundles it (ctypes, ``ggml_quantize_chunk``, ``ggml_row_size`` and
    ``dequantize_row_*`` typed), or None where pywhispercpp or that library is missing."""
    try:
        pywhispercpp = importlib.import_module("pywhispercpp")
    except ImportError:
        return None
    found = sorted((Path(pywhispercpp.__file__).parents[1] / "pywhispercpp.libs").glob("libggml-base*.so*"))
    if not found:
        return None
    library = ctypes.CDLL(str(found[0]))
    library.ggml_quantize_chunk.restype = ctypes.c_size_t
    library.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_int64] * 3
    library.ggml_quantize_chunk.argtypes.append(ctypes.c_void_p)
    library.ggml_row_size.restype = ctypes.c_size_t
    library.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    for ggml_type in ("q8_0", "q4_0", "q3_K", "q2_K"):
        dequantize = getattr(library, f"dequantize_row_{ggml_type}")
        dequantize.restype = None
        dequantize.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    return library


def ggml_dequantize(library: ctypes.CDLL, data: bytes, ggml_type: str, shape: tuple[int, int]) -> np.ndarray:
    """float32 ``[rows, cols]`` of ggml blocks, dequantized by ggml's own ``dequantize_row_<type>``."""
    source = np.frombuffer(data, np.uint8).copy()
    out = np.empty(shape, np.float32)
    getattr(library, f"dequantize_row_{ggml_type}")(source.ctypes.data, out.ctypes.data, out.size)
    return out


def written_exactly(
    name: str, quantized: QuantizedWeight, ftype: str, library: ctypes.CDLL | None
) -> tuple[bytes, list[str]]:
    """The blocks of ``quantized`` in ``ftype``, checked: read back, they dequantize (numpy, and ggml's own
    ``dequantize_row_*`` when ``library`` is given) to the fake-quantized weight ``quantized.dequantize()``.

    Returns the bytes and the checks that ran; RuntimeError on any mismatch."""
    data = pack(quantized, ftype)
    expected = quantized.dequantize(torch.float32).numpy()
    readers = {"numpy": lambda: unpack(data, ftype, expected.shape)}
    if library is not None:
        readers["ggml"] = lambda: ggml_dequantize(library, data, ftype, expected.shape)
    for reader, read in readers.items():
        values = read()
        if not np.array_equal(values, expected):
            wrong = int((values != expected).sum())
            raise RuntimeError(
                f"{name}: the {ftype} blocks written dequantize ({reader}) to other values than the student's "
                f"fake-quantized weight ({wrong} of {expected.size}); nothing was written"
            )
    return data, list(readers)
