"""The cuBLAS GEMM behind Linear on the GPU and the precision policies (tinygrad_llm.precision).

Every Linear (ops/matmul.py) on float32 / bfloat16 / float16 GPU arrays runs its three products through
cublasGemmEx with float32 accumulation. Under a bf16 or fp16 policy the operands are cast to the low dtype
first: y in the low dtype, dx in x's dtype, dW written by cuBLAS directly in float32 for the master
weights. Under the fp32 policy the operands stay float32 (under tf32 a float32 GEMM may use TF32 tensor
cores).

cuBLAS is called through ctypes on a handle of this module's own (one per thread and device), given a
workspace of its own: CuPy's cuBLAS binding refuses every call while a stream is being captured into a
CUDA graph (backend.CudaGraph), while cuBLAS itself supports capture when the handle's workspace is set
explicitly (cublasSetWorkspace), so a captured decoding step can hold its GEMMs. The library is the one
CuPy already loaded into the process.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import threading

import numpy as np

from .. import backend, precision

_CUDA_TYPE = {"float32": 0, "float16": 2, "bfloat16": 14}   # cudaDataType: CUDA_R_32F, CUDA_R_16F, CUDA_R_16BF
_OP_N, _OP_T = 0, 1
_COMPUTE_32F = 68                                           # CUBLAS_COMPUTE_32F: float32 accumulation
_COMPUTE_32F_FAST_TF32 = 77
_GEMM_DEFAULT_TENSOR_OP = 99
_LINEAR_DTYPES = ("float32", "bfloat16", "float16")
_WORKSPACE_BYTES = 32 << 20                                 # cuBLAS's recommendation for Hopper
_ONE, _ZERO = np.ones(1, dtype=np.float32), np.zeros(1, dtype=np.float32)   # alpha, beta (host pointer mode)
_local = threading.local()


def linear_supported(x, weight) -> bool:
    """Whether this Linear runs through `gemm`: GPU arrays of float32, bfloat16 or float16."""
    return (backend.is_cupy_array(x) and backend.is_cupy_array(weight)
            and np.dtype(x.dtype).name in _LINEAR_DTYPES and np.dtype(weight.dtype).name in _LINEAR_DTYPES)


def linear_forward(x, weight):
    """y = x @ Wᵀ with both operands in the policy's low dtype (float32 under the fp32 policy), float32
    accumulation, y in that dtype.

    Returns (y, x_low, weight_low): the low-precision operands are what the backward needs (saving them
    instead of x and W halves the memory a float32 x would take).
    """
    cp = backend.cupy_module()
    compute = precision.get_policy().compute
    low = precision.dtype_named(compute) if compute is not None else np.dtype(np.float32)
    x_low = cp.ascontiguousarray(x.astype(low, copy=False))
    weight_low = cp.ascontiguousarray(weight.astype(low, copy=False))
    x2 = x_low.reshape(-1, x.shape[-1])                                      # (..., in) -> (N, in)
    y = gemm(x2, weight_low, transpose_b=True, out_dtype=low)               # (N, out)
    return y.reshape(*x.shape[:-1], weight.shape[0]), x_low, weight_low     # -> (..., out)


def linear_backward(dy, x_low, weight_low, dtypes, needs_input_grad=(True, True), dweight_out=None):
    """dx = dy @ W (in x's dtype), dW = dyᵀ @ x summed over the leading axes (in W's dtype, float32 for
    master weights: cuBLAS writes the float32 accumulator directly), from the saved low operands;
    dtypes = (x.dtype, weight.dtype) of the forward's inputs. dweight_out: where dW is written when it
    fits (a C-contiguous array of W's shape and dtype: the optimizer's gradient buffer), else None."""
    cp = backend.cupy_module()
    x_dtype, weight_dtype = dtypes
    dy_low = cp.ascontiguousarray(dy.astype(x_low.dtype, copy=False))
    dy2 = dy_low.reshape(-1, dy.shape[-1])                                   # (..., out) -> (N, out)
    dx = dweight = None
    if needs_input_grad[0]:
        dx = gemm(dy2, weight_low, out_dtype=x_dtype).reshape(x_low.shape)   # (N, in) -> (..., in)
    if len(needs_input_grad) > 1 and needs_input_grad[1]:
        dweight = gemm(dy2, x_low.reshape(-1, x_low.shape[-1]), transpose_a=True, out_dtype=weight_dtype,
                       out=dweight_out if _fits(dweight_out, (dy2.shape[1], x_low.shape[-1]), weight_dtype) else None)
    return dx, dweight


def _fits(out, shape, dtype) -> bool:
    """Whether `out` can take a gemm result of this shape and dtype (see gemm's `out`)."""
    return (out is not None and backend.is_cupy_array(out) and out.shape == tuple(shape)
            and out.dtype == np.dtype(dtype) and out.flags.c_contiguous)


def gemm(a, b, transpose_a=False, transpose_b=False, out_dtype=None, out=None):
    """op(a) @ op(b) through cublasGemmEx, float32 accumulation, result in `out_dtype` (default a's),
    written into `out` when given (C-contiguous, of the result's shape and dtype).

    a, b: C-contiguous 2-D CuPy arrays of one dtype (bfloat16, float16 or float32); op transposes when
    asked. cuBLAS is column-major: a row-major C = op(a) op(b) is the column-major Cᵀ = op(b)ᵀ op(a)ᵀ,
    and a row-major matrix read column-major is its transpose, so b goes first and neither is copied.
    Float32 operands use TF32 tensor cores under the tf32 policy.
    """
    cp = backend.cupy_module()
    if a.dtype != b.dtype or a.ndim != 2 or b.ndim != 2 or not (a.flags.c_contiguous and b.flags.c_contiguous):
        raise ValueError("gemm: a and b must be C-contiguous 2-D arrays of one dtype")
    rows, inner = (a.shape[1], a.shape[0]) if transpose_a else a.shape
    inner_b, cols = (b.shape[1], b.shape[0]) if transpose_b else b.shape
    if inner != inner_b:
        raise ValueError(f"gemm: inner dimensions differ ({inner} vs {inner_b})")
    out_dtype = np.dtype(out_dtype or a.dtype)
    if out is None:
        out = cp.empty((rows, cols), dtype=out_dtype)
    elif not _fits(out, (rows, cols), out_dtype):
        raise ValueError(f"gemm: out must be a C-contiguous {out_dtype} array of shape {(rows, cols)}")
    if out.size == 0:
        return out
    if inner == 0:
        out.fill(0)
        return out
    in_type, out_type = _CUDA_TYPE[np.dtype(a.dtype).name], _CUDA_TYPE[out_dtype.name]
    compute = _COMPUTE_32F_FAST_TF32 if in_type == 0 and precision.get_policy().tf32 else _COMPUTE_32F
    library, handle = _handle(cp.cuda.get_current_stream().ptr)
    _check(library.cublasGemmEx(handle, _OP_T if transpose_b else _OP_N, _OP_T if transpose_a else _OP_N,
                                cols, rows, inner,
                                _ONE.ctypes.data, b.data.ptr, in_type, b.shape[1],
                                a.data.ptr, in_type, a.shape[1],
                                _ZERO.ctypes.data, out.data.ptr, out_type, cols,
                                compute, _GEMM_DEFAULT_TENSOR_OP), "cublasGemmEx")
    return out


def _check(status: int, call: str) -> None:
    if status != 0:
        raise RuntimeError(f"{call} failed with cuBLAS status {status}")


def _library():
    """libcublas as CuPy loaded it (found in the process's mapped files), through ctypes."""
    library = getattr(_library, "loaded", None)
    if library is None:
        backend.cupy_part("cupy_backends.cuda.libs.cublas")          # makes CuPy load libcublas
        path = None
        try:
            with open("/proc/self/maps", encoding="utf-8") as maps:
                for line in maps:
                    name = line.rsplit("/", 1)[-1].strip()
                    if name.startswith("libcublas.so"):
                        path = line[line.index("/"):].strip()
                        break
        except OSError:
            pass
        path = path or ctypes.util.find_library("cublas")
        if path is None:
            raise RuntimeError("libcublas was not found in the process or on the library path")
        library = ctypes.CDLL(path)
        library.cublasCreate_v2.argtypes = [ctypes.POINTER(ctypes.c_void_p)]
        library.cublasSetStream_v2.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        library.cublasSetPointerMode_v2.argtypes = [ctypes.c_void_p, ctypes.c_int]
        library.cublasSetWorkspace_v2.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
        integer, pointer = ctypes.c_int, ctypes.c_void_p
        library.cublasGemmEx.argtypes = [pointer, integer, integer, integer, integer, integer,
                                         pointer, pointer, integer, integer, pointer, integer, integer,
                                         pointer, pointer, integer, integer, integer, integer]
        _library.loaded = library
    return library


def _handle(stream: int):
    """(library, this thread's cuBLAS handle on the current device, bound to `stream`), the handle made once
    with its own workspace; the stream is set again only when it changed."""
    cp = backend.cupy_module()
    device = cp.cuda.runtime.getDevice()
    handles = getattr(_local, "handles", None)
    if handles is None:
        handles = _local.handles = {}
    entry = handles.get(device)
    if entry is None:
        library = _library()
        handle = ctypes.c_void_p()
        _check(library.cublasCreate_v2(ctypes.byref(handle)), "cublasCreate")
        workspace = cp.empty(_WORKSPACE_BYTES, dtype=cp.uint8)                  # kept as long as the handle
        _check(library.cublasSetWorkspace_v2(handle, workspace.data.ptr, _WORKSPACE_BYTES), "cublasSetWorkspace")
        _check(library.cublasSetPointerMode_v2(handle, 0), "cublasSetPointerMode")   # alpha, beta on the host
        entry = handles[device] = [library, handle, workspace, None]
    if entry[3] != stream:
        _check(entry[0].cublasSetStream_v2(entry[1], stream), "cublasSetStream")
        entry[3] = stream
    return entry[0], entry[1]
