"""Activations and the softmax family: softmax, log_softmax, silu, gelu (tanh form), swiglu.

Each has a composed `*_reference` built from primitive Tensor ops: slower, but an independent oracle for
the tests. The logistic function is evaluated as ½(1 + tanh(x/2)), which never overflows. Softmax sums
16-bit rows in float32.
"""
from __future__ import annotations

import math

import numpy as np

from ..backend import array_module
from ..gpu import kernel
from ..cpu_threads import run_row_chunks
from ..tensor import Function
from . import fused_cpu
from .matmul import accumulation_dtype


def sigmoid(x):
    """σ(x) = 1 / (1 + e⁻ˣ) on a raw array, computed as ½(1 + tanh(x/2)) so large |x| cannot overflow.
    One temporary, updated in place (NumPy would otherwise allocate one per arithmetic step)."""
    s = x * x.dtype.type(0.5)
    array_module(x).tanh(s, out=s)
    s += 1
    s *= 0.5
    return s


class Softmax(Function):
    """Forward:  y = exp(x − max x) / Σ exp(x − max x) along `axis`
    Backward: dx = y · (dy − Σ dy·y)        (the Jacobian diag(y) − y yᵀ applied to dy)
    Shapes:   x, y, dy alike
    Saves:    y
    """

    def forward(self, x, axis=-1):
        xp = array_module(x)
        y = x - x.max(axis=axis, keepdims=True)           # max subtraction: exp never overflows
        xp.exp(y, out=y)
        y /= y.sum(axis=axis, keepdims=True, dtype=accumulation_dtype(y.dtype)).astype(y.dtype)
        self.save(y=y, axis=axis)
        return y

    def backward(self, dy):
        y, axis = self.saved
        dx = dy * y
        total = dx.sum(axis=axis, keepdims=True, dtype=accumulation_dtype(dx.dtype)).astype(dx.dtype)
        dx -= y * total                                   # y·dy − y·Σ(dy·y)
        return dx


class LogSoftmax(Function):
    """Forward:  y = x − logsumexp(x) along `axis`, with logsumexp(x) = m + log Σ exp(x − m), m = max x
    Backward: dx = dy − softmax(x) · Σ dy
    Shapes:   x, y, dy alike
    Saves:    y (softmax is exp(y))
    """

    def forward(self, x, axis=-1):
        xp = array_module(x)
        shifted = x - x.max(axis=axis, keepdims=True)
        total = xp.exp(shifted).sum(axis=axis, keepdims=True, dtype=accumulation_dtype(x.dtype))
        y = shifted - xp.log(total).astype(x.dtype)
        self.save(y=y, axis=axis)
        return y

    def backward(self, dy):
        y, axis = self.saved
        return dy - array_module(y).exp(y) * dy.sum(axis=axis, keepdims=True,
                                                     dtype=accumulation_dtype(dy.dtype)).astype(dy.dtype)


class SiLU(Function):
    """Forward:  y = x · σ(x)
    Backward: dx = dy · σ(x) · (1 + x · (1 − σ(x)))
    Shapes:   x, y, dy alike
    Saves:    x, σ(x)
    """

    def forward(self, x):
        s = sigmoid(x)
        self.save(x=x, s=s)
        return x * s

    def backward(self, dy):
        x, s = self.saved
        dx = 1 - s
        dx *= x
        dx += 1
        dx *= s
        dx *= dy                                          # dy · σ · (1 + x(1 − σ))
        return dx


_GELU_C = math.sqrt(2.0 / math.pi)


class GELU(Function):
    """Forward:  y = ½ x (1 + tanh u),  u = √(2/π) (x + 0.044715 x³)      (the tanh approximation)
    Backward: dx = dy · [½ (1 + tanh u) + ½ x (1 − tanh² u) · √(2/π) (1 + 3·0.044715 x²)]
    Shapes:   x, y, dy alike
    Saves:    x, tanh u
    """

    def forward(self, x):
        t = array_module(x).tanh(_GELU_C * (x + 0.044715 * x * x * x))
        self.save(x=x, t=t)
        return 0.5 * x * (1 + t)

    def backward(self, dy):
        x, t = self.saved
        du_dx = _GELU_C * (1 + 3 * 0.044715 * x * x)
        return dy * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * du_dx)


