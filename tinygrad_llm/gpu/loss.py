"""Cross-entropy's fused forward and backward kernel (kernels/cross_entropy.cu): one block a row, two passes."""
from __future__ import annotations

import numpy as np

from .. import backend
from .arrays import aligned, all_on_gpu, contiguous, empty, float_kind, suffix
from .compiler import function

# Threads per block by logits dtype: the fastest on an H200 for 16384 × 50304 (benchmarks/RESULTS.md).
THREADS = {"float32": 1024, "bfloat16": 512, "float16": 512}


def supports(logits) -> bool:
    """logits2d (N, V) with V > 0."""
    return all_on_gpu(logits) and float_kind(logits) and logits.ndim == 2 and logits.shape[1] > 0


def cross_entropy_forward_backward(logits, targets, ignore_index=-100, in_place=False):
    """Mean cross-entropy over the rows whose target is not ignore_index, and its gradient.

    Returns (loss, dlogits): loss a 0-d float32 array (NaN when every row is ignored);
    dlogits = (softmax(logits) − onehot(target)) / count with zero rows for ignored targets, in the logits'
    dtype. With in_place=True dlogits is written over `logits` (no second N×V buffer). No host sync.
    """
    cp = backend.cupy_module()
    rows, vocab = logits.shape
    if not logits.flags.c_contiguous:
        logits = cp.ascontiguousarray(logits)
        in_place = True                                   # the copy is ours to overwrite
    targets = contiguous(targets.astype(cp.int64, copy=False))
    dlogits = logits if in_place else empty(logits.shape, logits.dtype)
    keep_count = empty((1,), np.float32)                  # a device scalar: the host never waits
    function("cross_entropy.cu", "count_kept")((1,), (1024,), (targets, np.int64(rows), np.int64(ignore_index),
                                                               keep_count))
    row_loss = empty((rows,), np.float32)
    if rows:
        pack = 16 // logits.itemsize
        vectorised = int(vocab % pack == 0 and aligned(logits, dlogits))
        function("cross_entropy.cu", f"cross_entropy_{suffix(logits.dtype)}")(
            (rows,), (THREADS[np.dtype(logits.dtype).name],),
            (logits, targets, dlogits, row_loss, keep_count, np.int64(rows), np.int64(vocab),
             np.int64(ignore_index), np.int32(vectorised)))
    loss = empty((), np.float32)                          # 0/0 = NaN when every row is ignored
    function("cross_entropy.cu", "mean_loss")((1,), (1024,), (row_loss, np.int64(rows), keep_count, loss))
    return loss, dlogits
