"""Helpers shared by the op tests: random inputs, a relative error, fused-versus-reference runs, and the
compiled CPU loops switched on or off."""
from __future__ import annotations

import contextlib

import numpy as np

from tinygrad_llm import Tensor, cpu_threads
from tinygrad_llm.ops import fused_cpu


def normal(shape, seed, scale=1.0):
    return np.random.default_rng(seed).standard_normal(shape) * scale


def relative_error(actual, expected):
    """‖actual − expected‖ / ‖expected‖ (the norm of a difference, so one tiny element cannot dominate)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-30)


def run(backend, fn, arrays, upstream_seed=0, dtype=np.float64):
    """fn on tensors made from arrays (floating ones cast to dtype, requiring grad), backward with a random
    upstream gradient; returns the output and the gradients as NumPy."""
    tensors = []
    for a in arrays:
        floating = a.dtype.kind == "f"
        tensors.append(backend.tensor(a.astype(dtype) if floating else a, requires_grad=floating))
    out = fn(*tensors)
    upstream = np.random.default_rng(upstream_seed).standard_normal(out.shape).astype(out.dtype)
    out.backward(backend.array(upstream))
    return out.numpy(), [Tensor(t.grad).numpy() for t in tensors if t.requires_grad]


def assert_same_forward_and_backward(backend, fused, reference, arrays, rtol=1e-9, atol=1e-12):
    """Outputs and gradients agree to rounding (atol: both may cancel differently near zero, e.g. gelu(−6))."""
    out, grads = run(backend, fused, arrays)
    ref_out, ref_grads = run(backend, reference, arrays)
    assert out.shape == ref_out.shape
    np.testing.assert_allclose(out, ref_out, rtol=rtol, atol=atol)
    assert len(grads) == len(ref_grads)
    for grad, ref_grad in zip(grads, ref_grads):
        np.testing.assert_allclose(grad, ref_grad, rtol=rtol, atol=atol)


@contextlib.contextmanager
def compiled_loops(on: bool, threads: int = 1):
    """The ops with their compiled CPU loops (ops/fused_cpu) on or off, the row pool at `threads` threads."""
    saved_library, saved_threads = fused_cpu.library(), cpu_threads.thread_count()
    fused_cpu._library = saved_library if on else None
    cpu_threads.set_thread_count(threads)
    try:
        yield
    finally:
        fused_cpu._library = saved_library
        cpu_threads.set_thread_count(saved_threads)


def cached_decode(qkv, stores, slots, starts, heads, kv_heads):
    """The cached attention op for one new position a row (qkv (B, 1, ·, D)) on copies of the k and v
    stores; returns (out, k store, v store)."""
    import tinygrad_llm.functional as F
    from tinygrad_llm import no_grad
    from tinygrad_llm.ops.attention import CacheRows
    from tinygrad_llm.ops.rope import rope_angles
    stores = [s.copy() for s in stores]
    cos, sin = rope_angles(np.asarray(starts), qkv.shape[-1], 10000.0)
    with no_grad():
        out = F.rope_attention(Tensor(qkv), heads, kv_heads, cos.astype(qkv.dtype), sin.astype(qkv.dtype),
                               cache=(*stores, CacheRows(slots, starts, 1))).numpy()
    return out, *stores

