"""Elementwise ops with NumPy broadcasting.

Broadcasting's adjoint is summation: an input of shape (3, 1) broadcast to (2, 3, 4) receives the sum of
the upstream gradient over the axes it was stretched along. `unbroadcast` is the one helper that does this,
and every broadcasting op calls it.
"""
from __future__ import annotations

from ..backend import array_module
from ..tensor import Function


def unbroadcast(grad, shape: tuple):
    """Sum grad down to `shape`, the shape of the input before broadcasting."""
    shape = tuple(shape)
    if grad.shape == shape:
        return grad
    extra = grad.ndim - len(shape)
    axes = tuple(range(extra)) + tuple(
        extra + i for i, n in enumerate(shape) if n == 1 and grad.shape[extra + i] != 1)
    reduced = grad.sum(axis=axes, keepdims=True) if axes else grad
    return reduced.reshape(shape)                       # drop the leading broadcast axes


class Add(Function):
    """Forward:  y = a + b
    Backward: da = dy, db = dy (each summed back to its input's shape)
    Shapes:   a, b broadcast to y
    Saves:    the input shapes
    """

    def forward(self, a, b):
        self.save(a_shape=a.shape, b_shape=b.shape)
        return a + b

    def backward(self, dy):
        a_shape, b_shape = self.saved
        return unbroadcast(dy, a_shape), unbroadcast(dy, b_shape)


class Sub(Function):
    """Forward:  y = a − b
    Backward: da = dy, db = −dy
    Shapes:   a, b broadcast to y
    Saves:    the input shapes
    """

    def forward(self, a, b):
        self.save(a_shape=a.shape, b_shape=b.shape)
        return a - b

    def backward(self, dy):
        a_shape, b_shape = self.saved
        return unbroadcast(dy, a_shape), unbroadcast(-dy, b_shape)


class Mul(Function):
    """Forward:  y = a · b
    Backward: da = dy · b, db = dy · a
    Shapes:   a, b broadcast to y
    Saves:    a, b
    """

    def forward(self, a, b):
        self.save(a=a, b=b)
        return a * b

    def backward(self, dy):
        a, b = self.saved
        da = unbroadcast(dy * b, a.shape) if self.needs_input_grad[0] else None
        db = unbroadcast(dy * a, b.shape) if self.needs_input_grad[-1] else None
        return da, db


class Div(Function):
    """Forward:  y = a / b
    Backward: da = dy / b, db = −dy · a / b² = −dy · y / b
    Shapes:   a, b broadcast to y
    Saves:    b, y
    """

    def forward(self, a, b):
        y = a / b
        self.save(a_shape=a.shape, b=b, y=y)
        return y

    def backward(self, dy):
        a_shape, b, y = self.saved
        da = unbroadcast(dy / b, a_shape) if self.needs_input_grad[0] else None
        db = unbroadcast(-dy * y / b, b.shape) if self.needs_input_grad[-1] else None
        return da, db


class Neg(Function):
    """Forward:  y = −x
    Backward: dx = −dy
    Shapes:   x, y, dy alike
    Saves:    nothing
    """

    def forward(self, x):
        return -x

    def backward(self, dy):
        return -dy


class Pow(Function):
    """Forward:  y = a ** b
    Backward: da = dy · b · a^(b−1)  (0 where b = 0);  db = dy · y · ln a  (only where a > 0; 0 elsewhere)
    Shapes:   a, b broadcast to y
    Saves:    a, b, y
    """

    def forward(self, a, b):
        y = a ** b
        self.save(a=a, b=b, y=y)
        return y

    def backward(self, dy):
        a, b, y = self.saved
        xp = array_module(a, b)
        da = db = None
        if self.needs_input_grad[0]:
            # where b == 0, y = 1 is constant: 0, not the 0 · 0⁻¹ = NaN that a = 0 would give
            da = unbroadcast(xp.where(b == 0, 0, dy * b * a ** xp.where(b == 0, 1, b - 1)).astype(dy.dtype), a.shape)
        if self.needs_input_grad[-1]:
            positive = a > 0
            log_a = xp.log(xp.where(positive, a, 1))
            db = unbroadcast(xp.where(positive, dy * y * log_a, 0).astype(y.dtype), b.shape)
        return da, db


class Exp(Function):
    """Forward:  y = eˣ
    Backward: dx = dy · y
    Shapes:   x, y alike
    Saves:    y
    """

    def forward(self, x):
        y = array_module(x).exp(x)
        self.save(y=y)
        return y

    def backward(self, dy):
        (y,) = self.saved
        return dy * y


class Log(Function):
    """Forward:  y = ln x
    Backward: dx = dy / x
    Shapes:   x, y alike
    Saves:    x
    """

    def forward(self, x):
        self.save(x=x)
        return array_module(x).log(x)

    def backward(self, dy):
        (x,) = self.saved
        return dy / x


class Sqrt(Function):
    """Forward:  y = √x
    Backward: dx = dy / (2y)
    Shapes:   x, y alike
    Saves:    y
    """

    def forward(self, x):
        y = array_module(x).sqrt(x)
        self.save(y=y)
        return y

    def backward(self, dy):
        (y,) = self.saved
        return dy / (2 * y)


class Tanh(Function):
    """Forward:  y = tanh x
    Backward: dx = dy · (1 − y²)
    Shapes:   x, y alike
    Saves:    y
    """

    def forward(self, x):
        y = array_module(x).tanh(x)
        self.save(y=y)
        return y

    def backward(self, dy):
        (y,) = self.saved
        return dy * (1 - y * y)


class Maximum(Function):
    """Forward:  y = max(a, b) elementwise
    Backward: the gradient goes to the larger input; on ties each input gets half (the mean of the two
              one-sided derivatives, as in PyTorch)
    Shapes:   a, b broadcast to y
    Saves:    the masks a > b and a == b
    """

    def forward(self, a, b):
        self.save(a_shape=a.shape, b_shape=b.shape, a_wins=a > b, tie=a == b)
        return array_module(a, b).maximum(a, b)

    def backward(self, dy):
        a_shape, b_shape, a_wins, tie = self.saved
        share_a = a_wins + 0.5 * tie                     # 1 where a wins, ½ on ties, 0 where b wins
        da = unbroadcast((dy * share_a).astype(dy.dtype), a_shape)
        db = unbroadcast((dy * (1 - share_a)).astype(dy.dtype), b_shape)
        return da, db


class Cast(Function):
    """Forward:  y = x converted to `dtype`
    Backward: dx = dy converted back to x's dtype
    Shapes:   x, y alike
    Saves:    x's dtype
    """

    def forward(self, x, dtype):
        self.save(dtype=x.dtype)
        return x.astype(dtype)

    def backward(self, dy):
        (dtype,) = self.saved
        return dy.astype(dtype)
