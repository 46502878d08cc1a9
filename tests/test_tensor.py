"""The autograd engine: graph traversal, accumulation, gradient checks, freeing, no_grad, dtypes."""
from __future__ import annotations

import gc
import sys
import weakref

import numpy as np
import pytest

import tinygrad_llm as tg
from tinygrad_llm import Function, Tensor, no_grad


def leaf(values, dtype=np.float64):
    return Tensor(np.asarray(values, dtype=dtype), requires_grad=True)


# ------------------------------------------------------------------ graph traversal and accumulation
def test_chain_of_20000_ops_backprops_without_recursion():
    x = leaf([1.0, 2.0])
    y = x
    for _ in range(20_000):
        y = y * 1.00001
    limit = sys.getrecursionlimit()
    y.sum().backward()
    assert sys.getrecursionlimit() == limit
    np.testing.assert_allclose(x.grad, np.full(2, 1.00001 ** 20_000), rtol=1e-10)


def test_tensor_used_twice_accumulates():
    x = leaf([1.0, -2.0, 3.0])
    (x * x).backward(np.ones(3))
    np.testing.assert_allclose(x.grad, 2 * x.data)


def test_diamond_graph_accumulates_both_paths():
    x = leaf([0.5, 1.5])
    a = x * 2.0            # shared node
    b = a + 1.0            # path 1
    c = a * 3.0            # path 2
    d = b * c              # d = (2x + 1) · 6x = 12x² + 6x
    d.backward(np.ones(2))
    np.testing.assert_allclose(x.grad, 24 * x.data + 6)


class _ScaleTakingPending(Function):
    """y = 3x, with the engine's pending protocol: records what was pending and adds it itself (or, when
    told to, returns no gradient, so that what was pending must survive)."""
    takes_pending = True
    log = []

    def forward(self, x, give_none=False):
        self.save(give_none=give_none)
        return 3 * x

    def backward(self, dy, pending):
        (give_none,) = self.saved
        type(self).log.append(pending)
        if give_none:
            return None
        return 3 * dy if pending[0] is None else 3 * dy + pending[0]


@pytest.mark.parametrize("give_none", [False, True])
def test_a_function_taking_pending_gradients_gets_the_other_uses_gradient_first(give_none):
    _ScaleTakingPending.log.clear()
    x = leaf([1.0, -2.0])
    h = x * 1.0
    scaled = _ScaleTakingPending.apply(h, give_none=give_none) * 2.0
    out = h * scaled                              # h's other use, after the scale: its gradient comes first
    upstream = np.array([1.0, 0.5])
    out.backward(upstream)
    (pending,) = _ScaleTakingPending.log
    np.testing.assert_allclose(pending[0], scaled.data * upstream)
    want = 6 * x.data * upstream + (0.0 if give_none else 6 * x.data * upstream)
    np.testing.assert_allclose(x.grad, want)


def test_leaf_reached_by_paths_of_different_depth():
    x = leaf([0.3, -0.7])
    deep = x
    for _ in range(5):
        deep = deep.tanh()
    out = deep + x * x + x.exp()
    out.backward(np.ones(2))
    # d/dx of tanh^5 composed, by the chain rule on the values
    derivative, value = np.ones(2), x.data.copy()
    for _ in range(5):
        value = np.tanh(value)
        derivative *= 1 - value ** 2
    np.testing.assert_allclose(x.grad, derivative + 2 * x.data + np.exp(x.data), rtol=1e-12)


def test_grad_accumulates_across_backward_calls_and_zero_grad_resets():
    x = leaf([1.0, 2.0])
    (x * 3.0).sum().backward()
    (x * 3.0).sum().backward()
    np.testing.assert_allclose(x.grad, [6.0, 6.0])
    x.zero_grad()
    assert x.grad is None


def test_leaf_grads_are_not_aliased():
    a, b = leaf([1.0, 2.0]), leaf([3.0, 4.0])
    upstream = np.ones(2)
    (a + b).backward(upstream)
    a.grad *= 10                          # an optimizer clipping in place must not touch b's gradient
    np.testing.assert_allclose(b.grad, [1.0, 1.0])
    np.testing.assert_allclose(upstream, [1.0, 1.0])


