"""Compiling kernels/*.cu with NVRTC and caching the result.

`load_module(filename, options, arch)` compiles a file the first time it is needed and keeps the module for
the process; `function(filename, name, ...)` is one of its kernels (a cupy.RawKernel). Every module is
compiled by NVRTC straight to a cubin for one target (the device's own architecture, "sm_90" on an H100,
or an explicit one such as "sm_90a", which wgmma needs) and cached under `cache_dir()`, keyed by the
source text, the flags and NVRTC's version; a later process loads the cubin without compiling.

Two things keep a run's first start short:
- `selection(head_dim, dtype, part)`: the -DSELECT_ flags that build only part of a big file (see
  kernels/select.cuh); the launchers of the files with many entry points ask for the part they launch;
- `prefetch(modules)`: NVRTC releases the GIL, so the modules a run will need are compiled at once on
  worker threads while the run sets itself up; `load_module` then waits for the one it needs.

A file that fails to compile raises RuntimeError with NVRTC's log (at `load_module`, also for a
prefetched one); nothing falls back to another path.

Local `#include "name"` lines naming a file of the kernels folder are inlined before compiling, so shared
headers (kernels/common.cuh) work under NVRTC as under `nvcc -I kernels`, and the caches see their edits.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import os
import re
import threading
from pathlib import Path

from .. import backend
from .arrays import compute_capability

_PACKAGE_DIR = Path(__file__).resolve().parent.parent        # tinygrad_llm/
_modules: dict = {}          # (filename, options, target) -> cupy.RawModule
_functions: dict = {}
_pending: dict = {}          # (filename, options, target) -> Future of the cubin's path, while compiling
_lock = threading.Lock()
_workers = None
_TYPE_CODES = {"float32": 1, "bfloat16": 2, "float16": 3}     # kernels/select.cuh
PARTS = {"forward": 1, "backward": 2, "around_backward": 3}
_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$', re.MULTILINE)


def kernels_dir() -> Path:
    """The folder holding the *.cu files: inside the installed package, or <repo>/kernels for an editable
    install or a source checkout. TINYGRAD_LLM_KERNELS_DIR overrides both."""
    override = os.environ.get("TINYGRAD_LLM_KERNELS_DIR")
    candidates = ([Path(override)] if override else []) + [_PACKAGE_DIR / "kernels", _PACKAGE_DIR.parent / "kernels"]
    for folder in candidates:
        if folder.is_dir() and any(folder.glob("*.cu")):
            return folder
    raise FileNotFoundError(f"no kernels/*.cu found in any of {[str(c) for c in candidates]}")


def cache_dir() -> Path:
    """Where compiled cubins are kept: $TINYGRAD_LLM_CACHE/kernels, else ~/.cache/tinygrad_llm/kernels."""
    root = os.environ.get("TINYGRAD_LLM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "tinygrad_llm")
    return Path(root) / "kernels"


def source_with_includes(folder: Path, filename: str, seen: set | None = None) -> str:
    """The file's text with its local #include "..." lines inlined (each header once)."""
    seen = set() if seen is None else seen

    def inline(match):
        name = match.group(1)
        if not (folder / name).is_file():
            return match.group(0)
        if name in seen:
            return ""
        seen.add(name)
        return source_with_includes(folder, name, seen).replace("#pragma once", "")
    return _INCLUDE.sub(inline, (folder / filename).read_text())


def selection(head_dim: int = 0, dtype=None, part: str | None = None) -> tuple:
    """The NVRTC flags that keep only the entry points of this head dim, dtype and part (kernels/select.cuh):
    e.g. selection(64, "bfloat16", "forward"); an argument left out selects every value."""
    flags = []
    if head_dim:
        flags.append(f"-DSELECT_HEAD_DIM={int(head_dim)}")
    if dtype is not None:
        flags.append(f"-DSELECT_TYPE={_TYPE_CODES[str(dtype)]}")
    if part is not None:
        flags.append(f"-DSELECT_PART={PARTS[part]}")
    return tuple(flags)


def target(arch: str | None = None) -> str:
    """The architecture a module is compiled for: `arch`, or the current device's own ("sm_90")."""
    if arch is not None:
        return arch
    backend.cupy_module()
    return f"sm_{compute_capability()}"


def _key(filename: str, options, arch: str | None) -> tuple:
    return filename, tuple(options), target(arch)


