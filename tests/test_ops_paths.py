"""Each op picks its path once, in the forward, and the backward follows that record; the array paths
work in bfloat16.

Path records: without a GPU the kernel path is simulated. `FakeKernels` implements the launchers of
tinygrad_llm.gpu in NumPy (with the kernels' own saved layouts, e.g. RMSNorm's kernel saves x where the
array path saves x̂), and every op module's `kernel` dispatch point is replaced by one that returns it
while `backend.set_kernels_enabled(True)`. Flipping the switch between forward and backward must leave the
gradients right, and the backward must call the fake's launcher exactly when the forward did.

bfloat16: NumPy arrays of `ml_dtypes.bfloat16` stand in for CuPy ones (NumPy's `@` on them returns
float32, CuPy's fails): every op keeps the dtype and lands within bf16 rounding of float32.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

import tinygrad_llm.functional as F
from tinygrad_llm import Tensor
from tinygrad_llm import backend as backend_module
from tinygrad_llm.ops import activation, attention, loss, matmul, norm, rope
from tinygrad_llm.ops.loss import _loss_and_gradient
from tinygrad_llm.ops.matmul import accumulation_dtype, needs_float32_products, product
from tinygrad_llm.ops.rope import rope_angles

from op_helpers import normal, relative_error


def _sigmoid(x):
    return 0.5 * (1 + np.tanh(0.5 * x))


class FakeKernels:
    """NumPy stand-ins for the CUDA launchers, counting the backward calls."""

    def __init__(self):
        self.backward_calls = 0
        self.in_backward = False          # set by the test: rope's backward is its forward launcher

    def rms_norm_forward(self, x, weight, eps):
        r = 1.0 / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps)
        return x * r * weight, r

    def rms_norm_backward(self, dy, x, weight, r, pending=None, low=False):   # saved: x itself, not x̂
        self.backward_calls += 1
        xhat = x * r
        g = dy * weight
        dx = r * (g - xhat * (g * xhat).mean(axis=-1, keepdims=True))
        dx = dx if pending is None else dx + pending
        dw = (dy * xhat).reshape(-1, x.shape[-1]).sum(0)
        return (dx, dw, dx.astype(dy.dtype)) if low else (dx, dw)

    def swiglu_forward(self, gate, up):
        return gate * _sigmoid(gate) * up

    def swiglu_backward(self, dy, gate, up):
        self.backward_calls += 1
        s = _sigmoid(gate)
        return dy * up * s * (1 + gate * (1 - s)), dy * gate * s

    def swiglu_packed_forward(self, gate_up):
        half = gate_up.shape[-1] // 2
        return self.swiglu_forward(gate_up[..., :half], gate_up[..., half:])

    def swiglu_packed_backward(self, dy, gate_up):
        half = gate_up.shape[-1] // 2
        return np.concatenate(self.swiglu_backward(dy, gate_up[..., :half], gate_up[..., half:]), axis=-1)

    def rope_forward(self, x, cos, sin, out=None):
        if self.in_backward:
            self.backward_calls += 1
        if out is x:                      # in place, as the kernel allows
            x = x.copy()
        return rope.rotate_into(x, cos, sin, np.empty_like(x) if out is None else out)

    def copy_heads(self, x, out=None):
        out = np.empty_like(x) if out is None else out
        out[...] = x
        return out

    def add_rms_norm_forward(self, x, branch, weight, eps, out_dtype=None):
        total = x + branch.astype(x.dtype)
        y, r = self.rms_norm_forward(total, weight, eps)
        return total, y.astype(out_dtype or x.dtype), r

    def causal_attention_forward(self, q, k, v, dropout=None, out=None):
        result, (_, _, _, _, lse) = attention._attend(q, k, v, "recompute")
        if out is not None:               # the kernels write a given output through its strides
            out[...] = result
        return result if out is None else out, lse

    def causal_attention_backward(self, dy, q, k, v, out, lse, dropout=None, dq=None, dk=None, dv=None):
        self.backward_calls += 1
        grads = attention._attend_backward(dy, "recompute", q, k, v, out, lse)
        results = []
        for grad, given, like in zip(grads, (dq, dk, dv), (q, k, v)):
            grad = np.ascontiguousarray(grad).reshape(like.shape)
            if given is not None:
                given[...] = grad
            results.append(grad if given is None else given)
        return tuple(results)

    def linear_forward(self, x, weight):
        x2 = x.reshape(-1, x.shape[-1])
        return (x2 @ weight.T).reshape(*x.shape[:-1], weight.shape[0]), x, weight

    def linear_backward(self, dy, x, weight, dtypes, needs_input_grad=(True, True), dweight_out=None):
        self.backward_calls += 1
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = (dy2 @ weight).reshape(x.shape) if needs_input_grad[0] else None
        dweight = dy2.T @ x.reshape(-1, x.shape[-1]) if needs_input_grad[1] else None
        if dweight is not None and dweight_out is not None:
            dweight_out[...] = dweight
            dweight = dweight_out
        return dx, dweight

    def cross_entropy_forward_backward(self, logits, targets, ignore_index, in_place=False):
        return _loss_and_gradient(logits, targets, ignore_index, np, in_place=in_place)


@pytest.fixture
def fake_kernels(monkeypatch):
    """The fake kernels, served by every op module's dispatch point while kernels are enabled."""
    fake = FakeKernels()

    def dispatch(op_name, *arrays):
        return fake if backend_module._kernels_enabled else None

    for module in (activation, attention, loss, matmul, norm, rope):
        monkeypatch.setattr(module, "kernel", dispatch)
    previous = backend_module._kernels_enabled
    yield fake
    backend_module.set_kernels_enabled(previous)


