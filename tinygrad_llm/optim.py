"""AdamW on flat buffers, the warmup + cosine learning-rate schedule, and global-norm clipping.

AdamW (Loshchilov & Hutter) with decoupled weight decay, the update of `torch.optim.AdamW`:
    θ ← θ · (1 − lr·wd)                      (only for parameters with ≥ 2 dims: matrices, embeddings)
    m ← β₁ m + (1 − β₁) g;   v ← β₂ v + (1 − β₂) g²
    θ ← θ − lr/(1 − β₁ᵗ) · m / (√v / √(1 − β₂ᵗ) + eps)

Speed: the optimizer copies every parameter into one contiguous buffer per group (2-D weights first,
then gains) and re-points each Parameter's `.data` at its slice of that buffer, so the update is a few
vectorised passes over the buffer, done in cache-sized chunks, instead of several per parameter; on the
CPU, where ops/fused_cpu.c could be built, one compiled pass per thread instead. A
Parameter whose `.data` was replaced since (a device move, a dtype cast) is noticed and re-gathered.
`gather_grads()` copies the gradients into a matching flat buffer and returns their global L2 norm,
which is what clipping and the non-finite check of the training loop need.

Sharded state (ZeRO stage 1, `shard=(rank, world)`): each rank keeps the moments of one contiguous
1/world of every flat buffer and updates only those parameters; the data-parallel wrapper
(tinygrad_llm.distributed) all-gathers the updated slices. Without `shard` the moments cover everything.
"""
from __future__ import annotations

import math

import numpy as np

from . import backend
from .gpu import kernel
from .cpu_threads import parallel_items, split
from .ops import fused_cpu

CHUNK = 1 << 16      # elements per pass of the fused update (fits the temporaries in L2)


def lr_schedule(step: int, peak_lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.1,
                min_lr: float | None = None) -> float:
    """Linear warmup to peak_lr over `warmup_steps`, then cosine decay to min_lr (= min_lr_ratio·peak_lr).

    warmup: lr · (step + 1) / (warmup + 1)  (never 0 at step 0);  after total_steps: min_lr.
    """
    floor = peak_lr * min_lr_ratio if min_lr is None else min_lr
    if step < warmup_steps:
        return peak_lr * (step + 1) / (warmup_steps + 1)
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (peak_lr - floor)


def adamw_values(lr: float, betas, step: int, grad_scale: float = 1.0) -> np.ndarray:
    """[grad_scale, lr, step_size, inv_sqrt_bias2] (float64) of AdamW's update number `step` (from 1):
    step_size = lr / (1 − β₁ᵗ), inv_sqrt_bias2 = 1 / √(1 − β₂ᵗ). What `AdamW.apply` and the fused kernel read."""
    beta1, beta2 = betas
    return np.array([grad_scale, lr, lr / (1.0 - beta1 ** step), 1.0 / math.sqrt(1.0 - beta2 ** step)])


def global_grad_norm(params) -> float:
    """√(Σ over all parameters of Σ g²), accumulated in float64; parameters without .grad count as 0."""
    total = 0.0
    for p in params:
        if p.grad is not None:
            g = p.grad.ravel()
            total += float(g.astype(np.float64) @ g.astype(np.float64)) if g.size else 0.0
    return math.sqrt(total)


def clip_grad_norm_(params, max_norm: float) -> float:
    """Scale every .grad so that the global norm is at most max_norm; returns the norm before clipping."""
    norm = global_grad_norm(params)
    coefficient = max_norm / (norm + 1e-6)
    if coefficient < 1.0 and math.isfinite(norm):
        for p in params:
            if p.grad is not None:
                p.grad = p.grad * p.grad.dtype.type(coefficient)
    return norm


