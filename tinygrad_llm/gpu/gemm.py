"""The cuBLAS GEMM behind the precision policies (tinygrad_llm.precision), and Linear under bf16 / fp16.

Under a bf16 or fp16 policy every Linear (ops/matmul.py) runs its three products through cublasGemmEx on
low-precision operands with float32 accumulation: y in the low dtype, dx in x's dtype, dW written by
cuBLAS directly in float32 for the master weights. Under tf32 a float32 GEMM may use TF32 tensor cores.
"""
from __future__ import annotations

import numpy as np

from .. import backend, precision

_CUDA_TYPE = {"float32": 0, "float16": 2, "bfloat16": 14}   # cudaDataType: CUDA_R_32F, CUDA_R_16F, CUDA_R_16BF
_OP_N, _OP_T = 0, 1
_COMPUTE_32F = 68                                           # CUBLAS_COMPUTE_32F: float32 accumulation
_COMPUTE_32F_FAST_TF32 = 77
_GEMM_DEFAULT_TENSOR_OP = 99
_LINEAR_DTYPES = ("float32", "bfloat16", "float16")


def linear_supported(x, weight) -> bool:
    """Whether the current policy runs this Linear in low precision (GPU arrays of float dtypes)."""
    return (precision.get_policy().compute is not None
            and backend.is_cupy_array(x) and backend.is_cupy_array(weight)
            and np.dtype(x.dtype).name in _LINEAR_DTYPES and np.dtype(weight.dtype).name in _LINEAR_DTYPES)


def linear_forward(x, weight):
    """y = x @ Wᵀ with both operands in the policy's low dtype, float32 accumulation, y in that dtype.

    Returns (y, x_low, weight_low): the low-precision operands are what the backward needs (saving them
    instead of x and W halves the memory a float32 x would take).
    """
    cp = backend.cupy_module()
    low = precision.dtype_named(precision.get_policy().compute)
    x_low = cp.ascontiguousarray(x.astype(low, copy=False))
    weight_low = cp.ascontiguousarray(weight.astype(low, copy=False))
    x2 = x_low.reshape(-1, x.shape[-1])                                      # (..., in) -> (N, in)
    y = gemm(x2, weight_low, transpose_b=True, out_dtype=low)               # (N, out)
    return y.reshape(*x.shape[:-1], weight.shape[0]), x_low, weight_low     # -> (..., out)


def linear_backward(dy, x_low, weight_low, dtypes, needs_input_grad=(True, True)):
    """dx = dy @ W (in x's dtype), dW = dyᵀ @ x summed over the leading axes (in W's dtype, float32 for
    master weights: cuBLAS writes the float32 accumulator directly), from the saved low operands;
    dtypes = (x.dtype, weight.dtype) of the forward's inputs."""
    cp = backend.cupy_module()
    x_dtype, weight_dtype = dtypes
    dy_low = cp.ascontiguousarray(dy.astype(x_low.dtype, copy=False))
    dy2 = dy_low.reshape(-1, dy.shape[-1])                                   # (..., out) -> (N, out)
    dx = dweight = None
    if needs_input_grad[0]:
        dx = gemm(dy2, weight_low, out_dtype=x_dtype).reshape(x_low.shape)   # (N, in) -> (..., in)
    if len(needs_input_grad) > 1 and needs_input_grad[1]:
        dweight = gemm(dy2, x_low.reshape(-1, x_low.shape[-1]), transpose_a=True, out_dtype=weight_dtype)
    return dx, dweight


def gemm(a, b, transpose_a=False, transpose_b=False, out_dtype=None):
    """op(a) @ op(b) through cublasGemmEx, float32 accumulation, result in `out_dtype` (default a's).

    a, b: C-contiguous 2-D CuPy arrays of one dtype (bfloat16, float16 or float32); op transposes when
    asked. cuBLAS is column-major: a row-major C = op(a) op(b) is the column-major Cᵀ = op(b)ᵀ op(a)ᵀ,
    and a row-major matrix read column-major is its transpose, so b goes first and neither is copied.
    Float32 operands use TF32 tensor cores under the tf32 policy.
    """
    cp = backend.cupy_module()
    cublas = backend.cupy_part("cupy_backends.cuda.libs.cublas")
    if a.dtype != b.dtype or a.ndim != 2 or b.ndim != 2 or not (a.flags.c_contiguous and b.flags.c_contiguous):
        raise ValueError("gemm: a and b must be C-contiguous 2-D arrays of one dtype")
    rows, inner = (a.shape[1], a.shape[0]) if transpose_a else a.shape
    inner_b, cols = (b.shape[1], b.shape[0]) if transpose_b else b.shape
    if inner != inner_b:
        raise ValueError(f"gemm: inner dimensions differ ({inner} vs {inner_b})")
    out_dtype = np.dtype(out_dtype or a.dtype)
    out = cp.empty((rows, cols), dtype=out_dtype)
    if out.size == 0:
        return out
    if inner == 0:
        out.fill(0)
        return out
    one, zero = np.ones(1, dtype=np.float32), np.zeros(1, dtype=np.float32)
    in_type, out_type = _CUDA_TYPE[np.dtype(a.dtype).name], _CUDA_TYPE[out_dtype.name]
    compute = _COMPUTE_32F_FAST_TF32 if in_type == 0 and precision.get_policy().tf32 else _COMPUTE_32F
    handle = cp.cuda.device.get_cublas_handle()
    cublas.setPointerMode(handle, 0)                         # CUBLAS_POINTER_MODE_HOST: alpha, beta on the host
    cublas.gemmEx(handle, _OP_T if transpose_b else _OP_N, _OP_T if transpose_a else _OP_N,
                  cols, rows, inner,
                  one.ctypes.data, b.data.ptr, in_type, b.shape[1],
                  a.data.ptr, in_type, a.shape[1],
                  zero.ctypes.data, out.data.ptr, out_type, cols,
                  compute, _GEMM_DEFAULT_TENSOR_OP)
    return out
