"""RMSNorm: root-mean-square normalisation with a learned gain (no mean subtraction, no bias)."""
from __future__ import annotations

from ..backend import array_module
from ..gpu import kernel
from ..tensor import Function


class RMSNorm(Function):
    """Root-mean-square normalisation over the last axis.

    Forward:  r = 1/√(mean(x², axis=−1) + eps);  x̂ = x · r;  y = x̂ · w
    Backward: g = dy · w                       (forward was y = x̂·w, so dx̂ = dy·w)
              dw = Σ_rows dy · x̂
              dx = r · (g − x̂ · mean(g · x̂, axis=−1))
    Shapes:   x, y, dy: (..., C)   w, dw: (C,)   r: (..., 1)
    Saves:    x̂, r, w   (x itself is not needed again)
    """

    def forward(self, x, weight, eps=1e-5):
        if weight.ndim != 1 or weight.shape[0] != x.shape[-1]:
            raise ValueError(f"rms_norm: weight shape {tuple(weight.shape)} does not match the last axis of "
                             f"x {tuple(x.shape)}")
        fast = kernel("rms_norm", x, weight)
        if fast is not None:
            y, r = fast.rms_norm_forward(x, weight, eps)
            self.save(x=x, r=r, weight=weight)
            return y
        xp = array_module(x)
        r = 1.0 / xp.sqrt((x * x).mean(axis=-1, keepdims=True) + eps)
        xhat = x * r
        self.save(xhat=xhat, r=r, weight=weight)
        return xhat * weight

    def backward(self, dy):
        saved_x, r, weight = self.saved          # saved_x is x̂ on the NumPy path, x on the kernel path
        fast = kernel("rms_norm", dy, weight)
        if fast is not None:
            return fast.rms_norm_backward(dy, saved_x, weight, r)
        xhat = saved_x
        g = dy * weight
        dx = r * (g - xhat * (g * xhat).mean(axis=-1, keepdims=True))
        dweight = (dy * xhat).reshape(-1, weight.shape[0]).sum(axis=0)   # (..., C) -> (N, C) -> (C,)
        return dx, dweight


def rms_norm_reference(x, weight, eps=1e-5):
    """RMSNorm composed from primitives (a test oracle)."""
    return x / ((x * x).mean(axis=-1, keepdims=True) + eps).sqrt() * weight
