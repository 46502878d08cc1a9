"""The quantized linear op (ops/quantized.py) against the float op on the dequantised weight, on the CPU
(tile sizes, threads) and, where a GPU is present, the CUDA kernels (kernels/quant_matmul.cu)."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, strategies as st

import tinygrad_llm.functional as F
from tinygrad_llm import Tensor, backend, cpu_threads
from tinygrad_llm.ops import quantized
from tinygrad_llm.quant import QuantizedMatrix, cpu_kernels

KINDS = ("q8_0", "q4_0", "int8")


def reference(x, matrix):
    return x.astype(np.float64) @ matrix.dequantize().astype(np.float64).T


def rounding_bound(x, matrix):
    """docs/quantization.md's bound on |y − x @ Ŵᵀ| where x is rounded to 8 bits a block (the rounded kernels):
    Σ_j (max|x_j| / 254) · Σ_i |ŵ_ji| over the blocks j, ×(1 + 2⁻¹²) for the float32 steps of the rounding,
    plus the float32 accumulation over nb blocks, (nb + 2) · 2⁻²⁴ · Σ |ŵ| |x|, doubled for x̃ against x.
    (N, in), (out, in) -> (N, out)."""
    half_steps = np.abs(x.astype(np.float64)).reshape(x.shape[0], -1, 32).max(axis=2) / 254       # (N, nb)
    weights = np.abs(matrix.dequantize().astype(np.float64))                                      # (out, in)
    per_block = weights.reshape(weights.shape[0], -1, 32).sum(axis=2)                             # (out, nb)
    return half_steps @ per_block.T * (1 + 2.0 ** -12) + (per_block.shape[1] + 2) * 2.0 ** -23 * (np.abs(x) @ weights.T)


def rounds(rows: int) -> bool:
    """Whether the op rounds x to 8 bits for this many rows here (the VNNI build of the kernels)."""
    library = cpu_kernels.library()
    return library is not None and cpu_kernels.rounded(library, rows)


def assert_close_to_the_float_op(y, x, matrix):
    """Within float32 rounding of the dequantised float op, or within the stated bound where x was rounded."""
    x2, y2 = x.reshape(-1, x.shape[-1]), y.reshape(-1, matrix.shape[0])
    expected = reference(x2, matrix)
    if matrix.kind != "int8" and rounds(x2.shape[0]):
        assert (np.abs(y2 - expected) <= rounding_bound(x2, matrix)).all()
    else:
        np.testing.assert_allclose(y2, expected, rtol=1e-4, atol=1e-4)


@pytest.fixture
def exact_products(monkeypatch):
    """The float kernels for every row count: x is never rounded (the op's exact path)."""
    monkeypatch.setattr(cpu_kernels, "ROUNDED_ROWS", 1 << 62)


@pytest.mark.parametrize("kind", KINDS)
@given(rows=st.sampled_from([1, 2, 5, 33]), out_features=st.integers(1, 70), blocks=st.integers(1, 4),
       seed=st.integers(0, 2 ** 16))
def test_quantized_linear_equals_the_dequantised_float_op(kind, rows, out_features, blocks, seed):
    rng = np.random.default_rng(seed)
    matrix = QuantizedMatrix.quantize(rng.standard_normal((out_features, 32 * blocks)), kind)
    x = rng.standard_normal((rows, 32 * blocks)).astype(np.float32)
    y = quantized.linear_forward(x, matrix)
    assert y.shape == (rows, out_features) and y.dtype == np.float32
    assert_close_to_the_float_op(y, x, matrix)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("leading", [(1, 2), (2, 3), (4, 5)])   # 2 rows: the C kernels; 6: q4_0's kernel, q8_0's
                                                                # products; 20: dequantised tiles
def test_tiles_and_threads_do_not_change_the_result(kind, leading, monkeypatch):
    rng = np.random.default_rng(1)
    matrix = QuantizedMatrix.quantize(rng.standard_normal((160, 96)), kind)  # 160 rows: two threads' shares of 64+
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
    assert tiled.shape == (*leading, 160)
    close = 1e-6 if rows <= quantized.PRODUCT_SIDE_ROWS else 1e-5      # BLAS may block a tile's sum differently
    np.testing.assert_allclose(tiled, whole, rtol=close, atol=close * np.abs(whole).max())
    assert_close_to_the_float_op(tiled, x, matrix)


@pytest.fixture
def fresh_kernels(monkeypatch, tmp_path):
    """The compiled CPU kernels looked up afresh, built into tmp_path; the process's library restored after."""
    monkeypatch.setenv("TINYGRAD_LLM_CPU_KERNELS_DIR", str(tmp_path))
    monkeypatch.delenv("TINYGRAD_LLM_CPU_KERNELS", raising=False)
    cpu_kernels.reset()
    yield tmp_path
    cpu_kernels.reset()


def compiled_kernels():
    library = cpu_kernels.library()
    if library is None:
        pytest.skip("no C compiler here: the NumPy path is the only one")
    return library


@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
@given(rows=st.sampled_from([1, 2, 3, 8, 17, 32]), out_features=st.integers(1, 70), blocks=st.integers(1, 5),
       scale=st.sampled_from([1e-3, 1.0, 300.0]), seed=st.integers(0, 2 ** 16))
def test_compiled_kernels_equal_the_numpy_path(kind, rows, out_features, blocks, scale, seed):
    compiled_kernels()
    rng = np.random.default_rng(seed)
    matrix = QuantizedMatrix.quantize(scale * rng.standard_normal((out_features, 32 * blocks)), kind)
    x = rng.standard_normal((rows, 32 * blocks)).astype(np.float32)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cpu_kernels, "ROUNDED_ROWS", 1 << 62)             # the float kernels: x not rounded
        kernel_y = quantized.kernel_linear(cpu_kernels.library(), x, matrix)
        patch.setattr(quantized, "KERNEL_ROWS", 0)                      # the NumPy paths for every row count
        numpy_y = quantized.linear_forward(x, matrix)
    exact = reference(x, matrix)
    assert kernel_y.dtype == np.float32 and kernel_y.shape == (rows, out_features)
    np.testing.assert_allclose(kernel_y, exact, rtol=1e-4, atol=1e-4 * np.abs(exact).max())
    np.testing.assert_allclose(kernel_y, numpy_y, rtol=1e-4, atol=1e-4 * np.abs(exact).max())


