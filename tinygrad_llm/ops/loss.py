"""Cross-entropy over logits, fused with a stable log-sum-exp.

The forward already knows everything the backward needs: with p = softmax(logits) computed once for the
loss, the gradient is (p − onehot(target)) / count. So the forward writes that gradient, keeps it, and
frees the logits; the backward only scales it by the upstream gradient. The CUDA kernel does the same in
one pass per row.

Rows whose target is `ignore_index` count neither in the loss nor in the mean and get zero gradient. If
every target is ignored the mean is over nothing and the loss is NaN (as in PyTorch), which the training
loop reports as a non-finite loss.

`LinearCrossEntropy` is the output head and the loss in one op (training): the logits Z = x Wᵀ are
formed once, turned into their gradient in their own memory, and never kept as a second (N, V) array.
Both ops share `_loss_and_gradient`, which works on NumPy arrays in cache-sized row chunks over threads
(float32/64: each row one call of a compiled loop, ops/fused_cpu.c, where it is available).
16-bit logits are softmaxed in float32.
"""
from __future__ import annotations

import numpy as np

from ..backend import array_module, inputs_checked
from ..gpu import kernel
from ..cpu_threads import run_row_chunks
from ..tensor import Function, is_unit_seed
from . import fused_cpu
from .matmul import accumulation_dtype, product, product_into


def _flatten(logits, targets):
    if logits.ndim not in (2, 3):
        raise ValueError(f"cross_entropy: logits must be (N, V) or (B, T, V), got {tuple(logits.shape)}")
    if tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"cross_entropy: targets shape {tuple(targets.shape)} must equal logits shape "
                         f"without the vocabulary axis, {tuple(logits.shape[:-1])}")
    if targets.dtype.kind not in "iu":
        raise TypeError(f"cross_entropy: targets must be integers, got dtype {targets.dtype}")
    vocab = logits.shape[-1]
    return logits.reshape(-1, vocab), targets.reshape(-1)            # (B, T, V) -> (N, V);  (B, T) -> (N,)


def _check_targets(targets, vocab: int, ignore_index: int, xp):
    if inputs_checked():            # the caller checked them on the host (backend.inputs_checked)
        return
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    if bool(bad.any()):
        first = int(targets[xp.argmax(bad)])
        raise IndexError(f"cross_entropy: target {first} is outside the vocabulary [0, {vocab}) "
                         f"and is not ignore_index ({ignore_index})")


def _loss_and_gradient(logits, targets, ignore_index, xp, in_place=False):
    """The mean loss over kept rows and its gradient (softmax − onehot) / count, for logits (N, V).

    in_place: the logits array may become the gradient (the caller owns it). Per row:
    m = max Z;  lse = m + log Σ exp(Z − m)  (in float64 for the loss);  G = exp(Z − m) / Σ · 1/count,
    then G[target] −= 1/count; ignored rows are zero.
    """
    keep = targets != ignore_index
    count = int(keep.sum())
    compute = accumulation_dtype(logits.dtype)
    grad = logits if in_place and compute == logits.dtype else logits.astype(compute)   # (N, V), becomes G
    scale = grad.dtype.type(1.0 / max(count, 1))
    if xp is np and fused_cpu.usable(grad):         # each row in one compiled loop: max, exp and Σ, scale
        targets64 = np.ascontiguousarray(targets, dtype=np.int64)
        losses = np.empty(grad.shape[0], dtype=np.float64)
        vocab = grad.shape[1]
        fused_cpu.over_rows("cross_entropy_rows", grad.dtype, grad.shape[0], vocab, lambda f, start, end: f(
            fused_cpu.address(grad, start * vocab), fused_cpu.address(targets64, start),
            fused_cpu.address(losses, start), end - start, vocab, scale, ignore_index))
        loss = losses.sum() / count if count else np.asarray(float("nan"))
        return loss, grad.astype(logits.dtype, copy=False)

    def part(start, end):
        z = grad[start:end]
        kept = keep[start:end]
        t = xp.where(kept, targets[start:end], 0)
        rows = xp.arange(end - start)
        picked = z[rows, t].astype(xp.float64)
        row_max = z.max(axis=1, keepdims=True)
        z -= row_max                                                    # ≤ 0: exp cannot overflow
        xp.exp(z, out=z)
        row_sum = z.sum(axis=1, keepdims=True)
        lse = row_max[:, 0].astype(xp.float64) + xp.log(row_sum[:, 0].astype(xp.float64))
        loss = ((lse - picked) * kept).sum()
        z *= (kept[:, None] * scale) / row_sum                           # softmax / count on kept rows
        z[rows, t] -= kept * scale                                       # − onehot / count
        return loss

    losses = run_row_chunks(part, grad.shape[0], grad.shape[1], xp)
    total = losses[0]
    for loss in losses[1:]:
        total = total + loss
    loss = total / count if count else xp.asarray(float("nan"))
    return loss, grad.astype(logits.dtype, copy=False)


