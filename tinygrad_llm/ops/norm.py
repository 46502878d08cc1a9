"""RMSNorm: root-mean-square normalisation with a learned gain (no mean subtraction, no bias).

Three paths, chosen once in the forward and recorded for the backward: the CUDA kernel (GPU arrays with
a kernel for them), the chunked path (NumPy arrays of float32/64: cache-sized row chunks spread over the
threads of tinygrad_llm.cpu_threads), and the plain array expression (CuPy arrays without a kernel,
16-bit NumPy arrays, or chunked=False).

The residual form, `add_rms_norm` (what a pre-norm block does at each junction of its residual stream):
s = x + branch and y = RMSNorm(s), two Tensors from two ops (ResidualAdd, then RMSNorm on s), since a
Function has one output. On the GPU the first op computes both in one pass over the rows and hands y to
the second, which then only records what its backward needs. The backward stays two ops, joined the same
way: RMSNorm's backward takes the gradient that the rest of the stream has already sent to s (the
autograd's `pending`) and adds it in its own pass, and on the GPU also writes that sum in the branch's
16-bit dtype, which ResidualAdd's backward then hands to the branch instead of casting it again.
"""
from __future__ import annotations

import numpy as np

from ..backend import array_module
from ..gpu import kernel
from ..cpu_threads import run_row_chunks
from ..tensor import Function
from . import fused_cpu
from .matmul import accumulation_dtype


