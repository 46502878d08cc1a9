"""Which kernel serves which op: op name -> the test that a kernel handles the arrays.

Every test looks only at where the arrays live, their dtypes and their shapes, so the forward and the
backward of one op get the same answer.
"""
from __future__ import annotations

from . import activation, adamw, attention, dropout, embedding, gemm, loss, norm, quantized, rope

SUPPORTS = {
    "rms_norm": norm.supports,                     # (x, weight) or (dy, weight)
    "add_rms_norm": norm.supports_residual,        # (x, branch, weight, y's dtype)
    "swiglu": activation.supports,                 # (gate, up)
    "swiglu_packed": activation.supports_packed,   # (gate_up,)
    "rope": rope.supports,                         # (x,) or (dy,)
    "dropout": dropout.supports,                   # (x,)
    "cross_entropy": loss.supports,                # (logits2d,)
    "embedding": embedding.supports,               # (dy,)
    "adamw": adamw.supports,                       # every param, grad and moment
    "linear": gemm.linear_supported,               # (x, weight): float GPU arrays, in the policy's dtype
    "causal_attention": attention.supports,        # (q, k, v)
    "decode_attention": attention.decode_supports,  # (k_store, v_store) of a KV cache
    "quantized_linear": quantized.supports,        # (x, weight blocks, weight scales)
}


def supports(op_name: str, *arrays) -> bool:
    """Whether a kernel exists for `op_name` and these arrays (all must be CuPy arrays); False for an op
    with no kernel."""
    test = SUPPORTS.get(op_name)
    return test is not None and bool(test(*arrays))
