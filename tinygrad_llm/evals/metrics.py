"""Per-item predictions and task-level accuracies with their standard errors.

For an item with choice log-likelihoods ll_i (evals.scoring) and choice texts c_i:

    acc        = [argmax_i ll_i                 == gold]
    acc_norm   = [argmax_i ll_i / len(c_i)      == gold]     len in characters: lm-evaluation-harness's
                                                             `completion_len`, without the delimiter
    acc_bytes  = [argmax_i ll_i / bytes(c_i)    == gold]     bytes of the UTF-8 encoding (the harness's
                                                             `acc_bytes`; equal to acc_norm on ASCII text)

Ties go to the lowest index (NumPy's argmax, as in the harness). A task's score is the mean over items.
Standard errors: `bootstrap_stderr` resamples the items with replacement (a fixed seed, so a rerun gives
the same number) and takes the standard deviation of the resampled means; `mean_stderr` is the analytic
sample standard deviation / √n that the harness reports for a mean. For 0/1 scores the two agree closely.
"""
from __future__ import annotations

import math

import numpy as np

METRICS = ("acc", "acc_norm", "acc_bytes")
BOOTSTRAP_ITERS = 1000


def item_predictions(lls, choices, gold: int) -> dict:
    """pred, pred_norm, pred_bytes (indices) and acc, acc_norm, acc_bytes (0 or 1) of one item."""
    lls = np.asarray(lls, dtype=np.float64)
    characters = np.array([len(choice) for choice in choices], dtype=np.float64)
    byte_counts = np.array([len(choice.encode("utf-8")) for choice in choices], dtype=np.float64)
    pred, pred_norm, pred_bytes = (int(np.argmax(lls)), int(np.argmax(lls / characters)),
                                   int(np.argmax(lls / byte_counts)))
    return {"pred": pred, "pred_norm": pred_norm, "pred_bytes": pred_bytes, "acc": int(pred == gold),
            "acc_norm": int(pred_norm == gold), "acc_bytes": int(pred_bytes == gold)}


def mean_stderr(values) -> float:
    """Sample standard deviation / √n (0 for fewer than two values)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size < 2:
        return 0.0
    return float(values.std(ddof=1) / math.sqrt(values.size))


def bootstrap_stderr(values, iters: int = BOOTSTRAP_ITERS, seed: int = 1234) -> float:
    """Standard deviation of the mean over `iters` resamples of the values with replacement."""
    values = np.asarray(values, dtype=np.float64)
    if values.size < 2:
        return 0.0
    rng = np.random.default_rng(seed)
    means = np.empty(iters)
    for start in range(0, iters, 100):                   # 100 resamples at a time bounds the memory
        count = min(100, iters - start)
        picks = rng.integers(0, values.size, size=(count, values.size))
        means[start:start + count] = values[picks].mean(axis=1)
    return float(means.std())


def summarize(per_item: list, iters: int = BOOTSTRAP_ITERS) -> dict:
    """{metric: {"value", "stderr" (bootstrap), "stderr_analytic"}} over the items' 0/1 scores."""
    out = {}
    for metric in METRICS:
        values = [item[metric] for item in per_item]
        out[metric] = {"value": float(np.mean(values)) if values else float("nan"),
                       "stderr": bootstrap_stderr(values, iters), "stderr_analytic": mean_stderr(values)}
    return out
