"""Flash attention on the GPU: causal grouped-query attention without the T×T matrix in memory.

Launches the kernels of kernels/attention_forward.cu, attention_backward.cu and attention_hopper.cu
(their headers give the algorithm, tiles, launch layout and shared memory) for
`tinygrad_llm.ops.attention.CausalAttention`, which is also their reference.

    causal_attention_forward(q, k, v, dropout=None, out=None) -> (out, lse)
    causal_attention_backward(dy, q, k, v, out, lse, dropout=None, dq=None, dk=None, dv=None)
        -> (dq, dk, dv)

Shapes: q, out, dy, dq (B, H, Tq, D); k, v, dk, dv (B, Hkv, Tk, D) with Hkv | H and Tq ≤ Tk (the causal
mask is aligned bottom-right, so a KV-cached decoding step with Tq = 1 works); lse (B, H, Tq) float32.

Layouts: the kernels read q, k, v, out, dy and write out, dq, dk, dv through their strides (batch, head
and row, in elements; kernels/attention_common.cuh's AttnLayout), so each may be a view of a packed
array: q, k of a token-major (B, T, H + Hkv, D) buffer, v a slice of the projection qkv
(B, T, H + 2Hkv, D), out and dy the (B, T, H·D) arrays around the output projection, dq, dk, dv slices
of d(qkv), each as its (B, T, heads, D) -> (B, heads, T, D) transpose. A view is used in place when its
last axis is contiguous, its start and other strides are multiples of 16 bytes and T times its row stride
is below 2³¹ elements; anything else is copied to a contiguous array first (inputs) or refused (outputs
given as `out`, `dq`, `dk`, `dv`). Without those arguments the outputs are new C-contiguous arrays. lse,
Δ and the float32 dq accumulator stay contiguous (B, H, Tq[, D]).

Which build runs (`kernel_for(head_dim, dtype)` names it):
- head dims 64 and 128, bf16/fp16, compute capability 9.0 (H100, H200): the wgmma builds of
  attention_hopper.cu, compiled for sm_90a: backward "wk"; forward "wp2" (two compute warpgroups,
  128-row query tiles) or, at head dim 64, "wp3" (three, 192-row tiles), whichever `forward_loads`
  predicts faster for the call's shape (see _HOPPER_FORWARD_OTHER); one template for each direction, the
  head dim a parameter;
- elsewhere the mma.sync builds (any GPU from sm_80): head dim 64 forward "w4m2", backward "w4m2q32p";
  head dim 128 forward "w8", backward "w4";
- the environment variable TINYGRAD_LLM_ATTENTION_WGMMA lists the head dims that take the wgmma builds on
  compute capability 9.0 (default "64,128"; "64" sends head dim 128 back to the mma.sync builds, "none"
  every head dim); it is read at each call;
- float32: plain-FMA kernels (slow: for checking, and for float32 models);
- any other head dim: no kernel; the op takes its NumPy-expressed path (batched GEMMs on CuPy arrays).

Precision: bfloat16 and float16 inputs run on tensor cores with float32 accumulation; out, dq, dk, dv come
back in the input dtype, lse in float32 (dq is accumulated in a float32 buffer by atomics, then cast).

Attention dropout: `dropout=(base, row_seed, column_seed, threshold, keep_scale)` (what
ops/attention.kernel_dropout makes from the op's seed and keep probability; base is None, or the device
array of a rng.DeviceSeed whose value the kernels add to the seed words) runs every build's
`_dropout` twin, which drops P with the hashed mask of kernels/attention_common.cuh (the bits of
tinygrad_llm.rng.hash_bits): out = keep_scale · (P ∘ M) v, and the matching backward. Without it the
plain builds run, compiled from the same templates with the dropout code left out.

Simplifications: head dims 64 and 128 only; inputs whose layout the kernels cannot read (see Layouts) are
copied; dk and dv are summed over the query heads of a group inside one thread block, while dq is
summed over key blocks with float32 atomics, so dq's last bits can vary from run to run (dk and dv cannot).
"""
from __future__ import annotations

import functools
import math
import os
import re

