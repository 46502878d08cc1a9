"""Batched, slot-based KV-cached decoding (generate.Decoder, BatchedKVCache, generate_batch): the same
logits as GPT.forward, and the same tokens as one sequence at a time, whatever else is in the batch."""
from __future__ import annotations

import numpy as np
import pytest

from tinygrad_llm import manual_seed, no_grad
from tinygrad_llm.data.shards import CharVocab
from tinygrad_llm.generate import (BatchedKVCache, Decoder, generate, generate_batch, generate_text,
                                   generate_text_batch)
from tinygrad_llm.model import GPT, GPTConfig


def make_model(max_seq_len=24, dtype=np.float32, **overrides):
    manual_seed(11)
    values = dict(vocab_size=13, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64,
                  max_seq_len=max_seq_len)
    values.update(overrides)
    model = GPT(GPTConfig(**values))
    for p in model.parameters():             # larger weights: logits that differ visibly between tokens
        p.data *= 8
    return model.to(dtype=dtype).eval()


def full_logits(model, ids):
    with no_grad():
        return model(np.asarray(ids)[None, :]).numpy()[0]                     # (T, V)


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_prefill_and_ragged_decode_equal_the_full_forward(kv_heads):
    model = make_model(dtype=np.float64, n_kv_heads=kv_heads)
    rng = np.random.default_rng(0)
    sequences = [rng.integers(0, 13, n) for n in (9, 3, 14, 6)]
    decoder = Decoder(model)
    cache = decoder.new_cache(slots=5)
    slots = [cache.allocate() for _ in sequences]
    prompt_lengths = [5, 1, 8, 2]
    for slot, ids, n in zip(slots, sequences, prompt_lengths):
        logits = decoder.prefill(cache, slot, ids[:n], all_logits=True)         # (n, V)
        np.testing.assert_allclose(logits, full_logits(model, ids[:n]), rtol=1e-9, atol=1e-9)
    lengths = list(prompt_lengths)
    while True:                                   # one token per unfinished sequence, in a shuffled order
        live = [i for i, ids in enumerate(sequences) if lengths[i] < len(ids)]
        if not live:
            break
        rng.shuffle(live)
        step = decoder.decode_step(cache, [sequences[i][lengths[i]] for i in live], [slots[i] for i in live])
        for row, i in enumerate(live):
            expected = full_logits(model, sequences[i][:lengths[i] + 1])[-1]
            np.testing.assert_allclose(step[row], expected, rtol=1e-9, atol=1e-9)
            lengths[i] += 1
    assert [cache.lengths[s] for s in slots] == [len(s) for s in sequences]


def test_prefill_extends_a_slot():
    model = make_model(dtype=np.float64)
    ids = np.random.default_rng(1).integers(0, 13, 12)
    decoder = Decoder(model)
    cache = decoder.new_cache(1)
    slot = cache.allocate()
    decoder.prefill(cache, slot, ids[:4])
    second = decoder.prefill(cache, slot, ids[4:], all_logits=True)             # a second chunk (a chat turn)
    np.testing.assert_allclose(second, full_logits(model, ids)[4:], rtol=1e-9, atol=1e-9)


def test_greedy_batch_equals_one_at_a_time_whatever_the_batch():
    model = make_model(max_seq_len=16)
    rng = np.random.default_rng(2)
    prompts = [list(rng.integers(0, 13, n)) for n in (1, 7, 3, 12, 5)]
    alone = [list(generate(model, p, 20, temperature=0)) for p in prompts]       # 12 + 20 > 16: windows slide
    assert generate_batch(model, prompts, 20, temperature=0) == alone
    order = [3, 0, 4]
    assert generate_batch(model, [prompts[i] for i in order], 20, temperature=0) == [alone[i] for i in order]
    assert generate_batch(model, [prompts[2]] * 3, 20, temperature=0) == [alone[2]] * 3


def test_sampled_batch_equals_one_at_a_time_with_the_same_seeds():
    model = make_model()
    prompts = [[1, 2, 3], [4], [5, 6, 7, 8, 9]]
    seeds = [10, 20, 30]
    alone = [list(generate(model, p, 12, temperature=1.0, top_k=5, seed=s)) for p, s in zip(prompts, seeds)]
    assert generate_batch(model, prompts, 12, temperature=1.0, top_k=5, seed=seeds) == alone


