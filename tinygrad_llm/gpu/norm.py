"""RMSNorm's kernels (kernels/rms_norm.cu): one warp a row forward; backward with per-block dw partial sums;
the residual form (x + branch, then its RMSNorm) in one pass over the rows."""
from __future__ import annotations

import numpy as np

from .arrays import all_on_gpu, contiguous, dtype_name, empty, float_kind, multiprocessors, same_dtype, suffix
from .compiler import function, selection

MAX_CHANNELS = 8192          # the backward's per-warp dweight rows of one block live in shared memory


def supports(x, weight) -> bool:
    """(x, weight) or (dy, weight): float arrays, weight (C,) with C ≤ MAX_CHANNELS, x (..., C); weight
    in x's dtype or float32 (master weights)."""
    return (all_on_gpu(x, weight) and float_kind(x, weight) and weight.ndim == 1 and x.ndim >= 1
            and x.shape[-1] == weight.shape[0] and 0 < weight.shape[0] <= MAX_CHANNELS
            and (same_dtype(x, weight) or np.dtype(weight.dtype) == np.float32))


# (x, branch, y, weight) dtype suffixes that add_rms_norm_forward has a kernel for
_ADD_NORM_KERNELS = {("f32", "f32", "f32", "f32"), ("f32", "bf16", "f32", "f32"), ("f32", "bf16", "bf16", "f32"),
                     ("f32", "f16", "f32", "f32"), ("f32", "f16", "f16", "f32"), ("bf16", "bf16", "bf16", "bf16"),
                     ("bf16", "bf16", "bf16", "f32"), ("f16", "f16", "f16", "f16"), ("f16", "f16", "f16", "f32")}
# (x, dy, weight) suffixes of the backward with dy in another dtype than x (dy in y's low dtype)
_MIXED_BACKWARD = {("f32", "bf16", "f32"), ("f32", "f16", "f32")}


def supports_residual(x, branch, weight, out_dtype) -> bool:
    """Whether add_rms_norm_forward handles these: x (..., C), branch of x's shape in x's dtype (or a 16-bit
    branch on a float32 x), y in x's dtype or the branch's, weight as for rms_norm_forward."""
    dtypes = (suffix(x.dtype), suffix(branch.dtype), suffix(out_dtype), suffix(weight.dtype))
    return supports(x, weight) and all_on_gpu(branch) and branch.shape == x.shape and dtypes in _ADD_NORM_KERNELS


def add_rms_norm_forward(x, branch, weight, eps, out_dtype=None):
    """s = x + branch (branch rounded to x's dtype), y = RMSNorm(s) in `out_dtype` (default x's), in one pass.

    Returns (s, y, r): s in x's dtype, y in out_dtype, r (..., 1) float32 as rms_norm_forward's."""
    out_dtype = np.dtype(x.dtype if out_dtype is None else out_dtype)
    x, branch, weight = contiguous(x), contiguous(branch), contiguous(weight)
    channels = x.shape[-1]
    rows = x.size // channels
    total = empty(x.shape, x.dtype)
    y = empty(x.shape, out_dtype)
    r = empty(x.shape[:-1] + (1,), np.float32)
    if rows:
        warps_per_block = 8
        blocks = (rows + warps_per_block - 1) // warps_per_block
        name = "_".join(suffix(d) for d in (x.dtype, branch.dtype, out_dtype, weight.dtype))
        _kernel(f"add_rms_norm_forward_{name}")(
            (blocks,), (32 * warps_per_block,),
            (x, branch, weight, total, y, r, np.int32(rows), np.int32(channels), np.float32(eps)))
    return total, y, r


def rms_norm_forward(x, weight, eps):
    """y = x · r · w with r = 1/√(mean(x², −1) + eps).  Returns (y, r): y in x's dtype, r (..., 1) float32.

    With bf16/fp16 x and float32 w (master weights), y keeps x's dtype (the activation dtype).
    """
    x, weight = contiguous(x), contiguous(weight)
    channels = x.shape[-1]
    rows = x.size // channels
    y = empty(x.shape, x.dtype)
    r = empty(x.shape[:-1] + (1,), np.float32)
    if rows:
        warps_per_block = 8
        blocks = (rows + warps_per_block - 1) // warps_per_block
        _kernel(f"rms_norm_forward_{suffix(x.dtype)}_{suffix(weight.dtype)}")(
            (blocks,), (32 * warps_per_block,),
            (x, weight, y, r, np.int32(rows), np.int32(channels), np.float32(eps)))
    return y, r


