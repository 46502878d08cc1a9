"""LoRA: a weight plus a scaled low-rank update, W' = W + s · B A (Hu et al., 2021).

The op works on the weight, not on the activations: the model's packed projections (q‖k‖v, gate‖up) take
W' as they take any weight, so LoRA needs no change to the model. The price of that simplicity is that
the backward forms the full-size dW' (as full fine-tuning does) before folding it into the small dA and
dB; what LoRA saves here is the optimizer state (moments for A and B only) and the trained parameters.
"""
from __future__ import annotations

from ..tensor import Function


class LoRAWeight(Function):
    """Forward:  W' = W + s · B @ A
    Backward: dW = dW';  dA = s · Bᵀ @ dW';  dB = s · dW' @ Aᵀ
    Shapes:   W, W', dW': (out, in);  A: (r, in);  B: (out, r);  s: a Python float (α / r)
    Saves:    A, B, s
    """

    def forward(self, weight, a, b, scale):
        if a.ndim != 2 or b.ndim != 2 or weight.ndim != 2 or b.shape[1] != a.shape[0] \
                or (b.shape[0], a.shape[1]) != tuple(weight.shape):
            raise ValueError(f"lora_weight: need W (out, in), A (r, in), B (out, r); got W {tuple(weight.shape)}, "
                             f"A {tuple(a.shape)}, B {tuple(b.shape)}")
        self.save(a=a, b=b, scale=scale)
        update = b @ a                                                      # (out, r) @ (r, in) -> (out, in)
        update *= update.dtype.type(scale)
        return weight + update

    def backward(self, dy):
        a, b, scale = self.saved
        dweight = dy if self.needs_input_grad[0] else None
        da = (b.T @ dy) * a.dtype.type(scale) if self.needs_input_grad[1] else None     # (r, out) @ (out, in)
        db = (dy @ a.T) * b.dtype.type(scale) if self.needs_input_grad[2] else None     # (out, in) @ (in, r)
        return dweight, da, db
