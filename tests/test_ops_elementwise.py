"""Elementwise ops: gradchecks over broadcast pairs (hypothesis picks shapes and values), unbroadcast,
and edge cases (0-d tensors, pow at a <= 0, maximum ties)."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import tinygrad_llm.functional as F
from tinygrad_llm import Tensor
from tinygrad_llm.ops.elementwise import unbroadcast

broadcast_pairs = hnp.mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=3, max_side=3)
single_shapes = hnp.array_shapes(min_dims=0, max_dims=3, min_side=1, max_side=3)


def values(shape, low=-2.0, high=2.0):
    return hnp.arrays(np.float64, shape, elements=st.floats(low, high, allow_nan=False, allow_infinity=False))


def away_from_zero(shape, low=0.5, high=2.0):
    """Magnitudes in [low, high] with either sign (divisors)."""
    return st.tuples(values(shape, low, high), hnp.arrays(np.bool_, shape)).map(
        lambda pair: np.where(pair[1], -pair[0], pair[0]))


def on_grid(shape):
    """Multiples of 1/4 in [-2, 2]: ties are exact, non-ties at least 1/4 apart (maximum's kink)."""
    return hnp.arrays(np.int64, shape, elements=st.integers(-8, 8)).map(lambda a: a / 4.0)


BINARY = {
    "add": (F.add, np.add),
    "sub": (F.sub, np.subtract),
    "mul": (F.mul, np.multiply),
}


@pytest.mark.parametrize("name", list(BINARY))
@given(data=st.data(), shapes=broadcast_pairs)
def test_add_sub_mul_gradcheck_broadcast(backend, assert_gradcheck, name, data, shapes):
    op, reference = BINARY[name]
    shape_a, shape_b = shapes.input_shapes
    a, b = data.draw(values(shape_a)), data.draw(values(shape_b))
    out = op(backend.tensor(a), backend.tensor(b))
    assert out.shape == shapes.result_shape
    np.testing.assert_allclose(out.numpy(), reference(a, b))
    assert_gradcheck(lambda x, y: op(x, y), [backend.tensor(a), backend.tensor(b)])


@given(data=st.data(), shapes=broadcast_pairs)
def test_div_gradcheck_broadcast(backend, assert_gradcheck, data, shapes):
    shape_a, shape_b = shapes.input_shapes
    a, b = data.draw(values(shape_a)), data.draw(away_from_zero(shape_b))
    np.testing.assert_allclose((backend.tensor(a) / backend.tensor(b)).numpy(), a / b)
    assert_gradcheck(F.div, [backend.tensor(a), backend.tensor(b)])


@given(data=st.data(), shapes=broadcast_pairs)
def test_pow_gradcheck_broadcast(backend, assert_gradcheck, data, shapes):
    shape_a, shape_b = shapes.input_shapes
    a, b = data.draw(values(shape_a, 0.5, 2.0)), data.draw(values(shape_b, -2.0, 2.0))
    np.testing.assert_allclose((backend.tensor(a) ** backend.tensor(b)).numpy(), a ** b)
    assert_gradcheck(F.pow, [backend.tensor(a), backend.tensor(b)])


@given(data=st.data(), shapes=broadcast_pairs)
def test_maximum_gradcheck_broadcast(backend, assert_gradcheck, data, shapes):
    """On a tie each input gets half: exactly what a central difference measures there."""
    shape_a, shape_b = shapes.input_shapes
    a, b = data.draw(on_grid(shape_a)), data.draw(on_grid(shape_b))
    np.testing.assert_allclose(F.maximum(backend.tensor(a), backend.tensor(b)).numpy(), np.maximum(a, b))
    assert_gradcheck(F.maximum, [backend.tensor(a), backend.tensor(b)])


UNARY = {
    "neg": (F.neg, np.negative, (-2.0, 2.0)),
    "exp": (F.exp, np.exp, (-2.0, 2.0)),
    "log": (F.log, np.log, (0.3, 3.0)),
    "sqrt": (F.sqrt, np.sqrt, (0.3, 3.0)),
    "tanh": (F.tanh, np.tanh, (-3.0, 3.0)),
}


@pytest.mark.parametrize("name", list(UNARY))
@given(data=st.data(), shape=single_shapes)
def test_unary_gradcheck(backend, assert_gradcheck, name, data, shape):
    op, reference, (low, high) = UNARY[name]
    x = data.draw(values(shape, low, high))
    out = op(backend.tensor(x))
    assert out.shape == x.shape and out.dtype == np.float64
    np.testing.assert_allclose(out.numpy(), reference(x), rtol=1e-12)
    assert_gradcheck(op, [backend.tensor(x)])


@given(data=st.data(), shape=single_shapes, exponent=st.integers(0, 4))
def test_pow_with_integer_exponent_at_nonpositive_bases(backend, assert_gradcheck, data, shape, exponent):
    """a ** k for integer k is smooth for a <= 0 too, and so must its gradient be (0 ** 0 included)."""
    a = data.draw(values(shape, -2.0, 0.0))
    out = backend.tensor(a) ** float(exponent)
    np.testing.assert_allclose(out.numpy(), a ** exponent)
    assert_gradcheck(lambda x: x ** float(exponent), [backend.tensor(a)])


def test_pow_gradient_edge_values(backend):
    a = backend.tensor([0.0, 0.0, -2.0, 4.0], requires_grad=True, dtype=np.float64)
    b = backend.tensor([0.0, 2.0, 3.0, 0.5], requires_grad=True, dtype=np.float64)
    (a ** b).backward(backend.array(np.ones(4)))
    np.testing.assert_allclose(Tensor(a.grad).numpy(), [0.0, 0.0, 12.0, 0.25])
    # ln a is defined only for a > 0: db is 0 where a <= 0 (the finite difference is undefined there)
    np.testing.assert_allclose(Tensor(b.grad).numpy(), [0.0, 0.0, 0.0, 2.0 * np.log(4.0)])


def test_maximum_ties_share_the_gradient(backend):
    a = backend.tensor([1.0, 2.0, 3.0], requires_grad=True, dtype=np.float64)
    b = backend.tensor([2.0, 2.0, 2.0], requires_grad=True, dtype=np.float64)
    F.maximum(a, b).backward(backend.array(np.ones(3)))
    np.testing.assert_allclose(Tensor(a.grad).numpy(), [0.0, 0.5, 1.0])
    np.testing.assert_allclose(Tensor(b.grad).numpy(), [1.0, 0.5, 0.0])


def test_relu_gradient(backend):
    x = backend.tensor([-1.0, 0.5, 2.0], requires_grad=True, dtype=np.float64)
    x.relu().backward(backend.array(np.ones(3)))
    np.testing.assert_allclose(Tensor(x.grad).numpy(), [0.0, 1.0, 1.0])


@given(shapes=broadcast_pairs, seed=st.integers(0, 2**31 - 1))
def test_unbroadcast_is_the_adjoint_of_broadcasting(shapes, seed):
    """⟨broadcast(a), g⟩ = ⟨a, unbroadcast(g)⟩ for every a and g: unbroadcast is broadcasting's transpose."""
    rng = np.random.default_rng(seed)
    shape_a, _ = shapes.input_shapes
    a = rng.standard_normal(shape_a)
    g = rng.standard_normal(shapes.result_shape)
    reduced = unbroadcast(g, shape_a)
    assert reduced.shape == tuple(shape_a)
    np.testing.assert_allclose(np.sum(np.broadcast_to(a, shapes.result_shape) * g), np.sum(a * reduced))


def test_unbroadcast_example():
    g = np.arange(24.0).reshape(2, 3, 4)
    np.testing.assert_allclose(unbroadcast(g, (3, 1)), g.sum(axis=(0, 2))[:, None])
    np.testing.assert_allclose(unbroadcast(g, (4,)), g.sum(axis=(0, 1)))
    np.testing.assert_allclose(unbroadcast(g, ()), g.sum())


def test_scalar_operands_keep_the_tensor_dtype():
    x32 = Tensor(np.ones(3, dtype=np.float32), requires_grad=True)
    y = 2.0 * x32 + 1.0 - x32 / 3.0
    assert y.dtype == np.float32
    y.backward(np.ones(3, dtype=np.float32))
    assert x32.grad.dtype == np.float32
    np.testing.assert_allclose(x32.grad, 2.0 - 1.0 / 3.0, rtol=1e-6)


def test_cast_gradient_returns_to_the_input_dtype():
    x = Tensor(np.ones(3), requires_grad=True)
    y = x.astype(np.float32)
    assert y.dtype == np.float32
    y.backward(np.full(3, 2.0, dtype=np.float32))
    assert x.grad.dtype == np.float64
    np.testing.assert_allclose(x.grad, 2.0)
