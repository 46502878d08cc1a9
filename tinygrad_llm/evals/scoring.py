"""Log-likelihoods of continuations: the one computation behind every multiple-choice score.

A request is a context and a continuation, both as token ids; its score is

    ll = Σ_t log p(continuation_t | context, continuation_<t)          (natural log, summed over tokens)

and `greedy` says whether every continuation token was the model's argmax (lm-evaluation-harness's
`is_greedy`). `token_logprobs` is the only place where logits become log-probabilities.

Encoding (`encode_pair`) follows lm-evaluation-harness for a causal model: trailing whitespace of the
context moves to the front of the continuation; the continuation's tokens are those of
encode(context + continuation) after the first len(encode(context)) ones (so a word boundary tokenizes as
it would in running text); an empty context is replaced by the end-of-text token.

Window: the model sees at most W = max_seq_len positions. The tokens of a request are cut to their last
W + 1, the input is all but the last of them, and the logits at the last len(continuation) input positions
predict the continuation. A request longer than W + 1 tokens loses the start of its context (it is
"truncated", and counted); a continuation of more than W tokens cannot be scored at all (the caller skips
such items).

Batching, two strategies with the same results (up to float32 rounding):
- "rows": every request is a row of its own, the context repeated for each choice. The rows of many items
  are sorted by length and padded on the right into batches of `batch_size` rows, one forward each.
  Right padding changes nothing before it (attention is causal) and padded positions are never read.
- "shared": per item, the context runs once (batch 1) into a KVCache, which is then copied into one row
  per choice, and all continuations run in one forward on top of it. Only items whose requests need no
  truncation qualify (then every choice sees the same context); the others go through "rows".
benchmarks/evals.py measures both; "rows" is the default because on the CPU one large batch of many items
beats one small forward per item for the models here.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from .. import backend
from ..tensor import no_grad

STRATEGIES = ("rows", "shared")


@dataclass
class RequestScore:
    """ll: Σ log p of the continuation tokens; greedy: all of them were the argmax; truncated: the
    context lost tokens on the left to fit the window."""
    ll: float
    greedy: bool
    truncated: bool


def encode(tokenizer, text: str) -> list:
    """Ids of text, where the name of one of the tokenizer's special tokens becomes that token (as a Hugging
    Face tokenizer treats added tokens) and everything else goes through `encode_ordinary`: chat-formatted
    contexts carry <|user|> and the like. For the chat template this gives exactly the ids of
    tinygrad_llm.tokenizer.encode_chat, which encodes the text between special tokens piece by piece."""
    special = dict(getattr(tokenizer, "special_tokens", None) or {})
    present = sorted((name for name in special if name in text), key=len, reverse=True)   # longest name first
    if not present:
        return list(tokenizer.encode_ordinary(text))
    ids = []
    for position, piece in enumerate(re.split("(" + "|".join(map(re.escape, present)) + ")", text)):
        if position % 2:                             # odd positions of re.split are the captured names
            ids.append(special[piece])
        elif piece:
            ids.extend(tokenizer.encode_ordinary(piece))
    return ids


def encode_pair(tokenizer, context: str, continuation: str, eot_id: int | None = None):
    """(context ids, continuation ids) with the harness's whitespace rule and split (module docstring).

    Raises ValueError for an empty context when there is no end-of-text token to stand in for it, and
    KeyError when the tokenizer cannot encode a character (a character vocabulary)."""
    if not context:
        if eot_id is None:
            raise ValueError("empty context and the tokenizer has no end-of-text token to start from")
        return [int(eot_id)], encode(tokenizer, continuation)
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    if not context:                              # the context was only whitespace
        return encode_pair(tokenizer, "", continuation, eot_id)
    whole = encode(tokenizer, context + continuation)
    context_ids = encode(tokenizer, context)
    return context_ids, whole[len(context_ids):]


def token_logprobs(logits, targets):
    """log softmax(logits)[target] per row, and whether the target is the row's argmax.

    logits (N, V) of any float dtype, NumPy or CuPy; targets (N,) ints. Returns two NumPy arrays (N,):
    float64 log-probabilities and booleans. The log-sum-exp runs in float64 after subtracting the row max.
    """
    logits = np.asarray(backend.to_numpy(logits), dtype=np.float64)
    targets = np.asarray(targets, dtype=np.int64)
    rows = np.arange(logits.shape[0])
    row_max = logits.max(axis=1)
    log_norm = row_max + np.log(np.exp(logits - row_max[:, None]).sum(axis=1))
    picked = logits[rows, targets]
    return picked - log_norm, picked >= row_max


def fit_window(context, continuation, window: int):
    """(input ids, truncated) for one request: the last window + 1 tokens, all but the last as input."""
    tokens = list(context) + list(continuation)
    truncated = len(tokens) > window + 1
    tokens = tokens[-(window + 1):]
    return tokens[:-1], truncated


def score_groups(model, groups, batch_size: int = 32, strategy: str = "rows", progress=None) -> list:
    """Scores of every request, grouped as given.

    groups: a list of (context ids, [continuation ids, ...]), one per item; every continuation non-empty
    and at most max_seq_len tokens. Returns a list (per group) of lists of RequestScore.
    progress: called with the number of requests just finished.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    window = model.config.max_seq_len
    for context, continuations in groups:
        if not context:
            raise ValueError("every request needs at least one context token")
        for continuation in continuations:
            if not 0 < len(continuation) <= window:
                raise ValueError(f"a continuation of {len(continuation)} tokens cannot be scored with a "
                                 f"window of {window}")
    scores = [[None] * len(continuations) for _, continuations in groups]
    rows = []                                   # (group, choice, input ids, truncated, continuation)
    was_training = model.training
    model.eval()
    try:
        with no_grad():
            for g, (context, continuations) in enumerate(groups):
                fits = len(context) + max(len(c) for c in continuations) <= window + 1
                if strategy == "shared" and fits:
                    scores[g] = _score_shared(model, context, continuations)
                    if progress:
                        progress(len(continuations))
                    continue
                for c, continuation in enumerate(continuations):
                    rows.append((g, c, *fit_window(context, continuation, window), continuation))
            _score_rows(model, rows, batch_size, scores, progress)
    finally:
        model.train(was_training)
    return scores


