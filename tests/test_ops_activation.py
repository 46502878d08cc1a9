"""softmax, log_softmax, silu, gelu, embedding, dropout: gradchecks (hypothesis shapes and values), the
composed references (forward and backward), invariants, large inputs, float32 vs float64, bad input."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import tinygrad_llm as tg
import tinygrad_llm.functional as F
from tinygrad_llm import Tensor
from tinygrad_llm.ops.activation import gelu_reference, log_softmax_reference, silu_reference, softmax_reference
from tinygrad_llm.ops.embedding import embedding_reference

from op_helpers import assert_same_forward_and_backward, normal, relative_error, run

shapes = hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=4)
seeds = st.integers(0, 2**31 - 1)
scales = st.sampled_from([0.1, 1.0, 4.0])


# ------------------------------------------------------------------ softmax and log_softmax
@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
@given(shape=shapes, seed=seeds, scale=scales, data=st.data())
def test_softmax_family_gradcheck_and_reference(backend, assert_gradcheck, name, shape, seed, scale, data):
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    fused, reference = {"softmax": (F.softmax, softmax_reference),
                        "log_softmax": (F.log_softmax, log_softmax_reference)}[name]
    x = normal(shape, seed, scale)
    assert_gradcheck(lambda t: fused(t, axis=axis), [backend.tensor(x)])
    assert_same_forward_and_backward(backend, lambda t: fused(t, axis=axis),
                                     lambda t: reference(t, axis=axis), [x])


@given(shape=shapes, seed=seeds, scale=st.sampled_from([1.0, 100.0, 1e4]))
def test_softmax_rows_sum_to_one(backend, shape, seed, scale):
    x = normal(shape, seed, scale).astype(np.float32)
    y = F.softmax(backend.tensor(x)).numpy()
    assert np.all(np.isfinite(y)) and np.all(y >= 0)
    np.testing.assert_allclose(y.sum(axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.exp(F.log_softmax(backend.tensor(x)).numpy()).sum(axis=-1), 1.0, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:overflow encountered")   # −3e38 − 3e38 = −inf, whose exp is the right 0
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_softmax_of_huge_inputs_is_finite_and_correct(backend, dtype):
    x = np.array([[1e4, -1e4, 0.0], [3e38, 3e38, -3e38], [-1e4, -1e4 + 1.0, -1e4]], dtype=dtype)
    y = F.softmax(backend.tensor(x)).numpy()
    e = np.e
    expected = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [1 / (2 + e), e / (2 + e), 1 / (2 + e)]])
    np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-30)
    log_y = F.log_softmax(backend.tensor(x[[0, 2]])).numpy()
    assert np.all(np.isfinite(log_y))
    np.testing.assert_allclose(log_y[0], [0.0, -2e4, -1e4], rtol=1e-6)
    np.testing.assert_allclose(log_y[1], np.log(expected[2]), rtol=1e-6)


def test_softmax_gradient_rows_sum_to_zero(backend):
    x = backend.tensor(normal((4, 6), 0), requires_grad=True)
    F.softmax(x).backward(backend.array(normal((4, 6), 1)))
    np.testing.assert_allclose(Tensor(x.grad).numpy().sum(axis=-1), 0.0, atol=1e-12)


# ------------------------------------------------------------------ silu, gelu
ACTIVATIONS = {
    "silu": (F.silu, silu_reference, lambda x: x / (1 + np.exp(-x))),
    "gelu": (F.gelu, gelu_reference,
             lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))),
}


@pytest.mark.parametrize("name", list(ACTIVATIONS))
@given(shape=shapes, seed=seeds, scale=scales)
def test_activation_gradcheck_and_reference(backend, assert_gradcheck, name, shape, seed, scale):
    fused, reference, formula = ACTIVATIONS[name]
    x = normal(shape, seed, scale)
    np.testing.assert_allclose(fused(backend.tensor(x)).numpy(), formula(x), rtol=1e-12, atol=1e-15)
    assert_gradcheck(fused, [backend.tensor(x)])
    assert_same_forward_and_backward(backend, fused, reference, [x])


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_activation_of_huge_inputs_is_finite(backend, name):
    fused = ACTIVATIONS[name][0]
    x = backend.tensor(np.array([-1e4, -100.0, 0.0, 100.0, 1e4], dtype=np.float32), requires_grad=True)
    y = fused(x)
    y.backward(backend.array(np.ones(5, dtype=np.float32)))
    np.testing.assert_allclose(y.numpy(), [0.0, 0.0, 0.0, 100.0, 1e4], atol=1e-6)
    np.testing.assert_allclose(Tensor(x.grad).numpy(), [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-6)


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_activation_float32_matches_float64(backend, name):
    fused = ACTIVATIONS[name][0]
    x = normal((8, 64), 3, 3.0)
    out64, (grad64,) = run(backend, fused, [x], dtype=np.float64)
    out32, (grad32,) = run(backend, fused, [x], dtype=np.float32)
    assert out32.dtype == np.float32 and grad32.dtype == np.float32
    assert relative_error(out32, out64) < 1e-5 and relative_error(grad32, grad64) < 1e-5


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
def test_softmax_family_float32_matches_float64(backend, name):
    fused = {"softmax": F.softmax, "log_softmax": F.log_softmax}[name]
    x = normal((8, 64), 4, 3.0)
    out64, (grad64,) = run(backend, fused, [x], dtype=np.float64)
    out32, (grad32,) = run(backend, fused, [x], dtype=np.float32)
    assert relative_error(out32, out64) < 1e-5 and relative_error(grad32, grad64) < 1e-5


# ------------------------------------------------------------------ embedding
@given(vocab=st.integers(1, 5), channels=st.integers(1, 3), seed=seeds, data=st.data())
def test_embedding_gradcheck_with_repeated_ids(backend, assert_gradcheck, vocab, channels, seed, data):
    ids = data.draw(hnp.arrays(np.int64, hnp.array_shapes(min_dims=1, max_dims=2, max_side=4),
                               elements=st.integers(0, vocab - 1)))
    weight = normal((vocab, channels), seed)
    out = F.embedding(backend.array(ids), backend.tensor(weight))
    assert out.shape == ids.shape + (channels,)
    np.testing.assert_array_equal(out.numpy(), weight[ids])
    assert_gradcheck(lambda i, w: F.embedding(i, w), [backend.tensor(ids), backend.tensor(weight)])
    assert_same_forward_and_backward(backend, lambda w: F.embedding(backend.array(ids), w),
                                     lambda w: embedding_reference(backend.array(ids), w), [weight])


def test_embedding_repeated_ids_accumulate(backend):
    weight = backend.tensor(np.zeros((4, 2)), requires_grad=True)
    ids = backend.array([[1, 1, 3], [1, 0, 3]])
    F.embedding(ids, weight).backward(backend.array(np.ones((2, 3, 2))))
    np.testing.assert_array_equal(Tensor(weight.grad).numpy(), [[1, 1], [3, 3], [0, 0], [2, 2]])


def test_embedding_bad_ids_are_clear_errors(backend):
    weight = backend.tensor(np.ones((4, 2)))
    with pytest.raises(IndexError, match=r"ids must lie in \[0, 4\)"):
        F.embedding(backend.array([0, 4]), weight)
    with pytest.raises(IndexError, match=r"\[0, 4\)"):
        F.embedding(backend.array([-1, 2]), weight)
    with pytest.raises(TypeError, match="integers"):
        F.embedding(backend.array([0.0, 1.0]), weight)


# ------------------------------------------------------------------ dropout
@given(shape=shapes, seed=seeds, p=st.sampled_from([0.1, 0.5, 0.9]))
def test_dropout_gradcheck_with_fixed_seed(backend, assert_gradcheck, shape, seed, p):
    x = normal(shape, seed)
    assert_gradcheck(lambda t: F.dropout(t, p, seed=seed), [backend.tensor(x)])


def test_dropout_is_reproducible_from_its_seed(backend):
    x = backend.tensor(np.ones((64, 64), dtype=np.float32))
    a, b = F.dropout(x, 0.5, seed=123).numpy(), F.dropout(x, 0.5, seed=123).numpy()
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, F.dropout(x, 0.5, seed=124).numpy())
    tg.manual_seed(7)
    c = F.dropout(x, 0.5).numpy()
    tg.manual_seed(7)
    np.testing.assert_array_equal(c, F.dropout(x, 0.5).numpy())


@pytest.mark.parametrize("p", [0.1, 0.3, 0.7])
def test_dropout_inverted_scaling_preserves_the_mean(backend, p):
    x = np.full((400, 500), 2.0, dtype=np.float64)
    y = F.dropout(backend.tensor(x), p, seed=0).numpy()
    kept = y != 0
    assert abs(1 - kept.mean() - p) < 0.01                         # about a fraction p dropped
    np.testing.assert_allclose(y[kept], 2.0 / (1 - p))               # survivors scaled by 1/(1 − p)
    assert abs(y.mean() - 2.0) < 0.03                                # so the mean is kept


def test_dropout_backward_reuses_the_forward_mask(backend):
    x = backend.tensor(normal((50, 40), 0) + 5.0, requires_grad=True)   # no zeros in x
    y = F.dropout(x, 0.4, seed=11)
    y.backward(backend.array(np.ones((50, 40))))
    mask = y.numpy() / x.numpy()                                      # what forward multiplied by
    np.testing.assert_allclose(Tensor(x.grad).numpy(), mask, rtol=1e-12)
    assert set(np.round(np.unique(mask), 9)) == {0.0, round(1 / 0.6, 9)}


def test_dropout_identity_cases_and_errors(backend):
    x = backend.tensor(normal((3, 4), 0))
    assert F.dropout(x, 0.5, training=False) is x
    assert F.dropout(x, 0.0) is x
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        F.dropout(x, 1.0)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        F.dropout(x, -0.1)