def test_the_portable_build_equals_the_simd_build(fresh_kernels, exact_products):
    simd = compiled_kernels()
    portable = cpu_kernels.load(extra_flags=("-DTINYGRAD_LLM_PORTABLE",))   # plain C, what non-x86 machines run
    rng = np.random.default_rng(8)
    cases = [("q8_0", 1, 37, 1.0), ("q4_0", 3, 21, 1.0), ("q8_0", 9, 16, 1e-3), ("q4_0", 1, 7, 1e-4)]
    for kind, rows, out_features, size in cases:                # 1e-3, 1e-4: float16 scales below 2⁻¹⁴ (subnormal)
        matrix = QuantizedMatrix.quantize(size * rng.standard_normal((out_features, 96)), kind)
        x = rng.standard_normal((rows, 96)).astype(np.float32)
        expected = reference(x, matrix)
        for library in (simd, portable):
            matrix.cpu_kernel_call = None
            y = quantized.kernel_linear(library, x, matrix)
            np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
@given(rows=st.sampled_from([1, 2, 3, 4, 5, 8, 13, 32]), out_features=st.sampled_from([1, 15, 16, 17, 48, 70]),
       blocks=st.integers(1, 5), scale=st.sampled_from([1e-4, 1.0, 300.0]), x_scale=st.sampled_from([1e-3, 1.0, 1e3]),
       seed=st.integers(0, 2 ** 16))
