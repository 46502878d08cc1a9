"""Our tokenizers as Hugging Face `tokenizers` JSON (tokenizer.json), and back.

Byte-level BPE. Hugging Face's byte-level BPE works on strings in which every byte is one printable
character (GPT-2's byte-to-character table, `byte_to_char` below): the vocabulary maps such strings to
ids and the merges are "left right" pairs of them. Our encoding joins, inside a pre-token, the adjacent
pair whose joined bytes have the lowest rank (tiktoken's rule), whatever two parts make up that token.
A `tokenizers` BPE joins only the pairs listed in its merges, lowest position first; so the merges we
write are EVERY cut of every token into two tokens, ordered by the rank of the joined token (then the
left part's rank, then the right's), and `ignore_merges` is set so that a pre-token that is itself a
token comes out whole, as in our encoder. The pre-tokenizer is our split regex (`Split`, "Isolated")
followed by the byte-to-character step; the decoder maps characters back to bytes. Special tokens are
`added_tokens` with `special: true`, so `tokenizers` finds them in the text the way
`encode(text, allowed_special="all")` does.

Character vocabularies. A `tokenizers` BPE with no merges, no pre-tokenizer, the characters as its
vocabulary and a decoder that joins the pieces (`Fuse`) encodes and decodes exactly as `CharVocab`.
(A character outside the vocabulary raises KeyError in `CharVocab`; `tokenizers` drops it.)

Reading back (`tokenizer_from_hf_json`) accepts the two layouts above: a byte-level BPE whose ids
0..255 are the 256 single bytes and whose later ids are built from earlier ones, its merges ordered by
the id they build (the files written here, and tiktoken-style vocabularies); or a character BPE without
merges. Any other tokenizer.json is refused with a one-line reason, never approximated.
"""
from __future__ import annotations

from ..tokenizer import CharVocab, Tokenizer


class HFTokenizerError(ValueError):
    """A tokenizer that this layout cannot express, or a tokenizer.json we cannot read exactly."""


def byte_to_char() -> dict:
    """GPT-2's table: byte value -> one printable character. The printable Latin-1 bytes stand for
    themselves; the other 68 (control characters, space, the no-break space, the soft hyphen) take the
    characters from U+0100 upwards, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table, extra = {}, 0
    for value in range(256):
        if value in printable:
            table[value] = chr(value)
        else:
            table[value] = chr(256 + extra)
            extra += 1
    return table


BYTE_TO_CHAR = byte_to_char()
CHAR_TO_BYTE = {char: value for value, char in BYTE_TO_CHAR.items()}


def byte_level_text(data: bytes) -> str:
    """The byte-level string of a token's bytes (how it appears in tokenizer.json and GGUF)."""
    return "".join(BYTE_TO_CHAR[value] for value in data)


def byte_level_bytes(text: str) -> bytes:
    """Inverse of byte_level_text; HFTokenizerError on a character outside the table."""
    try:
        return bytes(CHAR_TO_BYTE[char] for char in text)
    except KeyError as error:
        raise HFTokenizerError(f"token {text!r} holds {error.args[0]!r}, which is not a byte-level character") from None


def is_char_vocab(tokenizer) -> bool:
    return isinstance(tokenizer, CharVocab)


def special_tokens(tokenizer) -> dict:
    """name -> id of the tokenizer's special tokens (both kinds)."""
    return dict(tokenizer.special_tokens)


def all_cut_merges(tokenizer: Tokenizer) -> list:
    """[(left id, right id, joined id)] for every cut of every token into two tokens: the merge list under
    which a merge-list BPE encodes as our rank rule. Ordered by joined id; for one joined id the merge that
    built it in training comes first (so that reading the file back gives the same merges), then the other
    cuts by left id, then right id."""
    ranks = tokenizer.mergeable_ranks()
    built_by = {256 + k: pair for k, pair in enumerate(tokenizer.merges)}
    merges = []
    for data, rank in ranks.items():
        for cut in range(1, len(data)):
            left, right = ranks.get(data[:cut]), ranks.get(data[cut:])
            if left is not None and right is not None:
                merges.append((left, right, rank))
    merges.sort(key=lambda merge: (merge[2], built_by.get(merge[2]) != merge[:2], merge[0], merge[1]))
    return merges


