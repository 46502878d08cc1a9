"""The CUDA side: kernels for the ops that have one, and the one place that decides when they run.

    from tinygrad_llm.gpu import kernel
    fast = kernel("rms_norm", x, weight)     # None: run the NumPy-expressed path
    if fast is not None:
        y, r = fast.rms_norm_forward(x, weight, eps)

`kernel(op_name, *arrays)` returns this package, whose names below are every launcher, when the arrays
are CuPy arrays, kernels are on (`backend.set_kernels_enabled`) and a kernel handles these dtypes and
shapes (`registry.supports`); otherwise None, and the op runs its NumPy-expressed path, which is also
the reference every kernel is tested against.

`prefetch_training(dtype, head_dim)` starts compiling, on worker threads, the kernels a training step of
such a model launches, so that a run's first step does not wait for them one after another.

Modules: compiler (NVRTC, the cubin cache, prefetching), arrays (the helpers every launcher shares: output buffers,
the POISON_OUTPUTS switch of the tests, contiguous inputs, device facts), registry (op -> kernel test),
one launcher module per op family (norm, activation, rope, attention, loss, embedding, dropout, adamw)
and gemm (the cuBLAS GEMM of the precision policies). Importing this package imports no CuPy: that
happens at the first launch. A kernel that fails to compile raises with NVRTC's log.
"""
from __future__ import annotations

import sys

from .. import backend
from . import attention, compiler, norm
from .activation import swiglu_backward, swiglu_forward, swiglu_packed_backward, swiglu_packed_forward
from .adamw import accumulate_loss, adamw_step, step_decision, sum_of_squares
from .attention import causal_attention_backward, causal_attention_forward, decode_attention, kernel_for
from .dropout import dropout_forward
from .embedding import embedding_backward
from .gemm import linear_backward, linear_forward
from .loss import cross_entropy_forward_backward
from .norm import add_rms_norm_forward, rms_norm_backward, rms_norm_forward
from .quantized import quantized_linear
from .registry import supports
from .rope import copy_heads, rope_forward

__all__ = ["kernel", "supports", "attention_kernel_for", "prefetch_training", "quantized_linear",
           "rms_norm_forward", "rms_norm_backward", "add_rms_norm_forward", "swiglu_forward", "swiglu_backward",
           "swiglu_packed_forward", "swiglu_packed_backward", "rope_forward", "copy_heads", "dropout_forward",
           "cross_entropy_forward_backward", "embedding_backward", "adamw_step", "sum_of_squares",
           "accumulate_loss", "step_decision",
           "linear_forward", "linear_backward", "causal_attention_forward", "causal_attention_backward",
           "decode_attention"]


def kernel(op_name: str, *arrays):
    """The dispatch point of kernel-backed ops: this package (its launchers) when the arrays are on the
    GPU, kernels are enabled and a kernel for `op_name` handles them; None otherwise."""
    if not (backend.kernels_enabled() and backend.cupy_imported()) or not any(backend.is_cupy_array(a) for a in arrays):
        return None
    return sys.modules[__name__] if supports(op_name, *arrays) else None


def attention_kernel_for(head_dim: int, dtype, hopper: bool | None = None, shape: tuple | None = None,
                         blocks: int | None = None) -> str | None:
    """Which attention kernel runs for this head dim and dtype on the GPU, in words (e.g. "forward wp2,
    backward wk (wgmma, sm_90a)"; where the forward depends on the call's shape, both builds, unless
    `shape` = (batch, heads, query_len, key_len) is given, with `blocks` the multiprocessors when not the
    current GPU's), or None when there is none, or kernels are off, and attention takes the batched-GEMM
    path. `hopper` (compute capability 9.0) is asked of the current GPU unless given. A training loop can
    log it once:

        if gpu.attention_kernel_for(head_dim, dtype) is None:
            log(f"attention: no kernel for head dim {head_dim}, using the batched-GEMM path")
    """
    if not backend.kernels_enabled():
        return None
    return kernel_for(head_dim, dtype, hopper, shape, blocks)


# Small files every training step launches, compiled whole.
_TRAINING_FILES = ("swiglu.cu", "rope.cu", "cross_entropy.cu", "embedding.cu", "adamw.cu", "dropout.cu")


def prefetch_training(dtype, head_dim: int) -> list:
    """Start compiling the modules a training step of a model computing in `dtype` (a name or a NumPy
    dtype) with this head dim launches on the current GPU, and return them ((filename, options, arch)
    each). Returns at once; a kernel's first launch waits for its module."""
    if not backend.kernels_enabled():
        return []
    modules = [(name, (), None) for name in _TRAINING_FILES] + norm.modules(dtype) + attention.modules(head_dim, dtype)
    compiler.prefetch(modules)
    return modules
