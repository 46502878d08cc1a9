"""Rotary position embedding (RoPE), rotate-half pairing as in GPT-NeoX and Hugging Face Llama.

Dimension i of a head is paired with dimension i + D/2 and the pair is rotated by the angle
position · θ^(−2i/D). Rotations keep norms, and the dot product of a rotated query and key depends only on
their distance, which is what makes the encoding relative.
"""
from __future__ import annotations

import numpy as np

from ..backend import array_module
from ..gpu import kernel
from ..tensor import Function


def rope_angles(positions, head_dim: int, theta: float, xp=np):
    """cos and sin tables of shape (T, D/2) in float64 (the caller casts), for integer positions (T,)."""
    half = head_dim // 2
    inverse_frequency = 1.0 / theta ** (xp.arange(half, dtype=xp.float64) * 2.0 / head_dim)   # (D/2,)
    angles = positions.astype(xp.float64)[:, None] * inverse_frequency[None, :]               # (T, D/2)
    return xp.cos(angles), xp.sin(angles)


def resolve_positions(positions, length: int, xp=np):
    """None -> 0..T-1; an int p -> p..p+T-1; an array of T integers as given."""
    if positions is None:
        return xp.arange(length)
    if isinstance(positions, (int, np.integer)):
        if positions < 0:
            raise ValueError(f"rope: position offset must be non-negative, got {positions}")
        return xp.arange(positions, positions + length)
    positions = xp.asarray(positions)
    if positions.ndim != 1 or positions.shape[0] != length:
        raise ValueError(f"rope: positions must have shape ({length},), got {tuple(positions.shape)}")
    if positions.dtype.kind not in "iu":
        raise TypeError(f"rope: positions must be integers, got dtype {positions.dtype}")
    return positions


class RoPE(Function):
    """Forward:  with x = [x₁, x₂] split at D/2 and angles a[t, i] = pos[t] · θ^(−2i/D):
                y₁ = x₁ cos a − x₂ sin a
                y₂ = x₂ cos a + x₁ sin a
    Backward: the transpose of a rotation is the rotation by −a:
                dx₁ = dy₁ cos a + dy₂ sin a
                dx₂ = dy₂ cos a − dy₁ sin a
    Shapes:   x, y, dy: (B, H, T, D), D even;  positions: (T,);  cos, sin: (T, D/2)
    Saves:    cos, sin
    """

    def forward(self, x, positions=None, theta=10000.0):
        if x.ndim != 4 or x.shape[-1] % 2:
            raise ValueError(f"rope: x must be (B, H, T, D) with D even, got {tuple(x.shape)}")
        xp = array_module(x)
        positions = resolve_positions(positions, x.shape[2], xp)
        cos, sin = rope_angles(positions, x.shape[-1], theta, xp)
        cos, sin = cos.astype(x.dtype), sin.astype(x.dtype)
        self.save(cos=cos, sin=sin)
        fast = kernel("rope", x)
        if fast is not None:
            return fast.rope_forward(x, cos, sin)
        return _rotate(x, cos, sin, xp)

    def backward(self, dy):
        cos, sin = self.saved
        fast = kernel("rope", dy)
        if fast is not None:
            return fast.rope_forward(dy, cos, -sin)
        return _rotate(dy, cos, -sin, array_module(dy))


def _rotate(x, cos, sin, xp):
    """Rotate each (x₁, x₂) pair of the last axis by the angle whose cosine and sine are given."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]                  # (B, H, T, D) -> 2 × (B, H, T, D/2)
    return xp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def rope_reference(x, positions=None, theta=10000.0):
    """RoPE composed from primitives (a test oracle): y = x · cos + rotate_half(x) · sin."""
    from ..functional import concatenate
    from ..tensor import Tensor
    xp = array_module(x.data)
    positions = resolve_positions(positions, x.shape[2], xp)
    cos, sin = rope_angles(positions, x.shape[-1], theta, xp)
    cos = Tensor(xp.concatenate([cos, cos], axis=-1).astype(x.dtype))    # (T, D/2) -> (T, D)
    sin = Tensor(xp.concatenate([sin, sin], axis=-1).astype(x.dtype))
    half = x.shape[-1] // 2
    rotated = concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin
