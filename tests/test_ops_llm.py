"""The fused LLM ops: rms_norm, swiglu, rope, causal_attention, cross_entropy, and their packed forms
(rope_attention, swiglu on gate‖up, linear_cross_entropy, rms_norm's plain and chunked paths).

For each: a float64 gradcheck with hypothesis-chosen shapes (size-1 axes, T = 1, GQA ratios 1/2/4, the
cached Tk > Tq case, ignore_index), the fused op against its composed `*_reference` (forward and
backward), the op's invariants, float32 against float64, and clear errors for bad input.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import tinygrad_llm.functional as F
from tinygrad_llm import Tensor
from tinygrad_llm.ops.activation import swiglu_reference
from tinygrad_llm.ops.attention import causal_attention_reference
from tinygrad_llm.ops.loss import cross_entropy_reference
from tinygrad_llm.ops.norm import rms_norm_reference
from tinygrad_llm.ops.rope import rope_angles, rope_reference, rotate_heads_into, rotate_into, wide_tables

from op_helpers import assert_same_forward_and_backward, normal, relative_error, run

seeds = st.integers(0, 2**31 - 1)


def assert_float32_close_to_float64(backend, fn, arrays, tolerance=1e-5):
    out64, grads64 = run(backend, fn, arrays, dtype=np.float64)
    out32, grads32 = run(backend, fn, arrays, dtype=np.float32)
    assert out32.dtype == np.float32
    assert relative_error(out32, out64) < tolerance
    for grad32, grad64 in zip(grads32, grads64):
        assert grad32.dtype == np.float32
        assert relative_error(grad32, grad64) < tolerance


# ------------------------------------------------------------------ rms_norm
@given(leading=hnp.array_shapes(min_dims=0, max_dims=2, max_side=3), channels=st.integers(1, 5), seed=seeds,
       scale=st.sampled_from([0.01, 1.0, 10.0]))
def test_rms_norm_gradcheck_and_reference(backend, assert_gradcheck, leading, channels, seed, scale):
    x, weight = normal(tuple(leading) + (channels,), seed, scale), normal((channels,), seed + 1)
    assert_gradcheck(F.rms_norm, [backend.tensor(x), backend.tensor(weight)])
    assert_same_forward_and_backward(backend, F.rms_norm, rms_norm_reference, [x, weight])


def test_rms_norm_forward_formula(backend):
    x, weight = normal((2, 3, 8), 0), normal((8,), 1)
    expected = x / np.sqrt((x ** 2).mean(axis=-1, keepdims=True) + 1e-5) * weight
    np.testing.assert_allclose(F.rms_norm(backend.tensor(x), backend.tensor(weight)).numpy(), expected, rtol=1e-12)


@given(seed=seeds, factor=st.floats(1e-3, 1e3))
def test_rms_norm_is_invariant_to_scaling_its_input(backend, seed, factor):
    x, weight = normal((3, 6), seed), normal((6,), seed + 1)
    y = F.rms_norm(backend.tensor(x), backend.tensor(weight), eps=0.0).numpy()
    y_scaled = F.rms_norm(backend.tensor(x * factor), backend.tensor(weight), eps=0.0).numpy()
    np.testing.assert_allclose(y_scaled, y, rtol=1e-10, atol=1e-12)
    # scale invariance means moving x along itself changes nothing: each row of dx is orthogonal to x
    xt = backend.tensor(x, requires_grad=True)
    F.rms_norm(xt, backend.tensor(weight), eps=0.0).backward(backend.array(normal((3, 6), seed + 2)))
    np.testing.assert_allclose((Tensor(xt.grad).numpy() * x).sum(axis=-1), 0.0, atol=1e-10)


def test_rms_norm_float32_matches_float64(backend):
    assert_float32_close_to_float64(backend, F.rms_norm, [normal((4, 16, 64), 0), normal((64,), 1) + 1.0])


def test_rms_norm_shape_mismatch_is_a_clear_error(backend):
    with pytest.raises(ValueError, match=r"rms_norm: weight shape \(5,\) does not match the last axis"):
        F.rms_norm(backend.tensor(np.ones((2, 4))), backend.tensor(np.ones(5)))
    with pytest.raises(ValueError, match="rms_norm"):
        F.rms_norm(backend.tensor(np.ones((2, 4))), backend.tensor(np.ones((1, 4))))


# ------------------------------------------------------------------ swiglu
@given(shape=hnp.array_shapes(min_dims=1, max_dims=3, max_side=4), seed=seeds,
       scale=st.sampled_from([0.5, 1.0, 5.0]))
def test_swiglu_gradcheck_and_reference(backend, assert_gradcheck, shape, seed, scale):
    gate, up = normal(shape, seed, scale), normal(shape, seed + 1)
    expected = gate / (1 + np.exp(-gate)) * up
    np.testing.assert_allclose(F.swiglu(backend.tensor(gate), backend.tensor(up)).numpy(), expected,
                               rtol=1e-12, atol=1e-15)
    assert_gradcheck(F.swiglu, [backend.tensor(gate), backend.tensor(up)])
    assert_same_forward_and_backward(backend, F.swiglu, swiglu_reference, [gate, up])


def test_swiglu_huge_gates_stay_finite(backend):
    gate = backend.tensor(np.array([-1e4, 1e4], dtype=np.float32), requires_grad=True)
    up = backend.tensor(np.array([2.0, 3.0], dtype=np.float32), requires_grad=True)
    y = F.swiglu(gate, up)
    y.backward(backend.array(np.ones(2, dtype=np.float32)))
    np.testing.assert_allclose(y.numpy(), [0.0, 3e4])
    np.testing.assert_allclose(Tensor(gate.grad).numpy(), [0.0, 3.0])
    np.testing.assert_allclose(Tensor(up.grad).numpy(), [0.0, 1e4])


def test_swiglu_float32_matches_float64(backend):
    assert_float32_close_to_float64(backend, F.swiglu, [normal((4, 16, 64), 0, 2.0), normal((4, 16, 64), 1)])


def test_swiglu_shape_mismatch_is_a_clear_error(backend):
    with pytest.raises(ValueError, match="swiglu: gate"):
        F.swiglu(backend.tensor(np.ones((2, 4))), backend.tensor(np.ones((2, 3))))


# ------------------------------------------------------------------ rope
@st.composite
def rope_case(draw):
    batch, heads, length = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.integers(1, 3))
    head_dim = draw(st.sampled_from([2, 4, 6]))
    positions = draw(st.one_of(
        st.none(),
        st.integers(0, 50),                                                # an offset
        st.lists(st.integers(0, 100), min_size=length, max_size=length).map(np.array)))   # explicit
    theta = draw(st.sampled_from([10000.0, 10.0]))
    return (batch, heads, length, head_dim), positions, theta


@given(case=rope_case(), seed=seeds)
def test_rope_gradcheck_and_reference(backend, assert_gradcheck, case, seed):
    shape, positions, theta = case
    x = normal(shape, seed)
    assert_gradcheck(lambda t: F.rope(t, positions, theta), [backend.tensor(x)])
    assert_same_forward_and_backward(backend, lambda t: F.rope(t, positions, theta),
                                     lambda t: rope_reference(t, positions, theta), [x])


def test_rope_rotates_dimension_i_with_i_plus_half(backend):
    """Rotate-half pairing, checked by hand: position 1, D = 4, θ = 100 -> angles 1 and 1/10."""
    x = np.array([1.0, 2.0, 3.0, 4.0]).reshape(1, 1, 1, 4)
    y = F.rope(backend.tensor(x), positions=1, theta=100.0).numpy().ravel()
    a = np.array([1.0, 0.1])
    x1, x2 = np.array([1.0, 2.0]), np.array([3.0, 4.0])
    np.testing.assert_allclose(y, np.concatenate([x1 * np.cos(a) - x2 * np.sin(a), x2 * np.cos(a) + x1 * np.sin(a)]))
    np.testing.assert_array_equal(F.rope(backend.tensor(x), positions=0).numpy(), x)   # position 0: identity


@given(case=rope_case(), seed=seeds)
def test_rope_preserves_norms(backend, case, seed):
    shape, positions, theta = case
    x = normal(shape, seed)
    y = F.rope(backend.tensor(x), positions, theta).numpy()
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-12)


@given(seed=seeds, offset=st.integers(0, 6), length=st.integers(1, 3))
def test_rope_at_an_offset_equals_slicing_a_longer_sequence(backend, seed, offset, length):
    long = normal((2, 2, offset + length + 2, 4), seed)
    full = F.rope(backend.tensor(long)).numpy()
    window = long[:, :, offset:offset + length]
    np.testing.assert_allclose(F.rope(backend.tensor(window), positions=offset).numpy(),
                               full[:, :, offset:offset + length], rtol=1e-12, atol=1e-14)
    explicit = np.arange(offset, offset + length)
    np.testing.assert_allclose(F.rope(backend.tensor(window), positions=explicit).numpy(),
                               full[:, :, offset:offset + length], rtol=1e-12, atol=1e-14)


@given(seed=seeds, m=st.integers(0, 30), n=st.integers(0, 30), shift=st.integers(0, 30))
def test_rope_scores_depend_only_on_relative_position(backend, seed, m, n, shift):
    q, k = normal((1, 1, 1, 8), seed), normal((1, 1, 1, 8), seed + 1)

    def score(position_q, position_k):
        rotated_q = F.rope(backend.tensor(q), positions=position_q).numpy()
        rotated_k = F.rope(backend.tensor(k), positions=position_k).numpy()
        return float((rotated_q * rotated_k).sum())

    assert score(m + shift, n + shift) == pytest.approx(score(m, n), rel=1e-9, abs=1e-12)


def test_rope_float32_matches_float64(backend):
    assert_float32_close_to_float64(backend, lambda t: F.rope(t, positions=100), [normal((2, 4, 32, 16), 0)])


def test_rope_bad_input_is_a_clear_error(backend):
    x = backend.tensor(np.ones((1, 2, 3, 4)))
    with pytest.raises(ValueError, match="D even"):
        F.rope(backend.tensor(np.ones((1, 2, 3, 5))))
    with pytest.raises(ValueError, match=r"\(B, H, T, D\)"):
        F.rope(backend.tensor(np.ones((2, 3, 4))))
    with pytest.raises(ValueError, match=r"positions must have shape \(3,\)"):
        F.rope(x, positions=np.arange(4))
    with pytest.raises(ValueError, match="non-negative"):
        F.rope(x, positions=-1)
    with pytest.raises(TypeError, match="integers"):
        F.rope(x, positions=np.array([0.0, 1.0, 2.0]))


@given(seed=seeds, heads=st.integers(1, 4), half=st.integers(1, 4), time=st.integers(1, 5))
def test_rotate_heads_into_equals_rope_per_head_with_its_scale(seed, heads, half, time):
    """The token-major rotation of the packed CPU path (scaled signed tables) against rotate_into, head by
    head on a strided slice of a wider array; rotating back with −sin_signed gives x times scale²."""
    rng = np.random.default_rng(seed)
    head_dim = 2 * half
    wide = rng.standard_normal((2, time, heads + 1, head_dim))            # a spare head: x is a strided slice
    x = wide[:, :, :heads]
    scales = rng.uniform(0.5, 2.0, heads)
    cos, sin = rope_angles(np.arange(time), head_dim, 10000.0)
    cos_wide, sin_signed = wide_tables(cos, sin, scales)
    out = rotate_heads_into(x, cos_wide, sin_signed, np.empty(x.shape))
    expected = np.empty((2, heads, time, head_dim))
    rotate_into(x.transpose(0, 2, 1, 3), cos, sin, expected)              # (B, T, n, D) -> (B, n, T, D)
    np.testing.assert_allclose(out, expected.transpose(0, 2, 1, 3) * scales[:, None], atol=1e-12)
    back = rotate_heads_into(out, cos_wide, -sin_signed, np.empty(x.shape))
    np.testing.assert_allclose(back, x * (scales ** 2)[:, None], atol=1e-12)


# ------------------------------------------------------------------ causal_attention
@st.composite
def attention_case(draw):
    """q (B, H, Tq, D), k and v (B, Hkv, Tk, D) with H = G · Hkv, G in {1, 2, 4}, Tk = Tq + cached keys."""
    batch = draw(st.integers(1, 2))
    group = draw(st.sampled_from([1, 2, 4]))
    kv_heads = draw(st.integers(1, 2)) if group < 4 else 1
    query_len = draw(st.integers(1, 3))
    key_len = query_len + draw(st.sampled_from([0, 0, 1, 2]))
    head_dim = draw(st.sampled_from([1, 2, 3]))
    return (batch, kv_heads * group, query_len, head_dim), (batch, kv_heads, key_len, head_dim)


@given(case=attention_case(), seed=seeds, scale=st.sampled_from([0.5, 2.0]))
def test_causal_attention_gradcheck_and_reference(backend, assert_gradcheck, case, seed, scale):
    q_shape, kv_shape = case
    q, k, v = normal(q_shape, seed, scale), normal(kv_shape, seed + 1, scale), normal(kv_shape, seed + 2)
    assert_gradcheck(F.causal_attention, [backend.tensor(q), backend.tensor(k), backend.tensor(v)],
                     max_elements_per_input=24)
    assert_same_forward_and_backward(backend, F.causal_attention, causal_attention_reference, [q, k, v])


@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("query_len, key_len", [(1, 1), (1, 3), (3, 3), (2, 4)])
def test_causal_attention_gradcheck_fixed_cases(backend, assert_gradcheck, group, query_len, key_len):
    """The cases the hypothesis search must not miss: every GQA ratio with T = 1, Tk = Tq and cached keys."""
    q = normal((1, 2 * group, query_len, 2), group)
    k, v = normal((1, 2, key_len, 2), 10 + key_len), normal((1, 2, key_len, 2), 20 + query_len)
    assert_gradcheck(F.causal_attention, [backend.tensor(q), backend.tensor(k), backend.tensor(v)])


def test_causal_attention_forward_by_hand(backend):
    """Tq = Tk = 2, D = 1: query 0 sees only key 0; query 1 averages both by softmax weight."""
    q = np.array([1.0, 2.0]).reshape(1, 1, 2, 1)
    k = np.array([0.5, -1.0]).reshape(1, 1, 2, 1)
    v = np.array([3.0, 7.0]).reshape(1, 1, 2, 1)
    out = F.causal_attention(backend.tensor(q), backend.tensor(k), backend.tensor(v)).numpy().ravel()
    weights = np.exp([2.0 * 0.5, 2.0 * -1.0])
    weights /= weights.sum()
    np.testing.assert_allclose(out, [3.0, weights @ np.array([3.0, 7.0])], rtol=1e-12)


@given(case=attention_case(), seed=seeds, data=st.data())
def test_causal_attention_output_ignores_the_future(backend, case, seed, data):
    q_shape, kv_shape = case
    q, k, v = normal(q_shape, seed), normal(kv_shape, seed + 1), normal(kv_shape, seed + 2)
    query_len, key_len = q_shape[2], kv_shape[2]
    t = data.draw(st.integers(0, query_len - 1))                   # a query position
    visible = key_len - query_len + t                               # its last visible key
    q2, k2, v2 = q.copy(), k.copy(), v.copy()
    q2[:, :, t + 1:] += 5.0
    k2[:, :, visible + 1:] -= 3.0
    v2[:, :, visible + 1:] *= -2.0
    before = F.causal_attention(backend.tensor(q), backend.tensor(k), backend.tensor(v)).numpy()
    after = F.causal_attention(backend.tensor(q2), backend.tensor(k2), backend.tensor(v2)).numpy()
    np.testing.assert_allclose(after[:, :, :t + 1], before[:, :, :t + 1], rtol=1e-12, atol=1e-14)


def test_causal_attention_gradient_does_not_reach_future_keys(backend):
    q, k, v = normal((1, 2, 4, 3), 0), normal((1, 1, 4, 3), 1), normal((1, 1, 4, 3), 2)
    tensors = [backend.tensor(a, requires_grad=True) for a in (q, k, v)]
    out = F.causal_attention(*tensors)
    upstream = np.zeros(out.shape)
    upstream[:, :, 1] = 1.0                                         # only the output at t = 1
    out.backward(backend.array(upstream))
    for tensor in tensors:
        grad = Tensor(tensor.grad).numpy()
        np.testing.assert_array_equal(grad[:, :, 2:], 0.0)
        assert np.abs(grad[:, :, :2]).sum() > 0


@given(seed=seeds, cached=st.integers(1, 4), query_len=st.integers(1, 3), group=st.sampled_from([1, 2, 4]))
def test_causal_attention_with_cached_keys_equals_the_last_rows(backend, seed, cached, query_len, group):
    """Tk > Tq: the new queries attend exactly as the last Tq rows of the full computation."""
    key_len = cached + query_len
    q = normal((1, group, key_len, 4), seed)
    k, v = normal((1, 1, key_len, 4), seed + 1), normal((1, 1, key_len, 4), seed + 2)
    full = F.causal_attention(backend.tensor(q), backend.tensor(k), backend.tensor(v)).numpy()
    tail = F.causal_attention(backend.tensor(q[:, :, -query_len:]), backend.tensor(k), backend.tensor(v)).numpy()
    np.testing.assert_allclose(tail, full[:, :, -query_len:], rtol=1e-12, atol=1e-14)


def test_grouped_query_attention_equals_repeated_kv_heads(backend):
    q, k, v = normal((2, 4, 3, 2), 0), normal((2, 2, 3, 2), 1), normal((2, 2, 3, 2), 2)
    grouped = F.causal_attention(backend.tensor(q), backend.tensor(k), backend.tensor(v)).numpy()
    repeated = F.causal_attention(backend.tensor(q), backend.tensor(np.repeat(k, 2, axis=1)),
                                  backend.tensor(np.repeat(v, 2, axis=1))).numpy()
    np.testing.assert_allclose(grouped, repeated, rtol=1e-12)


def test_causal_attention_saves_no_square_matrix(backend):
    q, k, v = (backend.tensor(normal((1, 2, 16, 4), i), requires_grad=True) for i in range(3))
    out = F.causal_attention(q, k, v)
    largest_saved = max(int(np.prod(a.shape)) for a in out._ctx.saved if hasattr(a, "shape"))
    assert largest_saved <= 1 * 2 * 16 * 4                           # nothing of size T × T kept


def test_causal_attention_large_scores_stay_finite(backend):
    q = np.full((1, 1, 3, 2), 300.0, dtype=np.float32)
    k = np.array([[1.0, 1.0], [-1.0, -1.0], [1.0, 1.0]], dtype=np.float32).reshape(1, 1, 3, 2) * 300.0
    v = normal((1, 1, 3, 2), 0).astype(np.float32)
    tensors = [backend.tensor(a, requires_grad=True) for a in (q, k, v)]
    out = F.causal_attention(*tensors)
    out.backward(backend.array(np.ones((1, 1, 3, 2), dtype=np.float32)))
    assert np.all(np.isfinite(out.numpy()))
    assert all(np.all(np.isfinite(Tensor(t.grad).numpy())) for t in tensors)
    np.testing.assert_allclose(out.numpy()[0, 0, 1], v[0, 0, 0], rtol=1e-6)   # key 1 scores −∞ in effect


def test_causal_attention_float32_matches_float64(backend):
    arrays = [normal((2, 4, 32, 16), 0), normal((2, 2, 32, 16), 1), normal((2, 2, 32, 16), 2)]
    assert_float32_close_to_float64(backend, F.causal_attention, arrays)


@pytest.mark.parametrize("q_shape, kv_shape, message", [
    ((1, 2, 3), (1, 2, 3, 4), r"must be \(B, H, T, D\)"),
    ((1, 2, 3, 4), (1, 2, 3, 5), r"must be \(B, Hkv, Tk, D\)"),
    ((2, 2, 3, 4), (1, 2, 3, 4), r"must be \(B, Hkv, Tk, D\)"),
    ((1, 3, 3, 4), (1, 2, 3, 4), "2 kv heads must divide 3 query heads"),
    ((1, 2, 4, 4), (1, 2, 3, 4), "3 keys cannot serve 4 queries"),
])
def test_causal_attention_bad_shapes_are_clear_errors(backend, q_shape, kv_shape, message):
    with pytest.raises(ValueError, match=message):
        F.causal_attention(backend.tensor(np.ones(q_shape)), backend.tensor(np.ones(kv_shape)),
                           backend.tensor(np.ones(kv_shape)))


def test_causal_attention_k_v_mismatch_is_a_clear_error(backend):
    with pytest.raises(ValueError, match="causal_attention"):
        F.causal_attention(backend.tensor(np.ones((1, 2, 3, 4))), backend.tensor(np.ones((1, 2, 3, 4))),
                           backend.tensor(np.ones((1, 2, 4, 4))))


# ------------------------------------------------------------------ cross_entropy
@st.composite
def cross_entropy_case(draw):
    """(N, V) or (B, T, V) logits and targets with some rows set to ignore_index (at least one kept)."""
    vocab = draw(st.integers(1, 5))
    leading = draw(st.sampled_from([(1,), (3,), (4,), (1, 1), (2, 1), (1, 3), (2, 2)]))
    ignore_index = draw(st.sampled_from([-100, -1]))
    targets = draw(hnp.arrays(np.int64, leading, elements=st.integers(0, vocab - 1)))
    ignored = draw(hnp.arrays(np.bool_, leading))
    ignored.flat[0] = False
    targets = np.where(ignored, ignore_index, targets)
    return leading + (vocab,), targets, ignore_index


@given(case=cross_entropy_case(), seed=seeds, scale=st.sampled_from([0.5, 3.0]))
def test_cross_entropy_gradcheck_and_reference(backend, assert_gradcheck, case, seed, scale):
    shape, targets, ignore_index = case
    logits = normal(shape, seed, scale)
    assert_gradcheck(lambda x, t: F.cross_entropy(x, t, ignore_index=ignore_index),
                     [backend.tensor(logits), backend.tensor(targets)])
    assert_same_forward_and_backward(
        backend, lambda x: F.cross_entropy(x, backend.array(targets), ignore_index=ignore_index),
        lambda x: cross_entropy_reference(x, backend.array(targets), ignore_index=ignore_index), [logits])


@pytest.mark.parametrize("shape", [(4, 3), (2, 3, 3)], ids=["2d", "3d"])
@pytest.mark.parametrize("ignore_index", [-100, 1])
def test_cross_entropy_gradcheck_fixed_cases(backend, assert_gradcheck, shape, ignore_index):
    """2-D and 3-D logits, with the default ignore_index and with one that is also a valid class id."""
    logits = normal(shape, 3)
    targets = np.array([0, 1, 2, 1, ignore_index, 2][:int(np.prod(shape[:-1]))]).reshape(shape[:-1])
    assert_gradcheck(lambda x, t: F.cross_entropy(x, t, ignore_index=ignore_index),
                     [backend.tensor(logits), backend.tensor(targets)])
    grad = run(backend, lambda x: F.cross_entropy(x, backend.array(targets), ignore_index=ignore_index), [logits])[1][0]
    np.testing.assert_array_equal(grad[targets == ignore_index], 0.0)


def test_cross_entropy_value_by_hand(backend):
    logits = np.array([[2.0, 0.0, -1.0], [0.5, 0.5, 0.5], [9.0, 9.0, 9.0]])
    targets = np.array([0, 2, -100])
    loss = F.cross_entropy(backend.tensor(logits), backend.array(targets)).item()
    expected = ((np.log(np.exp(logits[0]).sum()) - 2.0) + np.log(3.0)) / 2     # the ignored row does not count
    assert loss == pytest.approx(expected, rel=1e-12)


@given(case=cross_entropy_case(), seed=seeds)
def test_cross_entropy_gradient_rows_sum_to_zero(backend, case, seed):
    shape, targets, ignore_index = case
    logits = backend.tensor(normal(shape, seed, 2.0), requires_grad=True)
    F.cross_entropy(logits, backend.array(targets), ignore_index=ignore_index).backward()
    grad = Tensor(logits.grad).numpy()
    np.testing.assert_allclose(grad.sum(axis=-1), 0.0, atol=1e-12)
    np.testing.assert_array_equal(grad[targets == ignore_index], 0.0)   # ignored rows get nothing
    kept = targets != ignore_index
    # the target entry is the only negative one: softmax − onehot
    picked = np.take_along_axis(grad, np.where(kept, targets, 0)[..., None], axis=-1)[..., 0]
    assert np.all(picked[kept] <= 0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cross_entropy_with_huge_logits_is_finite_and_correct(backend, dtype):
    logits = np.array([[1e4, -1e4, 0.0], [1e4, -1e4, 0.0], [-1e4, -1e4, -1e4]], dtype=dtype)
    targets = np.array([0, 1, 2])
    x = backend.tensor(logits, requires_grad=True)
    loss = F.cross_entropy(x, backend.array(targets))
    loss.backward()
    # row losses: 0 (the target has all the mass), 2e4, log 3
    assert loss.item() == pytest.approx((0.0 + 2e4 + np.log(3.0)) / 3, rel=1e-6)
    grad = Tensor(x.grad).numpy()
    assert np.all(np.isfinite(grad))
    expected = np.array([[0.0, 0.0, 0.0], [1.0, -1.0, 0.0], [1 / 3, 1 / 3, -2 / 3]]) / 3
    np.testing.assert_allclose(grad, expected, atol=1e-7)


def test_cross_entropy_all_ignored_is_nan_with_zero_gradient(backend):
    x = backend.tensor(normal((2, 3), 0), requires_grad=True)
    loss = F.cross_entropy(x, backend.array([-100, -100]))
    assert np.isnan(loss.item())
    loss.backward()
    np.testing.assert_array_equal(Tensor(x.grad).numpy(), 0.0)


def test_cross_entropy_3d_equals_flattened_2d(backend):
    logits, targets = normal((2, 3, 5), 0), np.array([[0, 4, 2], [1, -100, 3]])
    loss3 = F.cross_entropy(backend.tensor(logits), backend.array(targets)).item()
    loss2 = F.cross_entropy(backend.tensor(logits.reshape(6, 5)), backend.array(targets.reshape(6))).item()
    assert loss3 == pytest.approx(loss2, rel=1e-14)


def test_cross_entropy_float32_matches_float64(backend):
    targets = np.random.default_rng(5).integers(0, 512, size=(4, 32))
    targets[0, :3] = -100
    assert_float32_close_to_float64(backend, lambda x: F.cross_entropy(x, backend.array(targets)),
                                    [normal((4, 32, 512), 0, 3.0)])


def test_cross_entropy_bad_input_is_a_clear_error(backend):
    logits = backend.tensor(np.ones((2, 3, 4)))
    with pytest.raises(ValueError, match=r"targets shape \(2, 4\) must equal logits shape without the vocab"):
        F.cross_entropy(logits, backend.array(np.zeros((2, 4), dtype=np.int64)))
    with pytest.raises(IndexError, match=r"target 4 is outside the vocabulary \[0, 4\)"):
        F.cross_entropy(logits, backend.array([[0, 1, 4], [0, 0, 0]]))
    with pytest.raises(IndexError, match=r"target -1 is outside"):
        F.cross_entropy(logits, backend.array([[0, 1, -1], [0, 0, 0]]))
    with pytest.raises(TypeError, match="integers"):
        F.cross_entropy(logits, backend.array(np.zeros((2, 3))))
    with pytest.raises(ValueError, match=r"\(N, V\) or \(B, T, V\)"):
        F.cross_entropy(backend.tensor(np.ones(4)), backend.array(np.array(0)))


# ------------------------------------------------------------------ packed forms and the fused head
def _composed_rope_attention(qkv, heads, kv_heads, start=0):
    """The unpacked oracle: three slices, F.rope at the offset, F.causal_attention, laid out as (B, T, H·D)."""
    batch, time, _, head_dim = qkv.shape
    qkv = qkv.permute(0, 2, 1, 3)                                   # (B, T, H + 2Hkv, D) -> (B, H + 2Hkv, T, D)
    q = F.rope(qkv[:, :heads], start)
    k = F.rope(qkv[:, heads:heads + kv_heads], start)
    v = qkv[:, heads + kv_heads:]
    return F.causal_attention(q, k, v).permute(0, 2, 1, 3).reshape(batch, time, heads * head_dim)


@st.composite
def packed_attention_case(draw):
    batch, time = draw(st.integers(1, 2)), draw(st.integers(1, 4))
    group = draw(st.sampled_from([1, 2, 4]))
    kv_heads = draw(st.integers(1, 2)) if group < 4 else 1
    head_dim = draw(st.sampled_from([2, 4]))
    return batch, time, kv_heads * group, kv_heads, head_dim


@given(case=packed_attention_case(), seed=seeds, keep=st.booleans())
def test_rope_attention_gradcheck_and_composed_reference(backend, assert_gradcheck, case, seed, keep):
    batch, time, heads, kv_heads, head_dim = case
    qkv = normal((batch, time, heads + 2 * kv_heads, head_dim), seed)
    cos, sin = (backend.array(t) for t in rope_angles(np.arange(time), head_dim, 10000.0))

    def packed(t):
        return F.rope_attention(t, heads, kv_heads, cos, sin, keep_probabilities=keep)

    assert_gradcheck(packed, [backend.tensor(qkv)], max_elements_per_input=24)
    assert_same_forward_and_backward(backend, packed, lambda t: _composed_rope_attention(t, heads, kv_heads), [qkv])


@given(case=packed_attention_case(), seed=seeds, data=st.data())
def test_rope_attention_output_ignores_the_future(backend, case, seed, data):
    batch, time, heads, kv_heads, head_dim = case
    qkv = normal((batch, time, heads + 2 * kv_heads, head_dim), seed)
    cos, sin = (backend.array(t) for t in rope_angles(np.arange(time), head_dim, 10000.0))
    t = data.draw(st.integers(0, time - 1))
    changed = qkv.copy()
    changed[:, t + 1:] = normal(changed[:, t + 1:].shape, seed + 1)
    before = F.rope_attention(backend.tensor(qkv), heads, kv_heads, cos, sin).numpy()
    after = F.rope_attention(backend.tensor(changed), heads, kv_heads, cos, sin).numpy()
    np.testing.assert_allclose(after[:, :t + 1], before[:, :t + 1], rtol=1e-12, atol=1e-14)


@given(seed=seeds, cached=st.integers(0, 3), new=st.integers(1, 3))
def test_rope_attention_with_a_cache_equals_the_last_positions(backend, seed, cached, new):
    """Decoding: prefill `cached` positions into the stores, then `new` more; equals the full run's last rows."""
    heads, kv_heads, head_dim, total = 4, 2, 4, cached + new
    qkv = normal((1, total, heads + 2 * kv_heads, head_dim), seed)
    full_tables = rope_angles(np.arange(total), head_dim, 10000.0)
    full = F.rope_attention(backend.tensor(qkv), heads, kv_heads, *(backend.array(t) for t in full_tables)).numpy()
    k_store = backend.array(np.zeros((1, kv_heads, total, head_dim)))
    v_store = backend.array(np.zeros((1, kv_heads, total, head_dim)))
    pieces = []
    for start, end in ((0, cached), (cached, total)):
        if end > start:
            tables = (backend.array(t) for t in rope_angles(np.arange(start, end), head_dim, 10000.0))
            pieces.append(F.rope_attention(backend.tensor(qkv[:, start:end]), heads, kv_heads, *tables,
                                           cache=(k_store, v_store, start)).numpy())
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, rtol=1e-10, atol=1e-12)


