"""Attention dropout: the counter-based hash (tinygrad_llm.rng.hash_bits), the op's dropout paths
(unpacked, packed with the blocked CPU path and the batched-GEMM path, chunked over the batch), the
model's `attention_dropout` option, and configs and checkpoints that carry it.

The hash is checked against a scalar transcription of its definition and for uniformity; the op by a
float64 gradcheck against a random upstream gradient, by the composed reference with the same mask
multiplied in, and by properties (p = 0 is the plain op, the drop rate is 1 − keep within a binomial
bound, a seed gives one output, batch chunking changes nothing). The CUDA kernels' agreement with these
paths is in tests/test_gpu_attention_dropout.py.
"""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import tinygrad_llm.functional as F
from tinygrad_llm import Tensor, cpu_threads, manual_seed, rng
from tinygrad_llm.model import GPT, GPTConfig
from tinygrad_llm.ops import attention
from tinygrad_llm.ops.attention import causal_attention_reference, dropout_mask
from tinygrad_llm.ops.rope import rope_angles

from op_helpers import assert_same_forward_and_backward, normal, run

seeds = st.integers(0, 2**63 - 1)


def _fmix32(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & 0xFFFFFFFF
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & 0xFFFFFFFF
    return x ^ (x >> 16)


def _scalar_bits(seed: int, row: int, column: int) -> int:
    """The hash's definition, one element at a time in Python integers (rng.py's comment)."""
    low, high = seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF
    key = _fmix32((row * 0x9E3779B9 + low) & 0xFFFFFFFF)
    return _fmix32(key ^ ((column * 0x7FEB352D + high) & 0xFFFFFFFF))


# ------------------------------------------------------------------ the hash
@given(seed=seeds, offset=st.integers(0, 2**40), keep=st.floats(0.01, 0.99))
def test_hash_bits_follow_the_definition(seed, offset, keep):
    rows, columns = np.array([0, 1, 7, 2**31, 2**32 - 1, 2**33 + 5]), np.array([0, 1, 3, 255, 2**20])
    words = rng.dropout_words(seed, keep, row_offset=offset)
    bits = rng.hash_bits(words, rows[:, None], columns)
    assert bits.dtype == np.uint32 and bits.shape == (6, 5)
    for i, row in enumerate(rows):
        for j, column in enumerate(columns):      # the row offset is folded into s0: rows count from it
            assert int(bits[i, j]) == _scalar_bits(seed, int(row) + offset, int(column))
    assert words[2] == math.floor(keep * 2**32)


def test_hash_bits_are_uniform():
    """Chi-square over 256 bins of the top byte, the bottom byte and a middle byte of 2²⁰ values, with a
    bound the uniform distribution exceeds with probability about 1e-6 (255 degrees of freedom)."""
    words = rng.dropout_words(2024, 0.5)
    bits = rng.hash_bits(words, np.arange(1024)[:, None], np.arange(1024)).reshape(-1)
    bound = 255 + 5 * math.sqrt(2 * 255) + 20
    expected = bits.size / 256
    for shift in (24, 12, 0):
        counts = np.bincount(((bits >> shift) & 0xFF).astype(np.int64), minlength=256)
        chi_square = float(((counts - expected) ** 2 / expected).sum())
        assert chi_square < bound, f"byte at bit {shift}: chi-square {chi_square:.1f}"


@pytest.mark.parametrize("axis", [0, 1])
def test_neighbouring_decisions_are_independent(axis):
    """P(both kept) of neighbours along a row (next key) or a column (next query row) is keep², within
    six standard deviations of the binomial count."""
    keep = 0.7
    words = rng.dropout_words(99, keep)
    kept = rng.hash_bits(words, np.arange(513)[:, None], np.arange(513)) < words[2]
    first, second = (kept[:-1], kept[1:]) if axis == 0 else (kept[:, :-1], kept[:, 1:])
    both = int((first & second).sum())
    count, rate = first.size, keep * keep
    assert abs(both - count * rate) < 6 * math.sqrt(count * rate * (1 - rate))


@given(seed=seeds, keep=st.sampled_from([0.1, 0.5, 0.9, 0.99]))
def test_mask_keeps_a_fraction_keep_and_scales_by_one_over_keep(seed, keep):
    scaled = dropout_mask(seed, keep, (2, 4, 64, 64))
    kept = scaled != 0
    assert np.all(scaled[kept] == 1.0 / keep)
    count = kept.size
    assert abs(int(kept.sum()) - count * keep) < 6 * math.sqrt(count * keep * (1 - keep))


# ------------------------------------------------------------------ the op
@st.composite
def attention_case(draw):
    batch, group = draw(st.integers(1, 2)), draw(st.sampled_from([1, 2, 4]))
    kv_heads = draw(st.integers(1, 2)) if group < 4 else 1
    query_len = draw(st.integers(1, 4))
    key_len = query_len + draw(st.sampled_from([0, 0, 2]))
    head_dim = draw(st.sampled_from([1, 2, 3]))
    return (batch, kv_heads * group, query_len, head_dim), (batch, kv_heads, key_len, head_dim)


@given(case=attention_case(), seed=seeds, probability=st.sampled_from([0.2, 0.5]))
def test_dropout_attention_gradcheck_and_reference(backend, assert_gradcheck, case, seed, probability):
    """The op with a fixed seed is a fixed function of q, k, v: float64 finite differences hold, and it
    equals the composed reference with the op's own mask multiplied into the probabilities."""
    q_shape, kv_shape = case
    q, k, v = normal(q_shape, seed % 2**32), normal(kv_shape, seed % 2**32 + 1), normal(kv_shape, seed % 2**32 + 2)
    scores_shape = q_shape[:3] + (kv_shape[2],)
    mask = backend.array(dropout_mask(seed, 1.0 - probability, scores_shape))

    def dropped(*t):
        return F.causal_attention(*t, dropout=probability, seed=seed)

    assert_gradcheck(dropped, [backend.tensor(q), backend.tensor(k), backend.tensor(v)], max_elements_per_input=24)
    assert_same_forward_and_backward(backend, dropped, lambda *t: causal_attention_reference(*t, dropout_scale=mask),
                                     [q, k, v])


def _rotated_heads(qkv, heads, kv_heads, cos, sin):
    """q and k rotated, v, as (B, heads, T, D) tensors: the unpacked op's inputs of a packed qkv."""
    q = qkv[:, :, :heads].permute(0, 2, 1, 3)
    k = qkv[:, :, heads:heads + kv_heads].permute(0, 2, 1, 3)
    v = qkv[:, :, heads + kv_heads:].permute(0, 2, 1, 3)
    return F.rope(q, theta=10000.0), F.rope(k, theta=10000.0), v


@pytest.mark.parametrize("keep_probabilities", [True, False])
@pytest.mark.parametrize("heads, kv_heads", [(2, 2), (4, 2), (4, 1)])
def test_packed_dropout_gradcheck_and_unpacked_equivalence(backend, assert_gradcheck, keep_probabilities,
                                                           heads, kv_heads):
    """The packed form (the blocked CPU path with keep_probabilities, else the batched-GEMM one) drops
    the same probabilities as the unpacked op: rows are numbered in one (B, H, T) order everywhere."""
    batch, time, head_dim, seed = 2, 5, 4, 12345
    qkv = normal((batch, time, heads + 2 * kv_heads, head_dim), heads + kv_heads)
    cos, sin = (backend.array(t) for t in rope_angles(np.arange(time), head_dim, 10000.0))

    def packed(t):
        return F.rope_attention(t, heads, kv_heads, cos, sin, keep_probabilities=keep_probabilities,
                                dropout=0.4, seed=seed)

    def unpacked(t):
        out = F.causal_attention(*_rotated_heads(t, heads, kv_heads, cos, sin), dropout=0.4, seed=seed)
        return out.permute(0, 2, 1, 3).reshape(batch, time, heads * head_dim)   # (B, H, T, D) -> (B, T, H·D)

    assert_gradcheck(packed, [backend.tensor(qkv)], max_elements_per_input=24)
    assert_same_forward_and_backward(backend, packed, unpacked, [qkv])


@pytest.mark.parametrize("keep_probabilities", [True, False])
def test_dropout_zero_is_the_plain_op_exactly(backend, keep_probabilities):
    qkv = normal((2, 6, 6, 4), 3)
    cos, sin = (backend.array(t) for t in rope_angles(np.arange(6), 4, 10000.0))
    plain = run(backend, lambda t: F.rope_attention(t, 2, 2, cos, sin, keep_probabilities=keep_probabilities), [qkv])
    zero = run(backend, lambda t: F.rope_attention(t, 2, 2, cos, sin, keep_probabilities=keep_probabilities,
                                                   dropout=0.0, seed=5), [qkv])
    np.testing.assert_array_equal(zero[0], plain[0])
    np.testing.assert_array_equal(zero[1][0], plain[1][0])
    q, k, v = normal((1, 4, 5, 3), 1), normal((1, 2, 5, 3), 2), normal((1, 2, 5, 3), 3)
    np.testing.assert_array_equal(F.causal_attention(backend.tensor(q), backend.tensor(k), backend.tensor(v),
                                                     dropout=0.0, seed=9).numpy(),
                                  F.causal_attention(backend.tensor(q), backend.tensor(k), backend.tensor(v)).numpy())


@given(seed=seeds)
def test_one_seed_gives_one_output_and_another_seed_another(seed):
    q, k, v = (Tensor(normal(shape, 7 + i)) for i, shape in enumerate([(2, 4, 16, 4), (2, 2, 16, 4), (2, 2, 16, 4)]))
    first = F.causal_attention(q, k, v, dropout=0.5, seed=seed).numpy()
    again = F.causal_attention(q, k, v, dropout=0.5, seed=seed).numpy()
    other = F.causal_attention(q, k, v, dropout=0.5, seed=seed ^ 1).numpy()
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_dropped_output_is_unbiased():
    """E[P ∘ M / keep] = P: the mean output over many seeds approaches the undropped output (its standard
    error over 2000 seeds is ~2 % of ‖O‖ here; the bound is 8 %), and no single seed gives it."""
    q, k, v = normal((1, 2, 6, 3), 1), normal((1, 2, 6, 3), 2), normal((1, 2, 6, 3), 3)
    plain = F.causal_attention(Tensor(q), Tensor(k), Tensor(v)).numpy()
    runs = np.stack([F.causal_attention(Tensor(q), Tensor(k), Tensor(v), dropout=0.5, seed=s).numpy()
                     for s in range(2000)])
    assert np.linalg.norm(runs.mean(axis=0) - plain) < 0.08 * np.linalg.norm(plain)
    assert min(np.linalg.norm(run - plain) for run in runs[:20]) > 0.01 * np.linalg.norm(plain)


@pytest.mark.parametrize("keep_probabilities", [True, False])
@given(seed=seeds, threads=st.sampled_from([1, 2, 3]), chunk_elements=st.sampled_from([1, 64, 10**9]))
def test_batch_chunks_and_threads_drop_the_same_probabilities(keep_probabilities, seed, threads, chunk_elements):
    """The CPU packed path cuts the batch into chunks dealt to threads; the mask hashes global rows, so
    any chunking gives the unchunked result and gradient."""
    batch, time, heads, kv_heads, head_dim = 5, 7, 4, 2, 4
    qkv = normal((batch, time, heads + 2 * kv_heads, head_dim), 11)
    upstream = normal((batch, time, heads * head_dim), 12)
    cos, sin = rope_angles(np.arange(time), head_dim, 10000.0)

    def outcome():
        t = Tensor(qkv, requires_grad=True)
        y = F.rope_attention(t, heads, kv_heads, cos, sin, keep_probabilities=keep_probabilities,
                             dropout=0.3, seed=seed)
        y.backward(upstream)
        return y.numpy(), t.grad

    previous_threads, previous_chunk = cpu_threads.thread_count(), attention.CHUNK_ELEMENTS
    try:
        cpu_threads.set_thread_count(1)
        attention.CHUNK_ELEMENTS = 10**9                  # one chunk
        whole = outcome()
        cpu_threads.set_thread_count(threads)
        attention.CHUNK_ELEMENTS = chunk_elements         # 1: a chunk per batch row
        chunked = outcome()
    finally:
        cpu_threads.set_thread_count(previous_threads)
        attention.CHUNK_ELEMENTS = previous_chunk
    np.testing.assert_allclose(chunked[0], whole[0], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(chunked[1], whole[1], rtol=1e-12, atol=1e-14)


def test_dropout_with_a_cache_or_out_of_range_is_a_clear_error():
    qkv = Tensor(normal((1, 2, 6, 4), 0))
    cos, sin = rope_angles(np.arange(2), 4, 10000.0)
    stores = (np.zeros((1, 2, 8, 4)), np.zeros((1, 2, 8, 4)), 0)
    with pytest.raises(ValueError, match="KV-cache path takes none"):
        F.rope_attention(qkv, 2, 2, cos, sin, cache=stores, dropout=0.1, seed=1)
    for probability in (1.0, -0.1):
        with pytest.raises(ValueError, match=r"dropout probability must be in \[0, 1\)"):
            F.rope_attention(qkv, 2, 2, cos, sin, dropout=probability, seed=1)


# ------------------------------------------------------------------ the model
def _config(**overrides):
    values = dict(vocab_size=31, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=48, max_seq_len=16)
    values.update(overrides)
    return GPTConfig(**values)


def test_config_validates_attention_dropout():
    assert _config(attention_dropout=0.25).attention_dropout == 0.25
    for bad in (1.0, -0.5):
        with pytest.raises(ValueError, match=r"attention_dropout must be in \[0, 1\)"):
            _config(attention_dropout=bad)
    old = _config().to_dict()
    del old["attention_dropout"]                          # a config saved before the option existed
    assert GPTConfig.from_dict(old).attention_dropout == 0.0


def test_model_trains_with_attention_dropout_and_evaluates_deterministically():
    from tinygrad_llm.optim import AdamW
    ids = np.random.default_rng(0).integers(0, 31, (4, 17))
    manual_seed(0)
    model = GPT(_config(attention_dropout=0.3))
    manual_seed(0)
    plain = GPT(_config())
    plain.load_state_dict(model.state_dict())
    # training mode drops: two forwards differ, and differ from the model without attention dropout
    first = model(ids[:, :-1]).numpy()
    second = model(ids[:, :-1]).numpy()
    assert not np.array_equal(first, second)
    assert not np.allclose(first, plain(ids[:, :-1]).numpy())
    # eval mode never drops: deterministic, and equal to the same weights without the option
    model.eval()
    plain.eval()
    evaluated = model(ids[:, :-1]).numpy()
    np.testing.assert_array_equal(evaluated, model(ids[:, :-1]).numpy())
    np.testing.assert_array_equal(evaluated, plain(ids[:, :-1]).numpy())
    # and it trains: the loss on a fixed batch falls
    model.train()
    optimizer = AdamW(model.named_parameters(), lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(25):
        _, loss = model(ids[:, :-1], ids[:, 1:], return_logits=False)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(np.isfinite(losses)) and np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5


def test_train_config_and_toml_carry_attention_dropout(tmp_path):
    from tinygrad_llm.train_config import config_from_dict, load_toml
    config = config_from_dict({"model": {"attention_dropout": 0.1}})
    assert config.model_config(40).attention_dropout == 0.1
    path = tmp_path / "run.toml"
    path.write_text("[model]\nattention_dropout = 0.2\n")
    assert config_from_dict(load_toml(str(path))).attention_dropout == 0.2
    assert config_from_dict(load_toml("shakespeare_char")).attention_dropout == 0.0
    with pytest.raises(ValueError, match=r"attention_dropout must be in \[0, 1\)"):
        config_from_dict({"model": {"attention_dropout": 1.5}})


def test_checkpoint_saved_before_the_option_loads_as_zero(tmp_path):
    from tinygrad_llm.checkpoint import STATE_FILE, load_checkpoint, save_checkpoint
    manual_seed(0)
    model = GPT(_config())
    old_config = model.config.to_dict()
    del old_config["attention_dropout"]
    directory = str(tmp_path / "checkpoints")
    save_checkpoint(directory, 1, model, None, {"model_config": old_config, "rng": {}})
    with open(os.path.join(directory, "step_00000001", STATE_FILE)) as f:
        assert "attention_dropout" not in json.load(f)["model_config"]
    rebuilt, _ = load_checkpoint(str(tmp_path))                        # built from the saved config
    assert rebuilt.config.attention_dropout == 0.0
    loaded, _ = load_checkpoint(str(tmp_path), model=GPT(_config()))  # into a model of today's config
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(loaded.state_dict()[name], value, err_msg=name)
    from tinygrad_llm.checkpoint import CheckpointError
    with pytest.raises(CheckpointError, match="attention_dropout"):
        load_checkpoint(str(tmp_path), model=GPT(_config(attention_dropout=0.1)))


def test_both_cpu_schedules_drop_alike_in_the_model():
    """OpOptions changes how attention runs on the CPU (P kept and blocked, or recomputed), not what it
    computes: with attention dropout on, the loss and every gradient agree to float32 rounding."""
    from tinygrad_llm.model import OpOptions
    ids = np.random.default_rng(0).integers(0, 31, (3, 17))
    results = []
    for keep in (True, False):
        manual_seed(0)
        model = GPT(_config(attention_dropout=0.3), options=OpOptions(keep_attention_probabilities=keep))
        _, loss = model(ids[:, :-1], ids[:, 1:], return_logits=False)
        loss.backward()
        results.append((loss.item(), {name: p.grad for name, p in model.named_parameters()}))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    for name, grad in results[0][1].items():
        np.testing.assert_allclose(grad, results[1][1][name], rtol=1e-4, atol=1e-6, err_msg=name)
