"""Supervised fine-tuning: next-token loss on the assistant tokens of chat-formatted conversations.

    from tinygrad_llm.posttrain.sft import sft
    from tinygrad_llm.posttrain.loop import PostTrainConfig
    sft(PostTrainConfig(base="runs/default", builtin="plays", out_dir="runs/sft", max_steps=300))

Masking: a token is a target only where the chat template's assistant mask is 1 (each assistant turn's
content and its <|end|>); system and user turns, the role tokens and padding are context only.

Normalisation over the whole accumulated batch: the step's loss is
    (Σ over every micro-batch of Σ over its kept tokens of −log p) / (kept tokens in the whole step)
so each micro-batch's mean loss is weighted by its share of the step's kept tokens before its backward.
Averaging per-micro-batch means instead would weight the tokens of a micro-batch with short answers more
than those of one with long answers, and the step would not equal one big batch (a test checks that it does).
"""
from __future__ import annotations

import numpy as np

from .. import backend
from ..tensor import no_grad
from .data import builtin_split, collate, encode_conversations, read_conversations, sft_targets
from .loop import PostTrainConfig, Stage, run_stage


def micro_batch_loss(model, sequences, device="cpu"):
    """(mean loss Tensor over the kept tokens, kept token count) of one micro-batch of Sequences."""
    x, y, mask = collate(sequences)
    targets = sft_targets(y, mask)
    kept = int(mask.sum())
    _, loss = model(backend.to_device(x, device), backend.to_device(targets, device), return_logits=False)
    return loss, kept


def held_out_loss(model, sequences, batch_size=16, device="cpu", context=None) -> float:
    """Mean −log p per kept (assistant) token over `sequences`, without gradients."""
    import contextlib
    total_loss, total_kept = 0.0, 0
    with no_grad():
        for start in range(0, len(sequences), batch_size):
            with (context() if context else contextlib.nullcontext()):
                loss, kept = micro_batch_loss(model, sequences[start:start + batch_size], device)
            if kept:
                total_loss += float(loss.item()) * kept
                total_kept += kept
    return total_loss / max(total_kept, 1)


def load_sft_data(config, tokenizer, max_len):
    """(train sequences, held-out sequences, reports) for a conversations file or a built-in task."""
    reports = []
    if config.builtin:
        train, held = builtin_split(config.builtin, config.held_out_fraction, config.split_seed, config.per_task)
        train_seq, report = encode_conversations([e.messages() for e in train], tokenizer, max_len,
                                                 f"built-in {config.builtin} (train plays)")
        held_seq, held_report = encode_conversations([e.messages() for e in held], tokenizer, max_len,
                                                     f"built-in {config.builtin} (held-out plays)")
        return train_seq, held_seq, [report, held_report]
    conversations, read_report = read_conversations(config.data)
    reports.append(read_report)
    train_seq, report = encode_conversations(conversations, tokenizer, max_len, f"{config.data} (encoded)")
    reports.append(report)
    held_seq = []
    if config.val_data:
        held_conversations, held_read = read_conversations(config.val_data)
        held_seq, held_report = encode_conversations(held_conversations, tokenizer, max_len,
                                                     f"{config.val_data} (encoded)")
        reports += [held_read, held_report]
    return train_seq, held_seq, reports


class SFTStage(Stage):
    name = "sft"

    def load_data(self, config, tokenizer, max_len, log):
        return load_sft_data(config, tokenizer, max_len)

    def weight_total(self, run, indices):
        return float(sum(int(run.train[i].mask[1:].sum()) for i in indices))

    def micro_step(self, run, indices, total):
        with run.forward_context():
            loss, kept = micro_batch_loss(run.model, [run.train[i] for i in indices], run.device)
        if kept == 0:
            return {"loss_sum": 0.0, "tokens": 0.0}
        loss.backward(backend.to_device(np.asarray(kept / total, dtype=loss.dtype), run.device))
        return {"loss_sum": float(loss.item()) * kept, "tokens": float(kept)}

    def finish(self, sums):
        return {"loss": sums["loss_sum"] / max(sums["tokens"], 1.0), "tokens": sums["tokens"]}

    def evaluate(self, run):
        if not run.held_out:
            return {}
        sample = run.evaluation_items()
        return {"val_loss": held_out_loss(run.model, sample, run.config.batch_size, run.device, run.forward_context)}

    def better(self, metrics, best):
        return best is None or metrics["val_loss"] < best.get("val_loss", float("inf"))


def sft(config: PostTrainConfig, log=None) -> dict:
    """Supervised fine-tuning of `config.base` into `config.out_dir`; returns the summary."""
    config.stage = "sft"
    return run_stage(config, SFTStage(), log)
