"""Decoding attention's compiled loop (ops/fused_cpu.c: decode_attention) over many keys, against the cached
attention's NumPy path: the AVX-512 products take the keys 16 at a time (scores summed by a tree of
shuffles) and the rest one at a time, and the values in two sets of sums (even and odd keys), so rows of
1 … 70 keys and every head size that is a multiple of 16 up to 128 (and one above) exercise every branch."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinygrad_llm.ops import fused_cpu

from op_helpers import cached_decode, compiled_loops as loops, normal

pytestmark = pytest.mark.skipif(fused_cpu.library() is None, reason="the fused CPU loops could not be built here")


@settings(deadline=None, max_examples=20)
@given(seed=st.integers(0, 2**31 - 1), head_dim=st.sampled_from([16, 32, 48, 64, 80, 128, 144]),
       kv_heads=st.sampled_from([1, 2]), data=st.data())
def test_decode_attention_over_many_keys_equals_the_numpy_path(seed, head_dim, kv_heads, data):
    heads, store_rows, max_len = 2, 3, 70
    slots = data.draw(st.lists(st.integers(0, store_rows - 1), min_size=1, max_size=store_rows, unique=True))
    starts = [data.draw(st.integers(0, max_len - 1)) for _ in slots]
    stores = [normal((store_rows, kv_heads, max_len, head_dim), seed + i, 2.0).astype(np.float32) for i in (1, 2)]
    qkv = normal((len(slots), 1, heads + 2 * kv_heads, head_dim), seed, 0.5).astype(np.float32)
    with loops(True, 1):
        fast = cached_decode(qkv, stores, slots, starts, heads, kv_heads)
    with loops(False):
        plain = cached_decode(qkv.astype(np.float64), [s.astype(np.float64) for s in stores], slots, starts,
                              heads, kv_heads)
    for a, b in zip(fast, plain):
        assert a.dtype == np.float32
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5 * np.abs(b).max())

