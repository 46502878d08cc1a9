"""Causal scaled dot-product attention with grouped-query heads.

The NumPy version follows the algorithm of the CUDA flash-attention kernel, so that it is the kernel's
reference: the forward keeps only the output and the per-row log-sum-exp L of the scores; the backward
recomputes the probabilities P = exp(S − L) from q and k instead of keeping the T×T matrix alive between
the two passes. (The NumPy forward still forms S for one call at a time; the CUDA kernel tiles it.)

Grouped-query attention: H query heads share Hkv key/value heads, H = G · Hkv; query head h reads kv head
h // G (consecutive query heads form a group, as Hugging Face's `repeat_kv` lays them out).

Causality with a cache: keys may outnumber queries (Tk ≥ Tq, as in KV-cached generation). Query i then
sits at absolute position Tk − Tq + i and sees keys 0 … Tk − Tq + i (the mask is aligned bottom-right).
"""
from __future__ import annotations

import math

from ..backend import array_module
from ..gpu import kernel
from ..tensor import Function


def _check_shapes(q, k, v):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"causal_attention: q, k, v must be (B, H, T, D); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    batch, heads, query_len, head_dim = q.shape
    if k.shape != v.shape or k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(f"causal_attention: k {tuple(k.shape)} and v {tuple(v.shape)} must be (B, Hkv, Tk, D) "
                         f"matching q {tuple(q.shape)}")
    kv_heads, key_len = k.shape[1], k.shape[2]
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"causal_attention: {kv_heads} kv heads must divide {heads} query heads")
    if key_len < query_len:
        raise ValueError(f"causal_attention: {key_len} keys cannot serve {query_len} queries causally")


def _causal_mask(query_len: int, key_len: int, xp):
    """True where query i must not see key j: j > i + (Tk − Tq). Shape (Tq, Tk)."""
    offset = key_len - query_len
    return xp.arange(key_len)[None, :] > (xp.arange(query_len)[:, None] + offset)


_CAUSAL_BIAS: dict = {}


def _causal_bias(query_len: int, key_len: int, group: int, dtype, xp):
    """(G·Tq, Tk) additive mask, the (Tq, Tk) one repeated for each head of a group: 0 where the query
    row may see the key, −∞ after it. Cached: training repeats the same shapes every step."""
    key = (query_len, key_len, group, str(dtype), xp.__name__)
    bias = _CAUSAL_BIAS.get(key)
    if bias is None:
        bias = xp.where(_causal_mask(query_len, key_len, xp), -xp.inf, 0).astype(dtype)   # (Tq, Tk)
        bias = xp.ascontiguousarray(xp.tile(bias, (group, 1)))                           # -> (G·Tq, Tk)
        if len(_CAUSAL_BIAS) >= 64:          # decoding with a growing cache makes a new Tk every step
            _CAUSAL_BIAS.clear()
        _CAUSAL_BIAS[key] = bias
    return bias


