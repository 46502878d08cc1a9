"""The training ops' compiled CPU loops (fused_cpu.c), built with the system C compiler, and their callers.

NumPy makes one pass over memory per arithmetic step and takes the GIL back between passes; these loops
do each op's elementwise work (SwiGLU, RMSNorm with its residual add, the causal softmax of attention's
score blocks and its backward, the embedding's scatter-add, the AdamW update) in one pass, and hold no GIL while they run, so the
row pool's threads really work at once. They are branches of the ops in ops/ (and of AdamW), taken for
contiguous NumPy float32/float64 arrays when `library()` has them; otherwise the ops keep their NumPy
expressions, which compute the same values (the tests hold each branch to them, and run the float64
gradient checks through both). Attention's training path also has all of its products here, one head at
a time with the tiles in cache (`tiled_attention_forward/backward`, ops/attention._tiled_forward). For
decoding they also hold the packed SwiGLU, the cached attention of one new position a row, and Linear's
float32 product for 2 … 32 rows of x (`few_rows_linear`, float32 only, where the build has AVX-512:
ops/matmul.few_rows_loop).

Built once per machine and source at the first use (~1 s) by tinygrad_llm.native, as the quantized op's
kernels are (the system C compiler, -O3 -march=native, the same build folder and TINYGRAD_LLM_CPU_KERNELS=0
switch). A missing compiler or a failed build leaves one warning and the NumPy paths.
Simplification: no prebuilt binaries; a machine without a C compiler runs the NumPy expressions.
"""
from __future__ import annotations

import ctypes
import threading
from pathlib import Path

import numpy as np

from .. import native
from ..cpu_threads import parallel_items, split, thread_count

SOURCE = Path(__file__).with_name("fused_cpu.c")
SPLIT = 1 << 15                         # elements a thread gets at least before a call is split
_P, _N = ctypes.c_void_p, ctypes.c_int64
_SIGNATURES = {                         # name: argument types, the floating ones as None (float or double)
    "swiglu_forward": (_P, _P, _P, _N),
    "swiglu_backward": (_P, _P, _P, _P, _P, _N),
    "rms_norm_forward": (_P, _P, _P, _P, _P, _P, _N, _N, None),
    "rms_norm_backward": (_P, _P, _P, _P, _P, _P, _N, _N, _N),
    "causal_softmax": (_P, _N, _N, _N, _N),
    "softmax_backward": (_P, _P, _P, _N, _N, _N, _N),
    "adamw": (_P, _P, _P, _P, _N) + (None,) * 7,
    "rope_heads": (_P, _N, _N, _P, _N, _N, _P, _P, _N, _N, _N, _N),
    "cross_entropy_rows": (_P, _P, _P, _N, _N, None, _N),
    "heads_transposed": (_P, _N, _N, _N, _P, _N, _N, _N, _N),
    "row_dots": (_P, _N, _N, _N, _P, _N, _N, _N, _P, _N, _N, _N, _N),
    "embedding_backward": (_P, _P, _P, _N, _N, _N),
    "swiglu_packed_forward": (_P, _P, _N, _N),                                     # decoding steps
    "decode_attention": (_P, _N) * 3 + (_P,) * 9 + (_N,) * 6,
    "tiled_attention_forward": (_P, _N, _N, _N) * 4 + (_P, _P) + (_N,) * 5,                # return 0 or −1
    "tiled_attention_backward": (_P, _N, _N, _N) * 5 + (_P,) + (_P, _N, _N, _N) * 3 + (_P,) + (_N,) * 5,
}
_RETURNS_INT = {"tiled_attention_forward", "tiled_attention_backward"}
_SUFFIX = {np.dtype(np.float32): ("_f32", ctypes.c_float), np.dtype(np.float64): ("_f64", ctypes.c_double)}
_UNSET = object()
_library = _UNSET
_LOCK = threading.Lock()


def load() -> dict:
    """Build (or find) and load the loops (tinygrad_llm.native): {(name, dtype): ctypes function}. Raises
    native.BUILD_ERRORS where that fails."""
    library = native.build(SOURCE, libraries=("-lm",))
    functions = {}
    for name, arguments in _SIGNATURES.items():
        for dtype, (suffix, real) in _SUFFIX.items():
            function = getattr(library, name + suffix)
            function.argtypes = [real if a is None else a for a in arguments]
            function.restype = ctypes.c_int if name in _RETURNS_INT else None
            functions[name, dtype] = function
    few_rows = library.few_rows_linear_f32            # float32 only (a product for a few rows: ops/quantized)
    few_rows.argtypes, few_rows.restype = [_P] * 3 + [_N] * 5, ctypes.c_int
    functions["few_rows_linear", np.dtype(np.float32)] = few_rows
    return functions


def library():
    """The loops ({(name, dtype): function}), or None: turned off by TINYGRAD_LLM_CPU_KERNELS=0, or no
    compiler / a failed build (then one warning, once a process). Looked up at the first call and kept."""
    global _library
    if _library is not _UNSET:
        return _library
    with _LOCK:                         # the first call may come from several row-pool threads at once
        if _library is not _UNSET:
            return _library
        _library = native.load_or_none(load, "the fused CPU loops", "the NumPy expressions")
    return _library


def reset() -> None:
    """Forget the loaded loops (the next library() call looks again and reads $TINYGRAD_LLM_CPU_KERNELS
    again): for tests."""
    global _library
    _library = _UNSET


def usable(*arrays) -> bool:
    """Whether the loops apply to these arrays: all C-contiguous NumPy arrays of one dtype, float32 or
    float64, and the library is there."""
    first = arrays[0]
    if type(first) is not np.ndarray or first.dtype not in _SUFFIX:
        return False
    for a in arrays:
        if type(a) is not np.ndarray or a.dtype != first.dtype or not a.flags.c_contiguous:
            return False
    return library() is not None


def function(name: str, dtype):
    """The loop `name` for arrays of `dtype`, or None (not float32/64, or no library); the caller checks
    that its arrays are contiguous."""
    dtype = np.dtype(dtype)
    if dtype not in _SUFFIX or library() is None:
        return None
    return library()[name, dtype]


def heads_view(a):
    """(address, batch, head and time strides in elements) of a (B, H, T, D) float32/64 NumPy view whose D
    axis is unit-stride and whose strides are whole elements and ≥ 0; None otherwise (or without loops)."""
    if type(a) is not np.ndarray or a.ndim != 4 or a.dtype not in _SUFFIX or library() is None:
        return None
    item = a.itemsize
    if a.strides[3] != item and a.shape[3] > 1:
        return None
    if any(s % item or s < 0 for s in a.strides[:3]):
        return None
    return (a.ctypes.data,) + tuple(s // item for s in a.strides[:3])


def address(a, offset: int = 0) -> int:
    """The address of element `offset` of the contiguous array a."""
    return a.ctypes.data + offset * a.itemsize


def over_rows(name: str, dtype, rows: int, width: int, call) -> None:
    """Run the loop `name` over rows 0 … rows − 1 of `width` elements: call(function, start, end) for row
    ranges spread over the row pool's threads when each gets at least SPLIT elements (one range
    otherwise). The ranges only split work that is independent row by row."""
    function = library()[name, np.dtype(dtype)]
    parts = min(thread_count(), max(1, rows * width // SPLIT))
    if parts <= 1:
        call(function, 0, rows)
        return
    parallel_items(lambda bounds: call(function, *bounds), split(rows, parts=parts))
