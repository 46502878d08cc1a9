"""Launchers for kernels/quant_matmul.cu: linear layers on quantized weights on the GPU.

`quantized_linear(x, weight)` is what ops/quantized.linear_forward calls for CuPy arrays:
- up to GEMV_ROWS rows of x (decode): `quant_gemv_<format>`, one fused dequantise + GEMV launch per
  GEMV_ROWS rows, never materialising Ŵ;
- more rows (prefill): `dequantize_<format>` writes Ŵ as float32 (out, in) once, then one cuBLAS GEMM
  (CuPy's matmul; under a bf16/fp16 policy the GEMM runs through tinygrad_llm.gpu.gemm like any Linear).
x is cast to float32 and made contiguous first; y is float32.
Simplifications: float32 activations inside the kernels; Ŵ is rebuilt for every prefill call (no cache of
the float matrix, which would undo the memory saving); one device, the current stream.
"""
from __future__ import annotations

import numpy as np

from .. import backend
from . import compiler, gemm

GEMV_ROWS = 8             # as #define GEMV_ROWS in kernels/quant_matmul.cu
_WARPS_PER_BLOCK = 8      # as #define WARPS_PER_BLOCK
_THREADS = 256
_FILE = "quant_matmul.cu"


def supports(x, *weight_arrays) -> bool:
    """A CuPy activation and CuPy weight blocks: the kernels take any row count and feature size."""
    return all(backend.is_cupy_array(a) for a in (x, *weight_arrays))


def _kernel(name: str):
    return compiler.function(_FILE, name)


def dequantize(weight):
    """Ŵ (out, in) float32 on the GPU from a QuantizedMatrix whose arrays are CuPy arrays."""
    cp = backend.cupy_module()
    out_features, in_features = weight.shape
    w = cp.empty((out_features, in_features), dtype=cp.float32)
    blocks = max(1, min(-(-w.size // _THREADS), 65535))
    _kernel(f"dequantize_{weight.kind}")((blocks,), (_THREADS,),
                                         (cp.ascontiguousarray(weight.values), cp.ascontiguousarray(weight.scale), w,
                                          np.int64(out_features), np.int64(in_features)))
    return w


def quantized_linear(x, weight):
    """y = x @ Ŵᵀ: x (..., in) CuPy, weight a QuantizedMatrix with CuPy arrays -> y (..., out) float32."""
    cp = backend.cupy_module()
    out_features, in_features = weight.shape
    if not backend.is_cupy_array(weight.values):
        weight = weight.to("cuda")
    x2 = cp.ascontiguousarray(cp.asarray(x).reshape(-1, in_features).astype(cp.float32, copy=False))   # (N, in)
    rows = x2.shape[0]
    if rows > GEMV_ROWS:
        w = dequantize(weight)
        if gemm.linear_supported(x2, w):                       # the policy's GEMM (float32 under fp32)
            y = gemm.linear_forward(x2, w)[0].astype(cp.float32)
        else:
            y = x2 @ w.T                                        # cuBLAS
        return y.reshape(*x.shape[:-1], out_features)
    y = cp.empty((rows, out_features), dtype=cp.float32)
    _kernel(f"quant_gemv_{weight.kind}")((-(-out_features // _WARPS_PER_BLOCK),), (_THREADS,),
                                         (cp.ascontiguousarray(weight.values), cp.ascontiguousarray(weight.scale), x2, y,
                                          np.int64(out_features), np.int64(in_features), np.int32(rows)))
    return y.reshape(*x.shape[:-1], out_features)
