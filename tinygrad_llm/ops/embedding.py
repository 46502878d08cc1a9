"""Embedding lookup: rows of a weight table picked by integer ids."""
from __future__ import annotations

import numpy as np

from ..backend import array_module, inputs_checked
from ..gpu import kernel
from ..tensor import Function
from . import fused_cpu
from .matmul import accumulation_dtype


class Embedding(Function):
    """Forward:  y[..., :] = W[ids[...], :]
    Backward: dW[v] = Σ over positions where ids == v of dy      (repeated ids accumulate)
              `dW[ids] += dy` would keep only one of the repeats. On NumPy arrays the rows of dy are
              sorted by id and each run of equal ids summed (add.reduceat), several times faster than
              add.at; contiguous float32/64 NumPy arrays take one compiled pass instead (ops/fused_cpu.c:
              each row added to its id's row in position order); CuPy arrays use add.at (atomic adds)
    Shapes:   ids: (...) integers in [0, V);  W, dW: (V, C);  y, dy: (..., C)
    Saves:    ids, V
    16-bit gradients are summed in float32 (repeated ids add up many rows) and cast back. dW is written
    straight into the optimizer's gradient buffer when the autograd offers it (gradient_targets) and the
    path can (the kernel and the compiled pass, float32).
    """

    gradient_targets = True

    def forward(self, ids, weight):
        xp = array_module(weight)
        checked = ids if array_module(ids) is not np else np.asarray(ids)   # host ids are checked on the host
        if checked.dtype.kind not in "iu":
            raise TypeError(f"embedding: ids must be integers, got dtype {checked.dtype}")
        vocab = weight.shape[0]
        if checked.size and not inputs_checked() and (int(checked.min()) < 0 or int(checked.max()) >= vocab):
            raise IndexError(f"embedding: ids must lie in [0, {vocab}), got values in "
                             f"[{int(checked.min())}, {int(checked.max())}]")
        ids = xp.asarray(checked)
        self.save(ids=ids, vocab=vocab)
        return weight[ids]

    def backward(self, dy, into=(None,)):
        ids, vocab = self.saved
        target = into[-1]                                                  # the weight is the one Tensor input
        fast = kernel("embedding", dy)
        if fast is not None:
            return fast.embedding_backward(ids, dy, vocab, out=target)
        xp = array_module(dy)
        channels = dy.shape[-1]
        if xp is np and fused_cpu.usable(dy):                               # one compiled pass
            rows = np.ascontiguousarray(dy.reshape(-1, channels))          # (..., C) -> (N, C)
            flat_ids = np.ascontiguousarray(ids.reshape(-1), dtype=np.int64)
            fits = (type(target) is np.ndarray and target.shape == (vocab, channels) and target.dtype == dy.dtype
                    and target.flags.c_contiguous)
            dweight = target if fits else np.empty((vocab, channels), dtype=dy.dtype)
            fused_cpu.library()["embedding_backward", dy.dtype](
                fused_cpu.address(flat_ids), fused_cpu.address(rows), fused_cpu.address(dweight), flat_ids.size,
                vocab, channels)
            return dweight
        dweight = xp.zeros((vocab, channels), dtype=accumulation_dtype(dy.dtype))   # 16-bit: sums in float32
        flat_ids, rows = ids.reshape(-1), dy.reshape(-1, channels)         # (..., C) -> (N, C)
        if xp is np and flat_ids.size:
            order = np.argsort(flat_ids, kind="stable")
            sorted_ids = flat_ids[order]
            starts = np.flatnonzero(np.concatenate([[True], sorted_ids[1:] != sorted_ids[:-1]]))   # run starts
            dweight[sorted_ids[starts]] = np.add.reduceat(rows[order].astype(dweight.dtype, copy=False), starts,
                                                          axis=0)
        else:
            xp.add.at(dweight, flat_ids, rows)
        return dweight.astype(dy.dtype, copy=False)


def embedding_reference(ids, weight):
    """Embedding as indexing (a test oracle: GetItem's backward also accumulates repeats)."""
    return weight[array_module(weight.data).asarray(ids)]