def rms_norm_backward(dy, x, weight, r, pending=None, low=False):
    """dx = r·(g − x̂·mean(g·x̂)), g = dy·w, x̂ = x·r;  dw = Σ_rows dy·x̂.  dx in x's dtype, dw in w's.

    `pending` (x's shape and dtype): added to dx in the same pass (the gradient that x's other uses have
    already sent it). `low` true, with dy in a 16-bit dtype other than x's: dx is also returned in dy's
    dtype, written in the same pass. Returns (dx, dw), or (dx, dw, dx in dy's dtype) with `low`."""
    mixed = (suffix(x.dtype), suffix(dy.dtype), suffix(weight.dtype))
    kernel_name = f"rms_norm_backward_{mixed[0]}_{mixed[2]}"
    if mixed in _MIXED_BACKWARD:                  # dy in y's low dtype, read as it is
        kernel_name = "rms_norm_backward_" + "_".join(mixed)
    else:
        if low:
            raise ValueError("rms_norm_backward: a 16-bit copy of dx needs dy in a 16-bit dtype and x in float32")
        dy = dy.astype(x.dtype, copy=False)
    if pending is not None and (pending.shape != x.shape or pending.dtype != x.dtype):
        raise ValueError(f"rms_norm_backward: pending gradient {pending.dtype}{tuple(pending.shape)} does not "
                         f"match x {x.dtype}{tuple(x.shape)}")
    dy, x, weight, r = contiguous(dy), contiguous(x), contiguous(weight), contiguous(r)
    pending = None if pending is None else contiguous(pending)
    channels = x.shape[-1]
    rows = x.size // channels
    dx = empty(x.shape, x.dtype)
    dx_low = empty(x.shape, dy.dtype) if low else None
    dweight = empty((channels,), weight.dtype)
    if not rows:
        dweight.fill(0)
        return (dx, dweight, dx_low) if low else (dx, dweight)
    warps_per_block = max(1, min(8, 12288 // channels))          # per-warp dw rows fit in 48 KB
    blocks = max(1, min((rows + warps_per_block - 1) // warps_per_block, 4 * multiprocessors()))
    partial = empty((blocks, channels), np.float32)
    _kernel(kernel_name)(
        (blocks,), (32 * warps_per_block,),
        (dy, x, weight, r, dx, partial, np.int32(rows), np.int32(channels), pending, dx_low),
        shared_mem=warps_per_block * channels * 4)
    _kernel(f"rms_norm_backward_dw_{suffix(weight.dtype)}")(        # (blocks, C) -> (C,), blocks in order
        ((channels + 127) // 128,), (128,), (partial, dweight, np.int32(blocks), np.int32(channels)))
    return (dx, dweight, dx_low) if low else (dx, dweight)


FILE = "rms_norm.cu"
_LOW_DTYPES = {"bf16": "bfloat16", "f16": "float16"}


def _low_dtype(name: str) -> str:
    """The 16-bit dtype a kernel of rms_norm.cu touches (its name says), float32 for the all-float32 ones."""
    found = [_LOW_DTYPES[word] for word in name.split("_") if word in _LOW_DTYPES]
    return found[0] if found else "float32"


def _part(name: str) -> str:
    """The pass a kernel of rms_norm.cu belongs to (its name says): its module holds that pass only."""
    return "backward" if "backward" in name else "forward"


def _kernel(name: str):
    """A kernel of rms_norm.cu, from the module of its 16-bit dtype and pass (kernels/select.cuh)."""
    return function(FILE, name, options=selection(dtype=_low_dtype(name), part=_part(name)))


def modules(dtype) -> list:
    """The modules a model computing in `dtype` launches ((filename, options, arch) each, for
    compiler.prefetch): the forward and backward modules of float32, and of a 16-bit dtype."""
    dtypes = ["float32"] + ([dtype_name(dtype)] if dtype_name(dtype) in _LOW_DTYPES.values() else [])
    return [(FILE, selection(dtype=name, part=part), None) for name in dtypes for part in ("forward", "backward")]
