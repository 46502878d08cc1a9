"""Attention dropout in the flash-attention kernels (tinygrad_llm.gpu.attention's `_dropout` builds)
against the NumPy op, which is their reference. Every test here needs a GPU and CuPy and skips without.

Run them alone with `python -m pytest -q tests/test_gpu_attention_dropout.py`. What they hold:
- the mask bits: with q = 0 (uniform probabilities) and one-hot values, the zero pattern of out (and of
  dv, with one-hot dO) is the mask itself, so every kernel's bits must equal tinygrad_llm.rng.hash_bits
  exactly, row offset folded into the seed included;
- forward and backward (out, lse, dq, dk, dv) with dropout against the NumPy op in float64, every build
  (the wgmma builds of Hopper and the mma.sync ones, forced on Hopper too; bf16, fp16, fp32; head dim 64
  and 128), GQA, odd lengths, several tiles, Tq < Tk; NaN-poisoned outputs;
- dk, dv bit-for-bit deterministic with dropout; the op dispatching to the `_dropout` builds; the
  batched-GEMM path on CuPy (kernels off) dropping what NumPy drops; a GQA model's gradients with
  attention dropout matching the CPU's.
Tolerances as tests/test_gpu_attention.py: 1e-2 relative for bf16 and fp16, 1e-5 for fp32.
"""
from __future__ import annotations

import numpy as np
import pytest

from tinygrad_llm import backend, gpu, rng
from tinygrad_llm.gpu import arrays, attention, registry
from tinygrad_llm.ops.attention import CausalAttention, kernel_dropout

from test_gpu_attention import PATHS, _choose_path, _dtype, _embedded, _inputs, _model_gradients, _relative_error

pytestmark = pytest.mark.gpu

TOLERANCE = {"bfloat16": 1e-2, "float16": 1e-2, "float32": 1e-5}
SEED = 0x123456789ABCDEF


def _reference(q, k, v, dy, probability, seed):
    """out, lse, dq, dk, dv of the NumPy op with attention dropout, in float64."""
    op = CausalAttention()
    q, k, v, dy = (np.asarray(a, dtype=np.float64) for a in (q, k, v, dy))
    out = op.forward(q, k, v, dropout=(probability, seed))
    lse = op.saved[5].reshape(q.shape[:3])        # saved: path, q, k, v, out, L, (seed, keep), packed
    dq, dk, dv = op.backward(dy)
    return out, lse, dq, dk, dv


@pytest.fixture
def poisoned(monkeypatch):
    monkeypatch.setattr(arrays, "POISON_OUTPUTS", True)


CASES = [  # (batch, heads, kv_heads, query_len, key_len)
    (2, 2, 1, 37, 37),        # odd T, GQA 2
    (1, 4, 1, 300, 300),      # several tiles of every build, GQA 4
    (2, 3, 3, 128, 128),      # whole tiles, no GQA
    (1, 4, 2, 33, 200),       # Tq < Tk, both off the tile size
]


@pytest.mark.parametrize("head_dim,dtype_name,hopper", PATHS, ids=lambda p: str(p))
@pytest.mark.parametrize("row_offset", [0, 3_000_000_019])
@pytest.mark.parametrize("device_seed", [False, True])
def test_kernel_masks_are_the_hash_bits_exactly(head_dim, dtype_name, hopper, row_offset, device_seed, poisoned,
                                                monkeypatch):
    """q = 0 makes P uniform over the visible keys; v[j] = e_j makes out[i, j] = M[i, j] / ((i + 1)·keep)
    for j ≤ i; dO[i] = e_i makes dv[j, i] = M[i, j] P[i, j] / keep. So the zero patterns of out and dv
    are the kernels' masks, compared here with rng.hash_bits bit for bit (a row offset shifts the rows).
    device_seed: the seed is a rng.DeviceSeed whose base the kernels read from device memory (what a
    captured training step passes); its words are rng.dropout_words of it."""
    _choose_path(hopper, monkeypatch, head_dim)
    cp = backend.cupy_module()
    dtype = _dtype(dtype_name)
    batch, heads, time, keep = 3, 4, head_dim, 0.6
    eye = np.broadcast_to(np.eye(time, head_dim, dtype=np.float32), (batch, heads, time, head_dim)).astype(dtype)
    shape = (batch, heads, time, head_dim)
    q = cp.asarray(np.zeros(shape, dtype=dtype))                  # host arrays first, as for every dtype here
    k = cp.asarray(np.random.default_rng(0).standard_normal(shape).astype(np.float32).astype(dtype))
    v, dy = cp.asarray(eye), cp.asarray(eye)
    seed = rng.DeviceSeed(cp.asarray(np.array([0xFEDCBA9876543210], dtype=np.uint64)), SEED) if device_seed \
        else SEED
    dropout = kernel_dropout((seed, keep), row_offset)
    out, lse = attention.causal_attention_forward(q, k, v, dropout=dropout)
    _, _, dv = attention.causal_attention_backward(dy, q, k, v, out, lse, dropout=dropout)

    rows = np.arange(batch * heads * time).reshape(batch, heads, time, 1)
    words = rng.dropout_words(seed, keep, row_offset)
    kept = rng.hash_bits(words, rows, np.arange(time)) < words[2]                  # (B, H, Tq, Tk)
    visible = np.tril(np.ones((time, time), dtype=bool))
    out_kept = backend.to_numpy(out).astype(np.float32)[..., :time] != 0
    np.testing.assert_array_equal(out_kept, kept & visible)
    dv_kept = backend.to_numpy(dv).astype(np.float32)[..., :time] != 0           # dv[b, h, j, i]
    np.testing.assert_array_equal(dv_kept, (kept & visible).swapaxes(-1, -2))


