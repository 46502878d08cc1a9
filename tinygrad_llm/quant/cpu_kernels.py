"""The quantized linear op's compiled CPU kernels (cpu_kernels.c), built with the system C compiler.

`library()` returns the kernels as a ctypes library, or None where they cannot be had; ops/quantized.py
then takes its NumPy path, which computes the same product more slowly: NumPy has no int8 or int4
matrix-vector product, so that path converts every code to float32 first (at batch 1 on a GPT-2-size
model, 2.5–4× the kernels' time for Q8_0, 4–6× for Q4_0: benchmarks/RESULTS.md).

Built once per machine and source, at the first use (~0.5 s): `$CC` (else `cc`) with -O3 -march=native and
the flags that let it vectorise the 32-term sums, into build_dir() ($TINYGRAD_LLM_CPU_KERNELS_DIR, else
$TINYGRAD_LLM_CACHE/cpu_kernels/, else ~/.cache/tinygrad_llm/cpu_kernels/), the file named by a hash of the
source, the flags, the compiler binary (path, size, time) and the CPU; written under a temporary name and
renamed, so two processes building at once both end with a whole file. A missing compiler or a failed
build leaves one warning and the NumPy path. TINYGRAD_LLM_CPU_KERNELS=0 (read at the first use) turns the
kernels off.
Two kinds of kernel: the float kernels (q8_0_linear, q4_0_linear: the dequantised float op's sum, to float32
rounding) and the rounded ones (q8_0_rounded_linear, q4_0_rounded_linear: x rounded to 8 bits per block of
32, int8 products summed in int32, as llama.cpp does; the error bound is derived in docs/quantization.md).
`rounded(library, rows)` says which one the op runs: the rounded kernels from ROUNDED_ROWS rows of x where
the build has AVX-512 VNNI (~3× the float kernels at 32 rows), the float kernels for one row and elsewhere.
Simplification: no prebuilt binaries; a machine without a C compiler runs the NumPy path. No AVX-VNNI
(256-bit, without AVX-512) or ARM dot-product build of the rounded kernels.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

SOURCE = Path(__file__).with_name("cpu_kernels.c")
FLAGS = ("-O3", "-fPIC", "-shared", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math")
NATIVE = ("-march=native",)          # dropped where the compiler refuses it
_ARGUMENTS = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 5     # values, scale, x, y, blocks, out, start, end, rows
_FUNCTIONS = ("q8_0_linear", "q4_0_linear", "q8_0_rounded_linear", "q4_0_rounded_linear")
ROUNDED_ROWS = 2     # rows of x from which the rounded kernels run (where they are the VNNI build): see rounded()
_UNSET = object()
_library = _UNSET


def enabled() -> bool:
    return os.environ.get("TINYGRAD_LLM_CPU_KERNELS", "1").strip() != "0"


def build_dir() -> Path:
    """$TINYGRAD_LLM_CPU_KERNELS_DIR, else $TINYGRAD_LLM_CACHE/cpu_kernels, else ~/.cache/tinygrad_llm/cpu_kernels."""
    if os.environ.get("TINYGRAD_LLM_CPU_KERNELS_DIR"):
        return Path(os.environ["TINYGRAD_LLM_CPU_KERNELS_DIR"])
    root = os.environ.get("TINYGRAD_LLM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "tinygrad_llm")
    return Path(root) / "cpu_kernels"


def _cpu() -> str:
    """The CPU's model and feature flags (-march=native builds for exactly these)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            lines = [line for line in f if line.startswith(("model name", "flags", "Features"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def _compiler_identity(path: str) -> str:
    """The compiler binary's real path, size and modification time: a changed compiler means a new build
    (cheaper than running `cc --version` in every process)."""
    real = os.path.realpath(path)
    status = os.stat(real)
    return f"{real} {status.st_size} {status.st_mtime_ns}"


def _compile(compiler: str, flags: tuple, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=target.stem + ".", suffix=".tmp")
    os.close(handle)
    try:
        done = subprocess.run([compiler, *flags, "-o", temporary, str(SOURCE)], capture_output=True, text=True,
                              timeout=300)
        if done.returncode != 0:
            raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "no output")
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def load(extra_flags: tuple = ()) -> ctypes.CDLL:
    """Build (or find in build_dir()) and load the kernels, compiled with `extra_flags` besides FLAGS (tests
    build -DTINYGRAD_LLM_PORTABLE this way). Raises RuntimeError / OSError where that fails."""
    compiler = os.environ.get("CC") or "cc"
    path = shutil.which(compiler)
    if path is None:
        raise RuntimeError(f"no C compiler {compiler!r} on PATH")
    version, source = _compiler_identity(path), SOURCE.read_bytes()
    error = None
    for flags in (FLAGS + tuple(extra_flags) + NATIVE, FLAGS + tuple(extra_flags)):
        key = hashlib.sha256(b"\0".join([source, " ".join(flags).encode(), version.encode(), _cpu().encode(),
                                         compiler.encode()])).hexdigest()[:16]
        target = build_dir() / f"cpu_kernels-{key}.so"
        try:
            if not target.is_file():
                _compile(compiler, flags, target)
            library = ctypes.CDLL(str(target))
            break
        except (OSError, RuntimeError, subprocess.SubprocessError) as failure:
            error = failure
    else:
        raise RuntimeError(str(error))
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


def library():
    """The compiled kernels (a ctypes.CDLL with the float kernels q8_0_linear / q4_0_linear, the rounded
    q8_0_rounded_linear / q4_0_rounded_linear, and `.rounds`: see rounded()), or None: turned off by
    TINYGRAD_LLM_CPU_KERNELS=0, or no compiler / a failed build (then one warning, once a process). Looked
    up at the first call and kept (the quantized op asks at every call)."""
    global _library
    if _library is _UNSET:
        if not enabled():
            _library = None
        else:
            try:
                _library = load()
            except (OSError, RuntimeError, subprocess.SubprocessError) as error:
                warnings.warn(f"tinygrad_llm: the quantized CPU kernels could not be built ({error}); using the "
                              f"slower NumPy path", RuntimeWarning, stacklevel=2)
                _library = None
    return _library


def reset() -> None:
    """Forget the loaded library (the next library() call looks again, and reads $TINYGRAD_LLM_CPU_KERNELS
    and $CC again): for tests."""
    global _library
    _library = _UNSET
