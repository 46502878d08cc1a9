"""SwiGLU's kernels (kernels/swiglu.cu), on separate gate and up arrays or on a packed gate‖up projection.

Each thread handles one element, or 16 bytes of elements when the widths, strides and addresses allow.
"""
from __future__ import annotations

import numpy as np

from .arrays import aligned, all_on_gpu, contiguous, empty, float_kind, grid, same_dtype, suffix
from .compiler import function


def supports(gate, up) -> bool:
    return all_on_gpu(gate, up) and float_kind(gate, up) and same_dtype(gate, up) and gate.shape == up.shape


def supports_packed(gate_up) -> bool:
    """gate_up (..., 2F) = [gate | up] along the last axis."""
    return all_on_gpu(gate_up) and float_kind(gate_up) and gate_up.ndim >= 1 and gate_up.shape[-1] % 2 == 0


def _launch_forward(gate, up, y, rows, width, in_stride):
    pack = 16 // gate.itemsize
    vectorised = width % pack == 0 and in_stride % pack == 0 and aligned(gate, up, y)
    work = rows * width // (pack if vectorised else 1)
    if work:
        function("swiglu.cu", f"swiglu_forward_{suffix(gate.dtype)}")(
            *grid(work), (gate, up, y, np.int64(rows), np.int64(width), np.int64(in_stride), np.int64(width),
                          np.int32(vectorised)))


def _launch_backward(dy, gate, up, dgate, dup, rows, width, in_stride, grad_stride):
    pack = 16 // gate.itemsize
    vectorised = (width % pack == 0 and in_stride % pack == 0 and grad_stride % pack == 0
                  and aligned(dy, gate, up, dgate, dup))
    work = rows * width // (pack if vectorised else 1)
    if work:
        function("swiglu.cu", f"swiglu_backward_{suffix(gate.dtype)}")(
            *grid(work), (dy, gate, up, dgate, dup, np.int64(rows), np.int64(width), np.int64(in_stride),
                          np.int64(width), np.int64(grad_stride), np.int32(vectorised)))


def swiglu_forward(gate, up):
    """y = silu(gate) · up, in gate's dtype."""
    gate, up = contiguous(gate), contiguous(up)
    y = empty(gate.shape, gate.dtype)
    width = gate.shape[-1] if gate.ndim else 1
    _launch_forward(gate, up, y, gate.size // max(width, 1), width, width)
    return y


def swiglu_backward(dy, gate, up):
    """(dgate, dup): dgate = dy·up·σ(g)·(1 + g·(1 − σ(g))),  dup = dy·silu(g)."""
    dy, gate, up = contiguous(dy.astype(gate.dtype, copy=False)), contiguous(gate), contiguous(up)
    dgate, dup = empty(gate.shape, gate.dtype), empty(gate.shape, gate.dtype)
    width = gate.shape[-1] if gate.ndim else 1
    _launch_backward(dy, gate, up, dgate, dup, gate.size // max(width, 1), width, width, width)
    return dgate, dup


def swiglu_packed_forward(gate_up):
    """SwiGLU of a packed projection gate_up (..., 2F) = [gate | up]: y (..., F), no slicing copies."""
    gate_up = contiguous(gate_up)
    width = gate_up.shape[-1] // 2
    y = empty(gate_up.shape[:-1] + (width,), gate_up.dtype)
    flat = gate_up.reshape(-1)                                        # (..., 2F) -> (N·2F,)
    _launch_forward(flat, flat[width:], y, gate_up.size // (2 * width) if width else 0, width, 2 * width)
    return y


def swiglu_packed_backward(dy, gate_up):
    """d(gate_up) (..., 2F) = [dgate | dup] for the packed form."""
    gate_up = contiguous(gate_up)
    dy = contiguous(dy.astype(gate_up.dtype, copy=False))
    width = gate_up.shape[-1] // 2
    d_gate_up = empty(gate_up.shape, gate_up.dtype)
    flat, dflat = gate_up.reshape(-1), d_gate_up.reshape(-1)          # (..., 2F) -> (N·2F,)
    rows = gate_up.size // (2 * width) if width else 0
    _launch_backward(dy, flat, flat[width:], dflat, dflat[width:], rows, width, 2 * width, 2 * width)
    return d_gate_up