@pytest.mark.parametrize("head_dim,dtype_name,hopper", PATHS, ids=lambda p: str(p))
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}H{}Hkv{}Tq{}Tk{}".format(*c))
@pytest.mark.parametrize("probability", [0.1, 0.5])
def test_forward_backward_with_dropout_match_numpy_float64(head_dim, dtype_name, hopper, case, probability,
                                                           poisoned, monkeypatch):
    _choose_path(hopper, monkeypatch, head_dim)
    cp = backend.cupy_module()
    dtype = _dtype(dtype_name)
    generator = np.random.default_rng()
    q, k, v, dy = _inputs(generator, dtype, *case, head_dim)
    gq, gk, gv, gdy = (cp.asarray(a) for a in (q, k, v, dy))
    assert gpu.supports("causal_attention", gq, gk, gv)
    dropout = kernel_dropout((SEED, 1.0 - probability), 0)
    out, lse = attention.causal_attention_forward(gq, gk, gv, dropout=dropout)
    dq, dk, dv = attention.causal_attention_backward(gdy, gq, gk, gv, out, lse, dropout=dropout)
    assert out.dtype == gq.dtype and dq.dtype == gq.dtype and dk.dtype == gk.dtype and dv.dtype == gv.dtype
    want = _reference(q, k, v, dy, probability, SEED)
    for name, got, expected in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, dq, dk, dv), want):
        error = _relative_error(got, expected)
        assert error <= TOLERANCE[dtype_name], f"{name}: relative error {error:.2e} > {TOLERANCE[dtype_name]:.0e}"


@pytest.mark.parametrize("hopper", [True, False])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_dropout_dk_dv_are_deterministic(head_dim, hopper, monkeypatch):
    _choose_path(hopper, monkeypatch, head_dim)
    cp = backend.cupy_module()
    q, k, v, dy = (cp.asarray(a) for a in _inputs(np.random.default_rng(), _dtype("bfloat16"), 2, 4, 1, 200, 200,
                                                  head_dim))
    dropout = kernel_dropout((SEED, 0.8), 0)
    out, lse = attention.causal_attention_forward(q, k, v, dropout=dropout)
    out2, _ = attention.causal_attention_forward(q, k, v, dropout=dropout)
    assert np.array_equal(backend.to_numpy(out).view(np.uint16), backend.to_numpy(out2).view(np.uint16))
    _, dk1, dv1 = attention.causal_attention_backward(dy, q, k, v, out, lse, dropout=dropout)
    _, dk2, dv2 = attention.causal_attention_backward(dy, q, k, v, out, lse, dropout=dropout)
    assert np.array_equal(backend.to_numpy(dk1).view(np.uint16), backend.to_numpy(dk2).view(np.uint16))
    assert np.array_equal(backend.to_numpy(dv1).view(np.uint16), backend.to_numpy(dv2).view(np.uint16))


def _op_results(device, arrays, probability, seed):
    import tinygrad_llm.functional as F
    from tinygrad_llm import Tensor
    q, k, v, dy = arrays
    tensors = [Tensor(backend.to_device(a, device), requires_grad=True) for a in (q, k, v)]
    out = F.causal_attention(*tensors, dropout=probability, seed=seed)
    (out * Tensor(backend.to_device(dy, device))).sum().backward()
    return [backend.to_numpy(out.data)] + [backend.to_numpy(t.grad) for t in tensors]