class RMSNorm(Function):
    """Root-mean-square normalisation over the last axis.

    Forward:  r = 1/√(mean(x², axis=−1) + eps);  x̂ = x · r;  y = x̂ · w
    Backward: g = dy · w                       (forward was y = x̂·w, so dx̂ = dy·w)
              dw = Σ_rows dy · x̂
              dx = r · (g − x̂ · mean(g · x̂, axis=−1))
    Shapes:   x, y, dy: (..., C)   w, dw: (C,)   r: (..., 1)
    Saves:    the path; plain: x̂, r, w;  chunked and kernel: x, r, w (x̂ is not kept)
    Chunked:  the same formulas on row ranges of x (N, C), threaded, with the row sums as einsum row dots
              and dx = r·g − x·r³·mean(g·x) (x̂ never formed); dw is one sum over every row after the chunks,
              so the result does not depend on the thread count. Contiguous float32/64 arrays run each row
              range as one pass of a compiled loop (ops/fused_cpu.c) instead of several NumPy calls, dw
              summed in that pass per fixed block of DW_BLOCK rows and the blocks' sums added after.
    Low precision: mean(x²) and the row sums of the backward accumulate in float32 for 16-bit inputs.

    Output dtype: `out_dtype` (default x's) rounds y to another dtype (the low dtype a following Linear
    reads); dy then comes in that dtype and dx goes back in x's. `prepared` = (kernel module or "chunked",
    y, r): y and r already computed by ResidualAdd's fused pass over this x; the forward records them only.
    Pending: the backward adds the gradient x's other uses have already sent (`takes_pending`) to dx in
    the same pass (kernel; NumPy paths add it in place). `junction`: the dict shared with the ResidualAdd
    that made x; with the kernel, a float32 x and dy in the branch's 16-bit dtype, the backward also
    writes dx in that dtype and leaves (dx, dx_low) there for ResidualAdd's backward.
    """

    takes_pending = True

    def forward(self, x, weight, eps=1e-5, chunked=True, out_dtype=None, prepared=None, junction=None):
        if weight.ndim != 1 or weight.shape[0] != x.shape[-1]:
            raise ValueError(f"rms_norm: weight shape {tuple(weight.shape)} does not match the last axis of "
                             f"x {tuple(x.shape)}")
        if prepared is not None:
            fast, y, r = prepared
            self.save(path=fast, x=x, r=r, weight=weight, junction=junction)
            return y
        y = self._normalise(x, weight, eps, chunked)
        if out_dtype is not None and np.dtype(out_dtype) != y.dtype:
            y = y.astype(out_dtype)
        return y

    def _normalise(self, x, weight, eps, chunked):
        xp = array_module(x)
        fast = kernel("rms_norm", x, weight)
        if fast is not None:
            y, r = fast.rms_norm_forward(x, weight, eps)
            self.save(path=fast, x=x, r=r, weight=weight, junction=None)
            return y
        if chunked and xp is np and accumulation_dtype(x.dtype) == x.dtype:   # 16-bit: the plain path
            y, r, _ = _chunked_forward(x, weight, eps)
            self.save(path="chunked", x=x, r=r, weight=weight, junction=None)
            return y
        accumulate = accumulation_dtype(x.dtype)
        r = (1.0 / xp.sqrt((x * x).mean(axis=-1, keepdims=True, dtype=accumulate) + eps)).astype(x.dtype)
        xhat = x * r
        self.save(path="plain", xhat=xhat, r=r, weight=weight, junction=None)
        return xhat * weight

    def backward(self, dy, pending=(None, None)):
        path, saved_x, r, weight, junction = self.saved   # saved_x is x̂ on the plain path, x otherwise
        pending_x, pending_weight = pending
        if path != "plain" and path != "chunked":    # the kernel module the forward ran (reads dy's dtype)
            low = (junction is not None and self.needs_input_grad[0] and saved_x.dtype == np.float32
                   and dy.dtype.itemsize == 2 and dy.dtype == junction.get("branch_dtype"))
            result = path.rms_norm_backward(dy, saved_x, weight, r, pending=pending_x, low=low)
            dx, dweight = result[:2]
            if low:
                junction["gradient"] = result                    # (dx, dw, dx in the branch's dtype)
        else:
            dx, dweight = self._numpy_backward(path, dy, saved_x, r, weight)
            if pending_x is not None:
                dx += pending_x                                  # dx is this backward's own new array
        if pending_weight is not None:
            dweight = dweight + pending_weight
        return dx, dweight

    @staticmethod
    def _numpy_backward(path, dy, saved_x, r, weight):
        dy = dy.astype(saved_x.dtype, copy=False)    # y was rounded to out_dtype: dx in x's dtype
        if path == "chunked":
            return _chunked_backward(dy, saved_x, r, weight)
        xhat = saved_x
        accumulate = accumulation_dtype(dy.dtype)
        g = dy * weight
        projection = (g * xhat).mean(axis=-1, keepdims=True, dtype=accumulate).astype(dy.dtype)
        dx = r * (g - xhat * projection)
        dweight = (dy * xhat).reshape(-1, weight.shape[0]).sum(axis=0, dtype=accumulate)  # (..., C) -> (N, C) -> (C,)
        return dx, dweight.astype(weight.dtype, copy=False)


class ResidualAdd(Function):
    """The sum at a junction of a residual stream, x + branch, with the branch in its own dtype.

    Forward:  s = x + b, b rounded to x's dtype first (a branch computed in bf16 joining a float32 stream)
    Backward: dx = ds;  db = ds rounded to b's dtype
    Shapes:   x, b, s, ds: (..., C), alike
    Saves:    b's dtype
    Fused norm: with `norm=(weight, eps, out_dtype, into[, chunked])` and a kernel for the arrays (GPU), the
    forward also computes y = RMSNorm(s) (weight, eps; y in out_dtype) in the same pass over the rows and
    stores (kernel module, y, r) in the dict `into`, for RMSNorm's `prepared`. NumPy arrays of one float32
    or float64 dtype with `chunked` true do the same on the chunked path, each row chunk summed and
    normalised while it is in cache ("chunked", y, r); on other arrays `into` stays empty. `into` is also
    the junction the RMSNorm keeps for its backward: when that backward leaves ("gradient": (ds, dw,
    ds_low)) there for this op's ds, db is that ds_low, not a new cast.
    """

    def forward(self, x, branch, norm=None):
        if branch.shape != x.shape:
            raise ValueError(f"residual add: branch shape {tuple(branch.shape)} does not match x {tuple(x.shape)}")
        if norm is None:
            self.save(dtype=branch.dtype, junction=None)
        else:
            weight, eps, out_dtype, into, *chunked = norm
            self.save(dtype=branch.dtype, junction=into)
            into["branch_dtype"] = branch.dtype
            out_dtype = np.dtype(x.dtype if out_dtype is None else out_dtype)
            fast = kernel("add_rms_norm", x, branch, weight, out_dtype)
            if fast is not None:
                total, y, r = fast.add_rms_norm_forward(x, branch, weight, eps, out_dtype)
                into["prepared"] = (fast, y, r)
                return total
            if (chunked and chunked[0] and type(x) is np.ndarray and type(branch) is np.ndarray
                    and x.dtype == branch.dtype == out_dtype == weight.dtype and weight.shape == x.shape[-1:]
                    and accumulation_dtype(x.dtype) == x.dtype):       # the chunked CPU path, sum and norm at once
                y, r, total = _chunked_forward(x, weight, eps, branch=branch)
                into["prepared"] = ("chunked", y, r)
                return total
        return x + branch.astype(x.dtype, copy=False)

    def backward(self, ds):
        dtype, junction = self.saved
        written = None if junction is None else junction.pop("gradient", None)
        if written is not None and written[0] is ds:             # the norm's backward wrote ds in b's dtype
            return ds, written[2]
        return ds, ds.astype(dtype, copy=False)


