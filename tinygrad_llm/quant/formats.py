"""Weight quantization formats: llama.cpp's Q8_0 and Q4_0 blocks, and per-output-channel INT8.

Public API (stable: the GGUF exporter writes these bytes as they are):

    quantize_q8_0(w) -> uint8 (..., n // 32 * 34)      dequantize_q8_0(blocks) -> float32 (..., n)
    quantize_q4_0(w) -> uint8 (..., n // 32 * 18)      dequantize_q4_0(blocks) -> float32 (..., n)
    quantize_int8(w) -> (q int8 (out, in), scale float32 (out,))   dequantize_int8(q, scale) -> float32
    check_blocks(blocks, kind, shape)   raises QuantFormatError unless `blocks` can hold a `shape` tensor
    QuantizedMatrix.quantize(w, kind)   an (out, in) weight in any of KINDS, what the quantized linear op takes;
    QuantizedMatrix.from_blocks(blocks, kind, shape), .blocks()   to and from the ggml bytes above
    blocks_shape(shape, kind)           the uint8 shape that quantize_<kind> returns for a `shape` tensor
    BLOCK_SIZE = 32, BLOCK_BYTES = {"q8_0": 34, "q4_0": 18}, BLOCK_KINDS = ("q8_0", "q4_0")

Blocks run along the last axis (for a (out, in) weight: along each input row), 32 consecutive weights
each, in the byte layout of ggml (`block_q8_0`, `block_q4_0` in ggml-common.h), little-endian:

    Q8_0, 34 bytes:  d (float16, 2 bytes) | q[0..31] (int8)              w[i] ≈ d · q[i]
    Q4_0, 18 bytes:  d (float16, 2 bytes) | 16 bytes of nibbles          w[i] ≈ d · (nibble[i] − 8)
                     byte j holds w[j] in its low nibble and w[j + 16] in its high nibble

Quantization follows ggml's reference rounding, in float32, so that the bytes equal llama.cpp's
(`gguf.quants` checks it in tests/test_quant.py):

    Q8_0:  d = max|w| / 127;  q = round-half-away-from-zero(w · (1/d));  d stored as float16
    Q4_0:  m = the w of largest magnitude (the first one on ties), keeping its sign;  d = m / −8;
           nibble = min(15, trunc(w · (1/d) + 8.5));  d stored as float16
    (1/d is taken from the float32 d, before it is rounded to float16, as ggml does; an all-zero block
    gets d = 0 and q = 0 / nibble 8. A block with max|w| below ~1e-36, where 1/d overflows float32, also
    stores q = 0: ggml's result there is undefined, and its float16 scale is 0 whatever q holds.)

INT8 (not a ggml format): one float32 scale per output row, s = max|row| / 127, q = round-half-away(w / s)
in int8, w ≈ s · q. It needs no block alignment, so it quantizes any (out, in) matrix.

Error bounds (derived in docs/quantization.md), per block, with the float16 scale in its normal range:
Q8_0 |w − ŵ| ≤ max|w| · (1/254 + 2⁻¹¹); Q4_0 |w − ŵ| ≤ max|w| · (1/16 + 2⁻¹¹), except the weights with
w/m ≤ −15/16 (opposite in sign to m and nearly as large), which the grid's top clips: ≤ max|w| · (1/8 + 2⁻¹¹).

Bad input: a last axis that is not a multiple of 32 is refused (QuantFormatError: no padding, so a stored
tensor always has its true shape); NaN or infinite weights are refused; a block whose float16 scale would
overflow (max|w| > 65504 · 127 for Q8_0, > 65504 · 8 for Q4_0) is refused rather than stored as inf.
Simplifications: only these three formats; the k-quants and importance matrices of llama.cpp are not here.
"""
from __future__ import annotations

import numpy as np

from ..backend import array_module, to_device

