"""Pretraining: the training loop, as step / evaluate / checkpoint / resume functions, and `train`.

    from tinygrad_llm.train import TrainConfig, train
    summary = train(TrainConfig(data="../shared/data/tinyshakespeare.txt", max_steps=2000, out_dir="runs/char"))

The configuration is `tinygrad_llm.train_config` (TrainConfig, config_from_dict, load_toml), the data
`tinygrad_llm.data.feed` (build_data and the batch sources); both are re-exported here.

The loop, per optimizer step (`train_step`; on one GPU `device_step.DeviceStep`, the same step with its
decisions on the device, replayed from a CUDA graph): `grad_accum` micro-batches, each loss scaled by
1/grad_accum before its backward (so gradients are the mean over the micro-batches); the global gradient
norm; a non-finite loss or norm skips the update (logged; `max_bad_steps` in a row stop the run);
clipping to `grad_clip`; AdamW at the warmup + cosine learning rate. Every `eval_interval` steps
(`evaluate`): validation loss, perplexity and bits per byte over `eval_iters` fixed batches, then a
checkpoint (`save_training_checkpoint`) and best.json when the validation loss improved. Everything a
resumed run needs is in the checkpoint (`resume_training`), so `resume=True` continues bit for bit (on
the CPU) where the last checkpoint left off, metrics.jsonl included.

Divergence: a loss above 2·ln(V) + 1 (far worse than a uniform guess), a training loss more than
`spike_sigma` standard deviations and 50 % above the mean of the last `spike_window` steps, a
non-finite validation loss, or `max_bad_steps` non-finite steps in a row stop the run at once, before
any further checkpoint: every checkpoint on disk was written before the trouble. The summary says
`diverged` and names the last checkpoint written before it.

Ctrl-C (SIGINT) finishes the current step, saves a checkpoint and stops (`stopped == "interrupted"`;
the CLI exits 130); a second Ctrl-C stops at once.

Logs: `<out_dir>/metrics.jsonl` (one JSON object per log line, evaluation, skipped step and event),
`<out_dir>/config.json` (the resolved configuration); a tqdm bar shows loss and tokens/s.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field

import numpy as np

from . import backend, threading_plan
from . import rng as global_rng
from .checkpoint import (CheckpointError, RUN_TOKENIZER_FILE, STATE_FILE, atomic_write_bytes, atomic_write_json,
                         check_memory, load_checkpoint, newest_verified_checkpoint, parameter_count, read_state,
                         remove_debris, require_field, resolve_checkpoint, save_checkpoint)
from .data.feed import (Data, RandomWindows, ShardBatches, build_data, builtin_corpus_dir,  # noqa: F401
                        file_sha256, token_byte_lengths)
from .device_step import DeviceStep, check_batch
from .distributed import DataParallel, RankSlice, SingleProcess, communicator, install_abort_on_error, tokens_in
from .model import GPT, GPTConfig
from .optim import AdamW, lr_schedule
from .tensor import no_grad
from .train_config import (CONFIG_FIELDS, MODEL_FIELDS, TrainConfig, TrainOptions, config_from_dict,  # noqa: F401
                           load_toml)

__all__ = [  # the loop, and the configuration and data names re-exported for callers of `train`
    "train", "train_step", "evaluate", "checkpoint_state", "save_training_checkpoint", "resume_training",
    "StepResult", "LoopState", "DivergenceMonitor", "MetricsLog", "training_memory_bytes",
    "TrainConfig", "TrainOptions", "CONFIG_FIELDS", "MODEL_FIELDS", "config_from_dict", "load_toml",
    "Data", "RandomWindows", "ShardBatches", "build_data", "builtin_corpus_dir", "token_byte_lengths",
]
RESUMED_FIELDS = ("batch_size", "seq_len", "grad_accum", "seed", "data")


# ---------------------------------------------------------------------------------------------- pieces
@dataclass
class StepResult:
    loss: float                       # mean loss over the micro-batches
    grad_norm: float                  # global gradient norm before clipping (inf/nan when non-finite)
    lr: float
    applied: bool                     # False: the update was skipped (non-finite loss or norm, fp16 backoff)
    backoff: bool = False             # skipped because fp16 overflowed and the loss scale was lowered


def train_step(model, optimizer, batches, step: int, config, device="cpu", scaler=None,
               parallel=None) -> StepResult:
    """One optimizer step: batches step·grad_accum … step·grad_accum + grad_accum − 1, AdamW at the
    scheduled learning rate. Skips the update when the loss or the gradient norm is not finite.

    Each micro-batch's backward is seeded with its share of the step's counted targets (1/grad_accum when
    none is ignored), so the gradient is the mean over every counted target. `parallel` (a
    distributed.DataParallel) makes this process one rank of a data-parallel job: `batches` gives its rows
    of each global batch, the shares are of the global count, gradients are summed over the ranks in
    buckets during the last backward, and the loss reported is the global batch's. Without it the step
    runs alone (the single-process communicator)."""
    if parallel is None:
        parallel = DataParallel(model, optimizer, SingleProcess())
    lr = lr_schedule(step, config.lr, config.warmup_steps, config.max_steps, config.min_lr_ratio)
    loss_scale = scaler.scale if scaler is not None else 1.0
    optimizer.zero_grad()
    step_loss = 0.0
    micro_batches = [batches.batch(step * config.grad_accum + m) for m in range(config.grad_accum)]
    shares = parallel.backward_seeds([tokens_in(y) for _, y in micro_batches])
    losses = []
    for micro, (x, y) in enumerate(micro_batches):
        _, loss = model(backend.to_device(x, device), backend.to_device(y, device), return_logits=False)
        parallel.backward(loss, shares[micro] * loss_scale, last=micro == config.grad_accum - 1)
        losses.append(loss)
    for share, loss in zip(shares, losses):   # read once every micro-batch is queued: on the GPU one wait a step
        step_loss += share * float(loss.item())
    step_loss = float(parallel.comm.sum_host(np.array([step_loss]))[0])
    batches.step = (step + 1) * config.grad_accum
    grad_norm = parallel.reduce() / loss_scale
    if scaler is not None and scaler.enabled and not scaler.update(math.isfinite(grad_norm)):
        optimizer.zero_grad()                               # fp16 overflow: the scale was lowered, step skipped
        return StepResult(step_loss, grad_norm, lr, False, backoff=True)
    if not (math.isfinite(step_loss) and math.isfinite(grad_norm)):
        optimizer.zero_grad()
        return StepResult(step_loss, grad_norm, lr, False)
    clip = min(1.0, config.grad_clip / (grad_norm + 1e-6)) if config.grad_clip > 0 else 1.0
    parallel.step(lr=lr, grad_scale=clip / loss_scale)
    optimizer.zero_grad()
    return StepResult(step_loss, grad_norm, lr, True)


def evaluate(model: GPT, batches, iters: int, bytes_per_token: np.ndarray | None = None, device="cpu") -> dict:
    """Mean loss over batches 0 … iters−1 of `batches` (fixed, so evaluations compare), perplexity, bits/byte."""
    was_training = model.training
    model.eval()
    total_loss, total_bytes, count = 0.0, 0, 0
    on_host = device == "cpu"
    with no_grad():
        for index in range(iters):
            x, y = batches.batch(index)
            if not on_host:   # checked here, the ops skip their device-side checks (a host sync and kernels each)
                check_batch(np.asarray(x), np.asarray(y), model.config.vocab_size)
            with backend.inputs_checked_on_host() if not on_host else contextlib.nullcontext():
                _, loss = model(backend.to_device(x, device), backend.to_device(y, device), return_logits=False)
            value = float(loss.item())
            total_loss += value * y.size
            count += y.size
            if bytes_per_token is not None:
                total_bytes += int(bytes_per_token[np.asarray(y)].sum())
    model.train(was_training)
    mean = total_loss / count
    result = {"val_loss": mean, "val_ppl": math.exp(min(mean, 700.0)) if math.isfinite(mean) else float("nan")}
    if bytes_per_token is not None and total_bytes:
        result["val_bpb"] = total_loss / math.log(2) / total_bytes
    return result


class DivergenceMonitor:
    """Says when a loss means the run diverged (see the module docstring); its window is saved in checkpoints."""

    def __init__(self, vocab_size: int, sigma: float = 3.0, window: int = 50, recent=()):
        self.ceiling = 2.0 * math.log(max(vocab_size, 2)) + 1.0
        self.sigma = sigma
        self.recent = deque((float(v) for v in recent), maxlen=window)

    def check(self, loss: float, what: str = "loss") -> str | None:
        """A reason when `loss` means divergence, else None (and the loss joins the window)."""
        if not math.isfinite(loss):
            return f"non-finite {what} {loss}"
        if self.sigma > 0 and loss > self.ceiling:
            return f"{what} {loss:.4g} is above {self.ceiling:.4g} (2·ln(V) + 1, far worse than a uniform guess)"
        if what == "loss":
            if self.sigma > 0 and len(self.recent) >= min(10, self.recent.maxlen):
                mean, std = float(np.mean(self.recent)), float(np.std(self.recent))
                if loss > mean + self.sigma * std and loss > 1.5 * mean:
                    return (f"loss {loss:.4g} spiked {(loss - mean) / max(std, 1e-12):.1f} standard deviations over "
                            f"the mean {mean:.4g} of the last {len(self.recent)} steps")
            self.recent.append(loss)
        return None


class MetricsLog:
    """Appends JSON lines to <run>/metrics.jsonl (flushed each line, so a crash loses nothing logged)."""

    KEPT_EVENTS = ("start", "resume", "interrupted", "diverged", "end")

    def __init__(self, path: str, keep_through_step: int | None = None):
        self.path = path
        if keep_through_step is not None and os.path.isfile(path):
            self._truncate(keep_through_step)
        self.file = open(path, "a", encoding="utf-8")

    def _truncate(self, step: int) -> None:
        """Drop the step records after `step` (a resumed run writes them again), keeping run events."""
        kept = []
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue                                  # a line cut by a crash
                if not isinstance(record, dict):
                    continue
                later = isinstance(record.get("step"), int) and record["step"] > step
                if not later or record.get("event") in self.KEPT_EVENTS:
                    kept.append(json.dumps(record) + "\n")
        atomic_write_bytes(self.path, "".join(kept).encode("utf-8"))

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


@dataclass
class LoopState:
    """What the loop carries from step to step and saves in every checkpoint."""
    step: int = 0
    best_val: float = float("inf")
    log_window: list = field(default_factory=list)     # losses since the last log record
    recent_losses: list = field(default_factory=list)  # the divergence monitor's window


def checkpoint_state(config, model_config: GPTConfig, data: Data, loop: LoopState) -> dict:
    """The JSON-able state a checkpoint holds besides the arrays: enough to resume exactly."""
    return {"model_config": model_config.to_dict(), "train_config": asdict(config),
            "rng": global_rng.get_state(), "loader": data.train.state_dict(), "tokenizer": data.tokenizer_ref,
            "best_val_loss": loop.best_val, "log_window": list(loop.log_window),
            "recent_losses": list(loop.recent_losses)}


def save_training_checkpoint(out_dir: str, model, optimizer, state: dict, step: int, keep_last: int = 2,
                             best: bool = False) -> str:
    """Write <out_dir>/checkpoints/step_N atomically (see tinygrad_llm.checkpoint); returns its directory."""
    return save_checkpoint(os.path.join(out_dir, "checkpoints"), step, model, optimizer, state,
                           keep_last=keep_last, best=best)


def resume_training(out_dir: str, model, optimizer, batches, config=None) -> tuple[str | None, LoopState]:
    """Load the newest good checkpoint of the run in out_dir into model, optimizer, the global RNG and
    `batches`; returns (its directory, the loop state). (None, LoopState()) when the run holds no complete
    checkpoint yet (a crash inside the first save): the run then starts from step 0, as it would have.
    `config` (a TrainConfig): refuse a checkpoint trained with other batch shapes, seed or data."""
    checkpoint_dir = os.path.join(out_dir, "checkpoints")
    remove_debris(checkpoint_dir)
    try:
        directory = resolve_checkpoint(out_dir)
    except CheckpointError:
        if not os.path.isdir(out_dir):
            raise CheckpointError(f"--resume: {out_dir} does not exist") from None
        if newest_verified_checkpoint(checkpoint_dir) is None and not _has_pointer(checkpoint_dir):
            return None, LoopState()
        raise
    where = os.path.join(directory, STATE_FILE)
    state = read_state(directory)
    saved = require_field(state, "train_config", dict, where)
    for name, kind in (("rng", dict), ("loader", dict), ("tokenizer", dict)):
        require_field(state, name, kind, where)
    if config is not None:
        def same(key):
            if key == "data":
                return os.path.abspath(saved.get(key) or "") == os.path.abspath(config.data)
            return saved.get(key) == getattr(config, key)
        changed = [k for k in RESUMED_FIELDS if not same(k)]
        if changed:
            raise CheckpointError(f"--resume: the checkpoint in {directory} was trained with different "
                                  + ", ".join(f"{k} ({saved.get(k)!r} vs now {getattr(config, k)!r})" for k in changed))
    _, state = load_checkpoint(directory, model=model, optimizer=optimizer)
    try:
        global_rng.set_state(state["rng"])
    except (TypeError, ValueError, KeyError) as error:
        raise CheckpointError(f"{where}: field 'rng' is not a generator state: {error}") from None
    try:
        batches.load_state_dict(state["loader"])
    except ValueError as error:
        raise CheckpointError(f"{where}: field 'loader': {error}") from None
    best = state.get("best_val_loss", float("inf"))
    window, recent = state.get("log_window", []), state.get("recent_losses", [])
    for name, value in (("log_window", window), ("recent_losses", recent)):
        if not isinstance(value, list) or not all(isinstance(v, (int, float)) for v in value):
            raise CheckpointError(f"{where}: field {name!r} must be a list of numbers")
    if not isinstance(best, (int, float)):
        raise CheckpointError(f"{where}: field 'best_val_loss' must be a number, got {best!r:.40}")
    return directory, LoopState(int(state["step"]), float(best), list(window), list(recent))


def _has_pointer(checkpoint_dir: str) -> bool:
    return any(os.path.isfile(os.path.join(checkpoint_dir, f"{which}.json")) for which in ("latest", "best"))


def training_memory_bytes(model_config: GPTConfig, batch_size: int, itemsize: int = 4) -> float:
    """A lower bound on what training needs: parameters, gradients and two AdamW moments, the logits,
    and per layer the activations and attention probabilities kept for backward."""
    params = parameter_count(model_config.to_dict())
    tokens = batch_size * model_config.max_seq_len
    per_layer = tokens * (10 * model_config.d_model + 3 * model_config.ffn_hidden) \
        + batch_size * model_config.n_heads * model_config.max_seq_len ** 2
    return itemsize * (4 * params + 3 * tokens * model_config.vocab_size + model_config.n_layers * per_layer)


def _dtype(name: str):
    if name == "bfloat16":
        raise ValueError("dtype bfloat16 needs the GPU backend's support; NumPy has no bfloat16")
    return np.dtype(name)


def model_config_for(config, vocab_size: int) -> GPTConfig:
    return config.model_config(vocab_size)


def _resolve_paths(config) -> None:
    """Absolute data and tokenizer paths, so eval, export and resume work from any directory."""
    if not config.data:                       # record the resolved path: resume and eval use the same data
        config.data = builtin_corpus_dir(progress=config.progress)
    config.data = os.path.abspath(config.data)
    if config.tokenizer:
        config.tokenizer = os.path.abspath(config.tokenizer)


def _adopt_tokenizer(out_dir: str, data: Data, resumed_state: dict | None) -> None:
    """A tokenizer file travels with the run: copied to <out_dir>/tokenizer.json and checksummed there."""
    if data.tokenizer_ref.get("type") != "file":
        return
    if resumed_state is not None:             # the run's recorded reference stays what it was
        data.tokenizer_ref = resumed_state["tokenizer"]
        return
    copy = os.path.join(out_dir, RUN_TOKENIZER_FILE)
    source = data.tokenizer_ref["path"]
    if os.path.abspath(source) != os.path.abspath(copy):
        tmp = copy + ".tmp"
        shutil.copyfile(source, tmp)
        os.replace(tmp, copy)
    digest = file_sha256(copy)
    if digest != data.tokenizer_ref.get("sha256"):
        raise RuntimeError(f"the tokenizer file {source} changed while it was copied into {out_dir}")
    data.tokenizer_ref = {"type": "file", "run_file": RUN_TOKENIZER_FILE, "sha256": digest,
                          "path": os.path.abspath(copy), "source": source}


class _InterruptFlag:
    """Turns the first SIGINT into a flag the loop checks between steps; a second one interrupts at once."""

    def __init__(self):
        self.raised = False
        self.previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        self.raised = True
        signal.signal(signal.SIGINT, self.previous)

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


class _NoMetrics:
    """The metrics log of a rank that writes none (all but rank 0 of a data-parallel job)."""

    def write(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


class _StateOf:
    """An optimizer stand-in whose state_dict() was already gathered (what rank 0 saves)."""

    def __init__(self, state):
        self.state = state

    def state_dict(self):
        return self.state


# ---------------------------------------------------------------------------------------------- train
def train(config, log=None) -> dict:
    """Run (or resume) training; returns a summary dict (steps, losses, timings, `stopped`, `diverged`).

    The precision policy of `config.precision` holds for the run and is restored afterwards."""
    from . import precision
    previous = precision.get_policy().name
    try:
        return _train(config, log)
    finally:
        precision.set_policy(previous)


def _train(config, log=None) -> dict:
    config.validate()
    log = log or (lambda message: print(message, flush=True))
    backend.tune_host_allocator()
    device = backend.normalize_device(config.device)
    dtype = _dtype(config.dtype)
    out_dir = config.out_dir
    checkpoint_dir = os.path.join(out_dir, "checkpoints")
    _resolve_paths(config)
    data = build_data(config)
    model_config = config.model_config(data.tokenizer.vocab_size)
    needed = training_memory_bytes(model_config, config.batch_size, dtype.itemsize) if device == "cpu" else \
        4 * parameter_count(model_config.to_dict()) * dtype.itemsize        # on a GPU the host holds copies only
    check_memory(needed, f"training this model (vocab {model_config.vocab_size}, d_model {model_config.d_model}, "
                 f"seq_len {config.seq_len}, batch {config.batch_size})")

    from . import precision
    precision.set_policy(config.precision)          # a no-op on the CPU
    if device == "cuda" and backend.kernels_enabled():  # the step's kernels compile while the run sets up
        from . import gpu
        gpu.prefetch_training(precision.get_policy().compute or np.dtype(dtype).name, model_config.head_dim)
    scaler = precision.LossScaler(enabled=config.precision == "fp16" and device == "cuda",
                                  max_scale=2.0 ** 15)     # the float16 loss seeds backward with the scale

    comm = communicator(device)                    # one process unless started by mpiexec
    lead = comm.rank == 0                           # the rank that logs and writes files
    if comm.size > 1:
        install_abort_on_error(comm)
        if not lead:
            log = lambda message: None              # noqa: E731
    threads = guard = None
    if device == "cpu":                             # who gets the cores: the row pool, BLAS, or one thread
        threads = threading_plan.choose(
            config.threads_plan, threading_plan.model_shape(model_config, config.batch_size, config.seq_len, dtype),
            threading_plan.model_step_factory(model_config, config.batch_size, config.seq_len, dtype)
            if comm.size == 1 else None)
        log(threading_plan.describe(threads))
        guard = threading_plan.Guard.for_choice(threads, log)   # off `auto`'s plan while it is slower than one thread
    global_rng.manual_seed(config.seed)
    model = GPT(model_config)
    model.to(device=device, dtype=dtype)
    optimizer = AdamW(model.named_parameters(), lr=config.lr, betas=(config.beta1, config.beta2),
                      eps=config.eps, weight_decay=config.weight_decay,
                      shard=(comm.rank, comm.size) if config.zero and comm.size > 1 else None)
    parallel = DataParallel(model, optimizer, comm)  # with one process: the plain step, no communication
    if comm.size > 1:
        parallel.check_same_everywhere({k: v for k, v in asdict(config).items() if k != "progress"})
        data.train = RankSlice(data.train, comm.rank, comm.size)
        log(f"data parallel: {comm.size} ranks over {comm.name}, {config.batch_size // comm.size} rows of each "
            f"batch a rank, {parallel.bytes_per_step / 2**20:.1f} MiB all-reduced a step in "
            f"{len(parallel.buckets)} buckets" + (", AdamW state sharded (ZeRO-1)" if config.zero else ""))
    device_step, path = None, None
    if device == "cuda":                            # say once which attention path the run takes
        from . import gpu
        attention_dtype = precision.get_policy().compute or np.dtype(dtype).name
        path = gpu.attention_kernel_for(model_config.head_dim, attention_dtype)
        log(f"attention: {path}" if path else f"attention: no kernel for head dim {model_config.head_dim}, "
            f"using the batched-GEMM path")
    if device == "cuda" and comm.size == 1 and not scaler.enabled and backend.kernels_enabled():
        # the batched-GEMM attention multiplies through CuPy's cuBLAS binding, which a capture refuses
        device_step = DeviceStep(model, optimizer, config, model_config.vocab_size,
                                 not_captured=None if path else f"no attention kernel for head dim "
                                 f"{model_config.head_dim}: its batched-GEMM path cannot be captured")
    resumed_from, resumed_state = None, None
    if config.resume:
        resumed_from, loop = resume_training(out_dir, model, optimizer, data.train, config)
        if resumed_from:
            resumed_state = read_state(resumed_from)
            log(f"resumed from {resumed_from} at step {loop.step}")
        else:
            log(f"{out_dir} holds no complete checkpoint yet; starting from step 0")
    else:
        if lead:
            remove_debris(checkpoint_dir)
        if newest_verified_checkpoint(checkpoint_dir) or _has_pointer(checkpoint_dir):
            raise FileExistsError(f"{out_dir} already holds checkpoints; pass --resume to continue that run or "
                                  f"choose another --out-dir")
        loop = LoopState()
    start_step = loop.step

    if lead:
        os.makedirs(out_dir, exist_ok=True)
        _adopt_tokenizer(out_dir, data, resumed_state)
        atomic_write_json(os.path.join(out_dir, "config.json"),
                          {"train_config": asdict(config), "model_config": model_config.to_dict(),
                           "tokenizer": data.tokenizer_ref})
    metrics = (MetricsLog(os.path.join(out_dir, "metrics.jsonl"), keep_through_step=start_step) if lead
               else _NoMetrics())
    metrics.write({"event": "resume" if resumed_from else "start", "step": start_step, "time": time.time(),
                   "parameters": model.num_parameters(), "device": device, "dtype": config.dtype,
                   **({"threads": threads} if threads else {})})
    log(f"model: {model.num_parameters():,} parameters, {model_config.n_layers} layers, d_model "
        f"{model_config.d_model}, vocab {model_config.vocab_size}; {config.max_steps} steps of "
        f"{config.batch_size}×{config.seq_len}×{config.grad_accum} tokens on {device}")

    monitor = DivergenceMonitor(model_config.vocab_size, config.spike_sigma, config.spike_window, loop.recent_losses)
    last_saved = resumed_from

    def save(step, best=False):
        nonlocal last_saved
        loop.recent_losses = list(monitor.recent)
        whole = _StateOf(optimizer.state_dict())      # every rank takes part: ZeRO slices are combined
        if lead:
            last_saved = save_training_checkpoint(out_dir, model, whole,
                                                  checkpoint_state(config, model_config, data, loop), step,
                                                  keep_last=config.keep_last, best=best)
        last_saved = comm.broadcast_object(last_saved)
        return last_saved

    tokens_per_step = config.batch_size * config.seq_len * config.grad_accum
    bar = None
    if config.progress and lead:
        from tqdm import tqdm
        bar = tqdm(total=config.max_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                   file=sys.stderr)
    say = bar.write if bar is not None else log
    bad_streak, stopped, diverged, last_eval = 0, None, None, {}
    train_seconds, window_tokens, window_start = 0.0, 0, time.perf_counter()
    last_loss, first_loss = float("nan"), None
    model.train()
    try:
        with _InterruptFlag() as interrupt:
            while loop.step < config.max_steps:
                t0 = time.perf_counter()
                if device_step is not None:
                    result = StepResult(*device_step(data.train, loop.step))
                    if device_step.calls == 2:
                        log(device_step.describe())
                else:
                    result = train_step(model, optimizer, data.train, loop.step, config, device, scaler, parallel)
                    if guard is not None:         # the plan was timed on one micro-batch's step
                        guard.step((time.perf_counter() - t0) / config.grad_accum)
                interrupt.raised = bool(comm.sum_host(np.array([float(interrupt.raised)]))[0])   # ranks stop together
                step = loop.step = loop.step + 1
                if result.backoff:
                    metrics.write({"event": "loss_scale_backoff", "step": step - 1, "scale": scaler.scale})
                    continue
                if not result.applied:
                    bad_streak += 1
                    metrics.write({"event": "skipped", "step": step - 1, "loss": repr(result.loss),
                                   "grad_norm": repr(result.grad_norm), "streak": bad_streak})
                    log(f"step {step - 1}: non-finite loss {result.loss} or gradient norm {result.grad_norm}; "
                        f"update skipped ({bad_streak} in a row)")
                    if bad_streak >= config.max_bad_steps:
                        diverged = f"{bad_streak} non-finite steps in a row at step {step}"
                        break
                    if interrupt.raised:         # no checkpoint while the loss is not finite
                        stopped = "interrupted"
                        metrics.write({"event": "interrupted", "step": step, "checkpoint": last_saved})
                        break
                    continue
                bad_streak = 0
                reason = monitor.check(result.loss)
                if reason:
                    diverged = f"{reason} at step {step}"
                    break
                train_seconds += time.perf_counter() - t0
                window_tokens += tokens_per_step
                loop.log_window.append(result.loss)
                last_loss = result.loss
                first_loss = result.loss if first_loss is None else first_loss
                if bar is not None:
                    bar.update(1)
                if step % config.log_interval == 0 or step == config.max_steps:
                    now = time.perf_counter()
                    tokens_per_second = window_tokens / max(now - window_start, 1e-9)
                    record = {"step": step, "loss": float(np.mean(loop.log_window)), "lr": result.lr,
                              "grad_norm": result.grad_norm, "tokens_per_s": tokens_per_second,
                              "train_s": train_seconds}
                    metrics.write(record)
                    if bar is not None:
                        bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{tokens_per_second:,.0f}", refresh=False)
                    elif step % (config.log_interval * 10) == 0:
                        log(f"step {step}: loss {record['loss']:.4f}, {tokens_per_second:,.0f} tokens/s")
                    loop.log_window, window_tokens, window_start = [], 0, time.perf_counter()
                if step % config.eval_interval == 0 or step == config.max_steps:
                    last_eval = evaluate(model, data.val, config.eval_iters, data.bytes_per_token, device)
                    reason = monitor.check(last_eval["val_loss"], "validation loss")
                    if reason:
                        diverged = f"{reason} at step {step}"
                        break
                    improved = last_eval["val_loss"] < loop.best_val
                    loop.best_val = min(loop.best_val, last_eval["val_loss"])
                    metrics.write(dict(last_eval, step=step, train_s=train_seconds, best=improved))
                    save(step, best=improved)
                    say(f"step {step}: val loss {last_eval['val_loss']:.4f}, ppl {last_eval['val_ppl']:.2f}"
                        + (f", {last_eval['val_bpb']:.3f} bits/byte" if "val_bpb" in last_eval else "")
                        + (" (best)" if improved else "") + f", {train_seconds:.1f} s training")
                    window_start = time.perf_counter()      # evaluation time is not training time
                elif interrupt.raised:
                    save(step)
                if interrupt.raised:
                    stopped = "interrupted"
                    metrics.write({"event": "interrupted", "step": step, "checkpoint": last_saved})
                    log(f"interrupted at step {step}; saved {last_saved}")
                    break
    except KeyboardInterrupt:
        metrics.write({"event": "interrupted", "step": loop.step})
        log(f"interrupted at step {loop.step}; the last checkpoint is {last_saved or 'none (none was written)'}")
        stopped = "interrupted"
    finally:
        if bar is not None:
            bar.close()
    if diverged:
        stopped = (f"diverged: {diverged}; the last checkpoint written before the trouble is "
                   + (last_saved or "none (no checkpoint was written)"))
        metrics.write({"event": "diverged", "step": loop.step, "reason": diverged, "checkpoint": last_saved})
        log(stopped)
    summary = {"steps": loop.step, "start_step": start_step, "last_loss": last_loss, "first_loss": first_loss,
               "train_seconds": train_seconds, "best_val_loss": loop.best_val, "stopped": stopped,
               "diverged": bool(diverged), "last_checkpoint": last_saved, "out_dir": out_dir, **last_eval}
    metrics.write(dict(summary, event="end"))
    metrics.close()
    if config.sample_tokens and stopped is None and lead:
        from .generate import generate_text
        model.eval()
        log("\n--- sample " + "-" * 60)
        generate_text(model, data.tokenizer, config.sample_prompt, max_new_tokens=config.sample_tokens,
                      temperature=0.8, top_k=40, seed=config.seed, stream=sys.stdout)
        log("\n" + "-" * 71)
    return summary
