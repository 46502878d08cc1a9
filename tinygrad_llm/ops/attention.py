"""Causal scaled dot-product attention with grouped-query heads, and its packed form with RoPE.

The recomputing path follows the algorithm of the CUDA flash-attention kernel, so that it is the kernel's
reference: the forward keeps only the output and the per-row log-sum-exp L of the scores; the backward
recomputes the probabilities P = exp(S − L) from q and k instead of keeping the T×T matrix alive between
the two passes. (The array forward still forms S for one call at a time; the CUDA kernel tiles it.)
On the CPU the packed form may instead keep P (`keep_probabilities`): the T×T probabilities of one
cache-sized chunk of the batch are cheap to keep, and keeping them saves the backward a GEMM and three
passes over them. That CPU training path also skips the masked upper half of the scores, in blocks of
query rows that each see only the keys up to the diagonal; where the compiled loops are built it runs as
one loop per (batch row, head) instead (ops/fused_cpu.c `tiled_attention_*`: every product, the softmax
and the backward's passes on register tiles in cache, no BLAS call), and the NumPy blocks remain for
attention dropout and head sizes that are not a whole number of vectors.

Grouped-query attention: H query heads share Hkv key/value heads, H = G · Hkv; query head h reads kv head
h // G (consecutive query heads form a group, as Hugging Face's `repeat_kv` lays them out).

Causality with a cache: keys may outnumber queries (Tk ≥ Tq, as in KV-cached generation). Query i then
sits at absolute position Tk − Tq + i and sees keys 0 … Tk − Tq + i (the mask is aligned bottom-right).

Low precision: bfloat16 scores and softmax are computed in float32 (no CuPy GEMM knows bfloat16) and P
is cast back; every other product goes through ops/matmul.product.

Attention dropout (training): O = (P ∘ M / keep) v with M a Bernoulli(keep) mask that is never stored.
M[row, j] comes from a counter-based hash of (seed, row, j) (tinygrad_llm.rng.hash_bits; row = the query's
index in the flat (B, H, Tq) order, j the key), so the backward, any batch chunk and the CUDA kernels
regenerate exactly the same mask.
"""
from __future__ import annotations

import math

import numpy as np

from .. import rng
from ..backend import array_module
from ..gpu import kernel
from ..cpu_threads import CHUNK_ELEMENTS, parallel_items, split, thread_count
from ..tensor import Function
from . import fused_cpu
from .matmul import needs_float32_products, product
from .rope import rotate_heads_into, rotate_into, wide_tables


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
    low = q3.dtype
    if needs_float32_products(low):                                       # bf16: scores and softmax in float32
        q3, k = q3.astype(np.float32), k.astype(np.float32)
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
        return s.astype(low, copy=False), lse
    s -= lse
    xp.exp(s, out=s)
    return s.astype(low, copy=False), lse


def _dropout_scale(drop, row_offset: int, rows, columns, dtype, xp):
    """M / keep in `dtype` for score rows `rows` and key columns `columns` (integer arrays broadcast
    together, rows counted from `row_offset` in the flat (B, H, Tq) order): the attention dropout mask
    of drop = (seed, keep), from tinygrad_llm.rng.hash_bits."""
    seed, keep = drop
    words = rng.dropout_words(seed, keep, row_offset)
    scaled = (rng.hash_bits(words, rows, columns, xp) < np.uint32(words[2])).astype(dtype)
    scaled *= dtype.type(1.0 / keep)
    return scaled


def kernel_dropout(drop, row_offset: int):
    """What the GPU launchers take for drop = (seed, keep): (base, s0, s1, threshold, 1 / keep), or None;
    base is a DeviceSeed's device array (the kernels add base[0] to the words), None for an int seed."""
    if drop is None:
        return None
    seed, keep = drop
    if isinstance(seed, rng.DeviceSeed):
        return (seed.base,) + rng.dropout_words(seed.offset, keep, row_offset) + (1.0 / keep,)
    return (None,) + rng.dropout_words(seed, keep, row_offset) + (1.0 / keep,)


def choose_path(q, k, v, keep_probabilities: bool):
    """The kernel module when one applies; else "kept" (NumPy arrays, P kept) or "recompute"."""
    fast = kernel("causal_attention", q, k, v)
    if fast is not None:
        return fast
    return "kept" if keep_probabilities and array_module(q) is np else "recompute"


QUERY_BLOCK = 32     # query rows per block of the blocked causal path


def _query_blocks(time: int, block: int) -> list:
    """(start, end) row ranges of the blocked causal path; each block's keys are 0 … end − 1."""
    return [(start, min(start + block, time)) for start in range(0, time, block)]


_DIAGONAL_BIAS: dict = {}


def _diagonal_bias(size: int, dtype):
    """(n, n) additive mask of a block on the diagonal: 0 on and below it, −∞ above (cached)."""
    key = (size, dtype)                        # a dtype hashes fast; its str() costs ~40 µs
    bias = _DIAGONAL_BIAS.get(key)
    if bias is None:
        bias = _DIAGONAL_BIAS[key] = np.where(_causal_mask(size, size, np), -np.inf, 0).astype(dtype)
    return bias


_HEAD_TABLES: dict = {}


def _head_tables(cos, sin, heads: int, kv_heads: int):
    """`wide_tables` of the q and k heads, the q heads' scaled by 1/√D; remembered for the last cos and sin
    arrays seen per head count (the model passes the same two arrays every training step)."""
    key = (heads, kv_heads)
    cached = _HEAD_TABLES.get(key)
    if cached is not None and cached[0] is cos and cached[1] is sin:
        return cached[2]
    head_dim = cos.shape[-1] * 2
    tables = wide_tables(cos, sin, [1.0 / math.sqrt(head_dim)] * heads + [1.0] * kv_heads)
    _HEAD_TABLES[key] = (cos, sin, tables)
    return tables


def _contiguous_transpose(x):
    """x (..., T, D) as a contiguous (..., D, T). A (B, H, T, D) view takes one pass of a compiled loop where
    there is one; otherwise the copy goes through a contiguous one first: NumPy's transposing copy out of a
    strided view is about four times slower than the two."""
    view = fused_cpu.heads_view(x)
    if view is not None:
        out = np.empty((*x.shape[:2], x.shape[3], x.shape[2]), dtype=x.dtype)   # (B, H, T, D) -> (B, H, D, T)
        fused_cpu.library()["heads_transposed", x.dtype](*view, fused_cpu.address(out), *x.shape)
        return out
    return np.ascontiguousarray(np.ascontiguousarray(x).swapaxes(-1, -2))