@given(shape=hnp.array_shapes(min_dims=0, max_dims=2, max_side=4), hidden=st.integers(1, 4), seed=seeds,
       scale=st.sampled_from([0.5, 5.0]))
def test_packed_swiglu_gradcheck_and_equals_the_two_halves(backend, assert_gradcheck, shape, hidden, seed, scale):
    gate_up = normal(tuple(shape) + (2 * hidden,), seed, scale)
    assert_gradcheck(F.swiglu, [backend.tensor(gate_up)])
    assert_same_forward_and_backward(backend, F.swiglu,
                                     lambda t: swiglu_reference(t[..., :hidden], t[..., hidden:]), [gate_up])


def test_packed_swiglu_odd_width_is_a_clear_error(backend):
    with pytest.raises(ValueError, match="even last axis"):
        F.swiglu(backend.tensor(np.ones((2, 5))))


@given(rows=st.integers(1, 6), channels=st.integers(1, 4), vocab=st.integers(2, 6), seed=seeds,
       ignored=st.integers(0, 2))
def test_linear_cross_entropy_gradcheck_and_composed_reference(backend, assert_gradcheck, rows, channels, vocab,
                                                               seed, ignored):
    x, weight = normal((rows, channels), seed), normal((vocab, channels), seed + 1)
    targets = np.random.default_rng(seed).integers(0, vocab, rows)
    targets[:min(ignored, rows - 1)] = -100                              # at least one row counts
    targets = backend.array(targets)

    def fused(a, b):
        return F.linear_cross_entropy(a, b, targets)

    assert_gradcheck(fused, [backend.tensor(x), backend.tensor(weight)])
    assert_same_forward_and_backward(backend, fused, lambda a, b: cross_entropy_reference(F.linear(a, b), targets),
                                     [x, weight])


