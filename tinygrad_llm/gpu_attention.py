"""Flash attention on the GPU: causal grouped-query attention without the T×T matrix in memory.

Launches the kernels of kernels/attention_forward.cu and kernels/attention_backward.cu (their headers
give the algorithm, tiles, launch layout and shared memory) for `tinygrad_llm.ops.attention.
CausalAttention`, which is also their reference. `tinygrad_llm.gpu` re-exports the two entry points and
asks `supports` before dispatching here.

    causal_attention_forward(q, k, v) -> (out, lse)
    causal_attention_backward(dy, q, k, v, out, lse) -> (dq, dk, dv)

Shapes: q, out, dy, dq (B, H, Tq, D); k, v, dk, dv (B, Hkv, Tk, D) with Hkv | H and Tq ≤ Tk (the causal
mask is aligned bottom-right, so a KV-cached decoding step with Tq = 1 works); lse (B, H, Tq) float32.

On an H100/H200 (compute capability 9.0) head dim 64 takes the wgmma builds of
kernels/attention_hopper.cu ("wg2"), compiled for sm_90a; other GPUs and head dim 128 take the mma.sync
builds, which run on any GPU from sm_80 on.

Precision: bfloat16 and float16 inputs run on tensor cores (wgmma or mma.sync) with float32 accumulation; out,
dq, dk, dv come back in the input dtype, lse in float32 (dq is accumulated in a float32 buffer by
atomics, then cast). float32 inputs take plain-FMA kernels (slow: for checking, and for float32 models).

Simplifications: head dims 64 and 128 only; inputs are made C-contiguous and 16-byte aligned (a copy
when they are not); dk and dv are summed over the query heads of a group inside one thread block, while
dq is summed over key blocks with float32 atomics, so dq's last bits can vary from run to run (dk and dv
cannot).
"""
from __future__ import annotations

import math
import re

import numpy as np

from . import backend

FORWARD_FILE = "attention_forward.cu"
BACKWARD_FILE = "attention_backward.cu"
HOPPER_FILE = "attention_hopper.cu"        # wgmma builds, sm_90a only
HOPPER_ARCH = "sm_90a"
HEAD_DIMS = (64, 128)
_SUFFIX = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
_TENSOR_CORE_DTYPES = ("bf16", "fp16")
# Which build of each tensor-core kernel runs, by head dim: "w<warps>[m<m-tiles>]". Forward: a warp owns
# 16·m query rows (w4: 64-row tiles, w8: 128, w4m2: 4 warps × 32 rows = 128, each K/V fragment serving
# two m-tiles). Backward: a warp owns 16·m keys (w4: 64-key tiles, w8: 128, w4m2q32: 4 warps × 32 keys),
# and a step takes 64 query rows at D = 64, 32 at D = 128, or q<rows>. Chosen by timing on an H200
# (benchmarks/gpu_attention.py --sweep, 2026-11-22, last in device call 5 for D = 64 backward w4m2q32p;
# benchmarks/RESULTS.md). Tests run every build.
# Suffixes: k<keys> = forward K/V tile of that many keys (64 otherwise); r = forward re-reads Q from shared
# memory each K tile; p = backward holds Pᵀ as 16-bit fragments after dV (fewer registers).
# Hopper builds (kernels/attention_hopper.cu: wgmma, sm_90a). wg2: forward persistent, 2 warpgroups × 64
# query rows, 128-key tiles; backward 2 compute warpgroups × 64 keys with 64-row steps plus a warpgroup
# that adds dQ. wq: backward with the queries as M (128-row steps, S and dP as m64n128k16, P and dS through
# shared memory), 3–5 % faster than wg2's. wg2/wq: 0.408 ms forward+backward at B16 H12 T1024 D64 bf16 on
# an H200 against w4m2/w4m2q32p's 0.546 (benchmarks/RESULTS.md, session 2). They need compute capability
# 9.0; elsewhere the PORTABLE_*_VARIANT of the same head dim runs instead.
FORWARD_VARIANT = {64: "wg2", 128: "w8"}
BACKWARD_VARIANT = {64: "wq", 128: "w4"}
PORTABLE_FORWARD_VARIANT = {64: "w4m2", 128: "w8"}
PORTABLE_BACKWARD_VARIANT = {64: "w4m2q32p", 128: "w4"}
HOPPER_VARIANTS = ("wg2", "wq")
FORWARD_VARIANTS = {64: ("w4", "w8", "w4m2", "w4m2k32", "w4m2k32r", "wg2"), 128: ("w4", "w8")}
BACKWARD_VARIANTS = {64: ("w4", "w8", "w4q32", "w4m2q32", "w4m2q32p", "w8m2q32p", "wg2", "wq"),
                     128: ("w4", "w8")}
