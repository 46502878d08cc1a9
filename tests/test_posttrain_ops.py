"""Post-training ops: log_sigmoid, sequence_logprobs, dpo_loss, lora_weight.

Each: a float64 gradcheck against a random upstream gradient with hypothesis-chosen shapes and values,
the op against its composed reference (forward and backward), invariants, and errors for bad input.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import tinygrad_llm.functional as F
from tinygrad_llm import Tensor
from tinygrad_llm.ops.preference import dpo_loss_reference, log_sigmoid_reference, sequence_logprobs_reference

from op_helpers import assert_same_forward_and_backward, normal

seeds = st.integers(0, 2**31 - 1)


# ------------------------------------------------------------------ log_sigmoid
@given(shape=st.sampled_from([(1,), (5,), (2, 3)]), seed=seeds, scale=st.sampled_from([0.1, 3.0, 30.0]))
def test_log_sigmoid_gradcheck(backend, assert_gradcheck, shape, seed, scale):
    assert_gradcheck(F.log_sigmoid, [backend.tensor(normal(shape, seed, scale))])


@given(seed=seeds)
def test_log_sigmoid_matches_composed_reference(backend, seed):
    assert_same_forward_and_backward(backend, F.log_sigmoid, log_sigmoid_reference, [normal((4, 3), seed, 4.0)])


@given(st.lists(st.floats(-1e4, 1e4, allow_nan=False, width=32), min_size=1, max_size=20))
def test_log_sigmoid_is_finite_and_accurate_in_float32(values):
    x = np.array(values, dtype=np.float32)
    t = Tensor(x, requires_grad=True)
    y = F.log_sigmoid(t)
    y.backward(np.ones_like(x))
    exact = -np.logaddexp(0.0, -x.astype(np.float64))                 # log σ(x) in float64
    assert y.dtype == np.float32 and np.isfinite(y.numpy()).all()
    np.testing.assert_allclose(y.numpy(), exact, rtol=2e-6, atol=1e-30)
    with np.errstate(over="ignore"):
        slope = 1.0 / (1.0 + np.exp(x.astype(np.float64)))            # σ(−x); exp overflows to inf: σ = 0
    np.testing.assert_allclose(t.grad, slope, rtol=2e-6, atol=1e-37)
    assert ((t.grad >= 0) & (t.grad <= 1)).all()


def test_log_sigmoid_keeps_the_tail_the_tanh_form_loses():
    x = np.array([-30.0, -100.0, -1e4], dtype=np.float32)
    y = F.log_sigmoid(Tensor(x)).numpy()
    np.testing.assert_allclose(y, x, rtol=1e-6)                         # log σ(x) ≈ x for x ≪ 0
    with np.errstate(divide="ignore"):
        tanh_form = np.log(0.5 * (1 + np.tanh(x / 2)))                  # rounds σ to 0 in float32
    assert np.isinf(tanh_form).any()


# ------------------------------------------------------------------ sequence_logprobs
def sequence_inputs(batch, time, vocab, seed, scale=2.0):
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((batch, time, vocab)) * scale
    targets = rng.integers(0, vocab, (batch, time))
    mask = (rng.random((batch, time)) < 0.6).astype(np.float64)
    return logits, targets, mask


@given(batch=st.integers(1, 3), time=st.integers(1, 4), vocab=st.integers(1, 5), seed=seeds)
def test_sequence_logprobs_gradcheck(backend, assert_gradcheck, batch, time, vocab, seed):
    logits, targets, mask = sequence_inputs(batch, time, vocab, seed)
    assert_gradcheck(lambda x: F.sequence_logprobs(x, targets, mask), [backend.tensor(logits)])


@given(seed=seeds)
def test_sequence_logprobs_matches_composed_reference(backend, seed):
    logits, targets, mask = sequence_inputs(3, 5, 7, seed)
    assert_same_forward_and_backward(backend, lambda x: F.sequence_logprobs(x, targets, mask),
                                     lambda x: sequence_logprobs_reference(x, targets, mask), [logits])


@given(seed=seeds, shift=st.floats(-50, 50))
def test_sequence_logprobs_invariants(seed, shift):
    logits, targets, mask = sequence_inputs(2, 6, 5, seed)
    value = F.sequence_logprobs(Tensor(logits), targets, mask).numpy()
    assert value.shape == (2,) and (value <= 1e-12).all()                 # log-probabilities of 0/1 masks
    shifted = F.sequence_logprobs(Tensor(logits + shift), targets, mask).numpy()
    np.testing.assert_allclose(shifted, value, rtol=1e-9, atol=1e-9)     # softmax ignores a constant per row
    first, second = mask * (np.arange(6) < 3), mask * (np.arange(6) >= 3)
    parts = F.sequence_logprobs(Tensor(logits), targets, first).numpy() + \
        F.sequence_logprobs(Tensor(logits), targets, second).numpy()
    np.testing.assert_allclose(parts, value, rtol=1e-12, atol=1e-12)     # additive over positions
    assert (F.sequence_logprobs(Tensor(logits), targets, np.zeros_like(mask)).numpy() == 0).all()


def test_sequence_logprobs_gradient_rows_sum_to_zero():
    logits, targets, mask = sequence_inputs(2, 4, 6, 3)
    x = Tensor(logits, requires_grad=True)
    F.sequence_logprobs(x, targets, mask).backward(np.array([0.7, -1.3]))
    grad = x.grad
    np.testing.assert_allclose(grad.sum(-1), 0.0, atol=1e-12)
    assert (grad[mask == 0] == 0).all()


def test_sequence_logprobs_rejects_bad_input():
    logits = np.zeros((2, 3, 4))
    with pytest.raises(IndexError):
        F.sequence_logprobs(Tensor(logits), np.full((2, 3), 4), np.ones((2, 3)))
    with pytest.raises(ValueError):
        F.sequence_logprobs(Tensor(logits), np.zeros((2, 2), dtype=int), np.ones((2, 2)))
    with pytest.raises(TypeError):
        F.sequence_logprobs(Tensor(logits), np.zeros((2, 3)), np.ones((2, 3)))


# ------------------------------------------------------------------ dpo_loss
def dpo_inputs(batch, seed):
    return [normal((batch,), seed + i, 5.0) for i in range(4)]


@given(batch=st.integers(1, 6), seed=seeds, beta=st.sampled_from([0.01, 0.1, 1.0, 5.0]))
def test_dpo_loss_gradcheck(backend, assert_gradcheck, batch, seed, beta):
    inputs = [backend.tensor(a) for a in dpo_inputs(batch, seed)]
    assert_gradcheck(lambda *t: F.dpo_loss(*t, beta=beta), inputs)


@given(seed=seeds, beta=st.sampled_from([0.1, 2.0]))
def test_dpo_loss_matches_composed_reference(backend, seed, beta):
    assert_same_forward_and_backward(backend, lambda *t: F.dpo_loss(*t, beta=beta),
                                     lambda *t: dpo_loss_reference(*t, beta=beta), dpo_inputs(4, seed))


@given(seed=seeds)
def test_dpo_loss_invariants(seed):
    chosen, rejected, _, _ = dpo_inputs(5, seed)
    same = F.dpo_loss(Tensor(chosen), Tensor(rejected), Tensor(chosen), Tensor(rejected)).item()
    assert same == pytest.approx(np.log(2.0), rel=1e-12)                 # policy = reference: z = 0
    policy = [Tensor(a, requires_grad=True) for a in dpo_inputs(5, seed)]
    loss = F.dpo_loss(*policy, beta=0.5)
    assert loss.item() > 0
    loss.backward()
    assert (policy[0].grad <= 0).all() and (policy[1].grad >= 0).all()  # raise chosen, lower rejected
    np.testing.assert_allclose(policy[0].grad, -policy[1].grad)
    np.testing.assert_allclose(policy[0].grad, -policy[2].grad)


def test_dpo_loss_stays_finite_for_huge_margins():
    big = np.array([1e5, -1e5], dtype=np.float32)
    zero = np.zeros(2, dtype=np.float32)
    loss = F.dpo_loss(Tensor(big, requires_grad=True), Tensor(zero), Tensor(zero), Tensor(zero), beta=1.0)
    assert np.isfinite(loss.item()) and loss.item() == pytest.approx(0.5e5, rel=1e-6)
    with pytest.raises(ValueError):
        F.dpo_loss(Tensor(np.zeros(2)), Tensor(np.zeros(3)), Tensor(np.zeros(2)), Tensor(np.zeros(2)))


# ------------------------------------------------------------------ lora_weight
@given(out=st.integers(1, 4), inner=st.integers(1, 4), rank=st.integers(1, 3), seed=seeds,
       scale=st.sampled_from([0.5, 2.0]))
def test_lora_weight_gradcheck(backend, assert_gradcheck, out, inner, rank, seed, scale):
    w, a, b = normal((out, inner), seed), normal((rank, inner), seed + 1), normal((out, rank), seed + 2)
    assert_gradcheck(lambda *t: F.lora_weight(*t, scale=scale), [backend.tensor(w), backend.tensor(a), backend.tensor(b)])


def test_lora_weight_value_and_frozen_base():
    w, a, b = normal((3, 4), 0), normal((2, 4), 1), normal((3, 2), 2)
    merged = F.lora_weight(Tensor(w), Tensor(a), Tensor(b), 0.5).numpy()
    np.testing.assert_allclose(merged, w + 0.5 * b @ a, rtol=1e-12)
    np.testing.assert_array_equal(F.lora_weight(Tensor(w), Tensor(a), Tensor(np.zeros((3, 2))), 4.0).numpy(), w)
    frozen, ta, tb = Tensor(w), Tensor(a, requires_grad=True), Tensor(b, requires_grad=True)
    x = Tensor(normal((5, 4), 3))
    F.sum(F.linear(x, F.lora_weight(frozen, ta, tb, 0.5))).backward()
    assert frozen.grad is None and ta.grad.shape == (2, 4) and tb.grad.shape == (3, 2)
    with pytest.raises(ValueError):
        F.lora_weight(Tensor(w), Tensor(a), Tensor(normal((3, 3), 4)), 1.0)