import numpy as np

from .arrays import all_on_gpu, compute_capability, contiguous, dtype_name, empty, multiprocessors, seed_base
from .compiler import function, selection

FORWARD_FILE = "attention_forward.cu"
BACKWARD_FILE = "attention_backward.cu"
HOPPER_FILE = "attention_hopper.cu"        # wgmma builds, sm_90a only
HOPPER_ARCH = "sm_90a"
HEAD_DIMS = (64, 128)
_SUFFIX = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


class Build:
    """One tensor-core build: its name and launch shape. Forward: `warps` warps, each 16·m_tiles query
    rows. Backward: `warps` warps, each 16·m_tiles keys, query steps of `block_q` rows. The wgmma builds
    (`hopper`): forward block_q / 64 compute warpgroups and a producer warpgroup, block_q-row query tiles;
    backward 384 threads a 128-key block, taking `block_q`-row query steps."""

    def __init__(self, name, warps=0, m_tiles=1, block_q=0, hopper=False):
        self.name, self.warps, self.m_tiles, self.block_q, self.hopper = name, warps, m_tiles, block_q, hopper


_HOPPER_FORWARD = {64: Build("wp2", block_q=128, hopper=True), 128: Build("wp2", block_q=128, hopper=True)}
# head dim -> (a second forward build, its time per query row × key tile relative to _HOPPER_FORWARD's).
# wp3 multiplies a row by a key tile in 0.84 of wp2's time, but its 192-row items can leave the
# persistent blocks less evenly loaded (fewer, larger items; a middle item without a partner), so the
# call takes it only when its busiest block's load, weighted so, is the smaller (benchmarks/RESULTS.md:
# 0.83-0.85 fitted on five shapes, T 1024-4096, and the choice right on all five).
_HOPPER_FORWARD_OTHER = {64: (Build("wp3", block_q=192, hopper=True), 0.84)}
_HOPPER_BACKWARD = {64: Build("wk", block_q=128, hopper=True), 128: Build("wk", block_q=64, hopper=True)}
_FORWARD = {64: Build("w4m2", warps=4, m_tiles=2), 128: Build("w8", warps=8)}
_BACKWARD = {64: Build("w4m2q32p", warps=4, m_tiles=2, block_q=32), 128: Build("w4", warps=4, block_q=32)}
_FORWARD_BLOCK_K = 64
WGMMA_ENV = "TINYGRAD_LLM_ATTENTION_WGMMA"          # head dims that take the wgmma builds ("64,128", "none")
_HOPPER_BLOCK_K = 128                               # keys a wgmma backward block (and a forward K/V tile)
# (b, kv head) pairs whose key blocks the wgmma backward interleaves, key block 0 of each first (see
# attention_hopper.cu): 16 was the fastest of 1, 8, 16, 32 and all at every timed shape (H100, D 64 and
# 128, T 1024 and 4096, GQA 1, 3, 4; benchmarks/RESULTS.md session 17)
_HOPPER_BACKWARD_CHUNK = 16


def supports(*arrays) -> bool:
    """True when the kernels handle these arrays: (q, k, v) or any set of them, all CuPy arrays of one
    dtype among bfloat16, float16 and float32, 4-d, with head dim 64 or 128."""
    if not all_on_gpu(*arrays):
        return False
    dtypes = {np.dtype(a.dtype) for a in arrays}
    if len(dtypes) != 1 or _SUFFIX.get(dtypes.pop().name) is None:
        return False
    return all(a.ndim == 4 and a.shape[-1] in HEAD_DIMS for a in arrays)


def hopper_available() -> bool:
    """True on a GPU of compute capability 9.0 (H100, H200), where the sm_90a wgmma builds run."""
    return compute_capability() == "90"