def _added_token(token_id: int, name: str) -> dict:
    return {"id": token_id, "content": name, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": True}


def tokenizer_json(tokenizer) -> dict:
    """The tokenizer.json content (a dict) for a byte-level BPE `Tokenizer` or a `CharVocab`."""
    added = [_added_token(token_id, name) for name, token_id in sorted(special_tokens(tokenizer).items(),
                                                                       key=lambda item: item[1])]
    base = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None}
    if is_char_vocab(tokenizer):
        vocab = {char: index for index, char in enumerate(tokenizer.chars)}
        model = {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                 "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                 "vocab": vocab, "merges": []}
        return {**base, "pre_tokenizer": None, "post_processor": None, "decoder": {"type": "Fuse"}, "model": model}
    if not isinstance(tokenizer, Tokenizer):
        raise HFTokenizerError(f"cannot convert a {type(tokenizer).__name__} to tokenizer.json")
    vocab = {byte_level_text(data): rank for data, rank in sorted(tokenizer.mergeable_ranks().items(),
                                                                  key=lambda item: item[1])}
    pieces = {rank: text for text, rank in vocab.items()}
    merges = [f"{pieces[left]} {pieces[right]}" for left, right, _ in all_cut_merges(tokenizer)]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    pre_tokenizer = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": tokenizer.pattern}, "behavior": "Isolated", "invert": False},
        byte_level]}
    model = {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
             "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
             "vocab": vocab, "merges": merges}
    return {**base, "pre_tokenizer": pre_tokenizer, "post_processor": byte_level, "decoder": byte_level,
            "model": model}


# ---------------------------------------------------------------------------------------------- reading
def _split_pattern(pre_tokenizer) -> tuple[str | None, bool]:
    """(the Split regex, whether a ByteLevel step is present) of a pre_tokenizer entry."""
    if pre_tokenizer is None:
        return None, False
    steps = pre_tokenizer.get("pretokenizers", [pre_tokenizer]) if pre_tokenizer.get("type") == "Sequence" \
        else [pre_tokenizer]
    pattern, byte_level = None, False
    for step in steps:
        if step.get("type") == "Split":
            found = step.get("pattern", {})
            if "Regex" not in found or step.get("behavior") != "Isolated" or step.get("invert"):
                raise HFTokenizerError("the Split pre-tokenizer must be an isolated regex split")
            if pattern is not None:
                raise HFTokenizerError("more than one Split pre-tokenizer")
            pattern = found["Regex"]
        elif step.get("type") == "ByteLevel":
            if step.get("add_prefix_space") or step.get("use_regex"):
                raise HFTokenizerError("a ByteLevel pre-tokenizer with add_prefix_space or its own regex is not "
                                       "supported (use a Split regex and ByteLevel without use_regex)")
            byte_level = True
        else:
            raise HFTokenizerError(f"pre-tokenizer {step.get('type')!r} is not supported")
    return pattern, byte_level


def _parse_merge(entry) -> tuple[str, str]:
    if isinstance(entry, str):
        parts = entry.split(" ")
    elif isinstance(entry, list):
        parts = entry
    else:
        parts = []
    if len(parts) != 2 or not all(isinstance(part, str) for part in parts):
        raise HFTokenizerError(f"merge {entry!r} is not a pair of tokens")
    return parts[0], parts[1]


def tokenizer_from_hf_json(content) -> Tokenizer | CharVocab:
    """Rebuild our tokenizer from a tokenizer.json dict (see the module docstring for what is accepted)."""
    try:
        return _tokenizer_from_hf_json(content)
    except (AttributeError, TypeError, KeyError) as error:        # a field of the wrong JSON type
        raise HFTokenizerError(f"malformed tokenizer.json ({type(error).__name__}: {error})") from None


