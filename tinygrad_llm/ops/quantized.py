"""Linear layers on quantized weights (inference only): y = x @ Ŵᵀ with Ŵ a `QuantizedMatrix`.

The dispatch point for every Linear of KV-cached decoding (tinygrad_llm.generate):
- a float weight: the same path as ops/matmul.Linear (the bf16/fp16 cuBLAS policy on the GPU, else x @ Wᵀ);
- a QuantizedMatrix on the GPU: the CUDA kernels of kernels/quant_matmul.cu (tinygrad_llm.gpu.quantized), a
  fused dequantise + GEMV for a few rows (decode), dequantise + cuBLAS for many (prefill);
- a QuantizedMatrix on the CPU, Q8_0 / Q4_0, up to KERNEL_ROWS rows of x (decode): the compiled C kernels
  (tinygrad_llm/quant/cpu_kernels.c, built at first use by quant/cpu_kernels.py), which read each code once
  and convert it to float32 in registers: no float32 tile is written. Where no C compiler is found (or
  TINYGRAD_LLM_CPU_KERNELS=0) the NumPy paths below take these rows too, with the same result to rounding.
  From cpu_kernels.ROUNDED_ROWS rows on (any number: batched decoding and prefill), where the kernels are
  the AVX-512 VNNI build, x is rounded to 8 bits a block and multiplied in int8 (llama.cpp's arithmetic;
  its error bound against the float op is in docs/quantization.md; quant/cpu_kernels.rounded()).
  Where that build runs, a decoder's weights are tiled (tile_for_cpu: QuantizedMatrix.tile, the same bytes
  rearranged in place), and the tiled kernels read the tiles as they lie: the same results, bit for bit.
- a QuantizedMatrix on the CPU, Q8_0 / Q4_0, NumPy: block by block. The matrix is block-major (the j-th
  32-weight block of every output row is one contiguous (out, 32) slab), so a few slabs at a time are
  converted to float32 (into a per-thread buffer that stays in cache) and multiplied by the matching 32
  inputs in one batched GEMM:  P[j] = codes[j] @ x[:, block j]ᵀ  (out, N);  then y = Σ_j d[j] · P[j].
  The scales act on the products, (out, N) per block, not on the weights, (out, 32) per block: for decode
  (N ≤ 32) that is the cheaper side. Q4_0's −8 offset is folded the same way: Σ (n − 8)·x = Σ n·x − 8·Σ x.
  Beyond PRODUCT_SIDE_ROWS rows (batched decoding, prefill) tiles of whole weight rows are dequantised and
  multiplied in one full-depth GEMM each: there the GEMM's arithmetic, not the conversion, is the cost.
  Output rows are split across tinygrad_llm.cpu_threads' threads when each share holds at least
  THREAD_ELEMENTS weights (handing a small matrix to a second thread costs more than it saves).
- a QuantizedMatrix on the CPU, INT8 per channel: a tile of output rows at a time converted to float32
  and one GEMM, the per-row scale applied to y's columns.

Why a C kernel: NumPy has no int8 / int4 matrix-vector product, so its paths convert every code to float32
before BLAS sees it. That conversion (~0.1 ns a weight, 4 bytes written for each 1 read) costs twice the
float32 GEMV of the converted tile (~0.05 ns), so the NumPy path at batch 1 is ~0.2 ns a weight for Q8_0
and more for Q4_0, where llama.cpp decodes a GPT-2-size model at 0.05–0.07 ns a weight all told (3.7× /
7.7× faster than that path). An integer matmul in NumPy (int8 codes, int32 sums: `int8_dot_linear`,
measured by benchmarks/decode.py --matmul) runs NumPy's unvectorised loop and is slower still. Numbers in
benchmarks/RESULTS.md.
Simplification: no backward (quantized weights are not trained); the op raises if one is asked for.
"""
from __future__ import annotations

import threading

import numpy as np

