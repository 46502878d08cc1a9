"""Direct preference optimisation (Rafailov et al., 2023) against a frozen reference, its log-probabilities cached.

    from tinygrad_llm.posttrain.dpo import dpo
    dpo(PostTrainConfig(stage="dpo", base="runs/sft", builtin="plays", out_dir="runs/dpo", beta=0.1))

For a prompt x with a chosen completion y_w and a rejected one y_l, with π the policy being trained and
π_ref the starting model (the SFT run):
    loss = −log σ(β · [(log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x))])
averaged over the pairs of a step (every micro-batch weighted by its share of the step's pairs).
log π(y|x) sums the log-probabilities of the completion's assistant tokens only (F.sequence_logprobs with
the completion mask); an assistant turn inside the prompt is context.

The reference is the starting model, which never changes: its log-probabilities of every training and
held-out pair are computed once, before the first step, written to `<out_dir>/reference_logps.safetensors`
(its sha256 recorded in every checkpoint, checked on resume), and the reference model is not kept.
Logged per step: loss, reward accuracy (β·(log π − log π_ref) higher for chosen than for rejected, ties
counted half), reward margin, chosen and rejected rewards.

Simplification: the reference pass batches pairs in index order and the training pass in shuffled
micro-batches, so at step 0 policy and reference log-probabilities agree to float32 rounding, not bit for
bit (right-padding to different lengths changes the matrix shapes); the loss starts at log 2 ± ~1e-6.
"""
from __future__ import annotations

import os

import numpy as np

from .. import backend
from .. import functional as F
from ..checkpoint import CheckpointError, read_safetensors, write_safetensors
from ..tensor import no_grad
from .data import builtin_split, collate, encode_preferences, read_preferences
from .loop import PostTrainConfig, Stage, run_stage

REFERENCE_FILE = "reference_logps.safetensors"


def micro_batch_logps(model, pairs, device="cpu"):
    """(2b,) Tensor: log π of each chosen completion of `pairs`, then of each rejected one."""
    sequences = [pair[0] for pair in pairs] + [pair[1] for pair in pairs]
    x, y, mask = collate(sequences)
    logits = model(backend.to_device(x, device))                          # (2b, T, V)
    return F.sequence_logprobs(logits, backend.to_device(y, device), backend.to_device(mask, device))


def pair_logps(model, pairs, batch_size=16, device="cpu", context=None):
    """(chosen, rejected) log-probabilities of every pair, NumPy (N,) arrays, without gradients."""
    import contextlib
    chosen, rejected = [], []
    with no_grad():
        for start in range(0, len(pairs), batch_size):
            part = pairs[start:start + batch_size]
            with (context() if context else contextlib.nullcontext()):
                logps = backend.to_numpy(micro_batch_logps(model, part, device).data)
            chosen.append(logps[:len(part)])
            rejected.append(logps[len(part):])
    empty = np.zeros(0, dtype=np.float32)
    return (np.concatenate(chosen) if chosen else empty), (np.concatenate(rejected) if rejected else empty)


def preference_metrics(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta) -> dict:
    """DPO loss, reward accuracy (ties ½), margin and rewards, and the policy's own log-prob accuracy."""
    chosen_reward = beta * (np.asarray(policy_chosen, np.float64) - reference_chosen)
    rejected_reward = beta * (np.asarray(policy_rejected, np.float64) - reference_rejected)
    margin = chosen_reward - rejected_reward
    loss = np.logaddexp(0.0, -margin)                                  # −log σ(margin), stable
    return {"loss": float(loss.mean()), "reward_accuracy": float(np.mean((margin > 0) + 0.5 * (margin == 0))),
            "reward_margin": float(margin.mean()), "chosen_reward": float(chosen_reward.mean()),
            "rejected_reward": float(rejected_reward.mean()),
            "logp_accuracy": float(np.mean(np.asarray(policy_chosen) > np.asarray(policy_rejected)))}


def chosen_nll(model, pairs, batch_size=16, device="cpu", context=None) -> float:
    """Mean −log p per completion token of the chosen completions: the SFT loss on the preferred answers."""
    chosen, _ = pair_logps(model, pairs, batch_size, device, context)
    tokens = sum(float(pair[0].mask[1:].sum()) for pair in pairs)
    return float(-chosen.astype(np.float64).sum() / max(tokens, 1.0))