def _score_rows(model, rows, batch_size, scores, progress):
    """Fill scores[g][c] for each row (g, c, input ids, truncated, continuation), batched by length."""
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][2]))
    for start in range(0, len(order), batch_size):
        chunk = [rows[i] for i in order[start:start + batch_size]]
        time = max(len(row[2]) for row in chunk)
        ids = np.zeros((len(chunk), time), dtype=np.int64)                      # right-padded (B, T)
        batch_index, time_index, targets = [], [], []
        for b, (_, _, inputs, _, continuation) in enumerate(chunk):
            ids[b, :len(inputs)] = inputs
            batch_index.extend([b] * len(continuation))
            time_index.extend(range(len(inputs) - len(continuation), len(inputs)))
            targets.extend(continuation)
        logits = model(backend.to_device(ids, model.device)).data                # (B, T, V)
        xp = backend.array_module(logits)
        picked = logits[xp.asarray(batch_index), xp.asarray(time_index)]        # (N, V), N = Σ continuations
        logprobs, greedy = token_logprobs(picked, targets)
        offset = 0
        for g, c, _, truncated, continuation in chunk:
            end = offset + len(continuation)
            scores[g][c] = RequestScore(float(logprobs[offset:end].sum()), bool(greedy[offset:end].all()),
                                        bool(truncated))
            offset = end
        if progress:
            progress(len(chunk))


def _score_shared(model, context, continuations) -> list:
    """One item: the context once through a KV cache, then every continuation on a copy of it."""
    length = len(context)
    longest = max(len(c) for c in continuations) - 1           # continuation tokens that are inputs
    cache = model.new_cache(1, max_len=length + max(longest, 0))
    ids = backend.to_device(np.asarray(context, dtype=np.int64)[None, :], model.device)
    first = model(ids, cache=cache, last_only=True).data[:, 0]                 # (1, V): predicts token 0
    xp = backend.array_module(first)
    picked_rows = [xp.broadcast_to(first, (len(continuations), first.shape[-1]))]
    batch_index, time_index = [], []
    if longest > 0:
        rows = len(continuations)
        copies = model.new_cache(rows, max_len=length + longest)
        _copy_cache(cache, copies, length)
        ids = np.zeros((rows, longest), dtype=np.int64)                          # right-padded (n, T)
        for b, continuation in enumerate(continuations):
            ids[b, :len(continuation) - 1] = continuation[:-1]
            batch_index.extend([b] * (len(continuation) - 1))
            time_index.extend(range(len(continuation) - 1))
        logits = model(backend.to_device(ids, model.device), cache=copies).data  # (n, T, V)
        picked_rows.append(logits[xp.asarray(batch_index, dtype=xp.int64), xp.asarray(time_index, dtype=xp.int64)])
    targets = [c[0] for c in continuations] + [t for c in continuations for t in c[1:]]
    logprobs, greedy = token_logprobs(xp.concatenate(picked_rows, axis=0), targets)
    first_lp, first_greedy = logprobs[:len(continuations)], greedy[:len(continuations)]
    rest_lp, rest_greedy = logprobs[len(continuations):], greedy[len(continuations):]
    scores, offset = [], 0
    for b, continuation in enumerate(continuations):
        end = offset + len(continuation) - 1
        scores.append(RequestScore(float(first_lp[b] + rest_lp[offset:end].sum()),
                                   bool(first_greedy[b] and rest_greedy[offset:end].all()), False))
        offset = end
    return scores


def _copy_cache(source, target, length: int) -> None:
    """target's first `length` positions = source's (batch 1, broadcast over target's rows).

    Reads the KVCache's documented per-layer arrays k[i], v[i] of shape (B, Hkv, max_len, D)."""
    for layer in range(len(source.k)):
        target.k[layer][:, :, :length] = source.k[layer][:, :, :length]
        target.v[layer][:, :, :length] = source.v[layer][:, :, :length]
    target.length = length
