"""The post-training loop shared by SFT and DPO: start from a run, adapt it, train, checkpoint, resume.

    start   load the run's checkpoint and tokenizer; add the chat tokens when missing (the embedding and an
            untied head grow, new rows the mean of the old); optionally add LoRA adapters (the base frozen)
    data    a JSONL file or a built-in task, read and encoded by the stage; every skipped record counted
    step    one batch of `batch_size · grad_accum` examples (batch i is a pure function of (seed, i)),
            `grad_accum` micro-batches whose losses the stage weights so that the step's gradient is the
            mean over the whole batch; global-norm clipping; AdamW at warmup + cosine; a non-finite loss
            or gradient skips the update (`max_bad_steps` in a row stop the run)
    save    every `eval_interval` steps and at the end: held-out metrics, then a checkpoint whose weights
            are the model's (with LoRA: the adapters merged in), so `sample`, `chat`, `export` and the next
            stage read it like any run. Exact resume: the optimizer moments (with LoRA: and the adapters),
            the step (the data position), the package RNG, and the stage's own state (DPO's reference
            log-probabilities, in a file whose sha256 the checkpoint records)

The training loop's pieces come from tinygrad_llm.checkpoint, tinygrad_llm.optim and, for the metrics
log only, tinygrad_llm.train; that import is here and nowhere else in the post-training package.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, fields

import numpy as np

from .. import backend
from .. import rng as global_rng
from ..checkpoint import (OPTIMIZER_FILE, CheckpointError, load_checkpoint, read_safetensors, read_state,
                          resolve_checkpoint, save_checkpoint, tokenizer_from_state)
from ..optim import AdamW, lr_schedule
from ..train import MetricsLog                              # the only import from train.py in posttrain/
from .chat import grow_vocabulary, with_chat_tokens
from .data import BUILTIN_NAMES, batch_indices
from .lora import LoRA, AdapterOptimizerState, MergedView, parse_targets


@dataclass
class PostTrainConfig:
    stage: str = "sft"                # "sft" or "dpo"
    base: str = ""                    # the run to start from (a run, checkpoints/ or step directory)
    out_dir: str = ""
    data: str = ""                    # JSONL: conversations (sft) or preferences (dpo)
    builtin: str = ""                 # or a built-in task: "plays", "plays:who_says", ...
    val_data: str = ""                # held-out JSONL for a --data run (the built-in task has its own)
    held_out_fraction: float = 0.2    # built-in task: share of plays held out
    per_task: int = 40                # built-in task: questions of each kind per play
    split_seed: int = 0               # built-in task: which plays are held out and which questions are asked
    max_seq_len: int = 0              # context of the fine-tuned model (0: the starting run's; RoPE has no table)
    batch_size: int = 16
    grad_accum: int = 1
    max_steps: int = 200
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    max_bad_steps: int = 5
    beta: float = 0.1                 # DPO's β
    lora_rank: int = 0                # 0: full fine-tuning
    lora_alpha: float = 0.0           # 0: alpha = rank (scale 1)
    lora_targets: str = "all"         # q,k,v,o,gate,up,down or all
    eval_interval: int = 50
    eval_examples: int = 64           # held-out examples scored at each evaluation
    log_interval: int = 10
    keep_last: int = 2
    seed: int = 1337
    device: str = "cpu"
    resume: bool = False
    progress: bool = True

    def validate(self) -> None:
        problems = []
        if self.stage not in ("sft", "dpo"):
            problems.append(f"stage must be sft or dpo, got {self.stage!r}")
        if not self.base:
            problems.append("a starting run is required")
        if not self.out_dir:
            problems.append("--out-dir is required")
        if bool(self.data) == bool(self.builtin):
            problems.append("give exactly one of --data FILE and --builtin NAME")
        for name in ("batch_size", "grad_accum", "max_steps", "eval_interval", "eval_examples", "log_interval",
                     "max_bad_steps", "per_task"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("warmup_steps", "weight_decay", "grad_clip", "lora_rank", "lora_alpha", "keep_last", "eps",
                     "max_seq_len"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be non-negative, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            problems.append(f"lr must be a positive number, got {self.lr}")
        if not self.beta > 0:
            problems.append(f"beta must be positive, got {self.beta}")
        if not 0.0 < self.held_out_fraction < 1.0:
            problems.append(f"held_out_fraction must be in (0, 1), got {self.held_out_fraction}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            problems.append(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        try:
            parse_targets(self.lora_targets)
            backend.normalize_device(self.device)
        except ValueError as error:
            problems.append(str(error))
        if problems:
            raise ValueError("invalid post-training configuration: " + "; ".join(problems))


CONFIG_FIELDS = {f.name: f for f in fields(PostTrainConfig)}
RESUME_KEYS = ("stage", "data", "builtin", "val_data", "held_out_fraction", "per_task", "split_seed", "batch_size",
               "grad_accum", "max_seq_len",
               "seed", "beta", "lora_rank", "lora_alpha", "lora_targets")


def check_data_source(config) -> None:
    """A known built-in task name and an existing --data file (one-line errors for the CLI)."""
    if config.builtin and config.builtin not in BUILTIN_NAMES:
        raise ValueError(f"unknown built-in task {config.builtin!r}; known: {', '.join(BUILTIN_NAMES)}")
    if config.data and not os.path.isfile(config.data):
        raise FileNotFoundError(f"--data {config.data}: no such file")


class Stage:
    """What differs between SFT and DPO. The loop calls, in order: load_data, prepare (once the model is
    ready; `cached` is the stage state of a resumed checkpoint, or None), then per step weight_total and
    micro_step for each micro-batch, and evaluate at each evaluation."""

    name = "stage"

    def load_data(self, config, tokenizer, max_len, log):
        """Encode the training and held-out data; returns (train items, held-out items, reports)."""
        raise NotImplementedError

    def prepare(self, run, cached):
        """Work done once before the first step (DPO: the reference log-probabilities); returns a JSON-able
        dict stored in each checkpoint."""
        return {}

    def weight_total(self, run, indices) -> float:
        """The normaliser of one whole step (SFT: its kept tokens; DPO: its pairs)."""
        raise NotImplementedError

    def micro_step(self, run, indices, total) -> dict:
        """Forward and backward of one micro-batch, its gradient weighted by its share of `total`; returns
        statistics summed over the micro-batch (merged by summing, then `finish`)."""
        raise NotImplementedError

    def finish(self, sums) -> dict:
        raise NotImplementedError

    def evaluate(self, run) -> dict:
        return {}

    def better(self, metrics, best) -> bool:
        return False


@dataclass
class Run:
    """Everything a stage needs during training."""
    config: PostTrainConfig
    model: object
    tokenizer: object
    lora: object
    train: list
    held_out: list
    device: str

    def forward_context(self):
        import contextlib
        return self.lora.applied() if self.lora is not None else contextlib.nullcontext()

    def evaluation_items(self) -> list:
        """The held-out items scored at each evaluation: `eval_examples` of them spread evenly over the list
        (the built-in task lists them play by play and kind by kind), the same ones every time."""
        count = min(self.config.eval_examples, len(self.held_out))
        if count == 0:
            return []
        positions = np.unique(np.linspace(0, len(self.held_out) - 1, count).round().astype(int))
        return [self.held_out[int(i)] for i in positions]


def tokenizer_reference(tokenizer, out_dir):
    """How a checkpoint finds this tokenizer again: inline for a character vocabulary, else a file in the run."""
    if hasattr(tokenizer, "chars"):
        return {"type": "char", "chars": "".join(tokenizer.chars), "special_tokens": list(tokenizer.special_tokens)}
    import hashlib
    path = os.path.join(out_dir, "tokenizer.json")
    tokenizer.save(path)
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    return {"type": "file", "path": os.path.abspath(path), "run_file": "tokenizer.json", "sha256": digest}


def load_start(path, device="cpu", max_seq_len=0):
    """(model, tokenizer with chat tokens, rows added, checkpoint state) of the run a stage starts from;
    max_seq_len > 0 sets the model's context (RoPE positions need no table to grow)."""
    try:
        directory = resolve_checkpoint(path)
    except CheckpointError as error:
        raise CheckpointError(f"starting run: {error}") from None
    model, state = load_checkpoint(directory)
    tokenizer = with_chat_tokens(tokenizer_from_state(state, state["directory"]))
    added = grow_vocabulary(model, tokenizer.vocab_size)
    if max_seq_len:
        model.config.max_seq_len = int(max_seq_len)
    model.to(device=device)
    return model, tokenizer, added, state