from ..gpu import kernel
from ..cpu_threads import parallel_items, split, thread_count
from ..quant import cpu_kernels
from ..quant.formats import BLOCK_SIZE, TILE_ROWS, QuantizedMatrix
from ..tensor import Function
from .matmul import FEW_ROWS, few_rows_loop

TILE_ELEMENTS = 1 << 17          # float32 weights converted per step (512 KiB: stays in L2 beside x and y)
PRODUCT_TILE_ELEMENTS = 1 << 19  # codes converted per step on the products path: larger tiles, fewer Python
                                 # steps (a GPT-2-size token: 15–20 % less CPU time than at 1 << 17, measured)
THREAD_ELEMENTS = 1 << 18        # weights a thread's share must hold before the rows are split across threads
PRODUCT_SIDE_ROWS = 16           # Q8_0 / Q4_0 with up to this many rows of x: scales on the products
KERNEL_ROWS = 32                 # rows of x up to which the C kernels run (they beat the NumPy paths to ~64, measured)
FEW_ROWS_CHUNK_BYTES = 1 << 18   # a float product's (rows of W, N) result computed at a time for a few rows of x
_scratch = threading.local()


def _buffer(name: str, elements: int) -> np.ndarray:
    """A per-thread float32 scratch buffer of at least `elements` (reused across calls: no allocation)."""
    buffer = getattr(_scratch, name, None)
    if buffer is None or buffer.size < elements:
        buffer = np.empty(elements, dtype=np.float32)
        setattr(_scratch, name, buffer)
    return buffer


def float_linear(x, weight):
    """x (..., in) @ weight (out, in)ᵀ for a float weight: the path of ops/matmul.Linear's forward."""
    fast = kernel("linear", x, weight)
    if fast is not None:                   # GPU arrays: cuBLAS in the precision policy's dtype
        return fast.linear_forward(x, weight)[0]
    x2 = x.reshape(-1, x.shape[-1])                                        # (..., in) -> (N, in)
    return (x2 @ weight.T).reshape(*x.shape[:-1], weight.shape[0])          # (N, out) -> (..., out)