def wgmma_head_dims() -> tuple:
    """The head dims whose wgmma builds run on compute capability 9.0: $TINYGRAD_LLM_ATTENTION_WGMMA, a
    comma-separated list ("64,128" when unset; "none" or "" for none). A value naming no head dim that has
    a wgmma build is an error (a typo must not silently change the path)."""
    value = os.environ.get(WGMMA_ENV)
    if value is None:
        return tuple(sorted(_HOPPER_FORWARD))
    words = [word.strip() for word in value.split(",") if word.strip()]
    if words in ([], ["none"]):
        return ()
    try:
        dims = tuple(int(word) for word in words)
    except ValueError:
        dims = ()
    if not dims or any(d not in _HOPPER_FORWARD for d in dims):
        raise ValueError(f"{WGMMA_ENV}={value!r}: expected a comma-separated list of head dims among "
                         f"{sorted(_HOPPER_FORWARD)}, or 'none'")
    return dims


def kernel_for(head_dim: int, dtype, hopper: bool | None = None, shape: tuple | None = None,
               blocks: int | None = None) -> str | None:
    """The attention path for this head dim and dtype, in words: "forward wp2, backward wk (wgmma,
    sm_90a)", "forward w4m2, backward w4m2q32p (mma.sync)", "float32 kernels", or None when no kernel
    exists (the op then runs its batched-GEMM path). Where the forward build depends on the call's shape,
    both are named ("forward wp2 or wp3 (by shape), ..."), unless `shape` = (batch, heads, query_len,
    key_len) says which; `blocks` is the number of multiprocessors (default: the current GPU's). `hopper`
    defaults to asking the current GPU; without a GPU, pass it (and `blocks` with `shape`)."""
    name = _SUFFIX.get(np.dtype(dtype).name)
    if name is None or head_dim not in HEAD_DIMS:
        return None
    if name == "fp32":
        return "float32 kernels"
    if hopper is None:
        hopper = hopper_available()
    if shape is not None:
        batch, heads, query_len, key_len = shape
        shape = (batch * heads, query_len, key_len, blocks or multiprocessors())
    forward, backward = _builds(head_dim, hopper, shape)
    kind = "wgmma, sm_90a" if forward.hopper else "mma.sync"
    name = forward.name
    if forward.hopper and shape is None and head_dim in _HOPPER_FORWARD_OTHER:
        name += f" or {_HOPPER_FORWARD_OTHER[head_dim][0].name} (by shape)"
    return f"forward {name}, backward {backward.name} ({kind})"


def _builds(head_dim: int, hopper: bool, shape: tuple | None = None) -> tuple:
    """(forward build, backward build) for this head dim on this GPU. `shape` = (batch · heads, query_len,
    key_len, multiprocessors) chooses between the Hopper forward builds; without it, _HOPPER_FORWARD's."""
    hopper = hopper and head_dim in wgmma_head_dims()
    forward = _HOPPER_FORWARD.get(head_dim) if hopper else None
    backward = _HOPPER_BACKWARD.get(head_dim) if hopper else None
    if forward is not None and shape is not None and head_dim in _HOPPER_FORWARD_OTHER:
        other, relative_cost = _HOPPER_FORWARD_OTHER[head_dim]
        other_load = max(forward_loads(*shape, other.block_q), default=0)    # (no items: no work, either build)
        if relative_cost * other_load < max(forward_loads(*shape, forward.block_q), default=0):
            forward = other
    return forward or _FORWARD[head_dim], backward or _BACKWARD[head_dim]