def added_rows(start_state, model) -> int:
    """Vocabulary rows the model has beyond the run it started from (chat tokens added to a base run)."""
    return model.config.vocab_size - int(start_state["model_config"]["vocab_size"])


def run_stage(config: PostTrainConfig, stage: Stage, log=None) -> dict:
    """Train one post-training stage as configured; returns a summary dict."""
    config.validate()
    log = log or (lambda message: print(message, flush=True))
    device = backend.normalize_device(config.device)
    out_dir, checkpoint_dir = config.out_dir, os.path.join(config.out_dir, "checkpoints")
    existing = os.path.isdir(checkpoint_dir) and any(d.startswith("step_") for d in os.listdir(checkpoint_dir))
    if existing and not config.resume:
        raise FileExistsError(f"{out_dir} already holds checkpoints; pass --resume to continue that run or "
                              f"choose another --out-dir")
    if config.resume and not existing:
        raise CheckpointError(f"--resume: {out_dir} holds no checkpoint to resume")

    check_data_source(config)                        # before loading a model: a wrong name fails at once
    model, tokenizer, added, base_state = load_start(config.base, device, config.max_seq_len)
    if added:
        log(f"added {added} chat token(s) to the vocabulary; embedding grown to {model.config.vocab_size} rows")
    train_items, held_out, reports = stage.load_data(config, tokenizer, model.config.max_seq_len + 1, log)
    for report in reports:
        log(report.format())
    if not train_items:
        too_long = sum(r.skipped.get("longer_than_context", 0) for r in reports)
        hint = f"; {too_long} were longer than the context of {model.config.max_seq_len}: raise it with " \
               f"--max-seq-len" if too_long else ""
        raise ValueError(f"no usable training examples (see the counts above){hint}")

    global_rng.manual_seed(config.seed)
    lora = None
    if config.lora_rank:
        lora = LoRA(model, config.lora_rank, config.lora_alpha or None, parse_targets(config.lora_targets),
                    seed=config.seed, new_rows=added_rows(base_state, model))
        named = list(lora.named_parameters())
    else:
        named = list(model.named_parameters())
    optimizer = AdamW(named, lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps,
                      weight_decay=config.weight_decay)
    run = Run(config, model, tokenizer, lora, train_items, held_out, device)

    base_files = base_state.get("files", {})
    base_info = {"checkpoint": os.path.abspath(base_state["directory"]), "step": base_state.get("step"),
                 "model_sha256": base_files.get("model.safetensors")}
    start_step, best, cached = 0, None, None
    if config.resume:
        directory = resolve_checkpoint(out_dir)
        state = read_state(directory)
        saved = state.get("posttrain_config", {})
        changed = [k for k in RESUME_KEYS if saved.get(k) != getattr(config, k)]
        if changed:
            raise CheckpointError("--resume: the checkpoint in " + directory + " was made with different "
                                  + ", ".join(f"{k} ({saved.get(k)!r} vs now {getattr(config, k)!r})" for k in changed))
        if state.get("base", {}).get("model_sha256") != base_info["model_sha256"]:
            raise CheckpointError(f"--resume: the starting run {config.base} changed since {directory} was saved")
        if lora is None:
            load_checkpoint(directory, model=model, optimizer=optimizer)
        else:
            files = state.get("files", {})
            arrays = read_safetensors(os.path.join(directory, OPTIMIZER_FILE), files.get(OPTIMIZER_FILE))
            try:
                AdapterOptimizerState(optimizer, lora).load_state_dict(arrays, state["optimizer"])
            except (ValueError, KeyError) as error:
                raise CheckpointError(f"checkpoint {directory}: {error}") from None
        global_rng.set_state(state["rng"])
        start_step, best, cached = int(state["step"]), state.get("best"), state.get("stage_state")
        log(f"resumed from {directory} at step {start_step}")

    os.makedirs(out_dir, exist_ok=True)
    tokenizer_ref = tokenizer_reference(tokenizer, out_dir)
    stage_state = stage.prepare(run, cached)
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump({"posttrain_config": asdict(config), "model_config": model.config.to_dict(),
                   "tokenizer": tokenizer_ref, "base": base_info,
                   "data": [r.as_dict() for r in reports]}, f, indent=1)
    metrics = MetricsLog(os.path.join(out_dir, "metrics.jsonl"), keep_through_step=start_step if config.resume else None)
    trained = lora.num_parameters() if lora else model.num_parameters()
    moment_bytes = sum(g.exp_avg.nbytes + g.exp_avg_sq.nbytes for g in optimizer.groups)
    metrics.write({"event": "resume" if config.resume else "start", "stage": stage.name, "step": start_step,
                   "time": time.time(), "trained_parameters": trained, "optimizer_state_bytes": moment_bytes,
                   "lora": lora.describe() if lora else None})
    log(f"{stage.name}: {len(train_items)} training examples, {len(held_out)} held out; training {trained:,} "
        f"parameters" + (f" (LoRA rank {lora.rank} on {len(lora.entries)} projections)" if lora else "")
        + f", AdamW state {moment_bytes / 2**20:.2f} MiB; {config.max_steps} steps of "
        f"{config.batch_size}×{config.grad_accum} examples on {device}")

    def checkpoint(step, improved):
        state = {"model_config": model.config.to_dict(), "posttrain_config": asdict(config),
                 "train_config": base_state.get("train_config", {}), "stage": stage.name,
                 "rng": global_rng.get_state(), "tokenizer": tokenizer_ref, "base": base_info, "best": best,
                 "stage_state": stage_state, "lora": lora.describe() if lora else None}
        save_checkpoint(checkpoint_dir, step, MergedView(lora) if lora else model,
                        AdapterOptimizerState(optimizer, lora) if lora else optimizer, state,
                        keep_last=config.keep_last, best=improved)

    bar = None
    if config.progress:
        from tqdm import tqdm
        bar = tqdm(total=config.max_steps, initial=start_step, desc=stage.name, unit="step", dynamic_ncols=True,
                   file=sys.stderr)
    examples_per_step = config.batch_size * config.grad_accum
    step, bad_streak, stopped, last_eval, window = start_step, 0, None, {}, []
    train_seconds = 0.0
    model.train()
    try:
        while step < config.max_steps:
            t0 = time.perf_counter()
            lr = lr_schedule(step, config.lr, config.warmup_steps, config.max_steps, config.min_lr_ratio)
            optimizer.zero_grad()
            indices = batch_indices(len(train_items), examples_per_step, step, config.seed)
            groups = [indices[i:i + config.batch_size] for i in range(0, len(indices), config.batch_size)]
            total = stage.weight_total(run, indices)
            sums = {}
            for group in groups:
                for key, value in stage.micro_step(run, group, total).items():
                    sums[key] = sums.get(key, 0.0) + value
            record = stage.finish(sums)
            grad_norm = optimizer.gather_grads()
            if not (math.isfinite(record["loss"]) and math.isfinite(grad_norm)):
                bad_streak += 1
                optimizer.zero_grad()
                metrics.write({"event": "skipped", "step": step, "loss": repr(record["loss"]),
                               "grad_norm": repr(grad_norm), "streak": bad_streak})
                log(f"step {step}: non-finite loss or gradient norm; update skipped ({bad_streak} in a row)")
                step += 1
                if bad_streak >= config.max_bad_steps:
                    stopped = f"stopped after {bad_streak} non-finite steps in a row at step {step}"
                    log(stopped)
                    break
                continue
            bad_streak = 0
            scale = min(1.0, config.grad_clip / (grad_norm + 1e-6)) if config.grad_clip > 0 else 1.0
            optimizer.step(lr=lr, grad_scale=scale)
            optimizer.zero_grad()
            step += 1
            train_seconds += time.perf_counter() - t0
            window.append(record)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
            if step % config.log_interval == 0 or step == config.max_steps:
                mean = {key: float(np.mean([r[key] for r in window])) for key in window[0]}
                metrics.write(dict(mean, step=step, lr=lr, grad_norm=grad_norm, train_s=train_seconds))
                window = []
            if step % config.eval_interval == 0 or step == config.max_steps:
                model.eval()
                last_eval = stage.evaluate(run)
                model.train()
                improved = bool(last_eval) and stage.better(last_eval, best)
                if improved:
                    best = last_eval
                metrics.write(dict(last_eval, step=step, train_s=train_seconds, best=improved))
                checkpoint(step, improved)
                message = f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in last_eval.items()) + \
                    f" ({train_seconds:.1f} s training)"
                (bar.write if bar is not None else log)(message)
    except KeyboardInterrupt:
        metrics.write({"event": "interrupted", "step": step})
        log(f"interrupted at step {step}; the last checkpoint is in {checkpoint_dir}")
        stopped = "interrupted"
    finally:
        if bar is not None:
            bar.close()
    summary = {"stage": stage.name, "steps": step, "start_step": start_step, "train_seconds": train_seconds,
               "stopped": stopped, "out_dir": out_dir, "trained_parameters": trained,
               "optimizer_state_bytes": moment_bytes, **last_eval}
    metrics.write(dict(summary, event="end"))
    metrics.close()
    return summary