class CrossEntropy(Function):
    """Forward:  m = max_v x;  lse = m + log Σ_v exp(x − m);  loss = mean over kept rows of (lse − x[target])
    Backward: dx = dy · (softmax(x) − onehot(target)) / count   (zero rows for ignored targets)
    Shapes:   x: (N, V) or (B, T, V);  targets: x.shape[:-1], integers;  loss: ()
    Saves:    the finished gradient (softmax − onehot) / count, shaped like x
    dtype:    the loss in float32 for 16-bit logits (autocast's numerics: a bf16 loss would be rounded to
              ~3 significant digits), else in the logits' dtype; dlogits in the logits' dtype.
    """

    def forward(self, logits, targets, ignore_index=-100):
        xp = array_module(logits)
        shape = logits.shape
        logits2, targets1 = _flatten(logits, targets)
        targets1 = xp.asarray(targets1)
        _check_targets(targets1, logits2.shape[1], ignore_index, xp)
        fast = kernel("cross_entropy", logits2)
        if fast is not None:
            loss, dlogits = fast.cross_entropy_forward_backward(logits2, targets1, ignore_index)
            self.save(dlogits=dlogits.reshape(shape))                      # (N, V) -> x's shape
            return loss
        loss, dlogits = _loss_and_gradient(logits2, targets1, ignore_index, xp)
        self.save(dlogits=dlogits.reshape(shape))
        return xp.asarray(loss, dtype=accumulation_dtype(logits.dtype))

    def backward(self, dy):
        (dlogits,) = self.saved
        if is_unit_seed(dy):                     # the usual case (loss.backward()): skip a full-size multiply
            return dlogits
        if dy.dtype != dlogits.dtype:            # a float32 dy of 16-bit logits: multiply in float32
            return (dlogits.astype(dy.dtype) * dy).astype(dlogits.dtype)
        return dlogits * dy


class LinearCrossEntropy(Function):
    """The output head and the mean next-token cross-entropy in one op (training: no logits kept).

    Forward:  Z = x Wᵀ (N, V);  loss = CrossEntropy(Z, targets)
              and already its gradient G = (softmax(Z) − onehot(target)) / count, in Z's memory
    Backward: the chain rule through Z = x Wᵀ (ops/matmul.Linear's backward with dZ = dy · G):
              dx = dy · G W;   dW = dy · Gᵀ x
    Shapes:   x (B, T, C) or (N, C)   W (V, C)   targets x.shape[:-1] ints (ignore_index rows count nowhere)
              loss ()
    Saves:    x, W (or the GEMM kernel's low-precision copies of them), G, and the kernels the forward ran
    Paths:    on GPU arrays the precision policy's GEMM (kernel "linear") and the fused cross-entropy
              kernel when they apply; the array path otherwise (row chunks over threads on the CPU).
    """

    def forward(self, x, weight, targets, ignore_index=-100):
        xp = array_module(x)
        x2 = x.reshape(-1, x.shape[-1])                                   # (B, T, C) -> (N, C)
        targets = xp.asarray(targets)
        if targets.dtype.kind not in "iu":
            raise TypeError(f"cross_entropy: targets must be integers, got dtype {targets.dtype}")
        targets = targets.reshape(-1)                                     # (B, T) -> (N,)
        if targets.shape[0] != x2.shape[0] or weight.ndim != 2 or weight.shape[1] != x2.shape[1]:
            raise ValueError(f"linear_cross_entropy: x {tuple(x.shape)}, weight {tuple(weight.shape)} and "
                             f"{targets.shape[0]} targets do not fit together")
        _check_targets(targets, weight.shape[0], ignore_index, xp)
        linear = kernel("linear", x2, weight)
        if linear is not None:
            logits, x_saved, weight_saved = linear.linear_forward(x2, weight)
        else:
            logits, x_saved, weight_saved = product(x2, weight.T), x, weight    # (N, V)
        entropy = kernel("cross_entropy", logits)
        if entropy is not None:
            # over the logits, which are this op's own: one (N, V) buffer instead of two at the step's peak
            loss, grad = entropy.cross_entropy_forward_backward(logits, targets, ignore_index, in_place=True)
        else:
            loss, grad = _loss_and_gradient(logits, targets, ignore_index, xp, in_place=True)
        self.save(x=x_saved, weight=weight_saved, grad=grad, linear=linear, dtypes=(x.dtype, weight.dtype),
                  x_shape=x.shape)
        if entropy is not None:
            return loss                                                   # float32 (the kernel's)
        return xp.asarray(loss, dtype=accumulation_dtype(logits.dtype))

    gradient_targets = True                      # dW straight into the optimizer's gradient buffer

    def backward(self, dy, into=(None, None, None)):
        x, weight, grad, linear, dtypes, x_shape = self.saved
        if not is_unit_seed(dy):                 # a loss scale may not fit in float16: multiply in float32
            compute = accumulation_dtype(grad.dtype)
            grad = (grad.astype(compute, copy=False) * dy.astype(compute)).astype(grad.dtype, copy=False)
        if linear is not None:
            dx, dweight = linear.linear_backward(grad, x, weight, dtypes, self.needs_input_grad,
                                                 dweight_out=into[1])
            return (None if dx is None else dx.reshape(x_shape)), dweight
        x2 = x.reshape(-1, x.shape[-1])
        dx = product(grad, weight).reshape(x_shape).astype(dtypes[0], copy=False) \
            if self.needs_input_grad[0] else None
        dweight = product_into(grad.T, x2, into[1] if grad.dtype == dtypes[1] else None).astype(dtypes[1], copy=False) \
            if self.needs_input_grad[1] else None
        return dx, dweight


def cross_entropy_reference(logits, targets, ignore_index=-100):
    """Cross-entropy composed from primitives: −mean(log_softmax(x)[target]) over kept rows (a test oracle)."""
    from ..functional import log_softmax
    from ..tensor import Tensor
    xp = array_module(logits.data)
    vocab = logits.shape[-1]
    flat = logits.reshape(-1, vocab)                                       # (..., V) -> (N, V)
    targets = xp.asarray(targets).reshape(-1)
    keep = targets != ignore_index
    rows = xp.arange(flat.shape[0])[keep]
    picked = log_softmax(flat, axis=-1)[rows, targets[keep]]
    return -picked.sum() / Tensor(xp.asarray(int(keep.sum()), dtype=logits.dtype))
