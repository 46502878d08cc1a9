"""Cross-entropy over logits, fused with a stable log-sum-exp.

The forward already knows everything the backward needs: with p = softmax(logits) computed once for the
loss, the gradient is (p − onehot(target)) / count. So the forward writes that gradient, keeps it, and
frees the logits; the backward only scales it by the upstream gradient. The CUDA kernel does the same in
one pass per row.

Rows whose target is `ignore_index` count neither in the loss nor in the mean and get zero gradient. If
every target is ignored the mean is over nothing and the loss is NaN (as in PyTorch), which the training
loop reports as a non-finite loss.
"""
from __future__ import annotations

from ..backend import array_module
from ..gpu import kernel
from ..tensor import Function


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
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    if bool(bad.any()):
        first = int(targets[xp.argmax(bad)])
        raise IndexError(f"cross_entropy: target {first} is outside the vocabulary [0, {vocab}) "
                         f"and is not ignore_index ({ignore_index})")


class CrossEntropy(Function):
    """Forward:  m = max_v x;  lse = m + log Σ_v exp(x − m);  loss = mean over kept rows of (lse − x[target])
    Backward: dx = dy · (softmax(x) − onehot(target)) / count   (zero rows for ignored targets)
    Shapes:   x: (N, V) or (B, T, V);  targets: x.shape[:-1], integers;  loss: ()
    Saves:    the finished gradient (softmax − onehot) / count, shaped like x
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
            self.save(dlogits=dlogits.reshape(shape))
            return loss
        keep = targets1 != ignore_index
        count = int(keep.sum())
        safe_targets = xp.where(keep, targets1, 0)
        rows = xp.arange(logits2.shape[0])
        row_max = logits2.max(axis=1, keepdims=True)
        probs = logits2 - row_max                                          # (N, V), ≤ 0: exp cannot overflow
        picked = probs[rows, safe_targets]                                 # x[target] − max
        xp.exp(probs, out=probs)
        row_sum = probs.sum(axis=1, keepdims=True)
        losses = (xp.log(row_sum[:, 0]) - picked) * keep                   # lse − x[target], max cancels
        weight = keep.astype(probs.dtype) / probs.dtype.type(max(count, 1))  # 1/count on kept rows, else 0
        probs *= (weight / row_sum[:, 0])[:, None]                         # softmax / count (row_sum ≥ 1)
        probs[rows, safe_targets] -= weight                                # (softmax − onehot) / count
        self.save(dlogits=probs.reshape(shape))                            # (N, V) -> x's shape
        loss = losses.sum() / count if count else xp.asarray(float("nan"))
        return xp.asarray(loss, dtype=logits.dtype)

    def backward(self, dy):
        (dlogits,) = self.saved
        if dy.size == 1 and float(dy) == 1.0:     # the usual case (loss.backward()): skip a full-size multiply
            return dlogits
        return dlogits * dy


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
