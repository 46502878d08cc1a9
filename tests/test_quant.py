"""The quantization formats: bytes equal to llama.cpp's own Python package (gguf.quants), the error bounds
of docs/quantization.md, and the refusals (shape, NaN, float16 overflow, malformed blocks)."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, strategies as st
from hypothesis.extra import numpy as hnp

from tinygrad_llm.quant import (BLOCK_BYTES, DEQUANTIZE, QUANTIZE, QuantFormatError, blocks_shape, check_blocks,
                                dequantize_int8, dequantize_q4_0, dequantize_q8_0, quantize_int8, quantize_q4_0,
                                quantize_q8_0)

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize as gguf_dequantize, quantize as gguf_quantize  # noqa: E402

GGML = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}
KINDS = ("q8_0", "q4_0")


def assert_same_as_ggml(w, kind):
    ours = QUANTIZE[kind](w)
    reference = gguf_quantize(np.asarray(w, dtype=np.float32), GGML[kind])
    assert ours.dtype == np.uint8 and ours.shape == reference.shape
    np.testing.assert_array_equal(ours, reference)
    np.testing.assert_array_equal(DEQUANTIZE[kind](ours), gguf_dequantize(reference, GGML[kind]))


def adversarial_blocks():
    """Blocks that probe the rounding and sign rules: each row is one 32-weight block."""
    rows = [np.zeros(32),                                                   # all zero: d = 0
            np.full(32, 3.0), np.full(32, -3.0),                           # constant, both signs
            np.tile([1.0, -1.0], 16), np.tile([-1.0, 1.0], 16),            # ±max tie: the first one wins in Q4_0
            np.arange(32) - 15.5,                                           # halves: round-half-away ties for Q8_0
            (np.arange(32) - 16) * 0.5,                                     # exact multiples of d/2 for Q4_0 (d = 1)
            np.linspace(-127, 127, 32), np.arange(-16, 16) + 0.5,
            np.r_[np.zeros(31), 1e-3], np.r_[-7.0, np.zeros(31)],
            np.full(32, 65504.0 * 8), np.full(32, -65504.0 * 8),           # largest Q4_0 scale that fits float16
            np.full(32, 1e-30), np.r_[1e-30, np.zeros(31)],                # subnormal float16 scales
            np.full(32, 3e-6), np.r_[6e-5, -6e-5, np.zeros(30)],
            np.full(32, np.float32(1.0) + np.float32(2.0 ** -23))]
    return np.stack(rows).astype(np.float32)                                # (blocks, 32)


@pytest.mark.parametrize("kind", KINDS)
def test_random_matrices_equal_ggml(kind):
    rng = np.random.default_rng(0)
    for scale in (1.0, 0.02, 1e-4, 300.0):
        assert_same_as_ggml(rng.standard_normal((48, 256)).astype(np.float32) * scale, kind)
    assert_same_as_ggml(rng.standard_normal((2, 3, 64)), kind)             # leading axes, float64 input


@pytest.mark.parametrize("kind", KINDS)
def test_adversarial_blocks_equal_ggml(kind):
    assert_same_as_ggml(adversarial_blocks(), kind)


@pytest.mark.parametrize("kind", KINDS)
@given(w=hnp.arrays(np.float32, st.tuples(st.integers(1, 3), st.sampled_from([32, 64, 96])),
                    elements=st.floats(-1e4, 1e4, width=32)))
def test_hypothesis_blocks_equal_ggml(kind, w):
    assert_same_as_ggml(w, kind)


def test_q4_0_layout_by_hand():
    w = (np.arange(32, dtype=np.float32) - 16)                           # max magnitude −16 → d = 2
    blocks = quantize_q4_0(w)
    assert blocks.shape == (18,)
    assert np.frombuffer(blocks[:2].tobytes(), dtype="<f2")[0] == 2.0
    nibbles = np.minimum(np.trunc(w / 2 + 8.5), 15).astype(np.uint8)
    np.testing.assert_array_equal(blocks[2:] & 0x0F, nibbles[:16])         # w[j] in the low nibble of byte j
    np.testing.assert_array_equal(blocks[2:] >> 4, nibbles[16:])           # w[j + 16] in the high nibble


def test_q8_0_layout_by_hand():
    w = np.linspace(-127, 127, 32, dtype=np.float32)                       # d = 1
    blocks = quantize_q8_0(w)
    assert np.frombuffer(blocks[:2].tobytes(), dtype="<f2")[0] == 1.0
    expected = np.sign(w) * np.floor(np.abs(w) + 0.5)                      # round half away from zero
    np.testing.assert_array_equal(blocks[2:].view(np.int8), expected.astype(np.int8))


def test_scale_reciprocal_overflow_stores_zero():
    """max|w| ~ 1e-38: 1/d overflows float32 (ggml's result is undefined there); we store q = 0."""
    tiny = np.full(32, 1e-38, np.float32)
    np.testing.assert_array_equal(quantize_q8_0(tiny)[2:], 0)
    np.testing.assert_array_equal(quantize_q4_0(tiny)[2:], 0x88)
    assert (dequantize_q8_0(quantize_q8_0(tiny)) == 0).all()


# docs/quantization.md: |w − ŵ| ≤ max|w| · relative + q_max · 2⁻²⁵ (the float16 scale's absolute rounding
# error below the normal range), relative = 1/254 + 2⁻¹¹ (Q8_0) or 1/8 + 2⁻¹¹ (Q4_0, its clipped weight)
@pytest.mark.parametrize("kind, relative, q_max", [("q8_0", 1 / 254 + 2.0 ** -11, 127), ("q4_0", 1 / 8 + 2.0 ** -11, 8)])
@given(w=hnp.arrays(np.float32, (4, 64), elements=st.floats(-100, 100, width=32)))
def test_per_block_error_bound(kind, relative, q_max, w):
    error = np.abs(DEQUANTIZE[kind](QUANTIZE[kind](w)) - w).reshape(-1, 32)            # (blocks, 32)
    largest = np.abs(w).reshape(-1, 32).max(axis=1, keepdims=True)
    assert (error <= largest * relative * (1 + 1e-6) + q_max * 2.0 ** -25).all()


def test_q4_0_error_bound_away_from_the_clipped_side():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((64, 32)).astype(np.float32)
    error = np.abs(dequantize_q4_0(quantize_q4_0(w)) - w)
    largest = np.abs(w).max(axis=1, keepdims=True)
    m = np.take_along_axis(w, np.abs(w).argmax(1)[:, None], 1)             # the signed largest weight
    clipped = w / m <= -15 / 16                                             # w/d ≥ 7.5: nibble 16 clipped to 15
    assert 0 < clipped.sum() < 64
    assert (error[~clipped] <= largest.repeat(32, 1)[~clipped] * (1 / 16 + 2.0 ** -11) * (1 + 1e-6)).all()


def test_int8_round_trip_and_bound():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((5, 37)).astype(np.float32)
    w[3] = 0.0
    q, scale = quantize_int8(w)
    assert q.dtype == np.int8 and scale.dtype == np.float32 and scale.shape == (5,)
    assert np.abs(q).max() == 127 and (q[3] == 0).all()
    error = np.abs(dequantize_int8(q, scale) - w)
    assert (error <= scale[:, None] * (0.5 + 1e-5)).all()


@pytest.mark.parametrize("kind", KINDS)
def test_shapes_and_refusals(kind):
    assert blocks_shape((7, 64), kind) == (7, 2 * BLOCK_BYTES[kind])
    with pytest.raises(QuantFormatError, match="multiple of 32"):
        QUANTIZE[kind](np.ones((4, 48), np.float32))
    with pytest.raises(QuantFormatError, match="NaN or infinite"):
        QUANTIZE[kind](np.r_[np.ones(31), np.nan].astype(np.float32))
    with pytest.raises(QuantFormatError, match="float16 scale would overflow"):
        QUANTIZE[kind](np.full(32, 65504.0 * 200, np.float32))
    blocks = QUANTIZE[kind](np.ones((3, 64), np.float32))
    check_blocks(blocks, kind, (3, 64))
    with pytest.raises(QuantFormatError, match="cannot hold"):
        check_blocks(blocks, kind, (3, 96))
    with pytest.raises(QuantFormatError, match="uint8"):
        check_blocks(blocks.view(np.int8), kind, (3, 64))
    with pytest.raises(QuantFormatError, match="multiple of"):
        DEQUANTIZE[kind](blocks[:, :-1])


def test_dequantize_into_a_given_buffer():
    w = np.random.default_rng(3).standard_normal((4, 64)).astype(np.float32)
    for kind, dequantize in (("q8_0", dequantize_q8_0), ("q4_0", dequantize_q4_0)):
        out = np.full((4, 64), np.nan, np.float32)
        result = dequantize(QUANTIZE[kind](w), out=out)
        assert result.base is out or result is out
        np.testing.assert_array_equal(out, dequantize(QUANTIZE[kind](w)))


def test_int8_refuses_bad_input():
    with pytest.raises(QuantFormatError, match="matrices"):
        quantize_int8(np.ones(5, np.float32))
    with pytest.raises(QuantFormatError, match="int8 needs"):
        dequantize_int8(np.ones((2, 3), np.int16), np.ones(2, np.float32))


@pytest.mark.parametrize("kind", ["q8_0", "q4_0", "int8"])
def test_stacked_matrices_are_their_rows_in_turn(kind):
    from tinygrad_llm.quant import QuantizedMatrix
    rng = np.random.default_rng(12)
    parts = [QuantizedMatrix.quantize(rng.standard_normal((rows, 64)), kind) for rows in (3, 5, 1)]
    stacked = QuantizedMatrix.stacked(parts)
    assert stacked.kind == kind and stacked.shape == (9, 64)
    np.testing.assert_array_equal(stacked.dequantize(), np.concatenate([m.dequantize() for m in parts]))
    other = QuantizedMatrix.quantize(rng.standard_normal((2, 64)), "q4_0" if kind != "q4_0" else "q8_0")
    with pytest.raises(QuantFormatError, match="one kind"):
        QuantizedMatrix.stacked([parts[0], other])
    with pytest.raises(QuantFormatError, match="input width"):
        QuantizedMatrix.stacked([parts[0], QuantizedMatrix.quantize(rng.standard_normal((2, 32)), kind)])
