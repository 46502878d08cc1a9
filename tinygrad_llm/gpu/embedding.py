"""The embedding's backward kernel (kernels/embedding.cu): scatter-add of dy rows by float32 atomics."""
from __future__ import annotations

import numpy as np

from .. import backend
from .arrays import THREADS, all_on_gpu, contiguous, float_kind, multiprocessors, suffix
from .compiler import function


def supports(dy) -> bool:
    return all_on_gpu(dy) and float_kind(dy) and dy.ndim >= 1


def embedding_backward(ids, dy, vocab, out=None):
    """dweight (V, C) = Σ over positions with ids == v of dy, by float32 atomics; in dy's dtype. `out`: a
    C-contiguous float32 (V, C) array to sum into (cleared first) when dy is float32, else ignored."""
    cp = backend.cupy_module()
    channels = dy.shape[-1]
    dy2 = contiguous(dy.reshape(-1, channels))                                    # (..., C) -> (N, C)
    ids1 = contiguous(cp.asarray(ids).reshape(-1).astype(cp.int64, copy=False))  # (...) -> (N,)
    if (out is not None and backend.is_cupy_array(out) and out.shape == (vocab, channels) and dy.dtype == np.float32
            and out.dtype == np.float32 and out.flags.c_contiguous):
        accumulator = out
        accumulator.data.memset_async(0, accumulator.nbytes)
    else:
        accumulator = cp.zeros((vocab, channels), dtype=cp.float32)
    if ids1.size and channels:
        blocks = max(1, min(ids1.size, 32 * multiprocessors()))
        function("embedding.cu", f"embedding_backward_{suffix(dy.dtype)}")(
            (blocks,), (THREADS,), (ids1, dy2, accumulator, np.int64(ids1.size), np.int64(channels),
                                    np.int64(vocab)))
    return accumulator.astype(dy.dtype, copy=False)
