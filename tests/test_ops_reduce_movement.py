"""Reductions (sum, mean, max), movement (reshape, permute, transpose, getitem, concatenate, split, stack)
and products (matmul, linear): gradchecks with hypothesis-chosen shapes, forward against NumPy."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import tinygrad_llm.functional as F
from tinygrad_llm import Tensor

shapes = hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=3)
seeds = st.integers(0, 2**31 - 1)


def normal(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape)


@st.composite
def shape_and_axes(draw):
    """A shape and an axis argument for it: None, one (maybe negative) int, or a tuple of distinct axes."""
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=3))
    ndim = len(shape)
    axis = draw(st.one_of(
        st.none(),
        st.integers(-ndim, ndim - 1),
        st.lists(st.integers(0, ndim - 1), min_size=1, max_size=ndim, unique=True).map(tuple)))
    return shape, axis


# ------------------------------------------------------------------ reductions
@pytest.mark.parametrize("name", ["sum", "mean"])
@given(case=shape_and_axes(), keepdims=st.booleans(), seed=seeds)
def test_sum_mean_gradcheck(backend, assert_gradcheck, name, case, keepdims, seed):
    shape, axis = case
    op, reference = {"sum": (F.sum, np.sum), "mean": (F.mean, np.mean)}[name]
    x = normal(shape, seed)
    out = op(backend.tensor(x), axis=axis, keepdims=keepdims)
    expected = reference(x, axis=axis, keepdims=keepdims)
    assert out.shape == np.shape(expected)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-12)
    assert_gradcheck(lambda t: op(t, axis=axis, keepdims=keepdims), [backend.tensor(x)])


@given(case=shape_and_axes(), keepdims=st.booleans(), seed=seeds)
def test_max_gradcheck(backend, assert_gradcheck, case, keepdims, seed):
    shape, axis = case
    size = int(np.prod(shape))
    x = (np.random.default_rng(seed).permutation(size) * 0.1).reshape(shape)   # distinct: no ties
    out = F.max(backend.tensor(x), axis=axis, keepdims=keepdims)
    np.testing.assert_array_equal(out.numpy(), np.max(x, axis=axis, keepdims=keepdims))
    assert_gradcheck(lambda t: F.max(t, axis=axis, keepdims=keepdims), [backend.tensor(x)])


def test_max_ties_share_the_gradient_equally(backend):
    x = backend.tensor([[1.0, 3.0, 3.0], [2.0, 2.0, 2.0]], requires_grad=True, dtype=np.float64)
    F.max(x, axis=1).backward(backend.array([1.0, 6.0]))
    np.testing.assert_allclose(Tensor(x.grad).numpy(), [[0.0, 0.5, 0.5], [2.0, 2.0, 2.0]])


def test_reductions_of_a_zero_dimensional_tensor(backend):
    for op in (F.sum, F.mean, F.max):
        x = backend.tensor(np.float64(2.5), requires_grad=True)
        y = op(x)
        assert y.shape == () and y.item() == 2.5
        y.backward()
        assert float(Tensor(x.grad).numpy()) == 1.0


def test_reduction_axis_errors():
    with pytest.raises(ValueError, match="out of range"):
        F.sum(Tensor(np.ones((2, 3))), axis=2)
    with pytest.raises(ValueError, match="repeated axis"):
        F.mean(Tensor(np.ones((2, 3))), axis=(1, -1))


# ------------------------------------------------------------------ movement
@given(shape=shapes, seed=seeds, data=st.data())
def test_reshape_gradcheck(backend, assert_gradcheck, shape, seed, data):
    size = int(np.prod(shape))
    new_shape = data.draw(st.sampled_from([(size,), (1, size), (size, 1, 1), (-1,)]))
    x = normal(shape, seed)
    out = backend.tensor(x).reshape(new_shape)
    np.testing.assert_array_equal(out.numpy(), x.reshape(new_shape))
    assert_gradcheck(lambda t: t.reshape(new_shape), [backend.tensor(x)])


@given(shape=shapes, seed=seeds, data=st.data())
def test_permute_and_transpose_gradcheck(backend, assert_gradcheck, shape, seed, data):
    order = tuple(data.draw(st.permutations(range(len(shape)))))
    x = normal(shape, seed)
    np.testing.assert_array_equal(backend.tensor(x).permute(order).numpy(), x.transpose(order))
    assert_gradcheck(lambda t: t.permute(order), [backend.tensor(x)])
    assert_gradcheck(lambda t: t.transpose(), [backend.tensor(x)])
    if len(shape) >= 2:
        np.testing.assert_array_equal(F.transpose(backend.tensor(x), 0, -1).numpy(), np.swapaxes(x, 0, -1))
        assert_gradcheck(lambda t: F.transpose(t, 0, -1), [backend.tensor(x)])


BASIC_INDICES = [
    (slice(None), 1),
    (slice(0, 3, 2), slice(None, None, -1)),
    (Ellipsis, -1),
    (None, 0),
    (-1,),
]


@pytest.mark.parametrize("index", BASIC_INDICES, ids=[str(i) for i in range(len(BASIC_INDICES))])
def test_getitem_basic_gradcheck(backend, assert_gradcheck, index):
    x = normal((3, 4), 0)
    np.testing.assert_array_equal(backend.tensor(x)[index].numpy(), x[index])
    assert_gradcheck(lambda t: t[index], [backend.tensor(x)])


@given(seed=seeds, ids=st.lists(st.integers(-3, 2), min_size=1, max_size=6))
def test_getitem_integer_array_with_repeats_gradcheck(backend, assert_gradcheck, seed, ids):
    """Rows picked twice must receive both gradients (dx[ids] += dy would keep one)."""
    x = normal((3, 2), seed)
    index = np.array(ids)
    np.testing.assert_array_equal(backend.tensor(x)[backend.array(index)].numpy(), x[index])
    assert_gradcheck(lambda t: t[backend.array(index)], [backend.tensor(x)])
    assert_gradcheck(lambda t: t[backend.array(index), 1], [backend.tensor(x)])


def test_getitem_repeated_rows_accumulate(backend):
    x = backend.tensor(np.zeros((3, 2)), requires_grad=True)
    x[backend.array([0, 2, 0, 0])].backward(backend.array(np.ones((4, 2))))
    np.testing.assert_array_equal(Tensor(x.grad).numpy(), [[3, 3], [0, 0], [1, 1]])


@given(seed=seeds, data=st.data())
def test_getitem_boolean_mask_gradcheck(backend, assert_gradcheck, seed, data):
    x = normal((3, 4), seed)
    full_mask = data.draw(hnp.arrays(np.bool_, (3, 4)))
    row_mask = data.draw(hnp.arrays(np.bool_, (3,)))
    for mask in (full_mask, row_mask):
        out = backend.tensor(x)[backend.array(mask)]
        np.testing.assert_array_equal(out.numpy(), x[mask])
        if mask.any():
            assert_gradcheck(lambda t: t[backend.array(mask)], [backend.tensor(x)])


def test_getitem_boolean_mask_gradient_values(backend):
    x = backend.tensor(np.arange(6.0).reshape(2, 3), requires_grad=True)
    mask = np.array([[True, False, True], [False, True, False]])
    x[backend.array(mask)].backward(backend.array([1.0, 2.0, 3.0]))
    np.testing.assert_array_equal(Tensor(x.grad).numpy(), [[1.0, 0.0, 2.0], [0.0, 3.0, 0.0]])


@given(seed=seeds, sizes=st.lists(st.integers(1, 3), min_size=1, max_size=3), axis=st.integers(-2, 1))
def test_concatenate_gradcheck(backend, assert_gradcheck, seed, sizes, axis):
    arrays = []
    for i, size in enumerate(sizes):
        shape = [2, 2]
        shape[axis] = size
        arrays.append(normal(tuple(shape), seed + i))
    out = F.concatenate([backend.tensor(a) for a in arrays], axis=axis)
    np.testing.assert_array_equal(out.numpy(), np.concatenate(arrays, axis=axis))
    assert_gradcheck(lambda *ts: F.concatenate(list(ts), axis=axis), [backend.tensor(a) for a in arrays])


@given(seed=seeds, sizes=st.lists(st.integers(1, 3), min_size=1, max_size=3), gap=st.booleans())
def test_concatenate_view_of_adjacent_inputs(backend, assert_gradcheck, seed, sizes, gap):
    """view=True: inputs lying end to end in one buffer give a view of it (the same values, shared memory,
    the same gradients); inputs with a gap between them, or in another order, are copied as usual."""
    flat = backend.array(normal((3 * sum(sizes) + 3 * len(sizes),), seed), dtype=np.float64)
    parts, start = [], 0
    for size in sizes:
        parts.append(Tensor(flat[start:start + 3 * size].reshape(size, 3), requires_grad=True))
        start += 3 * size + (3 if gap else 0)
    out = F.concatenate(parts, axis=0, view=True)
    np.testing.assert_array_equal(out.numpy(), np.concatenate([p.numpy() for p in parts]))
    shares = np.shares_memory(out.data, flat) if backend.name == "numpy" else \
        out.data.data.ptr == flat.data.ptr
    assert shares == (not gap or len(sizes) == 1)
    flipped = F.concatenate(parts[::-1], axis=0, view=True)
    np.testing.assert_array_equal(flipped.numpy(), np.concatenate([p.numpy() for p in parts[::-1]]))
    assert_gradcheck(lambda *ts: F.concatenate(list(ts), axis=0, view=True), parts)


@given(seed=seeds, sizes=st.lists(st.integers(1, 3), min_size=1, max_size=3), axis=st.integers(0, 1))
def test_split_gradcheck(backend, assert_gradcheck, seed, sizes, axis):
    shape = [2, 2]
    shape[axis] = sum(sizes)
    x = normal(tuple(shape), seed)
    parts = F.split(backend.tensor(x), sizes, axis=axis)
    expected = np.split(x, np.cumsum(sizes)[:-1], axis=axis)
    for part, want in zip(parts, expected):
        np.testing.assert_array_equal(part.numpy(), want)
    # weight the parts differently so that a mix-up between them would show
    assert_gradcheck(lambda t: F.concatenate([p * float(i + 1) for i, p in enumerate(F.split(t, sizes, axis=axis))],
                                             axis=axis), [backend.tensor(x)])


def test_split_into_equal_parts_and_errors(backend):
    parts = F.split(backend.tensor(np.arange(6.0)), 3)
    assert [p.numpy().tolist() for p in parts] == [[0, 1], [2, 3], [4, 5]]
    with pytest.raises(ValueError, match="equal parts"):
        F.split(Tensor(np.ones(5)), 2)
    with pytest.raises(ValueError, match="add up"):
        F.split(Tensor(np.ones(5)), [2, 2])


@given(seed=seeds, count=st.integers(1, 3), shape=hnp.array_shapes(min_dims=0, max_dims=2, max_side=3),
       data=st.data())
def test_stack_gradcheck(backend, assert_gradcheck, seed, count, shape, data):
    axis = data.draw(st.integers(-(len(shape) + 1), len(shape)))
    arrays = [normal(shape, seed + i) for i in range(count)]
    out = F.stack([backend.tensor(a) for a in arrays], axis=axis)
    np.testing.assert_array_equal(out.numpy(), np.stack(arrays, axis=axis))
    assert_gradcheck(lambda *ts: F.stack(list(ts), axis=axis), [backend.tensor(a) for a in arrays])


# ------------------------------------------------------------------ products
@st.composite
def matmul_shapes(draw):
    """Operand shapes for matmul: batched with broadcasting, and 1-D operands on either side."""
    n, k, m = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    batch = draw(hnp.mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=2, max_side=2))
    batch_a, batch_b = batch.input_shapes
    kind = draw(st.sampled_from(["matrix", "vector_left", "vector_right", "vector_both"]))
    a = (k,) if kind in ("vector_left", "vector_both") else tuple(batch_a) + (n, k)
    b = (k,) if kind in ("vector_right", "vector_both") else tuple(batch_b) + (k, m)
    return a, b


@given(case=matmul_shapes(), seed=seeds)
def test_matmul_gradcheck(backend, assert_gradcheck, case, seed):
    shape_a, shape_b = case
    a, b = normal(shape_a, seed), normal(shape_b, seed + 1)
    out = backend.tensor(a) @ backend.tensor(b)
    np.testing.assert_allclose(out.numpy(), a @ b, rtol=1e-12, atol=1e-12)
    assert_gradcheck(F.matmul, [backend.tensor(a), backend.tensor(b)])


def test_matmul_errors():
    with pytest.raises(ValueError):
        F.matmul(Tensor(np.ones((2, 3))), Tensor(np.ones((2, 3))))
    with pytest.raises(ValueError, match="at least one dimension"):
        F.matmul(Tensor(np.float64(2.0)), Tensor(np.ones(3)))


@given(leading=hnp.array_shapes(min_dims=0, max_dims=2, max_side=3), features=st.integers(1, 3),
       outputs=st.integers(1, 3), seed=seeds)
def test_linear_gradcheck(backend, assert_gradcheck, leading, features, outputs, seed):
    x, weight = normal(tuple(leading) + (features,), seed), normal((outputs, features), seed + 1)
    out = F.linear(backend.tensor(x), backend.tensor(weight))
    assert out.shape == tuple(leading) + (outputs,)
    np.testing.assert_allclose(out.numpy(), x @ weight.T, rtol=1e-12, atol=1e-12)
    assert_gradcheck(F.linear, [backend.tensor(x), backend.tensor(weight)])


def test_linear_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match=r"linear: input has 4 features, weight expects 3"):
        F.linear(Tensor(np.ones((2, 4))), Tensor(np.ones((5, 3))))
