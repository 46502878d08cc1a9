"""The residual junction with its norm, F.add_rms_norm: (x + branch, rms_norm(x + branch)).

A float64 gradcheck through both outputs at once (their concatenation takes the random upstream gradient),
the op against the composed reference (forward and backward), the branch's dtype (rounded to x's in the
sum, its gradient back in its own), the norm's output dtype, and a clear error for mismatched shapes. The
GPU kernel of the fused pass is checked against this op's NumPy path in tests/test_gpu.py.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import tinygrad_llm.functional as F
from tinygrad_llm import Tensor
from tinygrad_llm.ops.norm import rms_norm_reference

from op_helpers import assert_same_forward_and_backward, normal

seeds = st.integers(0, 2**31 - 1)


def both(x, branch, weight):
    total, normed = F.add_rms_norm(x, branch, weight, 1e-5)
    return F.concatenate([total, normed], axis=-1)                  # 2 × (..., C) -> (..., 2C)


def both_reference(x, branch, weight):
    total = x + branch
    return F.concatenate([total, rms_norm_reference(total, weight, 1e-5)], axis=-1)


@given(leading=hnp.array_shapes(min_dims=1, max_dims=2, max_side=3), channels=st.integers(1, 6), seed=seeds,
       scale=st.sampled_from([0.1, 1.0, 10.0]))
def test_add_rms_norm_gradcheck_and_reference(backend, assert_gradcheck, leading, channels, seed, scale):
    shape = tuple(leading) + (channels,)
    x, branch, weight = normal(shape, seed, scale), normal(shape, seed + 1, scale), normal((channels,), seed + 2)
    assert_gradcheck(both, [backend.tensor(x), backend.tensor(branch), backend.tensor(weight)])
    assert_same_forward_and_backward(backend, both, both_reference, [x, branch, weight])


@given(seed=seeds)
def test_a_lower_precision_branch_is_rounded_to_the_residual_dtype_and_its_gradient_comes_back_in_its_own(seed):
    x, weight = normal((3, 8), seed), normal((8,), seed + 1)
    branch = normal((3, 8), seed + 2).astype(np.float32)
    tx, tb, tw = (Tensor(a, requires_grad=True) for a in (x, branch, weight))
    total, normed = F.add_rms_norm(tx, tb, tw)
    assert total.dtype == np.float64 and normed.dtype == np.float64
    np.testing.assert_array_equal(total.numpy(), x + branch.astype(np.float64))
    upstream = normal((3, 8), seed + 3)
    (total * Tensor(upstream)).sum().backward()
    assert tb.grad.dtype == np.float32 and tx.grad.dtype == np.float64
    np.testing.assert_array_equal(tx.grad, upstream)
    np.testing.assert_array_equal(tb.grad, upstream.astype(np.float32))


@given(seed=seeds)
def test_out_dtype_rounds_the_norm_output_only(seed):
    x, branch, weight = normal((2, 4, 16), seed), normal((2, 4, 16), seed + 1), normal((16,), seed + 2)
    tx, tb, tw = (Tensor(a, requires_grad=True) for a in (x, branch, weight))
    total, normed = F.add_rms_norm(tx, tb, tw, out_dtype=np.float32)
    assert total.dtype == np.float64 and normed.dtype == np.float32
    exact = F.rms_norm(Tensor(x + branch), Tensor(weight)).numpy()
    np.testing.assert_array_equal(normed.numpy(), exact.astype(np.float32))
    upstream = normal((2, 4, 16), seed + 3).astype(np.float32)
    normed.backward(upstream)
    assert tx.grad.dtype == np.float64 and tw.grad.dtype == np.float64
    reference = Tensor(x + branch, requires_grad=True)
    rw = Tensor(weight, requires_grad=True)
    F.rms_norm(reference, rw).backward(upstream.astype(np.float64))
    np.testing.assert_allclose(tx.grad, reference.grad, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(tb.grad, reference.grad, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(tw.grad, rw.grad, rtol=1e-12, atol=1e-14)


def test_mismatched_shapes_are_a_clear_error():
    with pytest.raises(ValueError, match="branch shape"):
        F.add_rms_norm(np.ones((2, 4)), np.ones((2, 5)), np.ones(4))
    with pytest.raises(ValueError, match="weight shape"):
        F.add_rms_norm(np.ones((2, 4)), np.ones((2, 4)), np.ones(5))


def two_junctions(x, branch, weight, scale):
    """Two residual junctions as a layer chains them: the second junction's stream input is the first's
    sum, so the norm's backward receives the stream's gradient as pending (Function.takes_pending)."""
    total, normed = F.add_rms_norm(x, branch, weight, 1e-5)
    total2, normed2 = F.add_rms_norm(total, normed * scale, weight, 1e-5)
    return F.concatenate([total2, normed2], axis=-1)                 # 2 × (..., C) -> (..., 2C)


@given(leading=hnp.array_shapes(min_dims=1, max_dims=2, max_side=3), channels=st.integers(1, 6), seed=seeds)
def test_the_stream_gradient_is_added_by_the_norm_backward(backend, assert_gradcheck, leading, channels, seed):
    from tinygrad_llm.ops.norm import RMSNorm
    shape = tuple(leading) + (channels,)
    x, branch, weight, scale = (normal(shape, seed), normal(shape, seed + 1), normal((channels,), seed + 2),
                                normal((channels,), seed + 3))
    seen = []
    original = RMSNorm.backward

    def recording(self, dy, pending=(None, None)):
        seen.append(pending[0] is not None)
        return original(self, dy, pending)

    inputs = [backend.tensor(x), backend.tensor(branch), backend.tensor(weight), backend.tensor(scale)]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(RMSNorm, "backward", recording)
        assert_gradcheck(two_junctions, inputs)
    assert any(seen)                                   # the first junction's norm took the stream's gradient

    def reference(x, branch, weight, scale):
        total = x + branch
        total2 = total + rms_norm_reference(total, weight, 1e-5) * scale
        return F.concatenate([total2, rms_norm_reference(total2, weight, 1e-5)], axis=-1)

    assert_same_forward_and_backward(backend, two_junctions, reference, [x, branch, weight, scale])
