"""The multi-tensor AdamW kernel (kernels/adamw.cu): every parameter of the model updated in one launch."""
from __future__ import annotations

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


def _pointers(arrays):
    """A device array of the arrays' data pointers (uint64), cached by those pointers."""
    cp = backend.cupy_module()
    key = tuple(a.data.ptr for a in arrays)
    table = _pointer_tables.get(key)
    if table is None:
        table = cp.asarray(np.array(key, dtype=np.uint64))
        if len(_pointer_tables) > 64:
            _pointer_tables.clear()
        _pointer_tables[key] = table
    return table


def _decays(weight_decays):
    """The weight decays as a device float32 array, cached by their values."""
    key = ("decays",) + tuple(float(w) for w in weight_decays)
    table = _pointer_tables.get(key)
    if table is None:
        table = backend.cupy_module().asarray(np.array(key[1:], dtype=np.float32))
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


def adamw_step(params, grads, exp_avgs, exp_avg_sqs, values, beta1, beta2, eps, weight_decays):
    """One AdamW step for every parameter in a single launch (float32 params, grads and moments).

    values: a float32 array of 4 on the device or the host, [grad_scale, lr, step_size, inv_sqrt_bias2]
    (optim.AdamW.update_values); a device array is read by the kernel, so a captured training step can
    compute grad_scale there. For each tensor i, element j, with g = grad · grad_scale:
        p ← p · (1 − lr·wd_i);  m ← β₁m + (1−β₁)g;  v ← β₂v + (1−β₂)g²
        p ← p − step_size · m / (√v · inv_sqrt_bias2 + eps)                    (PyTorch's AdamW)
    A grad_scale that is not finite skips the update. Updates params, exp_avgs and exp_avg_sqs in place.
    Every table the launch reads is cached by the buffers' addresses, so a captured step copies nothing
    from the host (the optimizer's flat buffers never move).
    """
    cp = backend.cupy_module()
    params, grads, exp_avgs, exp_avg_sqs = list(params), list(grads), list(exp_avgs), list(exp_avg_sqs)
    _check(params, grads, exp_avgs, exp_avg_sqs)
    if len(weight_decays) != len(params):
        raise ValueError("adamw_step: one weight decay per parameter is needed")
    blocks, sizes, block_tensor, block_start = _chunk_table(params)
    if not blocks:
        return
    if not backend.is_cupy_array(values):
        values = cp.asarray(np.asarray(values, dtype=np.float32))        # one small copy a step
    if values.dtype != cp.float32 or values.size != 4:
        raise ValueError("adamw_step: values must be 4 float32 numbers [grad_scale, lr, step_size, inv_sqrt_bias2]")
    function("adamw.cu", "adamw_multi_tensor")(
        (blocks,), (256,),
        (_pointers(params), _pointers(grads), _pointers(exp_avgs), _pointers(exp_avg_sqs),
         sizes, block_tensor, block_start, _decays(weight_decays), values,
         np.float32(beta1), np.float32(beta2), np.float32(eps)))


def sum_of_squares(arrays):
    """Σ x² over float32 CuPy arrays, as a one-element float32 device array: no host sync (one launch
    for the per-chunk partial sums, then their sum)."""
    cp = backend.cupy_module()
    arrays = list(arrays)
    _check(arrays)
    blocks, sizes, block_tensor, block_start = _chunk_table(arrays)
    if not blocks:
        return cp.zeros(1, dtype=cp.float32)
    partials = cp.empty(blocks, dtype=cp.float32)
    function("adamw.cu", "square_sums")((blocks,), (256,), (_pointers(arrays), sizes, block_tensor, block_start,
                                                             partials))
    total = cp.empty(1, dtype=cp.float32)
    function("adamw.cu", "sum_partials")((1,), (256,), (partials, np.int32(blocks), total))
    return total


def _scalar(array, name):
    if not (backend.is_cupy_array(array) and array.dtype == np.float32 and array.size == 1
            and array.flags.c_contiguous):
        raise ValueError(f"{name} must be one float32 number on the device")


def accumulate_loss(total, loss, share: float, first: bool) -> None:
    """total[0] = (0 if first else total[0]) + loss · share, on the device (float32, one element each):
    a step's loss summed over its micro-batches."""
    _scalar(total, "accumulate_loss: total")
    _scalar(loss, "accumulate_loss: loss")
    function("adamw.cu", "accumulate_loss")((1,), (1,), (total, loss, np.float32(share), np.int32(bool(first))))


def step_decision(loss, square_sum, clip: float, values, report) -> None:
    """The end of a training step, on the device: values[0] (AdamW's grad_scale) = the clipping factor
    min(1, clip / (‖g‖ + 1e-6)) (1 when clip ≤ 0), or NaN when the loss or ‖g‖ = √square_sum is not
    finite (the update is skipped); report = [loss, ‖g‖, 1 if applied else 0]. float32 throughout."""
    _scalar(loss, "step_decision: loss")
    _scalar(square_sum, "step_decision: square_sum")
    if not (backend.is_cupy_array(values) and values.dtype == np.float32 and values.size >= 1):
        raise ValueError("step_decision: values must be a float32 device array")
    if not (backend.is_cupy_array(report) and report.dtype == np.float32 and report.size == 3):
        raise ValueError("step_decision: report must be 3 float32 numbers on the device")
    function("adamw.cu", "step_decision")((1,), (1,), (loss, square_sum, np.float32(clip), values, report))
