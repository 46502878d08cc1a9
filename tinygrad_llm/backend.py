"""NumPy or CuPy: the one module that knows CuPy exists.

Every op asks `array_module(*arrays)` for the array library of its inputs and uses only the array methods
NumPy and CuPy share, so the same op code runs on the CPU and on the GPU. CuPy is imported lazily, the
first time something asks for the GPU, so `import tinygrad_llm` works on a machine without it.

Kernel-backed ops have one dispatch point, `kernel(op_name, *arrays)`: it returns the `tinygrad_llm.gpu`
module when the arrays live on the GPU, fused kernels are enabled and one supports them, and None otherwise (the NumPy-expressed
path, which is also the reference the kernels are tested against).
"""
from __future__ import annotations

import os

import numpy as np

_cupy = None          # the cupy module once imported, False if it failed
_kernels_enabled = os.environ.get("TINYGRAD_LLM_KERNELS", "1") != "0"


def _import_cupy():
    global _cupy
    if _cupy is None:
        try:
            import cupy  # the only cupy import in the package
            _cupy = cupy
        except Exception:  # ImportError, or a CuPy that cannot find CUDA
            _cupy = False
    return _cupy or None


def cupy_module():
    """The cupy module, or a clear error when CUDA was asked for and is not usable."""
    cp = _import_cupy()
    if cp is None:
        raise RuntimeError(
            "CUDA was requested but CuPy is not installed or cannot load CUDA. Install the GPU extra "
            "(pip install -e .[gpu], or cupy-cuda13x on CUDA 13) on a machine with an NVIDIA GPU, "
            "or use device='cpu'.")
    try:
        if cp.cuda.runtime.getDeviceCount() < 1:
            raise RuntimeError("no CUDA device")
    except Exception as error:
        raise RuntimeError(f"CUDA was requested but no usable GPU was found ({error}); use device='cpu'.") from None
    return cp


def nccl_module():
    """CuPy's NCCL binding (cupy.cuda.nccl), for multi-GPU collectives; a clear error where it is missing."""
    cupy_module()
    try:
        from cupy.cuda import nccl
    except ImportError as error:
        raise RuntimeError(f"NCCL is not available to CuPy ({error}); pip install nvidia-nccl-cu12 or the "
                           f"wheel matching your CUDA") from None
    if not getattr(nccl, "available", True):
        raise RuntimeError("CuPy was built without NCCL: install the NCCL wheel matching your CUDA")
    return nccl


def set_cupy_tf32(enabled: bool) -> None:
    """Let CuPy's float32 matmuls use TF32 tensor cores (the switch behind the CUPY_TF32 variable)."""
    cp = cupy_module()
    from cupy._core import _routines_linalg as linalg
    tf32, default = 7, 1                                     # COMPUTE_TYPE_TF32, COMPUTE_TYPE_DEFAULT
    linalg.set_compute_type(cp.float32, tf32 if enabled else default)


def device_compute_capability() -> str:
    """The current CUDA device's compute capability as CuPy spells it ("90" for an H100 or H200)."""
    return str(cupy_module().cuda.Device().compute_capability)


def compile_cubin(source: str, name: str, options) -> bytes:
    """Compile CUDA C++ `source` with NVRTC and the given `options` (which name the target, e.g.
    "-arch=sm_90a"), returning the cubin. CuPy's RawModule always targets the device's plain
    architecture (sm_90), which has no wgmma; the sm_90a kernels come through here instead. CuPy's own
    include options (the CUDA headers it found) are added. A compile error is raised with NVRTC's log."""
    cp = cupy_module()
    from cupy.cuda import compiler
    from cupy_backends.cuda.libs import nvrtc
    # the folders CuPy's own compiles search: the CUDA toolkit's headers (cuda_bf16.h), CuPy's, and any
    # it found in a conda or wheel install
    includes = []
    cuda_path = cp.cuda.get_cuda_path()
    if cuda_path:
        includes.append(f"-I{os.path.join(cuda_path, 'include')}")
    try:
        from cupy._core.core import _get_header_dir_path
        includes.append(f"-I{_get_header_dir_path()}")
    except ImportError:
        pass
    includes += list(getattr(compiler, "_get_extra_include_dir_opts", tuple)())
    program = nvrtc.createProgram(source, name, (), ())
    try:
        try:
            nvrtc.compileProgram(program, list(options) + list(includes))
        except nvrtc.NVRTCError as error:
            raise RuntimeError(f"NVRTC could not compile {name} ({' '.join(options)}):\n"
                               f"{nvrtc.getProgramLog(program)}") from error
        return nvrtc.getCUBIN(program)
    finally:
        nvrtc.destroyProgram(program)