def load_dpo_data(config, tokenizer, max_len):
    """(train pairs, held-out pairs, reports) for a preference file or a built-in task."""
    if config.builtin:
        train, held = builtin_split(config.builtin, config.held_out_fraction, config.split_seed, config.per_task)
        train_pairs, report = encode_preferences([e.preference() for e in train], tokenizer, max_len,
                                                 f"built-in {config.builtin} (train plays)")
        held_pairs, held_report = encode_preferences([e.preference() for e in held], tokenizer, max_len,
                                                     f"built-in {config.builtin} (held-out plays)")
        return train_pairs, held_pairs, [report, held_report]
    rows, read_report = read_preferences(config.data)
    train_pairs, report = encode_preferences(rows, tokenizer, max_len, f"{config.data} (encoded)")
    reports, held_pairs = [read_report, report], []
    if config.val_data:
        held_rows, held_read = read_preferences(config.val_data)
        held_pairs, held_report = encode_preferences(held_rows, tokenizer, max_len, f"{config.val_data} (encoded)")
        reports += [held_read, held_report]
    return train_pairs, held_pairs, reports


class DPOStage(Stage):
    name = "dpo"

    def load_data(self, config, tokenizer, max_len, log):
        return load_dpo_data(config, tokenizer, max_len)

    def prepare(self, run, cached):
        path = os.path.join(run.config.out_dir, REFERENCE_FILE)
        if cached is not None:                       # resuming: the cache of the first start, verified
            try:
                arrays = read_safetensors(path, cached["reference_sha256"])
            except KeyError:
                raise CheckpointError("the checkpoint records no reference log-probability cache") from None
            if len(arrays.get("train_chosen", ())) != len(run.train):
                raise CheckpointError(f"{path} holds {len(arrays.get('train_chosen', ()))} pairs, the data {len(run.train)}")
            self.reference = arrays
            return cached
        batch = run.config.batch_size
        was_training = run.model.training
        run.model.eval()
        train_chosen, train_rejected = pair_logps(run.model, run.train, batch, run.device, run.forward_context)
        held_chosen, held_rejected = pair_logps(run.model, run.evaluation_items(), batch, run.device,
                                                run.forward_context)
        run.model.train(was_training)
        self.reference = {"train_chosen": train_chosen, "train_rejected": train_rejected,
                          "held_chosen": held_chosen, "held_rejected": held_rejected}
        sha = write_safetensors(path, self.reference)
        return {"reference_file": REFERENCE_FILE, "reference_sha256": sha, "pairs": len(run.train)}

    def weight_total(self, run, indices):
        return float(len(indices))

    def micro_step(self, run, indices, total):
        beta = run.config.beta
        with run.forward_context():
            logps = micro_batch_logps(run.model, [run.train[i] for i in indices], run.device)
        count = len(indices)
        chosen, rejected = logps[:count], logps[count:]
        reference_chosen = self.reference["train_chosen"][indices].astype(logps.dtype)
        reference_rejected = self.reference["train_rejected"][indices].astype(logps.dtype)
        loss = F.dpo_loss(chosen, rejected, backend.to_device(reference_chosen, run.device),
                          backend.to_device(reference_rejected, run.device), beta=beta)
        loss.backward(backend.to_device(np.asarray(count / total, dtype=loss.dtype), run.device))
        values = backend.to_numpy(logps.data)
        stats = preference_metrics(values[:count], values[count:], reference_chosen, reference_rejected, beta)
        return {key: value * count for key, value in stats.items() if key != "loss"} | \
            {"loss": float(loss.item()) * count, "pairs": float(count)}

    def finish(self, sums):
        pairs = max(sums["pairs"], 1.0)
        return {key: value / pairs for key, value in sums.items() if key != "pairs"}

    def evaluate(self, run):
        held = run.evaluation_items()
        if not held:
            return {}
        chosen, rejected = pair_logps(run.model, held, run.config.batch_size, run.device, run.forward_context)
        stats = preference_metrics(chosen, rejected, self.reference["held_chosen"][:len(held)],
                                   self.reference["held_rejected"][:len(held)], run.config.beta)
        tokens = sum(float(pair[0].mask[1:].sum()) for pair in held)
        out = {f"val_{key}": value for key, value in stats.items()}
        out["val_chosen_nll"] = float(-chosen.astype(np.float64).sum() / max(tokens, 1.0))
        return out

    def better(self, metrics, best):
        return best is None or metrics["val_loss"] < best.get("val_loss", float("inf"))


def dpo(config: PostTrainConfig, log=None) -> dict:
    """DPO of `config.base` (usually an SFT run) into `config.out_dir`; returns the summary."""
    config.stage = "dpo"
    return run_stage(config, DPOStage(), log)
