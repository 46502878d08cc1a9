"""QuantizedMatrix's tiled layout (QuantizedMatrix.tile) and the tiled CPU kernels (quant/cpu_kernels.c): the
same matrix as the block-major layout, and the same bytes out of the kernels."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from tinygrad_llm import cpu_threads
from tinygrad_llm.ops import quantized
from tinygrad_llm.quant import QuantizedMatrix, cpu_kernels


def tiled_copy(matrix):
    return QuantizedMatrix(matrix.kind, matrix.shape, matrix.values.copy(), matrix.scale.copy()).tile()


def kernels():
    library = cpu_kernels.library()
    if library is None:
        pytest.skip("no C compiler here: the NumPy path is the only one")
    return library


def run(library, name, matrix, x):
    """y from the exported kernel `name` over every output row (NaN where the kernel would not write)."""
    y = np.full((x.shape[0], matrix.shape[0]), np.nan, dtype=np.float32)
    getattr(library, name)(matrix.values.ctypes.data, matrix.scale.ctypes.data, x.ctypes.data, y.ctypes.data,
                           matrix.shape[1] // 32, matrix.shape[0], 0, matrix.shape[0], x.shape[0])
    return y


@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
@settings(max_examples=25, deadline=None)
@given(out_features=st.sampled_from([1, 7, 15, 16, 17, 33, 48, 70]), blocks=st.integers(1, 4),
       seed=st.integers(0, 2 ** 16))
def test_the_tiled_layout_reads_as_the_block_major_one(kind, out_features, blocks, seed):
    rng = np.random.default_rng(seed)
    matrix = QuantizedMatrix.quantize(rng.standard_normal((out_features, 32 * blocks)), kind)
    tiled = tiled_copy(matrix)
    assert tiled.tiled and not matrix.tiled
    assert (tiled.values.shape, tiled.values.dtype, tiled.nbytes) == (matrix.values.shape, matrix.values.dtype,
                                                                      matrix.nbytes)   # the same bytes a weight
    if out_features >= 16 and blocks > 1:
        assert not np.array_equal(tiled.values, matrix.values)            # the bytes did move
    np.testing.assert_array_equal(tiled.dequantize(), matrix.dequantize())
    np.testing.assert_array_equal(tiled.dequantize(1, out_features), matrix.dequantize(1, out_features))
    ids = rng.integers(0, out_features, (2, 5))
    np.testing.assert_array_equal(tiled.take_rows(ids), matrix.take_rows(ids))
    np.testing.assert_array_equal(tiled.blocks(), matrix.blocks())        # what is written to files
    np.testing.assert_array_equal(tiled.float32_scale(), matrix.float32_scale())
    untiled = tiled.untiled()
    assert not untiled.tiled
    np.testing.assert_array_equal(untiled.values, matrix.values)
    np.testing.assert_array_equal(untiled.scale, matrix.scale)
    stacked = QuantizedMatrix.stacked([tiled, matrix])
    np.testing.assert_array_equal(stacked.dequantize(), np.concatenate([matrix.dequantize()] * 2))
    before = tiled.values.copy()
    assert tiled.tile() is tiled                                          # tiling twice changes nothing
    np.testing.assert_array_equal(tiled.values, before)


@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
@pytest.mark.parametrize("portable", [False, True])
def test_the_tiled_kernels_give_the_block_major_kernels_bytes(kind, portable):
    library = kernels()
    if portable:
        library = cpu_kernels.load(extra_flags=("-DTINYGRAD_LLM_PORTABLE",))
    rng = np.random.default_rng(3)
    for out_features in (5, 16, 17, 24, 48, 70):
        for blocks in (1, 3):
            matrix = QuantizedMatrix.quantize(rng.standard_normal((out_features, 32 * blocks)), kind)
            tiled = tiled_copy(matrix)
            for rows in (1, 3, 8, 13, 32):
                x = rng.standard_normal((rows, 32 * blocks)).astype(np.float32)
                for name in ("_linear", "_rounded_linear"):
                    y = run(library, kind + name, matrix, x)
                    y_tiled = run(library, kind + "_tiled" + name, tiled, x)
                    if portable and name == "_linear":      # plain C that the compiler may vectorise either way
                        np.testing.assert_allclose(y_tiled, y, rtol=1e-5, atol=1e-5 * np.abs(y).max())
                    else:                                   # the same integer sums / float steps in the same order
                        assert np.array_equal(y_tiled, y), (kind, name, out_features, blocks, rows)


@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
@pytest.mark.parametrize("rows", [1, 4])
def test_a_tiled_weight_through_the_op_split_across_threads(kind, rows, monkeypatch):
    kernels()
    rng = np.random.default_rng(4)
    matrix = QuantizedMatrix.quantize(rng.standard_normal((203, 64)), kind)   # 12 tiles and 11 rows
    tiled = tiled_copy(matrix)
    x = rng.standard_normal((rows, 64)).astype(np.float32)
    whole = quantized.linear_forward(x, matrix)
    monkeypatch.setattr(quantized, "THREAD_ELEMENTS", 64)                 # shares of 64 rows: bounds not on tiles
    previous = cpu_threads.thread_count()
    try:
        cpu_threads.set_thread_count(3)
        split = quantized.linear_forward(x, tiled)
        bound = quantized.linear_call(x, tiled)()
    finally:
        cpu_threads.set_thread_count(previous)
    assert np.array_equal(split, whole) and np.array_equal(bound, whole)


def test_a_tiled_weight_without_the_kernels_takes_the_numpy_path(monkeypatch):
    rng = np.random.default_rng(5)
    matrix = QuantizedMatrix.quantize(rng.standard_normal((40, 64)), "q4_0")
    tiled = tiled_copy(matrix)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    monkeypatch.setattr(cpu_kernels, "library", lambda: None)
    np.testing.assert_array_equal(quantized.linear_forward(x, tiled), quantized.linear_forward(x, matrix))


def test_the_decoder_tiles_its_weights_where_the_vnni_build_runs(monkeypatch):
    from tinygrad_llm import generate, manual_seed
    from tinygrad_llm.model import GPT, GPTConfig
    from tinygrad_llm.quant.runs import QuantizedModel, quantize_weights
    library = kernels()
    manual_seed(0)
    config = GPTConfig(vocab_size=40, d_model=64, n_layers=1, n_heads=2, ffn_hidden=96, max_seq_len=32)
    weights = quantize_weights({name: p.data for name, p in GPT(config).named_parameters()}, "q4_0")
    copies = {name: QuantizedMatrix(w.kind, w.shape, w.values.copy(), w.scale.copy())
              if isinstance(w, QuantizedMatrix) else w for name, w in weights.items()}
    decoder = generate.Decoder(QuantizedModel(config, "q4_0", weights))
    held = [decoder.lm_head] + [w for layer in decoder.layers for w in vars(layer).values()]   # (a small model's
    matrices = [w for w in held if isinstance(w, QuantizedMatrix)]                              # stacked copies)
    assert len(matrices) == 5 and all(w.tiled == cpu_kernels.tiles(library) for w in matrices)
    monkeypatch.setattr(generate, "tile_for_cpu", lambda weight: weight)          # a decoder left block-major
    block_major = generate.Decoder(QuantizedModel(config, "q4_0", copies))
    assert not any(w.tiled for w in copies.values() if isinstance(w, QuantizedMatrix))
    ids = np.arange(1, 9)[None]                                                    # prefill: the rounded kernels
    np.testing.assert_array_equal(decoder.forward(ids), block_major.forward(ids))
    for one in (decoder, block_major):                                             # decoding steps of 1 and 3 rows
        cache = one.new_cache(3, 16)
        slots = [cache.allocate() for _ in range(3)]
        for slot in slots:
            one.prefill(cache, slot, [1, 2, 3])
        one.steps = [one.decode_step(cache, [4], slots[:1]), one.decode_step(cache, [5, 6, 7], slots)]
    for a, b in zip(decoder.steps, block_major.steps):
        np.testing.assert_array_equal(a, b)
