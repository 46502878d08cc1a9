"""The GPU training step with every decision on the device, replayed from a CUDA graph.

`train.train_step` reads the loss and the gradient norm on the host in the middle of a step and decides
there whether to apply the update and how far to clip it; the embedding and the loss also read the ids
and targets back to check them. On the GPU each read makes the host wait for the GPU, and a small model's
step is then as slow as the Python that issues its kernels. `DeviceStep` takes the same optimizer step
with no host read inside it:

- the micro-batches are checked on the host (ids and targets in the vocabulary, as the ops would check
  them) and copied into fixed device buffers;
- dropout draws its seeds through `rng.device_seeds(base)`: the kernels add base[0], rewritten from the
  global generator before every step, to offsets that are the same every step;
- the loss, Σ g², the clipping factor and the skip decision are device arrays. AdamW reads
  values = [scale, lr, step_size, inv_sqrt_bias2] from device memory (`AdamW.apply`): the host writes
  the last three (it knows the step), the step writes scale = min(1, clip / (‖g‖ + 1e-6)), or NaN when
  the loss or the norm is not finite, which makes the kernel skip the update as `train_step` would;
- one host read at the end gives [loss, ‖g‖, applied].

Since nothing in it waits for the host, the step is captured once as a CUDA graph (`backend.CudaGraph`,
on the second call, once every kernel is compiled and every buffer exists) and replayed from then on: the
host's work per step is the batch, three small copies and one launch. A replay is valid while the
parameters and optimizer buffers stay where they were, the batch shapes and the micro-batches' shares of
the targets stay the same and the model is in training mode; anything else captures again. A capture
that fails (an op that reads a device value) is reported once and the step runs uncaptured from then on,
with the same results. `TINYGRAD_LLM_CUDA_GRAPHS=0` never captures.

Memory: the graph keeps one step's activations in a pool of its own between replays (the uncaptured
step frees them), so the first capture returns CuPy's cached blocks to the device before it runs.

Used by the training loop for a single-process GPU run whose kernels are on, without the fp16 loss
scaler; other runs take `train_step`.
"""
from __future__ import annotations

import os

import numpy as np

from . import backend, rng
from .gpu import kernel
from .optim import lr_schedule

IGNORE_INDEX = -100


def graphs_enabled() -> bool:
    """Whether steps may be captured (TINYGRAD_LLM_CUDA_GRAPHS=0 turns it off)."""
    return os.environ.get("TINYGRAD_LLM_CUDA_GRAPHS", "1") != "0"


def check_batch(x: np.ndarray, y: np.ndarray, vocab: int, ignore_index: int = IGNORE_INDEX) -> None:
    """The embedding's and the loss's checks on a host batch, with their messages."""
    for what, array in (("ids", x), ("targets", y)):
        if array.dtype.kind not in "iu":
            raise TypeError(f"{'embedding' if what == 'ids' else 'cross_entropy'}: {what} must be integers, "
                            f"got dtype {array.dtype}")
    if x.size and (int(x.min()) < 0 or int(x.max()) >= vocab):
        raise IndexError(f"embedding: ids must lie in [0, {vocab}), got values in [{int(x.min())}, {int(x.max())}]")
    bad = (y != ignore_index) & ((y < 0) | (y >= vocab))
    if bad.any():
        raise IndexError(f"cross_entropy: target {int(y[bad][0])} is outside the vocabulary [0, {vocab}) "
                         f"and is not ignore_index ({ignore_index})")