def nvrtc_version() -> tuple:
    cupy_module()
    from cupy_backends.cuda.libs import nvrtc
    return tuple(nvrtc.getVersion())


def load_cubin_module(path: str):
    """A cupy.RawModule over a compiled cubin file (its kernels are RawKernels like any other)."""
    return cupy_module().RawModule(path=path)


def gpu_available() -> bool:
    try:
        cupy_module()
        return True
    except RuntimeError:
        return False


def is_cupy_array(x) -> bool:
    """True for a cupy.ndarray, decided without importing CuPy."""
    return type(x).__module__.startswith("cupy")


def array_module(*arrays):
    """numpy, or cupy when any argument is a CuPy array."""
    for a in arrays:
        if is_cupy_array(a):
            return _import_cupy()
    return np


def device_of(x) -> str:
    return "cuda" if is_cupy_array(x) else "cpu"


def to_device(x, device: str):
    """Move an array to 'cpu' or 'cuda' (a no-op when it is already there)."""
    device = normalize_device(device)
    if device == "cpu":
        return x.get() if is_cupy_array(x) else x
    cp = cupy_module()
    return x if is_cupy_array(x) else cp.asarray(x)


def normalize_device(device) -> str:
    name = str(device).lower()
    if name == "gpu" or name.startswith("cuda"):
        return "cuda"
    if name == "cpu":
        return "cpu"
    raise ValueError(f"unknown device {device!r}: use 'cpu' or 'cuda'")


def to_numpy(x) -> np.ndarray:
    return x.get() if is_cupy_array(x) else np.asarray(x)


def tune_host_allocator() -> bool:
    """Ask glibc to keep freed large blocks instead of returning them to the OS after every op.

    NumPy allocates each large temporary with malloc, which serves big blocks by mmap and unmaps them on
    free, so every op pays page faults on fresh memory. Raising the mmap and trim thresholds to 1 GiB
    lets the blocks be reused: 10–25 % faster memory-bound ops on the CPU. Called by the training loop,
    not at import (it changes the process's allocator). Returns False where glibc is not available.
    """
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3          # mallopt parameter numbers from <malloc.h>
    return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))


def set_kernels_enabled(enabled: bool) -> None:
    """Turn the fused CUDA kernels on or off (off: GPU arrays take the NumPy-expressed path)."""
    global _kernels_enabled
    _kernels_enabled = bool(enabled)


def kernel(op_name: str, *arrays):
    """The dispatch point for kernel-backed ops.

    Returns the `tinygrad_llm.gpu` module when the arrays are on the GPU, kernels are enabled and a kernel
    for `op_name` supports these arrays (dtype, shapes); otherwise None, and the op takes its
    NumPy-expressed path, which is also the reference every kernel is tested against.
    """
    if not _kernels_enabled or not any(is_cupy_array(a) for a in arrays):
        return None
    from . import gpu  # imported only once GPU arrays exist
    return gpu if gpu.supports(op_name, *arrays) else None


def random_generator(seed, like):
    """A random Generator on the device of `like` (numpy or cupy `default_rng(seed)`)."""
    return array_module(like).random.default_rng(seed)