_TILE = 128 * 128                                    # bytes of a 128-row tile of D = 64 two-byte values
_HOPPER_SHARED_BYTES = {                             # each with 1 KiB to align the tiles to 1024 bytes
    ("forward", "wg2"): 6 * _TILE + 1024,            # 2 × Q, 2 × K, 2 × V
    # K, V, 2 × (Q, dO), dSᵀ, L, Δ, 2 × staged dQ (64 rows of 72 floats)
    ("backward", "wg2"): 2 * _TILE + 4 * _TILE // 2 + _TILE + 4 * 64 * 4 + 2 * 64 * 72 * 4 + 1024,
    # K, V, 2 × (Q, dO) of 128 rows, P and dS (128 × 128), L, Δ, one staged dQ (128 rows of 72 floats)
    ("backward", "wq"): 2 * _TILE + 4 * _TILE + 4 * _TILE + 4 * 128 * 4 + 128 * 72 * 4 + 1024,
}
_VARIANT_NAME = re.compile(r"w(\d+)(?:m(\d+))?(?:q(\d+))?(?:k(\d+))?r?p?")
_BLOCK_K_FORWARD = 64
_BLOCK_Q_BACKWARD = {64: 64, 128: 32}
_kernels: dict = {}
POISON_OUTPUTS = False   # tests set this: every output buffer starts as NaN, so an unwritten element shows
_NAN_BITS = {"bf16": (np.uint16, 0x7FC0), "fp16": (np.uint16, 0x7E00), "fp32": (np.uint32, 0x7FC00000)}


def _suffix(array) -> str | None:
    return _SUFFIX.get(np.dtype(array.dtype).name)


def supports(*arrays) -> bool:
    """True when the kernels handle these arrays: (q, k, v) or any set of them, all CuPy arrays of one
    dtype among bfloat16, float16 and float32, 4-d, with head dim 64 or 128. A leading op name (as
    `tinygrad_llm.gpu.supports` passes it) is ignored."""
    if arrays and isinstance(arrays[0], str):
        arrays = arrays[1:]
    if not arrays or not all(backend.is_cupy_array(a) for a in arrays):
        return False
    dtypes = {np.dtype(a.dtype) for a in arrays}
    if len(dtypes) != 1 or _SUFFIX.get(dtypes.pop().name) is None:
        return False
    return all(a.ndim == 4 and a.shape[-1] in HEAD_DIMS for a in arrays)


_device_facts: dict = {}   # device id -> (compute capability, multiprocessor count), asked once a device


def _facts() -> tuple:
    device = backend.cupy_module().cuda.Device()
    facts = _device_facts.get(device.id)
    if facts is None:
        facts = _device_facts[device.id] = (backend.device_compute_capability(),
                                            device.attributes["MultiProcessorCount"])
    return facts


def hopper_available() -> bool:
    """True on a GPU of compute capability 9.0 (H100, H200), where the sm_90a wgmma builds run."""
    return _facts()[0] == "90"


def _multiprocessors() -> int:
    """The current GPU's streaming-multiprocessor count (the persistent kernels' grid)."""
    return _facts()[1]


def _pick(table: dict, portable: dict, head_dim: int) -> str:
    """The build `table` names for this head dim, or the portable one when it is a Hopper build and the
    GPU is not a Hopper."""
    variant = table[head_dim]
    if variant in HOPPER_VARIANTS and not hopper_available():
        return portable[head_dim]
    return variant


def _kernel(filename: str, name: str, shared_bytes: int = 0):
    """A kernel of one of the files, compiled on first use (through the shared loader of
    tinygrad_llm.gpu; attention_hopper.cu for sm_90a), with its dynamic shared-memory limit raised when it
    needs more than 48 KB."""
    key = (filename, name)
    kernel = _kernels.get(key)
    if kernel is None:
        from .gpu import load_module   # imported here: gpu imports this module
        arch = HOPPER_ARCH if filename == HOPPER_FILE else None
        kernel = load_module(filename, arch=arch).get_function(name)
        if shared_bytes > 48 * 1024:
            kernel.max_dynamic_shared_size_bytes = shared_bytes
        _kernels[key] = kernel
    return kernel