class SwiGLU(Function):
    """The gated MLP non-linearity of Llama.

    Forward:  y = silu(g) · u = g · σ(g) · u
    Backward: du = dy · silu(g)
              dg = dy · u · σ(g) · (1 + g · (1 − σ(g)))      (silu'(g) = σ(g) + g σ(g)(1 − σ(g)))
    Shapes:   g, u, y, dy: (..., F)
    Saves:    the path; g, u (or gate_up) and, on the array path, σ(g)   (the CUDA kernel and the
              compiled CPU loop recompute σ)
    Packed form, `swiglu(gate_up)`: g, u = gate_up[..., :F], gate_up[..., F:] (one GEMM against the
    gate and up weights stacked gave both); same formulas, with dg and du written into the two halves
    of one d(gate_up) (..., 2F) instead of the zero-filled gradients of two slices.
    On NumPy arrays the rows are worked in cache-sized chunks spread over threads (cpu_threads); two
    contiguous float32/64 arrays (not packed) take the compiled loops of ops/fused_cpu.c instead, one pass
    forward and one backward, the rows split over the threads.
    """

    def forward(self, gate, up=None, packed=False):
        if packed:
            if gate.shape[-1] % 2:
                raise ValueError(f"swiglu: a packed gate‖up needs an even last axis, got {tuple(gate.shape)}")
            hidden = gate.shape[-1] // 2
            flat = gate.reshape(-1, 2 * hidden)                              # (..., 2F) -> (N, 2F)
            gate2, up2 = flat[:, :hidden], flat[:, hidden:]
            fast = kernel("swiglu_packed", gate)
            out_shape = (*gate.shape[:-1], hidden)
            if fast is None and not any(self.needs_input_grad) and type(gate) is np.ndarray:   # inference
                y = np.empty((flat.shape[0], hidden), dtype=gate.dtype)
                call = swiglu_call(flat, None, y)
                if call is not None:                          # one compiled pass; nothing kept for a backward
                    call()
                    return y.reshape(out_shape)
        else:
            if up is None or gate.shape != up.shape:
                raise ValueError(f"swiglu: gate {tuple(gate.shape)} and up "
                                 f"{None if up is None else tuple(up.shape)} must have the same shape")
            gate2, up2 = gate.reshape(-1, gate.shape[-1]), up.reshape(-1, up.shape[-1])   # (..., F) -> (N, F)
            fast = kernel("swiglu", gate, up)
            out_shape = gate.shape
        if fast is not None:        # the CUDA kernel recomputes σ in the backward
            self.save(path=fast, gate=gate, up=up, s=None, packed=packed)
            return fast.swiglu_packed_forward(gate) if packed else fast.swiglu_forward(gate, up)
        if not packed and fused_cpu.usable(gate, up):      # one compiled pass; the backward recomputes σ
            y = np.empty_like(gate)
            width = gate2.shape[1]
            fused_cpu.over_rows("swiglu_forward", gate.dtype, gate2.shape[0], 2 * width, lambda f, start, end: f(
                fused_cpu.address(gate, start * width), fused_cpu.address(up, start * width),
                fused_cpu.address(y, start * width), (end - start) * width))
            self.save(path="fused", gate=gate, up=up, s=None, packed=False)
            return y
        xp = array_module(gate)
        s = xp.empty(gate2.shape, dtype=gate.dtype)
        y = xp.empty_like(s)
        half = gate.dtype.type(0.5)

        def part(start, end):
            g, u, sigma = gate2[start:end], up2[start:end], s[start:end]
            xp.multiply(g, half, out=sigma)                           # σ(g) = ½ (1 + tanh(g/2)), no overflow
            xp.tanh(sigma, out=sigma)
            sigma *= half
            sigma += half
            out = y[start:end]
            xp.multiply(g, sigma, out=out)
            out *= u

        run_row_chunks(part, gate2.shape[0], 2 * gate2.shape[1], xp, balanced=True)
        self.save(path="array", gate=gate, up=up, s=s, packed=packed)
        return y.reshape(out_shape)

    def backward(self, dy):
        path, gate, up, s, packed = self.saved
        if path == "fused":
            return _fused_backward(dy, gate, up)
        if path != "array":         # the kernel module the forward ran
            return path.swiglu_packed_backward(dy, gate) if packed else path.swiglu_backward(dy, gate, up)
        xp = array_module(dy)
        hidden = s.shape[1]
        dy2 = dy.reshape(-1, hidden)                                         # (..., F) -> (N, F)
        if packed:
            flat = gate.reshape(-1, 2 * hidden)
            gate2, up2 = flat[:, :hidden], flat[:, hidden:]
            d_flat = xp.empty(flat.shape, dtype=dy.dtype)                    # (N, 2F): d(gate) ‖ d(up)
            d_gate2, d_up2 = d_flat[:, :hidden], d_flat[:, hidden:]
        else:
            gate2, up2 = gate.reshape(-1, hidden), up.reshape(-1, hidden)
            d_gate2, d_up2 = xp.empty_like(dy2), xp.empty_like(dy2)

        def part(start, end):
            g, u, sigma = gate2[start:end], up2[start:end], s[start:end]
            d_gate, d_up, upstream = d_gate2[start:end], d_up2[start:end], dy2[start:end]
            xp.multiply(upstream, sigma, out=d_gate)                 # a = dy · σ(g)
            xp.multiply(d_gate, g, out=d_up)                         # du = a · g = dy · silu(g)
            d_gate *= u                                              # b = dy · u · σ(g)
            t = 1 - sigma
            t *= g
            t *= d_gate                                              # b · g (1 − σ(g))
            d_gate += t                                              # dg = b (1 + g(1 − σ(g))) = dy · u · silu'(g)

        run_row_chunks(part, s.shape[0], 2 * hidden, xp, balanced=True)
        if packed:
            return d_flat.reshape(gate.shape)
        return d_gate2.reshape(gate.shape), d_up2.reshape(up.shape)


