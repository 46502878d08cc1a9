"""C sources built with the system C compiler at their first use and kept per machine: the one builder
behind the package's compiled CPU code (the training ops' loops, ops/fused_cpu.c; the quantized op's
kernels, quant/cpu_kernels.c). Imports nothing of the package.

`build(source)` compiles `source` into a shared library with `$CC` (else `cc`), -O3 -march=native and the
flags that let the compiler vectorise sums, and loads it with ctypes. The file lands in build_dir()
($TINYGRAD_LLM_CPU_KERNELS_DIR, else $TINYGRAD_LLM_CACHE/cpu_kernels/, else
~/.cache/tinygrad_llm/cpu_kernels/), named by a hash of the source, the flags, the compiler binary (path,
size, time) and the CPU, and is written under a temporary name and renamed, so two processes building at
once both end with a whole file. Where -march=native is refused the build is tried without it.
TINYGRAD_LLM_CPU_KERNELS=0 (`enabled()`) turns every compiled path off.
Simplification: no prebuilt binaries; a machine without a C compiler keeps the NumPy paths.
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

FLAGS = ("-O3", "-fPIC", "-shared", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros",
         "-fno-trapping-math")
NATIVE = ("-march=native",)          # dropped where the compiler refuses it
BUILD_ERRORS = (OSError, RuntimeError, subprocess.SubprocessError)   # what build() raises when it fails


def enabled() -> bool:
    """Whether compiled CPU code may be used (TINYGRAD_LLM_CPU_KERNELS=0 says no)."""
    return os.environ.get("TINYGRAD_LLM_CPU_KERNELS", "1").strip() != "0"


def build_dir() -> Path:
    """$TINYGRAD_LLM_CPU_KERNELS_DIR, else $TINYGRAD_LLM_CACHE/cpu_kernels, else ~/.cache/tinygrad_llm/cpu_kernels."""
    if os.environ.get("TINYGRAD_LLM_CPU_KERNELS_DIR"):
        return Path(os.environ["TINYGRAD_LLM_CPU_KERNELS_DIR"])
    root = os.environ.get("TINYGRAD_LLM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "tinygrad_llm")
    return Path(root) / "cpu_kernels"


def cpu_identity() -> str:
    """The CPU's model and feature flags (-march=native builds for exactly these)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            lines = [line for line in f if line.startswith(("model name", "flags", "Features"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def compiler_identity(path: str) -> str:
    """The compiler binary's real path, size and modification time: a changed compiler means a new build
    (cheaper than running `cc --version` in every process)."""
    real = os.path.realpath(path)
    status = os.stat(real)
    return f"{real} {status.st_size} {status.st_mtime_ns}"


def _compile(compiler: str, source: Path, flags: tuple, libraries: tuple, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=target.stem + ".", suffix=".tmp")
    os.close(handle)
    try:
        done = subprocess.run([compiler, *flags, "-o", temporary, str(source), *libraries], capture_output=True,
                              text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "no output")
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def build(source: Path, extra_flags: tuple = (), libraries: tuple = ()) -> ctypes.CDLL:
    """`source` built (or found in build_dir()) with FLAGS + extra_flags (+ NATIVE where accepted), linked
    with `libraries` (e.g. "-lm"), and loaded. Raises one of BUILD_ERRORS where that fails."""
    compiler = os.environ.get("CC") or "cc"
    path = shutil.which(compiler)
    if path is None:
        raise RuntimeError(f"no C compiler {compiler!r} on PATH")
    text, version = Path(source).read_bytes(), compiler_identity(path)
    error = None
    for flags in (FLAGS + tuple(extra_flags) + NATIVE, FLAGS + tuple(extra_flags)):
        key = hashlib.sha256(b"\0".join([text, " ".join(flags + tuple(libraries)).encode(), version.encode(),
                                         cpu_identity().encode(), compiler.encode()])).hexdigest()[:16]
        target = build_dir() / f"{Path(source).stem}-{key}.so"
        try:
            if not target.is_file():
                _compile(compiler, Path(source), flags, tuple(libraries), target)
            return ctypes.CDLL(str(target))
        except BUILD_ERRORS as failure:
            error = failure
    raise RuntimeError(str(error))


def load_or_none(load, what: str, fallback: str):
    """load() (a build() and its setup), or None: when compiled CPU code is off (TINYGRAD_LLM_CPU_KERNELS=0),
    or when the build fails, then with one warning naming `what` and the `fallback` that runs instead."""
    if not enabled():
        return None
    try:
        return load()
    except BUILD_ERRORS as error:
        warnings.warn(f"tinygrad_llm: {what} could not be built ({error}); using {fallback}", RuntimeWarning,
                      stacklevel=3)
        return None
