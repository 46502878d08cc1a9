"""Compiling kernels/*.cu with NVRTC and caching the result.

`load_module(filename)` compiles a file the first time it is needed and keeps the module for the process;
`function(filename, name)` is one of its kernels (a cupy.RawKernel). Two routes:

- the device's own architecture (sm_80, sm_90, ...): through cupy.RawModule, which caches on disk itself;
- an explicit target such as "sm_90a" (wgmma needs it; CuPy always compiles for the plain sm_90): NVRTC
  directly, the cubin cached under `cache_dir()`, keyed by the source text, the flags and NVRTC's version.

A file that fails to compile raises RuntimeError with NVRTC's log; nothing falls back to another path.

Local `#include "name"` lines naming a file of the kernels folder are inlined before compiling, so shared
headers (kernels/common.cuh) work under NVRTC as under `nvcc -I kernels`, and the caches see their edits.
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from .. import backend

_PACKAGE_DIR = Path(__file__).resolve().parent.parent        # tinygrad_llm/
_modules: dict = {}
_functions: dict = {}
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


def load_module(filename: str, options=(), arch: str | None = None):
    """Compile kernels/<filename> at first use; the same module afterwards.

    `options` are extra NVRTC flags (e.g. ("-DBLOCK=128",)); -std=c++17 is always given. `arch=None`
    targets the device's own architecture through cupy.RawModule; "sm_90a" and the like go through
    `compile_cubin` and the cubin cache.
    """
    key = (filename, tuple(options), arch)
    module = _modules.get(key)
    if module is None:
        cp = backend.cupy_module()
        source = source_with_includes(kernels_dir(), filename)
        if arch is None:
            module = cp.RawModule(code=source, options=("-std=c++17",) + tuple(options))
            CompileException = backend.cupy_part("cupy.cuda.compiler").CompileException
            try:
                module.compile()                # now, so a broken kernel fails here and not mid-step
            except CompileException as error:
                raise RuntimeError(f"NVRTC could not compile {filename}:\n{error}") from error
        else:
            module = cp.RawModule(path=str(_cached_cubin(filename, source, options, arch)))
        _modules[key] = module
    return module


def function(filename: str, name: str, arch: str | None = None, shared_bytes: int = 0):
    """One kernel of a kernels/*.cu file (a cupy.RawKernel), cached; its dynamic shared-memory limit is
    raised when it needs more than the default 48 KB."""
    key = (filename, name, arch)
    kernel = _functions.get(key)
    if kernel is None:
        kernel = load_module(filename, arch=arch).get_function(name)
        _functions[key] = kernel
    if shared_bytes > 48 * 1024 and kernel.max_dynamic_shared_size_bytes < shared_bytes:
        kernel.max_dynamic_shared_size_bytes = shared_bytes
    return kernel


def _cached_cubin(filename: str, source: str, options, arch: str) -> Path:
    """The cubin of `source` for `arch`, compiled once and then read from the disk cache."""
    flags = ("-std=c++17", f"-arch={arch}", "-ftz=true") + tuple(options)
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