@given(seed=seeds, shift=st.floats(-3, 3))
def test_linear_cross_entropy_ignores_a_shift_shared_by_every_vocabulary_row(backend, seed, shift):
    """W + 1·cᵀ adds x·c to every logit of a row; softmax cannot see it, so the loss and dx are unchanged."""
    x, weight = normal((5, 3), seed), normal((4, 3), seed + 1)
    targets = backend.array(np.random.default_rng(seed).integers(0, 4, 5))
    shifted = weight + shift * normal((1, 3), seed + 2)
    results = []
    for w in (weight, shifted):
        xt = backend.tensor(x, requires_grad=True)
        loss = F.linear_cross_entropy(xt, backend.tensor(w), targets)
        loss.backward()
        results.append((loss.item(), Tensor(xt.grad).numpy()))
    np.testing.assert_allclose(results[1][0], results[0][0], rtol=1e-10)
    # dx = G W and every row of G sums to 0, so the shared row c contributes nothing to dx either
    np.testing.assert_allclose(results[1][1], results[0][1], rtol=1e-9, atol=1e-12)


@given(leading=hnp.array_shapes(min_dims=1, max_dims=2, max_side=3), channels=st.integers(1, 5), seed=seeds)
def test_rms_norm_plain_path_gradcheck_and_reference(backend, assert_gradcheck, leading, channels, seed):
    x, weight = normal(tuple(leading) + (channels,), seed), normal((channels,), seed + 1)

    def plain(a, b):
        return F.rms_norm(a, b, chunked=False)

    assert_gradcheck(plain, [backend.tensor(x), backend.tensor(weight)])
    assert_same_forward_and_backward(backend, plain, rms_norm_reference, [x, weight])
