"""RMSNorm: root-mean-square normalisation with a learned gain (no mean subtraction, no bias).

Three paths, chosen once in the forward and recorded for the backward: the CUDA kernel (GPU arrays with
a kernel for them), the chunked path (NumPy arrays of float32/64: cache-sized row chunks spread over the
threads of tinygrad_llm.cpu_threads), and the plain array expression (CuPy arrays without a kernel,
16-bit NumPy arrays, or chunked=False).
"""
from __future__ import annotations

import numpy as np

from ..backend import array_module
from ..gpu import kernel
from ..cpu_threads import run_row_chunks
from ..tensor import Function
from .matmul import accumulation_dtype


class RMSNorm(Function):
    """Root-mean-square normalisation over the last axis.

    Forward:  r = 1/√(mean(x², axis=−1) + eps);  x̂ = x · r;  y = x̂ · w
    Backward: g = dy · w                       (forward was y = x̂·w, so dx̂ = dy·w)
              dw = Σ_rows dy · x̂
              dx = r · (g − x̂ · mean(g · x̂, axis=−1))
    Shapes:   x, y, dy: (..., C)   w, dw: (C,)   r: (..., 1)
    Saves:    the path; plain: x̂, r, w;  chunked and kernel: x, r, w (x̂ is recomputed per chunk)
    Chunked:  the same formulas on row ranges of x (N, C); dw is the sum of the per-chunk partial sums,
              added in chunk order, so the result does not depend on the thread count.
    Low precision: mean(x²) and the row sums of the backward accumulate in float32 for 16-bit inputs.
    """

    def forward(self, x, weight, eps=1e-5, chunked=True):
        if weight.ndim != 1 or weight.shape[0] != x.shape[-1]:
            raise ValueError(f"rms_norm: weight shape {tuple(weight.shape)} does not match the last axis of "
                             f"x {tuple(x.shape)}")
        xp = array_module(x)
        fast = kernel("rms_norm", x, weight)
        if fast is not None:
            y, r = fast.rms_norm_forward(x, weight, eps)
            self.save(path=fast, x=x, r=r, weight=weight)
            return y
        if chunked and xp is np and accumulation_dtype(x.dtype) == x.dtype:   # 16-bit: the plain path
            y, r = _chunked_forward(x, weight, eps)
            self.save(path="chunked", x=x, r=r, weight=weight)
            return y
        accumulate = accumulation_dtype(x.dtype)
        r = (1.0 / xp.sqrt((x * x).mean(axis=-1, keepdims=True, dtype=accumulate) + eps)).astype(x.dtype)
        xhat = x * r
        self.save(path="plain", xhat=xhat, r=r, weight=weight)
        return xhat * weight

    def backward(self, dy):
        path, saved_x, r, weight = self.saved        # saved_x is x̂ on the plain path, x otherwise
        if path == "chunked":
            return _chunked_backward(dy, saved_x, r, weight)
        if path != "plain":                          # the kernel module the forward ran
            return path.rms_norm_backward(dy, saved_x, weight, r)
        xhat = saved_x
        accumulate = accumulation_dtype(dy.dtype)
        g = dy * weight
        projection = (g * xhat).mean(axis=-1, keepdims=True, dtype=accumulate).astype(dy.dtype)
        dx = r * (g - xhat * projection)
        dweight = (dy * xhat).reshape(-1, weight.shape[0]).sum(axis=0, dtype=accumulate)  # (..., C) -> (N, C) -> (C,)
        return dx, dweight.astype(weight.dtype, copy=False)


def _chunked_forward(x, weight, eps):
    channels = x.shape[-1]
    x2 = x.reshape(-1, channels)                                    # (..., C) -> (N, C)
    y = np.empty_like(x2)
    r = np.empty((x2.shape[0], 1), dtype=x.dtype)
    inverse_channels = x.dtype.type(1.0 / channels)

    def part(start, end):
        rows = x2[start:end]
        square = rows * rows
        np.sum(square, axis=-1, keepdims=True, out=r[start:end])
        scale = r[start:end]
        scale *= inverse_channels
        scale += x.dtype.type(eps)
        np.sqrt(scale, out=scale)
        np.reciprocal(scale, out=scale)
        out = y[start:end]
        np.multiply(rows, scale, out=out)
        out *= weight

    run_row_chunks(part, x2.shape[0], channels, np)
    return y.reshape(x.shape), r


def _chunked_backward(dy, x, r, weight):
    channels = x.shape[-1]
    x2, dy2 = x.reshape(-1, channels), dy.reshape(-1, channels)     # (..., C) -> (N, C)
    dx = np.empty_like(x2)
    inverse_channels = x.dtype.type(1.0 / channels)

    def part(start, end):
        xhat = x2[start:end] * r[start:end]
        partial_dweight = (dy2[start:end] * xhat).sum(axis=0)
        g = dy2[start:end] * weight                                 # forward was y = x̂·w, so dx̂ = dy·w
        projection = (g * xhat).sum(axis=-1, keepdims=True)
        projection *= inverse_channels
        xhat *= projection
        out = dx[start:end]
        np.subtract(g, xhat, out=out)
        out *= r[start:end]
        return partial_dweight

    partials = run_row_chunks(part, x2.shape[0], channels, np)
    dweight = partials[0]
    for partial in partials[1:]:
        dweight = dweight + partial
    return dx.reshape(x.shape), dweight.astype(weight.dtype, copy=False)


def rms_norm_reference(x, weight, eps=1e-5):
    """RMSNorm composed from primitives (a test oracle)."""
    return x / ((x * x).mean(axis=-1, keepdims=True) + eps).sqrt() * weight
