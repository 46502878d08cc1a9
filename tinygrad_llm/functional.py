"""The public lowercase functions: `import tinygrad_llm.functional as F`.

Each wraps one `Function` (or a short composition of them). Arguments may be Tensors or, for inputs that
need no gradient, plain arrays.
"""
from __future__ import annotations

from . import rng
from .ops.activation import GELU, LogSoftmax, SiLU, Softmax, SwiGLU
from .ops.attention import CausalAttention
from .ops.dropout import Dropout
from .ops.elementwise import Add, Div, Exp, Log, Maximum, Mul, Neg, Pow, Sqrt, Sub, Tanh
from .ops.embedding import Embedding
from .ops.loss import CrossEntropy, LinearCrossEntropy
from .ops.matmul import Linear, MatMul
from .ops.movement import Concatenate, GetItem, Permute, Reshape, Stack
from .ops.norm import ResidualAdd, RMSNorm
from .ops.quantized import QuantizedLinear
from .ops.reduce import Max, Mean, Sum
from .ops.rope import RoPE
from .tensor import Tensor, ensure_tensor


def _pair(a, b):
    """Both operands as Tensors.

    A plain number or array is a constant: it takes the dtype and device of the Tensor operand. Two
    Tensors of different floating dtypes are refused here, where the mistake is made, rather than
    promoted silently to float64 (twice the memory, and a gradient of the wrong dtype at backward).
    """
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        if a.dtype != b.dtype and a.dtype.kind == "f" and b.dtype.kind == "f":
            raise TypeError(f"operands have different dtypes ({a.dtype} and {b.dtype}); "
                            f"convert one with .astype() first")
        return a, b
    if isinstance(a, Tensor):
        return a, ensure_tensor(b, like=a)
    if isinstance(b, Tensor):
        return ensure_tensor(a, like=b), b
    return ensure_tensor(a), ensure_tensor(b)


# elementwise
def add(a, b): return Add.apply(*_pair(a, b))
def sub(a, b): return Sub.apply(*_pair(a, b))
def mul(a, b): return Mul.apply(*_pair(a, b))
def div(a, b): return Div.apply(*_pair(a, b))
def pow(a, b): return Pow.apply(*_pair(a, b))
def maximum(a, b): return Maximum.apply(*_pair(a, b))
def neg(x): return Neg.apply(ensure_tensor(x))
def exp(x): return Exp.apply(ensure_tensor(x))
def log(x): return Log.apply(ensure_tensor(x))
def sqrt(x): return Sqrt.apply(ensure_tensor(x))
def tanh(x): return Tanh.apply(ensure_tensor(x))
def relu(x): return maximum(x, 0.0)


# reductions
def sum(x, axis=None, keepdims=False): return Sum.apply(ensure_tensor(x), axis=axis, keepdims=keepdims)
def mean(x, axis=None, keepdims=False): return Mean.apply(ensure_tensor(x), axis=axis, keepdims=keepdims)
def max(x, axis=None, keepdims=False): return Max.apply(ensure_tensor(x), axis=axis, keepdims=keepdims)


# movement
def reshape(x, *shape):
    shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
    return Reshape.apply(ensure_tensor(x), shape=shape)


def permute(x, *axes):
    axes = tuple(axes[0]) if len(axes) == 1 and isinstance(axes[0], (tuple, list)) else axes
    return Permute.apply(ensure_tensor(x), axes=axes)


def transpose(x, *axes):
    """transpose(x) reverses the axes; transpose(x, a, b) swaps axes a and b; more axes permute."""
    x = ensure_tensor(x)
    if not axes:
        return permute(x, tuple(reversed(range(x.ndim))))
    if len(axes) == 2:
        order = list(range(x.ndim))
        a, b = axes[0] % x.ndim, axes[1] % x.ndim
        order[a], order[b] = order[b], order[a]
        return permute(x, order)
    return permute(x, *axes)


def getitem(x, index):
    if isinstance(index, Tensor):
        index = index.data
    if isinstance(index, tuple):
        index = tuple(i.data if isinstance(i, Tensor) else i for i in index)
    return GetItem.apply(ensure_tensor(x), index=index)


