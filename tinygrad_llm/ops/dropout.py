"""Inverted dropout: zero each element with probability p and scale the survivors by 1/(1 − p)."""
from __future__ import annotations

from ..backend import random_generator
from ..gpu import kernel
from ..tensor import Function


class Dropout(Function):
    """Forward:  m = (u ≥ p) / (1 − p) with u ~ U[0, 1) drawn from `seed`;  y = x · m
    Backward: dx = dy · m    (the same mask)
    Shapes:   x, y, dy, m alike
    Saves:    the scaled mask m
    """

    def forward(self, x, p, seed):
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        fast = kernel("dropout", x)
        if fast is not None:      # a stateless random stream in one launch (kernels/dropout.cu)
            y, mask = fast.dropout_forward(x, p, seed)
            self.save(mask=mask)
            return y
        rng = random_generator(int(seed), like=x)       # a rng.DeviceSeed is read on the host here
        draw = x.dtype if x.dtype.name in ("float32", "float64") else "float32"   # generators draw no bf16/fp16
        mask = (rng.random(x.shape, dtype=draw) >= p).astype(x.dtype) / x.dtype.type(1.0 - p)
        self.save(mask=mask)
        return x * mask

    def backward(self, dy):
        (mask,) = self.saved
        return dy * mask
