"""Matrix products: matmul (batched, broadcasting) and linear (x @ Wᵀ, the layer form).

Also the two helpers every op's array-expressed path uses for products and sums in low precision:
CuPy has no bfloat16 GEMM (`@` on bfloat16 arrays fails with "data type 'E' not understood") and NumPy
with ml_dtypes returns float32 from a bfloat16 `@`, so `product` multiplies bfloat16 operands in float32
and casts the result back; `accumulation_dtype` is the dtype long sums (norms, softmax rows) run in.
"""
from __future__ import annotations

import numpy as np

from ..cpu_threads import parallel_items, split, thread_count
from ..gpu import kernel
from ..tensor import Function
from . import fused_cpu
from .elementwise import unbroadcast


_BY_DTYPE: dict = {}     # dtype -> (needs float32 products, accumulation dtype): `dtype.name` costs ~10 µs


def _dtype_facts(dtype):
    facts = _BY_DTYPE.get(dtype)
    if facts is None:
        name = np.dtype(dtype).name
        facts = _BY_DTYPE[dtype] = (name == "bfloat16", np.dtype(np.float32) if name in ("bfloat16", "float16")
                                    else np.dtype(dtype))
    return facts


def needs_float32_products(dtype) -> bool:
    """Whether products of this dtype must be computed in float32 (bfloat16: no CuPy GEMM knows it)."""
    return _dtype_facts(dtype)[0]


def accumulation_dtype(dtype):
    """The dtype to accumulate long sums of `dtype` in: float32 for the 16-bit floats, else dtype itself."""
    return _dtype_facts(dtype)[1]


def product(a, b):
    """a @ b in a's dtype; bfloat16 operands are multiplied in float32 and the result cast back."""
    if needs_float32_products(a.dtype) or needs_float32_products(b.dtype):
        low = a.dtype if needs_float32_products(a.dtype) else b.dtype
        return (a.astype(np.float32) @ b.astype(np.float32)).astype(low)
    return a @ b


def product_into(a, b, out):
    """product(a, b), written into `out` where it can be (a NumPy array of the result's shape and dtype, and
    operands multiplied in their own dtype), else a new array."""
    if (type(out) is np.ndarray and type(a) is np.ndarray and type(b) is np.ndarray and a.dtype == b.dtype
            and out.dtype == a.dtype and out.shape == (a.shape[0], b.shape[1]) and not needs_float32_products(a.dtype)):
        return np.matmul(a, b, out=out)
    return product(a, b)


class MatMul(Function):
    """Forward:  y = a @ b  (NumPy matmul rules: batch axes broadcast; a 1-D operand is a vector)
    Backward: da = dy @ bᵀ, db = aᵀ @ dy (transposing the last two axes), summed over broadcast batch axes
    Shapes:   a (..., N, K), b (..., K, M), y (..., N, M)
    Saves:    a, b
    """

    def forward(self, a, b):
        if a.ndim == 0 or b.ndim == 0:
            raise ValueError("matmul needs operands with at least one dimension; use * for scalars")
        self.save(a=a, b=b)
        return product(a, b)

    def backward(self, dy):
        a, b = self.saved
        a2 = a[None, :] if a.ndim == 1 else a          # (K,) -> (1, K)
        b2 = b[:, None] if b.ndim == 1 else b          # (K,) -> (K, 1)
        dy2 = dy
        if b.ndim == 1:
            dy2 = dy2[..., None]                       # restore the M = 1 axis (first: dy is 0-d for vec @ vec)
        if a.ndim == 1:
            dy2 = dy2[..., None, :]                    # restore the N = 1 axis
        da = db = None
        if self.needs_input_grad[0]:
            da = unbroadcast(product(dy2, b2.swapaxes(-1, -2)), a2.shape).reshape(a.shape)
        if self.needs_input_grad[1]:
            db = unbroadcast(product(a2.swapaxes(-1, -2), dy2), b2.shape).reshape(b.shape)
        return da, db


FEW_ROWS = 64                  # up to this many rows, Linear computes (W xᵀ)ᵀ on NumPy arrays
LOOP_ROWS = (2, 32)            # rows of x for which a float32 Linear takes the compiled loop (few_rows_loop)
THREAD_ELEMENTS = 1 << 18      # weights a thread's share of the loop holds at least
_BLAS_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