HEADS, KV_HEADS, TIME, HEAD_DIM = 4, 2, 5, 6
COS, SIN = rope_angles(np.arange(TIME), HEAD_DIM, 10000.0)
TARGETS = np.array([[1, 4, -100, 0, 2], [3, 3, 1, 0, 4]])

# name -> (function of tensors, input shapes)
CASES = {
    "rms_norm": (lambda x, w: F.rms_norm(x, w), [(3, 4, 8), (8,)]),
    "add_rms_norm": (lambda x, b, w: F.concatenate(list(F.add_rms_norm(x, b, w)), axis=-1),
                     [(3, 4, 8), (3, 4, 8), (8,)]),
    "swiglu": (lambda g, u: F.swiglu(g, u), [(3, 4, 8), (3, 4, 8)]),
    "swiglu_packed": (lambda gu: F.swiglu(gu), [(3, 4, 16)]),
    "rope": (lambda x: F.rope(x, 2), [(2, 3, TIME, HEAD_DIM)]),
    "causal_attention": (lambda q, k, v: F.causal_attention(q, k, v),
                         [(2, HEADS, TIME, HEAD_DIM), (2, KV_HEADS, TIME, HEAD_DIM), (2, KV_HEADS, TIME, HEAD_DIM)]),
    "rope_attention": (lambda qkv: F.rope_attention(qkv, HEADS, KV_HEADS, COS, SIN, keep_probabilities=True),
                       [(2, TIME, HEADS + 2 * KV_HEADS, HEAD_DIM)]),
    "linear": (lambda x, w: F.linear(x, w), [(3, 4, 8), (5, 8)]),
    "linear_cross_entropy": (lambda x, w: F.linear_cross_entropy(x, w, TARGETS), [(2, TIME, 8), (5, 8)]),
}


def _array_path_result(case):
    """Output and gradients with the kernels off throughout."""
    backend_module.set_kernels_enabled(False)
    function, shapes = CASES[case]
    tensors = [Tensor(normal(shape, seed), requires_grad=True) for seed, shape in enumerate(shapes)]
    out = function(*tensors)
    out.backward(normal(out.shape, 99) if out.ndim else np.asarray(1.7))
    return out.numpy(), [t.grad for t in tensors]


@pytest.mark.parametrize("case", sorted(CASES))
def test_backward_follows_the_path_the_forward_took(case, fake_kernels):
    reference_out, reference = _array_path_result(case)
    for kernels_in_forward in (True, False):
        fake_kernels.backward_calls = 0
        fake_kernels.in_backward = False
        backend_module.set_kernels_enabled(kernels_in_forward)
        function, shapes = CASES[case]
        tensors = [Tensor(normal(shape, seed), requires_grad=True) for seed, shape in enumerate(shapes)]
        out = function(*tensors)
        backend_module.set_kernels_enabled(not kernels_in_forward)  # flipped between forward and backward
        fake_kernels.in_backward = True
        out.backward(normal(out.shape, 99) if out.ndim else np.asarray(1.7))
        np.testing.assert_allclose(out.numpy(), reference_out, rtol=1e-10, atol=1e-12)
        for grad, expected in zip([t.grad for t in tensors], reference):
            np.testing.assert_allclose(grad, expected, rtol=1e-9, atol=1e-12)
        if kernels_in_forward:
            assert fake_kernels.backward_calls > 0, "the backward did not run the kernel the forward chose"
        else:
            assert fake_kernels.backward_calls == 0, "the backward asked for a kernel the forward did not use"