def test_retain_grad_keeps_intermediate_gradient():
    x = leaf([1.0, 2.0])
    h = (x * 2.0).retain_grad()
    (h * h).sum().backward()
    np.testing.assert_allclose(h.grad, 2 * h.data)
    np.testing.assert_allclose(x.grad, 8 * x.data)


def test_only_inputs_requiring_grad_get_gradients():
    x, c = leaf([1.0, 2.0]), Tensor(np.array([3.0, 4.0]))
    (x * c).sum().backward()
    np.testing.assert_allclose(x.grad, [3.0, 4.0])
    assert c.grad is None


# ------------------------------------------------------------------ the engine checks gradients
class WrongShapeGrad(Function):
    def forward(self, x):
        return x * 2

    def backward(self, dy):
        return dy.sum(axis=0)                 # drops an axis


class WrongDtypeGrad(Function):
    def forward(self, x):
        return x * 2

    def backward(self, dy):
        return (2 * dy).astype(np.float32)    # input is float64


class WrongCountGrad(Function):
    def forward(self, a, b):
        return a + b

    def backward(self, dy):
        return dy                             # one gradient for two inputs


def test_wrong_gradient_shape_raises_clear_error():
    x = leaf(np.ones((3, 2)))
    with pytest.raises(RuntimeError, match=r"WrongShapeGrad.*shape \(2,\).*shape \(3, 2\)"):
        WrongShapeGrad.apply(x).backward(np.ones((3, 2)))


def test_wrong_gradient_dtype_raises_clear_error():
    x = leaf(np.ones(3))
    with pytest.raises(RuntimeError, match=r"WrongDtypeGrad.*float32.*float64"):
        WrongDtypeGrad.apply(x).backward(np.ones(3))


def test_wrong_gradient_count_raises_clear_error():
    a, b = leaf([1.0]), leaf([2.0])
    with pytest.raises(RuntimeError, match=r"WrongCountGrad.*1 gradients for 2"):
        WrongCountGrad.apply(a, b).backward(np.ones(1))


def test_backward_argument_errors():
    x = leaf([1.0, 2.0])
    with pytest.raises(RuntimeError, match="one-element"):
        (x * 2.0).backward()
    with pytest.raises(ValueError, match="grad has shape"):
        (x * 2.0).backward(np.ones(3))
    with pytest.raises(RuntimeError, match="does not require grad"):
        Tensor(np.ones(2)).backward(np.ones(2))


# ------------------------------------------------------------------ freeing saved arrays
class SavesACopy(Function):
    """y = 3x, saving a fresh array so that the test can watch it being freed."""
    saved_refs: list = []

    def forward(self, x):
        copy = x * 3
        SavesACopy.saved_refs.append(weakref.ref(copy))
        self.save(copy=copy)
        return copy.copy()

    def backward(self, dy):
        (copy,) = self.saved
        return dy * 3


def test_saved_arrays_are_freed_after_backward():
    SavesACopy.saved_refs.clear()
    x = leaf(np.ones(1000))
    y = SavesACopy.apply(x).sum()
    gc.collect()
    assert SavesACopy.saved_refs[0]() is not None       # alive while the graph may still need it
    y.backward()
    gc.collect()
    assert SavesACopy.saved_refs[0]() is None            # freed once backward used it
    np.testing.assert_allclose(x.grad, 3.0)


def test_second_backward_raises_clear_error():
    x = leaf([1.0, 2.0])
    y = (x * x).sum()
    y.backward()
    with pytest.raises(RuntimeError, match="retain_graph=True"):
        y.backward()
    np.testing.assert_allclose(x.grad, 2 * x.data)       # the failed call added nothing


def test_second_backward_through_an_op_that_saves_nothing_also_raises():
    x = leaf([1.0, 2.0])
    y = (-x).sum()
    y.backward()
    with pytest.raises(RuntimeError, match="retain_graph=True"):
        y.backward()


def test_retain_graph_allows_a_second_backward():
    x = leaf([1.0, 2.0])
    y = (x * x).sum()
    y.backward(retain_graph=True)
    y.backward()
    np.testing.assert_allclose(x.grad, 4 * x.data)


def test_freed_saved_property_raises_clear_error():
    x = leaf([1.0])
    y = x * x
    function = y._ctx
    y.backward(np.ones(1))
    with pytest.raises(RuntimeError, match="already freed"):
        function.saved


