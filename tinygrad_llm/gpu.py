"""The fused CUDA kernels and the answer to "is there a kernel for this?".

`backend.kernel(op_name, *arrays)` imports this module once GPU arrays exist and asks `supports(op_name,
*arrays)`; when the answer is yes the op calls one of the functions below, otherwise it runs its
NumPy-expressed path on the CuPy arrays, which is also the reference every kernel is tested against.

Kernel sources live in kernels/*.cu (one computation per file; each header states what it computes, the
shapes, the launch layout and the NumPy op it must match). `load_module(filename)` compiles a file with
NVRTC through `cupy.RawModule` the first time it is needed and caches the module for the process.

Simplifications: float32, bfloat16 and float16 arrays only (math in float32 inside every kernel); arrays
are made C-contiguous before a launch (a copy when they are not already); one CUDA device, the current
stream. Sizes are passed as 32-bit or 64-bit integers as each kernel's header says.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path

import numpy as np

from . import backend

# ------------------------------------------------------------------ compiling and caching kernel files
_modules: dict = {}
_THIS_DIR = Path(__file__).resolve().parent


def kernels_dir() -> Path:
    """The folder holding the *.cu files: inside the installed package, or <repo>/kernels for an editable
    install or a source checkout. TINYGRAD_LLM_KERNELS_DIR overrides both."""
    override = os.environ.get("TINYGRAD_LLM_KERNELS_DIR")
    candidates = ([Path(override)] if override else []) + [_THIS_DIR / "kernels", _THIS_DIR.parent / "kernels"]
    for folder in candidates:
        if folder.is_dir() and any(folder.glob("*.cu")):
            return folder
    raise FileNotFoundError(f"no kernels/*.cu found in any of {[str(c) for c in candidates]}")


def load_module(filename: str, options=(), arch: str | None = None):
    """Compile kernels/<filename> with NVRTC at first use; the same module afterwards.

    `options` are extra NVRTC flags (e.g. ("-DBLOCK=128",)); -std=c++17 is always given. A line
    `#include "name"` naming a file of the kernels folder is replaced by that file's text before
    compiling, so shared headers (kernels/common.cuh) work under NVRTC as under `nvcc -I kernels`, and
    the on-disk caches, keyed by the source text, see a header's edits.

    `arch=None` compiles through cupy.RawModule for the device's own architecture (CuPy caches the
    result on disk). An explicit target such as "sm_90a" (needed for wgmma) compiles through
    `backend.compile_cubin` instead; the cubin is cached under <cache>/cubin/ (the cache root of
    tinygrad_llm.data.corpus.cache_dir), keyed by the source, the options and NVRTC's version.
    """
    key = (filename, tuple(options), arch)
    module = _modules.get(key)
    if module is None:
        source = _source_with_includes(kernels_dir(), filename, set())
        if arch is None:
            cp = backend.cupy_module()
            module = cp.RawModule(code=source, options=("-std=c++17",) + tuple(options))
            module.compile()                   # compile now so a broken kernel fails here, not mid-step
        else:
            module = backend.load_cubin_module(str(_cached_cubin(filename, source, options, arch)))
        _modules[key] = module
    return module


def _cached_cubin(filename: str, source: str, options, arch: str) -> Path:
    """The cubin of `source` for `arch`, compiled once and then read from the disk cache."""
    import hashlib
    from .data.corpus import cache_dir
    flags = ("-std=c++17", f"-arch={arch}", "-ftz=true") + tuple(options)
    digest = hashlib.sha256(repr((source, flags, backend.nvrtc_version())).encode()).hexdigest()[:32]
    folder = Path(cache_dir()) / "cubin"
    path = folder / f"{Path(filename).stem}-{arch}-{digest}.cubin"
    if not path.is_file():
        cubin = backend.compile_cubin(source, filename, flags)
        folder.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.partial")
        partial.write_bytes(cubin)
        os.replace(partial, path)             # atomic: a concurrent reader sees the whole file or none
    return path


_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$', re.MULTILINE)


def _source_with_includes(folder: Path, filename: str, seen: set) -> str:
    """The file's text with its local #include "..." lines inlined (each header once)."""
    def inline(match):
        name = match.group(1)
        if not (folder / name).is_file():
            return match.group(0)
        if name in seen:
            return ""
        seen.add(name)
        return _source_with_includes(folder, name, seen).replace("#pragma once", "")
    return _INCLUDE.sub(inline, (folder / filename).read_text())