def _row_dots(x, y):
    """Σ_d x·y over the last axis of two (B, H, T, D) views, as a contiguous (B, H, T) array."""
    x_view, y_view = fused_cpu.heads_view(x), fused_cpu.heads_view(y)
    if x_view is not None and y_view is not None and x.dtype == y.dtype and x.shape == y.shape:
        out = np.empty(x.shape[:3], dtype=x.dtype)
        fused_cpu.library()["row_dots", x.dtype](*x_view, *y_view, fused_cpu.address(out), *x.shape)
        return out
    return np.einsum("bhtd,bhtd->bht", x, y, out=np.empty(x.shape[:3], dtype=np.result_type(x, y)))


def _block_rows(batch: int, heads: int, kv_heads: int, time: int, start: int, end: int):
    """Flat (b, H, T) row indices of query rows start … end − 1 of every (b, h), as (b, Hkv, G, n, 1)."""
    first = np.arange(batch * heads).reshape(batch, kv_heads, heads // kv_heads, 1, 1) * time
    return first + np.arange(start, end)[:, None]


def _blocked_forward(q, k, v, out, block: int, drop=None, row_offset: int = 0) -> list:
    """Causal attention on NumPy arrays that skips the masked upper half of the scores.

    q (b, H, T, D) already scaled by 1/√D; k, v (b, Hkv, T, D); the result O is written into out
    (b, H, T, D). Any of q, v, out may be strided views (the packed layout) as long as their last axis is
    unit-stride: BLAS reads and writes them in place. The query rows are cut into blocks of `block` rows;
    block [s, e) needs only the keys 0 … e − 1 (later keys are masked for every row of it), so its scores
    are (n, e), not (n, T), and only the (n, n) square on the diagonal needs the mask. Returns the
    probabilities P of each block, (b, Hkv, G, n, e), kept for the backward. With drop = (seed, keep)
    the block's O rows are (P ∘ M / keep) v, the mask of rows counted from row_offset (P is kept undropped).
    """
    batch, heads, time, head_dim = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    q5 = q.reshape(batch, kv_heads, group, time, head_dim)               # (b, H, T, D) -> (b, Hkv, G, T, D)
    out5 = out.reshape(q5.shape)
    k_transposed = _contiguous_transpose(k)[:, :, None]                  # (b, Hkv, T, D) -> (b, Hkv, 1, D, T)
    v5 = v[:, :, None]                                                    # -> (b, Hkv, 1, T, D)
    kept = []
    softmax = fused_cpu.function("causal_softmax", q.dtype)
    for start, end in _query_blocks(time, block):
        s = q5[..., start:end, :] @ k_transposed[..., :end]              # S (b, Hkv, G, n, e)
        if softmax is not None and s.flags.c_contiguous:   # compiled: each row shifted by its own maximum,
            # the keys after its query set to 0
            softmax(fused_cpu.address(s), s.size // ((end - start) * end), end - start, end, start)
        else:
            s[..., start:] += _diagonal_bias(end - start, s.dtype)
            if not _softmax_block_shift(s):                               # a row far below its block's max:
                s = q5[..., start:end, :] @ k_transposed[..., :end]      # S again, each row shifted by its own
                s[..., start:] += _diagonal_bias(end - start, s.dtype)
                s -= s.max(axis=-1, keepdims=True)
                np.exp(s, out=s)
                s /= s.sum(axis=-1, keepdims=True)
        p = s
        if drop is not None:                                              # P ∘ M / keep
            p = s * _dropout_scale(drop, row_offset, _block_rows(batch, heads, kv_heads, time, start, end),
                                   np.arange(end), s.dtype, np)
        np.matmul(p, v5[..., :end, :], out=out5[..., start:end, :])      # O rows = P v
        kept.append(s)
    return kept


_ONES: dict = {}
_SHIFT_FLOOR = math.exp(-30.0)    # a row whose largest term exp(m − c) is below this is redone with c = m


def _softmax_block_shift(s) -> bool:
    """s (..., n, e), contiguous, becomes the softmax of its rows in place, each (n, e) block shifted by the
    block's maximum c rather than each row by its own m: softmax(x − c) = softmax(x) for any c, and c ≥ m
    keeps every exp ≤ 1. NumPy pays a fixed cost per row in reductions over short rows (e = 32 … 128), so
    one maximum per block and the row sums as one GEMV against ones run several times faster than
    `max(axis=-1)` and `sum(axis=-1)`. The shift costs a row whose maximum m is c − g about g·2⁻²⁴ of
    relative precision (float32 rounding of s − c) and underflows it for g ≳ 87: returns False, with s
    spent, when any row sum is below e⁻³⁰ (g > 30), and the caller recomputes those scores with per-row
    maxima. (Training the char config, the largest g seen over 1 500 steps was 27.)"""
    rows, keys = s.shape[-2:]
    blocks = s.reshape(-1, rows * keys)                                   # (..., n, e) -> (blocks, n·e)
    blocks -= blocks.max(axis=-1, keepdims=True)
    np.exp(s, out=s)
    ones = _ONES.get((keys, s.dtype))
    if ones is None:
        ones = _ONES[(keys, s.dtype)] = np.ones(keys, dtype=s.dtype)
    row_sum = s.reshape(-1, keys) @ ones                                  # (blocks·n,)
    if row_sum.min() < _SHIFT_FLOOR:
        return False
    np.reciprocal(row_sum, out=row_sum)
    s *= row_sum.reshape(*s.shape[:-1], 1)                                # P
    return True


def _blocked_backward(d_out, q, k, v, out, kept: list, block: int, dq, dk, dv, drop=None, row_offset: int = 0):
    """dq (with respect to the scaled q), dk, dv of _blocked_forward, block by block.

    d_out, out (b, H, T, D) may be strided views. Block [s, e) with P_b (n, e) and dO_b (n, D):
    dP_b = dO_b vᵀ[:, :e];  dS_b = P_b ∘ (dP_b − Δ_b);  dq_b = dS_b k[:e];  dk[:e] += dS_bᵀ q_b;
    dv[:e] += P_bᵀ dO_b. The last block spans every key, so it writes dk and dv and the others add.
    dq (b, H, T, D) (with respect to the scaled q), dk, dv (b, Hkv, T, D) are written into the arrays
    given (unit-stride rows, any layout); `kept` is emptied as it is used. With drop = (seed, keep) the
    block's mask M / keep is made again: dP_b = (dO_b vᵀ) ∘ M / keep and dv takes (P_b ∘ M / keep)ᵀ dO_b.
    """
    batch, heads, time, head_dim = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    grouped = (batch, kv_heads, group, time, head_dim)                  # (b, H, T, D) -> (b, Hkv, G, T, D)
    q5, d_out5 = q.reshape(grouped), d_out.reshape(grouped)
    delta = _row_dots(d_out, out).reshape(grouped[:-1])[..., None]      # Δ (b, H, T) -> (b, Hkv, G, T, 1)
    v_transposed = _contiguous_transpose(v)[:, :, None]                   # (b, Hkv, 1, D, T)
    k5 = k[:, :, None]                                                    # (b, Hkv, 1, T, D)
    dq5 = dq.reshape(grouped)
    blocks = _query_blocks(time, block)
    softmax_backward = fused_cpu.function("softmax_backward", q.dtype)
    for index in reversed(range(len(blocks))):
        start, end = blocks[index]
        p, kept[index] = kept[index], None
        rows = group * (end - start)
        d_out_block = d_out5[..., start:end, :]
        ds = d_out_block @ v_transposed[..., :end]                       # dP (b, Hkv, G, n, e)
        p_out = p                                                         # the P that multiplied v
        if drop is not None:     # forward was O = (P ∘ M / keep) v, so dP sees M / keep and dv its P
            scaled = _dropout_scale(drop, row_offset, _block_rows(batch, heads, kv_heads, time, start, end),
                                    np.arange(end), p.dtype, np)
            ds *= scaled
            p_out = p * scaled
        if softmax_backward is not None and ds.flags.c_contiguous and p.flags.c_contiguous:
            # dS = P ∘ (dP − Δ), one compiled pass
            softmax_backward(fused_cpu.address(ds), fused_cpu.address(p), fused_cpu.address(delta, start),
                             ds.size // ((end - start) * end), end - start, end, time)
        else:
            ds -= delta[..., start:end, :]
            ds *= p                                                       # dS = P ∘ (dP − Δ)
        np.matmul(ds, k5[..., :end, :], out=dq5[..., start:end, :])      # dq = dS k
        # the group's rows stacked, (b, Hkv, G, n, ·) -> (b, Hkv, G·n, ·): the products sum over the group
        p3t = p_out.reshape(batch, kv_heads, rows, end).swapaxes(-1, -2)  # Pᵀ (b, Hkv, e, G·n)
        ds3t = ds.reshape(batch, kv_heads, rows, end).swapaxes(-1, -2)    # dSᵀ
        d_out3 = d_out_block.reshape(batch, kv_heads, rows, head_dim)
        q3 = q5[..., start:end, :].reshape(batch, kv_heads, rows, head_dim)
        if end == time:
            np.matmul(p3t, d_out3, out=dv)
            np.matmul(ds3t, q3, out=dk)
        else:
            dv[:, :, :end] += p3t @ d_out3
            dk[:, :, :end] += ds3t @ q3


def _tiled_size(time: int) -> int:
    """Elements of one head's kept P in the tiled path: row i keeps keys 0 … 16·(i // 16 + 1) − 1."""
    tiles = -(-time // 16)
    return 128 * tiles * (tiles + 1)


def _tiled_forward(q, k, v, out):
    """Causal attention of one batch chunk in one compiled loop (ops/fused_cpu.c, tiled_attention_forward),
    or None where it does not apply (no loops, a dtype other than float32/64, or D not a multiple of the
    build's vector lanes): then nothing is written and the caller takes _blocked_forward.

    Takes what _blocked_forward takes (q scaled by 1/√D; q, k, v, out (b, ·, T, D) views with unit-stride
    rows) and computes the same O, one (batch row, head) at a time: S, the causal softmax and O = P v of 8
    query rows at a time, with kᵀ, the rows' scores and v's rows in L1, only the keys up to the rows' tile
    of 16 computed. Returns P in the loop's kept layout, (b, H, _tiled_size(T)), for _tiled_backward."""
    function = fused_cpu.function("tiled_attention_forward", q.dtype)
    views = [fused_cpu.heads_view(a) for a in (q, k, v, out)]
    if function is None or any(view is None for view in views) or len({q.dtype, k.dtype, v.dtype, out.dtype}) > 1:
        return None
    batch, heads, time, head_dim = q.shape
    padded = -(-time // 16) * 16
    kept = np.empty((batch, heads, _tiled_size(time)), dtype=q.dtype)
    scratch = np.empty(head_dim * padded + max(padded, head_dim), dtype=q.dtype)
    done = function(*[x for view in views for x in view], fused_cpu.address(kept), fused_cpu.address(scratch),
                    batch, heads, k.shape[1], time, head_dim)
    return kept if done == 0 else None


def _tiled_backward(d_out, q, k, v, out, kept, dq, dk, dv):
    """dq (with respect to the scaled q), dk, dv of _tiled_forward in one compiled loop (tiled_attention_backward),
    written into the views given: per (batch row, head) Δ = rowsum(dO ∘ O), then 8 query rows at a time
    dP = dO vᵀ, dS = P ∘ (dP − Δ) (kept in a scratch head), dq = dS k; then dk = dSᵀ q and dv = Pᵀ dO, 8 keys
    at a time over the rows that see them (summed over a group's heads)."""
    if fused_cpu.heads_view(d_out) is None or d_out.dtype != q.dtype:
        d_out = np.ascontiguousarray(d_out, dtype=q.dtype)
    views = [fused_cpu.heads_view(a) for a in (d_out, q, k, v, out)]
    targets = [fused_cpu.heads_view(a) for a in (dq, dk, dv)]
    batch, heads, time, head_dim = q.shape
    padded = -(-time // 16) * 16
    scratch = np.empty(head_dim * padded + _tiled_size(time) + padded + max(padded, head_dim), dtype=q.dtype)
    done = fused_cpu.function("tiled_attention_backward", q.dtype)(
        *[x for view in views for x in view], fused_cpu.address(kept), *[x for view in targets for x in view],
        fused_cpu.address(scratch), batch, heads, k.shape[1], time, head_dim)
    if done != 0:                                        # the forward ran the same checks on the same shapes
        raise RuntimeError("causal_attention: the tiled backward declined the shapes its forward took")


def _grouped_rows(batch: int, kv_heads: int, rows: int, xp):
    """Flat (b, H, Tq) row indices of the grouped layout's rows, (b, Hkv, G·Tq, 1)."""
    return xp.arange(batch * kv_heads).reshape(batch, kv_heads, 1, 1) * rows + xp.arange(rows)[:, None]


def _attend(q, k, v, path, drop=None, row_offset: int = 0):
    """O (b, H, Tq, D) for q (b, H, Tq, D), k, v (b, Hkv, Tk, D) by `path`, and what its backward needs.
    drop = (seed, keep): attention dropout, the mask of rows counted from row_offset."""
    if not isinstance(path, str):
        if drop is None:
            out, lse = path.causal_attention_forward(q, k, v)
        else:
            out, lse = path.causal_attention_forward(q, k, v, dropout=kernel_dropout(drop, row_offset))
        return out, (q, k, v, out, lse)
    xp = array_module(q, k, v)
    batch, heads, query_len, head_dim = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    q3 = q.reshape(batch, kv_heads, group * query_len, head_dim)         # (b, H, Tq, D) -> (b, Hkv, G·Tq, D)
    p, lse = grouped_causal_probabilities(q3, k, group, 1.0 / math.sqrt(head_dim), xp)
    p_out = p
    if drop is not None:                                                  # P ∘ M / keep
        p_out = p * _dropout_scale(drop, row_offset, _grouped_rows(batch, kv_heads, q3.shape[2], xp),
                                   xp.arange(k.shape[2]), p.dtype, xp)
    out3 = product(p_out, v)                                              # (b, Hkv, G·Tq, D)
    out = out3.reshape(q.shape)                                           # -> (b, H, Tq, D)
    if path == "kept":
        return out, (q3, k, v, out3, p)
    return out, (q, k, v, out, lse.reshape(batch, heads, query_len))    # (b, Hkv, G·Tq, 1) -> (b, H, Tq)


def _attend_backward(dy, path, q, k, v, out, kept, drop=None, row_offset: int = 0):
    """dq, dk, dv of _attend; `kept` is L (kernel, recompute) or P (kept); q is q3 on the kept path."""
    if not isinstance(path, str):
        if drop is None:
            return path.causal_attention_backward(dy, q, k, v, out, kept)
        return path.causal_attention_backward(dy, q, k, v, out, kept, dropout=kernel_dropout(drop, row_offset))
    xp = array_module(q, k, v)
    batch, kv_heads, key_len, head_dim = k.shape
    scale = 1.0 / math.sqrt(head_dim)
    grouped = (batch, kv_heads, -1, head_dim)                             # (b, H, Tq, D) -> (b, Hkv, G·Tq, D)
    q3, dy3, out3 = q.reshape(grouped), dy.reshape(grouped), out.reshape(grouped)
    if path == "kept":
        p = kept
    else:
        group = q.shape[1] // kv_heads                                    # q is (b, H, Tq, D) here
        lse3 = kept.reshape(batch, kv_heads, -1, 1)
        p, _ = grouped_causal_probabilities(q3, k, group, scale, xp, lse=lse3)   # recomputed (b, Hkv, G·Tq, Tk)
    p_out = p                                                             # the P that multiplied v
    if drop is not None:         # forward was O = (P ∘ M / keep) v, so dP sees M / keep and dv its P
        scaled = _dropout_scale(drop, row_offset, _grouped_rows(batch, kv_heads, q3.shape[2], xp),
                                xp.arange(key_len), p.dtype, xp)
        p_out = p * scaled
    dv = product(xp.ascontiguousarray(dy3.swapaxes(-1, -2)), p_out).swapaxes(-1, -2)   # (Pᵀ dO): (b, Hkv, Tk, D)
    ds = product(dy3, xp.ascontiguousarray(v.swapaxes(-1, -2)))           # dP (b, Hkv, G·Tq, Tk)
    if drop is not None:
        ds *= scaled
    ds -= (dy3 * out3).sum(axis=-1, keepdims=True)                        # dP − Δ
    ds *= p                                                               # dS = P ∘ (dP − Δ)
    dq = product(ds, k)                                                   # dS k, then / √D
    dq *= dq.dtype.type(scale)
    dk = product(xp.ascontiguousarray(q3.swapaxes(-1, -2)), ds).swapaxes(-1, -2)   # (b, Hkv, Tk, D)
    dk *= dk.dtype.type(scale)
    return dq, dk, dv                     # dq (b, Hkv, G·Tq, D): callers reshape; dk, dv are transposed views


def _check_dropout(dropout, cache):
    """(seed, keep) of the op's dropout=(p, seed) argument, or None when there is nothing to drop."""
    if dropout is None:
        return None
    probability, seed = dropout
    if not 0.0 <= float(probability) < 1.0:
        raise ValueError(f"causal_attention: dropout probability must be in [0, 1), got {probability}")
    if float(probability) == 0.0:
        return None
    if cache is not None:
        raise ValueError("causal_attention: attention dropout is for training; the KV-cache path takes none")
    return seed if isinstance(seed, rng.DeviceSeed) else int(seed), 1.0 - float(probability)


class CausalAttention(Function):
    """Forward:  S = q kᵀ / √D with S[i, j] = −∞ for j after i;  L = logsumexp_j S;  P = exp(S − L);  O = P v
    Backward: P recomputed from q, k and L (or kept from the forward: keep_probabilities)
              dv = Pᵀ dO                      (summed over the query heads of a group)
              dP = dO vᵀ
              Δ  = rowsum(dO ∘ O)             (equals rowsum(P ∘ dP), one (Tq,) vector per head)
              dS = P ∘ (dP − Δ)               (the softmax Jacobian)
              dq = dS k / √D;   dk = dSᵀ q / √D  (dk summed over the group)
    Shapes:   q, O, dO: (B, H, Tq, D)   k, v, dk, dv: (B, Hkv, Tk, D)   L, Δ: (B, H, Tq)
    Saves:    the path, q, k, v, O, L   (no Tq×Tk array is kept between forward and backward, unless kept)
    The query heads of a group are stacked along the rows, (B, H, Tq, D) -> (B, Hkv, G·Tq, D), so every
    product is a plain batched matmul and the sums over the group come out of the products themselves.

    Attention dropout, `dropout=(p, seed)` with keep = 1 − p (training only; p = 0 is the plain op):
    Forward:  M[i, j] = [hash(seed, row i, key j) < keep · 2³²]   (tinygrad_llm.rng.hash_bits; the row is
              the query's index in the flat (B, H, Tq) order)
              P̃ = P ∘ M / keep;   O = P̃ v      (L is still the log-sum-exp of the undropped scores)
    Backward: M made again from (seed, row, key), never stored
              dv = P̃ᵀ dO
              dP̃ = dO vᵀ          (the gradient reaching P̃)
              dP = dP̃ ∘ M / keep  (P̃ = P ∘ M / keep is elementwise in P)
              Δ  = rowsum(dO ∘ O) (= Σ_j P̃ dP̃ = rowsum(P ∘ dP): still one (Tq,) vector per head)
              dS = P ∘ (dP − Δ);   dq, dk as above
    Shapes:   as above; the mask is (B, H, Tq, Tk) in principle, made a block at a time
    Saves:    as above, plus (seed, keep)

    Packed form, `packed=(H, Hkv, cos, sin)`: q is then the whole projection qkv (B, T, H + 2Hkv, D)
    (k and v are None) and the op is RoPE + attention + the layout o_proj wants:
    Forward:  q, k, v = the three slices of qkv along the heads axis, each as (B, heads, T, D)
              q ← RoPE(q), k ← RoPE(k)  (cos, sin: (T, D/2), ops/rope.rotate_into)
              O as above;  y = O as (B, T, H·D)
    Backward: dO = dy as (B, H, T, D);  dq, dk, dv as above
              RoPE is a rotation, its transpose the rotation by −angle: d(q slice) = rotate(dq, cos, −sin),
              the same for k; dv goes to the v slice as it is. The three are written straight into one
              d(qkv) (B, T, H + 2Hkv, D): no zero-filled slice gradients, no separate transposes.
    Shapes:   qkv, d(qkv): (B, T, H + 2Hkv, D)   y, dy: (B, T, H·D)
    Saves:    per batch chunk, the path and what that path saves;  cos, sin
    On NumPy arrays the batch is cut into chunks whose T×T scores fit in cache and the chunks are spread
    over threads (tinygrad_llm.cpu_threads): batch rows are independent.
    Blocked causal path (NumPy, keep_probabilities, no cache: CPU training): the query rows go in blocks
    of QUERY_BLOCK rows, each against only the keys up to its diagonal (`_blocked_forward`,
    `_blocked_backward`; derived in docs/backprop.md), 1/√D rides in q's RoPE tables, and q, k, O, dO
    stay in the token-major layout of qkv and y (no transposed copies but kᵀ and vᵀ). Tiled loop (that
    path without dropout, float32/64, D a multiple of the build's vector lanes: `_tiled_forward`,
    `_tiled_backward`): the same formulas per (batch row, head) in one compiled call per batch chunk, 8 query
    rows at a time against the keys up to their 16-row tile; P is kept per head in a packed layout (row i
    keeps keys 0 … 16·(i // 16 + 1) − 1), and the backward adds dk, dv over a group's heads in place.
    GPU attention kernels (tinygrad_llm.gpu.attention): q and k are rotated in one pass into a token-major
    (B, T, H + Hkv, D) buffer; the kernels read q, k there, v in qkv and dO in dy, and write O into y and
    dq, dk, dv into d(qkv) through their strides; one more pass rotates d(q‖k) back in place. Saved: the
    rotated buffer and views of qkv and y (both alive anyway, as inputs of this op and of the next), and L.
    With `cache=(k_store, v_store, start)` (KV-cached decoding, no gradient) the rotated k and v of the
    new positions are written into the stores (B, Hkv, max_len, D) at start … start + T, and q attends
    to every stored position before start + T; cos, sin are then the tables of positions start … start + T.
    Both cache forms run `_cached_forward` (never the chunked training path).
    Ragged batched cache, `cache=(k_store, v_store, rows)` with rows a `CacheRows`: the stores hold S
    independent sequences (S, Hkv, max_len, D); batch row b is the sequence in store row rows.slots[b],
    which already holds rows.starts[b] positions. Its T new positions go to starts[b] … starts[b] + T − 1
    (cos, sin: (B·T, D/2), each row's own positions, row after row) and query i of row b attends to that
    store row's keys 0 … starts[b] + i only. Keys are read in place (a view per run of consecutive store
    rows, no gather); for one new position per row (decoding) the scores are formed as K qᵀ, keys on the
    left, so no transposed copy of the cached keys is made. On the GPU (float32 stores) a decoding step's
    attention is one kernel instead (kernels/attention_decode.cu, held to this path by the tests): it reads
    each row's store row and length on the device, so the runs are not used and the launch is the same at
    every step (a CUDA graph can replay it).
    """

    def forward(self, q, k=None, v=None, packed=None, keep_probabilities=False, cache=None, dropout=None):
        drop = _check_dropout(dropout, cache)
        if packed is not None and cache is not None:
            return self._cached_forward(q, *packed, cache)
        if packed is not None:
            return self._packed_forward(q, *packed, keep_probabilities, drop)
        _check_shapes(q, k, v)
        path = choose_path(q, k, v, keep_probabilities)
        out, (q_, k_, v_, out_, kept) = _attend(q, k, v, path, drop)
        self.save(path=path, q=q_, k=k_, v=v_, out=out_, kept=kept, drop=drop, packed=False)
        return out

    def backward(self, dy):
        *saved, packed = self.saved
        if packed == "cache":
            raise RuntimeError("causal_attention: the KV-cache path keeps no gradient (run it under no_grad)")
        if packed:
            return self._packed_backward(dy, *saved)
        path, q, k, v, out, kept, drop = saved
        dq, dk, dv = _attend_backward(dy, path, q, k, v, out, kept, drop)
        xp = array_module(dy)
        return dq.reshape(dy.shape), xp.ascontiguousarray(dk), xp.ascontiguousarray(dv)

    def _packed_forward(self, qkv, heads, kv_heads, cos, sin, keep_probabilities, drop=None):
        xp = array_module(qkv)
        if qkv.ndim != 4 or qkv.shape[2] != heads + 2 * kv_heads or heads % kv_heads:
            raise ValueError(f"causal_attention: packed qkv must be (B, T, {heads} + 2·{kv_heads}, D) with "
                             f"{kv_heads} dividing {heads}, got {tuple(qkv.shape)}")
        batch, time, _, head_dim = qkv.shape
        out = xp.empty((batch, time, heads * head_dim), dtype=qkv.dtype)
        rope = kernel("rope", qkv)
        blocked = (xp is np and keep_probabilities and not needs_float32_products(qkv.dtype)
                   and kernel("causal_attention", qkv) is None)
        tables = _head_tables(cos, sin, heads, kv_heads) if blocked else None
        fast = kernel("causal_attention", qkv) if rope is not None else None

        def part(bounds):
            start, end = bounds
            chunk = qkv[start:end]                                                   # (b, T, H + 2Hkv, D)
            rows = end - start
            if fast is not None:     # the GPU kernels read and write strided views: q and k rotated in one pass
                # into a token-major buffer, v read in place from qkv, O written straight into out
                qk = xp.empty((rows, time, heads + kv_heads, head_dim), dtype=qkv.dtype)   # (b, T, H + Hkv, D)
                rotate_into(chunk[:, :, :heads + kv_heads].transpose(0, 2, 1, 3), cos, sin,
                            qk.transpose(0, 2, 1, 3), rope)
                q = qk[:, :, :heads].transpose(0, 2, 1, 3)                           # (b, H, T, D) view
                k = qk[:, :, heads:].transpose(0, 2, 1, 3)                           # (b, Hkv, T, D) view
                v = chunk[:, :, heads + kv_heads:].transpose(0, 2, 1, 3)             # (b, Hkv, T, D) view
                o = out[start:end].reshape(rows, time, heads, head_dim).transpose(0, 2, 1, 3)   # (b, H, T, D)
                _, lse = fast.causal_attention_forward(q, k, v, dropout=kernel_dropout(drop, start * heads * time),
                                                       out=o)
                return [bounds, fast, (q, k, v, o, lse)]
            if blocked:          # q, k rotated in the token-major layout; O written in o_proj's layout
                qk = np.empty((rows, time, heads + kv_heads, head_dim), dtype=qkv.dtype)
                rotate_heads_into(chunk[:, :, :heads + kv_heads], *tables, qk)
                q = qk[:, :, :heads].transpose(0, 2, 1, 3)                           # (b, H, T, D) view
                k = qk[:, :, heads:].transpose(0, 2, 1, 3)                           # (b, Hkv, T, D) view
                v = chunk[:, :, heads + kv_heads:].transpose(0, 2, 1, 3)             # (b, Hkv, T, D) view
                o = out[start:end].reshape(rows, time, heads, head_dim).transpose(0, 2, 1, 3)   # (b, H, T, D)
                kept = _tiled_forward(q, k, v, o) if drop is None else None
                if kept is not None:
                    return [bounds, "tiled", (q, k, v, o, kept)]
                kept = _blocked_forward(q, k, v, o, QUERY_BLOCK, drop=drop, row_offset=start * heads * time)
                return [bounds, "blocked", (q, k, v, o, kept)]
            q = xp.empty((rows, heads, time, head_dim), dtype=qkv.dtype)
            k = xp.empty((rows, kv_heads, time, head_dim), dtype=qkv.dtype)
            rotate_into(chunk[:, :, :heads].transpose(0, 2, 1, 3), cos, sin, q, rope)           # (b, H, T, D)
            rotate_into(chunk[:, :, heads:heads + kv_heads].transpose(0, 2, 1, 3), cos, sin, k, rope)
            v = _copy_into(chunk[:, :, heads + kv_heads:].transpose(0, 2, 1, 3),                 # (b, Hkv, T, D)
                           xp.empty((rows, kv_heads, time, head_dim), dtype=qkv.dtype), rope)
            path = choose_path(q, k, v, keep_probabilities)
            o, state = _attend(q, k, v, path, drop, start * heads * time)            # (b, H, T, D)
            target = out[start:end].reshape(rows, time, heads, head_dim)                # (b, T, H·D) -> (b, T, H, D)
            _copy_into(o, target.transpose(0, 2, 1, 3), rope)                           # o (b, H, T, D) into it
            return [bounds, path, state]

        if blocked:              # batch chunks whose largest score block fits in cache, dealt to the threads
            per_chunk = max(1, CHUNK_ELEMENTS // (heads * min(QUERY_BLOCK, time) * time))
        else:
            per_chunk = max(1, CHUNK_ELEMENTS // (heads * time * time))
        if xp is np:                       # cache-sized chunks of the batch, dealt to the threads
            least = thread_count() if blocked else 1                      # the blocked path: a chunk a thread
            chunks = split(batch, parts=max(-(-batch // per_chunk), least))
            work = [chunks[i::thread_count()] for i in range(min(thread_count(), len(chunks)))]
            parts = [p for group in parallel_items(lambda group: [part(c) for c in group], work) for p in group]
        else:
            parts = [part((0, batch))]
        self.save(parts=parts, cos=cos, sin=sin, tables=tables, heads=heads, kv_heads=kv_heads, rope=rope,
                  drop=drop, packed=True)
        return out

    def _packed_backward(self, dy, parts, cos, sin, tables, heads, kv_heads, rope, drop):
        xp = array_module(dy)
        batch, time, _ = dy.shape
        head_dim = cos.shape[-1] * 2
        dqkv = xp.empty((batch, time, heads + 2 * kv_heads, head_dim), dtype=dy.dtype)    # (B, T, H + 2Hkv, D)

        def part(item):
            (start, end), path, state = item
            item[2] = None                                       # this chunk's P or L goes once used
            rows = end - start
            d_out = dy[start:end].reshape(rows, time, heads, head_dim).transpose(0, 2, 1, 3)   # (b, H, T, D) view
            target = dqkv[start:end]
            if not isinstance(path, str):    # GPU kernels: dO read in place; dq, dk, dv written into d(qkv),
                # then the q and k heads rotated back (−sin) in place, one pass
                q, k, v, o, lse = state
                del state
                path.causal_attention_backward(
                    d_out, q, k, v, o, lse, dropout=kernel_dropout(drop, start * heads * time),
                    dq=target[:, :, :heads].transpose(0, 2, 1, 3),
                    dk=target[:, :, heads:heads + kv_heads].transpose(0, 2, 1, 3),
                    dv=target[:, :, heads + kv_heads:].transpose(0, 2, 1, 3))
                rotated = target[:, :, :heads + kv_heads].transpose(0, 2, 1, 3)        # (b, H + Hkv, T, D) view
                rotate_into(rotated, cos, -sin, rotated, rope)
                return
            if path in ("blocked", "tiled"):   # d(q‖k) gathered token-major, rotated back (1/√D on q) into d(qkv)
                d_qk = np.empty((rows, time, heads + kv_heads, head_dim), dtype=dy.dtype)
                gradients = dict(dq=d_qk[:, :, :heads].transpose(0, 2, 1, 3),              # (b, H, T, D) views
                                 dk=d_qk[:, :, heads:].transpose(0, 2, 1, 3),
                                 dv=target[:, :, heads + kv_heads:].transpose(0, 2, 1, 3))
                if path == "tiled":
                    _tiled_backward(d_out, *state, **gradients)
                else:
                    _blocked_backward(d_out, *state, QUERY_BLOCK, **gradients, drop=drop,
                                      row_offset=start * heads * time)
                del state
                cos_wide, sin_signed = tables
                rotate_heads_into(d_qk, cos_wide, -sin_signed, target[:, :, :heads + kv_heads])
                return
            d_out = _copy_into(d_out, xp.empty((rows, heads, time, head_dim), dtype=dy.dtype), rope)
            dq, dk, dv = _attend_backward(d_out, path, *state, drop=drop, row_offset=start * heads * time)
            del state
            dq = dq.reshape(d_out.shape)
            rotate_into(dq, cos, -sin, target[:, :, :heads].transpose(0, 2, 1, 3), rope)
            rotate_into(dk, cos, -sin, target[:, :, heads:heads + kv_heads].transpose(0, 2, 1, 3), rope)
            _copy_into(dv, target[:, :, heads + kv_heads:].transpose(0, 2, 1, 3), rope)

        work = [parts[i::thread_count()] for i in range(min(thread_count(), len(parts)))]
        parallel_items(lambda group: [part(item) for item in group], work)
        return dqkv

    def _cached_forward(self, qkv, heads, kv_heads, cos, sin, cache):
        """The KV-cache forms (see the class docstring): rotate, write the new keys and values into the
        stores, attend each batch row over its own store row. No gradient is kept."""
        xp = array_module(qkv)
        if qkv.ndim != 4 or qkv.shape[2] != heads + 2 * kv_heads or heads % kv_heads:
            raise ValueError(f"causal_attention: packed qkv must be (B, T, {heads} + 2·{kv_heads}, D) with "
                             f"{kv_heads} dividing {heads}, got {tuple(qkv.shape)}")
        k_store, v_store, rows = cache
        batch, time, _, head_dim = qkv.shape
        if not isinstance(rows, CacheRows):                  # one start for every row: store rows 0 … B − 1
            rows = CacheRows(np.arange(batch), np.full(batch, int(rows)), time, xp)
            if batch > 1:
                cos, sin = xp.tile(cos, (batch, 1)), xp.tile(sin, (batch, 1))      # (T, D/2) -> (B·T, D/2)
        if rows.batch != batch or rows.time != time:
            raise ValueError(f"causal_attention: cache rows for {rows.batch} × {rows.time} positions, "
                             f"qkv has {batch} × {time}")
        if rows.end > k_store.shape[2]:
            raise ValueError(f"KV cache holds {k_store.shape[2]} positions; {rows.end} were asked for")
        if int(rows.slots.max()) >= k_store.shape[0]:
            raise ValueError(f"KV cache has {k_store.shape[0]} rows; row {int(rows.slots.max())} was asked for")
        flat = xp.ascontiguousarray(qkv).reshape(1, batch * time, heads + 2 * kv_heads, head_dim)  # (1, B·T, ·, D)
        if time == 1 and xp is np:           # decoding on the CPU: rotate, store and attend in one compiled loop
            out = np.empty((batch, heads * head_dim), dtype=qkv.dtype)
            packed = flat[0].reshape(batch, -1)                                   # (B, (H + 2Hkv)·D)
            q_end, k_end = heads * head_dim, (heads + kv_heads) * head_dim
            call = decode_attention_call(packed[:, :q_end], packed[:, q_end:k_end], packed[:, k_end:], k_store,
                                         v_store, *rows.write, np.arange(batch), cos, sin, heads, kv_heads, out)
            if call is not None:
                call()
                self.save(packed="cache")
                return out.reshape(batch, 1, heads * head_dim)                     # (B, H·D) -> (B, 1, H·D)
        rope = kernel("rope", qkv)
        rotated = xp.empty((1, heads + kv_heads, batch * time, head_dim), dtype=qkv.dtype)
        rotate_into(flat[:, :, :heads + kv_heads].transpose(0, 2, 1, 3), cos, sin, rotated, rope)   # q and k, each
        q, k = rotated[:, :heads], rotated[:, heads:]                # at its position: (1, H | Hkv, B·T, D)
        store_rows, positions = rows.write
        k_store[store_rows, :, positions] = k[0].swapaxes(0, 1)                      # (B·T, Hkv, D)
        v_store[store_rows, :, positions] = flat[0, :, heads + kv_heads:]
        decode = kernel("decode_attention", k_store, v_store) if time == 1 and qkv.dtype == k_store.dtype else None
        if decode is not None:   # every row over its own cache row, rows and lengths read on the device
            out = xp.empty((batch, heads * head_dim), dtype=qkv.dtype)
            decode.decode_attention(q[0].swapaxes(0, 1), k_store, v_store, store_rows, positions, out)  # q (B, H, D)
            self.save(packed="cache")
            return out.reshape(batch, 1, heads * head_dim)                          # (B, H·D) -> (B, 1, H·D)
        q = q.reshape(heads, batch, time, head_dim).transpose(1, 0, 2, 3)           # -> (B, H, T, D)
        out = xp.empty((batch, time, heads * head_dim), dtype=qkv.dtype)
        for members, stores, length, bias in rows.runs:
            keys, values = k_store[stores, :, :length], v_store[stores, :, :length]   # (r, Hkv, L, D): views
            if time == 1:
                o = _attend_decode(q[members], keys, values, bias)
            else:
                q_run = xp.ascontiguousarray(q[members])
                keys, values = keys.astype(q.dtype, copy=False), values.astype(q.dtype, copy=False)
                o, _ = _attend(q_run, keys, values, choose_path(q_run, keys, values, False))
            out[members] = o.transpose(0, 2, 1, 3).reshape(-1, time, heads * head_dim)   # (r, H, T, D) -> (r, T, H·D)
        self.save(packed="cache")
        return out


def _copy_into(source, target, rope=None):
    """target[...] = source for (b, heads, T, D) views (either may be a transposed view of a packed array);
    `rope` is the kernel module when the op's RoPE runs on the GPU: its copy_heads moves 16 bytes an access.
    Returns target."""
    if rope is not None:
        return rope.copy_heads(source, out=target)
    target[...] = source
    return target


class CacheRows:
    """The store rows a batch writes and reads, and the position each row starts at: the ragged
    batched-cache option of CausalAttention, `cache=(k_store, v_store, CacheRows(slots, starts, T))`.

    Batch row b is the sequence kept in store row slots[b], holding starts[b] positions; its T new
    positions are starts[b] … starts[b] + T − 1. Every layer of one step shares one CacheRows, so what
    follows from the rows is worked out once, here: the store indices of the new keys, and the runs.
    A run is a set of batch rows whose store rows are consecutive (with T > 1, also at the same start):
    its keys are one view of the stores, (r, Hkv, L, D) with L its longest row, and a −∞ bias hides
    each row's keys past its own length (decoding, T = 1; with T > 1 the run's causal mask does that).
    slots, starts: (B,) integers; xp: the array module of the stores. `write` is (store row, position) of
    every new position, (B·T,) each, on the stores' device; `device` gives those two arrays instead of
    copying them from slots and starts: fixed buffers that a CUDA graph of the decoding step reads, refilled
    before each replay (generate.Decoder). The decoding kernel reads only `write`, so a graph built from one
    CacheRows serves every later step of the same batch size.
    """

    def __init__(self, slots, starts, time: int, xp=np, device=None):
        slots = np.asarray(slots, dtype=np.int64).reshape(-1)
        starts = np.asarray(starts, dtype=np.int64).reshape(-1)
        if slots.shape != starts.shape or slots.size == 0 or int(time) < 1:
            raise ValueError(f"CacheRows: {slots.size} slots, {starts.size} starts and {time} new positions; "
                             "need one start per slot and at least one of each")
        order = np.argsort(slots, kind="stable")
        ordered = slots[order]
        if (np.diff(ordered) == 0).any() or int(starts.min()) < 0 or int(ordered[0]) < 0:
            raise ValueError(f"CacheRows: store rows must be distinct and non-negative, starts non-negative; "
                             f"got slots {slots.tolist()}, starts {starts.tolist()}")
        self.slots, self.starts, self.time, self.batch = slots, starts, int(time), slots.size
        self.positions = (starts[:, None] + np.arange(self.time)[None, :]).reshape(-1)    # (B·T,) row after row
        self.end = int(starts.max()) + self.time
        self.write = device or (xp.asarray(np.repeat(slots, self.time)), xp.asarray(self.positions))
        if self.batch == 1:                               # one sequence (generate, prefill): one run, no mask
            self.runs = [(slice(0, 1), slice(int(slots[0]), int(slots[0]) + 1), self.end, None)]
            return
        breaks = np.diff(ordered) != 1
        if self.time > 1:
            breaks |= np.diff(starts[order]) != 0
        self.runs = []
        for members in np.split(order, np.flatnonzero(breaks) + 1):
            first, count = int(members[0]), members.size
            lengths = starts[members] + self.time                                       # (r,)
            bias = None
            if self.time == 1 and int(lengths.min()) != int(lengths.max()):
                beyond = np.arange(int(lengths.max()))[None, :] >= lengths[:, None]     # (r, L)
                bias = xp.asarray(np.where(beyond, -np.inf, 0.0)[:, None, :, None])     # (r, 1, L, 1)
            contiguous = np.array_equal(members, np.arange(first, first + count))
            low = int(slots[members].min())
            self.runs.append((slice(first, first + count) if contiguous else xp.asarray(members),
                              slice(low, low + count), int(lengths.max()), bias))


def decode_attention_call(q, k, v, k_store, v_store, slots, positions, angles, cos, sin, heads: int, kv_heads: int,
                          out):
    """The cached form's decoding step (T = 1) as one compiled loop (ops/fused_cpu.c, decode_attention), bound
    to these arrays: a callable that, each time it is called, rotates row b's q and k at the tables' row
    angles[b], writes k and v into the stores at (slots[b], :, positions[b]) and attends q over the row's
    positions[b] + 1 keys into out[b]. Reads the arrays' contents at each call (a decoding step refills
    them: generate.Decoder's CPU steps). None where the loop does not apply (NumPy float32/64 arrays of one
    dtype, contiguous but for q, k, v, whose rows may be strided: column slices of one q‖k‖v array; and the
    compiled loops). The caller checks the indices against the stores.
    Shapes: q (n, H·D); k, v (n, Hkv·D); slots, positions, angles (n,) int64; cos, sin (·, D/2);
    stores (·, Hkv, L, D); out (n, H·D)."""
    if not fused_cpu.usable(k_store, v_store, cos, sin, out):
        return None
    news = (q, k, v)
    if any(type(a) is not np.ndarray or a.ndim != 2 or a.dtype != out.dtype or a.strides[1] != a.itemsize
           or a.strides[0] % a.itemsize for a in news):
        return None
    indices = (slots, positions, angles)
    if any(type(a) is not np.ndarray or a.dtype != np.int64 or not a.flags.c_contiguous for a in indices):
        return None
    rows, length, head_dim = q.shape[0], k_store.shape[2], k_store.shape[3]
    function = fused_cpu.function("decode_attention", out.dtype)
    scratch = np.empty(rows * (heads * head_dim + length), dtype=out.dtype)
    arrays = (*news, *indices, cos, sin, k_store, v_store, out, scratch)        # kept alive by the call
    pointers = [p for a in news for p in (fused_cpu.address(a), a.strides[0] // a.itemsize)]
    pointers += [fused_cpu.address(a) for a in arrays[3:]]
    shape = (heads, kv_heads, head_dim, length)
    work = rows * heads * head_dim * length                        # an upper bound: every row at the full length
    parts = min(thread_count(), rows, max(1, work // CHUNK_ELEMENTS))
    if parts <= 1:
        return lambda arrays=arrays: function(*pointers, 0, rows, *shape)
    ranges = split(rows, parts=parts)
    return lambda arrays=arrays: parallel_items(lambda bounds: function(*pointers, *bounds, *shape), ranges)


def _attend_decode(q, k, v, bias):
    """O (r, H, 1, D) of one query per row over that row's keys k, v (r, Hkv, L, D), −∞ `bias` (r, 1, L, 1)
    or None: scores as K qᵀ (r, Hkv, L, G), keys on the left (the stored keys are read as they lie),
    softmax over L, then Pᵀ V. 16-bit inputs are worked in float32."""
    xp = array_module(q)
    rows, heads, _, head_dim = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    work = np.promote_types(q.dtype, np.float32)               # float32 for 16-bit inputs, else their own
    q_t = q.astype(work).reshape(rows, kv_heads, group, head_dim).swapaxes(-1, -2)   # (r, H, 1, D) -> (r, Hkv, D, G)
    q_t *= work.type(1.0 / math.sqrt(head_dim))
    scores = product(k.astype(work, copy=False), q_t)                                 # (r, Hkv, L, G)
    if bias is not None:
        scores += bias.astype(work, copy=False)
    scores -= scores.max(axis=2, keepdims=True)
    xp.exp(scores, out=scores)
    scores /= scores.sum(axis=2, keepdims=True)                                        # P, normalised over L
    out = product(xp.ascontiguousarray(scores.swapaxes(-1, -2)), v.astype(work, copy=False))   # (r, Hkv, G, D)
    return out.reshape(rows, heads, 1, head_dim).astype(q.dtype, copy=False)          # -> (r, H, 1, D)


def dropout_mask(seed: int, keep: float, shape: tuple, dtype=np.float64, xp=np):
    """The whole M / keep of attention dropout (seed, keep) for scores of shape (B, H, Tq, Tk), in dtype:
    what the op applies a block at a time (a test oracle; O(B·H·Tq·Tk) memory)."""
    batch, heads, query_len, key_len = shape
    rows = xp.arange(batch * heads * query_len).reshape(batch, heads, query_len, 1)
    return _dropout_scale((seed, keep), 0, rows, xp.arange(key_len), np.dtype(dtype), xp)


def causal_attention_reference(q, k, v, dropout_scale=None):
    """Causal attention composed from primitives, with kv heads repeated explicitly (a test oracle);
    dropout_scale: M / keep (B, H, Tq, Tk) multiplied into the probabilities (attention dropout)."""
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
    probabilities = softmax(scores, axis=-1)
    if dropout_scale is not None:
        probabilities = probabilities * Tensor(dropout_scale)
    return probabilities @ v