def test_rounded_kernels_stay_within_the_bound_and_do_not_depend_on_the_batch(kind, rows, out_features, blocks, scale,
                                                                              x_scale, seed):
    library = compiled_kernels()
    rng = np.random.default_rng(seed)
    matrix = QuantizedMatrix.quantize(scale * rng.standard_normal((out_features, 32 * blocks)), kind)
    x = (x_scale * rng.standard_normal((rows, 32 * blocks))).astype(np.float32)
    x[:, :32] *= rng.random(rows)[:, None] < 0.3                        # some all-zero blocks
    function = library.q8_0_rounded_linear if kind == "q8_0" else library.q4_0_rounded_linear

    def rounded(x):
        y = np.full((x.shape[0], out_features), np.nan, dtype=np.float32)
        function(matrix.values.ctypes.data, matrix.scale.ctypes.data, x.ctypes.data, y.ctypes.data, blocks,
                 out_features, 0, out_features, x.shape[0])
        return y

    y = rounded(x)
    assert (np.abs(y - reference(x, matrix)) <= rounding_bound(x, matrix)).all()
    one_by_one = np.concatenate([rounded(np.ascontiguousarray(x[n:n + 1])) for n in range(rows)])
    assert np.array_equal(y, one_by_one)                                # each row rounded on its own


def test_the_portable_rounded_kernels_equal_the_simd_ones(fresh_kernels):
    simd = compiled_kernels()
    if not simd.rounds:
        pytest.skip("no AVX-512 VNNI build here: the rounded kernels are the portable C already")
    portable = cpu_kernels.load(extra_flags=("-DTINYGRAD_LLM_PORTABLE",))
    assert not portable.rounds and portable.rounded_simd_build() == 0
    rng = np.random.default_rng(9)
    for kind, rows, out_features, size in [("q8_0", 5, 37, 1.0), ("q4_0", 32, 50, 1.0), ("q8_0", 9, 16, 1e-3),
                                           ("q4_0", 2, 33, 1e-4)]:
        matrix = QuantizedMatrix.quantize(size * rng.standard_normal((out_features, 96)), kind)
        x = rng.standard_normal((rows, 96)).astype(np.float32)
        ys = []
        for library in (simd, portable):
            function = library.q8_0_rounded_linear if kind == "q8_0" else library.q4_0_rounded_linear
            y = np.empty((rows, out_features), dtype=np.float32)
            function(matrix.values.ctypes.data, matrix.scale.ctypes.data, x.ctypes.data, y.ctypes.data, 3,
                     out_features, 0, out_features, rows)
            ys.append(y)
        assert np.array_equal(ys[0], ys[1])             # same integer sums, same float steps in the same order


def test_rounding_is_chosen_by_rows_and_can_be_turned_off(fresh_kernels, monkeypatch):
    library = compiled_kernels()
    assert not cpu_kernels.rounded(library, 1)                          # batch-1 decoding stays exact
    assert cpu_kernels.rounded(library, cpu_kernels.ROUNDED_ROWS) == (library.rounded_simd_build() == 1)
    cpu_kernels.reset()
    monkeypatch.setenv("TINYGRAD_LLM_ROUND_ACTIVATIONS", "0")
    assert not cpu_kernels.rounded(cpu_kernels.library(), 32)
    rng = np.random.default_rng(10)
    matrix = QuantizedMatrix.quantize(rng.standard_normal((20, 64)), "q4_0")
    x = rng.standard_normal((8, 64)).astype(np.float32)
    np.testing.assert_allclose(quantized.linear_forward(x, matrix), reference(x, matrix), rtol=1e-4, atol=1e-4)


