"""The quantized linear op's compiled CPU kernels (cpu_kernels.c), built with the system C compiler.

`library()` returns the kernels as a ctypes library, or None where they cannot be had; ops/quantized.py
then takes its NumPy path, which computes the same product more slowly: NumPy has no int8 or int4
matrix-vector product, so that path converts every code to float32 first (at batch 1 on a GPT-2-size
model, 2.5–4× the kernels' time for Q8_0, 4–6× for Q4_0: benchmarks/RESULTS.md).

Built once per machine and source at the first use (~0.5 s) by tinygrad_llm.native (the system C compiler,
-O3 -march=native, cached under its build_dir()). A missing compiler or a failed build leaves one warning
and the NumPy path. TINYGRAD_LLM_CPU_KERNELS=0 (read at the first use) turns the kernels off.
Two kinds of kernel: the float kernels (q8_0_linear, q4_0_linear: the dequantised float op's sum, to float32
rounding) and the rounded ones (q8_0_rounded_linear, q4_0_rounded_linear: x rounded to 8 bits per block of
32, int8 products summed in int32, as llama.cpp does; the error bound is derived in docs/quantization.md).
`rounded(library, rows)` says which one the op runs: the rounded kernels from ROUNDED_ROWS rows of x where
the build has AVX-512 VNNI (~3× the float kernels at 32 rows), the float kernels for one row and elsewhere.
The tiled kernels (q8_0_tiled_linear ... q4_0_tiled_rounded_linear) are the same four on QuantizedMatrix's
tiled layout, which the op takes where `tiles(library)` (ops/quantized.tile_for_cpu).
Simplification: no prebuilt binaries; a machine without a C compiler runs the NumPy path. No AVX-VNNI
(256-bit, without AVX-512) or ARM dot-product build of the rounded kernels.
"""
from __future__ import annotations

import ctypes
import os
from pathlib import Path

from .. import native

SOURCE = Path(__file__).with_name("cpu_kernels.c")
_ARGUMENTS = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 5     # values, scale, x, y, blocks, out, start, end, rows
_FUNCTIONS = ("q8_0_linear", "q4_0_linear", "q8_0_rounded_linear", "q4_0_rounded_linear",
              "q8_0_tiled_linear", "q4_0_tiled_linear", "q8_0_tiled_rounded_linear", "q4_0_tiled_rounded_linear")
ROUNDED_ROWS = 2     # rows of x from which the rounded kernels run (where they are the VNNI build): see rounded()
_UNSET = object()
_library = _UNSET


def load(extra_flags: tuple = ()) -> ctypes.CDLL:
    """Build (or find) and load the kernels (tinygrad_llm.native), compiled with `extra_flags` besides its
    FLAGS (tests build -DTINYGRAD_LLM_PORTABLE this way). Raises native.BUILD_ERRORS where that fails."""
    library = native.build(SOURCE, extra_flags)
    for name in _FUNCTIONS:
        function = getattr(library, name)
        function.argtypes, function.restype = _ARGUMENTS, None
    library.rounded_simd_build.argtypes, library.rounded_simd_build.restype = [], ctypes.c_int
    library.rounds = library.rounded_simd_build() == 1 and rounding_enabled()
    return library


def rounding_enabled() -> bool:
    return os.environ.get("TINYGRAD_LLM_ROUND_ACTIVATIONS", "1").strip() != "0"


def rounded(library, rows: int) -> bool:
    """Whether `rows` rows of x take the rounded kernels (x rounded to 8 bits per block of 32, int8 × int8
    products summed in int32: llama.cpp's arithmetic, within docs/quantization.md's bound of the float op)
    rather than the float ones (the dequantised float op's sum, to float32 rounding). Only the VNNI build
    (AVX-512 VNNI, built where -march=native has it) rounds: there it is ~3× the float kernels' speed from
    a few rows of x; elsewhere the rounded kernels are plain C, no faster than the float ones, and unused.
    One row (batch-1 decoding) stays on the float kernels, which read the codes at memory speed already.
    TINYGRAD_LLM_ROUND_ACTIVATIONS=0 (read at the library's first use) keeps every row exact."""
    return library.rounds and rows >= ROUNDED_ROWS


def tiles(library) -> bool:
    """Whether QuantizedMatrix's tiled layout suits these kernels: where the rounded kernels are the VNNI build
    (the tiled kernels' SIMD loops need the same instructions); elsewhere they would run plain C."""
    return library.rounded_simd_build() == 1


def library():
    """The compiled kernels (a ctypes.CDLL with the float kernels q8_0_linear / q4_0_linear, the rounded
    q8_0_rounded_linear / q4_0_rounded_linear, and `.rounds`: see rounded()), or None: turned off by
    TINYGRAD_LLM_CPU_KERNELS=0, or no compiler / a failed build (then one warning, once a process). Looked
    up at the first call and kept (the quantized op asks at every call)."""
    global _library
    if _library is _UNSET:
        _library = native.load_or_none(load, "the quantized CPU kernels", "the slower NumPy path")
    return _library


def reset() -> None:
    """Forget the loaded library (the next library() call looks again, and reads $TINYGRAD_LLM_CPU_KERNELS
    and $CC again): for tests."""
    global _library
    _library = _UNSET