def _chunked_forward(x, weight, eps, branch=None):
    """y = RMSNorm(x) and r over row chunks; with `branch`, x + branch is formed in the same pass (into a
    new array, returned as the third value) and normalised."""
    channels = x.shape[-1]
    x2 = x.reshape(-1, channels)                                    # (..., C) -> (N, C)
    if fused_cpu.usable(x, weight, *(() if branch is None else (branch,))):
        return _fused_forward(x2, weight, eps, branch, x.shape)
    total = None
    if branch is not None:
        branch2 = branch.reshape(-1, channels)
        total = np.empty_like(x2)
    y = np.empty_like(x2)
    r = np.empty((x2.shape[0], 1), dtype=x.dtype)
    inverse_channels = x.dtype.type(1.0 / channels)

    def part(start, end):
        rows = x2[start:end]
        if total is not None:
            rows = np.add(rows, branch2[start:end], out=total[start:end])
        scale = r[start:end]
        np.einsum("ij,ij->i", rows, rows, out=scale[:, 0])         # Σ x² per row, one pass
        scale *= inverse_channels
        scale += x.dtype.type(eps)
        np.sqrt(scale, out=scale)
        np.reciprocal(scale, out=scale)
        out = y[start:end]
        np.multiply(rows, weight, out=out)
        out *= scale

    run_row_chunks(part, x2.shape[0], channels, np, balanced=True)
    return y.reshape(x.shape), r, None if total is None else total.reshape(x.shape)


DW_BLOCK = 32       # rows per partial sum of dw in the compiled backward


