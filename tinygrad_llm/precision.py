"""Mixed-precision policies for GPU runs: fp32, tf32, bf16 and fp16.

    from tinygrad_llm import precision
    precision.set_policy("bf16")          # or use `with precision.policy("bf16"):`

- fp32: every product in float32 (a Linear through tinygrad_llm.gpu.gemm's cublasGemmEx with float32
        operands, other products CuPy's cuBLAS default).
- tf32: float32 arrays, but cuBLAS may round matrix-product inputs to TF32 on the tensor cores
        (CuPy's compute type for float32, what the CUPY_TF32 environment variable sets; ~3e-4 relative).
- bf16: every Linear (ops/matmul.py) runs its three GEMMs through cublasGemmEx (tinygrad_llm.gpu.gemm)
        on bfloat16 operands with float32 accumulation and returns bfloat16; dx comes back in the input's
        dtype and dW directly in float32 from cuBLAS. Master weights, their gradients and the optimizer state stay float32;
        every fused kernel computes in float32 inside. The residual stream: with LOW_PRECISION_RESIDUAL
        (the default) `activation_dtype` tells GPT to cast its embedding output, so activations are bf16
        end to end (residual, norms' outputs, attention, SwiGLU, logits); with it False the residual
        stays float32 as under PyTorch's autocast (GPT casts each bf16 branch back before adding it),
        ~10% slower and 3 GiB more at the GPT-2 size, with no better validation loss measured
        (benchmarks/RESULTS.md).
- fp16: as bf16 with float16 operands; fp16's narrow range needs dynamic loss scaling (`LossScaler`).

This module holds the policy only and imports no GPU code; the GEMMs that follow it live in
tinygrad_llm.gpu.gemm.

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


def linear_dtype(like):
    """The dtype Linear's output has for an input array `like`: the policy's bf16/fp16 for a float32 or
    16-bit CuPy array under a bf16/fp16 policy (the GEMM's low dtype), else like's own."""
    if (_current.compute and backend.is_cupy_array(like)
            and np.dtype(like.dtype).name in ("float32", "bfloat16", "float16")):
        return dtype_named(_current.compute)
    return like.dtype


def _apply_tf32(enabled: bool) -> None:
    """Tell CuPy's own matmul whether float32 products may use TF32 tensor cores (the switch behind the
    CUPY_TF32 variable); nothing to do without a GPU. The policy's cuBLAS GEMM (tinygrad_llm.gpu.gemm)
    reads `get_policy().tf32` itself."""
    if not backend.gpu_available():
        return
    cp = backend.cupy_module()
    linalg = backend.cupy_part("cupy._core._routines_linalg")
    tf32, default = 7, 1                                     # COMPUTE_TYPE_TF32, COMPUTE_TYPE_DEFAULT
    linalg.set_compute_type(cp.float32, tf32 if enabled else default)


# ------------------------------------------------------------------ fp16: dynamic loss scaling
class LossScaler:
    """Dynamic loss scaling for fp16: multiply the loss by `scale` before backward, divide the gradients
    by it (pass `1/scale` as the optimizer's grad_scale), skip the step when a gradient overflowed.

        loss_scaled = scaler.scale_loss(loss); loss_scaled.backward()
        norm = optimizer.gather_grads()                    # the norm of the scaled gradients
        if scaler.update(math.isfinite(norm)):             # False: overflow, scale halved, step skipped
            clip = min(1.0, max_norm / (norm / scaler.scale + 1e-6))
            optimizer.step(lr, grad_scale=clip / scaler.scale)

    The scale halves on every overflow and doubles after `growth_interval` finite steps in a row, up to
    `max_scale`: the backward seed is the scale in the loss's dtype, so a float16 loss needs it at most
    2^15 (2^16 is past float16's largest value, 65504, and would seed backward with inf).
    """

    def __init__(self, init_scale: float = 2.0 ** 16, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000, enabled: bool = True, max_scale: float = 2.0 ** 24):
        self.max_scale = float(max_scale)
        self.scale = min(float(init_scale), self.max_scale) if enabled else 1.0
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
            self.scale = min(self.scale * self.growth_factor, self.max_scale)
            self._finite_steps = 0
        return True
