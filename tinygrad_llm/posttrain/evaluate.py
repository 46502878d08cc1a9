"""Scoring a chat model on the built-in task: exact match of greedy answers, per question kind.

exact_match asks each question through the chat template (one user turn and the generation prompt),
decodes greedily until <|end|> (or a length limit a few tokens past the answer's), and counts a hit when the
reply, stripped of surrounding whitespace, equals the expected answer. A base model that never learned to
close its turn with <|end|> therefore scores on what it writes before the limit, which is rarely exact.
"""
from __future__ import annotations

from collections import defaultdict

from .chat import END, apply_chat_template, greedy_reply_ids


def exact_match(model, tokenizer, examples, extra_tokens=8) -> dict:
    """{"all": accuracy, <task>: accuracy, ..., "count": n} over TaskExamples (or anything with .task,
    .prompt, .answer); examples whose prompt the tokenizer cannot encode count as misses."""
    end = dict(tokenizer.special_tokens)[END]
    hits, totals = defaultdict(int), defaultdict(int)
    for example in examples:
        totals[example.task] += 1
        try:
            prompt, _ = apply_chat_template(tokenizer, [{"role": "user", "content": example.prompt}],
                                            add_generation_prompt=True)
            limit = len(tokenizer.encode_ordinary(example.answer)) + extra_tokens
        except (KeyError, ValueError):
            continue
        if len(prompt) + limit > model.config.max_seq_len:
            limit = max(1, model.config.max_seq_len - len(prompt))
        reply = tokenizer.decode(greedy_reply_ids(model, prompt, end, limit))
        if reply.strip() == example.answer.strip():
            hits[example.task] += 1
    result = {task: hits[task] / totals[task] for task in sorted(totals)}
    count = sum(totals.values())
    result["all"] = sum(hits.values()) / count if count else float("nan")
    result["count"] = count
    return result
