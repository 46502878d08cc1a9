"""Rotate-half RoPE's kernel (kernels/rope.cu) on strided (B, H, T, D) views; the backward is the same
rotation with −sin. The same pass without the rotation, `copy_heads`, moves heads between the packed
(B, T, H, D) layout and attention's (B, H, T, D) in 16-byte accesses."""
from __future__ import annotations

import numpy as np

from .. import backend
from .arrays import aligned, all_on_gpu, contiguous, empty, float_kind, grid, suffix
from .compiler import function


def supports(x) -> bool:
    """x or dy: a float (B, H, T, D) array with D even."""
    return all_on_gpu(x) and float_kind(x) and x.ndim == 4 and x.shape[-1] % 2 == 0


def copy_heads(x, out=None):
    """out = x for (B, H, T, D) strided views with a contiguous last axis (out may be a transposed view of a
    packed (B, T, H, D) array, x one of a packed projection); a new C-contiguous array without `out`.
    D even. Returns out."""
    return rope_forward(x, x, x, out=out, rotate=False)


def rope_forward(x, cos, sin, out=None, rotate=True):
    """Rotate-half RoPE of x (B, H, T, D) by cos/sin (T, D/2); the backward is this with −sin.

    x and `out` may be any strided views whose last axis is contiguous (e.g. the (B, T, H, D) ->
    (B, H, T, D) transpose of a packed projection), so the transpose costs no copy. Without `out` the
    result is a new C-contiguous (B, H, T, D) array. `out` may be x itself (in place).
    """
    batch, heads, length, head_dim = x.shape
    if x.strides[-1] != x.itemsize:
        x = backend.cupy_module().ascontiguousarray(x)
    if rotate:
        cos = contiguous(cos.astype(x.dtype, copy=False))
        sin = contiguous(sin.astype(x.dtype, copy=False))
    else:                                                 # unread by the kernel
        cos = sin = x
    if out is None:
        out = empty(x.shape, x.dtype)
    elif out.shape != x.shape or out.dtype != x.dtype or out.strides[-1] != out.itemsize:
        raise ValueError("rope_forward: out must match x's shape and dtype and have a contiguous last axis")
    half = head_dim // 2
    pairs = batch * heads * length * half
    if pairs:
        strides = [s // x.itemsize for s in x.strides[:3]]
        out_strides = [s // out.itemsize for s in out.strides[:3]]
        pack = 16 // x.itemsize
        vectorised = (half % pack == 0 and all(s % pack == 0 for s in strides + out_strides)
                      and aligned(x, out, *((cos, sin) if rotate else ())))
        work = pairs // (pack if vectorised else 1)
        function("rope.cu", f"rope_{suffix(x.dtype)}")(
            *grid(work),
            (x, cos, sin, out, np.int32(heads), np.int32(length), np.int32(half),
             *(np.int64(s) for s in strides), *(np.int64(s) for s in out_strides),
             np.int64(work), np.int32(vectorised), np.int32(rotate)))
    return out
