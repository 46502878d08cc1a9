"""Pretraining: the configuration, the data sources, the training loop with evaluation and checkpoints.

    from tinygrad_llm.train import TrainConfig, train
    summary = train(TrainConfig(data="../shared/data/tinyshakespeare.txt", max_steps=2000, out_dir="runs/char"))

Data (`TrainConfig.data`):
  * a directory prepared by `tinygrad-llm prepare` (llm.c shards `*_train_*.bin` / `*_val_*.bin`, and
    `vocab.json` for the character tokenizer or a BPE file given as `tokenizer=`): batches come from
    `tinygrad_llm.data.DataLoader`, shuffled windows, a pure function of (seed, batch index);
  * a plain `.txt` file: character-level, the first 90 % for training and the rest for validation
    (nanoGPT's shakespeare_char split), windows at random offsets drawn from (seed, batch index);
  * empty: the built-in Shakespeare corpus, fetched and prepared once into the cache.

The loop, per optimizer step: `grad_accum` micro-batches, each loss scaled by 1/grad_accum before its
backward (so gradients are the mean over the micro-batches); the global gradient norm; a non-finite loss
or norm skips the update (logged; `max_bad_steps` in a row stop the run, keeping the last good
checkpoint); clipping to `grad_clip`; AdamW at the warmup + cosine learning rate. Every `eval_interval`
steps: validation loss, perplexity and bits per byte over `eval_iters` fixed batches, a checkpoint, and
best.json when the validation loss improved. Everything a resumed run needs is in the checkpoint, so
`resume=True` continues bit for bit (on the CPU) where the last checkpoint left off.

Logs: `<out_dir>/metrics.jsonl` (one JSON object per log line, evaluation, skipped step and event),
`<out_dir>/config.json` (the resolved configuration); a tqdm bar shows loss and tokens/s.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, fields

import numpy as np

from . import backend
from . import rng as global_rng
from .checkpoint import CheckpointError, load_checkpoint, read_state, resolve_checkpoint, save_checkpoint
from .data.shards import load_tokenizer
from .model import GPT, GPTConfig
from .optim import AdamW, lr_schedule
from .tensor import no_grad

MODEL_FIELDS = ("d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "rope_theta", "norm_eps",
                "tie_embeddings", "dropout")


@dataclass
class TrainConfig:
    # data
    data: str = ""                    # prepared shard directory, a .txt file (char-level), or "" (built-in corpus)
    tokenizer: str = ""               # tokenizer file for a shard directory without vocab.json
    val_fraction: float = 0.1         # for a .txt file: the tail share used for validation
    # model (vocab_size comes from the tokenizer, max_seq_len from seq_len)
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 0               # 0: as many as n_heads
    ffn_hidden: int = 384
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    dropout: float = 0.0
    # optimisation
    batch_size: int = 12
    seq_len: int = 64
    grad_accum: int = 1
    max_steps: int = 2000
    lr: float = 1e-3
    min_lr_ratio: float = 0.1         # cosine decays to lr · min_lr_ratio
    warmup_steps: int = 100
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0            # 0 disables clipping
    max_bad_steps: int = 5            # consecutive non-finite steps that stop the run
    # evaluation, logging, checkpoints
    eval_interval: int = 250
    eval_iters: int = 20
    log_interval: int = 10
    keep_last: int = 2
    sample_tokens: int = 0            # print a sample of this many tokens at the end (0: none)
    sample_prompt: str = "\n"
    # run
    seed: int = 1337
    out_dir: str = "runs/default"
    device: str = "cpu"
    dtype: str = "float32"            # parameter dtype
    precision: str = "fp32"           # GPU mixed-precision policy: fp32, tf32, bf16, fp16 (tinygrad_llm.precision)
    resume: bool = False
    progress: bool = True

    def __post_init__(self):
        # `--dtype fp32|tf32|bf16|fp16` names a mixed-precision policy (the GPU issue's spelling): the
        # parameters then stay float32 and the policy decides what the matmuls run in.
        if self.dtype in ("fp32", "tf32", "bf16", "fp16"):
            self.precision, self.dtype = self.dtype, "float32"

    def validate(self) -> None:
        problems = []
        positive = ("d_model", "n_layers", "n_heads", "ffn_hidden", "batch_size", "seq_len", "grad_accum",
                    "max_steps", "eval_interval", "eval_iters", "log_interval", "max_bad_steps")
        for name in positive:
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("warmup_steps", "weight_decay", "grad_clip", "n_kv_heads", "keep_last", "sample_tokens", "eps"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be non-negative, got {getattr(self, name)}")
        if not self.lr > 0 or not math.isfinite(self.lr):
            problems.append(f"lr must be a positive number, got {self.lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            problems.append(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                problems.append(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0.0 < self.val_fraction < 1.0:
            problems.append(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1), got {self.dropout}")
        if self.dtype not in ("float32", "float64", "float16", "bfloat16"):
            problems.append(f"dtype must be float32, float64, float16 or bfloat16 (parameters) or fp32, tf32, "
                            f"bf16 or fp16 (a precision policy), got {self.dtype!r}")
        try:
            backend.normalize_device(self.device)
        except ValueError as error:
            problems.append(str(error))
        if self.precision not in ("fp32", "tf32", "bf16", "fp16"):
            problems.append(f"precision must be fp32, tf32, bf16 or fp16, got {self.precision!r}")
        if problems:
            raise ValueError("invalid training configuration: " + "; ".join(problems))


CONFIG_FIELDS = {f.name: f for f in fields(TrainConfig)}


def config_from_dict(values: dict, base: TrainConfig | None = None) -> TrainConfig:
    """A TrainConfig from a flat dict (or TOML sections, flattened), with type checks and unknown-key errors."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):        # [model], [train], [data] ... sections
            flat.update(value)
        else:
            flat[key] = value
    unknown = sorted(set(flat) - set(CONFIG_FIELDS))
    if unknown:
        raise ValueError(f"unknown configuration keys: {', '.join(unknown)}")
    merged = asdict(base) if base is not None else {}
    for key, value in flat.items():
        kind = type(getattr(TrainConfig, key)) if hasattr(TrainConfig, key) else type(value)
        if kind is bool and not isinstance(value, bool):
            raise ValueError(f"{key} must be true or false, got {value!r}")
        if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"{key} must be an integer, got {value!r}")
        if kind is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{key} must be a number, got {value!r}")
            value = float(value)
        if kind is str and not isinstance(value, str):
            raise ValueError(f"{key} must be a string, got {value!r}")
        merged[key] = value
    config = TrainConfig(**merged)
    config.validate()
    return config


