"""The ops' compiled CPU loops (tinygrad_llm/ops/fused_cpu.c) against the ops' NumPy expressions.

Each branch that takes a loop (SwiGLU, RMSNorm and its residual form, the blocked attention softmax and its
backward, RoPE of token-major heads, cross-entropy rows, the embedding's backward, AdamW) is run twice, with the loops and with them
turned off (the NumPy path of the same op), in float32 and float64, and on one and several row-pool
threads; float64 gradient checks go through the loops. Last, the fallback: no compiler means one warning
and the NumPy paths.
"""
from __future__ import annotations


import numpy as np
import pytest

from tinygrad_llm import functional as F
from tinygrad_llm.gradcheck import gradcheck
from tinygrad_llm.nn import Parameter
from tinygrad_llm.ops import fused_cpu
from tinygrad_llm.ops.rope import rope_angles
from tinygrad_llm.optim import AdamW
from tinygrad_llm.tensor import Tensor

from op_helpers import compiled_loops as loops, normal

pytestmark = pytest.mark.skipif(fused_cpu.library() is None, reason="the fused CPU loops could not be built here")



def outputs_and_grads(fn, arrays, dtype):
    """fn on tensors of `arrays` (floating ones in dtype, requiring grad), backward with a fixed random
    upstream gradient: [output, gradients...] as arrays."""
    tensors = [Tensor(a.astype(dtype), requires_grad=True) if a.dtype.kind == "f" else a for a in arrays]
    out = fn(*tensors)
    out.backward(np.random.default_rng(7).standard_normal(out.shape).astype(out.dtype))
    return [out.data] + [t.grad for t in tensors if isinstance(t, Tensor)]


def _add_norm(x, branch, weight):
    total, y = F.add_rms_norm(x, branch, weight)
    return y + total * 0.25                                  # both outputs reach the loss


def _attention(heads, kv_heads, time, head_dim):
    cos, sin = rope_angles(np.arange(time), head_dim, 10000.0)

    def attend(qkv):
        dtype = qkv.dtype
        return F.rope_attention(qkv, heads, kv_heads, cos.astype(dtype), sin.astype(dtype), keep_probabilities=True)
    return attend


TARGETS = np.array([[3, 0, -100, 6], [5, 6, 1, -100], [2, 2, 4, 0]])          # two ignored rows
IDS = np.array([[3, 0, 8, 3], [5, 3, 1, 0], [2, 2, 3, 8]], dtype=np.int32)       # ids seen 1 to 4 times

CASES = {   # name: (fn, input arrays); the attention case has three query blocks, the last one partial
    "swiglu": (F.swiglu, [normal((3, 50, 24), 0, 3.0), normal((3, 50, 24), 1)]),
    "rms_norm": (F.rms_norm, [normal((4, 33, 40), 2, 2.0), 1 + normal(40, 3, 0.3)]),
    "add_rms_norm": (_add_norm, [normal((4, 33, 40), 4), normal((4, 33, 40), 5), 1 + normal(40, 6, 0.3)]),
    "rope_attention": (_attention(4, 2, 70, 8), [normal((3, 70, 8, 8), 7)]),
    "linear_cross_entropy": (lambda x, w: F.linear_cross_entropy(x, w, TARGETS),
                             [normal((3, 4, 16), 8), normal((7, 16), 9, 2.0)]),
    "cross_entropy": (lambda z: F.cross_entropy(z, TARGETS), [normal((3, 4, 7), 10, 3.0)]),
    "embedding": (lambda w: F.embedding(IDS, w), [normal((9, 12), 16)]),       # repeated ids add up
}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", sorted(CASES))
def test_loops_match_the_numpy_expressions(name, dtype):
    fn, arrays = CASES[name]
    with loops(False):
        expected = outputs_and_grads(fn, arrays, dtype)
    with loops(True):
        got = outputs_and_grads(fn, arrays, dtype)
    tolerance = dict(rtol=2e-5, atol=1e-6) if dtype == np.float32 else dict(rtol=1e-11, atol=1e-13)
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_allclose(a, b, **tolerance)


@pytest.mark.parametrize("name", ["swiglu", "rms_norm", "add_rms_norm", "linear_cross_entropy", "cross_entropy"])
def test_loops_give_the_same_bits_on_any_thread_count(name):
    """The loops split only row-independent work over the threads: 1 and 3 threads agree bit for bit."""
    fn, arrays = CASES[name]
    arrays = [np.tile(a, (40,) + (1,) * (a.ndim - 1)) if a.ndim > 1 and name.endswith(("swiglu", "norm")) else a
              for a in arrays]                               # enough rows for several row ranges
    with loops(True, threads=1):
        one = outputs_and_grads(fn, arrays, np.float32)
    with loops(True, threads=3):
        three = outputs_and_grads(fn, arrays, np.float32)
    for a, b in zip(one, three):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", sorted(CASES))
