"""Inverted dropout's kernel (kernels/dropout.cu): a stateless counter-based random stream."""
from __future__ import annotations

import numpy as np

from .. import rng
from .arrays import all_on_gpu, contiguous, empty, float_kind, grid, seed_base, suffix
from .compiler import function


def supports(x) -> bool:
    return all_on_gpu(x) and float_kind(x)


def dropout_forward(x, p, seed):
    """(y, mask): inverted dropout, mask in x's dtype holding 0 or 1/(1 − p). The same seed gives the same
    mask; the bits differ from NumPy's generator. `seed`: an int, or a rng.DeviceSeed whose base the
    kernel reads from device memory when it runs (a captured training step's seed)."""
    x = contiguous(x)
    y, mask = empty(x.shape, x.dtype), empty(x.shape, x.dtype)
    if x.size:
        threshold = min(int(p * 2.0 ** 32), 2 ** 32 - 1)
        base, offset = (seed.base, seed.offset) if isinstance(seed, rng.DeviceSeed) else (None, int(seed))
        function("dropout.cu", f"dropout_forward_{suffix(x.dtype)}")(
            *grid(x.size // (16 // x.itemsize) + 1),
            (x, y, mask, np.int64(x.size), seed_base(base), np.uint64(offset & rng.MASK64), np.uint32(threshold),
             np.float32(1.0 / (1.0 - p))))
    return y, mask