# ------------------------------------------------------------------ no_grad, detach, numpy
class Recorder(Function):
    made: list = []

    def forward(self, x):
        Recorder.made.append(self)
        self.save(x=x)
        return x + 1

    def backward(self, dy):
        return dy


def test_no_grad_records_nothing():
    Recorder.made.clear()
    x = leaf([1.0, 2.0])
    with no_grad():
        y = Recorder.apply(x)
        z = y * x
    assert not y.requires_grad and not z.requires_grad
    assert y._ctx is None and z._ctx is None
    with pytest.raises(RuntimeError, match="already freed"):
        Recorder.made[0].saved                           # nothing kept
    assert tg.tensor.grad_enabled()                      # restored on exit
    assert Recorder.apply(x).requires_grad


def test_no_grad_restores_state_after_exception():
    with pytest.raises(ZeroDivisionError):
        with no_grad():
            1 / 0
    assert tg.tensor.grad_enabled()


def test_detach_cuts_the_graph_and_shares_data():
    x = leaf([1.0, 2.0])
    d = (x * 2.0).detach()
    assert not d.requires_grad and d._ctx is None
    y = (x * d).sum()
    y.backward()
    np.testing.assert_allclose(x.grad, d.data)          # d treated as a constant: no 4x term
    np.testing.assert_array_equal(d.numpy(), [2.0, 4.0])


def test_numpy_returns_the_array():
    values = np.arange(6.0).reshape(2, 3)
    out = Tensor(values).numpy()
    assert isinstance(out, np.ndarray)
    np.testing.assert_array_equal(out, values)


# ------------------------------------------------------------------ dtypes and construction
def test_python_floats_default_to_float32():
    assert Tensor(1.5).dtype == np.float32
    assert Tensor([1.0, 2.0]).dtype == np.float32
    assert (Tensor([1.0]) * 2.5).dtype == np.float32


def test_float64_arrays_stay_float64():
    x = Tensor(np.ones(3))
    assert x.dtype == np.float64
    assert (x * 2.0 + 1.0).dtype == np.float64          # Python numbers take the tensor's dtype
    assert (2.0 - x).dtype == np.float64
    assert Tensor([1.0], dtype=np.float64).dtype == np.float64


def test_integers_stay_integer_and_cannot_require_grad():
    assert Tensor([1, 2, 3]).dtype.kind == "i"
    with pytest.raises(TypeError, match="floating-point"):
        Tensor([1, 2, 3], requires_grad=True)
    with pytest.raises(TypeError, match="floating-point"):
        Tensor(np.arange(3), requires_grad=True)


def test_zero_dimensional_tensors():
    x = Tensor(np.float64(3.0), requires_grad=True)
    assert x.shape == () and x.dtype == np.float64
    y = x * x
    y.backward()
    assert x.grad.shape == () and float(x.grad) == 6.0
    assert y.item() == 9.0
    assert Tensor(np.ones((2, 3))).sum().shape == ()


def test_operators_match_numpy():
    a_values, b_values = np.array([[1.0, 2.0], [3.0, 4.0]]), np.array([0.5, -1.5])
    a, b = Tensor(a_values), Tensor(b_values)
    np.testing.assert_allclose((a + b).numpy(), a_values + b_values)
    np.testing.assert_allclose((1.0 - a).numpy(), 1.0 - a_values)
    np.testing.assert_allclose((2.0 / a).numpy(), 2.0 / a_values)
    np.testing.assert_allclose((a ** 2.0).numpy(), a_values ** 2)
    np.testing.assert_allclose((2.0 ** a).numpy(), 2.0 ** a_values)
    np.testing.assert_allclose((a @ b).numpy(), a_values @ b_values)
    np.testing.assert_allclose((-a).numpy(), -a_values)
    np.testing.assert_allclose(a[1, ::-1].numpy(), a_values[1, ::-1])
    np.testing.assert_allclose(a.T.numpy(), a_values.T)
    np.testing.assert_allclose((np.float64(3.0) * a).numpy(), 3.0 * a_values)


def test_bool_of_tensor_is_an_error():
    with pytest.raises(TypeError, match="ambiguous"):
        bool(Tensor([1.0]))