class DeviceStep:
    """`step(batches, step)` -> (loss, grad_norm, lr, applied): one optimizer step of `model` on the GPU,
    its batches `batches.batch(step · grad_accum + m)`, with the schedule, clipping and skipping of
    `train_step`.

    graphs: capture the step as a CUDA graph from the second call on (default: unless
    TINYGRAD_LLM_CUDA_GRAPHS=0). `captured` says whether the last step was a replay, `not_captured`
    why capturing was given up (None while it was not); passing a reason there runs every step
    uncaptured from the start (the loop does for a model whose attention has no kernel).
    """

    def __init__(self, model, optimizer, config, vocab_size: int, graphs: bool | None = None,
                 not_captured: str | None = None):
        self.model, self.optimizer, self.config, self.vocab = model, optimizer, config, int(vocab_size)
        self.xp = xp = backend.array_module(optimizer.groups[0].flat)   # NumPy too: the same step, for tests
        self.graphs = (graphs_enabled() if graphs is None else bool(graphs)) and xp is not np
        self.seed = xp.zeros(1, dtype=np.uint64)           # the step's dropout seed base
        self.values = xp.zeros(4, dtype=np.float32)        # AdamW's [scale, lr, step_size, inv_sqrt_bias2]
        self.loss_sum = xp.zeros(1, dtype=np.float32)      # the step's loss over its micro-batches
        self.report = xp.zeros(3, dtype=np.float32)        # [loss, ‖g‖, applied], the step's one host read
        self.inputs: list = []                             # (ids, targets) device buffers per micro-batch
        self.shares: tuple = ()
        self.graph = None
        self.graph_key = None
        self.calls = 0
        self.captured = False
        self.not_captured = not_captured            # a reason given here: never try to capture

    # ------------------------------------------------------------------ the step
    def __call__(self, batches, step: int):
        config, optimizer = self.config, self.optimizer
        lr = lr_schedule(step, config.lr, config.warmup_steps, config.max_steps, config.min_lr_ratio)
        micro = [batches.batch(step * config.grad_accum + m) for m in range(config.grad_accum)]
        counts = []
        for x, y in micro:
            x, y = np.asarray(x), np.asarray(y)
            check_batch(x, y, self.vocab)
            counts.append(int((y != IGNORE_INDEX).sum()))
        if sum(counts) <= 0:
            raise ValueError("the batch has no target tokens")
        self.shares = tuple(c / sum(counts) for c in counts)
        self._fill_inputs(micro)
        self._set(self.seed, np.array([rng.next_seed()], dtype=np.uint64))
        self._set(self.values[1:], optimizer.update_values(lr)[1:].astype(np.float32))
        report = self._run_or_replay()
        loss, grad_norm, applied = (float(v) for v in backend.to_numpy(report))   # the step's one host sync
        batches.step = (step + 1) * config.grad_accum
        self.calls += 1
        if applied:
            optimizer.step_count += 1
        return loss, grad_norm, lr, bool(applied)

    def _set(self, buffer, host) -> None:
        """Copy a host array into a buffer of the step (queued on the current stream on the GPU)."""
        if self.xp is np:
            buffer[...] = host
        else:
            buffer.set(host)

    def _fill_inputs(self, micro) -> None:
        xp = self.xp
        micro = [(np.ascontiguousarray(x), np.ascontiguousarray(y)) for x, y in micro]
        layout = [(x.shape, x.dtype, y.shape, y.dtype) for x, y in micro]
        if [(a.shape, a.dtype, b.shape, b.dtype) for a, b in self.inputs] != layout:
            self.inputs = [(xp.empty(x.shape, dtype=x.dtype), xp.empty(y.shape, dtype=y.dtype)) for x, y in micro]
        for (x_buffer, y_buffer), (x, y) in zip(self.inputs, micro):
            self._set(x_buffer, x)
            self._set(y_buffer, y)

    def _key(self) -> tuple:
        """What a captured graph depends on besides the contents of its buffers."""
        optimizer = self.optimizer
        pointers = tuple(p.data.data.ptr for p in optimizer.params)
        buffers = tuple(a.data.ptr for g in optimizer.groups for a in (g.flat, g.grad, g.exp_avg, g.exp_avg_sq))
        inputs = tuple(a.data.ptr for pair in self.inputs for a in pair)
        return pointers, buffers, inputs, self.shares, self.model.training

    def _run_or_replay(self):
        self.captured = False
        if not self.graphs or self.not_captured is not None or self.calls == 0:
            return self._step()                  # the first call compiles every kernel and binds every buffer
        self.optimizer._ensure_bound()
        key = self._key()
        if self.graph is None or key != self.graph_key:
            self.graph = None
            cp = backend.cupy_module()
            cp.get_default_memory_pool().free_all_blocks()   # the uncaptured step's activations, cached
            try:
                self.graph = backend.CudaGraph(self._step)
            except Exception as error:            # an op that reads a device value: run uncaptured
                self.not_captured = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
                self.optimizer.zero_grad()
                cp.cuda.get_current_stream().synchronize()
                return self._step()
            self.graph_key = key
        self.captured = True
        return self.graph.replay()

    def _step(self):
        """The step's device work (run directly, or captured): returns [loss, ‖g‖, applied] (float32)."""
        xp = self.xp
        model, optimizer, clip = self.model, self.optimizer, float(self.config.grad_clip)
        optimizer.zero_grad()
        fast = kernel("adamw", self.values)
        with rng.device_seeds(self.seed), backend.inputs_checked_on_host():     # check_batch did, in __call__
            for m, ((x, y), share) in enumerate(zip(self.inputs, self.shares)):
                _, loss = model(x, y, return_logits=False)
                seed = None if share == 1.0 else xp.full(loss.shape, share, dtype=loss.dtype)
                loss.backward(seed)
                part = loss.data.reshape(1)                                   # () -> (1,)
                if fast is not None:
                    fast.accumulate_loss(self.loss_sum, part if part.dtype == np.float32 else part.astype(np.float32),
                                         share, first=m == 0)
                else:
                    part = part.astype(np.float32) * np.float32(share)
                    self.loss_sum[...] = part if m == 0 else self.loss_sum + part
        optimizer.collect_grads()
        square_sum = optimizer.gathered_square_sum()
        if fast is not None:       # one launch instead of a kernel for each element-wise step below
            fast.step_decision(self.loss_sum, square_sum, clip, self.values, self.report)
        else:
            norm = xp.sqrt(square_sum.astype(np.float32, copy=False))
            finite = xp.isfinite(self.loss_sum) & xp.isfinite(norm)
            scale = xp.minimum(np.float32(1.0), np.float32(clip) / (norm + np.float32(1e-6))) if clip > 0 else \
                xp.ones_like(norm)
            self.values[0:1] = xp.where(finite, scale, np.float32("nan"))
            self.report[...] = xp.concatenate([self.loss_sum, norm, finite.astype(np.float32)])
        optimizer.apply(self.values)
        optimizer.zero_grad()
        return self.report

    def describe(self) -> str:
        """One line for the run's log."""
        if self.not_captured:
            return f"training step: on the device, not captured ({self.not_captured})"
        if not self.graphs:
            return ("training step: on the device, not captured (TINYGRAD_LLM_CUDA_GRAPHS=0)" if self.xp is not np
                    else "training step: on NumPy arrays, uncaptured")
        return "training step: on the device, replayed from a CUDA graph captured at its second step"
