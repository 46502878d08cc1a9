"""The tiled loop of attention's CPU training path (ops/fused_cpu.c tiled_attention_forward/backward, the
"tiled" branch of CausalAttention's packed form with keep_probabilities) against the op's NumPy path.

The NumPy path (the compiled loops turned off: the blocked batched products) is the reference: outputs
and d(qkv) agree to rounding over odd T, T = 1, T not a multiple of the 16-row tiles, grouped heads, head
sizes of one to four vectors, float32 and float64, one and two row-pool threads; a float64 gradcheck
against a random upstream gradient runs through the loop; hypothesis properties: causality (an output row
does not change, bit for bit, when later positions do), dv's column sums equal dO's (each row of P sums
to 1), the path's own choice (it runs for head sizes that are a multiple of 16; dropout keeps the
blocked path).
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tinygrad_llm import functional as F
from tinygrad_llm.gradcheck import gradcheck
from tinygrad_llm.ops import attention, fused_cpu
from tinygrad_llm.ops.rope import rope_angles
from tinygrad_llm.tensor import Tensor

from op_helpers import compiled_loops, normal

pytestmark = pytest.mark.skipif(fused_cpu.library() is None, reason="the fused CPU loops could not be built here")


def _attend(heads, kv_heads, time, head_dim, **options):
    cos, sin = rope_angles(np.arange(time), head_dim, 10000.0)

    def attend(qkv):
        dtype = qkv.dtype
        return F.rope_attention(qkv, heads, kv_heads, cos.astype(dtype), sin.astype(dtype), keep_probabilities=True,
                                **options)
    return attend


def _run(qkv, heads, kv_heads, dtype, upstream_seed=1, **options):
    """Output and d(qkv) of the packed op on qkv (B, T, H + 2Hkv, D) in dtype, with a random upstream gradient."""
    t = Tensor(qkv.astype(dtype), requires_grad=True)
    out = _attend(heads, kv_heads, qkv.shape[1], qkv.shape[3], **options)(t)
    out.backward(np.random.default_rng(upstream_seed).standard_normal(out.shape).astype(dtype))
    return out.numpy(), t.grad


@pytest.fixture
def tiled_calls(monkeypatch):
    """A list that gets, for every batch chunk, whether the tiled loop ran it."""
    calls = []
    forward = attention._tiled_forward
    monkeypatch.setattr(attention, "_tiled_forward", lambda *a: calls.append(forward(*a)) or calls[-1])
    return calls


def _ran(calls) -> bool:
    return bool(calls) and all(kept is not None for kept in calls)


TOLERANCE = {np.float32: dict(rtol=2e-4, atol=2e-5), np.float64: dict(rtol=1e-10, atol=1e-12)}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("batch, time, heads, kv_heads, head_dim", [
    (2, 1, 2, 2, 16),        # one position
    (2, 5, 4, 2, 32),        # fewer rows than one register tile, grouped heads
    (1, 16, 2, 1, 16),       # exactly one 16-row tile, every query head on one kv head
    (3, 37, 4, 4, 32),       # odd T, the last tile partial
    (2, 70, 3, 1, 48),       # a head size of three 16-lane vectors, groups of 3
    (1, 33, 2, 2, 64),
])
def test_tiled_path_matches_the_numpy_path(tiled_calls, dtype, batch, time, heads, kv_heads, head_dim):
    qkv = normal((batch, time, heads + 2 * kv_heads, head_dim), time * 7 + head_dim, 1.5)
    out, grad = _run(qkv, heads, kv_heads, dtype)
    assert _ran(tiled_calls)
    with compiled_loops(False):
        ref_out, ref_grad = _run(qkv, heads, kv_heads, dtype)
    np.testing.assert_allclose(out, ref_out, **TOLERANCE[dtype])
    np.testing.assert_allclose(grad, ref_grad, **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_tiled_path_on_two_threads_gives_the_same_bits(tiled_calls, dtype):
    """The row pool splits the batch into chunks; each (batch row, head) is computed the same way in any
    chunk, so two threads give exactly the one-thread result."""
    qkv = normal((5, 29, 8, 32), 3)
    with compiled_loops(True, threads=1):
        one = _run(qkv, 4, 2, dtype)
    with compiled_loops(True, threads=2):
        two = _run(qkv, 4, 2, dtype)
    assert _ran(tiled_calls)
    np.testing.assert_array_equal(one[0], two[0])
    np.testing.assert_array_equal(one[1], two[1])


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_gradcheck_through_the_tiled_loop(tiled_calls, kv_heads):
    qkv = normal((2, 19, 2 + 2 * kv_heads, 16), 5)
    assert gradcheck(_attend(2, kv_heads, 19, 16), [qkv], seed=3).ok
    assert _ran(tiled_calls)


def test_scores_far_apart_keep_their_own_softmax(tiled_calls):
    """Each row is shifted by its own maximum: rows whose scores are 1000× another's still get a softmax
    (finite, the NumPy path's values), in float32 too."""
    qkv = normal((2, 21, 6, 16), 11)
    qkv[:, 1::2, :2] *= 1000.0                                  # every other query row: huge scores
    for dtype in (np.float32, np.float64):
        out, grad = _run(qkv, 2, 2, dtype)
        assert _ran(tiled_calls)
        with compiled_loops(False):
            ref_out, _ = _run(qkv, 2, 2, dtype)
        assert np.isfinite(out).all() and np.isfinite(grad).all()
        np.testing.assert_allclose(out, ref_out, rtol=1e-4 if dtype == np.float32 else 1e-10, atol=1e-4)
        tiled_calls.clear()


def test_dropout_and_other_head_sizes_keep_the_blocked_path(monkeypatch, tiled_calls):
    """Attention dropout is not in the loop: the blocked path runs it (its own tests hold it to the
    reference). A head size that is not a whole number of vectors may be declined by the loop: the op
    then gives the NumPy path's result either way."""
    blocked = []
    forward = attention._blocked_forward
    monkeypatch.setattr(attention, "_blocked_forward", lambda *a, **k: blocked.append(1) or forward(*a, **k))
    qkv = normal((2, 9, 6, 32), 2)
    _run(qkv, 2, 2, np.float64, dropout=0.2, seed=4)
    assert blocked and not tiled_calls
    qkv = normal((2, 9, 6, 6), 2)
    out, grad = _run(qkv, 2, 2, np.float64)
    with compiled_loops(False):
        ref_out, ref_grad = _run(qkv, 2, 2, np.float64)
    np.testing.assert_allclose(out, ref_out, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-10, atol=1e-12)


shapes = st.tuples(st.integers(1, 3), st.integers(1, 40), st.sampled_from([(1, 1), (2, 2), (2, 1), (4, 2), (3, 1)]),
                   st.sampled_from([16, 32]))


@given(shape=shapes, cut=st.integers(0, 39), seed=st.integers(0, 2**32 - 1),
       dtype=st.sampled_from([np.float32, np.float64]))
def test_output_rows_do_not_see_later_positions(shape, cut, seed, dtype):
    """Changing q, k, v at positions after t leaves output rows 0 … t unchanged, bit for bit (the later
    keys' scores are masked before the row's maximum; their probabilities are exact zeros)."""
    batch, time, (heads, kv_heads), head_dim = shape
    cut = min(cut, time - 1)
    qkv = normal((batch, time, heads + 2 * kv_heads, head_dim), seed % 1000).astype(dtype)
    changed = qkv.copy()
    changed[:, cut + 1:] = normal(changed[:, cut + 1:].shape, seed % 997, 50.0)
    attend = _attend(heads, kv_heads, time, head_dim)
    before, after = attend(Tensor(qkv)).numpy(), attend(Tensor(changed)).numpy()
    np.testing.assert_array_equal(before[:, :cut + 1], after[:, :cut + 1])


@given(shape=shapes, seed=st.integers(0, 2**32 - 1), dtype=st.sampled_from([np.float32, np.float64]))
def test_value_gradient_columns_sum_like_the_upstream_gradient(shape, seed, dtype):
    """dv = Pᵀ dO and every row of P sums to 1, so Σ_t dv[t] = Σ_t dO[t] summed over the group's heads; and
    the tiled path agrees with the NumPy path."""
    batch, time, (heads, kv_heads), head_dim = shape
    qkv = normal((batch, time, heads + 2 * kv_heads, head_dim), seed % 1000)
    out, grad = _run(qkv, heads, kv_heads, dtype, upstream_seed=seed % 991)
    d_out = np.random.default_rng(seed % 991).standard_normal(out.shape).astype(dtype)
    d_out = d_out.reshape(batch, time, kv_heads, heads // kv_heads, head_dim).sum(axis=(1, 3))   # (B, Hkv, D)
    dv = grad[:, :, heads + kv_heads:].sum(axis=1)                                                 # (B, Hkv, D)
    np.testing.assert_allclose(dv, d_out, rtol=1e-4 if dtype == np.float32 else 1e-10,
                               atol=1e-4 * time if dtype == np.float32 else 1e-10)
    with compiled_loops(False):
        ref_out, ref_grad = _run(qkv, heads, kv_heads, dtype, upstream_seed=seed % 991)
    np.testing.assert_allclose(out, ref_out, **TOLERANCE[dtype])
    np.testing.assert_allclose(grad, ref_grad, **TOLERANCE[dtype])
