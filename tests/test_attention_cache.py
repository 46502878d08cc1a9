"""The KV-cache forms of the attention op (F.rope_attention with cache=): the ragged batched option
(ops/attention.CacheRows: every row its own store row and start) against attention over each sequence
whole, its runs of consecutive store rows, the decode form in 16-bit, the few-row Linear orientation, and
clear errors."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tinygrad_llm.functional as F
from tinygrad_llm import Tensor, no_grad
from tinygrad_llm.backend import array_module, to_numpy
from tinygrad_llm.ops.attention import CacheRows
from tinygrad_llm.ops.rope import rope_angles

from op_helpers import normal

seeds = st.integers(0, 2**31 - 1)


class _NumPy:
    """The numpy backend of the fixture, for the tests that are about NumPy's dtypes."""
    def array(self, values, dtype=None):
        return np.asarray(values) if dtype is None else np.asarray(values, dtype=dtype)

    def tensor(self, values, dtype=None):
        return Tensor(self.array(values, dtype))


NUMPY = _NumPy()


def tables(backend, positions, head_dim, dtype=np.float64):
    cos, sin = rope_angles(np.asarray(positions), head_dim, 10000.0)
    return backend.array(cos, dtype), backend.array(sin, dtype)


def whole(backend, qkv_row, heads, kv_heads):
    """Attention over one sequence (T, H + 2Hkv, D) from position 0, no cache: (T, H·D)."""
    time, _, head_dim = qkv_row.shape
    return F.rope_attention(backend.tensor(qkv_row[None]), heads, kv_heads,
                            *tables(backend, np.arange(time), head_dim)).numpy()[0]


def cached(backend, qkv, heads, kv_heads, stores, rows):
    """F.rope_attention of qkv (B, T, ·, D) with the ragged cache option; returns NumPy (B, T, H·D)."""
    head_dim = qkv.shape[-1]
    with no_grad():
        return F.rope_attention(backend.tensor(qkv), heads, kv_heads, *tables(backend, rows.positions, head_dim,
                                                                               qkv.dtype),
                                cache=(*stores, rows)).numpy()


@settings(deadline=None, max_examples=30)
@given(seed=seeds, kv_heads=st.sampled_from([1, 2, 4]), data=st.data())
def test_ragged_decode_equals_attention_over_each_whole_sequence(backend, seed, kv_heads, data):
    """Slots at different lengths, any subset in any order, one new position each: every row equals the
    last position of attention over its whole sequence, and the stores hold every row's keys."""
    heads, head_dim, store_rows, max_len = 4, 6, 6, 9
    chosen = data.draw(st.lists(st.integers(0, store_rows - 1), min_size=1, max_size=store_rows, unique=True))
    starts = [data.draw(st.integers(0, max_len - 1)) for _ in chosen]
    sequences = {slot: normal((start + 1, heads + 2 * kv_heads, head_dim), seed + slot)
                 for slot, start in zip(chosen, starts)}
    stores = [backend.array(np.full((store_rows, kv_heads, max_len, head_dim), 1e6)) for _ in "kv"]  # stale: masked
    xp = array_module(stores[0])
    for slot, start in zip(chosen, starts):                                   # prefill each slot alone
        if start:
            cached(backend, sequences[slot][None, :start], heads, kv_heads, stores, CacheRows([slot], [0], start, xp))
    qkv = np.stack([sequences[slot][start:] for slot, start in zip(chosen, starts)])      # (B, 1, ·, D)
    out = cached(backend, qkv, heads, kv_heads, stores, CacheRows(chosen, starts, 1, xp))
    k_store = to_numpy(stores[0])
    for row, (slot, start) in enumerate(zip(chosen, starts)):
        expected = whole(backend, sequences[slot], heads, kv_heads)
        np.testing.assert_allclose(out[row, 0], expected[-1], rtol=1e-10, atol=1e-12)
        assert (np.abs(k_store[slot, :, :start + 1]) < 1e3).all() and (k_store[slot, :, start + 1:] == 1e6).all()


@settings(deadline=None, max_examples=20)
@given(seed=seeds, time=st.integers(2, 4), data=st.data())
def test_ragged_chunks_of_several_positions_equal_the_whole_sequences(backend, seed, time, data):
    """T > 1 new positions per row at different starts (a chat turn for several slots at once)."""
    heads, kv_heads, head_dim, store_rows, max_len = 4, 2, 4, 5, 10
    chosen = data.draw(st.lists(st.integers(0, store_rows - 1), min_size=1, max_size=store_rows, unique=True))
    starts = [data.draw(st.integers(0, max_len - time)) for _ in chosen]
    sequences = {slot: normal((start + time, heads + 2 * kv_heads, head_dim), seed + slot)
                 for slot, start in zip(chosen, starts)}
    stores = [backend.array(np.zeros((store_rows, kv_heads, max_len, head_dim))) for _ in "kv"]
    xp = array_module(stores[0])
    for slot, start in zip(chosen, starts):
        if start:
            cached(backend, sequences[slot][None, :start], heads, kv_heads, stores, CacheRows([slot], [0], start, xp))
    qkv = np.stack([sequences[slot][start:] for slot, start in zip(chosen, starts)])      # (B, T, ·, D)
    out = cached(backend, qkv, heads, kv_heads, stores, CacheRows(chosen, starts, time, xp))
    for row, (slot, start) in enumerate(zip(chosen, starts)):
        expected = whole(backend, sequences[slot], heads, kv_heads)[start:]
        np.testing.assert_allclose(out[row], expected, rtol=1e-10, atol=1e-12)