def _tokenizer_from_hf_json(content) -> Tokenizer | CharVocab:
    if not isinstance(content, dict) or not isinstance(content.get("model"), dict):
        raise HFTokenizerError("not a tokenizers JSON file (no \"model\" object)")
    model = content["model"]
    if model.get("type") != "BPE":
        raise HFTokenizerError(f"model type {model.get('type')!r} is not supported (only BPE)")
    if content.get("normalizer") is not None:
        raise HFTokenizerError("tokenizers with a normalizer are not supported")
    vocab, merges = model.get("vocab"), model.get("merges", [])
    if not isinstance(vocab, dict) or not isinstance(merges, list):
        raise HFTokenizerError("model.vocab must be an object and model.merges a list")
    specials = {}
    for entry in content.get("added_tokens") or []:
        if not isinstance(entry, dict) or not isinstance(entry.get("content"), str) or \
                not isinstance(entry.get("id"), int):
            raise HFTokenizerError(f"added token {entry!r} has no content or id")
        if not entry.get("special", False):
            raise HFTokenizerError(f"added token {entry['content']!r} is not special; only special added tokens "
                                   "are supported")
        if vocab.get(entry["content"], entry["id"]) != entry["id"]:
            raise HFTokenizerError(f"added token {entry['content']!r} has two ids")
        specials[entry["content"]] = entry["id"]
    regular = {text: token_id for text, token_id in vocab.items() if text not in specials}
    pattern, byte_level = _split_pattern(content.get("pre_tokenizer"))
    if not byte_level:
        return _char_vocab(regular, merges, specials, pattern)
    if pattern is None:
        raise HFTokenizerError("a byte-level BPE without a Split regex is not supported")
    by_id = {}
    for text, token_id in regular.items():
        if not isinstance(token_id, int) or token_id in by_id:
            raise HFTokenizerError(f"token {text!r} has a bad or repeated id {token_id!r}")
        by_id[token_id] = byte_level_bytes(text)
    if sorted(by_id) != list(range(len(by_id))):
        raise HFTokenizerError("the vocabulary ids are not 0..N-1 without gaps")
    if any(by_id.get(value) != bytes([value]) for value in range(256)):
        raise HFTokenizerError("ids 0..255 are not the 256 single bytes in order, which tinygrad_llm's BPE needs")
    bytes_to_id = {data: token_id for token_id, data in by_id.items()}
    pairs = {}                   # joined id -> the first listed merge that builds it
    previous = -1
    for entry in merges:
        left, right = _parse_merge(entry)
        try:
            left_id, right_id = regular[left], regular[right]
        except KeyError as error:
            raise HFTokenizerError(f"merge {entry!r} names {error.args[0]!r}, which is not in the vocabulary") from None
        joined = bytes_to_id.get(by_id[left_id] + by_id[right_id])
        if joined is None:
            raise HFTokenizerError(f"merge {entry!r} builds a token that is not in the vocabulary")
        if joined < previous:
            raise HFTokenizerError("the merges are not ordered by the id of the token they build, so the file's "
                                   "BPE is not the rank rule of tinygrad_llm's tokenizer")
        previous = joined
        if left_id < joined and right_id < joined:
            pairs.setdefault(joined, (left_id, right_id))
    order = []
    for token_id in range(256, len(by_id)):
        if token_id not in pairs:
            raise HFTokenizerError(f"token {token_id} ({by_id[token_id]!r}) is built by no merge of earlier tokens")
        order.append(pairs[token_id])
    try:
        return Tokenizer(order, pattern, specials)
    except (TypeError, ValueError) as error:
        raise HFTokenizerError(f"the tokenizer does not rebuild: {error}") from None


def _char_vocab(regular: dict, merges: list, specials: dict, pattern) -> CharVocab:
    if merges or pattern is not None:
        raise HFTokenizerError("a BPE that is not byte-level must be a character vocabulary (no merges, no "
                               "pre-tokenizer)")
    chars = sorted(regular, key=regular.get)
    if [regular[char] for char in chars] != list(range(len(chars))) or any(len(char) != 1 for char in chars):
        raise HFTokenizerError("a character vocabulary needs one character per id, ids 0..N-1")
    ordered = sorted(specials, key=specials.get)
    if [specials[name] for name in ordered] != list(range(len(chars), len(chars) + len(ordered))):
        raise HFTokenizerError("the special tokens of a character vocabulary must follow the characters")
    return CharVocab(chars, tuple(ordered))
