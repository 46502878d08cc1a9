"""Mixed-precision policies for GPU runs: fp32, tf32, bf16 and fp16.

    from tinygrad_llm import precision
    precision.set_policy("bf16")          # or use `with precision.policy("bf16"):`

- fp32: every product in float32 (CuPy's cuBLAS default).
- tf32: float32 arrays, but cuBLAS may round matrix-product inputs to TF32 on the tensor cores
        (CuPy's compute type for float32, what the CUPY_TF32 environment variable sets; ~3e-4 relative).
- bf16: every Linear (ops/matmul.py) runs its three GEMMs through cublasGemmEx on bfloat16 operands
        with float32 accumulation and returns bfloat16; dx comes back in the input's dtype and dW directly
        in float32 from cuBLAS. Master weights, their gradients and the optimizer state stay float32;
        every fused kernel computes in float32 inside. The residual stream: with LOW_PRECISION_RESIDUAL
        (the default) `activation_dtype` tells GPT to cast its embedding output, so activations are bf16
        end to end (residual, norms' outputs, attention, SwiGLU, logits); with it False the residual
        stays float32 as under PyTorch's autocast (GPT casts each bf16 branch back before adding it),
        ~10% slower and 3 GiB more at the GPT-2 size, with no better validation loss measured
        (benchmarks/RESULTS.md).
- fp16: as bf16 with float16 operands; fp16's narrow range needs dynamic loss scaling (`LossScaler`).

Simplifications: one process-wide policy (not per thread); only Linear is autocast (attention has its own
bf16/fp16 kernels; plain matmul follows NumPy's dtype rules); policies other than fp32 act on CuPy arrays
only. CPU runs ignore them.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np

from . import backend

POLICIES = ("fp32", "tf32", "bf16", "fp16")


@dataclass(frozen=True)
class Policy:
    name: str
    compute: str | None       # dtype name of the GEMM operands of Linear ("bfloat16", "float16") or None
    tf32: bool                # float32 products may use TF32 tensor cores
    loss_scaling: bool        # the training loop should use a LossScaler


_POLICIES = {
    "fp32": Policy("fp32", None, False, False),
    "tf32": Policy("tf32", None, True, False),
    "bf16": Policy("bf16", "bfloat16", False, False),
    "fp16": Policy("fp16", "float16", False, True),
}
_current = _POLICIES["fp32"]


def dtype_named(name: str):
    """The NumPy dtype for 'float32', 'float16' or 'bfloat16' (ml_dtypes provides bfloat16)."""
    if name == "bfloat16":
        import ml_dtypes   # a dependency of CuPy's bfloat16 support; imported only when asked for
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def get_policy() -> Policy:
    return _current


def set_policy(name: str) -> Policy:
    """Make `name` (fp32 | tf32 | bf16 | fp16) the process-wide policy; returns the previous one."""
    global _current
    if name not in _POLICIES:
        raise ValueError(f"unknown precision {name!r}: use one of {', '.join(POLICIES)}")
    previous, _current = _current, _POLICIES[name]
    _apply_tf32(_current.tf32)
    return previous


@contextlib.contextmanager
def policy(name: str):
    """`with precision.policy("bf16"): ...` sets the policy for the block and restores the previous one."""
    previous = set_policy(name)
    try:
        yield _current
    finally:
        set_policy(previous.name)


LOW_PRECISION_RESIDUAL = True     # False: a float32 residual stream, as under PyTorch's autocast


def activation_dtype(like):
    """The dtype the model's residual stream should have, judged from an activation array `like`:
    like's own dtype, except the policy's bf16/fp16 for a float32 CuPy array when LOW_PRECISION_RESIDUAL
    is set (the default). Linear outputs are in the policy's low dtype either way."""
    if (LOW_PRECISION_RESIDUAL and _current.compute and backend.is_cupy_array(like)
            and np.dtype(like.dtype).name == "float32"):
        return dtype_named(_current.compute)
    return like.dtype


def _apply_tf32(enabled: bool) -> None:
    """Tell CuPy's matmul whether float32 products may use TF32 (nothing to do without a GPU)."""
    if not backend.gpu_available():
        return
    backend.set_cupy_tf32(enabled)


# ------------------------------------------------------------------ Linear under bf16 / fp16
def linear_supported(x, weight) -> bool:
    """Whether the current policy runs this Linear in low precision (GPU arrays of float dtypes)."""
    return (_current.compute is not None and backend.is_cupy_array(x) and backend.is_cupy_array(weight)
            and np.dtype(x.dtype).name in ("float32", "bfloat16", "float16")
            and np.dtype(weight.dtype).name in ("float32", "bfloat16", "float16"))


def linear_forward(x, weight):
    """y = x @ Wᵀ with both operands in the policy's low dtype, float32 accumulation, y in that dtype.

    Returns (y, x_low, weight_low): the low-precision operands are what the backward needs (saving them
    instead of x and W halves the memory a float32 x would take).
    """
    cp = backend.cupy_module()
    low = dtype_named(_current.compute)
    x_low = cp.ascontiguousarray(x.astype(low, copy=False))
    weight_low = cp.ascontiguousarray(weight.astype(low, copy=False))
    x2 = x_low.reshape(-1, x.shape[-1])                                      # (..., in) -> (N, in)
    y = gemm(x2, weight_low, transpose_b=True, out_dtype=low)               # (N, out)
    return y.reshape(*x.shape[:-1], weight.shape[0]), x_low, weight_low     # -> (..., out)


