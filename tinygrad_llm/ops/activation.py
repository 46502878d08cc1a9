"""Activations and the softmax family: softmax, log_softmax, silu, gelu (tanh form), swiglu.

Each has a composed `*_reference` built from primitive Tensor ops: slower, but an independent oracle for
the tests. The logistic function is evaluated as ½(1 + tanh(x/2)), which never overflows.
"""
from __future__ import annotations

import math

from ..backend import array_module
from ..gpu import kernel
from ..tensor import Function


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
        y /= y.sum(axis=axis, keepdims=True)
        self.save(y=y, axis=axis)
        return y

    def backward(self, dy):
        y, axis = self.saved
        dx = dy * y
        dx -= y * dx.sum(axis=axis, keepdims=True)       # y·dy − y·Σ(dy·y)
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
        y = shifted - xp.log(xp.exp(shifted).sum(axis=axis, keepdims=True))
        self.save(y=y, axis=axis)
        return y

    def backward(self, dy):
        y, axis = self.saved
        return dy - array_module(y).exp(y) * dy.sum(axis=axis, keepdims=True)


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
              dg = dy · u · σ(g) · (1 + g · (1 − σ(g)))
    Shapes:   g, u, y, dy: (..., F)
    Saves:    g, u   (σ(g) is recomputed: one array less to keep per layer)
    """

    def forward(self, gate, up):
        if gate.shape != up.shape:
            raise ValueError(f"swiglu: gate {tuple(gate.shape)} and up {tuple(up.shape)} must have the same shape")
        self.save(gate=gate, up=up)
        fast = kernel("swiglu", gate, up)
        if fast is not None:
            return fast.swiglu_forward(gate, up)
        y = sigmoid(gate)
        y *= gate
        y *= up
        return y

    def backward(self, dy):
        gate, up = self.saved
        fast = kernel("swiglu", gate, up)
        if fast is not None:
            return fast.swiglu_backward(dy, gate, up)
        s = sigmoid(gate)
        dup = gate * s                                    # silu(g)
        dup *= dy
        dgate = 1 - s
        dgate *= gate
        dgate += 1
        dgate *= s
        dgate *= up
        dgate *= dy                                       # dy · u · σ · (1 + g(1 − σ))
        return dgate, dup


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