def load_toml(path: str) -> dict:
    """A TOML file as a dict. `path` may also name a bundled config: "shakespeare_char" or "small_bpe"."""
    try:
        import tomllib                          # Python 3.11+
    except ImportError:                         # pragma: no cover - older Pythons
        try:
            import tomli as tomllib
        except ImportError:
            raise RuntimeError("TOML config files need Python 3.11+ (tomllib) or `pip install tomli`") from None
    bundled = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", f"{path}.toml")
    if not os.path.exists(path) and os.path.sep not in path and os.path.isfile(bundled):
        path = bundled
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"{path} is not valid TOML: {error}") from None


# ---------------------------------------------------------------------------------------------- data
class RandomWindows:
    """Batches of B windows of T + 1 tokens at random offsets in one token array (nanoGPT's get_batch).

    Batch number `index` uses np.random.default_rng([seed, index]): a pure function of (seed, index),
    so resuming needs only the index. x, y: (B, T) int64, y = x shifted by one.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int):
        if len(tokens) < seq_len + 2:
            raise ValueError(f"{len(tokens)} tokens are too few for windows of {seq_len + 1}")
        self.tokens, self.batch_size, self.seq_len, self.seed = tokens, batch_size, seq_len, seed
        self.step = 0
        self._offsets = np.arange(seq_len + 1)

    def batch(self, index: int):
        starts = np.random.default_rng([self.seed, index]).integers(0, len(self.tokens) - self.seq_len - 1,
                                                                     self.batch_size)
        windows = self.tokens[starts[:, None] + self._offsets].astype(np.int64)  # (B, T + 1)
        return windows[:, :-1], windows[:, 1:]

    def state_dict(self) -> dict:
        return {"kind": "random_windows", "step": self.step, "seed": self.seed, "batch_size": self.batch_size,
                "seq_len": self.seq_len, "tokens": int(len(self.tokens))}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "batch_size", "seq_len", "tokens"):
            if state.get(key) != self.state_dict()[key]:
                raise ValueError(f"loader state has {key}={state.get(key)!r}, this data gives "
                                 f"{self.state_dict()[key]!r}: the data or configuration changed")
        self.step = int(state["step"])


class ShardBatches:
    """The data pipeline's DataLoader, addressed by batch index like RandomWindows."""

    def __init__(self, loader):
        self.loader = loader
        self.batch_size, self.seq_len = loader.batch_size, loader.seq_len

    @property
    def step(self):
        return self.loader.step

    @step.setter
    def step(self, value):
        self.loader.step = value

    def batch(self, index: int):
        return self.loader.batch(index)

    def state_dict(self) -> dict:
        return dict(self.loader.state_dict(), kind="shards")

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict({k: v for k, v in state.items() if k != "kind"})