class Linear(Function):
    """Forward:  y = x @ Wᵀ   with W in the (out, in) layout of PyTorch and Hugging Face
    Backward: dx = dy @ W;  dW = dyᵀ @ x summed over every leading axis
    Shapes:   x (..., in), W (out, in), y (..., out)
    Saves:    x, W
    dW goes straight into the optimizer's gradient buffer when the autograd offers it (gradient_targets).
    The leading axes are folded into one so that each product is a single 2-D GEMM. With 2 … FEW_ROWS rows
    on the CPU (batched decoding) the forward is computed as (W xᵀ)ᵀ, a transposed view: the same sums,
    but OpenBLAS runs that orientation much faster when x is the thin side (benchmarks/RESULTS.md); float32
    with LOOP_ROWS rows takes the compiled loop instead (few_rows_loop), where the build has it.
    """

    gradient_targets = True

    def forward(self, x, weight):
        if x.shape[-1] != weight.shape[1]:
            raise ValueError(f"linear: input has {x.shape[-1]} features, weight expects {weight.shape[1]} "
                             f"(weight shape {tuple(weight.shape)} is (out, in))")
        fast = kernel("linear", x, weight)
        if fast is not None:       # GPU arrays: cuBLAS GEMMs in the precision policy's dtype (gpu/gemm.py)
            y, x_low, weight_low = fast.linear_forward(x, weight)
            self.save(x=x_low, weight=weight_low, dtypes=(x.dtype, weight.dtype), fast=fast)
            return y
        self.save(x=x, weight=weight, dtypes=None, fast=None)
        x2 = x.reshape(-1, x.shape[-1])                                # (..., in) -> (N, in)
        if type(x2) is np.ndarray and x2.dtype == weight.dtype in _BLAS_FLOATS:
            # a few rows (decoding): the compiled loop, else OpenBLAS, up to 2× faster with W on the left
            loop = few_rows_loop(x2, weight) if 1 < x2.shape[0] <= FEW_ROWS else None
            if loop is not None:
                y = loop()
            else:
                y = (weight @ x2.T).T if 1 < x2.shape[0] <= FEW_ROWS else x2 @ weight.T
        else:
            y = product(x2, weight.T)
        return y.reshape(*x.shape[:-1], weight.shape[0])              # (N, out) -> (..., out)

    def backward(self, dy, into=(None, None)):
        x, weight, dtypes, fast = self.saved
        if fast is not None:       # the forward ran the policy's GEMMs: x, weight are its low-precision copies
            return fast.linear_backward(dy, x, weight, dtypes, self.needs_input_grad, dweight_out=into[1])
        dy2 = dy.reshape(-1, dy.shape[-1])                             # (..., out) -> (N, out)
        dx = product(dy2, weight).reshape(x.shape) if self.needs_input_grad[0] else None
        dweight = product_into(dy2.T, x.reshape(-1, x.shape[-1]), into[1]) if self.needs_input_grad[1] else None
        return dx, dweight


def few_rows_loop(x2: np.ndarray, weight: np.ndarray, y: np.ndarray | None = None):
    """Linear's forward x2 @ Wᵀ for a few rows (batched decoding, a short prompt) through the compiled loop
    (ops/fused_cpu.c, few_rows_linear_f32: the weights multiplied where they lie; BLAS first packs them, a
    pass over memory that nothing overlaps: a GPT-2-size decoding step at 32 rows, ~1.5× faster), bound to
    x2 (N, in) and W (out, in): a callable that computes it into y (N, out) when given, else into a new
    array that it returns. float32 C-contiguous NumPy arrays and LOOP_ROWS[0] … LOOP_ROWS[1] rows where the
    build has the loop (AVX-512); None otherwise (then BLAS). Output rows are split across the threads."""
    rows, (out_features, in_features) = x2.shape[0], weight.shape
    if (x2.dtype != np.float32 or not LOOP_ROWS[0] <= rows <= LOOP_ROWS[1] or not fused_cpu.usable(x2, weight)
            or (y is not None and not fused_cpu.usable(y))):
        return None
    function = fused_cpu.function("few_rows_linear", np.float32)
    if function(None, None, None, 0, 0, 0, 0, 0) != 0:       # not this build (no AVX-512)
        return None
    least = max(64, THREAD_ELEMENTS // in_features)
    ranges = [(0, out_features)] if thread_count() == 1 else split(out_features, min_chunk=least)
    arrays = (x2, weight)

    def run(out):
        pointers = (weight.ctypes.data, x2.ctypes.data, out.ctypes.data, rows, in_features, out_features)
        if len(ranges) <= 1:
            function(*pointers, 0, out_features)
        else:                                                                        # GIL released in each call
            parallel_items(lambda bounds: function(*pointers, *bounds), ranges)
        return out

    if y is not None:
        return lambda arrays=arrays: run(y)
    return lambda arrays=arrays: run(np.empty((rows, out_features), dtype=np.float32))
