"""The quantized linear op (ops/quantized.py) against the float op on the dequantised weight, on the CPU
(tile sizes, threads) and, where a GPU is present, the CUDA kernels (kernels/quant_matmul.cu)."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, strategies as st

import tinygrad_llm.functional as F
from tinygrad_llm import Tensor, backend, cpu_threads
from tinygrad_llm.ops import quantized
from tinygrad_llm.quant import QuantizedMatrix

KINDS = ("q8_0", "q4_0", "int8")


def reference(x, matrix):
    return x.astype(np.float64) @ matrix.dequantize().astype(np.float64).T


@pytest.mark.parametrize("kind", KINDS)
@given(rows=st.sampled_from([1, 2, 5, 33]), out_features=st.integers(1, 70), blocks=st.integers(1, 4),
       seed=st.integers(0, 2 ** 16))
def test_quantized_linear_equals_the_dequantised_float_op(kind, rows, out_features, blocks, seed):
    rng = np.random.default_rng(seed)
    matrix = QuantizedMatrix.quantize(rng.standard_normal((out_features, 32 * blocks)), kind)
    x = rng.standard_normal((rows, 32 * blocks)).astype(np.float32)
    y = quantized.linear_forward(x, matrix)
    assert y.shape == (rows, out_features) and y.dtype == np.float32
    np.testing.assert_allclose(y, reference(x, matrix), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("leading", [(2, 3), (4, 5)])       # 6 rows: scales on the products; 20: dequantised tiles
def test_tiles_and_threads_do_not_change_the_result(kind, leading, monkeypatch):
    rng = np.random.default_rng(1)
    matrix = QuantizedMatrix.quantize(rng.standard_normal((100, 96)), kind)
    x = rng.standard_normal((*leading, 96)).astype(np.float32)              # leading axes are kept
    whole = quantized.linear_forward(x, matrix)
    monkeypatch.setattr(quantized, "TILE_ELEMENTS", 32 * 70)              # several steps, a ragged last one
    monkeypatch.setattr(quantized, "PRODUCT_TILE_ELEMENTS", 32 * 70)
    monkeypatch.setattr(quantized, "THREAD_ELEMENTS", 96)                 # and a split across the threads
    previous = cpu_threads.thread_count()
    try:
        cpu_threads.set_thread_count(2)
        tiled = quantized.linear_forward(x, matrix)
    finally:
        cpu_threads.set_thread_count(previous)
    rows = leading[0] * leading[1]
    assert tiled.shape == (*leading, 100)
    close = 1e-6 if rows <= quantized.PRODUCT_SIDE_ROWS else 1e-5      # BLAS may block a tile's sum differently
    np.testing.assert_allclose(tiled, whole, rtol=close, atol=close * np.abs(whole).max())
    np.testing.assert_allclose(tiled.reshape(rows, 100), reference(x.reshape(rows, 96), matrix), rtol=1e-4, atol=1e-4)


def test_int8_dot_alternative_is_close():
    rng = np.random.default_rng(2)
    matrix = QuantizedMatrix.quantize(rng.standard_normal((40, 64)), "int8")
    x = rng.standard_normal((3, 64)).astype(np.float32)
    y = quantized.int8_dot_linear(x, matrix)
    expected = reference(x, matrix)
    assert np.abs(y - expected).max() < 0.02 * np.abs(expected).max()         # x itself is rounded to int8


def test_float_weights_take_the_float_path():
    rng = np.random.default_rng(3)
    w, x = rng.standard_normal((5, 8)).astype(np.float32), rng.standard_normal((2, 8)).astype(np.float32)
    np.testing.assert_allclose(quantized.linear_forward(x, w), x @ w.T, rtol=1e-6)


def test_functional_forward_and_no_backward():
    rng = np.random.default_rng(4)
    matrix = QuantizedMatrix.quantize(rng.standard_normal((6, 32)), "q8_0")
    x = Tensor(rng.standard_normal((2, 32)).astype(np.float32), requires_grad=True)
    y = F.quantized_linear(x, matrix)
    np.testing.assert_allclose(y.numpy(), reference(x.numpy(), matrix), rtol=1e-4, atol=1e-4)
    with pytest.raises(RuntimeError, match="no backward"):
        y.sum().backward()
    with pytest.raises(ValueError, match="features"):
        quantized.linear_forward(np.ones((1, 64), np.float32), matrix)


@pytest.mark.gpu
@pytest.mark.skipif(not backend.gpu_available(), reason="needs an NVIDIA GPU and CuPy")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rows", [1, 4, 64])
def test_gpu_kernels_equal_the_numpy_op(kind, rows):
    rng = np.random.default_rng(5)
    matrix = QuantizedMatrix.quantize(rng.standard_normal((300, 256)), kind)
    x = rng.standard_normal((rows, 256)).astype(np.float32)
    expected = quantized.linear_forward(x, matrix)
    y = quantized.linear_forward(backend.to_device(x, "cuda"), matrix.to("cuda"))
    assert backend.is_cupy_array(y) and y.shape == (rows, 300)
    np.testing.assert_allclose(backend.to_numpy(y), expected, rtol=1e-4, atol=1e-3)