def shard_bounds(total: int, rank: int, world: int) -> tuple:
    """[lo, hi) of the `rank`-th of `world` nearly equal contiguous parts of range(total)."""
    if not 0 <= rank < world:
        raise ValueError(f"shard rank {rank} outside a world of {world}")
    base, extra = divmod(total, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (rank < extra)


class _Group:
    """Parameters sharing one flat buffer, weight decay setting, dtype and device."""

    def __init__(self, names, params, weight_decay, shard=None):
        self.names, self.params, self.weight_decay = list(names), list(params), float(weight_decay)
        self.sizes = [p.size for p in self.params]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(int).tolist()
        self.lo, self.hi = shard_bounds(self.offsets[-1], *(shard or (0, 1)))   # the slice this rank updates
        self.flat = self.grad = self.exp_avg = self.exp_avg_sq = None
        self.views = []

    def bind(self, keep_moments=True):
        """(Re)build the flat buffer from the parameters' current values and point them at it."""
        first = self.params[0].data
        xp = backend.array_module(first)
        for p in self.params:
            if p.dtype != first.dtype or p.device != self.params[0].device:
                raise TypeError("AdamW: parameters of one group must share dtype and device "
                                f"({p.dtype}/{p.device} vs {first.dtype}/{self.params[0].device})")
        total = self.offsets[-1]
        flat = xp.empty(total, dtype=first.dtype)
        for p, start, end in zip(self.params, self.offsets, self.offsets[1:]):
            flat[start:end] = p.data.ravel()
        self.views = []
        grad = xp.zeros_like(flat)
        for p, start, end in zip(self.params, self.offsets, self.offsets[1:]):
            p.data = flat[start:end].reshape(p.shape)
            self.views.append(p.data)
            if hasattr(p, "grad_buffer"):          # backward writes the gradient here: no gather copy
                p.grad_buffer = grad[start:end].reshape(p.shape)
        moved = lambda a: None if a is None else backend.to_device(a, backend.device_of(flat)).astype(flat.dtype)
        owned = self.hi - self.lo
        self.exp_avg = (moved(self.exp_avg) if keep_moments and self.exp_avg is not None
                        else xp.zeros(owned, dtype=flat.dtype))
        self.exp_avg_sq = (moved(self.exp_avg_sq) if keep_moments and self.exp_avg_sq is not None
                           else xp.zeros(owned, dtype=flat.dtype))
        self.flat, self.grad = flat, grad

    def is_bound(self) -> bool:
        return all(p.data is view for p, view in zip(self.params, self.views))


class AdamW:
    """AdamW(named_parameters, lr, betas, eps, weight_decay): decay on ≥ 2-D parameters only.

    `named_parameters`: a Module's `named_parameters()` (names are used in the state dict) or a plain
    list of Parameters (named by position).
    """

    def __init__(self, named_parameters, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, shard: tuple | None = None):
        items = list(named_parameters)
        if items and not isinstance(items[0], tuple):
            items = [(str(i), p) for i, p in enumerate(items)]
        if not items:
            raise ValueError("AdamW got no parameters")
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"AdamW: invalid hyperparameters lr={lr} betas={betas} eps={eps} "
                             f"weight_decay={weight_decay}")
        self.lr, self.betas, self.eps, self.weight_decay = float(lr), tuple(float(b) for b in betas), float(eps), float(weight_decay)
        self.step_count = 0
        decay = [(n, p) for n, p in items if p.ndim >= 2]
        no_decay = [(n, p) for n, p in items if p.ndim < 2]
        self.shard = None if shard is None else (int(shard[0]), int(shard[1]))
        self.combine_shards = None     # sharded state: sums zero-padded full-size arrays over the ranks
        self.groups = [_Group([n for n, _ in part], [p for _, p in part], wd, self.shard)
                       for part, wd in ((decay, weight_decay), (no_decay, 0.0)) if part]
        for group in self.groups:
            group.bind(keep_moments=False)
        self._gathered = False

    @property
    def params(self):
        return [p for g in self.groups for p in g.params]

    def _ensure_bound(self):
        for group in self.groups:
            if not group.is_bound():
                group.bind(keep_moments=True)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None
        self._gathered = False

    def collect_grads(self) -> None:
        """Copy every .grad into the flat gradient buffers (a missing .grad counts as zeros), marking them
        as this step's gradients; no host sync, so a captured training step can run it."""
        self._ensure_bound()
        for group in self.groups:
            for p, start, end in zip(group.params, group.offsets, group.offsets[1:]):
                if p.grad is None:
                    group.grad[start:end] = 0
                elif p.grad is not getattr(p, "grad_buffer", None):     # else backward wrote it in place
                    group.grad[start:end] = p.grad.ravel()
        self._gathered = True

    def gather_grads(self) -> float:
        """Copy every .grad into the flat gradient buffers; return the global L2 norm (inf/nan if non-finite)."""
        self.collect_grads()
        return self.gathered_norm()

    def gathered_square_sum(self):
        """Σ g² over the flat gradient buffers as they are now, as a one-element float32 array on their
        device (no host sync; inf or nan propagate)."""
        self._ensure_bound()
        fast = kernel("adamw", *(g.grad for g in self.groups))
        if fast is not None:
            return fast.sum_of_squares([g.grad for g in self.groups])
        total = None
        for group in self.groups:
            part = (group.grad @ group.grad).reshape(1)       # float32 dot
            total = part if total is None else total + part
        return total

    def gathered_norm(self) -> float:
        """The global L2 norm of the flat gradient buffers as they are now (filled by gather_grads, or by
        a data-parallel reduction), marking them as this step's gradients."""
        self._ensure_bound()
        total = 0.0
        for group in self.groups:
            total += float(group.grad @ group.grad)        # float32 dot; inf or nan propagate
        self._gathered = True
        return math.sqrt(total) if total >= 0 else float("nan")

    def update_values(self, lr: float | None = None, grad_scale: float = 1.0) -> np.ndarray:
        """[grad_scale, lr, step_size, inv_sqrt_bias2] of the next update (step_count + 1), for `apply`."""
        return adamw_values(self.lr if lr is None else float(lr), self.betas, self.step_count + 1, grad_scale)

    def step(self, lr: float | None = None, grad_scale: float = 1.0) -> None:
        """One AdamW update from the gradients (gathered now unless gather_grads() ran since zero_grad()).

        grad_scale multiplies the gradients first (what clipping passes: min(1, max_norm / norm)).
        """
        if not self._gathered:
            self.gather_grads()
        values = self.update_values(lr, grad_scale)
        self.step_count += 1
        self.apply(values)

    def apply(self, values) -> None:
        """The update of `values` = [grad_scale, lr, step_size, inv_sqrt_bias2] (update_values) to the
        gathered gradients; a grad_scale that is not finite skips it (nothing changes). `values` may be a
        device array (what a captured training step decides on the GPU); step_count is the caller's."""
        buffers = [(g.flat[g.lo:g.hi], g.grad[g.lo:g.hi], g.exp_avg, g.exp_avg_sq) for g in self.groups]
        fast = kernel("adamw", *(a for group in buffers for a in group))
        beta1, beta2 = self.betas
        if fast is not None:      # every group in one launch (kernels/adamw.cu), the same update
            fast.adamw_step(*(list(column) for column in zip(*buffers)), values, beta1, beta2, self.eps,
                            [g.weight_decay for g in self.groups])
            self._gathered = False
            return
        grad_scale, lr, step_size, inverse_bias2 = (float(v) for v in backend.to_numpy(values).reshape(4))
        if not math.isfinite(grad_scale):
            self._gathered = False
            return
        for group in self.groups:
            xp = backend.array_module(group.flat)
            dtype = group.flat.dtype.type
            decay = dtype(1.0 - lr * group.weight_decay)
            owned = group.hi - group.lo
            if fused_cpu.usable(group.flat, group.grad, group.exp_avg, group.exp_avg_sq):
                # the whole update in one compiled pass per thread's part (ops/fused_cpu.c)
                function = fused_cpu.library()["adamw", group.flat.dtype]
                parallel_items(lambda bounds, group=group, decay=decay: function(
                    fused_cpu.address(group.flat, group.lo + bounds[0]),
                    fused_cpu.address(group.grad, group.lo + bounds[0]), fused_cpu.address(group.exp_avg, bounds[0]),
                    fused_cpu.address(group.exp_avg_sq, bounds[0]), bounds[1] - bounds[0], grad_scale, beta1, beta2,
                    decay, step_size, inverse_bias2, self.eps), split(owned, fused_cpu.SPLIT))
                continue

            def update(bounds, group=group, xp=xp, dtype=dtype, decay=decay):
                tmp = xp.empty(min(CHUNK, bounds[1] - bounds[0]), dtype=group.flat.dtype)
                for start in range(bounds[0], bounds[1], CHUNK):     # offsets within the owned slice
                    end = min(start + CHUNK, bounds[1])
                    param, grad = group.flat[group.lo + start:group.lo + end], group.grad[group.lo + start:group.lo + end]
                    m, v = group.exp_avg[start:end], group.exp_avg_sq[start:end]
                    scratch = tmp[:end - start]
                    if grad_scale != 1.0:
                        grad *= dtype(grad_scale)
                    m *= dtype(beta1)                                     # m ← β₁ m + (1 − β₁) g
                    xp.multiply(grad, dtype(1.0 - beta1), out=scratch)
                    m += scratch
                    v *= dtype(beta2)                                     # v ← β₂ v + (1 − β₂) g²
                    xp.multiply(grad, grad, out=scratch)
                    scratch *= dtype(1.0 - beta2)
                    v += scratch
                    if group.weight_decay:
                        param *= decay                                    # decoupled weight decay
                    xp.sqrt(v, out=scratch)                               # √v / √(1 − β₂ᵗ) + eps
                    scratch *= dtype(inverse_bias2)
                    scratch += dtype(self.eps)
                    xp.divide(m, scratch, out=scratch)
                    scratch *= dtype(step_size)
                    param -= scratch

            parallel_items(update, split(owned, CHUNK) if xp is np else [(0, owned)])
        self._gathered = False

    # ---------------------------------------------------------------- state
    def state_dict(self) -> tuple:
        """(arrays, meta): arrays name -> NumPy moment (for safetensors), meta a JSON-able dict."""
        self._ensure_bound()
        arrays = {}
        for group in self.groups:
            m, v = self._full_moment(group, group.exp_avg), self._full_moment(group, group.exp_avg_sq)
            for name, p, start, end in zip(group.names, group.params, group.offsets, group.offsets[1:]):
                arrays[f"exp_avg.{name}"] = np.array(m[start:end].reshape(p.shape))
                arrays[f"exp_avg_sq.{name}"] = np.array(v[start:end].reshape(p.shape))
        meta = {"step": self.step_count, "lr": self.lr, "betas": list(self.betas), "eps": self.eps,
                "weight_decay": self.weight_decay}
        return arrays, meta

    def _full_moment(self, group, owned) -> np.ndarray:
        """A moment of the whole flat buffer on the host: this rank's slice, combined with the other
        ranks' slices through `combine_shards` (a sum over ranks of zero-padded copies) when sharded."""
        if self.shard is None:
            return backend.to_numpy(owned)
        if self.combine_shards is None:
            raise RuntimeError("the state of a sharded AdamW needs combine_shards (set by distributed.DataParallel)")
        full = np.zeros(group.offsets[-1], dtype=np.dtype(owned.dtype))
        full[group.lo:group.hi] = backend.to_numpy(owned)
        return self.combine_shards(full)

    def load_state_dict(self, arrays: dict, meta: dict) -> None:
        self._ensure_bound()
        expected = {}
        for group in self.groups:
            for name, p in zip(group.names, group.params):
                expected[f"exp_avg.{name}"] = p.shape
                expected[f"exp_avg_sq.{name}"] = p.shape
        missing = sorted(set(expected) - set(arrays))
        unexpected = sorted(set(arrays) - set(expected))
        mismatched = [f"{k}: {tuple(arrays[k].shape)} vs {expected[k]}" for k in expected
                      if k in arrays and tuple(arrays[k].shape) != tuple(expected[k])]
        if missing or unexpected or mismatched:
            raise ValueError("optimizer state does not match the model's parameters: "
                             f"missing {missing[:5]}{'…' if len(missing) > 5 else ''}, "
                             f"unexpected {unexpected[:5]}{'…' if len(unexpected) > 5 else ''}, "
                             f"mis-shaped {mismatched[:5]}")
        for group in self.groups:
            device = backend.device_of(group.flat)
            for name, start, end in zip(group.names, group.offsets, group.offsets[1:]):
                first, last = max(start, group.lo), min(end, group.hi)     # the part of this parameter owned here
                if first >= last:
                    continue
                for key, moment in (("exp_avg", group.exp_avg), ("exp_avg_sq", group.exp_avg_sq)):
                    values = np.ascontiguousarray(arrays[f"{key}.{name}"]).ravel()[first - start:last - start]
                    moment[first - group.lo:last - group.lo] = backend.to_device(values, device)
        self.step_count = int(meta["step"])