def grouped_causal_probabilities(q3, k, group: int, scale: float, xp, lse=None):
    """Causal softmax probabilities P of the grouped layout, and L = logsumexp of the scores.

    q3: (B, Hkv, G·Tq, D), the G query heads of a group stacked along the rows; k: (B, Hkv, Tk, D).
    Returns P: (B, Hkv, G·Tq, Tk) and L: (B, Hkv, G·Tq, 1). With `lse` given, P = exp(S − lse) is
    recomputed from it (the backward pass) instead of normalising afresh.
    Batched products read a contiguous kᵀ: NumPy's stacked matmul is several times slower on a
    transposed view.
    """
    k_transposed = xp.ascontiguousarray(k.swapaxes(-1, -2))              # (B, Hkv, Tk, D) -> (B, Hkv, D, Tk)
    s = (q3 * q3.dtype.type(scale)) @ k_transposed                        # (B, Hkv, G·Tq, Tk): q is the small side
    s += _causal_bias(q3.shape[2] // group, k.shape[2], group, s.dtype, xp)
    if lse is None:
        row_max = s.max(axis=-1, keepdims=True)
        s -= row_max                                                      # max subtraction: exp ≤ 1
        xp.exp(s, out=s)
        row_sum = s.sum(axis=-1, keepdims=True)
        lse = row_max + xp.log(row_sum)
        s *= xp.reciprocal(row_sum, out=row_sum)
        return s, lse
    s -= lse
    xp.exp(s, out=s)
    return s, lse


class CausalAttention(Function):
    """Forward:  S = q kᵀ / √D with S[i, j] = −∞ for j after i;  L = logsumexp_j S;  P = exp(S − L);  O = P v
    Backward: P recomputed from q, k and L
              dv = Pᵀ dO                      (summed over the query heads of a group)
              dP = dO vᵀ
              Δ  = rowsum(dO ∘ O)             (equals rowsum(P ∘ dP), one (Tq,) vector per head)
              dS = P ∘ (dP − Δ)               (the softmax Jacobian)
              dq = dS k / √D;   dk = dSᵀ q / √D  (dk summed over the group)
    Shapes:   q, O, dO: (B, H, Tq, D)   k, v, dk, dv: (B, Hkv, Tk, D)   L, Δ: (B, H, Tq)
    Saves:    q, k, v, O, L   (no Tq×Tk array is kept between forward and backward)
    The query heads of a group are stacked along the rows, (B, H, Tq, D) -> (B, Hkv, G·Tq, D), so every
    product is a plain batched matmul and the sums over the group come out of the products themselves.
    """

    def forward(self, q, k, v):
        _check_shapes(q, k, v)
        fast = kernel("causal_attention", q, k, v)
        if fast is not None:
            out, lse = fast.causal_attention_forward(q, k, v)
            self.save(q=q, k=k, v=v, out=out, lse=lse)
            return out
        xp = array_module(q, k, v)
        batch, heads, query_len, head_dim = q.shape
        kv_heads = k.shape[1]
        group = heads // kv_heads
        q3 = q.reshape(batch, kv_heads, group * query_len, head_dim)     # (B, H, Tq, D) -> (B, Hkv, G·Tq, D)
        p, lse = grouped_causal_probabilities(q3, k, group, 1.0 / math.sqrt(head_dim), xp)
        out = (p @ v).reshape(q.shape)                                    # (B, Hkv, G·Tq, D) -> (B, H, Tq, D)
        lse = lse.reshape(batch, heads, query_len)                        # (B, Hkv, G·Tq, 1) -> (B, H, Tq)
        self.save(q=q, k=k, v=v, out=out, lse=lse)
        return out

    def backward(self, dy):
        q, k, v, out, lse = self.saved
        fast = kernel("causal_attention", q, k, v)
        if fast is not None:
            return fast.causal_attention_backward(dy, q, k, v, out, lse)
        xp = array_module(q, k, v)
        batch, heads, query_len, head_dim = q.shape
        kv_heads = k.shape[1]
        group = heads // kv_heads
        scale = 1.0 / math.sqrt(head_dim)
        grouped = (batch, kv_heads, group * query_len, head_dim)          # (B, H, Tq, D) -> (B, Hkv, G·Tq, D)
        q3, dy3, out3 = q.reshape(grouped), dy.reshape(grouped), out.reshape(grouped)
        lse3 = lse.reshape(batch, kv_heads, group * query_len, 1)
        p, _ = grouped_causal_probabilities(q3, k, group, scale, xp, lse=lse3)  # recomputed (B, Hkv, G·Tq, Tk)
        dy3_t = xp.ascontiguousarray(dy3.swapaxes(-1, -2))                # (B, Hkv, D, G·Tq)
        dv = (dy3_t @ p).swapaxes(-1, -2)                                 # (Pᵀ dO)ᵀᵀ: (B, Hkv, Tk, D)
        dp = dy3 @ xp.ascontiguousarray(v.swapaxes(-1, -2))               # (B, Hkv, G·Tq, Tk)
        dp -= (dy3 * out3).sum(axis=-1, keepdims=True)                    # dP − Δ
        dp *= p                                                           # dS = P ∘ (dP − Δ)
        dq = (dp @ k).reshape(q.shape) * q.dtype.type(scale)              # (B, H, Tq, D)
        q3_t = xp.ascontiguousarray(q3.swapaxes(-1, -2))                  # (B, Hkv, D, G·Tq)
        dk = (q3_t @ dp).swapaxes(-1, -2) * k.dtype.type(scale)           # (B, Hkv, Tk, D)
        return dq, xp.ascontiguousarray(dk), xp.ascontiguousarray(dv)


def causal_attention_reference(q, k, v):
    """Causal attention composed from primitives, with kv heads repeated explicitly (a test oracle)."""
    from ..functional import concatenate, softmax
    from ..tensor import Tensor
    xp = array_module(q.data)
    heads, kv_heads = q.shape[1], k.shape[1]
    group = heads // kv_heads
    if group > 1:   # repeat each kv head G times: (B, Hkv, T, D) -> (B, H, T, D)
        k = concatenate([k[:, h:h + 1] for h in range(kv_heads) for _ in range(group)], axis=1)
        v = concatenate([v[:, h:h + 1] for h in range(kv_heads) for _ in range(group)], axis=1)
    scores = (q @ k.transpose(0, 1, 3, 2)) * (1.0 / math.sqrt(q.shape[-1]))
    mask = _causal_mask(q.shape[2], k.shape[2], xp)
    scores = scores + Tensor(xp.where(mask, -1e9, 0.0).astype(q.dtype))
    return softmax(scores, axis=-1) @ v
