"""The CPU decoding step (generate._CpuStep: the ops' compiled calls bound once to preallocated buffers) and
the decode-time loops it runs (ops/fused_cpu.c: decode_attention, swiglu_packed_forward), each against the
ops' NumPy paths: the same logits and tokens as the op-by-op step, the same attention output and cache
contents as the cached attention without the loops, in float32 and float64, on one and two threads."""
from __future__ import annotations


import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tinygrad_llm.functional as F
from tinygrad_llm import Tensor, generate as generate_module, manual_seed, no_grad
from tinygrad_llm.generate import Decoder, _CpuStep, generate_batch
from tinygrad_llm.model import GPT, GPTConfig
from tinygrad_llm.ops import fused_cpu

from op_helpers import cached_decode, compiled_loops as loops, normal

pytestmark = pytest.mark.skipif(fused_cpu.library() is None, reason="the fused CPU loops could not be built here")


@settings(deadline=None, max_examples=25)
@given(seed=st.integers(0, 2**31 - 1), kv_heads=st.sampled_from([1, 2, 4]),
       head_dim=st.sampled_from([2, 6, 16, 64, 80]),   # 64, 80: the AVX-512 products' whole and partial passes
       dtype=st.sampled_from([np.float32, np.float64]), threads=st.sampled_from([1, 2]), data=st.data())
