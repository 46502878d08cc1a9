"""Ops of preference optimisation: log σ(x), a sequence's log-probability, and the DPO loss.

log σ is written as min(x, 0) − log1p(e^−|x|): both terms are exact where the other is negligible, so it
stays finite and accurate for any |x| (the tanh form of σ rounds to 0 for x < −17 in float32 and its log
is then −inf). Each op has a composed `*_reference` built from primitive ops, an independent test oracle.
"""
from __future__ import annotations

from ..backend import array_module
from ..tensor import Function, ensure_tensor
from .activation import LogSoftmax
from .elementwise import Add, Exp, Log, Mul, Neg, Sub
from .movement import GetItem
from .reduce import Mean, Sum


def _sigmoid_of_negative(x):
    """σ(−x) = 1 − σ(x) on a raw array, without overflow: e^−|x| / (1 + e^−|x|) for x ≥ 0, 1 / (1 + e^−|x|) else."""
    xp = array_module(x)
    small = xp.exp(-xp.abs(x))                       # in (0, 1]: never overflows
    return xp.where(x >= 0, small, xp.ones_like(small)) / (1 + small)


class LogSigmoid(Function):
    """Forward:  y = log σ(x) = min(x, 0) − log1p(e^−|x|)
    Backward: dx = dy · σ(−x)            (d/dx log σ(x) = σ'(x)/σ(x) = 1 − σ(x))
    Shapes:   x, y, dy alike
    Saves:    σ(−x)
    """

    def forward(self, x):
        xp = array_module(x)
        self.save(sigmoid_negative=_sigmoid_of_negative(x))
        return (xp.minimum(x, 0) - xp.log1p(xp.exp(-xp.abs(x)))).astype(x.dtype, copy=False)

    def backward(self, dy):
        (sigmoid_negative,) = self.saved
        return dy * sigmoid_negative


def _check_sequence_inputs(logits, targets, mask):
    if logits.ndim != 3:
        raise ValueError(f"sequence_logprobs: logits must be (B, T, V), got {tuple(logits.shape)}")
    if tuple(targets.shape) != tuple(logits.shape[:2]) or tuple(mask.shape) != tuple(logits.shape[:2]):
        raise ValueError(f"sequence_logprobs: targets {tuple(targets.shape)} and mask {tuple(mask.shape)} must "
                         f"both be (B, T) = {tuple(logits.shape[:2])}")
    if targets.dtype.kind not in "iu":
        raise TypeError(f"sequence_logprobs: targets must be integers, got dtype {targets.dtype}")
    if targets.size and (int(targets.min()) < 0 or int(targets.max()) >= logits.shape[2]):
        raise IndexError(f"sequence_logprobs: targets must lie in [0, {logits.shape[2]}) (pad with a valid id "
                         f"and mask the position out)")


class SequenceLogprobs(Function):
    """Forward:  lse[b,t] = log Σ_v exp(x[b,t,v]);  y[b] = Σ_t m[b,t] · (x[b,t,target[b,t]] − lse[b,t])
    Backward: dx[b,t,v] = dy[b] · m[b,t] · (onehot(target[b,t])[v] − softmax(x[b,t])[v])
    Shapes:   x: (B, T, V);  target, m: (B, T) (integers; weights, usually 0/1, not differentiated);  y, dy: (B,)
    Saves:    softmax(x) (it replaces x), target, m
    """

    def forward(self, logits, targets, mask):
        xp = array_module(logits)
        targets, mask = xp.asarray(targets), xp.asarray(mask).astype(logits.dtype)
        _check_sequence_inputs(logits, targets, mask)
        batch, time, _ = logits.shape
        rows, steps = xp.arange(batch)[:, None], xp.arange(time)[None, :]
        probs = logits - logits.max(axis=-1, keepdims=True)                 # (B, T, V), ≤ 0
        picked = probs[rows, steps, targets]                                # (B, T): x[target] − max
        xp.exp(probs, out=probs)
        total = probs.sum(axis=-1)                                          # (B, T), ≥ 1
        probs /= total[..., None]                                           # softmax
        self.save(probs=probs, targets=targets, mask=mask)
        return ((picked - xp.log(total)) * mask).sum(axis=1)                # (B, T) -> (B,)

    def backward(self, dy):
        probs, targets, mask = self.saved
        xp = array_module(probs)
        batch, time, _ = probs.shape
        weight = dy[:, None] * mask                                         # (B, T): dy[b] · m[b, t]
        dx = probs * -weight[..., None]                                     # −w · softmax
        dx[xp.arange(batch)[:, None], xp.arange(time)[None, :], targets] += weight   # + w · onehot
        return dx


class DPOLoss(Function):
    """Forward:  z[b] = β · ((πc[b] − ρc[b]) − (πr[b] − ρr[b]));  loss = −(1/B) Σ_b log σ(z[b])
    Backward: g[b] = −dy · σ(−z[b]) / B   (dloss/dz);  dπc = β·g, dπr = −β·g, dρc = −β·g, dρr = β·g
    Shapes:   πc, πr, ρc, ρr (policy/reference log-probabilities of chosen/rejected): (B,);  loss, dy: ()
    Saves:    σ(−z), β
    """

    def forward(self, policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta=0.1):
        xp = array_module(policy_chosen)
        shapes = {tuple(a.shape) for a in (policy_chosen, policy_rejected, reference_chosen, reference_rejected)}
        if len(shapes) != 1 or policy_chosen.ndim != 1 or policy_chosen.shape[0] == 0:
            raise ValueError(f"dpo_loss: the four log-probability arrays must be (B,) with B ≥ 1, got {sorted(shapes)}")
        z = beta * ((policy_chosen - reference_chosen) - (policy_rejected - reference_rejected))
        self.save(sigmoid_negative=_sigmoid_of_negative(z), beta=beta)
        log_sigmoid = xp.minimum(z, 0) - xp.log1p(xp.exp(-xp.abs(z)))
        return xp.asarray(-log_sigmoid.mean(), dtype=policy_chosen.dtype)

    def backward(self, dy):
        sigmoid_negative, beta = self.saved
        g = -dy * sigmoid_negative / sigmoid_negative.shape[0]             # dloss/dz, (B,)
        g = g.astype(sigmoid_negative.dtype, copy=False)
        return beta * g, -beta * g, -beta * g, beta * g


def log_sigmoid_reference(x):
    """log σ(x) composed from primitives as −log(1 + e^−x): exact where e^−x neither overflows nor underflows."""
    return Neg.apply(Log.apply(Add.apply(Exp.apply(Neg.apply(x)), ensure_tensor(1.0, like=x))))


def sequence_logprobs_reference(logits, targets, mask):
    """Σ_t m · log_softmax(x)[target] composed from primitives (a test oracle)."""
    xp = array_module(logits.data)
    batch, time, _ = logits.shape
    index = (xp.arange(batch)[:, None], xp.arange(time)[None, :], xp.asarray(targets))
    picked = GetItem.apply(LogSoftmax.apply(logits, axis=-1), index=index)              # (B, T)
    weights = ensure_tensor(xp.asarray(mask).astype(logits.dtype), like=logits)
    return Sum.apply(Mul.apply(picked, weights), axis=1)                                # (B, T) -> (B,)


def dpo_loss_reference(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta=0.1):
    """The DPO loss composed from primitives and LogSigmoid (a test oracle)."""
    margin = Sub.apply(Sub.apply(policy_chosen, reference_chosen), Sub.apply(policy_rejected, reference_rejected))
    return Neg.apply(Mean.apply(LogSigmoid.apply(Mul.apply(margin, ensure_tensor(beta, like=margin)))))