def test_sequences_join_and_leave_between_steps():
    """Continuous batching: a slot released mid-way is reused by a new sequence while others decode."""
    model = make_model()
    decoder = Decoder(model)
    cache = decoder.new_cache(slots=2)
    expected = {name: list(generate(model, prompt, 8, temperature=0))
                for name, prompt in (("a", [1, 2]), ("b", [3, 4, 5]), ("c", [6]))}
    prompts = {"a": [1, 2], "b": [3, 4, 5], "c": [6]}
    running, produced, pending = {}, {name: [] for name in prompts}, ["a", "b", "c"]
    while pending or running:
        while pending and cache.free_slots:                                     # join at a step boundary
            name = pending.pop(0)
            slot = cache.allocate()
            running[name] = (slot, decoder.prefill(cache, slot, prompts[name]))
        tokens = {name: int(np.argmax(logits)) for name, (slot, logits) in running.items()}
        for name, token in tokens.items():
            produced[name].append(token)
        for name in [n for n in running if len(produced[n]) == (4 if n == "a" else 8)]:
            cache.release(running.pop(name)[0])                                 # leave (a stops early)
        if running:
            names = list(running)
            step = decoder.decode_step(cache, [tokens[n] for n in names], [running[n][0] for n in names])
            running = {n: (running[n][0], step[row]) for row, n in enumerate(names)}
    assert produced == {"a": expected["a"][:4], "b": expected["b"], "c": expected["c"]}


def test_stop_tokens_and_stop_strings_per_sequence():
    model = make_model(vocab_size=12)
    prompts = [[1, 2], [3], [4, 5, 6]]
    alone = [list(generate(model, p, 10, temperature=0)) for p in prompts]
    stop_tokens = [[alone[0][3]], [], [alone[2][0]]]
    out = generate_batch(model, prompts, 10, temperature=0, stop_tokens=stop_tokens)
    assert out[0] == alone[0][:alone[0].index(alone[0][3])]
    assert out[1] == alone[1] and out[2] == []

    vocab = CharVocab(list("abcdefghijkl"), special_tokens=())
    texts = ["abc", "k", "hij"]
    full = [generate_text(model, vocab, t, max_new_tokens=10, temperature=0) for t in texts]
    stops = [[full[0][4:6]], [], ["zz", full[2][1]]]
    got = generate_text_batch(model, vocab, texts, max_new_tokens=10, temperature=0, stop=stops)
    assert got == [full[0][:full[0].find(full[0][4:6])], full[1], full[2][:full[2].find(full[2][1])]]
    shared = generate_text_batch(model, vocab, texts, max_new_tokens=10, temperature=0, stop=[full[1][2]])
    assert shared[1] == full[1][:full[1].find(full[1][2])]


def test_cache_slots_and_bad_calls():
    model = make_model(max_seq_len=6)
    decoder = Decoder(model)
    cache = decoder.new_cache(slots=2)
    assert isinstance(cache, BatchedKVCache) and cache.k[0].shape == (2, 2, 6, 8)
    a, b = cache.allocate(), cache.allocate()
    with pytest.raises(RuntimeError, match="all 2"):
        cache.allocate()
    with pytest.raises(ValueError, match="empty"):
        decoder.decode_step(cache, [1], [a])
    decoder.prefill(cache, a, [1, 2, 3, 4, 5])
    decoder.decode_step(cache, [1], [a])
    with pytest.raises(ValueError, match="full"):
        decoder.decode_step(cache, [1], [a])
    with pytest.raises(ValueError, match="exceed"):
        decoder.prefill(cache, b, list(range(7)))
    cache.release(b)
    with pytest.raises(ValueError, match="not allocated"):
        decoder.decode_step(cache, [1], [b])
    with pytest.raises(ValueError, match="twice"):
        decoder.decode_step(cache, [1, 1], [a, a])
    with pytest.raises(IndexError, match="token ids"):
        decoder.prefill(cache, cache.allocate(), [13])
    assert cache.free_slots == [] and cache.active_slots == [0, 1]


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("tinygrad_llm").backend.gpu_available(), reason="needs an NVIDIA GPU and CuPy")
@pytest.mark.parametrize("policy, weights", [("fp32", "float32"), ("bf16", "float32"), ("fp16", "float32"),
                                             ("fp32", "q8_0"), ("fp32", "q4_0")])
