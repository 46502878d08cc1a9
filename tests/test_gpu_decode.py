"""The GPU decoding step: the decoding attention kernel (kernels/attention_decode.cu) against the op's
array path on the same CuPy arrays, and CUDA-graph replay of Decoder.decode_step (backend.CudaGraph)
against the uncaptured step: the same logits and the same tokens, whatever the slots and lengths."""
from __future__ import annotations

import numpy as np
import pytest

import tinygrad_llm.functional as F
from tinygrad_llm import backend, no_grad
from tinygrad_llm.gpu import arrays
from tinygrad_llm.ops.attention import CacheRows
from tinygrad_llm.ops.rope import rope_angles

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not backend.gpu_available(), reason="needs an NVIDIA GPU and CuPy")]


def _attention(qkv, heads, kv_heads, stores, rows, kernels: bool):
    cp = backend.cupy_module()
    cos, sin = rope_angles(np.asarray(rows.positions), qkv.shape[-1], 10000.0)
    backend.set_kernels_enabled(kernels)
    try:
        with no_grad():
            return F.rope_attention(cp.asarray(qkv), heads, kv_heads, cp.asarray(cos, dtype=np.float32),
                                    cp.asarray(sin, dtype=np.float32), cache=(*stores, rows)).numpy()
    finally:
        backend.set_kernels_enabled(True)


@pytest.mark.parametrize("heads, kv_heads, head_dim", [(4, 4, 64), (8, 2, 64), (4, 1, 128), (6, 3, 48),
                                                       (2, 2, 256), (4, 2, 8)])
@pytest.mark.parametrize("seed", [0, 1])
def test_decode_kernel_equals_the_array_path(monkeypatch, heads, kv_heads, head_dim, seed):
    """Rows at ragged lengths (one key to several 128-key chunks), any slots in any order, GQA groups of
    1-4, head dims from 8 to 256: the kernel equals the batched-GEMM path within float32 rounding."""
    monkeypatch.setattr(arrays, "POISON_OUTPUTS", True)
    cp = backend.cupy_module()
    rng = np.random.default_rng(seed)
    store_rows, max_len = 7, 300
    slots = rng.permutation(store_rows)[:5]
    starts = np.array([0, 1, 127, 128, 299])[rng.permutation(5)]
    qkv = rng.standard_normal((5, 1, heads + 2 * kv_heads, head_dim)).astype(np.float32)
    base = rng.standard_normal((2, store_rows, kv_heads, max_len, head_dim)).astype(np.float32)
    results = []
    for kernels in (True, False):
        stores = [cp.asarray(base[0]), cp.asarray(base[1])]
        rows = CacheRows(slots, starts, 1, cp)
        results.append((_attention(qkv, heads, kv_heads, stores, rows, kernels), [s.get() for s in stores]))
    (fast, fast_stores), (reference, reference_stores) = results
    assert np.isfinite(fast).all()
    np.testing.assert_allclose(fast, reference, rtol=2e-5, atol=2e-6)
    for a, b in zip(fast_stores, reference_stores):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)    # the same keys and values (RoPE kernel or not)


def test_decode_kernel_reads_rows_and_lengths_on_the_device():
    """CacheRows(device=...) buffers: refilled between calls, the same launch follows the new values."""
    cp = backend.cupy_module()
    rng = np.random.default_rng(3)
    heads, kv_heads, head_dim, store_rows, max_len = 4, 2, 64, 4, 40
    buffers = cp.zeros((2, 2), dtype=np.int64)
    fixed = CacheRows([0, 1], [0, 0], 1, cp, device=(buffers[0], buffers[1]))
    base = rng.standard_normal((2, store_rows, kv_heads, max_len, head_dim)).astype(np.float32)
    for slots, starts in (([3, 1], [5, 30]), ([0, 2], [39, 0])):
        qkv = rng.standard_normal((2, 1, heads + 2 * kv_heads, head_dim)).astype(np.float32)
        buffers.set(np.array([slots, starts]))
        fixed.positions = np.asarray(starts)                      # only the rope tables of this test read it
        stores = [cp.asarray(base[0]), cp.asarray(base[1])]
        got = _attention(qkv, heads, kv_heads, stores, fixed, True)
        stores = [cp.asarray(base[0]), cp.asarray(base[1])]
        expected = _attention(qkv, heads, kv_heads, stores, CacheRows(slots, starts, 1, cp), False)
        np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-6)


def _model(**overrides):
    from test_generate_batch import make_model
    return make_model(**{**dict(max_seq_len=24, d_model=64, n_heads=4, n_kv_heads=2, ffn_hidden=128), **overrides})


@pytest.mark.parametrize("policy, weights", [("fp32", "float32"), ("bf16", "float32"), ("fp32", "q8_0"),
                                             ("fp32", "q4_0")])
def test_graph_replay_equals_the_uncaptured_step(policy, weights):
    """Steps over changing subsets of slots at changing lengths: once captured (the second step of a batch
    size), every replay gives the uncaptured step's logits; the graphs were really used."""
    from tinygrad_llm import precision
    from tinygrad_llm.generate import Decoder, _StepGraph
    from tinygrad_llm.quant.runs import QuantizedModel, quantize_weights
    model = _model()
    if weights != "float32":
        model = QuantizedModel(model.config, weights, quantize_weights(
            {name: p.data for name, p in model.named_parameters()}, weights))
    model = model.to(device="cuda")
    prompts = [[1, 2, 3], [4], [5, 6, 7, 8, 9], [10, 11]]
    steps = [([1, 2, 3, 4], [0, 1, 2, 3]), ([5, 6, 7, 8], [3, 2, 1, 0]), ([9, 10], [1, 3]), ([11, 12], [0, 2]),
             ([1, 2, 3, 4], [2, 0, 3, 1]), ([5], [2]), ([6], [2]), ([7], [1]), ([8, 9], [3, 0])]
    with precision.policy(policy):
        runs = []
        for graphs in (True, False):
            decoder = Decoder(model, cuda_graphs=graphs)
            cache = decoder.new_cache(4)
            for p in prompts:
                decoder.prefill(cache, cache.allocate(), p)
            runs.append([decoder.decode_step(cache, tokens, slots) for tokens, slots in steps])
            if graphs:
                captured = [g for g in cache.step_graphs.values() if isinstance(g, _StepGraph)]
                assert sorted(g.x.shape[0] for g in captured) == [1, 2, 4]
    for got, expected in zip(*runs):
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6 * np.abs(expected).max())


def test_generation_with_graphs_equals_without():
    """Greedy generation, one sequence (sliding past the context) and a batch of ragged prompts."""
    from tinygrad_llm.generate import Decoder, generate, generate_batch
    model = _model(max_seq_len=12).to(device="cuda")
    prompts = [[1, 2, 3], [4], [5, 6, 7, 8, 9, 10, 11]]
    outputs = []
    for graphs in (True, False):
        decoder = Decoder(model, cuda_graphs=graphs)
        alone = list(generate(decoder, [1, 2, 3], 20, temperature=0))            # slides at 12 positions
        outputs.append((alone, generate_batch(decoder, prompts, 15, temperature=0)))
    assert outputs[0] == outputs[1]
    assert len(outputs[0][0]) == 20
