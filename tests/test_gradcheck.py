"""The checker itself: it must pass correct backwards and fail wrong ones, including subtle ones."""
from __future__ import annotations

import numpy as np
import pytest

import tinygrad_llm.functional as F
from tinygrad_llm import Function, Tensor
from tinygrad_llm.gradcheck import GradcheckError, gradcheck


class SignFlippedMul(Function):
    """y = a · b with db's sign flipped."""

    def forward(self, a, b):
        self.save(a=a, b=b)
        return a * b

    def backward(self, dy):
        a, b = self.saved
        return dy * b, -dy * a


class SoftmaxWithoutSubtraction(Function):
    """softmax whose backward forgets the −Σ dy·y term: returns dy · y."""

    def forward(self, x):
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        y = e / e.sum(axis=-1, keepdims=True)
        self.save(y=y)
        return y

    def backward(self, dy):
        (y,) = self.saved
        return dy * y


class SoftmaxWrongOnlyForVaryingUpstream(Function):
    """softmax whose backward subtracts the mean of dy instead of Σ dy·y.

    For a constant upstream gradient (what a check of Σ softmax(x) feeds it) both give zero, so a summed
    check passes this broken backward; a random upstream gradient exposes it.
    """

    def forward(self, x):
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        y = e / e.sum(axis=-1, keepdims=True)
        self.save(y=y)
        return y

    def backward(self, dy):
        (y,) = self.saved
        return y * (dy - dy.mean(axis=-1, keepdims=True))


class WrongAtOneElement(Function):
    """y = x² with the gradient of element (1, 2) off by 1 %."""

    def forward(self, x):
        self.save(x=x)
        return x * x

    def backward(self, dy):
        (x,) = self.saved
        dx = 2 * x * dy
        dx[1, 2] *= 1.01
        return dx


def random(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


def test_correct_backward_passes():
    result = gradcheck(lambda a, b: a * b + a.exp(), [random(3, 4), random(3, 4, seed=1)])
    assert result.ok
    assert result.checked_elements == 24
    assert result.worst_relative_error < 1e-6
    assert "passed" in str(result)


def test_sign_flipped_backward_fails():
    result = gradcheck(lambda a, b: SignFlippedMul.apply(a, b), [random(2, 3), random(2, 3, seed=1)])
    assert not result.ok
    assert result.worst_input == 1                       # the flipped gradient is b's
    assert result.analytic == pytest.approx(-result.numeric, rel=1e-6)
    assert "FAILED" in str(result)


def test_raise_on_failure_raises_gradcheck_error():
    with pytest.raises(GradcheckError, match="FAILED"):
        gradcheck(lambda a, b: SignFlippedMul.apply(a, b), [random(2), random(2, seed=1)], raise_on_failure=True)


def test_softmax_backward_without_subtraction_fails():
    result = gradcheck(lambda x: SoftmaxWithoutSubtraction.apply(x), [random(3, 5)])
    assert not result.ok
    assert gradcheck(lambda x: F.softmax(x), [random(3, 5)]).ok     # the real one passes


def test_bug_invisible_to_a_summed_check_is_caught_with_random_upstream():
    x = random(3, 5)
    summed = gradcheck(lambda t: SoftmaxWrongOnlyForVaryingUpstream.apply(t).sum(), [x])
    assert summed.ok                                     # Σ softmax is constant: the broken backward slips by
    result = gradcheck(lambda t: SoftmaxWrongOnlyForVaryingUpstream.apply(t), [x])
    assert not result.ok                                 # the random upstream gradient exposes it


def test_reports_where_the_worst_error_is():
    result = gradcheck(lambda x: WrongAtOneElement.apply(x), [random(3, 4) + 3.0])
    assert not result.ok
    assert result.worst_input == 0 and result.worst_index == (1, 2)
    assert result.worst_relative_error == pytest.approx(0.01 / 1.01, rel=1e-3)


def test_integer_inputs_are_passed_through_unchecked():
    ids = np.array([0, 2, 2, 1])
    weight = random(3, 4)
    result = gradcheck(lambda i, w: F.embedding(i, w), [ids, weight])
    assert result.ok and result.checked_elements == weight.size


def test_max_elements_per_input_samples_a_subset():
    result = gradcheck(lambda x: x.tanh(), [random(10, 10)], max_elements_per_input=7)
    assert result.ok and result.checked_elements == 7


def test_rejects_float32_output_and_no_float_inputs():
    with pytest.raises(TypeError, match="float64"):
        gradcheck(lambda x: x.astype(np.float32), [random(2)])
    with pytest.raises(ValueError, match="no floating-point input"):
        gradcheck(lambda i: Tensor(np.ones(2)), [np.arange(2)])