def _chunked_backward(dy, x, r, weight):
    """dx and dw of RMSNorm over row chunks, without forming x̂:
    with p = Σ_c dy·w·x per row, dx = r·(dy·w) − x · r³·p/C  (x̂ = x·r, so mean(g·x̂) = r·p/C);
    dw = Σ_rows dy·x·r, one GEMV over all rows after the chunks (the same sum for any chunking)."""
    channels = x.shape[-1]
    x2, dy2 = x.reshape(-1, channels), dy.reshape(-1, channels)     # (..., C) -> (N, C)
    dx = np.empty_like(x2)
    if fused_cpu.usable(dy2, x2, r, weight):
        # the same formulas in one compiled pass, dw summed per block of DW_BLOCK rows as it goes (no dy·x
        # array and no second pass over one) and the blocks' sums added after: the blocks depend only on
        # the shape, so dw does not depend on the thread count
        rows = x2.shape[0]
        partial = np.empty((-(-rows // DW_BLOCK), channels), dtype=x.dtype)
        fused_cpu.over_rows("rms_norm_backward", x.dtype, partial.shape[0], 3 * channels * DW_BLOCK,
                            lambda f, start, end: f(
            fused_cpu.address(dy2, start * DW_BLOCK * channels), fused_cpu.address(x2, start * DW_BLOCK * channels),
            fused_cpu.address(r, start * DW_BLOCK), fused_cpu.address(weight),
            fused_cpu.address(dx, start * DW_BLOCK * channels), fused_cpu.address(partial, start * channels),
            min(end * DW_BLOCK, rows) - start * DW_BLOCK, channels, DW_BLOCK))
        return dx.reshape(x.shape), partial.sum(axis=0).astype(weight.dtype, copy=False)
    products = np.empty_like(x2)
    inverse_channels = x.dtype.type(1.0 / channels)

    def part(start, end):
        rows, upstream, scale = x2[start:end], dy2[start:end], r[start:end]
        out = dx[start:end]
        np.multiply(upstream, weight, out=out)                      # g = dy·w (forward was y = x̂·w)
        coefficient = np.einsum("ij,ij->i", out, rows)[:, None]     # p = Σ g·x per row
        coefficient *= scale
        coefficient *= scale
        coefficient *= scale
        coefficient *= inverse_channels                             # r³·p/C
        out *= scale                                                # r·g
        correction = np.multiply(rows, coefficient, out=products[start:end])
        out -= correction
        np.multiply(upstream, rows, out=correction)                 # dy·x, for dw

    run_row_chunks(part, x2.shape[0], channels, np, balanced=True)
    dweight = products.T @ r[:, 0]                                  # Σ_rows dy·x·r = Σ_rows dy·x̂, one GEMV
    return dx.reshape(x.shape), dweight.astype(weight.dtype, copy=False)


def _fused_forward(x2, weight, eps, branch, shape):
    """_chunked_forward by the compiled loop (ops/fused_cpu.c): per row the residual sum (with `branch`),
    Σ x², r and y in one pass."""
    rows, channels = x2.shape
    y = np.empty_like(x2)
    r = np.empty((rows, 1), dtype=x2.dtype)
    branch2 = None if branch is None else branch.reshape(-1, channels)                # (..., C) -> (N, C)
    total = None if branch is None else np.empty_like(x2)
    fused_cpu.over_rows("rms_norm_forward", x2.dtype, rows, 2 * channels, lambda f, start, end: f(
        fused_cpu.address(x2, start * channels),
        None if branch2 is None else fused_cpu.address(branch2, start * channels),
        None if total is None else fused_cpu.address(total, start * channels), fused_cpu.address(weight),
        fused_cpu.address(y, start * channels), fused_cpu.address(r, start), end - start, channels, eps))
    return y.reshape(shape), r, None if total is None else total.reshape(shape)


def rms_norm_call(x2, weight, eps, y, branch=None, total=None):
    """RMSNorm's compiled forward loop (the chunked path's, ops/fused_cpu.c) bound to these (N, C) arrays: a
    callable that writes y = RMSNorm(x2) · w each time it is called (with `branch`: total = x2 + branch first,
    normalised; ResidualAdd's fused form), for a decoding step that refills x2 and branch in place
    (generate.Decoder's CPU steps). None where the loop does not apply (see fused_cpu.usable)."""
    arrays = (x2, weight, y) + (() if branch is None else (branch, total))
    if not fused_cpu.usable(*arrays) or x2.ndim != 2 or weight.shape != x2.shape[-1:]:
        return None
    rows, channels = x2.shape
    r = np.empty((rows, 1), dtype=x2.dtype)
    arrays += (r,)                                                                  # kept alive by the call
    pointers = [None if a is None else fused_cpu.address(a) for a in (x2, branch, total, weight, y, r)]
    function = fused_cpu.function("rms_norm_forward", x2.dtype)
    return lambda arrays=arrays: function(*pointers, rows, channels, eps)


def rms_norm_reference(x, weight, eps=1e-5):
    """RMSNorm composed from primitives (a test oracle)."""
    return x / ((x * x).mean(axis=-1, keepdims=True) + eps).sqrt() * weight