def test_decode_attention_loop_equals_the_numpy_path(seed, kv_heads, head_dim, dtype, threads, data):
    """Ragged rows (any slots, any starts, stale values past each row's length): the loop's output and the
    keys and values it writes equal the NumPy path's."""
    heads, store_rows, max_len = 4, 5, 11
    slots = data.draw(st.lists(st.integers(0, store_rows - 1), min_size=1, max_size=store_rows, unique=True))
    starts = [data.draw(st.integers(0, max_len - 1)) for _ in slots]
    stores = [normal((store_rows, kv_heads, max_len, head_dim), seed + i, 2.0).astype(dtype) for i in (1, 2)]
    qkv = normal((len(slots), 1, heads + 2 * kv_heads, head_dim), seed, 3.0).astype(dtype)
    with loops(True, threads):
        fast = cached_decode(qkv, stores, slots, starts, heads, kv_heads)
    with loops(False):
        plain = cached_decode(qkv, stores, slots, starts, heads, kv_heads)
    tolerance = 1e-5 if dtype == np.float32 else 1e-12
    for a, b in zip(fast, plain):
        assert a.dtype == b.dtype == dtype
        np.testing.assert_allclose(a, b, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_packed_swiglu_inference_loop_equals_the_numpy_path(dtype):
    gate_up = normal((3, 5, 2 * 24), 3, 4.0).astype(dtype)
    gate_up[0, 0, :3] = [-100.0, 100.0, 0.0]                     # exp at its limits
    with no_grad(), loops(True):
        fast = F.swiglu(Tensor(gate_up)).numpy()
    with no_grad(), loops(False):
        plain = F.swiglu(Tensor(gate_up)).numpy()
    tolerance = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(fast, plain, rtol=tolerance, atol=tolerance)
    gate, up = gate_up[..., :24], gate_up[..., 24:]
    with np.errstate(over="ignore"):                           # e^100: σ = 0 exactly
        expected = gate / (1 + np.exp(-gate)) * up
    np.testing.assert_allclose(fast, expected, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("rows", [2, 5, 8, 16, 17, 32])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("given_y", [False, True])
def test_few_rows_float_product_equals_the_float64_product(rows, threads, given_y):
    """linear_call's float32 product for a few rows, and the Linear op's (the compiled loop where the build has
    it, else BLAS): x Wᵀ to float32 rounding, for output widths that are and are not a multiple of the loop's
    group, with and without a given output array, and the same with the loops off."""
    from tinygrad_llm.ops.quantized import linear_call
    for out_features, in_features in ((64, 48), (19, 32), (300, 40)):
        weight = normal((out_features, in_features), rows, 1.0).astype(np.float32)
        x = normal((rows, in_features), rows + 1, 1.0).astype(np.float32)
        expected = x.astype(np.float64) @ weight.T.astype(np.float64)
        for on in (True, False):
            with loops(on, threads):
                y = np.full((rows, out_features), np.nan, dtype=np.float32) if given_y else None
                got = linear_call(x, weight, y)()
                got = y if given_y else got
            assert got.shape == (rows, out_features) and got.dtype == np.float32 and got.flags.c_contiguous
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
            with loops(on, threads), no_grad():
                op = F.linear(Tensor(x), Tensor(weight)).numpy()                    # the Linear op itself
            np.testing.assert_allclose(op, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def make_model(dtype=np.float32, **overrides):
    manual_seed(5)
    values = dict(vocab_size=17, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=20)
    values.update(overrides)
    model = GPT(GPTConfig(**values))
    for p in model.parameters():
        p.data *= 6
    return model.to(dtype=dtype).eval()


def decoded(decoder, steps: int = 6):
    """Logits of prefills at three lengths, then `steps` ragged steps of all three and one of a single slot."""
    cache = decoder.new_cache(4)
    slots = [cache.allocate() for _ in range(3)]
    out = [decoder.prefill(cache, slot, ids) for slot, ids in zip(slots, ([1, 2, 3], [4], [5, 6, 7, 8, 9]))]
    for step in range(steps):
        out.append(decoder.decode_step(cache, [(step * 3 + i) % 17 for i in range(3)], slots[::-1]))
    out.append(decoder.decode_step(cache, [2], [slots[1]]))
    return out


def op_by_op(monkeypatch):
    monkeypatch.setattr(Decoder, "_cpu_step", lambda self, cache, batch: None)


@pytest.mark.parametrize("kind", [None, "q8_0", "q4_0", "int8", "float64"])
@pytest.mark.parametrize("stacked", [True, False])
def test_the_step_gives_the_op_by_op_logits(kind, stacked, monkeypatch):
    from tinygrad_llm.quant import cpu_kernels
    from tinygrad_llm.quant.runs import QuantizedModel, quantize_weights
    monkeypatch.setattr(cpu_kernels, "ROUNDED_ROWS", 1 << 62)          # the exact products on both sides
    if not stacked:
        monkeypatch.setattr(generate_module, "STACK_BYTES", 0)
    model = make_model(np.float64 if kind == "float64" else np.float32)
    if kind not in (None, "float64"):
        model = QuantizedModel(model.config, kind, quantize_weights(
            {name: p.data for name, p in model.named_parameters()}, kind))
    decoder = Decoder(model)
    cache = decoder.new_cache(2)
    assert isinstance(decoder._cpu_step(cache, 2), _CpuStep)              # the compiled step applies
    fast = decoded(decoder)
    with monkeypatch.context() as patch:
        op_by_op(patch)
        plain = decoded(Decoder(model))
    tolerance = 1e-12 if kind == "float64" else 1e-5
    for a, b in zip(fast, plain):
        assert a.dtype == b.dtype
        np.testing.assert_allclose(a, b, rtol=tolerance, atol=tolerance * np.abs(b).max())


@pytest.mark.parametrize("threads", [1, 2])
def test_greedy_tokens_equal_the_op_by_op_step(threads, monkeypatch):
    model = make_model()
    prompts = [[1, 2, 3], [4], [5, 6, 7, 8, 9, 10, 11], [12, 13]]
    with loops(True, threads):
        fast = generate_batch(model, prompts, 30, temperature=0)        # past max_seq_len: windows slide
    op_by_op(monkeypatch)
    assert fast == generate_batch(model, prompts, 30, temperature=0)
    assert all(len(ids) == 30 for ids in fast)


def test_without_the_loops_the_step_runs_op_by_op():
    model = make_model()
    with loops(False):
        decoder = Decoder(model)
        cache = decoder.new_cache(2)
        assert decoder._cpu_step(cache, 1) is None
        plain = decoded(decoder)
    fast = decoded(Decoder(model))
    for a, b in zip(fast, plain):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())


def test_step_logits_are_new_arrays_and_steps_are_kept_per_batch_size():
    decoder = Decoder(make_model())
    cache = decoder.new_cache(generate_module.CPU_STEPS + 2)
    slots = [cache.allocate() for _ in range(cache.slots)]
    for slot in slots:
        decoder.prefill(cache, slot, [1, 2])
    first = decoder.decode_step(cache, [3], [slots[0]])
    kept = first.copy()
    decoder.decode_step(cache, [4], [slots[0]])
    np.testing.assert_array_equal(first, kept)                          # not overwritten by the next step
    for count in range(1, len(slots) + 1):                              # a new batch size each step
        decoder.decode_step(cache, [5] * count, slots[:count])
    steps = [key for key, step in cache.step_graphs.items() if isinstance(step, _CpuStep)]
    assert len(steps) == generate_module.CPU_STEPS
    assert steps[-1] == (id(decoder), len(slots))