def test_runs_are_consecutive_store_rows_read_as_views():
    rows = CacheRows([2, 5, 1, 7], [3, 0, 4, 1], 1)
    assert [(run[1].start, run[1].stop) for run in rows.runs] == [(1, 3), (5, 6), (7, 8)]
    members = [run[0] for run in rows.runs]
    assert members[0].tolist() == [2, 0] and members[1] == slice(1, 2) and members[2] == slice(3, 4)
    assert [run[2] for run in rows.runs] == [5, 1, 2]                       # keys up to the longest row
    assert rows.runs[0][3] is not None and rows.runs[1][3] is None           # −∞ bias only where lengths differ
    several = CacheRows([0, 1, 2], [2, 2, 5], 3)                             # T > 1: a run also shares its start
    assert [(run[1].start, run[1].stop) for run in several.runs] == [(0, 2), (2, 3)]
    assert rows.positions.tolist() == [3, 0, 4, 1] and several.positions.tolist()[:3] == [2, 3, 4]


def test_float16_decode_is_close_to_float64():
    heads, kv_heads, head_dim, max_len = 4, 2, 8, 6
    starts, slots = [4, 1, 2], [2, 0, 1]
    qkv = normal((3, 1, heads + 2 * kv_heads, head_dim), 3)
    stores = normal((2, 3, kv_heads, max_len, head_dim), 4)
    results = []
    for dtype in (np.float64, np.float16):
        out = cached(NUMPY, qkv.astype(dtype), heads, kv_heads, list(stores.astype(dtype)), CacheRows(slots, starts, 1))
        assert out.dtype == dtype
        results.append(out.astype(np.float64))
    np.testing.assert_allclose(results[1], results[0], rtol=2e-2, atol=2e-2)


def test_bad_cache_calls_are_clear_errors():
    heads, kv_heads, head_dim = 2, 1, 4
    qkv = Tensor(normal((2, 1, heads + 2 * kv_heads, head_dim), 0))
    k_store, v_store = np.zeros((3, kv_heads, 4, head_dim)), np.zeros((3, kv_heads, 4, head_dim))
    with pytest.raises(ValueError, match="distinct"):
        CacheRows([1, 1], [0, 0], 1)
    with pytest.raises(ValueError, match="one start per slot"):
        CacheRows([0, 1], [0], 1)
    with no_grad(), pytest.raises(ValueError, match="holds 4 positions"):
        F.rope_attention(qkv, heads, kv_heads, *tables(NUMPY, [4, 0], head_dim), cache=(k_store, v_store, CacheRows([0, 1], [4, 0], 1)))
    with no_grad(), pytest.raises(ValueError, match="cache rows for 3"):
        F.rope_attention(qkv, heads, kv_heads, *tables(NUMPY, [0, 0, 0], head_dim),
                         cache=(k_store, v_store, CacheRows([0, 1, 2], [0, 0, 0], 1)))
    with no_grad(), pytest.raises(ValueError, match="has 3 rows"):
        F.rope_attention(qkv, heads, kv_heads, *tables(NUMPY, [0, 0], head_dim),
                         cache=(k_store, v_store, CacheRows([0, 3], [0, 0], 1)))
    qkv.requires_grad = True
    out = F.rope_attention(qkv, heads, kv_heads, *tables(NUMPY, [0, 0], head_dim), cache=(k_store, v_store, CacheRows([0, 1], [0, 0], 1)))
    with pytest.raises(RuntimeError, match="keeps no gradient"):
        out.sum().backward()


@pytest.mark.parametrize("rows", [1, 2, 7, 64, 65])
def test_linear_orientation_for_few_rows_gives_the_same_product(rows):
    """Linear computes (W xᵀ)ᵀ for 2 … FEW_ROWS rows: the same values and gradients as x Wᵀ."""
    rng = np.random.default_rng(rows)
    x = Tensor(rng.standard_normal((rows, 5)), requires_grad=True)
    w = Tensor(rng.standard_normal((3, 5)), requires_grad=True)
    y = F.linear(x, w)
    np.testing.assert_allclose(y.numpy(), x.numpy() @ w.numpy().T, rtol=1e-12, atol=1e-12)
    upstream = rng.standard_normal((rows, 3))
    (y * Tensor(upstream)).sum().backward()
    np.testing.assert_allclose(x.grad, upstream @ w.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(w.grad, upstream.T @ x.numpy(), rtol=1e-12, atol=1e-12)


def test_rows_given_on_the_device_are_the_ones_written_and_read():
    """CacheRows(device=(rows, positions)) uses those arrays as `write` (a CUDA graph's fixed buffers) and
    still works the host-side runs out from slots and starts; without it `write` comes from them."""
    given_rows, given_positions = np.array([4, 2]), np.array([7, 3])
    rows = CacheRows([0, 1], [0, 0], 1, np, device=(given_rows, given_positions))
    assert rows.write[0] is given_rows and rows.write[1] is given_positions
    plain = CacheRows([3, 1], [5, 2], 2, np)
    np.testing.assert_array_equal(plain.write[0], [3, 3, 1, 1])
    np.testing.assert_array_equal(plain.write[1], [5, 6, 2, 3])
    assert len(plain.runs) == 2