def _allocate(shape, dtype):
    """An output buffer: uninitialised, or NaN everywhere when POISON_OUTPUTS is set."""
    cp = backend.cupy_module()
    array = cp.empty(shape, dtype=dtype)
    if POISON_OUTPUTS:
        bits, pattern = _NAN_BITS[_SUFFIX[np.dtype(dtype).name]]
        array.view(bits).fill(pattern)
    return array


def _contiguous(x):
    """x as a C-contiguous array starting on a 16-byte boundary (the kernels copy 16-byte vectors)."""
    if x.flags.c_contiguous and x.data.ptr % 16 == 0:
        return x
    copy = backend.cupy_module().empty(x.shape, dtype=x.dtype)
    copy[...] = x
    return copy


def _variant_parts(variant: str) -> tuple:
    """(warps, m tiles, q<rows> or None, k<keys> or None) of a build name: "w4m2q32p" -> (4, 2, 32, None)."""
    match = _VARIANT_NAME.fullmatch(variant)
    if match is None:
        raise ValueError(f"unknown attention build {variant!r}")
    warps, m_tiles, rows, keys = match.groups()
    return int(warps), int(m_tiles or 1), rows and int(rows), keys and int(keys)


def _warps_and_m_tiles(variant: str) -> tuple:
    """"w4m2" -> (4, 2); "w8" -> (8, 1); "w4q32" -> (4, 1); "w4m2k32r" -> (4, 2)."""
    return _variant_parts(variant)[:2]


def _backward_block_q(variant: str, head_dim: int) -> int:
    """Query rows per backward step: 64 at D = 64, 32 at D = 128, or what a "q<rows>" suffix says."""
    return _variant_parts(variant)[2] or _BLOCK_Q_BACKWARD[head_dim]


def _forward_block_k(variant: str) -> int:
    """Keys per forward K/V tile: 64, or what a "k<keys>" suffix says."""
    return _variant_parts(variant)[3] or _BLOCK_K_FORWARD


def _forward_shared_bytes(head_dim: int, block_q: int, block_k: int = _BLOCK_K_FORWARD) -> int:
    # Q tile + two K and two V tiles of block_k rows, rows of D + 8 two-byte elements
    return (block_q + 4 * block_k) * (head_dim + 8) * 2


def _backward_shared_bytes(head_dim: int, warps: int, m_tiles: int, block_q: int) -> int:
    block_k = 16 * m_tiles * warps
    tiles = (2 * block_k + 4 * block_q) * (head_dim + 8) * 2          # K, V; Q and dO double-buffered
    return tiles + block_k * (block_q + 8) * 2 + 4 * block_q * 4       # dSᵀ; L and Δ double-buffered


