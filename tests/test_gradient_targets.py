"""Gradients written straight into an optimizer's buffers (Function.gradient_targets).

Linear, the training head (F.linear_cross_entropy) and Embedding write a parameter's gradient into its
`grad_buffer` when the autograd offers it (the parameter has no .grad yet this pass): the result must be
the buffer itself, with the same values as without a buffer; a parameter used twice, or a second backward
before zero_grad, must still sum every contribution. On NumPy arrays here; on the GPU (marked gpu) too.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tinygrad_llm.functional as F
from tinygrad_llm import Tensor, backend
from tinygrad_llm.nn import Parameter

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not backend.gpu_available(), reason="needs an NVIDIA GPU and CuPy")])]


def _graph(x, w_in, w_out, table, ids, targets):
    """embedding -> Linear -> training head; w_in used twice (a tied weight's situation)."""
    h = F.embedding(ids, table) + x
    h = F.linear(F.linear(h, w_in), w_in)
    return F.linear_cross_entropy(h, w_out, targets)


def _gradients(device, arrays, ids, targets, buffers, backwards=1):
    params = [Parameter(backend.to_device(a, device)) for a in arrays[1:]]
    if buffers:
        for p in params:
            p.grad_buffer = backend.to_device(np.full(p.shape, np.nan, np.float32), device)   # stale contents
    x = Tensor(backend.to_device(arrays[0], device))
    for _ in range(backwards):
        _graph(x, *params, backend.to_device(ids, device), backend.to_device(targets, device)).backward()
    return params


@pytest.mark.parametrize("device", DEVICES)
@given(seed=st.integers(0, 2**31 - 1), backwards=st.sampled_from([1, 2]))
@settings(max_examples=10, deadline=None)
def test_gradients_land_in_the_buffers_with_the_values_of_a_fresh_array(device, seed, backwards):
    rng = np.random.default_rng(seed)
    vocab, channels = 11, 8
    arrays = [rng.standard_normal((2, 5, channels)).astype(np.float32),
              (0.3 * rng.standard_normal((channels, channels))).astype(np.float32),
              (0.3 * rng.standard_normal((vocab, channels))).astype(np.float32),
              rng.standard_normal((vocab, channels)).astype(np.float32)]
    ids, targets = rng.integers(0, vocab, (2, 5)), rng.integers(0, vocab, (2, 5))
    fresh = _gradients(device, arrays, ids, targets, buffers=False, backwards=backwards)
    written = _gradients(device, arrays, ids, targets, buffers=True, backwards=backwards)
    for want, got in zip(fresh, written):
        assert got.grad is got.grad_buffer                     # no second array, no copy
        np.testing.assert_allclose(backend.to_numpy(got.grad), backend.to_numpy(want.grad), rtol=1e-5, atol=1e-6)


def test_a_buffer_of_another_dtype_is_not_written():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3)).astype(np.float32)
    weight = Parameter(rng.standard_normal((4, 3)).astype(np.float32))
    weight.grad_buffer = np.zeros((4, 3), np.float64)           # not the gradient's dtype: left alone
    F.linear(Tensor(x), weight).sum().backward()
    assert weight.grad is not weight.grad_buffer and weight.grad.dtype == np.float32
    assert not weight.grad_buffer.any()
    np.testing.assert_allclose(weight.grad, np.ones((2, 4), np.float32).T @ x, rtol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_each_op_returns_the_target_it_was_offered(device):
    """The ops themselves write there (the engine would otherwise copy into the buffer, which the test above
    cannot tell apart)."""
    from tinygrad_llm.ops.embedding import Embedding
    from tinygrad_llm.ops.loss import LinearCrossEntropy
    from tinygrad_llm.ops.matmul import Linear
    rng = np.random.default_rng(3)
    put = lambda a: backend.to_device(np.asarray(a), device)
    x, weight, dy = (rng.standard_normal(s).astype(np.float32) for s in ((6, 4), (5, 4), (6, 5)))
    ids, targets = rng.integers(0, 5, 6), rng.integers(0, 5, 6)
    cases = [(Linear, (put(x), put(weight)), {}, put(dy), np.asarray(dy).T @ x),
             (LinearCrossEntropy, (put(x), put(weight), put(targets)), {}, None, None),
             (Embedding, (put(ids), put(weight)), {}, put(np.ones((6, 4), np.float32)),
              np.stack([np.full(4, float((ids == v).sum()), np.float32) for v in range(5)]))]
    for cls, inputs, options, upstream, want in cases:
        op = cls()
        op.needs_input_grad = (True, True)
        op.forward(*inputs, **options)
        target = put(np.full((5, 4), np.nan, np.float32))
        into = (target,) if cls is Embedding else (None, target)
        if upstream is None:                                   # the loss: its own unit gradient
            upstream = put(np.float32(1.0))
            logits = x @ weight.T
            p = np.exp(logits - logits.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            p[np.arange(6), targets] -= 1
            want = (p / 6).T @ x
        grads = op.backward(upstream, into=into)
        dweight = grads if cls is Embedding else grads[1]
        assert dweight is target, cls.__name__
        np.testing.assert_allclose(backend.to_numpy(dweight), want, rtol=1e-5, atol=1e-6, err_msg=cls.__name__)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tie", [False, True])
def test_a_model_step_writes_every_matrix_gradient_in_place_and_matches_a_fresh_backward(device, tie, monkeypatch):
    """A GPT bound to AdamW: every weight matrix's gradient (q, k, v through their joined view, the MLP, the
    head, the embedding) is written by its op into the optimizer's buffer, none copied there after; the
    values equal those of a model without buffers."""
    from tinygrad_llm import manual_seed, tensor
    from tinygrad_llm.model import GPT, GPTConfig
    from tinygrad_llm.optim import AdamW
    config = GPTConfig(vocab_size=37, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64,
                       max_seq_len=16, tie_embeddings=tie)
    rng = np.random.default_rng(5)
    ids, targets = rng.integers(0, 37, (2, 16)), rng.integers(0, 37, (2, 16))

    def grads(bound):
        manual_seed(11)
        model = GPT(config).to(device)
        if bound:
            AdamW(model.named_parameters(), lr=1e-3)._ensure_bound()
        _, loss = model(backend.to_device(ids, device), backend.to_device(targets, device), return_logits=False)
        loss.backward()
        return model, {name: backend.to_numpy(p.grad) for name, p in model.named_parameters()}

    copied = []
    original = tensor._accumulated

    def watching(t, dy):
        buffer = getattr(t, "grad_buffer", None)
        if buffer is not None and t.grad is None and not (dy is buffer or tensor._same_memory(dy, buffer)):
            copied.append(t)
        return original(t, dy)

    _, fresh = grads(bound=False)
    monkeypatch.setattr(tensor, "_accumulated", watching)
    model, written = grads(bound=True)
    names = {id(p): name for name, p in model.named_parameters()}
    copied_matrices = [names[id(t)] for t in copied if t.ndim == 2]
    # a tied weight has two uses: the second one's gradient is added, then copied once
    assert copied_matrices == (["model.embed_tokens.weight"] if tie else []), copied_matrices
    for name, p in model.named_parameters():
        assert p.grad is p.grad_buffer, name
        np.testing.assert_allclose(written[name], fresh[name], rtol=1e-5, atol=1e-7, err_msg=name)