_functions: dict = {}


def _function(filename: str, name: str):
    """One kernel of a kernels/*.cu file (a cupy RawKernel), cached."""
    kernel = _functions.get((filename, name))
    if kernel is None:
        kernel = _functions[(filename, name)] = load_module(filename).get_function(name)
    return kernel


# ------------------------------------------------------------------ dtype helpers
_SUFFIX = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}


def _suffix(dtype) -> str | None:
    return _SUFFIX.get(np.dtype(dtype).name)


def _float_kind(*arrays) -> bool:
    return all(_suffix(a.dtype) is not None for a in arrays)


def _same_dtype(*arrays) -> bool:
    return len({np.dtype(a.dtype) for a in arrays}) == 1


def _contiguous(x):
    return x if x.flags.c_contiguous else backend.cupy_module().ascontiguousarray(x)


_THREADS = 256
_device_info: dict = {}
POISON_OUTPUTS = False      # tests set this: every output buffer starts as NaN, so an unwritten element shows


def _empty(shape, dtype):
    """An output buffer: uninitialised, or all NaN when POISON_OUTPUTS is set."""
    cp = backend.cupy_module()
    out = cp.empty(shape, dtype=dtype)
    if POISON_OUTPUTS:
        out.view(f"u{out.itemsize}").fill(_NAN_BITS[out.itemsize])
    return out


_NAN_BITS = {2: 0xFFFF, 4: 0xFFFFFFFF}      # all ones: a NaN in float32, bfloat16 and float16


def _multiprocessors() -> int:
    if "sm" not in _device_info:
        cp = backend.cupy_module()
        _device_info["sm"] = cp.cuda.Device().attributes["MultiProcessorCount"]
    return _device_info["sm"]


def available() -> bool:
    """True when CuPy and a CUDA device are usable (the kernels compile at first use)."""
    return backend.gpu_available()


# ------------------------------------------------------------------ what has a kernel
_RMS_NORM_MAX_CHANNELS = 8192          # dweight partial sums of one block live in shared memory


def supports(op_name: str, *arrays) -> bool:
    """Whether a kernel exists for `op_name` and these arrays (dtype and shape; all must be on the GPU).

    The answer depends only on dtypes and shapes, so forward and backward of one op agree.
    """
    if not all(backend.is_cupy_array(a) for a in arrays):
        return False
    if op_name == "rms_norm":                     # (x, weight) or (dy, weight)
        x, weight = arrays
        return (_float_kind(x, weight) and weight.ndim == 1 and x.ndim >= 1 and x.shape[-1] == weight.shape[0]
                and 0 < weight.shape[0] <= _RMS_NORM_MAX_CHANNELS
                and (_same_dtype(x, weight) or np.dtype(weight.dtype) == np.float32))
    if op_name == "swiglu":                       # (gate, up)
        gate, up = arrays
        return _float_kind(gate, up) and _same_dtype(gate, up) and gate.shape == up.shape
    if op_name == "swiglu_packed":                # (gate_up,) = [gate | up] along the last axis
        (gate_up,) = arrays
        return _float_kind(gate_up) and gate_up.ndim >= 1 and gate_up.shape[-1] % 2 == 0
    if op_name == "dropout":                      # (x,)
        (x,) = arrays
        return _float_kind(x)
    if op_name == "rope":                         # (x,) or (dy,)
        (x,) = arrays
        return _float_kind(x) and x.ndim == 4 and x.shape[-1] % 2 == 0
    if op_name == "cross_entropy":                # (logits2d,)
        (logits,) = arrays
        return _float_kind(logits) and logits.ndim == 2 and logits.shape[1] > 0
    if op_name == "embedding":                    # (dy,)
        (dy,) = arrays
        return _float_kind(dy) and dy.ndim >= 1
    if op_name == "adamw":                        # every param, grad, m, v
        return all(np.dtype(a.dtype) == np.float32 for a in arrays)
    if op_name == "linear":                       # (x, weight) under a bf16/fp16 precision policy
        from . import precision
        return precision.linear_supported(*arrays)
    if op_name == "causal_attention":
        attention = _attention_module()
        return attention is not None and bool(attention.supports(op_name, *arrays))
    return False