def causal_attention_forward(q, k, v):
    """out (B, H, Tq, D) in q's dtype and lse (B, H, Tq) float32 of causal grouped-query attention."""
    cp = backend.cupy_module()
    q, k, v = _contiguous(q), _contiguous(k), _contiguous(v)
    batch, heads, query_len, head_dim = q.shape
    kv_heads, key_len = k.shape[1], k.shape[2]
    suffix = _suffix(q)
    out = _allocate(q.shape, q.dtype)
    lse = _allocate((batch, heads, query_len), cp.float32)
    if out.size == 0:
        return out, lse
    args = (q, k, v, out, lse, np.int32(heads), np.int32(kv_heads), np.int32(query_len), np.int32(key_len),
            np.float32(1.0 / math.sqrt(head_dim)))
    variant = _pick(FORWARD_VARIANT, PORTABLE_FORWARD_VARIANT, head_dim)
    if suffix in _TENSOR_CORE_DTYPES and variant in HOPPER_VARIANTS:
        shared = _HOPPER_SHARED_BYTES["forward", variant]
        items = batch * heads * ((query_len + 127) // 128)      # persistent: at most one block a multiprocessor
        _kernel(HOPPER_FILE, f"attention_forward_{suffix}_d{head_dim}_{variant}", shared)(
            (min(items, _multiprocessors()),), (256,), args + (np.int32(batch),), shared_mem=shared)
    elif suffix in _TENSOR_CORE_DTYPES:
        warps, m_tiles = _warps_and_m_tiles(variant)
        block_q = 16 * m_tiles * warps
        shared = _forward_shared_bytes(head_dim, block_q, _forward_block_k(variant))
        grid = ((query_len + block_q - 1) // block_q, batch * heads)
        _kernel(FORWARD_FILE, f"attention_forward_{suffix}_d{head_dim}_{variant}", shared)(
            grid, (32 * warps,), args, shared_mem=shared)
    else:
        _kernel(FORWARD_FILE, f"attention_forward_fp32_d{head_dim}")(
            ((query_len + 3) // 4, batch * heads), (128,), args)
    return out, lse


def causal_attention_backward(dy, q, k, v, out, lse):
    """dq, dk, dv of causal grouped-query attention (dk, dv summed over each kv head's query heads)."""
    cp = backend.cupy_module()
    dy = _contiguous(dy.astype(q.dtype, copy=False))
    q, k, v, out, lse = (_contiguous(a) for a in (q, k, v, out, lse))
    batch, heads, query_len, head_dim = q.shape
    kv_heads, key_len = k.shape[1], k.shape[2]
    suffix = _suffix(q)
    scale = np.float32(1.0 / math.sqrt(head_dim))
    sizes = (np.int32(heads), np.int32(kv_heads), np.int32(query_len), np.int32(key_len), scale)
    dk = _allocate(k.shape, k.dtype)
    dv = _allocate(v.shape, v.dtype)
    if q.size == 0:
        return cp.empty(q.shape, dtype=q.dtype), cp.zeros(k.shape, k.dtype), cp.zeros(v.shape, v.dtype)

    rows = batch * heads * query_len
    delta = _allocate((batch, heads, query_len), cp.float32)
    if suffix in _TENSOR_CORE_DTYPES:
        # Δ = rowsum(dO ∘ O) and dq_accumulator = 0, one pass (8 threads a row)
        dq_accumulator = _allocate(q.shape, cp.float32)
        _kernel(BACKWARD_FILE, f"attention_backward_prepare_{suffix}_d{head_dim}")(
            ((rows * 8 + 255) // 256,), (256,), (dy, out, delta, dq_accumulator, np.int32(rows)))
        variant = _pick(BACKWARD_VARIANT, PORTABLE_BACKWARD_VARIANT, head_dim)
        arrays = (q, k, v, dy, lse, delta, dq_accumulator, dk, dv)
        if variant in HOPPER_VARIANTS:
            shared = _HOPPER_SHARED_BYTES["backward", variant]
            _kernel(HOPPER_FILE, f"attention_backward_{suffix}_d{head_dim}_{variant}", shared)(
                (batch * kv_heads * ((key_len + 127) // 128),), (384,), arrays + sizes, shared_mem=shared)
        else:
            warps, m_tiles = _warps_and_m_tiles(variant)
            shared = _backward_shared_bytes(head_dim, warps, m_tiles, _backward_block_q(variant, head_dim))
            block_k = 16 * m_tiles * warps
            grid = ((key_len + block_k - 1) // block_k, batch * kv_heads)
            _kernel(BACKWARD_FILE, f"attention_backward_{suffix}_d{head_dim}_{variant}", shared)(
                grid, (32 * warps,), arrays + sizes, shared_mem=shared)
        dq = _allocate(q.shape, q.dtype)
        count8 = q.size // 8                                  # D is a multiple of 8
        _kernel(BACKWARD_FILE, f"attention_backward_convert8_{suffix}")(
            (min((count8 + 255) // 256, 8192),), (256,), (dq_accumulator, dq, np.int64(count8)))
    else:
        # Δ = rowsum(dO ∘ O): one warp per row
        _kernel(BACKWARD_FILE, "attention_backward_delta_fp32")(
            ((rows + 7) // 8,), (256,), (dy, out, delta, np.int32(rows), np.int32(head_dim)))
        dq = _allocate(q.shape, q.dtype)
        _kernel(BACKWARD_FILE, f"attention_backward_dq_fp32_d{head_dim}")(
            ((query_len + 3) // 4, batch * heads), (128,), (q, k, v, dy, lse, delta, dq) + sizes)
        _kernel(BACKWARD_FILE, f"attention_backward_dkdv_fp32_d{head_dim}")(
            ((key_len + 3) // 4, batch * kv_heads), (128,), (q, k, v, dy, lse, delta, dk, dv) + sizes)
    return dq, dk, dv