def swiglu_call(gate, up, y):
    """SwiGLU's forward as one compiled loop bound to gate and up (N, F), or a packed gate‖up (N, 2F) with up
    None, and y (N, F), contiguous: a callable that writes y = silu(g) · u each time it is called, for a
    decoding step that refills the inputs in place (generate.Decoder's CPU steps; nothing is kept for a
    backward). ops/fused_cpu.c's swiglu_forward, or swiglu_packed_forward a row at a time. None where the
    loops do not apply (see fused_cpu.usable)."""
    arrays = (gate, y) if up is None else (gate, up, y)                          # kept alive by the call
    if not fused_cpu.usable(*arrays) or gate.ndim != 2 or y.ndim != 2:
        return None
    rows, hidden = y.shape
    if up is None:
        if gate.shape != (rows, 2 * hidden):
            return None
        function = fused_cpu.function("swiglu_packed_forward", y.dtype)
        pointers = (fused_cpu.address(gate), fused_cpu.address(y), rows, hidden)
    else:
        if gate.shape != y.shape or up.shape != y.shape:
            return None
        function = fused_cpu.function("swiglu_forward", y.dtype)
        pointers = (fused_cpu.address(gate), fused_cpu.address(up), fused_cpu.address(y), rows * hidden)
    return lambda arrays=arrays: function(*pointers)


def _fused_backward(dy, gate, up):
    """SwiGLU's backward by the compiled loop (ops/fused_cpu.c): σ(g) recomputed, one pass."""
    dy = np.ascontiguousarray(dy, dtype=gate.dtype)
    d_gate, d_up = np.empty_like(gate), np.empty_like(up)
    width = gate.shape[-1]
    fused_cpu.over_rows("swiglu_backward", gate.dtype, gate.size // width, 3 * width, lambda f, start, end: f(
        *(fused_cpu.address(a, start * width) for a in (dy, gate, up, d_gate, d_up)), (end - start) * width))
    return d_gate, d_up


# ------------------------------------------------------------------ composed references (test oracles)
def sigmoid_reference(x):
    return 0.5 * ((x * 0.5).tanh() + 1)


def softmax_reference(x, axis=-1):
    e = (x - x.detach().max(axis=axis, keepdims=True)).exp()
    return e / e.sum(axis=axis, keepdims=True)


def log_softmax_reference(x, axis=-1):
    shifted = x - x.detach().max(axis=axis, keepdims=True)
    return shifted - shifted.exp().sum(axis=axis, keepdims=True).log()


def silu_reference(x):
    return x * sigmoid_reference(x)


def gelu_reference(x):
    return x * 0.5 * ((x + x * x * x * 0.044715) * _GELU_C).tanh() + x * 0.5


def swiglu_reference(gate, up):
    return silu_reference(gate) * up