@functools.lru_cache(maxsize=256)
def forward_loads(batch_heads: int, query_len: int, key_len: int, blocks: int, block_q: int) -> tuple:
    """The work of each block of the persistent Hopper forward, in query rows × 128-key tiles: the
    assignment of attention_hopper.cu's work() replayed. Query tiles of block_q rows, aligned to the end of
    the queries (a partial tile first); tile j of a head sees the keys up to its last row (causal,
    bottom-right). Grid min(items, blocks); with more items than blocks, block x takes the pairs
    x, x + grid, … of tiles (q_blocks − 1 − p, p) of one head (a middle tile alone)."""
    q_blocks = -(-query_len // block_q)
    pad = q_blocks * block_q - query_len
    ends = np.minimum(key_len, (np.arange(q_blocks) + 1) * block_q - pad + key_len - query_len)
    tiles = -(-ends // _HOPPER_BLOCK_K) * block_q                       # (q_blocks,) rows × key tiles
    items = batch_heads * q_blocks
    if items <= blocks:                                                 # one item a block
        return tuple(int(t) for t in np.tile(tiles[::-1], batch_heads))
    pairs_per_head = (q_blocks + 1) // 2
    p = np.arange(pairs_per_head)
    pair_work = tiles[q_blocks - 1 - p] + np.where(2 * p + 1 == q_blocks, 0, tiles[p])   # (pairs_per_head,)
    work = np.tile(pair_work, batch_heads)                              # (batch_heads · pairs_per_head,)
    return tuple(int(w) for w in np.bincount(np.arange(work.size) % blocks, weights=work, minlength=blocks))


def _kernel(filename: str, name: str, shared_bytes: int = 0):
    return function(filename, name, shared_bytes=shared_bytes, **_module_of(filename, name))


_NAME_PARTS = re.compile(r"attention_(forward|backward)(_prepare|_convert8|_delta|_dq|_dkdv)?_(bf16|fp16|fp32)"
                         r"(?:_d(\d+))?")
_DTYPE_OF = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _module_of(filename: str, name: str) -> dict:
    """The module holding kernel `name` of `filename`: the arch, and the selection flags (one head dim,
    dtype and part of the file, kernels/select.cuh) that build only the entry points it belongs with; the
    small passes around the backward kernel go in one module per dtype."""
    match = _NAME_PARTS.match(name)
    if match is None:
        raise ValueError(f"no attention kernel is named {name!r}")
    direction, pass_, dtype, head_dim = match.groups()
    part = ("forward" if direction == "forward" else
            "around_backward" if pass_ in ("_prepare", "_convert8", "_delta") else "backward")
    head_dim = 0 if part == "around_backward" else int(head_dim or 0)     # those passes are small: one module
    options = selection(head_dim, _DTYPE_OF[dtype], part)
    if filename == HOPPER_FILE:
        return {"arch": HOPPER_ARCH, "options": options + ("-ftz=true",)}
    return {"arch": None, "options": options}


def modules(head_dim: int, dtype) -> list:
    """The modules ((filename, options, arch) each) that a training step's attention of this head dim and
    dtype launches on the current GPU: forward, backward and the passes around it. For compiler.prefetch."""
    suffix = _SUFFIX.get(dtype_name(dtype))
    if suffix is None or head_dim not in HEAD_DIMS:
        return []
    if suffix == "fp32":
        names = [(FORWARD_FILE, f"attention_forward_fp32_d{head_dim}"), (BACKWARD_FILE, "attention_backward_delta_fp32"),
                 (BACKWARD_FILE, f"attention_backward_dq_fp32_d{head_dim}")]
    else:
        forward, backward = _builds(head_dim, hopper_available())
        names = [(HOPPER_FILE if forward.hopper else FORWARD_FILE, f"attention_forward_{suffix}_d{head_dim}_{forward.name}"),
                 (HOPPER_FILE if backward.hopper else BACKWARD_FILE,
                  f"attention_backward_{suffix}_d{head_dim}_{backward.name}"),
                 (BACKWARD_FILE, f"attention_backward_prepare_{suffix}_d{head_dim}")]
    found = []
    for filename, name in names:
        where = _module_of(filename, name)
        found.append((filename, where["options"], where["arch"]))
    return found


def _hopper_forward_shared_bytes(head_dim: int, build: Build) -> int:
    # 2 Q tiles of block_q rows, 2 K and 3 V tiles of 128 keys, 14 mbarriers (128 bytes), 1 KiB to align the
    # tiles to 1024 bytes
    return (2 * build.block_q + 5 * 128) * head_dim * 2 + 128 + 1024


def _hopper_backward_shared_bytes(head_dim: int, build: Build) -> int:
    block_q, block_k = build.block_q, _HOPPER_BLOCK_K
    tiles = (2 * block_k + 4 * block_q) * head_dim * 2 + block_q * block_k * 2   # K, V; 2 × (Q, dO); dSᵀ
    return tiles + 4 * block_q * 4 + block_q * (head_dim + 8) * 4 + 1024   # L, Δ; the dQ stage; alignment


def _forward_shared_bytes(head_dim: int, block_q: int) -> int:
    # Q tile + two K and two V tiles of 64 rows, rows of D + 8 two-byte elements
    return (block_q + 4 * _FORWARD_BLOCK_K) * (head_dim + 8) * 2


def _backward_shared_bytes(head_dim: int, build: Build) -> int:
    block_k, block_q = 16 * build.m_tiles * build.warps, build.block_q
    tiles = (2 * block_k + 4 * block_q) * (head_dim + 8) * 2          # K, V; Q and dO double-buffered
    return tiles + block_k * (block_q + 8) * 2 + 4 * block_q * 4       # dSᵀ; L and Δ double-buffered


def _dropout_arguments(dropout) -> tuple:
    """The kernel name's suffix and the extra arguments of a dropout build (none for the plain ones)."""
    if dropout is None:
        return "", ()
    base, row_seed, column_seed, threshold, keep_scale = dropout
    return "_dropout", (seed_base(base), np.uint32(row_seed), np.uint32(column_seed), np.uint32(threshold),
                        np.float32(keep_scale))


def _readable(x) -> bool:
    """True when the kernels read or write x (B, heads, T, D) in place: last axis contiguous, start and the
    other strides on 16-byte boundaries, and the offsets inside one (b, h) 32-bit (T · row stride < 2³¹
    elements)."""
    return (x.strides[-1] == x.itemsize and all(stride % 16 == 0 for stride in x.strides[:-1])
            and x.data.ptr % 16 == 0 and x.shape[2] * abs(x.strides[2] // x.itemsize) < 2 ** 31)


def _in_place(x):
    """x itself when the kernels can read it through its strides, else a C-contiguous copy."""
    return x if _readable(x) else contiguous(x)


def _layout(x) -> tuple:
    """The (batch, head, row) strides of a 4-d x in elements: the kernels' layout arguments (the row
    stride an int32)."""
    batch, head, row = (stride // x.itemsize for stride in x.strides[:3])
    return np.int64(batch), np.int64(head), np.int32(row)


def _output(given, shape, dtype, name: str):
    """`given` checked as an output the kernels can write through its strides, or a new array."""
    if given is None:
        return empty(shape, dtype)
    if tuple(given.shape) != tuple(shape) or given.dtype != dtype or not _readable(given):
        raise ValueError(f"causal_attention: {name} must be a {tuple(shape)} {np.dtype(dtype).name} array whose "
                         f"last axis is contiguous, whose start and other strides are multiples of 16 bytes and "
                         f"whose T · row stride is below 2³¹ elements")
    return given


def causal_attention_forward(q, k, v, dropout=None, out=None):
    """out (B, H, Tq, D) in q's dtype and lse (B, H, Tq) float32 of causal grouped-query attention;
    dropout: (base, row_seed, column_seed, threshold, keep_scale) of attention dropout (ops/attention's
    kernel_dropout: base a device uint64 array added to the seed words, or None), or None. q, k, v may
    be strided views (see Layouts); `out`, when given, is written in place and returned."""
    q, k, v = _in_place(q), _in_place(k), _in_place(v)
    batch, heads, query_len, head_dim = q.shape
    kv_heads, key_len = k.shape[1], k.shape[2]
    suffix = _SUFFIX[np.dtype(q.dtype).name]
    out = _output(out, q.shape, q.dtype, "out")
    lse = empty((batch, heads, query_len), np.float32)
    if out.size == 0:
        return out, lse
    args = (q, k, v, out, lse, np.int32(heads), np.int32(kv_heads), np.int32(query_len), np.int32(key_len),
            np.float32(1.0 / math.sqrt(head_dim)))
    layouts = _layout(q) + _layout(k) + _layout(v) + _layout(out)
    variant, extra = _dropout_arguments(dropout)
    if suffix == "fp32":
        _kernel(FORWARD_FILE, f"attention_forward_fp32_d{head_dim}{variant}")(
            ((query_len + 3) // 4, batch * heads), (128,), args + layouts + extra)
        return out, lse
    build, _ = _builds(head_dim, hopper_available(), (batch * heads, query_len, key_len, multiprocessors()))
    if build.hopper:
        items = batch * heads * -(-query_len // build.block_q)   # persistent: at most one block a multiprocessor
        shared = _hopper_forward_shared_bytes(head_dim, build)
        _kernel(HOPPER_FILE, f"attention_forward_{suffix}_d{head_dim}_{build.name}{variant}", shared)(
            (min(items, multiprocessors()),), (128 * (build.block_q // 64 + 1),),
            args + (np.int32(batch),) + layouts + extra, shared_mem=shared)
    else:
        block_q = 16 * build.m_tiles * build.warps
        shared = _forward_shared_bytes(head_dim, block_q)
        grid = ((query_len + block_q - 1) // block_q, batch * heads)
        _kernel(FORWARD_FILE, f"attention_forward_{suffix}_d{head_dim}_{build.name}{variant}", shared)(
            grid, (32 * build.warps,), args + layouts + extra, shared_mem=shared)
    return out, lse


def causal_attention_backward(dy, q, k, v, out, lse, dropout=None, dq=None, dk=None, dv=None):
    """dq, dk, dv of causal grouped-query attention (dk, dv summed over each kv head's query heads);
    dropout: the forward's (base, row_seed, column_seed, threshold, keep_scale), or None. dy, q, k, v, out
    may be strided views (see Layouts); dq, dk, dv, when given, are written in place and returned."""
    dy = _in_place(dy.astype(q.dtype, copy=False))
    q, k, v, out = (_in_place(a) for a in (q, k, v, out))
    lse = contiguous(lse)
    batch, heads, query_len, head_dim = q.shape
    kv_heads, key_len = k.shape[1], k.shape[2]
    suffix = _SUFFIX[np.dtype(q.dtype).name]
    sizes = (np.int32(heads), np.int32(kv_heads), np.int32(query_len), np.int32(key_len),
             np.float32(1.0 / math.sqrt(head_dim)))
    variant, extra = _dropout_arguments(dropout)
    dq = _output(dq, q.shape, q.dtype, "dq")
    dk, dv = _output(dk, k.shape, k.dtype, "dk"), _output(dv, v.shape, v.dtype, "dv")
    if q.size == 0:                                       # no query sees a key: dk = dv = 0
        dk[...] = 0
        dv[...] = 0
        return dq, dk, dv
    layouts = _layout(q) + _layout(k) + _layout(v) + _layout(dy) + _layout(dq) + _layout(dk) + _layout(dv)
    row_layouts = (np.int32(heads), np.int32(query_len)) + _layout(dy) + _layout(out)   # where Δ's rows lie
    rows = batch * heads * query_len
    delta = empty((batch, heads, query_len), np.float32)
    if suffix == "fp32":
        # Δ = rowsum(dO ∘ O): one warp per row
        _kernel(BACKWARD_FILE, "attention_backward_delta_fp32")(
            ((rows + 7) // 8,), (256,), (dy, out, delta, np.int32(rows), np.int32(head_dim)) + row_layouts)
        _kernel(BACKWARD_FILE, f"attention_backward_dq_fp32_d{head_dim}{variant}")(
            ((query_len + 3) // 4, batch * heads), (128,), (q, k, v, dy, lse, delta, dq) + sizes + layouts + extra)
        _kernel(BACKWARD_FILE, f"attention_backward_dkdv_fp32_d{head_dim}{variant}")(
            ((key_len + 3) // 4, batch * kv_heads), (128,),
            (q, k, v, dy, lse, delta, dk, dv) + sizes + layouts + extra)
        return dq, dk, dv
    # Δ = rowsum(dO ∘ O) and dq_accumulator = 0, one pass (D / 8 threads a row)
    dq_accumulator = empty(q.shape, np.float32)
    _kernel(BACKWARD_FILE, f"attention_backward_prepare_{suffix}_d{head_dim}")(
        ((rows * (head_dim // 8) + 255) // 256,), (256,), (dy, out, delta, dq_accumulator, np.int32(rows))
        + row_layouts)
    _, build = _builds(head_dim, hopper_available())
    arrays = (q, k, v, dy, lse, delta, dq_accumulator, dk, dv)
    if build.hopper:
        shared = _hopper_backward_shared_bytes(head_dim, build)
        key_blocks = (key_len + _HOPPER_BLOCK_K - 1) // _HOPPER_BLOCK_K
        _kernel(HOPPER_FILE, f"attention_backward_{suffix}_d{head_dim}_{build.name}{variant}", shared)(
            (batch * kv_heads * key_blocks,), (384,), arrays + sizes + (np.int32(_HOPPER_BACKWARD_CHUNK),) + layouts
            + extra, shared_mem=shared)
    else:
        shared = _backward_shared_bytes(head_dim, build)
        block_k = 16 * build.m_tiles * build.warps
        grid = ((key_len + block_k - 1) // block_k, batch * kv_heads)
        _kernel(BACKWARD_FILE, f"attention_backward_{suffix}_d{head_dim}_{build.name}{variant}", shared)(
            grid, (32 * build.warps,), arrays + sizes + layouts + extra, shared_mem=shared)
    count8 = q.size // 8                                  # D is a multiple of 8
    _kernel(BACKWARD_FILE, f"attention_backward_convert8_{suffix}")(
        (min((count8 + 255) // 256, 8192),), (256,),
        (dq_accumulator, dq, np.int64(count8), np.int32(heads), np.int32(query_len), np.int32(head_dim))
        + _layout(dq))
    return dq, dk, dv


DECODE_FILE = "attention_decode.cu"
DECODE_THREADS = 128                                # THREADS in attention_decode.cu


def decode_supports(k_store, v_store) -> bool:
    """The decoding kernel handles these cache stores: float32 CuPy arrays (S, Hkv, max_len, D), C-contiguous,
    16-byte aligned, one shape, D a multiple of 4 and at most 256."""
    return (all_on_gpu(k_store, v_store) and k_store.dtype == np.float32 == v_store.dtype
            and k_store.ndim == 4 and k_store.shape == v_store.shape and k_store.shape[-1] % 4 == 0
            and k_store.shape[-1] <= 2 * DECODE_THREADS and k_store.flags.c_contiguous and v_store.flags.c_contiguous
            and k_store.data.ptr % 16 == 0 and v_store.data.ptr % 16 == 0)


def decode_attention(q, k_store, v_store, slots, starts, out):
    """One decoding step (kernels/attention_decode.cu): out[b] = attention of q[b] (H, D) over keys
    0 … starts[b] of cache row slots[b], whose new key and value are already stored.

    q: (B, H, D) float32 with a contiguous last axis (any strides for B and H); k_store, v_store: (S, Hkv,
    max_len, D) (decode_supports); slots, starts: (B,) int64 CuPy arrays (read on the device: nothing here
    reads them back, so the launch can be captured in a CUDA graph); out: (B, H·D) float32, C-contiguous.
    Returns out.
    """
    batch, heads, head_dim = q.shape
    kv_heads, max_len = k_store.shape[1], k_store.shape[2]
    if q.dtype != np.float32 or q.strides[-1] != 4 or out.shape != (batch, heads * head_dim) \
            or out.dtype != np.float32 or not out.flags.c_contiguous or head_dim != k_store.shape[-1]:
        raise ValueError("decode_attention: q (B, H, D) float32 with a contiguous last axis and out (B, H·D) "
                         "float32 C-contiguous are needed, D the stores' head dim")
    if batch:
        shared = (head_dim + DECODE_THREADS + 32) * 4
        function(DECODE_FILE, "decode_attention_f32")(
            (heads, batch), (DECODE_THREADS,),
            (q, k_store, v_store, slots, starts, out, np.int32(heads), np.int32(kv_heads), np.int32(max_len),
             np.int32(head_dim), np.int64(q.strides[0] // 4), np.int64(q.strides[1] // 4),
             np.float32(1.0 / math.sqrt(head_dim))), shared_mem=shared)
    return out