def linear_backward(dy, x_low, weight_low, dtypes, needs_input_grad=(True, True)):
    """dx = dy @ W (in x's dtype), dW = dyᵀ @ x summed over the leading axes (in W's dtype, float32 for
    master weights: cuBLAS writes the float32 accumulator directly), from the saved low operands."""
    cp = backend.cupy_module()
    x_dtype, weight_dtype = dtypes
    dy_low = cp.ascontiguousarray(dy.astype(x_low.dtype, copy=False))
    dy2 = dy_low.reshape(-1, dy.shape[-1])                                   # (..., out) -> (N, out)
    dx = dweight = None
    if needs_input_grad[0]:
        dx = gemm(dy2, weight_low, out_dtype=x_dtype).reshape(x_low.shape)   # (N, in) -> (..., in)
    if len(needs_input_grad) > 1 and needs_input_grad[1]:
        dweight = gemm(dy2, x_low.reshape(-1, x_low.shape[-1]), transpose_a=True, out_dtype=weight_dtype)
    return dx, dweight


_CUDA_TYPE = {"float32": 0, "float16": 2, "bfloat16": 14}   # cudaDataType: CUDA_R_32F, CUDA_R_16F, CUDA_R_16BF
_OP_N, _OP_T = 0, 1
_COMPUTE_32F = 68                                           # CUBLAS_COMPUTE_32F: float32 accumulation
_GEMM_DEFAULT_TENSOR_OP = 99


def gemm(a, b, transpose_a=False, transpose_b=False, out_dtype=None):
    """op(a) @ op(b) through cublasGemmEx, float32 accumulation, result in `out_dtype` (default a's).

    a, b: C-contiguous 2-D CuPy arrays of one dtype (bfloat16, float16 or float32); op transposes when
    asked. cuBLAS is column-major: a row-major C = op(a) op(b) is the column-major Cᵀ = op(b)ᵀ op(a)ᵀ,
    and a row-major matrix read column-major is its transpose, so b goes first and neither is copied.
    """
    cp = backend.cupy_module()
    from cupy_backends.cuda.libs import cublas
    if a.dtype != b.dtype or a.ndim != 2 or b.ndim != 2 or not (a.flags.c_contiguous and b.flags.c_contiguous):
        raise ValueError("gemm: a and b must be C-contiguous 2-D arrays of one dtype")
    rows, inner = (a.shape[1], a.shape[0]) if transpose_a else a.shape
    inner_b, cols = (b.shape[1], b.shape[0]) if transpose_b else b.shape
    if inner != inner_b:
        raise ValueError(f"gemm: inner dimensions differ ({inner} vs {inner_b})")
    out_dtype = np.dtype(out_dtype or a.dtype)
    out = cp.empty((rows, cols), dtype=out_dtype)
    if out.size == 0:
        return out
    if inner == 0:
        out.fill(0)
        return out
    one, zero = np.ones(1, dtype=np.float32), np.zeros(1, dtype=np.float32)
    in_type, out_type = _CUDA_TYPE[np.dtype(a.dtype).name], _CUDA_TYPE[out_dtype.name]
    compute = _COMPUTE_32F
    if in_type == 0 and _current.tf32:
        compute = 77                                         # CUBLAS_COMPUTE_32F_FAST_TF32
    handle = cp.cuda.device.get_cublas_handle()
    cublas.setPointerMode(handle, 0)                         # CUBLAS_POINTER_MODE_HOST: alpha, beta on the host
    cublas.gemmEx(handle, _OP_T if transpose_b else _OP_N, _OP_T if transpose_a else _OP_N,
                  cols, rows, inner,
                  one.ctypes.data, b.data.ptr, in_type, b.shape[1],
                  a.data.ptr, in_type, a.shape[1],
                  zero.ctypes.data, out.data.ptr, out_type, cols,
                  compute, _GEMM_DEFAULT_TENSOR_OP)
    return out


# ------------------------------------------------------------------ fp16: dynamic loss scaling
class LossScaler:
    """Dynamic loss scaling for fp16: multiply the loss by `scale` before backward, divide the gradients
    by it (pass `1/scale` as the optimizer's grad_scale), skip the step when a gradient overflowed.

        loss_scaled = scaler.scale_loss(loss); loss_scaled.backward()
        norm = optimizer.gather_grads()                    # the norm of the scaled gradients
        if scaler.update(math.isfinite(norm)):             # False: overflow, scale halved, step skipped
            clip = min(1.0, max_norm / (norm / scaler.scale + 1e-6))
            optimizer.step(lr, grad_scale=clip / scaler.scale)

    The scale halves on every overflow and doubles after `growth_interval` finite steps in a row.
    """

    def __init__(self, init_scale: float = 2.0 ** 16, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000, enabled: bool = True):
        self.scale = float(init_scale) if enabled else 1.0
        self.growth_factor, self.backoff_factor = float(growth_factor), float(backoff_factor)
        self.growth_interval, self.enabled = int(growth_interval), bool(enabled)
        self._finite_steps = 0

    def scale_loss(self, loss):
        return loss * self.scale if self.enabled else loss

    def update(self, finite: bool) -> bool:
        """Record whether this step's gradients were finite; True when the step should be taken."""
        if not self.enabled:
            return bool(finite)
        if not finite:
            self.scale *= self.backoff_factor
            self._finite_steps = 0
            return False
        self._finite_steps += 1
        if self._finite_steps >= self.growth_interval:
            self.scale *= self.growth_factor
            self._finite_steps = 0
        return True
