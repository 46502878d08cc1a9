"""Linear layers on quantized weights (inference only): y = x @ Ŵᵀ with Ŵ a `QuantizedMatrix`.

The dispatch point for every Linear of KV-cached decoding (tinygrad_llm.generate):
- a float weight: the same path as ops/matmul.Linear (the bf16/fp16 cuBLAS policy on the GPU, else x @ Wᵀ);
- a QuantizedMatrix on the GPU: the CUDA kernels of kernels/quant_matmul.cu (tinygrad_llm.gpu_quant), a
  fused dequantise + GEMV for a few rows (decode), dequantise + cuBLAS for many (prefill);
- a QuantizedMatrix on the CPU: the weight is dequantised a tile of output rows at a time into a
  cache-sized float32 buffer, and each tile is one BLAS GEMM (x @ tileᵀ) into its columns of y.
  The tiles are spread over tinygrad_llm.cpu_threads' threads.

Why tiles of float32 and BLAS rather than an int8 dot product: NumPy has no int8 GEMM with int32
accumulation (an integer matmul runs NumPy's own unvectorised loop), and quantizing x per block, as
llama.cpp does, costs a pass of its own; benchmarks/decode.py --matmul measures both (docs/quantization.md).
Simplification: no backward (quantized weights are not trained); the op raises if one is asked for.
"""
from __future__ import annotations

import threading

import numpy as np

from ..backend import is_cupy_array, kernel
from ..cpu_threads import parallel_items, thread_count
from ..quant.formats import QuantizedMatrix
from ..tensor import Function

TILE_ELEMENTS = 1 << 16          # float32 weights dequantised per tile (256 KiB: stays in L2 beside x and y)
_scratch = threading.local()


def _tile_buffer(elements: int) -> np.ndarray:
    """A per-thread float32 scratch buffer of at least `elements` (reused across calls: no allocation)."""
    buffer = getattr(_scratch, "buffer", None)
    if buffer is None or buffer.size < elements:
        buffer = _scratch.buffer = np.empty(elements, dtype=np.float32)
    return buffer


def float_linear(x, weight):
    """x (..., in) @ weight (out, in)ᵀ for a float weight: the path of ops/matmul.Linear's forward."""
    fast = kernel("linear", x, weight)
    if fast is not None:                   # a bf16/fp16 policy: low-precision cuBLAS
        return fast.linear_forward(x, weight)[0]
    x2 = x.reshape(-1, x.shape[-1])                                        # (..., in) -> (N, in)
    return (x2 @ weight.T).reshape(*x.shape[:-1], weight.shape[0])          # (N, out) -> (..., out)


def dequantized_tiles_linear(x2: np.ndarray, weight: QuantizedMatrix) -> np.ndarray:
    """CPU: (N, in) float32 @ Ŵᵀ -> (N, out) float32, Ŵ dequantised TILE_ELEMENTS at a time."""
    out_features, in_features = weight.shape
    y = np.empty((x2.shape[0], out_features), dtype=np.float32)
    rows = max(1, TILE_ELEMENTS // in_features)
    tiles = [(start, min(start + rows, out_features)) for start in range(0, out_features, rows)]

    def work(group):
        buffer = _tile_buffer(rows * in_features)
        for start, end in group:
            tile = buffer[:(end - start) * in_features].reshape(end - start, in_features)   # (rows, in)
            weight.dequantize(start, end, out=tile)
            np.matmul(x2, tile.T, out=y[:, start:end])

    threads = min(thread_count(), len(tiles))
    parallel_items(work, [tiles[i::threads] for i in range(threads)])
    return y


def int8_dot_linear(x2: np.ndarray, weight: QuantizedMatrix) -> np.ndarray:
    """CPU, the alternative that benchmarks/decode.py --matmul measures: x quantized per row to int8,
    int8 × int8 products summed in int32 (NumPy's integer matmul), rescaled. int8 weights only."""
    if weight.kind != "int8":
        raise ValueError("int8_dot_linear takes int8 (per-channel) weights")
    x_scale = np.abs(x2).max(axis=1, keepdims=True) / np.float32(127)                       # (N, 1)
    x_q = np.rint(x2 / np.where(x_scale == 0, 1, x_scale)).astype(np.int32)                  # (N, in)
    accumulated = x_q @ weight.data.T.astype(np.int32)                                       # (N, out) int32
    return accumulated.astype(np.float32) * x_scale * weight.scale[None, :]


def linear_forward(x, weight):
    """y = x @ Ŵᵀ for a float array or a QuantizedMatrix weight (the dispatch point). x (..., in)."""
    if not isinstance(weight, QuantizedMatrix):
        return float_linear(x, weight)
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"quantized_linear: input has {x.shape[-1]} features, weight expects {weight.shape[1]} "
                         f"(weight shape {weight.shape} is (out, in))")
    if is_cupy_array(x) or is_cupy_array(weight.data):
        from .. import gpu_quant   # the GPU layer; imported only once GPU arrays exist
        return gpu_quant.quantized_linear(x, weight)
    x2 = np.ascontiguousarray(x.reshape(-1, x.shape[-1]), dtype=np.float32)                 # (..., in) -> (N, in)
    return dequantized_tiles_linear(x2, weight).reshape(*x.shape[:-1], weight.shape[0])      # -> (..., out)


class QuantizedLinear(Function):
    """Forward:  y = x @ Ŵᵀ,  Ŵ = dequantize(W) (Q8_0, Q4_0 or per-channel INT8: tinygrad_llm.quant)
    Backward: none: quantized weights are for inference; asking for a gradient raises
    Shapes:   x (..., in)   W a QuantizedMatrix (out, in)   y (..., out) float32 (CPU)
    Saves:    nothing
    """

    def forward(self, x, weight):
        return linear_forward(x, weight)

    def backward(self, dy):
        raise RuntimeError("quantized_linear has no backward: quantized weights are inference-only "
                           "(train the float run, then quantize it)")
