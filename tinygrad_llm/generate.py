"""Text generation: greedy, temperature, top-k and top-p sampling with a KV cache, streamed.

    from tinygrad_llm.generate import generate, generate_text
    for token in generate(model, prompt_ids, max_new_tokens=200, temperature=0.8, top_k=40): ...
    text = generate_text(model, tokenizer, "ROMEO:", max_new_tokens=200, stop=["\\n\\n"], stream=sys.stdout)

KV cache: the prompt is run through the model once (prefill) and every layer's keys and values are kept;
each new token is then one position (rope at the cache length as offset, attention over all cached keys).

Context limit, handled explicitly: the model sees at most `max_seq_len` tokens. A longer prompt is cut to
its last `max_seq_len` tokens (a warning says so). When generation fills the context, the window slides:
from then on each step recomputes the cache from the last `max_seq_len` tokens (the new token included),
so the model always conditions on exactly the most recent `max_seq_len` tokens.

Stops: at `eot_id` (the end-of-text token, not emitted) or when the decoded continuation contains one of
the `stop` strings (the text is cut before it). Streaming holds back only what could still turn into a
stop string or is an incomplete UTF-8 sequence.
"""
from __future__ import annotations

import warnings

import numpy as np

from . import backend
from .tensor import no_grad


def sample_next(logits: np.ndarray, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                rng: np.random.Generator | None = None) -> int:
    """One token id from a (V,) logit vector. temperature 0 → greedy (argmax)."""
    logits = np.asarray(logits, dtype=np.float64)
    if temperature < 0:
        raise ValueError(f"temperature must be ≥ 0, got {temperature}")
    if temperature == 0:
        return int(np.argmax(logits))
    logits = logits / temperature
    if top_k is not None and top_k > 0 and top_k < logits.size:
        kth = np.partition(logits, -top_k)[-top_k]
        logits = np.where(logits < kth, -np.inf, logits)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    if top_p is not None and 0.0 < top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order])
        keep = int(np.searchsorted(cumulative, top_p) + 1)     # smallest prefix whose mass reaches top_p
        mask = np.zeros_like(probs, dtype=bool)
        mask[order[:keep]] = True
        probs = np.where(mask, probs, 0.0)
        probs /= probs.sum()
    rng = rng or np.random.default_rng()
    return int(rng.choice(probs.size, p=probs))


def _last_logits(model, ids, cache):
    logits = model(backend.to_device(np.asarray(ids, dtype=np.int64)[None, :], model.device), cache=cache,
                   last_only=True)
    return backend.to_numpy(logits.data)[0, -1]                                     # (1, 1, V) -> (V,)


def generate(model, prompt_ids, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, eot_id: int | None = None, seed: int | None = None,
             use_cache: bool = True):
    """Yield up to max_new_tokens new token ids (stops early at eot_id, which is not yielded)."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be ≥ 0, got {max_new_tokens}")
    context = [int(t) for t in prompt_ids]
    if not context:
        raise ValueError("generate needs at least one prompt token")
    limit = model.config.max_seq_len
    if len(context) > limit:
        warnings.warn(f"prompt of {len(context)} tokens is longer than the context ({limit}); keeping its last "
                      f"{limit} tokens", stacklevel=2)
        context = context[-limit:]
    rng = np.random.default_rng(seed)
    was_training = model.training
    model.eval()
    try:
        with no_grad():
            cache = model.new_cache(1) if use_cache else None
            logits = _last_logits(model, context, cache)                               # prefill
            for _ in range(max_new_tokens):
                token = sample_next(logits, temperature, top_k, top_p, rng)
                if eot_id is not None and token == eot_id:
                    return
                yield token
                context.append(token)
                if cache is not None and cache.length < limit:
                    logits = _last_logits(model, [token], cache)                       # one position
                else:                                                                  # slide the window
                    context = context[-limit:]
                    cache = model.new_cache(1) if use_cache else None
                    logits = _last_logits(model, context, cache)
    finally:
        model.train(was_training)


def _decode(tokenizer, ids) -> str:
    return tokenizer.decode(ids) if ids else ""


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int = 200, temperature: float = 1.0,
                  top_k: int | None = None, top_p: float | None = None, stop=(), seed: int | None = None,
                  stream=None, use_cache: bool = True) -> str:
    """The continuation of `prompt` as text. `stream`: a file (or callable) that receives text as it comes."""
    if hasattr(tokenizer, "encode_ordinary"):
        prompt_ids = tokenizer.encode_ordinary(prompt)
    else:
        prompt_ids = tokenizer.encode(prompt)
    if not prompt_ids:
        eot = _eot_id(tokenizer)
        if eot is None:
            raise ValueError("empty prompt and the tokenizer has no end-of-text token to start from")
        prompt_ids = [eot]
    stop = [s for s in (stop or ()) if s]
    write = (stream if callable(stream) else (lambda text: (stream.write(text), stream.flush()))) if stream else None
    holdback = max((len(s) for s in stop), default=1) - 1
    ids, emitted, text = [], 0, ""
    for token in generate(model, prompt_ids, max_new_tokens, temperature, top_k, top_p, _eot_id(tokenizer),
                          seed, use_cache):
        ids.append(token)
        text = _decode(tokenizer, ids)
        cut = min((text.find(s) for s in stop if s in text), default=-1)
        if cut >= 0:
            text = text[:cut]
            break
        if write is not None:
            safe = len(text) - holdback
            while safe > emitted and text[safe - 1] == "\ufffd":                      # incomplete UTF-8
                safe -= 1
            if safe > emitted:
                write(text[emitted:safe])
                emitted = safe
    if write is not None and len(text) > emitted:
        write(text[emitted:])
    return text


def _eot_id(tokenizer):
    special = getattr(tokenizer, "special_tokens", None)
    if isinstance(special, dict):
        return special.get("<|endoftext|>")
    return getattr(tokenizer, "eot_id", None)