def concatenate(tensors, axis=0, view=False):
    """The tensors joined along `axis`; view=True: a view of their memory when they lie end to end (only
    for a result nothing writes into, see ops.movement.Concatenate)."""
    tensors = [ensure_tensor(t) for t in tensors]
    return Concatenate.apply(*tensors, axis=axis, view=view)


def stack(tensors, axis=0):
    tensors = [ensure_tensor(t) for t in tensors]
    return Stack.apply(*tensors, axis=axis)


def split(x, sections, axis=-1):
    """Split along axis into equal parts (sections an int) or parts of the given sizes (a list)."""
    x = ensure_tensor(x)
    axis = axis % x.ndim
    length = x.shape[axis]
    if isinstance(sections, int):
        if sections <= 0 or length % sections:
            raise ValueError(f"split: axis of length {length} does not divide into {sections} equal parts")
        sizes = [length // sections] * sections
    else:
        sizes = list(sections)
        if builtins_sum(sizes) != length:
            raise ValueError(f"split: sizes {sizes} do not add up to the axis length {length}")
    parts, start = [], 0
    for size in sizes:
        index = [slice(None)] * x.ndim
        index[axis] = slice(start, start + size)
        parts.append(getitem(x, tuple(index)))
        start += size
    return parts


# products
def matmul(a, b): return MatMul.apply(*_pair(a, b))


def linear(x, weight):
    """y = x @ weightᵀ with weight shaped (out, in), as in PyTorch and Hugging Face."""
    return Linear.apply(ensure_tensor(x), ensure_tensor(weight))


# the LLM ops
def embedding(ids, weight):
    ids = ids.data if isinstance(ids, Tensor) else ids
    return Embedding.apply(ids, ensure_tensor(weight))


def softmax(x, axis=-1): return Softmax.apply(ensure_tensor(x), axis=axis)
def log_softmax(x, axis=-1): return LogSoftmax.apply(ensure_tensor(x), axis=axis)
def silu(x): return SiLU.apply(ensure_tensor(x))
def gelu(x): return GELU.apply(ensure_tensor(x))


def swiglu(gate, up=None):
    """silu(gate) · up; with up None, gate is the packed gate‖up (..., 2F) of one stacked GEMM."""
    if up is None:
        return SwiGLU.apply(ensure_tensor(gate), packed=True)
    return SwiGLU.apply(ensure_tensor(gate), ensure_tensor(up))


def rms_norm(x, weight, eps=1e-5, chunked=True):
    """RMSNorm over the last axis; chunked: NumPy arrays go through the threaded row-chunk path."""
    return RMSNorm.apply(ensure_tensor(x), ensure_tensor(weight), eps=eps, chunked=chunked)


def add_rms_norm(x, branch, weight, eps=1e-5, chunked=True, out_dtype=None):
    """(s, rms_norm(s)) with s = x + branch, the branch rounded to x's dtype: a residual junction and the
    norm that follows it; y in out_dtype (default x's). One pass over the rows on the GPU."""
    x, branch, weight = ensure_tensor(x), ensure_tensor(branch), ensure_tensor(weight)
    into = {}
    total = ResidualAdd.apply(x, branch, norm=(weight.data, eps, out_dtype, into, chunked))
    return total, RMSNorm.apply(total, weight, eps=eps, chunked=chunked, out_dtype=out_dtype,
                                prepared=into.pop("prepared", None), junction=into)


def rope(x, positions=None, theta=10000.0):
    """Rotary embedding of x (B, H, T, D), rotate-half pairing; positions: None, an int offset or (T,) ints."""
    return RoPE.apply(ensure_tensor(x), positions=positions, theta=theta)


def causal_attention(q, k, v, dropout=0.0, seed=None):
    """Causal grouped-query attention: q (B, H, Tq, D), k and v (B, Hkv, Tk, D), Hkv | H, Tk ≥ Tq.
    dropout: probability of dropping each attention probability (training; the caller passes 0 in eval);
    seed=None draws one from tinygrad_llm.rng."""
    return CausalAttention.apply(ensure_tensor(q), ensure_tensor(k), ensure_tensor(v),
                                 dropout=_attention_dropout(dropout, seed))


def rope_attention(qkv, heads, kv_heads, cos, sin, keep_probabilities=False, cache=None, dropout=0.0, seed=None):
    """RoPE + causal attention on a packed projection qkv (B, T, H + 2Hkv, D) -> (B, T, H·D).

    cos, sin: (T, D/2) tables of the positions (ops/rope.rope_angles). keep_probabilities: on the CPU,
    keep P between forward and backward. cache: (k_store, v_store, start) for KV-cached decoding, or
    (k_store, v_store, CacheRows) for a ragged batch of cache slots (ops/attention.CacheRows).
    dropout, seed: attention dropout as in causal_attention (never with a cache).
    """
    return CausalAttention.apply(ensure_tensor(qkv), packed=(heads, kv_heads, cos, sin),
                                 keep_probabilities=keep_probabilities, cache=cache,
                                 dropout=_attention_dropout(dropout, seed))


def _attention_dropout(probability, seed):
    """The op's dropout=(p, seed) argument: None for p == 0, else a seed drawn when none is given."""
    if probability == 0.0:
        return None
    return probability, rng.next_seed() if seed is None else seed


def cross_entropy(logits, targets, ignore_index=-100):
    """Mean next-token loss over targets != ignore_index; logits (N, V) or (B, T, V)."""
    targets = targets.data if isinstance(targets, Tensor) else targets
    return CrossEntropy.apply(ensure_tensor(logits), targets, ignore_index=ignore_index)


def linear_cross_entropy(x, weight, targets, ignore_index=-100):
    """cross_entropy(linear(x, weight), targets) in one op that never keeps the (N, V) logits twice."""
    targets = targets.data if isinstance(targets, Tensor) else targets
    return LinearCrossEntropy.apply(ensure_tensor(x), ensure_tensor(weight), targets, ignore_index=ignore_index)


def dropout(x, p, training=True, seed=None):
    """Inverted dropout; the identity when not training or p == 0. seed=None draws from tinygrad_llm.rng."""
    x = ensure_tensor(x)
    if not training or p == 0.0:
        return x
    return Dropout.apply(x, p, rng.next_seed() if seed is None else seed)


import builtins as _builtins  # noqa: E402  (sum and max are shadowed above by the tensor versions)

builtins_sum = _builtins.sum


# post-training (preference optimisation and LoRA)
from .ops.lora import LoRAWeight  # noqa: E402
from .ops.preference import DPOLoss, LogSigmoid, SequenceLogprobs  # noqa: E402


def log_sigmoid(x):
    """log σ(x), finite and accurate for any x (min(x, 0) − log1p(e^−|x|))."""
    return LogSigmoid.apply(ensure_tensor(x))


def sequence_logprobs(logits, targets, mask):
    """(B,) sums over t of mask[b, t] · log softmax(logits[b, t])[targets[b, t]]; logits (B, T, V)."""
    targets = targets.data if isinstance(targets, Tensor) else targets
    mask = mask.data if isinstance(mask, Tensor) else mask
    return SequenceLogprobs.apply(ensure_tensor(logits), targets, mask)


def dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta=0.1):
    """Mean DPO loss −log σ(β·[(πc − ρc) − (πr − ρr)]) over the batch, a scalar Tensor; each input (B,)."""
    policy_chosen_logps = ensure_tensor(policy_chosen_logps)
    rest = [ensure_tensor(t, like=policy_chosen_logps) for t in
            (policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)]
    return DPOLoss.apply(policy_chosen_logps, *rest, beta=float(beta))


def lora_weight(weight, a, b, scale):
    """W + scale · B @ A: a LoRA-adapted weight; weight (out, in), a (r, in), b (out, r)."""
    return LoRAWeight.apply(ensure_tensor(weight), ensure_tensor(a), ensure_tensor(b), scale=float(scale))


def quantized_linear(x, weight):
    """y = x @ Ŵᵀ for a `tinygrad_llm.quant.QuantizedMatrix` weight (inference only: no backward)."""
    return QuantizedLinear.apply(ensure_tensor(x), weight)