def prefetch(modules) -> None:
    """Start compiling `modules` ((filename, options, arch) each, as load_module takes them) on worker
    threads and return at once. A module already loaded, or already being compiled, is skipped; an error
    is raised later, by the load_module that needs the module."""
    global _workers
    for filename, options, arch in modules:
        key = _key(filename, options, arch)
        with _lock:
            if key in _modules or key in _pending:
                continue
            if _workers is None:
                _workers = concurrent.futures.ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1)),
                                                                 thread_name_prefix="nvrtc")
            _pending[key] = _workers.submit(_cubin_path, *key)


def load_module(filename: str, options=(), arch: str | None = None):
    """Compile kernels/<filename> at first use (or take the prefetched compile); the same module afterwards.

    `options` are extra NVRTC flags (e.g. selection(...) or ("-DBLOCK=128",)); -std=c++17 is always
    given. `arch=None` targets the device's own architecture; "sm_90a" and the like are given as they are.
    """
    backend.cupy_module()
    key = _key(filename, options, arch)
    module = _modules.get(key)
    if module is None:
        with _lock:
            pending = _pending.pop(key, None)
        path = pending.result() if pending is not None else _cubin_path(*key)
        module = backend.cupy_module().RawModule(path=str(path))
        _modules[key] = module
    return module


def function(filename: str, name: str, arch: str | None = None, shared_bytes: int = 0, options=()):
    """One kernel of a kernels/*.cu file (a cupy.RawKernel) from the module of these options and arch,
    cached; its dynamic shared-memory limit is raised when it needs more than the default 48 KB."""
    key = (filename, name, arch, tuple(options))
    kernel = _functions.get(key)
    if kernel is None:
        kernel = load_module(filename, options, arch).get_function(name)
        _functions[key] = kernel
    if shared_bytes > 48 * 1024 and kernel.max_dynamic_shared_size_bytes < shared_bytes:
        kernel.max_dynamic_shared_size_bytes = shared_bytes
    return kernel


def _cubin_path(filename: str, options: tuple, arch: str) -> Path:
    return _cached_cubin(filename, source_with_includes(kernels_dir(), filename), options, arch)


def _cached_cubin(filename: str, source: str, options, arch: str) -> Path:
    """The cubin of `source` for `arch`, compiled once and then read from the disk cache."""
    flags = ("-std=c++17", f"-arch={arch}") + tuple(options)
    digest = hashlib.sha256(repr((source, flags, nvrtc_version())).encode()).hexdigest()[:32]
    folder = cache_dir()
    path = folder / f"{Path(filename).stem}-{arch}-{digest}.cubin"
    if not path.is_file():
        cubin = compile_cubin(source, filename, flags)
        folder.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.partial")
        with open(partial, "wb") as f:
            f.write(cubin)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)             # atomic: a concurrent reader sees the whole file or none
    return path


def compile_cubin(source: str, name: str, options) -> bytes:
    """Compile CUDA C++ `source` with NVRTC and `options` (which name the target, e.g. "-arch=sm_90a"),
    returning the cubin. CuPy's include folders (the CUDA headers it found, for cuda_bf16.h) are added.
    A compile error raises RuntimeError with NVRTC's log."""
    cp = backend.cupy_module()
    compiler = backend.cupy_part("cupy.cuda.compiler")
    nvrtc = backend.cupy_part("cupy_backends.cuda.libs.nvrtc")
    includes = []
    cuda_path = cp.cuda.get_cuda_path()
    if cuda_path:
        includes.append(f"-I{os.path.join(cuda_path, 'include')}")
    try:
        includes.append(f"-I{backend.cupy_part('cupy._core.core')._get_header_dir_path()}")
    except (ImportError, AttributeError):       # a CuPy that keeps its headers elsewhere
        pass
    includes += list(getattr(compiler, "_get_extra_include_dir_opts", tuple)())
    program = nvrtc.createProgram(source, name, (), ())
    try:
        try:
            nvrtc.compileProgram(program, list(options) + includes)
        except nvrtc.NVRTCError as error:
            raise RuntimeError(f"NVRTC could not compile {name} ({' '.join(options)}):\n"
                               f"{nvrtc.getProgramLog(program)}") from error
        return nvrtc.getCUBIN(program)
    finally:
        nvrtc.destroyProgram(program)


def nvrtc_version() -> tuple:
    backend.cupy_module()
    nvrtc = backend.cupy_part("cupy_backends.cuda.libs.nvrtc")
    return tuple(nvrtc.getVersion())