def test_prefill_rows_take_the_rounded_kernels_where_they_run(monkeypatch):
    library = compiled_kernels()
    rng = np.random.default_rng(11)
    matrix = QuantizedMatrix.quantize(rng.standard_normal((24, 64)), "q4_0")
    x = rng.standard_normal((quantized.KERNEL_ROWS + 8, 64)).astype(np.float32)     # beyond the decode rows
    calls = []
    real = quantized.kernel_linear
    monkeypatch.setattr(quantized, "kernel_linear", lambda *a: calls.append(a) or real(*a))
    y = quantized.linear_forward(x, matrix)
    assert len(calls) == (1 if library.rounds else 0)                   # else the NumPy path, exact
    assert_close_to_the_float_op(y, x, matrix)


def test_decode_rows_take_the_kernel_and_keep_no_float32_scales(monkeypatch):
    compiled_kernels()
    rng = np.random.default_rng(6)
    matrix = QuantizedMatrix.quantize(rng.standard_normal((40, 64)), "q8_0")
    x = rng.standard_normal((1, 64)).astype(np.float32)
    calls = []
    monkeypatch.setattr(quantized, "kernel_linear", lambda *a: calls.append(a) or np.zeros((1, 40), np.float32))
    quantized.linear_forward(x, matrix)
    assert len(calls) == 1
    monkeypatch.undo()
    quantized.linear_forward(x, matrix)
    assert matrix._float32_scale is None                               # the kernel reads the float16 scales


def test_kernels_build_once_into_the_cache_folder(fresh_kernels):
    first = compiled_kernels()
    built = list(fresh_kernels.glob("cpu_kernels-*.so"))
    assert len(built) == 1 and not list(fresh_kernels.glob("*.tmp"))
    stamp = built[0].stat().st_mtime_ns
    cpu_kernels.reset()
    assert cpu_kernels.library() is not None and first is not None
    assert built[0].stat().st_mtime_ns == stamp                        # loaded, not rebuilt


def test_no_compiler_or_turned_off_means_the_numpy_path(fresh_kernels, monkeypatch):
    rng = np.random.default_rng(7)
    matrix = QuantizedMatrix.quantize(rng.standard_normal((30, 64)), "q4_0")
    x = rng.standard_normal((2, 64)).astype(np.float32)
    monkeypatch.setenv("CC", str(fresh_kernels / "no-such-compiler"))
    with pytest.warns(RuntimeWarning, match="NumPy path"):
        assert cpu_kernels.library() is None
    np.testing.assert_allclose(quantized.linear_forward(x, matrix), reference(x, matrix), rtol=1e-4, atol=1e-4)
    assert not list(fresh_kernels.glob("*.so"))
    monkeypatch.delenv("CC")
    cpu_kernels.reset()
    monkeypatch.setenv("TINYGRAD_LLM_CPU_KERNELS", "0")
    assert cpu_kernels.library() is None and not list(fresh_kernels.glob("*.so"))


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
    assert_close_to_the_float_op(y.numpy(), x.numpy(), matrix)
    with pytest.raises(RuntimeError, match="no backward"):
        y.sum().backward()
    with pytest.raises(ValueError, match="features"):
        quantized.linear_forward(np.ones((1, 64), np.float32), matrix)


@pytest.mark.gpu
@pytest.mark.skipif(not backend.gpu_available(), reason="needs an NVIDIA GPU and CuPy")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rows", [1, 4, 64])
def test_gpu_kernels_equal_the_numpy_op(kind, rows, monkeypatch):
    """Against the CPU op's exact products (the GPU kernels do not round activations to 8 bits)."""
    monkeypatch.setattr(cpu_kernels, "ROUNDED_ROWS", 1 << 62)
    rng = np.random.default_rng(5)
    matrix = QuantizedMatrix.quantize(rng.standard_normal((300, 256)), kind)
    x = rng.standard_normal((rows, 256)).astype(np.float32)
    expected = quantized.linear_forward(x, matrix)
    y = quantized.linear_forward(backend.to_device(x, "cuda"), matrix.to("cuda"))
    assert backend.is_cupy_array(y) and y.shape == (rows, 300)
    np.testing.assert_allclose(backend.to_numpy(y), expected, rtol=1e-4, atol=1e-3)