def _attention_module():
    """tinygrad_llm.gpu_attention (the flash-attention kernels) when it exists and imports, else None."""
    if "attention" not in _device_info:
        try:
            from . import gpu_attention
        except Exception:      # not written yet, or broken: attention takes the NumPy path
            gpu_attention = None
        _device_info["attention"] = gpu_attention
    return _device_info["attention"]


# ------------------------------------------------------------------ RMSNorm
def rms_norm_forward(x, weight, eps):
    """y = x · r · w with r = 1/√(mean(x², −1) + eps).  Returns (y, r): y in x's dtype, r (..., 1) float32.

    With bf16/fp16 x and float32 w (master weights), y keeps x's dtype (the activation dtype).
    """
    x = _contiguous(x)
    weight = _contiguous(weight)
    channels = x.shape[-1]
    rows = x.size // channels
    y = _empty(x.shape, x.dtype)
    r = _empty(x.shape[:-1] + (1,), np.float32)
    if rows:
        warps_per_block = 8
        blocks = (rows + warps_per_block - 1) // warps_per_block
        _function("rms_norm.cu", f"rms_norm_forward_{_suffix(x.dtype)}_{_suffix(weight.dtype)}")(
            (blocks,), (32 * warps_per_block,),
            (x, weight, y, r, np.int32(rows), np.int32(channels), np.float32(eps)))
    return y, r


