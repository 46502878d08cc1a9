"""The chat template for any tokenizer, adding the chat tokens to a base run, and one chat turn of generation.

The template itself is defined once, in tinygrad_llm.tokenizer (CHAT_TEMPLATE, CHAT_ROLES): each turn is
`<|role|>\\n{content}<|end|>\\n`, and a generation prompt is `<|assistant|>\\n`. Here:

- `apply_chat_template(tokenizer, messages, add_generation_prompt)` -> (ids, assistant_mask) for the BPE
  `Tokenizer` (its own method) and for the character vocabulary (through `encode_ordinary` and
  `special_tokens`, the public API both share).
- `with_chat_tokens(tokenizer)` -> a tokenizer with any missing chat special tokens appended after the
  existing ids (no existing id changes); `grow_vocabulary(model, vocab_size)` grows the embedding and an
  untied output head to match, each new row the mean of the old rows (a neutral start for tokens the base
  model never saw).
- `chat_reply(model, tokenizer, messages, ...)`: the assistant's next turn, generated through the template
  and stopped at `<|end|>`.
"""
from __future__ import annotations

from .. import backend
from ..tokenizer import CHAT_ROLES, CHAT_SPECIAL_TOKENS, encode_chat

END = "<|end|>"


def apply_chat_template(tokenizer, messages, add_generation_prompt=False):
    """(ids, assistant_mask) of `messages` rendered with the project's chat template, for either tokenizer."""
    method = getattr(tokenizer, "apply_chat_template", None)
    if method is not None:
        return method(messages, add_generation_prompt=add_generation_prompt)
    return encode_chat(messages, tokenizer.encode_ordinary, dict(tokenizer.special_tokens), add_generation_prompt)


def has_chat_tokens(tokenizer) -> bool:
    specials = dict(tokenizer.special_tokens)
    return all(name in specials for name in CHAT_SPECIAL_TOKENS[1:])


def with_chat_tokens(tokenizer):
    """The tokenizer itself when it has every chat token, else a copy with the missing ones appended.

    Character vocabularies (anything with `.chars`) get them as extra special tokens after the existing
    ones; BPE tokenizers get ids from vocab_size upwards. Existing ids never move."""
    specials = dict(tokenizer.special_tokens)
    missing = [name for name in CHAT_SPECIAL_TOKENS if name not in specials]
    if not missing:
        return tokenizer
    if hasattr(tokenizer, "chars"):
        return type(tokenizer)(list(tokenizer.chars), tuple(specials) + tuple(missing))
    from ..tokenizer import Tokenizer
    if not isinstance(tokenizer, Tokenizer):
        raise TypeError(f"cannot add chat tokens to a {type(tokenizer).__name__}")
    start = tokenizer.vocab_size
    specials.update({name: start + i for i, name in enumerate(missing)})
    return Tokenizer(tokenizer.merges, tokenizer.pattern, specials)


def grow_vocabulary(model, vocab_size: int) -> int:
    """Grow the model's embedding (and an untied lm_head) to `vocab_size` rows, in place; new rows are the
    mean of the old rows. Returns the number of rows added (0 when the model is already that large)."""
    old = model.config.vocab_size
    if vocab_size < old:
        raise ValueError(f"the tokenizer has {vocab_size} ids but the model {old}: they do not belong together")
    if vocab_size == old:
        return 0
    tables = [model.model.embed_tokens.weight]
    if model.lm_head.weight is not model.model.embed_tokens.weight:
        tables.append(model.lm_head.weight)
    for table in tables:
        xp = backend.array_module(table.data)
        mean = table.data.mean(axis=0, keepdims=True)                        # (1, C)
        extra = xp.repeat(mean, vocab_size - old, axis=0)                    # (new, C)
        table.data = xp.concatenate([table.data, extra.astype(table.dtype)], axis=0)
        table.grad = None
    model.config.vocab_size = vocab_size
    return vocab_size - old


def chat_reply(model, tokenizer, messages, max_new_tokens=200, temperature=0.0, top_k=None, top_p=None,
               seed=None, stream=None) -> str:
    """Generate the assistant's next turn after `messages`; stops at <|end|> (or end-of-text)."""
    from ..generate import generate
    ids, _ = apply_chat_template(tokenizer, messages, add_generation_prompt=True)
    end = dict(tokenizer.special_tokens)[END]
    stop_ids = {end, dict(tokenizer.special_tokens).get("<|endoftext|>")}
    out, shown = [], 0
    for token in generate(model, ids, max_new_tokens, temperature, top_k, top_p, eot_id=end, seed=seed):
        if token in stop_ids:
            break
        out.append(token)
        if stream is not None:
            text = tokenizer.decode(out)
            safe = len(text)
            while safe > shown and text[safe - 1] == "\ufffd":             # an incomplete UTF-8 sequence
                safe -= 1
            stream.write(text[shown:safe])
            stream.flush()
            shown = safe
    text = tokenizer.decode(out) if out else ""
    if stream is not None and len(text) > shown:
        stream.write(text[shown:])
        stream.flush()
    return text


def greedy_reply_ids(model, prompt_ids, end_id: int, max_new_tokens: int) -> list:
    """Greedy continuation of prompt_ids up to (not including) end_id: what exact-match scoring compares."""
    from ..generate import generate
    out = []
    for token in generate(model, prompt_ids, max_new_tokens, temperature=0.0, eot_id=end_id):
        out.append(token)
    return out


__all__ = ["CHAT_ROLES", "END", "apply_chat_template", "has_chat_tokens", "with_chat_tokens", "grow_vocabulary",
           "chat_reply", "greedy_reply_ids"]