@dataclass
class Data:
    train: object
    val: object
    tokenizer: object
    tokenizer_ref: dict               # how to find the tokenizer again: {"type": ..., "path": ...}
    bytes_per_token: np.ndarray       # (V,) UTF-8 bytes of each token id (0 for special tokens)


def token_byte_lengths(tokenizer) -> np.ndarray:
    """(V,) number of UTF-8 bytes each token id stands for; special tokens count 0 (for bits per byte)."""
    specials = set(getattr(tokenizer, "special_tokens", {}).values()) if isinstance(
        getattr(tokenizer, "special_tokens", None), dict) else set()
    lengths = np.zeros(tokenizer.vocab_size, dtype=np.int64)
    for i in range(tokenizer.vocab_size):
        if i in specials:
            continue
        if hasattr(tokenizer, "token_bytes"):
            try:
                lengths[i] = len(tokenizer.token_bytes(i))
                continue
            except ValueError:
                continue
        try:
            lengths[i] = len(tokenizer.decode([i]).encode("utf-8"))
        except (KeyError, ValueError):
            lengths[i] = 0
    return lengths


def builtin_corpus_dir() -> str:
    """Prepare the built-in Shakespeare corpus (character tokenizer) once; return the shard directory."""
    from .data.corpus import cache_dir
    out = os.path.join(cache_dir(), "prepared", "shakespeare_char")
    if os.path.isfile(os.path.join(out, "report.json")) and os.path.isfile(os.path.join(out, "vocab.json")):
        return out
    import argparse
    from .cli_prepare import add_prepare_parser, run_prepare
    parser = argparse.ArgumentParser(prog="tinygrad-llm")
    add_prepare_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["prepare", "--corpus", "shakespeare", "--out", out, "--tokenizer", "char"])
    print(f"preparing the built-in Shakespeare corpus into {out} (once)", flush=True)
    code = run_prepare(args)
    if code != 0:
        raise RuntimeError(f"preparing the built-in corpus failed (exit status {code}); see the messages above")
    return out


def build_data(config: TrainConfig) -> Data:
    path = config.data or builtin_corpus_dir()
    if os.path.isfile(path):
        from .data.shards import CharVocab
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError:
            raise ValueError(f"{path} is not UTF-8 text") from None
        if len(text) < 10 * (config.seq_len + 2):
            raise ValueError(f"{path} holds {len(text)} characters: too little text for seq_len {config.seq_len}")
        vocab = CharVocab.from_text(text, special_tokens=())
        tokens = np.asarray(vocab.encode_ordinary(text), dtype=np.uint16 if vocab.vocab_size < 65536 else np.uint32)
        split = int(len(tokens) * (1 - config.val_fraction))
        train = RandomWindows(tokens[:split], config.batch_size, config.seq_len, config.seed)
        val = RandomWindows(tokens[split:], config.batch_size, config.seq_len, config.seed + 1)
        ref = {"type": "char", "chars": "".join(vocab.chars), "source": os.path.abspath(path)}
        return Data(train, val, vocab, ref, token_byte_lengths(vocab))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"data not found: {path} (give a directory made by `tinygrad-llm prepare` or a .txt file)")
    from .data.loader import DataLoader, shard_paths
    tokenizer_path = config.tokenizer or os.path.join(path, "vocab.json")
    if not os.path.isfile(tokenizer_path):
        raise FileNotFoundError(f"{path} has no vocab.json; pass the BPE tokenizer file it was prepared with "
                                f"(--tokenizer FILE)")
    tokenizer = load_tokenizer(tokenizer_path)
    train = ShardBatches(DataLoader(shard_paths(path, "train"), config.batch_size, config.seq_len, seed=config.seed))
    try:
        val_paths = shard_paths(path, "val")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} has no validation shards (*_val_*.bin); prepare with --val-fraction > 0") from None
    val = ShardBatches(DataLoader(val_paths, config.batch_size, config.seq_len, seed=config.seed, shuffle=False))
    ref = {"type": "file", "path": os.path.abspath(tokenizer_path)}
    return Data(train, val, tokenizer, ref, token_byte_lengths(tokenizer))


