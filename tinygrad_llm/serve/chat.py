"""Chat messages to prompt ids in the project's chat template (tinygrad_llm.tokenizer.CHAT_TEMPLATE).

    ids, stop_ids = chat_prompt_ids(tokenizer, [{"role": "user", "content": "Hi"}])

`stop_ids` are every chat special token the tokenizer has: the assistant's turn ends at <|end|> (or
<|endoftext|>), and a model that starts another role's turn instead has ended its own.

Each turn is the role's special token, "\\n", the content, <|end|>, "\\n"; then "<|assistant|>\\n" for the
model to continue. The special tokens are inserted as ids and every piece of text is encoded as ordinary
text, so a user who types "<|end|>" gets those characters, never the token. The ids equal
`tokenizer.encode(rendered_template, allowed_special=...)` for content without special-token strings.

A tokenizer without the chat special tokens (a character vocabulary, a BPE trained without them) gets
the same layout as plain text; `stop_ids` then holds only the end-of-text token, if there is one.
"""
from __future__ import annotations

from ..tokenizer import CHAT_ROLES, CHAT_SPECIAL_TOKENS

END = "<|end|>"


def _special_ids(tokenizer) -> dict:
    special = getattr(tokenizer, "special_tokens", None)
    return dict(special) if isinstance(special, dict) else {}


def _ordinary(tokenizer, text: str):
    encode = getattr(tokenizer, "encode_ordinary", None) or tokenizer.encode
    return list(encode(text)) if text else []


def chat_prompt_ids(tokenizer, messages):
    """(prompt ids, stop ids) for a list of {"role", "content"} messages, ready for the assistant's turn."""
    special = _special_ids(tokenizer)
    markers = {role: f"<|{role}|>" for role in CHAT_ROLES}
    has_chat_tokens = END in special and all(marker in special for marker in markers.values())
    ids = []
    for message in messages:
        role, content = message["role"], message["content"]
        if role not in markers:
            raise ValueError(f"unknown role {role!r} (known: {', '.join(CHAT_ROLES)})")
        if has_chat_tokens:
            ids += [special[markers[role]]] + _ordinary(tokenizer, "\n" + content) + [special[END]]
            ids += _ordinary(tokenizer, "\n")
        else:
            ids += _ordinary(tokenizer, f"{markers[role]}\n{content}{END}\n")
    if has_chat_tokens:
        ids += [special[markers["assistant"]]] + _ordinary(tokenizer, "\n")
    else:
        ids += _ordinary(tokenizer, f"{markers['assistant']}\n")
    return ids, {special[name] for name in CHAT_SPECIAL_TOKENS if name in special}
