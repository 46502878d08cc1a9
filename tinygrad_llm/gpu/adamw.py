"""The multi-tensor AdamW kernel (kernels/adamw.cu): every parameter of the model updated in one launch."""
from __future__ import annotations

import math

import numpy as np

from .. import backend
from .compiler import function

CHUNK = 4096            # elements per block (kernels/adamw.cu's CHUNK)
_chunk_tables: dict = {}
_pointer_tables: dict = {}


def supports(*arrays) -> bool:
    """Every param, grad and moment: float32 CuPy arrays."""
    return (bool(arrays) and all(backend.is_cupy_array(a) for a in arrays)
            and all(np.dtype(a.dtype) == np.float32 for a in arrays))


def _chunk_table(arrays):
    """Which tensor and first element each block of a multi-tensor launch handles (cached by sizes)."""
    cp = backend.cupy_module()
    key = tuple(a.size for a in arrays)
    table = _chunk_tables.get(key)
    if table is None:
        sizes = np.array(key, dtype=np.int64)
        chunks = (sizes + CHUNK - 1) // CHUNK
        block_tensor = np.repeat(np.arange(len(key), dtype=np.int32), chunks)
        block_start = np.concatenate([np.arange(c, dtype=np.int64) * CHUNK for c in chunks])
        table = (int(chunks.sum()), cp.asarray(sizes), cp.asarray(block_tensor), cp.asarray(block_start))
        _chunk_tables[key] = table
    return table


def _pointers(arrays, cache: bool):
    """A device array of the arrays' data pointers (uint64); cached for buffers that never move."""
    cp = backend.cupy_module()
    key = tuple(a.data.ptr for a in arrays)
    table = _pointer_tables.get(key) if cache else None
    if table is None:
        table = cp.asarray(np.array(key, dtype=np.uint64))
        if cache:
            if len(_pointer_tables) > 64:
                _pointer_tables.clear()
            _pointer_tables[key] = table
    return table


def _check(*lists):
    count = len(lists[0])
    if any(len(other) != count for other in lists):
        raise ValueError("adamw_step: the lists of params, grads and moments differ in length")
    for arrays in zip(*lists):
        if any(a.shape != arrays[0].shape or not a.flags.c_contiguous or np.dtype(a.dtype) != np.float32
               for a in arrays):
            raise ValueError("adamw_step: each param, grad and moment must be C-contiguous float32 of one shape")


def adamw_step(params, grads, exp_avgs, exp_avg_sqs, lr, beta1, beta2, eps, weight_decays, step,
               grad_scale=1.0):
    """One AdamW step for every parameter in a single launch (float32 params, grads and moments).

    For each tensor i, element j, with g = grad · grad_scale (a Python float, or a device float32 scalar
    such as a clipping factor computed on the GPU, so no host sync is needed):
        p ← p · (1 − lr·wd_i);  m ← β₁m + (1−β₁)g;  v ← β₂v + (1−β₂)g²
        p ← p − (lr / (1 − β₁ᵗ)) · m / (√v / √(1 − β₂ᵗ) + eps)              (PyTorch's AdamW)
    Updates params, exp_avgs and exp_avg_sqs in place; `step` is t, counted from 1.
    """
    cp = backend.cupy_module()
    params, grads, exp_avgs, exp_avg_sqs = list(params), list(grads), list(exp_avgs), list(exp_avg_sqs)
    _check(params, grads, exp_avgs, exp_avg_sqs)
    if len(weight_decays) != len(params):
        raise ValueError("adamw_step: one weight decay per parameter is needed")
    blocks, sizes, block_tensor, block_start = _chunk_table(params)
    if not blocks:
        return
    if backend.is_cupy_array(grad_scale):
        scale = grad_scale.astype(cp.float32, copy=False).reshape(1)
    else:
        scale = cp.full(1, grad_scale, dtype=cp.float32)
    decays = cp.asarray(np.asarray(weight_decays, dtype=np.float32))
    function("adamw.cu", "adamw_multi_tensor")(
        (blocks,), (256,),
        (_pointers(params, True), _pointers(grads, False), _pointers(exp_avgs, True), _pointers(exp_avg_sqs, True),
         sizes, block_tensor, block_start, decays, scale,
         np.float32(lr), np.float32(beta1), np.float32(beta2), np.float32(eps),
         np.float32(lr / (1.0 - beta1 ** step)), np.float32(1.0 / math.sqrt(1.0 - beta2 ** step))))