BLOCK_SIZE = 32
TILE_ROWS = 16                   # output rows a tile of the tiled layout (QuantizedMatrix.tile)
BLOCK_BYTES = {"q8_0": 2 + BLOCK_SIZE, "q4_0": 2 + BLOCK_SIZE // 2}
BLOCK_KINDS = tuple(BLOCK_BYTES)
KINDS = BLOCK_KINDS + ("int8",)
FLOAT16_MAX = 65504.0
_CHUNK_BLOCKS = 1 << 15          # blocks quantized per pass: bounds the float32 temporaries (~4 MiB each)


class QuantFormatError(ValueError):
    """A tensor that cannot be quantized, or bytes that are not a valid quantized tensor of that shape."""


def blocks_shape(shape, kind: str) -> tuple:
    """The uint8 shape of `shape` (..., n) quantized as `kind` ("q8_0" or "q4_0"): (..., n // 32 · bytes)."""
    if kind not in BLOCK_BYTES:
        raise QuantFormatError(f"unknown block format {kind!r} (known: {', '.join(BLOCK_KINDS)})")
    shape = tuple(int(s) for s in shape)
    if not shape or shape[-1] % BLOCK_SIZE:
        raise QuantFormatError(f"{kind} needs the last axis to be a multiple of {BLOCK_SIZE}; shape {shape} "
                               f"is not (tensors are not padded; int8 quantizes any shape)")
    return shape[:-1] + (shape[-1] // BLOCK_SIZE * BLOCK_BYTES[kind],)


def check_blocks(blocks, kind: str, shape) -> None:
    """Raise QuantFormatError unless `blocks` is a uint8 array of exactly blocks_shape(shape, kind)."""
    expected = blocks_shape(shape, kind)
    if not isinstance(blocks, np.ndarray) or blocks.dtype != np.uint8:
        raise QuantFormatError(f"{kind} blocks must be a uint8 array, got "
                               f"{getattr(blocks, 'dtype', type(blocks).__name__)}")
    if tuple(blocks.shape) != expected:
        raise QuantFormatError(f"{kind} blocks of shape {tuple(blocks.shape)} cannot hold a tensor of shape "
                               f"{tuple(shape)} (expected {expected})")


def _finite_float32(w, kind: str) -> np.ndarray:
    w = np.asarray(w)
    if w.dtype.kind not in "fiu":
        raise QuantFormatError(f"{kind} quantizes real numbers, got dtype {w.dtype}")
    w = np.ascontiguousarray(w, dtype=np.float32)
    if not np.isfinite(w).all():
        raise QuantFormatError(f"cannot quantize to {kind}: the tensor holds NaN or infinite values")
    return w


def _round_half_away(x: np.ndarray) -> np.ndarray:
    """C's roundf on float32: to the nearest integer, halves away from zero (np.round goes to even)."""
    whole = np.trunc(x)
    fraction = x - whole                       # exact for floats: both share the exponent range
    return whole + np.where(np.abs(fraction) >= 0.5, np.sign(x), 0).astype(x.dtype)


def _reciprocal_or_zero(d: np.ndarray) -> np.ndarray:
    """1/d in float32; 0 where d = 0, and 0 where 1/d overflows (a subnormal d: its float16 is 0 anyway)."""
    with np.errstate(divide="ignore", over="ignore"):
        inverse = np.float32(1) / d
    return np.where(np.isfinite(inverse), inverse, np.float32(0)).astype(np.float32)


def _scale_bytes(d: np.ndarray, kind: str, limit: float) -> np.ndarray:
    if (np.abs(d) > FLOAT16_MAX).any():
        raise QuantFormatError(f"cannot quantize to {kind}: a block has max |w| above {FLOAT16_MAX * limit:g}, "
                               f"its float16 scale would overflow")
    return d.astype(np.float16).view(np.uint8)                 # (blocks, 1) float16 -> (blocks, 2) bytes


def _q8_0_blocks(blocks: np.ndarray) -> np.ndarray:
    """(nb, 32) float32 -> (nb, 34) uint8."""
    d = np.abs(blocks).max(axis=1, keepdims=True) / np.float32(127)                         # (nb, 1)
    q = _round_half_away(blocks * _reciprocal_or_zero(d))                                    # |q| ≤ 127
    return np.concatenate([_scale_bytes(d, "q8_0", 127), q.astype(np.int8).view(np.uint8)], axis=1)


def _q4_0_blocks(blocks: np.ndarray) -> np.ndarray:
    """(nb, 32) float32 -> (nb, 18) uint8."""
    first_largest = np.abs(blocks).argmax(axis=1)[:, None]       # argmax keeps the first index on ties
    d = np.take_along_axis(blocks, first_largest, axis=1) / np.float32(-8)                  # (nb, 1)
    shifted = blocks * _reciprocal_or_zero(d) + np.float32(8.5)                             # in [0.5, 16.5]
    nibbles = np.minimum(np.trunc(shifted), 15).astype(np.uint8)                            # (nb, 32)
    packed = nibbles[:, :BLOCK_SIZE // 2] | (nibbles[:, BLOCK_SIZE // 2:] << 4)            # (nb, 16)
    return np.concatenate([_scale_bytes(d, "q4_0", 8), packed], axis=1)


def _quantize_blocks(w, kind: str, per_block) -> np.ndarray:
    w = _finite_float32(w, kind)
    out_shape = blocks_shape(w.shape, kind)
    flat = w.reshape(-1, BLOCK_SIZE)                                      # (..., n) -> (nb, 32)
    out = np.empty((flat.shape[0], BLOCK_BYTES[kind]), dtype=np.uint8)     # (nb, bytes per block)
    for start in range(0, flat.shape[0], _CHUNK_BLOCKS):
        out[start:start + _CHUNK_BLOCKS] = per_block(flat[start:start + _CHUNK_BLOCKS])
    return out.reshape(out_shape)                                          # (nb, bytes) -> (..., n/32·bytes)


def _as_blocks(blocks, kind: str) -> np.ndarray:
    blocks = np.asarray(blocks)
    if blocks.dtype != np.uint8:
        raise QuantFormatError(f"{kind} blocks must be uint8, got {blocks.dtype}")
    if blocks.ndim == 0 or blocks.shape[-1] % BLOCK_BYTES[kind]:
        raise QuantFormatError(f"{kind} blocks: the last axis must be a multiple of {BLOCK_BYTES[kind]} bytes, "
                               f"got shape {tuple(blocks.shape)}")
    return np.ascontiguousarray(blocks)


def quantize_q8_0(w) -> np.ndarray:
    """w (..., n), n a multiple of 32 -> uint8 (..., n/32 · 34): ggml's Q8_0 bytes."""
    return _quantize_blocks(w, "q8_0", _q8_0_blocks)


def quantize_q4_0(w) -> np.ndarray:
    """w (..., n), n a multiple of 32 -> uint8 (..., n/32 · 18): ggml's Q4_0 bytes."""
    return _quantize_blocks(w, "q4_0", _q4_0_blocks)


def dequantize_q8_0(blocks, out=None) -> np.ndarray:
    """uint8 (..., nb · 34) -> float32 (..., nb · 32). `out`: an optional float32 array of that shape."""
    blocks = _as_blocks(blocks, "q8_0")
    lead, count = blocks.shape[:-1], blocks.shape[-1] // 34
    flat = blocks.reshape(-1, 34)                                          # (..., nb·34) -> (nb, 34)
    scale = flat[:, :2].copy().view(np.float16).astype(np.float32)         # (nb, 1)
    values = flat[:, 2:].view(np.int8)                                     # (nb, 32)
    result = out.reshape(-1, BLOCK_SIZE) if out is not None else None
    result = np.multiply(values, scale, out=result, dtype=np.float32)     # exact: 11-bit × 8-bit mantissas
    return result.reshape(*lead, count * BLOCK_SIZE)


def dequantize_q4_0(blocks, out=None) -> np.ndarray:
    """uint8 (..., nb · 18) -> float32 (..., nb · 32). `out`: an optional float32 array of that shape."""
    blocks = _as_blocks(blocks, "q4_0")
    lead, count = blocks.shape[:-1], blocks.shape[-1] // 18
    flat = blocks.reshape(-1, 18)                                          # (..., nb·18) -> (nb, 18)
    scale = flat[:, :2].copy().view(np.float16).astype(np.float32)         # (nb, 1)
    packed = flat[:, 2:]                                                   # (nb, 16)
    values = np.empty((flat.shape[0], BLOCK_SIZE), dtype=np.int8)          # (nb, 32)
    np.bitwise_and(packed, 0x0F, out=values[:, :16], casting="unsafe")
    np.right_shift(packed, 4, out=values[:, 16:], casting="unsafe")
    values -= 8
    result = out.reshape(-1, BLOCK_SIZE) if out is not None else None
    result = np.multiply(values, scale, out=result, dtype=np.float32)
    return result.reshape(*lead, count * BLOCK_SIZE)


def quantize_int8(w) -> tuple[np.ndarray, np.ndarray]:
    """w (out, in) -> (q int8 (out, in), scale float32 (out,)): one symmetric scale per output row."""
    w = _finite_float32(w, "int8")
    if w.ndim != 2:
        raise QuantFormatError(f"int8 quantizes (out, in) matrices, got shape {tuple(w.shape)}")
    scale = np.abs(w).max(axis=1, keepdims=True) / np.float32(127)                          # (out, 1)
    q = _round_half_away(w * _reciprocal_or_zero(scale)).astype(np.int8)
    return q, scale[:, 0]


def dequantize_int8(q, scale, out=None) -> np.ndarray:
    """(q int8 (out, in), scale float32 (out,)) -> float32 (out, in)."""
    q, scale = np.asarray(q), np.asarray(scale)
    if q.dtype != np.int8 or q.ndim != 2 or scale.dtype != np.float32 or scale.shape != q.shape[:1]:
        raise QuantFormatError(f"int8 needs q int8 (out, in) and scale float32 (out,), got q {q.dtype} "
                               f"{tuple(q.shape)} and scale {scale.dtype} {tuple(scale.shape)}")
    return np.multiply(q, scale[:, None], out=out, dtype=np.float32)


QUANTIZE = {"q8_0": quantize_q8_0, "q4_0": quantize_q4_0}
DEQUANTIZE = {"q8_0": dequantize_q8_0, "q4_0": dequantize_q4_0}


class QuantizedMatrix:
    """A (out, in) weight matrix held in one of KINDS: what the quantized linear op takes for a weight.

    Held in a block-major compute layout, converted from and to ggml's blocks without loss
    (`from_blocks`, `blocks`); nb = in/32 blocks per row:
    - q8_0: values int8 (nb, out, 32), scale float16 (nb, out);
    - q4_0: values uint8 (nb, out, 16), ggml's nibbles (byte j: element j low, element j + 16 high),
            scale float16 (nb, out);
    - int8: values int8 (out, in), scale float32 (out,).
    The same bytes as the blocks (1.0625 / 0.5625 bytes a weight). Block-major, the j-th block of every
    output row is one contiguous slab: the CPU op's C kernels (quant/cpu_kernels.c) read the slabs front to
    back, and its NumPy path converts a few slabs at a time to float32 and multiplies them by the matching
    32 inputs in one batched GEMM, then applies the scales to the (small) products.
    The arrays may live on the GPU (CuPy) after `to("cuda")`; `dequantize`, `take_rows` and `blocks`
    work on CPU arrays.
    Tiled (`tile()`, in place, the same bytes): where the CPU kernels' AVX-512 VNNI build runs
    (generate.Decoder tiles its weights there), values and scale keep their shapes but hold the tiled layout
    of quant/cpu_kernels.c (groups of 16 output rows, group-major, each block's 16 rows transposed in 4-byte
    units: what the int8 kernel loads into its registers as they lie). `dequantize`, `take_rows`, `blocks`,
    `stacked` and `to` read it as they read the block-major one; the quantized op passes it to the tiled kernels.
    """

    __slots__ = ("kind", "shape", "values", "scale", "_float32_scale", "cpu_kernel_call", "tiled")

    def __init__(self, kind: str, shape, values, scale):
        if kind not in KINDS:
            raise QuantFormatError(f"unknown quantization {kind!r} (known: {', '.join(KINDS)})")
        shape = tuple(int(s) for s in shape)
        if len(shape) != 2:
            raise QuantFormatError(f"a quantized matrix is (out, in), got shape {shape}")
        out_features, in_features = shape
        if kind == "int8":
            expected = (np.int8, shape, np.float32, (out_features,))
        else:
            blocks_shape(shape, kind)                                  # in must be a multiple of 32
            count = in_features // BLOCK_SIZE
            expected = (np.int8 if kind == "q8_0" else np.uint8,
                        (count, out_features, BLOCK_SIZE if kind == "q8_0" else BLOCK_SIZE // 2),
                        np.float16, (count, out_features))
        values_dtype, values_shape, scale_dtype, scale_shape = expected
        if (values.dtype != values_dtype or tuple(values.shape) != values_shape or scale.dtype != scale_dtype
                or tuple(scale.shape) != scale_shape):
            raise QuantFormatError(f"{kind} matrix {shape} needs values {np.dtype(values_dtype)} {values_shape} and "
                                   f"scale {np.dtype(scale_dtype)} {scale_shape}, got {values.dtype} "
                                   f"{tuple(values.shape)} and {scale.dtype} {tuple(scale.shape)}")
        self.kind, self.shape, self.values, self.scale = kind, shape, values, scale
        self._float32_scale = None
        self.cpu_kernel_call = None      # ops/quantized.py's cached arguments for the compiled CPU kernel
        self.tiled = False               # values and scale in the tiled layout (tile())

    def float32_scale(self):
        """The scales as float32, converted at the first call and kept (the CPU op's NumPy path needs them in
        float32, and NumPy converts float16 at ~10 ns an element: 15 ms a token for a GPT-2-size head).
        Keeping them costs 4 bytes a block beside the 2 of the float16 scales (0.125 bytes a weight); the
        C kernels read the float16 scales and never ask for these."""
        if self._float32_scale is None:
            self._float32_scale = self._block_major()[1].astype(np.float32)
        return self._float32_scale

    @classmethod
    def quantize(cls, w, kind: str) -> "QuantizedMatrix":
        w = np.asarray(w)
        if w.ndim != 2:
            raise QuantFormatError(f"a quantized matrix is (out, in), got shape {tuple(w.shape)}")
        if kind == "int8":
            q, scale = quantize_int8(w)
            return cls(kind, w.shape, q, scale)
        if kind not in QUANTIZE:
            raise QuantFormatError(f"unknown quantization {kind!r} (known: {', '.join(KINDS)})")
        return cls.from_blocks(QUANTIZE[kind](w), kind, w.shape)

    @classmethod
    def from_blocks(cls, blocks, kind: str, shape) -> "QuantizedMatrix":
        """From ggml blocks uint8 (out, in/32 · bytes), as quantize_q8_0 / quantize_q4_0 return them."""
        check_blocks(blocks, kind, shape)
        per_block = blocks.reshape(shape[0], -1, BLOCK_BYTES[kind]).transpose(1, 0, 2)  # (out, nb, B) -> (nb, out, B)
        scale = np.ascontiguousarray(per_block[:, :, :2]).view(np.float16)[:, :, 0]      # (nb, out)
        values = np.ascontiguousarray(per_block[:, :, 2:])                                  # (nb, out, 32 | 16)
        return cls(kind, shape, values.view(np.int8) if kind == "q8_0" else values, scale)

    @classmethod
    def stacked(cls, matrices) -> "QuantizedMatrix":
        """One matrix whose output rows are those of `matrices` in turn (the same kind and input width): a
        copy, for one product in place of several (generate.Decoder stacks q‖k‖v and gate‖up so)."""
        first = matrices[0]
        if any(m.kind != first.kind or m.shape[1] != first.shape[1] for m in matrices):
            raise QuantFormatError("stacking needs matrices of one kind and one input width, got "
                                   + ", ".join(f"{m.kind} {m.shape}" for m in matrices))
        axis = 0 if first.kind == "int8" else 1                      # the out axis of values and scale
        xp = array_module(first.values)
        parts = [m._block_major() for m in matrices]
        return cls(first.kind, (sum(m.shape[0] for m in matrices), first.shape[1]),
                   xp.concatenate([values for values, _ in parts], axis=axis),
                   xp.concatenate([scale for _, scale in parts], axis=axis))

    def blocks(self) -> np.ndarray:
        """ggml's blocks uint8 (out, in/32 · bytes) (q8_0 / q4_0; CPU arrays)."""
        if self.kind == "int8":
            raise QuantFormatError("int8 (per-channel) has no ggml block form")
        values, scale = self._block_major()
        scale = scale[:, :, None].view(np.uint8)                                           # (nb, out, 2)
        per_block = np.concatenate([scale, values.view(np.uint8)], axis=2)                 # (nb, out, B)
        return np.ascontiguousarray(per_block.transpose(1, 0, 2)).reshape(blocks_shape(self.shape, self.kind))

    @property
    def dtype(self):
        return np.dtype(np.float32)      # what it computes in on the CPU

    @property
    def nbytes(self) -> int:
        return int(self.values.nbytes + self.scale.nbytes)

    def dequantize(self, start: int = 0, end: int | None = None) -> np.ndarray:
        """Rows start…end−1 as float32 (end − start, in)."""
        end = self.shape[0] if end is None else end
        if self.kind == "int8":
            return dequantize_int8(self.values[start:end], self.scale[start:end])
        return self._dequantize_rows(*self._rows(slice(start, end)))

    def _dequantize_rows(self, values, scale) -> np.ndarray:
        """Block-major values (nb, n, ·) and scale (nb, n) -> float32 rows (n, in)."""
        if self.kind == "q4_0":
            codes = np.concatenate([values & 0x0F, values >> 4], axis=2).astype(np.int8) - np.int8(8)  # (nb, n, 32)
        else:
            codes = values
        rows = codes.astype(np.float32) * scale[:, :, None].astype(np.float32)           # (nb, n, 32)
        return np.ascontiguousarray(rows.transpose(1, 0, 2)).reshape(values.shape[1], self.shape[1])   # -> (n, in)

    def take_rows(self, ids) -> np.ndarray:
        """Rows `ids` (any integer array) as float32 (*ids.shape, in): an embedding lookup."""
        ids = np.asarray(ids)
        flat = ids.reshape(-1)
        if self.kind == "int8":
            rows = dequantize_int8(self.values[flat], self.scale[flat])
        else:
            rows = self._dequantize_rows(*self._rows(flat))
        return rows.reshape(*ids.shape, self.shape[1])                                     # (N, in) -> (*ids, in)

    def to(self, device: str) -> "QuantizedMatrix":
        """The same matrix with its arrays on `device` ("cpu" or "cuda")."""
        values, scale = self._block_major() if device != "cpu" else (self.values, self.scale)
        moved = QuantizedMatrix(self.kind, self.shape, to_device(values, device), to_device(scale, device))
        moved.tiled = self.tiled and device == "cpu"
        return moved

    # ------------------------------------------------------------------ the tiled layout (cpu_kernels.c)
    def _tiled_parts(self):
        """(values, scale) of the tiled layout as views: the tiles (G, nb, B/4, 16, 4) and (G, nb, 16) of the
        first 16·G output rows, and the rest block-major, (nb, out − 16·G, B) and (nb, out − 16·G)."""
        count, out_features, width = self.values.shape
        groups = out_features // TILE_ROWS
        flat_values, flat_scale = self.values.reshape(-1), self.scale.reshape(-1)
        split_values, split_scale = groups * TILE_ROWS * count * width, groups * TILE_ROWS * count
        return (flat_values[:split_values].reshape(groups, count, width // 4, TILE_ROWS, 4),
                flat_scale[:split_scale].reshape(groups, count, TILE_ROWS),
                flat_values[split_values:].reshape(count, out_features - groups * TILE_ROWS, width),
                flat_scale[split_scale:].reshape(count, out_features - groups * TILE_ROWS))

    def tile(self) -> "QuantizedMatrix":
        """Rearrange values and scale into the tiled layout, in place (the arrays keep their shapes and bytes);
        Q8_0 / Q4_0 on the CPU. Returns self; a tiled matrix is left as it is."""
        if self.tiled or self.kind == "int8" or type(self.values) is not np.ndarray:
            return self
        values, scale = self.values, self.scale
        count, out_features, width = values.shape
        grouped = out_features // TILE_ROWS * TILE_ROWS
        head_values = values[:, :grouped].reshape(count, -1, TILE_ROWS, width // 4, 4)   # (nb, G, 16, B/4, 4)
        head_scale = scale[:, :grouped].reshape(count, -1, TILE_ROWS)                    # (nb, G, 16)
        new_values = np.concatenate([head_values.transpose(1, 0, 3, 2, 4).reshape(-1), values[:, grouped:].reshape(-1)])
        new_scale = np.concatenate([head_scale.transpose(1, 0, 2).reshape(-1), scale[:, grouped:].reshape(-1)])
        np.copyto(values.reshape(-1), new_values)           # the (G, nb, B/4, 16, 4) tiles, then the last rows
        np.copyto(scale.reshape(-1), new_scale)
        self.tiled, self.cpu_kernel_call = True, None
        return self

    def _rows(self, ids):
        """Block-major (values (nb, n, B), scale (nb, n)) of output rows `ids` (n,), from either layout."""
        if not self.tiled:
            return self.values[:, ids], self.scale[:, ids]
        if isinstance(ids, slice):
            ids = np.arange(*ids.indices(self.shape[0]))
        tiles, tile_scales, rest, rest_scale = self._tiled_parts()
        grouped = tiles.shape[0] * TILE_ROWS
        ids = np.asarray(ids, dtype=np.int64)
        group, lane = np.minimum(ids, max(grouped - 1, 0)) // TILE_ROWS, ids % TILE_ROWS
        tail = np.maximum(ids - grouped, 0)
        count, width = self.values.shape[0], self.values.shape[2]
        inside = (ids < grouped)[None, :]
        values = np.empty((count, ids.size, width), dtype=self.values.dtype)
        scale = np.empty((count, ids.size), dtype=self.scale.dtype)
        if grouped:
            picked = tiles[group, :, :, lane, :].reshape(ids.size, count, width)          # (n, nb, B/4, 4) -> (n, nb, B)
            values[...] = picked.transpose(1, 0, 2)
            scale[...] = tile_scales[group, :, lane].T                                    # (n, nb) -> (nb, n)
        if rest.shape[1]:
            values[...] = np.where(inside[:, :, None], values, rest[:, np.minimum(tail, rest.shape[1] - 1)])
            scale[...] = np.where(inside, scale, rest_scale[:, np.minimum(tail, rest.shape[1] - 1)])
        return values, scale

    def untiled(self) -> "QuantizedMatrix":
        """This matrix in the block-major layout: itself, or a block-major copy of a tiled one."""
        return self if not self.tiled else QuantizedMatrix(self.kind, self.shape, *self._block_major())

    def _block_major(self):
        """(values, scale) in the block-major layout: the arrays themselves, or a copy of a tiled matrix's."""
        if not self.tiled:
            return self.values, self.scale
        return self._rows(np.arange(self.shape[0]))

    def __repr__(self) -> str:
        return f"QuantizedMatrix({self.kind}, {self.shape}, {self.nbytes} bytes)"