def rms_norm_backward(dy, x, weight, r):
    """dx = r·(g − x̂·mean(g·x̂)), g = dy·w, x̂ = x·r;  dw = Σ_rows dy·x̂.  dx in x's dtype, dw in w's."""
    cp = backend.cupy_module()
    dy = _contiguous(dy.astype(x.dtype, copy=False))
    x, weight, r = _contiguous(x), _contiguous(weight), _contiguous(r)
    channels = x.shape[-1]
    rows = x.size // channels
    dx = _empty(x.shape, x.dtype)
    if not rows:
        return dx, cp.zeros(channels, dtype=weight.dtype)
    warps_per_block = max(1, min(8, 12288 // channels))          # per-warp dw rows fit in 48 KB
    blocks = max(1, min((rows + warps_per_block - 1) // warps_per_block, 4 * _multiprocessors()))
    partial = _empty((blocks, channels), np.float32)
    _function("rms_norm.cu", f"rms_norm_backward_{_suffix(x.dtype)}_{_suffix(weight.dtype)}")(
        (blocks,), (32 * warps_per_block,),
        (dy, x, weight, r, dx, partial, np.int32(rows), np.int32(channels)),
        shared_mem=warps_per_block * channels * 4)
    dweight = partial.sum(axis=0)                                    # (blocks, C) -> (C,), fixed order
    return dx, dweight.astype(weight.dtype, copy=False)


# ------------------------------------------------------------------ SwiGLU
def _grid(work: int) -> tuple:
    blocks = (work + _THREADS - 1) // _THREADS
    return (max(1, min(blocks, 32 * _multiprocessors())),), (_THREADS,)


def _aligned(*arrays) -> bool:
    return all(a.data.ptr % 16 == 0 for a in arrays)


def _swiglu_launch_forward(gate, up, y, rows, width, in_stride):
    pack = 16 // gate.itemsize
    vectorised = width % pack == 0 and in_stride % pack == 0 and _aligned(gate, up, y)
    work = rows * width // (pack if vectorised else 1)
    if work:
        _function("swiglu.cu", f"swiglu_forward_{_suffix(gate.dtype)}")(
            *_grid(work), (gate, up, y, np.int64(rows), np.int64(width), np.int64(in_stride), np.int64(width),
                           np.int32(vectorised)))


def _swiglu_launch_backward(dy, gate, up, dgate, dup, rows, width, in_stride, grad_stride):
    pack = 16 // gate.itemsize
    vectorised = (width % pack == 0 and in_stride % pack == 0 and grad_stride % pack == 0
                  and _aligned(dy, gate, up, dgate, dup))
    work = rows * width // (pack if vectorised else 1)
    if work:
        _function("swiglu.cu", f"swiglu_backward_{_suffix(gate.dtype)}")(
            *_grid(work), (dy, gate, up, dgate, dup, np.int64(rows), np.int64(width), np.int64(in_stride),
                           np.int64(width), np.int64(grad_stride), np.int32(vectorised)))


def swiglu_forward(gate, up):
    """y = silu(gate) · up, in gate's dtype."""
    gate, up = _contiguous(gate), _contiguous(up)
    y = _empty(gate.shape, gate.dtype)
    width = gate.shape[-1] if gate.ndim else 1
    _swiglu_launch_forward(gate, up, y, gate.size // max(width, 1), width, width)
    return y


def swiglu_backward(dy, gate, up):
    """(dgate, dup): dgate = dy·up·σ(g)·(1 + g·(1 − σ(g))),  dup = dy·silu(g)."""
    dy, gate, up = _contiguous(dy.astype(gate.dtype, copy=False)), _contiguous(gate), _contiguous(up)
    dgate, dup = _empty(gate.shape, gate.dtype), _empty(gate.shape, gate.dtype)
    width = gate.shape[-1] if gate.ndim else 1
    _swiglu_launch_backward(dy, gate, up, dgate, dup, gate.size // max(width, 1), width, width, width)
    return dgate, dup


def swiglu_packed_forward(gate_up):
    """SwiGLU of a packed projection gate_up (..., 2F) = [gate | up]: y (..., F), no slicing copies."""
    gate_up = _contiguous(gate_up)
    width = gate_up.shape[-1] // 2
    y = _empty(gate_up.shape[:-1] + (width,), gate_up.dtype)
    flat = gate_up.reshape(-1)
    _swiglu_launch_forward(flat, flat[width:], y, gate_up.size // (2 * width) if width else 0, width, 2 * width)
    return y


def swiglu_packed_backward(dy, gate_up):
    """d(gate_up) (..., 2F) = [dgate | dup] for the packed form."""
    gate_up = _contiguous(gate_up)
    dy = _contiguous(dy.astype(gate_up.dtype, copy=False))
    width = gate_up.shape[-1] // 2
    d_gate_up = _empty(gate_up.shape, gate_up.dtype)
    flat, dflat = gate_up.reshape(-1), d_gate_up.reshape(-1)
    rows = gate_up.size // (2 * width) if width else 0
    _swiglu_launch_backward(dy, flat, flat[width:], dflat, dflat[width:], rows, width, 2 * width, 2 * width)
    return d_gate_up


# ------------------------------------------------------------------ dropout
def dropout_forward(x, p, seed):
    """(y, mask): inverted dropout with a stateless counter-based stream (kernels/dropout.cu), mask in
    x's dtype holding 0 or 1/(1 − p). The same seed gives the same mask; the bits differ from NumPy's."""
    x = _contiguous(x)
    y, mask = _empty(x.shape, x.dtype), _empty(x.shape, x.dtype)
    if x.size:
        threshold = min(int(p * 2.0 ** 32), 2 ** 32 - 1)
        _function("dropout.cu", f"dropout_forward_{_suffix(x.dtype)}")(
            *_grid(x.size // (16 // x.itemsize) + 1),
            (x, y, mask, np.int64(x.size), np.uint64(int(seed) & 0xFFFFFFFFFFFFFFFF), np.uint32(threshold),
             np.float32(1.0 / (1.0 - p))))
    return y, mask


# ------------------------------------------------------------------ RoPE
def rope_forward(x, cos, sin, out=None):
    """Rotate-half RoPE of x (B, H, T, D) by cos/sin (T, D/2); the backward is this with −sin.

    x and `out` may be any strided views whose last axis is contiguous (e.g. the (B, T, H, D) ->
    (B, H, T, D) transpose of a packed projection), so the transpose costs no copy. Without `out` the
    result is a new C-contiguous (B, H, T, D) array. `out` may be x itself (in place).
    """
    cp = backend.cupy_module()
    batch, heads, length, head_dim = x.shape
    if x.strides[-1] != x.itemsize:
        x = cp.ascontiguousarray(x)
    cos = _contiguous(cos.astype(x.dtype, copy=False))
    sin = _contiguous(sin.astype(x.dtype, copy=False))
    if out is None:
        out = _empty(x.shape, x.dtype)
    elif out.shape != x.shape or out.dtype != x.dtype or out.strides[-1] != out.itemsize:
        raise ValueError("rope_forward: out must match x's shape and dtype and have a contiguous last axis")
    half = head_dim // 2
    pairs = batch * heads * length * half
    if pairs:
        strides = [s // x.itemsize for s in x.strides[:3]]
        out_strides = [s // out.itemsize for s in out.strides[:3]]
        pack = 16 // x.itemsize
        vectorised = (half % pack == 0 and all(s % pack == 0 for s in strides + out_strides)
                      and _aligned(x, out, cos, sin))
        work = pairs // (pack if vectorised else 1)
        _function("rope.cu", f"rope_{_suffix(x.dtype)}")(
            *_grid(work),
            (x, cos, sin, out, np.int32(heads), np.int32(length), np.int32(half),
             *(np.int64(s) for s in strides), *(np.int64(s) for s in out_strides),
             np.int64(work), np.int32(vectorised)))
    return out


# ------------------------------------------------------------------ cross-entropy
# (kernel kind, threads per block) by logits dtype; benchmarks/gpu.py times the choices. Kinds (see the
# header of kernels/cross_entropy.cu): l2u4 / l2u8 re-read each row from L2 in the second pass with 4 or 8
# loads in flight per thread, l2pu4 is persistent and prefetches the next row into L2, smemu4 / smemu8 keep
# the row in shared memory (rows up to the opt-in limit, ~227 KB on Hopper; l2u4 otherwise).
# Fastest on an H200 for 16384 × 50304 (benchmarks/RESULTS.md, 2026-11-22): fp32 l2u8/1024 1.89 ms,
# bf16 l2u8/512 0.95 ms.
CROSS_ENTROPY_VARIANT = {"float32": ("l2u8", 1024), "bfloat16": ("l2u8", 512), "float16": ("l2u8", 512)}


def cross_entropy_forward_backward(logits, targets, ignore_index=-100, in_place=False, variant=None):
    """Mean cross-entropy over the rows whose target is not ignore_index, and its gradient.

    Returns (loss, dlogits): loss a 0-d array in the logits' dtype (NaN when every row is ignored);
    dlogits = (softmax(logits) − onehot(target)) / count with zero rows for ignored targets, in the logits'
    dtype. With in_place=True dlogits is written over `logits` (no second N×V buffer). No host sync.
    variant: (kind, threads) to override CROSS_ENTROPY_VARIANT.
    """
    cp = backend.cupy_module()
    rows, vocab = logits.shape
    if not logits.flags.c_contiguous:
        logits = cp.ascontiguousarray(logits)
        in_place = True                                   # the copy is ours to overwrite
    targets = _contiguous(targets.astype(cp.int64, copy=False))
    dlogits = logits if in_place else _empty(logits.shape, logits.dtype)
    keep_count = (targets != ignore_index).sum(dtype=cp.float32)          # device scalar
    row_loss = _empty((rows,), np.float32)
    if rows:
        suffix = _suffix(logits.dtype)
        pack = 16 // logits.itemsize
        vectorised = int(vocab % pack == 0 and _aligned(logits, dlogits))
        args = (logits, targets, dlogits, row_loss, keep_count, np.int64(rows), np.int64(vocab),
                np.int64(ignore_index), np.int32(vectorised))
        kind, threads = variant or CROSS_ENTROPY_VARIANT[np.dtype(logits.dtype).name]
        row_bytes = vocab * logits.itemsize
        shared = 0
        if kind.startswith("smem"):
            if row_bytes + 1024 <= _max_shared_bytes():
                shared = row_bytes
            else:
                kind = "l2u4"                             # the row does not fit in shared memory
        grid = rows
        if kind.startswith("l2p"):                        # persistent: as many blocks as stay resident
            grid = min(rows, _multiprocessors() * max(1, 65536 // (threads * 64)))
        kernel = _function("cross_entropy.cu", f"cross_entropy_{kind}_{suffix}")
        if shared > 48 * 1024 and kernel.max_dynamic_shared_size_bytes < shared:
            kernel.max_dynamic_shared_size_bytes = shared
        kernel((grid,), (threads,), args, shared_mem=shared)
    loss = row_loss.sum() / keep_count                    # 0/0 = NaN when every row is ignored
    return loss.astype(logits.dtype), dlogits


def _max_shared_bytes() -> int:
    if "smem" not in _device_info:
        cp = backend.cupy_module()
        _device_info["smem"] = cp.cuda.Device().attributes["MaxSharedMemoryPerBlockOptin"]
    return _device_info["smem"]


# ------------------------------------------------------------------ embedding backward
def embedding_backward(ids, dy, vocab):
    """dweight (V, C) = Σ over positions with ids == v of dy, by float32 atomics; in dy's dtype."""
    cp = backend.cupy_module()
    channels = dy.shape[-1]
    dy2 = _contiguous(dy.reshape(-1, channels))                       # (..., C) -> (N, C)
    ids1 = _contiguous(cp.asarray(ids).reshape(-1).astype(cp.int64, copy=False))   # (...) -> (N,)
    accumulator = cp.zeros((vocab, channels), dtype=cp.float32)
    if ids1.size and channels:
        blocks = max(1, min(ids1.size, 32 * _multiprocessors()))
        _function("embedding.cu", f"embedding_backward_{_suffix(dy.dtype)}")(
            (blocks,), (_THREADS,), (ids1, dy2, accumulator, np.int64(ids1.size), np.int64(channels),
                                     np.int64(vocab)))
    return accumulator.astype(dy.dtype, copy=False)


# ------------------------------------------------------------------ multi-tensor AdamW
_ADAMW_CHUNK = 4096            # elements per block (kernels/adamw.cu's CHUNK)
_chunk_tables: dict = {}
_pointer_tables: dict = {}


def _chunk_table(arrays):
    """Which tensor and first element each block of a multi-tensor launch handles (cached by sizes)."""
    cp = backend.cupy_module()
    key = tuple(a.size for a in arrays)
    table = _chunk_tables.get(key)
    if table is None:
        sizes = np.array(key, dtype=np.int64)
        chunks = (sizes + _ADAMW_CHUNK - 1) // _ADAMW_CHUNK
        block_tensor = np.repeat(np.arange(len(key), dtype=np.int32), chunks)
        block_start = np.concatenate([np.arange(c, dtype=np.int64) * _ADAMW_CHUNK for c in chunks])
        table = (int(chunks.sum()), cp.asarray(sizes), cp.asarray(block_tensor), cp.asarray(block_start))
        _chunk_tables[key] = table
    return table


def _pointers(arrays, cache: bool):
    """A device array of the arrays' data pointers (uint64); cached for buffers that never move."""
    cp = backend.cupy_module()
    key = tuple(a.data.ptr for a in arrays)
    table = _pointer_tables.get(key) if cache else None
    if table is None:
        table = cp.asarray(np.array(key, dtype=np.uint64))
        if cache:
            if len(_pointer_tables) > 64:
                _pointer_tables.clear()
            _pointer_tables[key] = table
    return table


def _check_multi_tensor(*lists):
    count = len(lists[0])
    if any(len(other) != count for other in lists):
        raise ValueError("multi-tensor op: the lists of tensors differ in length")
    for arrays in zip(*lists):
        if any(a.shape != arrays[0].shape or not a.flags.c_contiguous or np.dtype(a.dtype) != np.float32
               for a in arrays):
            raise ValueError("multi-tensor op: each param, grad and moment must be C-contiguous float32 "
                             "of one shape")


def adamw_step(params, grads, exp_avgs, exp_avg_sqs, lr, beta1, beta2, eps, weight_decays, step,
               grad_scale=1.0):
    """One AdamW step for every parameter in a single launch (float32 params, grads and moments).

    For each tensor i, element j, with g = grad · grad_scale (a Python float, or a device float32 scalar
    such as a clipping factor computed on the GPU, so no host sync is needed):
        p ← p · (1 − lr·wd_i);  m ← β₁m + (1−β₁)g;  v ← β₂v + (1−β₂)g²
        p ← p − (lr / (1 − β₁ᵗ)) · m / (√v / √(1 − β₂ᵗ) + eps)              (PyTorch's AdamW)
    Updates params, exp_avgs and exp_avg_sqs in place; `step` is t, counted from 1.
    """
    cp = backend.cupy_module()
    params, grads, exp_avgs, exp_avg_sqs = list(params), list(grads), list(exp_avgs), list(exp_avg_sqs)
    _check_multi_tensor(params, grads, exp_avgs, exp_avg_sqs)
    if len(weight_decays) != len(params):
        raise ValueError("adamw_step: one weight decay per parameter is needed")
    blocks, sizes, block_tensor, block_start = _chunk_table(params)
    if not blocks:
        return
    if backend.is_cupy_array(grad_scale):
        scale = grad_scale.astype(cp.float32, copy=False).reshape(1)
    else:
        scale = cp.full(1, grad_scale, dtype=cp.float32)
    decays = cp.asarray(np.asarray(weight_decays, dtype=np.float32))
    _function("adamw.cu", "adamw_multi_tensor")(
        (blocks,), (256,),
        (_pointers(params, True), _pointers(grads, False), _pointers(exp_avgs, True), _pointers(exp_avg_sqs, True),
         sizes, block_tensor, block_start, decays, scale,
         np.float32(lr), np.float32(beta1), np.float32(beta2), np.float32(eps),
         np.float32(lr / (1.0 - beta1 ** step)), np.float32(1.0 / math.sqrt(1.0 - beta2 ** step))))


def sum_of_squares(arrays):
    """Σ over every array of Σ a² as a float32 device scalar, in one launch (the global gradient norm²)."""
    cp = backend.cupy_module()
    arrays = list(arrays)
    _check_multi_tensor(arrays)
    blocks, sizes, block_tensor, block_start = _chunk_table(arrays)
    if not blocks:
        return cp.zeros((), dtype=cp.float32)
    partial = _empty((blocks,), np.float32)
    _function("adamw.cu", "sum_of_squares_multi_tensor")(
        (blocks,), (256,), (_pointers(arrays, False), sizes, block_tensor, block_start, partial))
    return partial.sum()


# ------------------------------------------------------------------ Linear under a precision policy
def linear_forward(x, weight):
    """(y, x_low, weight_low): the bf16/fp16 cuBLAS GEMM of tinygrad_llm.precision (see there)."""
    from . import precision
    return precision.linear_forward(x, weight)


def linear_backward(dy, x_low, weight_low, dtypes, needs_input_grad=(True, True)):
    """(dx, dweight) from the low-precision operands the forward saved; dtypes = (x.dtype, weight.dtype)."""
    from . import precision
    return precision.linear_backward(dy, x_low, weight_low, dtypes, needs_input_grad)


# ------------------------------------------------------------------ flash attention (issue 7's module)
def causal_attention_forward(q, k, v):
    return _attention_module().causal_attention_forward(q, k, v)


def causal_attention_backward(dy, q, k, v, out, lse):
    return _attention_module().causal_attention_backward(dy, q, k, v, out, lse)