def test_gpu_decoding_matches_the_cpu(policy, weights, monkeypatch):
    """The GPU decoder against the CPU's, whose quantized products are kept exact (the GPU kernels do not
    round activations to 8 bits)."""
    from tinygrad_llm.quant import cpu_kernels
    monkeypatch.setattr(cpu_kernels, "ROUNDED_ROWS", 1 << 62)
    from tinygrad_llm import precision
    from tinygrad_llm.quant.runs import QuantizedModel, quantize_weights
    model = make_model(max_seq_len=16, d_model=64, ffn_hidden=128)
    if weights != "float32":
        model = QuantizedModel(model.config, weights, quantize_weights(
            {name: p.data for name, p in model.named_parameters()}, weights))
    prompts = [[1, 2, 3], [4], [5, 6, 7, 8, 9]]
    cpu = Decoder(model)
    cache = cpu.new_cache(3)
    expected = [cpu.prefill(cache, cache.allocate(), p) for p in prompts]
    expected_step = cpu.decode_step(cache, [1, 2, 3], [0, 1, 2])
    model.to(device="cuda")
    tolerance = 1e-3 if policy == "fp32" else 0.1
    with precision.policy(policy):
        gpu = Decoder(model)
        cache = gpu.new_cache(3)
        got = [gpu.prefill(cache, cache.allocate(), p) for p in prompts]
        step = gpu.decode_step(cache, [1, 2, 3], [0, 1, 2])
    for a, b in zip(got + [step], expected + [expected_step]):
        np.testing.assert_allclose(a, b, rtol=tolerance, atol=tolerance * np.abs(b).max())


@pytest.mark.parametrize("kind", ["q8_0", "q4_0", "int8"])
@pytest.mark.parametrize("rounded_rows", [1, 1 << 62])   # x rounded to 8 bits at every row count (where the
def test_quantized_batch_equals_one_at_a_time(kind, rounded_rows, monkeypatch):   # kernels do), or never
    from tinygrad_llm.quant import cpu_kernels
    from tinygrad_llm.quant.runs import QuantizedModel, quantize_weights
    monkeypatch.setattr(cpu_kernels, "ROUNDED_ROWS", rounded_rows)
    model = make_model(max_seq_len=16)
    quantized = QuantizedModel(model.config, kind, quantize_weights(
        {name: p.data for name, p in model.named_parameters()}, kind))
    prompts = [[1, 2, 3], [4], [5, 6, 7, 8, 9, 10, 11]]
    alone = [list(generate(quantized, p, 12, temperature=0)) for p in prompts]
    assert generate_batch(quantized, prompts, 12, temperature=0) == alone


@pytest.mark.parametrize("kind", [None, "q8_0", "q4_0", "int8"])
def test_stacked_projections_give_the_unstacked_decoder(kind, monkeypatch):
    from tinygrad_llm import generate as generate_module
    from tinygrad_llm.quant import cpu_kernels
    from tinygrad_llm.quant.runs import QuantizedModel, quantize_weights
    monkeypatch.setattr(cpu_kernels, "ROUNDED_ROWS", 1 << 62)          # the exact products on both sides
    model = make_model()
    if kind is not None:
        model = QuantizedModel(model.config, kind, quantize_weights(
            {name: p.data for name, p in model.named_parameters()}, kind))
    stacked = Decoder(model)                                            # a small model: stacked on the CPU
    monkeypatch.setattr(generate_module, "STACK_BYTES", 0)
    separate = Decoder(model)
    assert all(layer.qkv is not None and layer.q is None for layer in stacked.layers)
    assert all(layer.qkv is None and layer.q is not None for layer in separate.layers)
    config = model.config
    assert stacked.layers[0].qkv.shape == (config.d_model + 2 * config.n_kv_heads * config.head_dim, config.d_model)
    outputs = []
    for decoder in (stacked, separate):
        cache = decoder.new_cache(3)
        slots = [cache.allocate() for _ in range(3)]
        logits = [decoder.prefill(cache, slot, ids) for slot, ids in zip(slots, ([1, 2, 3], [4], [5, 6, 7, 8]))]
        logits.append(decoder.decode_step(cache, [1, 2, 3], slots))
        logits.append(decoder.decode_step(cache, [4], [slots[1]]))
        outputs.append(logits)
    for a, b in zip(*outputs):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())
    prompts = [[1, 2, 3], [4], [5, 6, 7, 8, 9, 10, 11]]
    assert generate_batch(stacked, prompts, 10, temperature=0) == generate_batch(separate, prompts, 10, temperature=0)