def tokenizer_from_ref(ref: dict, checkpoint_dir: str | None = None):
    """Rebuild the tokenizer a checkpoint refers to (its run's copy when the original path moved)."""
    from .data.shards import CharVocab
    if ref.get("type") == "char":
        return CharVocab(list(ref["chars"]), special_tokens=tuple(ref.get("special_tokens", ())))
    if ref.get("type") == "file":
        candidates = [ref["path"]]
        if checkpoint_dir and ref.get("run_file"):   # <run>/checkpoints/step_N/ -> <run>/tokenizer.json
            candidates.insert(0, os.path.join(checkpoint_dir, os.pardir, os.pardir, ref["run_file"]))
        for path in candidates:
            if os.path.isfile(path):
                return load_tokenizer(path)
        raise FileNotFoundError(f"the checkpoint's tokenizer file is missing (looked at {', '.join(candidates)}); "
                                f"pass --tokenizer FILE")
    raise ValueError(f"unknown tokenizer reference {ref!r}")


# ---------------------------------------------------------------------------------------------- loop
def evaluate(model: GPT, batches, iters: int, bytes_per_token: np.ndarray | None = None, device="cpu") -> dict:
    """Mean loss over batches 0 … iters−1 of `batches` (fixed, so evaluations compare), perplexity, bits/byte."""
    was_training = model.training
    model.eval()
    total_loss, total_bytes, count = 0.0, 0, 0
    with no_grad():
        for index in range(iters):
            x, y = batches.batch(index)
            _, loss = model(backend.to_device(x, device), backend.to_device(y, device), return_logits=False)
            value = float(loss.item())
            total_loss += value * y.size
            count += y.size
            if bytes_per_token is not None:
                total_bytes += int(bytes_per_token[np.asarray(y)].sum())
    model.train(was_training)
    mean = total_loss / count
    result = {"val_loss": mean, "val_ppl": math.exp(min(mean, 700.0))}
    if bytes_per_token is not None and total_bytes:
        result["val_bpb"] = total_loss / math.log(2) / total_bytes
    return result


