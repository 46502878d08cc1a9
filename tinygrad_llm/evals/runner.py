"""Score a multiple-choice task with a model: encode, batch, score, summarise into one results dict.

    results = evaluate_task(model, tokenizer, task, batch_size=32)
    results["metrics"]["acc"]     # {"value": 0.41, "stderr": 0.02, "stderr_analytic": 0.02}
    results["items"][0]           # {"id", "gold", "lls", "pred", "acc", ..., "truncated"}

Items that cannot be scored with this model are skipped and counted in results["skipped"] (together with
the rows the task file reader skipped): a character the tokenizer cannot encode, an empty context with no
end-of-text token, a choice that encodes to no token, a continuation longer than the model's window.
Items whose context lost tokens to the window are scored and counted in results["truncated"].
"""
from __future__ import annotations

import time
from collections import Counter

from .metrics import BOOTSTRAP_ITERS, item_predictions, summarize
from .scoring import encode_pair, score_groups


def _eot_id(tokenizer):
    special = getattr(tokenizer, "special_tokens", None)
    if isinstance(special, dict) and "<|endoftext|>" in special:
        return special["<|endoftext|>"]
    return getattr(tokenizer, "eot_id", None)


def encode_items(tokenizer, items, window: int):
    """(groups, kept items, skipped Counter): the token ids of every item that this model can score."""
    eot = _eot_id(tokenizer)
    groups, kept, skipped = [], [], Counter()
    for item in items:
        try:
            pairs = [encode_pair(tokenizer, item.context, item.target_delimiter + choice, eot)
                     for choice in item.choices]
        except KeyError:
            skipped["unencodable_text"] += 1
            continue
        except ValueError:
            skipped["empty_context_without_eot"] += 1
            continue
        continuations = [continuation for _, continuation in pairs]
        if any(not continuation for continuation in continuations):
            skipped["choice_encodes_to_nothing"] += 1
            continue
        if any(len(continuation) > window for continuation in continuations):
            skipped["continuation_longer_than_window"] += 1
            continue
        # one context for all choices: the harness's split keeps encode(context) whatever follows it
        groups.append((pairs[0][0], continuations))
        kept.append(item)
    return groups, kept, skipped


def evaluate_task(model, tokenizer, task, batch_size: int = 32, strategy: str = "rows", progress: bool = False,
                  bootstrap_iters: int = BOOTSTRAP_ITERS, keep_items: bool = True) -> dict:
    """acc, acc_norm, acc_bytes (with standard errors), counts and per-item scores of `task` (a Task)."""
    window = model.config.max_seq_len
    groups, items, skipped = encode_items(tokenizer, task.items, window)
    bar = None
    if progress and groups:
        from tqdm.auto import tqdm
        bar = tqdm(total=sum(len(c) for _, c in groups), desc=f"eval {task.name}", unit="choice", leave=False,
                   disable=None)          # None: drawn only on a terminal
    started = time.perf_counter()
    try:
        scores = score_groups(model, groups, batch_size, strategy, progress=bar.update if bar else None)
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - started
    per_item = []
    for item, item_scores in zip(items, scores):
        lls = [score.ll for score in item_scores]
        record = {"id": item.id, "gold": item.gold, "lls": lls, **item_predictions(lls, item.choices, item.gold),
                  "greedy": [score.greedy for score in item_scores],
                  "truncated": any(score.truncated for score in item_scores)}
        per_item.append(record)
    all_skipped = Counter(task.problems)
    all_skipped.update(skipped)
    results = {
        "task": task.name,
        "source": task.source,
        "n_items": len(per_item),
        "metrics": summarize(per_item, bootstrap_iters),
        "chance": sum(1.0 / len(item.choices) for item in items) / len(items) if items else float("nan"),
        "skipped": dict(sorted(all_skipped.items())),
        "skipped_examples": {reason: lines for reason, lines in task.examples.items()},
        "truncated": sum(record["truncated"] for record in per_item),
        "window": window,
        "strategy": strategy,
        "batch_size": batch_size,
        "seconds": seconds,
        "items_per_second": len(per_item) / seconds if seconds > 0 else float("nan"),
    }
    if keep_items:
        results["items"] = per_item
    return results