def _block_products(x_blocks, x_sums, weight: QuantizedMatrix, start: int, end: int) -> np.ndarray:
    """Output rows start…end−1 of a Q8_0 / Q4_0 product, (end − start, N), from x_blocks (nb, 32, N):
    the scales applied to the products (the cheaper side for a few rows of x)."""
    count, rows = weight.values.shape[0], end - start
    y = None
    step = max(1, PRODUCT_TILE_ELEMENTS // (rows * BLOCK_SIZE))               # blocks converted at once
    codes = _buffer("codes", step * rows * BLOCK_SIZE)
    scale = weight.float32_scale()[:, start:end, None]                         # (nb, rows, 1)
    for first in range(0, count, step):
        last = min(first + step, count)
        values = weight.values[first:last, start:end]                          # (k, rows, 32 | 16)
        if weight.kind == "q8_0":
            tile = codes[:(last - first) * rows * BLOCK_SIZE].reshape(last - first, rows, BLOCK_SIZE)
            np.copyto(tile, values, casting="unsafe")                           # int8 -> float32
            products = tile @ x_blocks[first:last]                              # (k, rows, N)
        else:   # Q4_0: low nibbles are elements 0…15 of a block, high nibbles 16…31
            half = BLOCK_SIZE // 2
            low = codes[:(last - first) * rows * half].reshape(last - first, rows, half)
            high = codes[(last - first) * rows * half:(last - first) * rows * BLOCK_SIZE].reshape(low.shape)
            np.bitwise_and(values, 0x0F, out=low, casting="unsafe")
            np.right_shift(values, 4, out=high, casting="unsafe")
            products = low @ x_blocks[first:last, :half]                        # (k, rows, N)
            products += high @ x_blocks[first:last, half:]
            products -= np.float32(8) * x_sums[first:last, None, :]             # the −8 offset: 8·Σ x per block
        products *= scale[first:last]
        total = np.add.reduce(products, axis=0)                                 # Σ over the k blocks: (rows, N)
        y = total if y is None else np.add(y, total, out=y)
    return y


def _dequantized_products(x_t, weight: QuantizedMatrix, start: int, end: int) -> np.ndarray:
    """Output rows start…end−1 of a Q8_0 / Q4_0 product, (end − start, N), from x_t (in, N): tiles of
    whole weight rows dequantised to float32 (the scales applied to the weights), one GEMM each with
    the weights on the left (the cheaper side for many rows of x, where a 32-deep GEMM runs slowly)."""
    count, out_rows = weight.values.shape[0], end - start
    in_features = count * BLOCK_SIZE
    y = np.empty((out_rows, x_t.shape[1]), dtype=np.float32)
    rows = max(1, TILE_ELEMENTS // in_features)
    tile_buffer = _buffer("dequantized", rows * in_features)
    scales = weight.float32_scale()[:, start:end].T[:, :, None]                                  # (rows, nb, 1)
    for first in range(start, end, rows):
        last = min(first + rows, end)
        tile = tile_buffer[:(last - first) * in_features].reshape(last - first, count, BLOCK_SIZE)   # (r, nb, 32)
        scale = scales[first - start:last - start]                                                # (r, nb, 1)
        if weight.kind == "q8_0":
            np.copyto(tile, weight.values[:, first:last].transpose(1, 0, 2), casting="unsafe")   # int8 -> float32
            tile *= scale
        else:   # Q4_0: (n − 8) · d, low nibbles first
            packed = weight.values[:, first:last].transpose(1, 0, 2)                              # (r, nb, 16)
            half = BLOCK_SIZE // 2
            np.bitwise_and(packed, 0x0F, out=tile[:, :, :half], casting="unsafe")
            np.right_shift(packed, 4, out=tile[:, :, half:], casting="unsafe")
            tile -= np.float32(8)
            tile *= scale
        np.matmul(tile.reshape(last - first, in_features), x_t, out=y[first - start:last - start])   # (r, N)
    return y


def kernel_linear(library, x2: np.ndarray, weight: QuantizedMatrix) -> np.ndarray:
    """CPU Q8_0 / Q4_0 through the compiled kernels (tinygrad_llm/quant/cpu_kernels.c): (N, in) @ Ŵᵀ -> (N, out),
    the codes read once and converted in registers; output rows split across the threads."""
    x2 = np.ascontiguousarray(x2, dtype=np.float32)          # the kernel reads (N, in) float32 rows, back to back
    return kernel_call(library, x2, weight)()


def kernel_call(library, x2: np.ndarray, weight: QuantizedMatrix, y: np.ndarray | None = None):
    """kernel_linear bound to x2 (N, in), contiguous float32: a callable that computes x2 @ Ŵᵀ each time it is
    called (a decoding step refills x2 in place: generate.Decoder's CPU steps), into y (N, out, contiguous
    float32) when given, else into a new array that it returns. The kernel's arguments for the weight are
    kept on it (weight.cpu_kernel_call)."""
    call = weight.cpu_kernel_call
    if call is None or call[0] is not library or call[1] is not weight.values or call[2] is not weight.scale:
        prefix = weight.kind + ("_tiled" if weight.tiled else "")           # the tiled layout: the tiled kernels
        call = weight.cpu_kernel_call = (library, weight.values, weight.scale, getattr(library, prefix + "_linear"),
                                         weight.values.ctypes.data, weight.scale.ctypes.data,
                                         weight.shape[1] // BLOCK_SIZE, weight.shape[0],
                                         getattr(library, prefix + "_rounded_linear"))
    function, values, scale, blocks, out_features = call[3:8]
    columns = x2.shape[0]
    if cpu_kernels.rounded(library, columns):   # x rounded to 8 bits a block, int8 products (quant/cpu_kernels.py)
        function = call[8]
    arrays = (x2, y, weight.values, weight.scale)                                   # kept alive by the call
    x_pointer = x2.ctypes.data
    least = max(64, THREAD_ELEMENTS // (blocks * BLOCK_SIZE))             # output rows a thread gets at least
    ranges = [] if thread_count() == 1 else split(out_features, min_chunk=least)
    if weight.tiled and len(ranges) > 1:     # the tiled kernels take whole tiles: bounds on multiples of TILE_ROWS
        bounds = sorted({0, out_features, *(a // TILE_ROWS * TILE_ROWS for a, _ in ranges[1:])})
        ranges = list(zip(bounds[:-1], bounds[1:]))
    if y is not None and len(ranges) <= 1:
        y_pointer = y.ctypes.data
        return lambda arrays=arrays: function(values, scale, x_pointer, y_pointer, blocks, out_features, 0,
                                              out_features, columns)

    def run(y_pointer):
        if len(ranges) <= 1:
            function(values, scale, x_pointer, y_pointer, blocks, out_features, 0, out_features, columns)
        else:                                                                        # GIL released in each call
            parallel_items(lambda bounds: function(values, scale, x_pointer, y_pointer, blocks, out_features,
                                                   *bounds, columns), ranges)

    if y is not None:
        y_pointer = y.ctypes.data
        return lambda arrays=arrays: run(y_pointer)

    def fresh(arrays=arrays):
        out = np.empty((columns, out_features), dtype=np.float32)
        run(out.ctypes.data)
        return out
    return fresh


def linear_call(x2: np.ndarray, weight, y: np.ndarray | None = None):
    """The linear op for a decoding step on the CPU, bound to x2 (N, in), a contiguous NumPy array in the compute
    dtype, that the step refills in place: a callable that computes x2 @ Wᵀ each time it is called, into y
    (N, out, contiguous) when given, else into a new array that it returns. A float weight of x2's dtype:
    Linear's product (for 2 … FEW_ROWS rows its compiled loop where that applies, else W on the left:
    ops/matmul.Linear, _few_rows_call); Q8_0 / Q4_0 where
    linear_forward takes the kernels: kernel_call; any other quantized weight: linear_forward. None for a
    float weight of another dtype (Linear's low-precision products: the caller runs the op)."""
    if type(weight) is not np.ndarray and not isinstance(weight, QuantizedMatrix):
        return None
    if type(weight) is np.ndarray:
        if weight.dtype != x2.dtype:
            return None
        if 1 < x2.shape[0] <= FEW_ROWS:             # a few rows: OpenBLAS is faster with W on the left
            return _few_rows_call(x2, weight, y)
        return (lambda: x2 @ weight.T) if y is None else (lambda: np.matmul(x2, weight.T, out=y))
    if (isinstance(weight, QuantizedMatrix) and weight.kind != "int8" and x2.dtype == np.float32
            and type(weight.values) is np.ndarray and weight.values.flags.c_contiguous
            and weight.scale.flags.c_contiguous):
        library = cpu_kernels.library()
        if library is not None and (x2.shape[0] <= KERNEL_ROWS or cpu_kernels.rounded(library, x2.shape[0])):
            return kernel_call(library, x2, weight, y)
    if y is None:
        return lambda: linear_forward(x2, weight)
    return lambda: np.copyto(y, linear_forward(x2, weight), casting="same_kind")


def _few_rows_call(x2: np.ndarray, weight: np.ndarray, y: np.ndarray | None):
    """linear_call's float product for 2 … FEW_ROWS rows: the Linear op's compiled loop where it applies
    (ops/matmul.few_rows_loop), else (W x2ᵀ)ᵀ (OpenBLAS's faster orientation there),
    W's rows taken FEW_ROWS_CHUNK_BYTES of (out, N) result at a time, each chunk's (chunk, N) product
    transposed into y's columns while it is in cache. y (N, out) is contiguous: a transposed view of one
    (out, N) product would make every later pass over a row of y (argmax, sampling) stride through the
    whole array (at a GPT-2-size head, 32 rows: ~3 ms an argmax, against ~1 ms for the chunks' copies)."""
    rows, out_features = x2.shape[0], weight.shape[0]
    loop = few_rows_loop(x2, weight, y)
    if loop is not None:
        return loop
    chunk = max(TILE_ROWS, FEW_ROWS_CHUNK_BYTES // (rows * x2.itemsize))
    bounds = [(a, min(a + chunk, out_features)) for a in range(0, out_features, chunk)]
    transposed = np.empty((min(chunk, out_features), rows), dtype=x2.dtype)                   # (chunk, N)

    def run(out):
        for a, b in bounds:
            np.copyto(out[:, a:b], np.matmul(weight[a:b], x2.T, out=transposed[:b - a]).T)   # (b−a, N) -> (N, b−a)
        return out

    if y is not None:
        return lambda: run(y)
    return lambda: run(np.empty((rows, out_features), dtype=x2.dtype))


def tile_for_cpu(weight):
    """`weight` rearranged in place into the tiled layout (QuantizedMatrix.tile) where the CPU kernels' AVX-512
    VNNI build runs: there the int8 kernel reads the tiles as they lie instead of rearranging the codes at
    every call (at 32 rows of x ~15 % of a GPT-2-size product), and the float kernel for one row reads them at
    the same speed (benchmarks/decode.py). Anything else is left as it is. Returns `weight`."""
    if (isinstance(weight, QuantizedMatrix) and weight.kind != "int8" and type(weight.values) is np.ndarray
            and weight.values.flags.c_contiguous and weight.scale.flags.c_contiguous):
        library = cpu_kernels.library()
        if library is not None and cpu_kernels.tiles(library):
            weight.tile()
    return weight


def blockwise_linear(x2: np.ndarray, weight: QuantizedMatrix) -> np.ndarray:
    """CPU Q8_0 / Q4_0: (N, in) float32 @ Ŵᵀ -> (N, out) float32 (see the module docstring): up to
    KERNEL_ROWS rows of x the compiled kernels where they are built, else up to PRODUCT_SIDE_ROWS
    rows the scales act on the products, beyond that on dequantised weight tiles."""
    out_features, in_features = weight.shape
    columns = x2.shape[0]
    if weight.tiled:                        # the tiled kernels take any number of rows; NumPy reads block-major
        library = cpu_kernels.library()
        if library is not None:
            return kernel_linear(library, x2, weight)
        weight = weight.untiled()
    if weight.values.flags.c_contiguous and weight.scale.flags.c_contiguous and (
            columns <= KERNEL_ROWS or columns >= cpu_kernels.ROUNDED_ROWS):
        library = cpu_kernels.library()
        # any number of rows where x is rounded to 8 bits (3-4x the NumPy paths for a prefill, measured)
        if library is not None and (columns <= KERNEL_ROWS or cpu_kernels.rounded(library, columns)):
            return kernel_linear(library, x2, weight)
    if columns > PRODUCT_SIDE_ROWS:
        x_t = np.ascontiguousarray(x2.T)                                                     # (in, N)
        work = lambda bounds: _dequantized_products(x_t, weight, *bounds)
    else:
        x_blocks = np.ascontiguousarray(x2.reshape(columns, -1, BLOCK_SIZE).transpose(1, 2, 0))  # -> (nb, 32, N)
        x_sums = np.add.reduce(x_blocks, axis=1) if weight.kind == "q4_0" else None            # (nb, N)
        work = lambda bounds: _block_products(x_blocks, x_sums, weight, *bounds)
    ranges = [] if thread_count() == 1 else split(out_features, min_chunk=max(64, THREAD_ELEMENTS // in_features))
    if len(ranges) <= 1:
        return work((0, out_features)).T                                                # (out, N) -> (N, out) view
    return np.concatenate(parallel_items(work, ranges), axis=0).T                      # (out, N) -> (N, out) view


def int8_rows_linear(x2: np.ndarray, weight: QuantizedMatrix) -> np.ndarray:
    """CPU INT8: (N, in) float32 @ Ŵᵀ -> (N, out): row tiles converted to float32, one GEMM each, y scaled."""
    out_features, in_features = weight.shape
    y = np.empty((x2.shape[0], out_features), dtype=np.float32)
    rows = max(1, TILE_ELEMENTS // in_features)

    def work(bounds):
        tile_buffer = _buffer("codes", rows * in_features)
        for start in range(bounds[0], bounds[1], rows):
            end = min(start + rows, bounds[1])
            tile = tile_buffer[:(end - start) * in_features].reshape(end - start, in_features)     # (rows, in)
            np.copyto(tile, weight.values[start:end], casting="unsafe")
            np.matmul(x2, tile.T, out=y[:, start:end])

    parallel_items(work, split(out_features, min_chunk=max(64, THREAD_ELEMENTS // in_features)))
    y *= weight.scale[None, :]
    return y


def int8_dot_linear(x2: np.ndarray, weight: QuantizedMatrix) -> np.ndarray:
    """CPU, the alternative that benchmarks/decode.py --matmul measures: x quantized per row to int8,
    int8 × int8 products summed in int32 (NumPy's integer matmul), rescaled. int8 weights only."""
    if weight.kind != "int8":
        raise ValueError("int8_dot_linear takes int8 (per-channel) weights")
    x_scale = np.abs(x2).max(axis=1, keepdims=True) / np.float32(127)                       # (N, 1)
    x_q = np.rint(x2 / np.where(x_scale == 0, 1, x_scale)).astype(np.int32)                  # (N, in)
    accumulated = x_q @ weight.values.T.astype(np.int32)                                       # (N, out) int32
    return accumulated.astype(np.float32) * x_scale * weight.scale[None, :]


def linear_forward(x, weight):
    """y = x @ Ŵᵀ for a float array or a QuantizedMatrix weight (the dispatch point). x (..., in)."""
    if type(weight) is np.ndarray and type(x) is np.ndarray and x.ndim == 2 and x.shape[1] == weight.shape[1]:
        return x @ weight.T             # the common CPU case first: no dispatch overhead per decode step
    if not isinstance(weight, QuantizedMatrix):
        return float_linear(x, weight)
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"quantized_linear: input has {x.shape[-1]} features, weight expects {weight.shape[1]} "
                         f"(weight shape {weight.shape} is (out, in))")
    if type(x) is not np.ndarray or type(weight.values) is not np.ndarray:
        fast = kernel("quantized_linear", x, weight.values, weight.scale)
        if fast is None:
            raise ValueError("quantized_linear: x and the quantized weight must both be on the GPU (with kernels "
                             "enabled) or both on the CPU")
        return fast.quantized_linear(x, weight)
    x2 = np.ascontiguousarray(x.reshape(-1, x.shape[-1]), dtype=np.float32)                 # (..., in) -> (N, in)
    y = int8_rows_linear(x2, weight) if weight.kind == "int8" else blockwise_linear(x2, weight)
    return y.reshape(*x.shape[:-1], weight.shape[0])                                          # -> (..., out)


class QuantizedLinear(Function):
    """Forward:  y = x @ Ŵᵀ,  Ŵ = dequantize(W) (Q8_0, Q4_0 or per-channel INT8: tinygrad_llm.quant)
    Backward: none: quantized weights are for inference; asking for a gradient raises
    Shapes:   x (..., in)   W a QuantizedMatrix (out, in)   y (..., out) float32 (CPU)
    Saves:    nothing
    """

    def forward(self, x, weight):
        return linear_forward(x, weight)

    def backward(self, dy):
        raise RuntimeError("quantized_linear has no backward: quantized weights are inference-only "
                           "(train the float run, then quantize it)")