@pytest.mark.parametrize("kernels", [True, False])
def test_op_with_dropout_on_the_gpu_agrees_with_the_cpu(kernels, monkeypatch):
    """F.causal_attention with dropout on CuPy arrays: with kernels on it runs the `_dropout` builds, with
    them off the batched-GEMM path (CuPy computes the hash); either way it drops what NumPy drops."""
    calls = []
    forward = gpu.causal_attention_forward
    monkeypatch.setattr(gpu, "causal_attention_forward",
                        lambda *a, **options: calls.append(options.get("dropout")) or forward(*a, **options))
    if not kernels:
        monkeypatch.setattr(backend, "_kernels_enabled", False)
    arrays_ = _inputs(np.random.default_rng(), np.float32, 2, 4, 2, 45, 45, 64)
    on_gpu = _op_results("cuda", arrays_, 0.3, SEED)
    on_cpu = _op_results("cpu", arrays_, 0.3, SEED)
    assert calls == ([kernel_dropout((SEED, 1.0 - 0.3), 0)] if kernels else [])
    for got, want in zip(on_gpu, on_cpu):
        assert _relative_error(got, want.astype(np.float64)) <= 1e-5


def test_model_with_attention_dropout_matches_cpu(monkeypatch):
    """A GQA model (D = 64, G = 2) in float32 with attention_dropout 0.2 (and no other dropout, whose CuPy
    stream differs from NumPy's): the packed attention on the GPU draws the same seeds and drops the same
    probabilities as on the CPU, so the gradients agree (1e-3, as test_gpu_attention's model test)."""
    from tinygrad_llm.model import GPTConfig
    config = GPTConfig(vocab_size=97, d_model=128, n_layers=2, n_heads=2, n_kv_heads=1, ffn_hidden=256,
                       max_seq_len=64, attention_dropout=0.2)
    generator = np.random.default_rng()
    ids = generator.integers(0, config.vocab_size, size=(2, 45))
    targets = generator.integers(0, config.vocab_size, size=(2, 45))
    calls = []
    backward = gpu.causal_attention_backward
    monkeypatch.setattr(gpu, "causal_attention_backward",
                        lambda *a, **options: calls.append(options.get("dropout")) or backward(*a, **options))
    with_kernel = _model_gradients("cuda", ids, targets, config)
    assert len(calls) == config.n_layers and all(call is not None for call in calls)
    monkeypatch.setitem(registry.SUPPORTS, "causal_attention", lambda *arrays_: False)
    without_kernel = _model_gradients("cuda", ids, targets, config)
    cpu = _model_gradients("cpu", ids, targets, config)
    for label, reference, bound in (("the NumPy path on the GPU", without_kernel, 1e-4), ("the CPU", cpu, 1e-3)):
        errors = {name: _relative_error(with_kernel[name], want) for name, want in reference.items()}
        worst = max(errors, key=errors.get)
        assert errors[worst] <= bound, f"kernel vs {label}: {worst} {errors[worst]:.2e}"


@pytest.mark.parametrize("head_dim,dtype_name,hopper", PATHS, ids=lambda p: str(p))
def test_dropout_builds_read_and_write_strided_views(head_dim, dtype_name, hopper, monkeypatch):
    """The `_dropout` builds on views of token-major buffers (the packed op's layouts) give bit for bit the
    out, lse, dk and dv of the contiguous launch, and dq to its atomics' rounding: the mask follows the
    flat (b, h, i) row, not the address."""
    _choose_path(hopper, monkeypatch, head_dim)
    cp = backend.cupy_module()
    dtype = _dtype(dtype_name)
    q, k, v, dy = _inputs(np.random.default_rng(), dtype, 2, 4, 2, 150, 150, head_dim)
    dropout = kernel_dropout((SEED, 0.7), 0)
    views = [_embedded(cp, a, extra, first, poison=False)[0]
             for a, extra, first in ((q, 2, 1), (k, 3, 0), (v, 1, 1), (dy, 0, 0))]
    out = _embedded(cp, q, 1, 0)[0]
    grads = [_embedded(cp, a, 2, 2)[0] for a in (q, k, v)]
    out, lse = attention.causal_attention_forward(*views[:3], dropout=dropout, out=out)
    attention.causal_attention_backward(views[3], *views[:3], out, lse, dropout=dropout, dq=grads[0], dk=grads[1],
                                        dv=grads[2])
    plain = [cp.asarray(a) for a in (q, k, v, dy)]
    plain_out, plain_lse = attention.causal_attention_forward(*plain[:3], dropout=dropout)
    plain_grads = attention.causal_attention_backward(plain[3], *plain[:3], plain_out, plain_lse, dropout=dropout)
    for name, got, want in (("out", out, plain_out), ("lse", lse, plain_lse), ("dk", grads[1], plain_grads[1]),
                            ("dv", grads[2], plain_grads[2])):
        got, want = backend.to_numpy(cp.ascontiguousarray(got)), backend.to_numpy(want)
        assert np.array_equal(got.view(f"u{got.itemsize}"), want.view(f"u{want.itemsize}")), name
    assert _relative_error(grads[0], backend.to_numpy(plain_grads[0]).astype(np.float64)) <= 1e-3
