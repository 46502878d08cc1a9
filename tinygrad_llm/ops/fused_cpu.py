"""The training ops' compiled CPU loops (fused_cpu.c), built with the system C compiler, and their callers.

NumPy makes one pass over memory per arithmetic step and takes the GIL back between passes; these loops
do each op's elementwise work (SwiGLU, RMSNorm with its residual add, the causal softmax of attention's
score blocks and its backward, the AdamW update) in one pass, and hold no GIL while they run, so the
row pool's threads really work at once. They are branches of the ops in ops/ (and of AdamW), taken for
contiguous NumPy float32/float64 arrays when `library()` has them; otherwise the ops keep their NumPy
expressions, which compute the same values (the tests hold each branch to them, and run the float64
gradient checks through both).

Built once per machine and source at the first use (~1 s), as the quantized op's kernels are
(tinygrad_llm/quant/cpu_kernels.py: the same build folder and TINYGRAD_LLM_CPU_KERNELS=0 switch):
`$CC` (else `cc`) with -O3 -march=native and the flags that let it vectorise the row sums, the file named
by a hash of the source, flags, compiler and CPU, written under a temporary name and renamed. A missing
compiler or a failed build leaves one warning and the NumPy paths.
Simplification: no prebuilt binaries; a machine without a C compiler runs the NumPy expressions.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import numpy as np

from ..cpu_threads import parallel_items, split, thread_count
from ..quant.cpu_kernels import _compiler_identity, _cpu, build_dir, enabled

SOURCE = Path(__file__).with_name("fused_cpu.c")
FLAGS = ("-O3", "-fPIC", "-shared", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros",
         "-fno-trapping-math")
NATIVE = ("-march=native",)             # dropped where the compiler refuses it
SPLIT = 1 << 15                         # elements a thread gets at least before a call is split
_P, _N = ctypes.c_void_p, ctypes.c_int64
_SIGNATURES = {                         # name: argument types, the floating ones as None (float or double)
    "swiglu_forward": (_P, _P, _P, _N),
    "swiglu_backward": (_P, _P, _P, _P, _P, _N),
    "rms_norm_forward": (_P, _P, _P, _P, _P, _P, _N, _N, None),
    "rms_norm_backward": (_P, _P, _P, _P, _P, _P, _N, _N),
    "causal_softmax": (_P, _N, _N, _N, _N),
    "softmax_backward": (_P, _P, _P, _N, _N, _N, _N),
    "adamw": (_P, _P, _P, _P, _N) + (None,) * 7,
    "rope_heads": (_P, _N, _N, _P, _N, _N, _P, _P, _N, _N, _N, _N),
    "cross_entropy_rows": (_P, _P, _P, _N, _N, None, _N),
    "heads_transposed": (_P, _N, _N, _N, _P, _N, _N, _N, _N),
    "row_dots": (_P, _N, _N, _N, _P, _N, _N, _N, _P, _N, _N, _N, _N),
}
_SUFFIX = {np.dtype(np.float32): ("_f32", ctypes.c_float), np.dtype(np.float64): ("_f64", ctypes.c_double)}
_UNSET = object()
_library = _UNSET
_LOCK = threading.Lock()


def _compile(compiler: str, flags: tuple, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=target.stem + ".", suffix=".tmp")
    os.close(handle)
    try:
        done = subprocess.run([compiler, *flags, "-o", temporary, str(SOURCE), "-lm"], capture_output=True,
                              text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "no output")
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def load() -> dict:
    """Build (or find in build_dir()) and load the loops: {(name, dtype): ctypes function}. Raises
    RuntimeError / OSError where that fails."""
    compiler = os.environ.get("CC") or "cc"
    path = shutil.which(compiler)
    if path is None:
        raise RuntimeError(f"no C compiler {compiler!r} on PATH")
    version, source = _compiler_identity(path), SOURCE.read_bytes()
    error = None
    for flags in (FLAGS + NATIVE, FLAGS):
        key = hashlib.sha256(b"\0".join([source, " ".join(flags).encode(), version.encode(), _cpu().encode(),
                                         compiler.encode()])).hexdigest()[:16]
        target = build_dir() / f"fused_cpu-{key}.so"
        try:
            if not target.is_file():
                _compile(compiler, flags, target)
            library = ctypes.CDLL(str(target))
            break
        except (OSError, RuntimeError, subprocess.SubprocessError) as failure:
            error = failure
    else:
        raise RuntimeError(str(error))
    functions = {}
    for name, arguments in _SIGNATURES.items():
        for dtype, (suffix, real) in _SUFFIX.items():
            function = getattr(library, name + suffix)
            function.argtypes = [real if a is None else a for a in arguments]
            function.restype = None
            functions[name, dtype] = function
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
        if not enabled():
            _library = None
        else:
            try:
                _library = load()
            except (OSError, RuntimeError, subprocess.SubprocessError) as error:
                warnings.warn(f"tinygrad_llm: the fused CPU loops could not be built ({error}); using the "
                              f"NumPy expressions", RuntimeWarning, stacklevel=2)
                _library = None
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