def test_rms_norm_flip_would_break_an_op_that_asks_again(fake_kernels):
    """The hazard the record removes: the kernel path saves x, the array path x̂; a backward that chose
    afresh would read one as the other. Checked here on the saved arrays themselves."""
    x, w = Tensor(normal((3, 8), 0) * 3, requires_grad=True), Tensor(normal((8,), 1), requires_grad=True)
    backend_module.set_kernels_enabled(True)
    kernel_out = F.rms_norm(x, w)
    backend_module.set_kernels_enabled(False)
    array_out = F.rms_norm(x, w, chunked=False)
    assert kernel_out._ctx.saved[0] is fake_kernels and array_out._ctx.saved[0] == "plain"
    assert not np.allclose(kernel_out._ctx.saved[1], array_out._ctx.saved[1])


# ------------------------------------------------------------------ bfloat16 on the array paths
ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)


def test_only_bfloat16_products_are_upcast():
    assert needs_float32_products(BF16)
    assert not any(needs_float32_products(d) for d in (np.float16, np.float32, np.float64))
    assert accumulation_dtype(BF16) == np.float32 and accumulation_dtype(np.float16) == np.float32
    assert accumulation_dtype(np.float64) == np.float64
    a, b = normal((3, 4), 0).astype(BF16), normal((4, 2), 1).astype(BF16)
    assert (a @ b).dtype == np.float32                               # what NumPy's own @ would give
    result = product(a, b)
    assert result.dtype == BF16
    np.testing.assert_array_equal(result, (a.astype(np.float32) @ b.astype(np.float32)).astype(BF16))


BF16_CASES = {
    "matmul": (lambda a, b: F.matmul(a, b), [(2, 3, 8), (8, 5)]),
    "rms_norm": (lambda x, w: F.rms_norm(x, w, chunked=False), [(3, 4, 16), (16,)]),
    "softmax": (lambda x: F.softmax(x), [(3, 16)]),
    "log_softmax": (lambda x: F.log_softmax(x), [(3, 16)]),
    "sum": (lambda x: F.sum(x, axis=-1), [(3, 300)]),
    "mean": (lambda x: F.mean(x, axis=0), [(300, 3)]),
    "cross_entropy": (lambda x: F.cross_entropy(x, TARGETS), [(2, TIME, 7)]),
    "embedding": (lambda w: F.embedding(np.array([[1, 2, 1, 1], [0, 4, 4, 1]]), w), [(5, 8)]),
    **{name: CASES[name] for name in ("swiglu", "swiglu_packed", "rope", "causal_attention", "linear",
                                       "linear_cross_entropy")},
    "rope_attention": (lambda qkv: F.rope_attention(qkv, HEADS, KV_HEADS, COS.astype(BF16), SIN.astype(BF16)),
                       [(2, TIME, HEADS + 2 * KV_HEADS, HEAD_DIM)]),
}


def _run_in(dtype, case):
    function, shapes = BF16_CASES[case]
    tensors = [Tensor(normal(shape, seed).astype(dtype), requires_grad=True) for seed, shape in enumerate(shapes)]
    out = function(*tensors)
    upstream = normal(out.shape, 99) if out.ndim else np.asarray(1.0)
    out.backward(upstream.astype(out.dtype))
    return out, [t.grad for t in tensors]


@pytest.mark.parametrize("case", sorted(BF16_CASES))
def test_array_paths_work_in_bfloat16(case):
    out16, grads16 = _run_in(BF16, case)
    out32, grads32 = _run_in(np.float32, case)
    if case in ("linear_cross_entropy", "cross_entropy"):              # their loss is float32 by design
        assert out16.dtype == np.float32
    else:
        assert out16.dtype == BF16
    assert relative_error(out16.numpy().astype(np.float32), out32.numpy()) < 3e-2
    for grad16, grad32 in zip(grads16, grads32):
        assert grad16.dtype == BF16
        assert relative_error(grad16.astype(np.float32), grad32) < 3e-2


def test_bfloat16_attention_scores_are_computed_in_float32():
    """The scores of a bf16 attention go through float32: P matches a float32 softmax of bf16 inputs."""
    q, k = normal((1, 2, 6, 8), 0).astype(BF16), normal((1, 2, 6, 8), 1).astype(BF16)
    p, lse = attention.grouped_causal_probabilities(q, k, 1, 1 / math.sqrt(8), np)
    p32, _ = attention.grouped_causal_probabilities(q.astype(np.float32), k.astype(np.float32), 1,
                                                    1 / math.sqrt(8), np)
    assert p.dtype == BF16 and lse.dtype == np.float32
    np.testing.assert_array_equal(p, p32.astype(BF16))
