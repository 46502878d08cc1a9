"""Inverted dropout's kernel (kernels/dropout.cu): a stateless counter-based random stream."""
from __future__ import annotations

import numpy as np

from .arrays import all_on_gpu, contiguous, empty, float_kind, grid, suffix
from .compiler import function


def supports(x) -> bool:
    return all_on_gpu(x) and float_kind(x)


def dropout_forward(x, p, seed):
    """(y, mask): inverted dropout, mask in x's dtype holding 0 or 1/(1 − p). The same seed gives the same
    mask; the bits differ from NumPy's generator."""
    x = contiguous(x)
    y, mask = empty(x.shape, x.dtype), empty(x.shape, x.dtype)
    if x.size:
        threshold = min(int(p * 2.0 ** 32), 2 ** 32 - 1)
        function("dropout.cu", f"dropout_forward_{suffix(x.dtype)}")(
            *grid(x.size // (16 // x.itemsize) + 1),
            (x, y, mask, np.int64(x.size), np.uint64(int(seed) & 0xFFFFFFFFFFFFFFFF), np.uint32(threshold),
             np.float32(1.0 / (1.0 - p))))
    return y, mask
