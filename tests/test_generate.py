"""Generation: KV-cached logits equal full recomputation; sampling modes; stops; long prompts; streaming."""
from __future__ import annotations

import io
import warnings

import numpy as np
import pytest

from tinygrad_llm import manual_seed, no_grad
from tinygrad_llm.data.shards import CharVocab
from tinygrad_llm.generate import generate, generate_text, sample_next
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
