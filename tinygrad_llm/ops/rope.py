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
from . import fused_cpu


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
    Saves:    cos, sin, and the kernel the forward ran (None: the array path), which the backward reuses
    The packed form (RoPE on the q and k slices of one q‖k‖v projection, inside attention) is
    ops/attention.CausalAttention with `packed=`; it calls `rotate_into` below with the same tables.
    """

    def forward(self, x, positions=None, theta=10000.0):
        if x.ndim != 4 or x.shape[-1] % 2:
            raise ValueError(f"rope: x must be (B, H, T, D) with D even, got {tuple(x.shape)}")
        xp = array_module(x)
        positions = resolve_positions(positions, x.shape[2], xp)
        cos, sin = rope_angles(positions, x.shape[-1], theta, xp)
        cos, sin = cos.astype(x.dtype), sin.astype(x.dtype)
        fast = kernel("rope", x)
        self.save(cos=cos, sin=sin, fast=fast)
        return rotate_into(x, cos, sin, xp.empty(x.shape, dtype=x.dtype), fast)

    def backward(self, dy):
        cos, sin, fast = self.saved
        return rotate_into(dy, cos, -sin, array_module(dy).empty(dy.shape, dtype=dy.dtype), fast)


def rotate_into(x, cos, sin, out, fast=None):
    """out = each (x₁, x₂) pair of the last axis rotated by the angle whose cosine and sine are given:
    (x₁ cos − x₂ sin, x₂ cos + x₁ sin), pairs split at D/2. x and out may be strided views (out is written
    in place); `fast` is the kernel module when the caller's forward chose the CUDA path."""
    if fast is not None:        # one CUDA launch, strided views read and written in place (kernels/rope.cu)
        return fast.rope_forward(x, cos, sin, out=out)
    xp = array_module(x)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]                  # (..., D) -> 2 × (..., D/2)
    o1, o2 = out[..., :half], out[..., half:]
    xp.multiply(x1, cos, out=o1)
    o1 -= x2 * sin
    xp.multiply(x2, cos, out=o2)
    o2 += x1 * sin
    return out


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


def wide_tables(cos, sin, head_scales):
    """The tables of `rotate_heads_into` for heads that each carry a scale: cos (T, n, D) = scale·[cos, cos]
    and the signed sin (T, n, 2, D/2) = scale·[−sin, sin], from cos, sin (T, D/2) and head_scales (n,)."""
    xp = array_module(cos)
    scales = xp.asarray(head_scales, dtype=cos.dtype)[None, :, None]                # (n,) -> (1, n, 1)
    cos_wide = xp.concatenate([cos, cos], axis=-1)[:, None, :] * scales            # (T, D/2) -> (T, n, D)
    sin_signed = xp.stack([-sin, sin], axis=1)[:, None] * scales[..., None]        # -> (T, n, 2, D/2)
    return cos_wide, sin_signed


def _token_major(a) -> bool:
    """Whether each token's (n, D) block of a (B, T, n, D) array is contiguous (element strides, ≥ 0)."""
    item = a.itemsize
    return (a.strides[3] == item and a.strides[2] == a.shape[3] * item and a.strides[1] % item == 0
            and a.strides[0] % item == 0 and a.strides[0] >= 0 and a.strides[1] >= 0)


def rotate_heads_into(x, cos_wide, sin_signed, out):
    """out = RoPE of the heads of x in the token-major layout, y = x · cos + rotate_half(x) · sin, with
    rotate_half(x) = [−x₂, x₁] folded into the signed sin table (`wide_tables`; −sin_signed rotates back).

    x, out: (B, T, n, D) whose (n, D) block of each token is contiguous (slices of one q‖k‖v projection):
    NumPy then runs the two multiplications by the tables over whole n·D rows instead of D/2-element
    pieces: out = x · cos, then a temporary of x with its halves swapped times the signed sin, added to
    out. On NumPy arrays the swap is one copy of D/2-float units (each half viewed as one opaque element,
    so the copy moves whole halves instead of looping over 16-float pieces), and the product by the sin
    table runs over the contiguous temporary. NumPy float32/64 arrays take one pass of a compiled loop
    (ops/fused_cpu.c) instead, where it is available.
    """
    xp = array_module(x)
    batch, time, heads, head_dim = x.shape
    half = head_dim // 2
    rope = fused_cpu.function("rope_heads", x.dtype) if xp is np else None
    if (rope is not None and _token_major(x) and _token_major(out) and out.dtype == x.dtype
            and fused_cpu.usable(cos_wide, sin_signed) and cos_wide.dtype == x.dtype):
        # one compiled pass, each half read once: out₁ = x₁ c + x₂ (−s), out₂ = x₂ c + x₁ s
        item = x.itemsize
        rope(fused_cpu.address(x), x.strides[0] // item, x.strides[1] // item, fused_cpu.address(out),
             out.strides[0] // item, out.strides[1] // item, fused_cpu.address(cos_wide),
             fused_cpu.address(sin_signed), batch, time, heads * head_dim, half)
        return out
    xp.multiply(x, cos_wide, out=out)
    halves = x.reshape(batch, time, heads, 2, half)                              # (B, T, n, 2, D/2)
    if xp is np and halves.strides[-1] == x.dtype.itemsize and half > 1:
        unit = np.dtype((np.void, half * x.dtype.itemsize))                      # one half of a head
        halves = halves.view(unit)[..., 0]                                        # (B, T, n, 2) units
        rotated = np.empty((batch, time, heads, 2), dtype=unit)
        rotated[..., 0], rotated[..., 1] = halves[..., 1], halves[..., 0]        # [x₂, x₁]
        rotated = rotated.view(x.dtype).reshape(x.shape)                          # -> (B, T, n, D)
        rotated *= sin_signed.reshape(time, heads, head_dim)                      # [−x₂ sin, x₁ sin]
    else:
        rotated = xp.multiply(halves[..., ::-1, :], sin_signed)                  # [−x₂ sin, x₁ sin]
    out += rotated.reshape(x.shape)
    return out