class MetricsLog:
    """Appends JSON lines to <run>/metrics.jsonl (flushed each line, so a crash loses nothing logged)."""

    def __init__(self, path: str):
        self.path = path
        self.file = open(path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def _dtype(name: str):
    if name == "bfloat16":
        raise ValueError("dtype bfloat16 needs the GPU backend's support; NumPy has no bfloat16")
    return np.dtype(name)


def model_config_for(config: TrainConfig, vocab_size: int) -> GPTConfig:
    return GPTConfig(vocab_size=vocab_size, max_seq_len=config.seq_len,
                     **{name: getattr(config, name) for name in MODEL_FIELDS})


def train(config: TrainConfig, log=None) -> dict:
    """Run (or resume) training; returns a summary dict (steps, losses, timings, checkpoint paths).

    The precision policy of `config.precision` holds for the run and is restored afterwards."""
    from . import precision
    previous = precision.get_policy().name
    try:
        return _train(config, log)
    finally:
        precision.set_policy(previous)


def _train(config: TrainConfig, log=None) -> dict:
    config.validate()
    log = log or (lambda message: print(message, flush=True))
    backend.tune_host_allocator()
    device = backend.normalize_device(config.device)
    dtype = _dtype(config.dtype)
    out_dir = config.out_dir
    checkpoint_dir = os.path.join(out_dir, "checkpoints")
    if not config.data:                       # record the resolved path: resume and eval use the same data
        config.data = builtin_corpus_dir()
    data = build_data(config)
    model_config = model_config_for(config, data.tokenizer.vocab_size)

    from . import precision
    precision.set_policy(config.precision)          # a no-op on the CPU
    scaler = precision.LossScaler(enabled=config.precision == "fp16" and device == "cuda")

    global_rng.manual_seed(config.seed)
    model = GPT(model_config)
    model.to(device=device, dtype=dtype)
    optimizer = AdamW(model.named_parameters(), lr=config.lr, betas=(config.beta1, config.beta2),
                      eps=config.eps, weight_decay=config.weight_decay)
    start_step, best_val = 0, float("inf")
    resumed_from = None
    if config.resume:
        try:
            directory = resolve_checkpoint(out_dir)
        except CheckpointError as error:
            raise CheckpointError(f"--resume: {error}") from None
        state = read_state(directory)
        saved = state.get("train_config", {})
        same = lambda k: (os.path.abspath(saved.get(k) or "") == os.path.abspath(config.data)) if k == "data" \
            else saved.get(k) == getattr(config, k)
        changed = [k for k in ("batch_size", "seq_len", "grad_accum", "seed", "data") if not same(k)]
        if changed:
            raise CheckpointError(f"--resume: the checkpoint in {directory} was trained with different "
                                  + ", ".join(f"{k} ({saved.get(k)!r} vs now {getattr(config, k)!r})" for k in changed))
        _, state = load_checkpoint(directory, model=model, optimizer=optimizer)
        global_rng.set_state(state["rng"])
        data.train.load_state_dict(state["loader"])
        start_step, best_val = int(state["step"]), float(state.get("best_val_loss", float("inf")))
        resumed_from = directory
        log(f"resumed from {directory} at step {start_step}")
    elif os.path.isdir(checkpoint_dir) and any(d.startswith("step_") for d in os.listdir(checkpoint_dir)):
        raise FileExistsError(f"{out_dir} already holds checkpoints; pass --resume to continue that run or "
                              f"choose another --out-dir")

    os.makedirs(out_dir, exist_ok=True)
    if data.tokenizer_ref.get("type") == "file" and not resumed_from:    # a copy travels with the run
        import shutil
        copy = os.path.join(out_dir, "tokenizer.json")
        if os.path.abspath(data.tokenizer_ref["path"]) != os.path.abspath(copy):
            shutil.copyfile(data.tokenizer_ref["path"], copy)
        data.tokenizer_ref = {"type": "file", "path": os.path.abspath(copy), "run_file": "tokenizer.json",
                              "source": data.tokenizer_ref["path"]}
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump({"train_config": asdict(config), "model_config": model_config.to_dict(),
                   "tokenizer": data.tokenizer_ref}, f, indent=1)
    metrics = MetricsLog(os.path.join(out_dir, "metrics.jsonl"))
    metrics.write({"event": "resume" if resumed_from else "start", "step": start_step, "time": time.time(),
                   "parameters": model.num_parameters(), "device": device, "dtype": config.dtype})
    log(f"model: {model.num_parameters():,} parameters, {model_config.n_layers} layers, d_model "
        f"{model_config.d_model}, vocab {model_config.vocab_size}; {config.max_steps} steps of "
        f"{config.batch_size}×{config.seq_len}×{config.grad_accum} tokens on {device}")

    def checkpoint_state(step):
        return {"model_config": model_config.to_dict(), "train_config": asdict(config),
                "rng": global_rng.get_state(), "loader": data.train.state_dict(),
                "tokenizer": data.tokenizer_ref, "best_val_loss": best_val}

    tokens_per_step = config.batch_size * config.seq_len * config.grad_accum
    bar = None
    if config.progress:
        from tqdm import tqdm
        bar = tqdm(total=config.max_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                   file=sys.stderr)
    bad_streak, stopped, last_eval = 0, None, {}
    step = start_step
    train_seconds, window_tokens, window_start = 0.0, 0, time.perf_counter()
    losses_window = []
    last_loss = float("nan")
    first_loss = None
    model.train()
    try:
        while step < config.max_steps:
            t0 = time.perf_counter()
            lr = lr_schedule(step, config.lr, config.warmup_steps, config.max_steps, config.min_lr_ratio)
            optimizer.zero_grad()
            step_loss = 0.0
            for micro in range(config.grad_accum):
                x, y = data.train.batch(step * config.grad_accum + micro)
                _, loss = model(backend.to_device(x, device), backend.to_device(y, device), return_logits=False)
                seed = scaler.scale / config.grad_accum                   # mean over micro-batches (× loss scale)
                loss.backward(backend.to_device(np.asarray(seed, dtype=loss.dtype), device))
                step_loss += float(loss.item()) / config.grad_accum
            data.train.step = (step + 1) * config.grad_accum
            grad_norm = optimizer.gather_grads() / scaler.scale
            if scaler.enabled and not scaler.update(math.isfinite(grad_norm)):   # fp16 overflow: rescale, retry
                optimizer.zero_grad()
                metrics.write({"event": "loss_scale_backoff", "step": step, "scale": scaler.scale})
                step += 1
                continue
            if not (math.isfinite(step_loss) and math.isfinite(grad_norm)):
                bad_streak += 1
                optimizer.zero_grad()
                record = {"event": "skipped", "step": step, "loss": repr(step_loss), "grad_norm": repr(grad_norm),
                          "streak": bad_streak}
                metrics.write(record)
                log(f"step {step}: non-finite loss {step_loss} or gradient norm {grad_norm}; update skipped "
                    f"({bad_streak} in a row)")
                step += 1
                if bad_streak >= config.max_bad_steps:
                    stopped = (f"stopped after {bad_streak} non-finite steps in a row at step {step}; the last good "
                               f"checkpoint is kept")
                    metrics.write({"event": "stopped", "step": step, "reason": "non-finite"})
                    log(stopped)
                    break
                continue
            bad_streak = 0
            scale = min(1.0, config.grad_clip / (grad_norm + 1e-6)) if config.grad_clip > 0 else 1.0
            optimizer.step(lr=lr, grad_scale=scale / scaler.scale)
            optimizer.zero_grad()
            step += 1
            elapsed = time.perf_counter() - t0
            train_seconds += elapsed
            window_tokens += tokens_per_step
            losses_window.append(step_loss)
            last_loss = step_loss
            first_loss = step_loss if first_loss is None else first_loss
            if bar is not None:
                bar.update(1)
            if step % config.log_interval == 0 or step == config.max_steps:
                now = time.perf_counter()
                tokens_per_second = window_tokens / max(now - window_start, 1e-9)
                record = {"step": step, "loss": float(np.mean(losses_window)), "lr": lr,
                          "grad_norm": grad_norm, "tokens_per_s": tokens_per_second, "train_s": train_seconds}
                metrics.write(record)
                if bar is not None:
                    bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{tokens_per_second:,.0f}", refresh=False)
                elif step % (config.log_interval * 10) == 0:
                    log(f"step {step}: loss {record['loss']:.4f}, {tokens_per_second:,.0f} tokens/s")
                losses_window, window_tokens, window_start = [], 0, time.perf_counter()
            if step % config.eval_interval == 0 or step == config.max_steps:
                last_eval = evaluate(model, data.val, config.eval_iters, data.bytes_per_token, device)
                improved = last_eval["val_loss"] < best_val
                best_val = min(best_val, last_eval["val_loss"])
                metrics.write(dict(last_eval, step=step, train_s=train_seconds, best=improved))
                save_checkpoint(checkpoint_dir, step, model, optimizer, checkpoint_state(step),
                                keep_last=config.keep_last, best=improved)
                message = (f"step {step}: val loss {last_eval['val_loss']:.4f}, ppl {last_eval['val_ppl']:.2f}"
                           + (f", {last_eval['val_bpb']:.3f} bits/byte" if "val_bpb" in last_eval else "")
                           + (" (best)" if improved else "") + f", {train_seconds:.1f} s training")
                if bar is not None:
                    bar.write(message)
                else:
                    log(message)
                window_start = time.perf_counter()      # evaluation time is not training time
    except KeyboardInterrupt:
        metrics.write({"event": "interrupted", "step": step})
        log(f"interrupted at step {step}; the last checkpoint is in {checkpoint_dir}")
        stopped = "interrupted"
    finally:
        if bar is not None:
            bar.close()
    summary = {"steps": step, "start_step": start_step, "last_loss": last_loss, "first_loss": first_loss,
               "train_seconds": train_seconds, "best_val_loss": best_val, "stopped": stopped,
               "out_dir": out_dir, **last_eval}
    metrics.write(dict(summary, event="end"))
    metrics.close()
    if config.sample_tokens and stopped is None:
        from .generate import generate_text
        model.eval()
        log("\n--- sample " + "-" * 60)
        generate_text(model, data.tokenizer, config.sample_prompt, max_new_tokens=config.sample_tokens,
                      temperature=0.8, top_k=40, seed=config.seed, stream=sys.stdout)
        log("\n" + "-" * 71)
    return summary
