"""Generation: KV-cached logits equal full recomputation; sampling modes; stops; long prompts; streaming."""
from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinygrad_llm import manual_seed, no_grad
from tinygrad_llm.data.shards import CharVocab
from tinygrad_llm.generate import _nucleus, generate, generate_text, sample_next
from tinygrad_llm.model import GPT, GPTConfig


def make_model(max_seq_len=16, **overrides):
    manual_seed(7)
    values = dict(vocab_size=13, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=32,
                  max_seq_len=max_seq_len)
    values.update(overrides)
    model = GPT(GPTConfig(**values))
    for p in model.parameters():             # larger weights: logits that differ visibly between positions
        p.data *= 8
    return model.eval()


def test_kv_cached_logits_equal_full_recomputation():
    model = make_model()
    model.to(dtype=np.float64)
    ids = np.random.default_rng(0).integers(0, 13, (2, 14))
    with no_grad():
        full = model(ids).numpy()                                   # (B, T, V), no cache, fused path
        cache = model.new_cache(2)
        prefill = model(ids[:, :6], cache=cache).numpy()            # prefill 6 positions at once
        np.testing.assert_allclose(prefill, full[:, :6], rtol=1e-10, atol=1e-10)
        for t in range(6, 14):                                      # then one position per step
            step = model(ids[:, t:t + 1], cache=cache).numpy()
            np.testing.assert_allclose(step[:, 0], full[:, t], rtol=1e-10, atol=1e-10)
        assert cache.length == 14


def test_cached_and_uncached_greedy_generation_agree_even_past_the_context():
    model = make_model(max_seq_len=8)
    prompt = [1, 2, 3]
    cached = list(generate(model, prompt, 20, temperature=0))        # 23 tokens: the window slides
    uncached = list(generate(model, prompt, 20, temperature=0, use_cache=False))
    assert cached == uncached and len(cached) == 20


def test_long_prompt_keeps_the_last_max_seq_len_tokens():
    model = make_model(max_seq_len=8)
    long_prompt = list(np.random.default_rng(1).integers(0, 13, 30))
    with pytest.warns(UserWarning, match="keeping its last 8 tokens"):
        out = list(generate(model, long_prompt, 5, temperature=0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same = list(generate(model, long_prompt[-8:], 5, temperature=0))
    assert out == same


def _nucleus_by_full_sort(probs, top_p):
    order = np.argsort(-probs, kind="stable")
    return order[:int(np.searchsorted(np.cumsum(probs[order]), top_p) + 1)]


@settings(max_examples=150, deadline=None)
@given(size=st.integers(1, 3000), scale=st.sampled_from([0.0, 0.1, 1.0, 3.0, 10.0, 30.0]),
       levels=st.sampled_from([0, 2, 7]), top_p=st.floats(0.001, 0.999), seed=st.integers(0, 2**31))
def test_the_nucleus_is_the_full_sorts_prefix(size, scale, levels, top_p, seed):
    generator = np.random.default_rng(seed)
    logits = generator.standard_normal(size) * scale
    if levels:                                             # many exact ties, at the boundary too
        logits = np.round(logits * levels) / levels
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    np.testing.assert_array_equal(_nucleus(probs, top_p), _nucleus_by_full_sort(probs, top_p))


def test_top_p_sampling_draws_what_the_full_sort_would():
    logits = np.random.default_rng(1).standard_normal(5000) * 4
    for seed in range(20):
        expected_probs = np.exp(logits / 0.7 - (logits / 0.7).max())
        expected_probs /= expected_probs.sum()
        mask = np.zeros(logits.size, dtype=bool)
        mask[_nucleus_by_full_sort(expected_probs, 0.9)] = True
        expected_probs = np.where(mask, expected_probs, 0.0)
        expected_probs /= expected_probs.sum()
        expected = int(np.random.default_rng(seed).choice(logits.size, p=expected_probs))
        assert sample_next(logits, 0.7, top_p=0.9, rng=np.random.default_rng(seed)) == expected


def test_sampling_modes():
    logits = np.array([0.0, 3.0, 1.0, 2.9])
    rng = np.random.default_rng(0)
    assert sample_next(logits, temperature=0) == 1
    assert all(sample_next(logits, 1.0, top_k=1, rng=rng) == 1 for _ in range(20))
    assert all(sample_next(logits, 1.0, top_p=0.01, rng=rng) == 1 for _ in range(20))
    draws = {sample_next(logits, 1.0, top_k=2, rng=rng) for _ in range(200)}
    assert draws == {1, 3}
    draws = {sample_next(logits, 5.0, rng=rng) for _ in range(400)}
    assert draws == {0, 1, 2, 3}
    with pytest.raises(ValueError):
        sample_next(logits, temperature=-1)


def test_same_seed_same_sample():
    model = make_model()
    a = list(generate(model, [1, 2], 10, temperature=1.0, top_p=0.9, seed=3))
    b = list(generate(model, [1, 2], 10, temperature=1.0, top_p=0.9, seed=3))
    assert a == b


def test_stops_at_end_of_text_and_stop_strings_and_streams():
    model = make_model()
    greedy = list(generate(model, [1, 2], 12, temperature=0))
    eot = greedy[4]
    stopped = list(generate(model, [1, 2], 12, temperature=0, eot_id=eot))
    assert stopped == greedy[:greedy.index(eot)] and eot not in stopped

    vocab = CharVocab(list("abcdefghijkl"), special_tokens=())       # 12 ids, no end-of-text token
    model = make_model(vocab_size=12)
    full = generate_text(model, vocab, "abc", max_new_tokens=30, temperature=0)
    assert len(full) == 30
    stop = full[10:12]
    stream = io.StringIO()
    cut = generate_text(model, vocab, "abc", max_new_tokens=30, temperature=0, stop=[stop], stream=stream)
    assert cut == full[:full.find(stop)] and stop not in cut
    assert stream.getvalue() == cut                                  # streamed text is exactly the result
    streamed = io.StringIO()
    assert generate_text(model, vocab, "abc", max_new_tokens=30, temperature=0, stream=streamed) == full
    assert streamed.getvalue() == full