def test_gradcheck_through_the_loops(name):
    fn, arrays = CASES[name]
    with loops(True):
        result = gradcheck(fn, arrays, max_elements_per_input=40)
    assert result.ok, str(result)
    assert result.checked_elements > 0


def test_softmax_loop_with_rows_far_below_the_block_maximum():
    """Each row is shifted by its own maximum: 1000× larger queries beside small ones still give every row
    its own softmax in float32 (the NumPy path needs its per-row fallback there)."""
    qkv = normal((2, 40, 6, 8), 11)
    qkv[:, 1::2, :2] *= 1000.0
    fn = _attention(2, 2, 40, 8)
    with loops(False):
        expected = fn(Tensor(qkv)).data
    with loops(True):
        got = fn(Tensor(qkv.astype(np.float32))).data
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_swiglu_loop_at_the_limits_of_exp():
    """σ(g) from the float32 exp at gates where e^−g underflows, overflows, or is NaN."""
    gate = np.array([-1e4, -100.0, -88.0, -87.0, 0.0, 87.0, 88.5, 100.0, 1e4, np.nan], dtype=np.float32)
    up = np.ones_like(gate)
    with loops(True):
        got = F.swiglu(Tensor(gate), Tensor(up)).data
    with np.errstate(over="ignore", invalid="ignore"):
        expected = gate.astype(np.float64) / (1 + np.exp(-gate.astype(np.float64)))
    np.testing.assert_allclose(got[:-1], expected[:-1], rtol=3e-7, atol=1e-30)
    assert np.isnan(got[-1])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("threads", [1, 3])
def test_adamw_loop_matches_the_numpy_update(dtype, threads):
    def train(on):
        rng = np.random.default_rng(0)
        params = [Parameter(rng.standard_normal(shape).astype(dtype)) for shape in ((300, 70), (70,), (5, 3))]
        optimizer = AdamW(params, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)
        with loops(on, threads):
            for step in range(3):
                for p in params:
                    p.grad = rng.standard_normal(p.shape).astype(dtype)
                optimizer.step(grad_scale=0.5 if step else 1.0)
                optimizer.zero_grad()
        moments = [g.exp_avg for g in optimizer.groups] + [g.exp_avg_sq for g in optimizer.groups]
        return [p.data for p in params] + moments

    tolerance = dict(rtol=1e-5, atol=1e-7) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-15)
    for a, b in zip(train(True), train(False)):
        np.testing.assert_allclose(a, b, **tolerance)


def test_without_a_compiler_the_ops_take_the_numpy_paths(monkeypatch, tmp_path):
    gate, up = normal((4, 8), 12), normal((4, 8), 13)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("TINYGRAD_LLM_CPU_KERNELS_DIR", str(tmp_path))
    fused_cpu.reset()
    try:
        with pytest.warns(RuntimeWarning, match="could not be built"):
            assert fused_cpu.library() is None
        assert not fused_cpu.usable(gate, up)
        np.testing.assert_allclose(F.swiglu(Tensor(gate), Tensor(up)).data, gate / (1 + np.exp(-gate)) * up,
                                   rtol=1e-12)
        monkeypatch.setenv("TINYGRAD_LLM_CPU_KERNELS", "0")    # switched off: no build tried, no warning
        fused_cpu.reset()
        assert fused_cpu.library() is None
    finally:
        monkeypatch.undo()
        fused_cpu.reset()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_head_transpose_and_row_dots_of_strided_views(dtype):
    """kᵀ and Δ read (B, H, T, D) views of a token-major array in place; views the loops cannot read (a
    reversed or non-unit-stride last axis) take NumPy's copy and einsum, with the same values."""
    from tinygrad_llm.ops.attention import _contiguous_transpose, _row_dots
    packed = normal((3, 9, 5, 4), 14).astype(dtype)                    # (B, T, heads, D)
    other = normal((3, 9, 5, 4), 15).astype(dtype)
    views = [packed[:, :, 1:4].transpose(0, 2, 1, 3), packed[:, :, 1:4, ::-1].transpose(0, 2, 1, 3),
             packed[:, :, 1:4, ::2].transpose(0, 2, 1, 3)]
    partners = [other[:, :, 1:4].transpose(0, 2, 1, 3), other[:, :, 1:4, ::-1].transpose(0, 2, 1, 3),
                other[:, :, 1:4, ::2].transpose(0, 2, 1, 3)]
    with loops(True):
        assert fused_cpu.heads_view(views[0]) is not None
        assert fused_cpu.heads_view(views[1]) is None and fused_cpu.heads_view(views[2]) is None
        for view, partner in zip(views, partners):
            transposed = _contiguous_transpose(view)
            assert transposed.flags.c_contiguous
            np.testing.assert_array_equal(transposed, view.swapaxes(-1, -2))
            np.testing.assert_allclose(_row_dots(view, partner), (view * partner).sum(-1), rtol=1e-5, atol=1e-6)
