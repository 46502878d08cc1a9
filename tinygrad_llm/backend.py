"""NumPy or CuPy: the one module that imports the cupy package.

Every op asks `array_module(*arrays)` for the array library of its inputs and uses only the array methods
NumPy and CuPy share, so the same op code runs on the CPU and on the GPU. CuPy is imported lazily, the
first time something asks for the GPU, so `import tinygrad_llm` works on a machine without it.

The switch `set_kernels_enabled` turns the CUDA kernels off (GPU arrays then take the NumPy-expressed
path); the dispatch point that reads it, `tinygrad_llm.gpu.kernel`, lives with the kernels. This module
imports nothing of the package. (tinygrad_llm.gpu and precision reach CuPy's lower layers, NVRTC, cuBLAS
and the matmul compute type, only after `cupy_module()` has given them CuPy.)
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


_device_checked = False   # a device was found once: later calls skip the check (every launcher asks)


def cupy_module():
    """The cupy module, or a clear error when CUDA was asked for and is not usable."""
    global _device_checked
    if _device_checked:
        return _cupy
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
    _device_checked = True
    return cp


def cupy_part(module: str):
    """A module of CuPy's own (e.g. "cupy.cuda.compiler", "cupy_backends.cuda.libs.nvrtc"), imported here so
    that this stays the one module that imports CuPy; the GPU package reaches NVRTC and cuBLAS through it."""
    if not (module == "cupy" or module.startswith(("cupy.", "cupy_backends."))):
        raise ValueError(f"cupy_part: {module!r} is not a CuPy module")
    cupy_module()
    import importlib
    return importlib.import_module(module)


def nccl_module():
    """CuPy's NCCL binding (cupy.cuda.nccl), for multi-GPU collectives; a clear error where it is missing."""
    try:
        nccl = cupy_part("cupy.cuda.nccl")
    except ImportError as error:
        raise RuntimeError(f"NCCL is not available to CuPy ({error}); pip install nvidia-nccl-cu12 or the "
                           f"wheel matching your CUDA") from None
    if not getattr(nccl, "available", True):
        raise RuntimeError("CuPy was built without NCCL: install the NCCL wheel matching your CUDA")
    return nccl


def gpu_available() -> bool:
    try:
        cupy_module()
        return True
    except RuntimeError:
        return False


def cupy_imported() -> bool:
    """Whether CuPy has been imported (something asked for the GPU); until then no array is a CuPy array."""
    return bool(_cupy)


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
    """Turn the CUDA kernels on or off (off: GPU arrays take the NumPy-expressed path)."""
    global _kernels_enabled
    _kernels_enabled = bool(enabled)


def kernels_enabled() -> bool:
    """Whether kernel-backed ops may use their CUDA kernels (TINYGRAD_LLM_KERNELS=0 starts with them off)."""
    return _kernels_enabled


def random_generator(seed, like):
    """A random Generator on the device of `like` (numpy or cupy `default_rng(seed)`)."""
    return array_module(like).random.default_rng(seed)


_capturing = False    # a CudaGraph capture is running
_inputs_checked = False    # inside inputs_checked_on_host()


def capturing() -> bool:
    """Whether a CUDA graph is being captured now."""
    return _capturing


def inputs_checked() -> bool:
    """Whether the ops running now may skip their checks that read device values (ids in range, targets
    in the vocabulary): true while a CUDA graph is captured (a capture cannot wait for the GPU) and inside
    `inputs_checked_on_host()`. Whoever captures, or enters that block, has checked the inputs on the host
    before copying them to the device; on the device the checks would cost a host sync and their
    reduction kernels."""
    return _capturing or _inputs_checked


class inputs_checked_on_host:
    """`with backend.inputs_checked_on_host():` the ids and targets of the ops run inside were checked on
    the host by the caller (see inputs_checked)."""

    def __enter__(self):
        global _inputs_checked
        self._before, _inputs_checked = _inputs_checked, True
        return self

    def __exit__(self, *exc):
        global _inputs_checked
        _inputs_checked = self._before
        return False


class CudaGraph:
    """`fn()`'s GPU work captured once into a CUDA graph; `replay()` runs the same kernels again, with no
    Python in between, and returns what `fn` returned (the same arrays, rewritten by each replay).

    fn must only launch work on the current stream: no host syncs (`int(array)`, `.get()`), no copies from
    host memory, and nothing whose launch depends on values that change between replays. Its inputs are
    whatever device arrays it reads: fixed buffers the caller refills before each replay. The arrays fn
    allocates come from a memory pool of the graph's own, kept as long as the graph, so no other
    allocation can reuse their memory between replays. Capture runs on a stream of its own (a capture
    cannot use the legacy default stream); a replay runs on the caller's current stream, after whatever
    was queued there. Compile every kernel fn launches before capturing it (run it once uncaptured).
    """

    def __init__(self, fn):
        global _capturing
        cp = cupy_module()
        self._pool = cp.cuda.MemoryPool()
        self._stream = cp.cuda.Stream(non_blocking=True)
        with cp.cuda.using_allocator(self._pool.malloc), self._stream:
            self._stream.begin_capture()
            _capturing = True
            try:
                outputs = fn()
            except BaseException:
                try:
                    self._stream.end_capture()
                except Exception:                # the capture was invalidated by what failed: already said
                    pass
                raise
            finally:
                _capturing = False
            self._graph = self._stream.end_capture()
        self.outputs = outputs

    def pool_bytes(self) -> int:
        """Bytes held by the graph's own memory pool (what its captured arrays keep between replays)."""
        return self._pool.total_bytes()

    def replay(self):
        """Run the captured work on the current stream; returns fn's outputs."""
        self._graph.launch(stream=_cupy.cuda.get_current_stream())
        return self.outputs
