"""Byte-level BPE tokenizer: training, encoding, decoding, special tokens, one-file save/load.

    from tinygrad_llm.tokenizer import Tokenizer
    tok = Tokenizer.train(open("corpus.txt").read(), vocab_size=8192, special_tokens=["<|endoftext|>"])
    ids = tok.encode("Hello world<|endoftext|>", allowed_special={"<|endoftext|>"})
    assert tok.decode(ids) == "Hello world<|endoftext|>"
    tok.save("tok.json"); tok = Tokenizer.load("tok.json")

How it works
    Text is cut into pre-tokens by a split regex (GPT4_PATTERN, the cl100k-style pattern, by default;
    GPT2_PATTERN by name "gpt2"). Every pre-token is UTF-8 encoded, and ids 0..255 are its single bytes.
    Training learns merges of adjacent tokens inside pre-tokens only, most frequent pair first; merge k
    creates token 256 + k. Encoding applies the merges the way tiktoken does, so that tiktoken given our
    `mergeable_ranks()` and `pattern` produces exactly our ids: inside one pre-token, repeatedly join the
    adjacent pair whose concatenated bytes have the lowest rank, the leftmost such pair on ties; a
    pre-token that is itself a token is emitted whole. Special tokens get ids after the merges (or ids the
    caller gives) and only come out of `encode` when the caller allows them.

Training cost
    Pre-tokens are counted once (collections.Counter over regex matches, chunk by chunk), then every
    distinct pre-token becomes a list of ids with a frequency. Pair counts and a pair -> words index are
    updated incrementally after each merge (only the words that contain the merged pair are touched),
    and the best pair comes from a lazy max-heap whose stale entries are checked against the live count
    when popped. The corpus is never recounted per merge.

Tie-breaking (deterministic, independent of input order and hashing)
    The pair with the highest count wins; among equal counts the pair with the smallest (left id, right
    id) wins, i.e. the one whose left token is the oldest, then whose right token is the oldest.

Simplifications and limits, stated plainly
    - Pre-tokens never span two input texts: an iterable of texts is split text by text, as if each
      text ended the corpus. A single long str is cut at safe places (after a newline followed by a
      non-space character; for GPT2_PATTERN only a newline with non-space characters on both sides),
      where the built-in patterns always end a pre-token, so the cut changes nothing (see _SAFE_CUTS).
    - Training memory grows with the number of *distinct* pre-tokens (plus the pair index), not with
      the corpus size; a corpus with tens of millions of distinct pre-tokens needs gigabytes.
    - If the corpus runs out of pairs before `vocab_size` is reached, training stops early (with a
      warning) and the vocabulary is smaller than asked.
    - Ids and byte strings are one-to-one, as tiktoken requires. Should a merge ever build the bytes of
      an existing token by another path (we have not found a corpus where left-to-right merging does
      this), training reuses that token instead of creating a duplicate.
    - The encode cache maps pre-token -> ids and is emptied wholesale when it holds more than
      CACHE_LIMIT entries (no LRU bookkeeping on the hot path).
    - Speed trick: for pure-ASCII text and the two built-in patterns, the split uses an ASCII-only
      translation of the pattern compiled by the standard `re` module (1.5 to 2 times faster than `regex`
      here); it gives the same pre-tokens on ASCII input (a property test checks this). Text with a few
      non-ASCII characters is cut at safe places so that only a window around each of them goes to
      `regex` (a property test checks that the pieces equal `regex` on the whole text).
    - Speed trick: a piece missing from the cache is merged on ids, with a table (left id, right id) ->
      id of the joined token built once from EVERY two-token cut of every token, which is exactly
      tiktoken's "rank of the joined bytes" (a test compares it with the bytes version).
    - GPT4_PATTERN is the cl100k pattern as first published; tiktoken's current cl100k string adds
      `\\s++$`, which only changes how whitespace at the very end of a text is split. Use
      `tok.pattern` (not tiktoken's cl100k string) when building a tiktoken Encoding from our ranks.
    - Special-token strings found in the training text are cut out before counting: no merge is ever
      learned from them, and the text on either side is pre-tokenized as if it were two texts.
    - A disallowed special token in `encode` raises ValueError (tiktoken's choice); `encode_ordinary`
      is the way to encode such text as plain text.
"""
import array
import base64
import hashlib
import heapq
import json
import multiprocessing
import os
import re
import sys
import warnings
from collections import Counter
from itertools import repeat

import regex

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT4_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|"""
                r"""\s*[\r\n]|\s+(?!\S)|\s+""")
PATTERNS = {"gpt4": GPT4_PATTERN, "gpt2": GPT2_PATTERN}

# ASCII-only translations of the built-in patterns, for the stdlib `re` fast path on pure-ASCII text.
# On ASCII input \p{L} is [A-Za-z], \p{N} is [0-9] and regex's \s is [\t\n\v\f\r ] (the stdlib's \s would
# also take \x1c-\x1f, so it is spelled out). The possessive quantifiers of GPT4_PATTERN are dropped:
# in both places the following item can never match what backtracking would give back, so they only
# save time, never change a match (and stdlib `re` before Python 3.11 lacks them).
_WS = r"[\t\n\x0b\x0c\r ]"
_NOT_WS = r"[^\t\n\x0b\x0c\r ]"
_PUNCT = r"[^\t\n\x0b\x0c\r A-Za-z0-9]"
_ASCII_PATTERNS = {
    GPT4_PATTERN: (rf"""'(?i:[sdmt]|ll|ve|re)|[^\r\nA-Za-z0-9]?[A-Za-z]+|[0-9]{{1,3}}| ?{_PUNCT}+[\r\n]*|"""
                   rf"""{_WS}*[\r\n]|{_WS}+(?!{_NOT_WS})|{_WS}+"""),
    GPT2_PATTERN: (rf"""'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?{_PUNCT}+|{_WS}+(?!{_NOT_WS})|{_WS}+"""),
}

CHAT_SPECIAL_TOKENS = ("<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")

# The chat template, one for the whole project (SFT, DPO, chat, the server and the exported
# tokenizer_config.json). Each turn is the role's special token, a newline, the content and <|end|>, then a
# newline:
#     <|system|>\nYou are terse.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\nHello.<|end|>\n
# add_generation_prompt appends "<|assistant|>\n" for the model to continue. No BOS token is added. The
# tokens a model is trained on in a conversation are each assistant turn's content and its <|end|>.
CHAT_ROLES = ("system", "user", "assistant")
CHAT_TEMPLATE = ("{% for message in messages %}"
                 "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
                 "{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")
FILE_FORMAT = "tinygrad_llm.tokenizer.bpe"
FILE_VERSION = 1
CACHE_LIMIT = 1 << 19
_SHORT_PIECE = 64          # pieces up to this many bytes use the list scan; longer ones the heap
_SAFE_CHUNK_CHARS = 1 << 20
_AUTO_PROGRESS_BYTES = 50_000_000
_INFINITE_RANK = 1 << 62


class TokenizerFileError(ValueError):
    """A tokenizer file is unreadable, truncated, corrupted, or of an unknown format or version."""


# ----------------------------------------------------------------------------------------------------
# patterns and splitting

def resolve_pattern(pattern):
    """Split regex for a pattern name ("gpt4", "gpt2") or a regex string, validated by compiling it."""
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"pattern must be a non-empty regex string or one of {sorted(PATTERNS)}, got {pattern!r}")
    if pattern.lower() in PATTERNS:
        return PATTERNS[pattern.lower()]
    if re.fullmatch(r"[A-Za-z0-9_]+", pattern):
        raise ValueError(f"unknown pattern name {pattern!r}; known names are {sorted(PATTERNS)} "
                         "(or pass a split regex)")
    try:
        regex.compile(pattern)
    except regex.error as error:
        raise ValueError(f"split pattern does not compile: {error}") from None
    return pattern


# Where a text may be cut, just after a newline, without changing its pre-tokens (for the built-in
# patterns only; \s and \S of stdlib re on str follow str.isspace(), which is true for every character
# `regex` counts as \s, a test checks all code points, so these never call a `regex` space a non-space).
# GPT4_PATTERN: a newline followed by a non-space character. No piece runs from whitespace into a
#   non-space character, and a whitespace run that ends in a newline is matched whole by \s*[\r\n]
#   (tried before \s+(?!\S)), at the end of a text or not.
# GPT2_PATTERN: a newline with a non-space character on BOTH sides. Its whitespace run is tried with
#   \s+(?!\S), which gives "  ", "\n", "b" for "  \nb" but one piece "  \n" at the end of a text (and
#   "\r", "\n" against "\r\n"), so only a lone newline is a pre-token whatever follows it.
_SAFE_CUTS = {GPT4_PATTERN: re.compile(r"\n(?=\S)"), GPT2_PATTERN: re.compile(r"(?<=\S)\n(?=\S)")}
_NON_ASCII = re.compile(r"[^\x00-\x7f]")
_MIXED_MARGIN = 1 << 12    # text after a non-ASCII character that goes to `regex` with it (see findall)


class _Splitter:
    """Cuts text into pre-tokens: `regex` for the pattern, the stdlib fast path for ASCII text."""

    def __init__(self, pattern):
        self.pattern = pattern
        self.compiled = regex.compile(pattern)
        ascii_pattern = _ASCII_PATTERNS.get(pattern)
        self.ascii_compiled = re.compile(ascii_pattern, re.ASCII) if ascii_pattern else None
        self.builtin = pattern in _ASCII_PATTERNS
        self.safe_cut = _SAFE_CUTS.get(pattern)
        if self.compiled.groups:
            # findall would return the groups instead of the whole matches
            raise ValueError("the split pattern has capturing groups; write them as (?:...) instead")

    def findall(self, text):
        if self.ascii_compiled is None:
            pieces = self.compiled.findall(text)
            if sum(map(len, pieces)) != len(text):
                # findall silently skips what the pattern does not match; a custom pattern must not lose text.
                raise ValueError("the split pattern does not match every character of the text, so some text "
                                 "would be silently dropped; end the pattern with a catch-all such as '|\\s+|.'")
            return pieces
        if text.isascii():
            return self.ascii_compiled.findall(text)
        return self._findall_mixed(text)

    def _findall_mixed(self, text):
        """Built-in pattern on text that is not pure ASCII. Mostly-English text often holds a few non-ASCII
        characters (a name with an accent, a ligature); rather than sending all of it to `regex`, cut it at
        safe places: each non-ASCII character goes to `regex` together with the text from the last safe
        cut before it to the first safe cut at least _MIXED_MARGIN characters after it, and the ASCII
        stretches between such windows go to the stdlib fast path. Text dense in non-ASCII characters
        ends up in a few large `regex` windows, as before."""
        ascii_findall, full_findall = self.ascii_compiled.findall, self.compiled.findall
        pieces, start, n = [], 0, len(text)
        while start < n:
            found = _NON_ASCII.search(text, start)
            if found is None:
                pieces += ascii_findall(text[start:])
                break
            cut = self._last_safe_cut(text, start, found.start())
            if cut > start:
                pieces += ascii_findall(text[start:cut])
                start = cut
            end = self._next_safe_cut(text, found.start() + _MIXED_MARGIN)
            if end == -1:
                end = n
            pieces += full_findall(text[start:end])
            start = end
        return pieces

    def safe_chunks(self, text):
        """Cut a long text where no built-in pattern can join across (see _SAFE_CUTS), into chunks of
        at least _SAFE_CHUNK_CHARS characters. Custom patterns get the text whole."""
        if not self.builtin or len(text) <= 2 * _SAFE_CHUNK_CHARS:
            yield text
            return
        start, end = 0, len(text)
        while end - start > 2 * _SAFE_CHUNK_CHARS:
            cut = self._next_safe_cut(text, start + _SAFE_CHUNK_CHARS)
            if cut == -1:
                break
            yield text[start:cut]
            start = cut
        yield text[start:]

    def _next_safe_cut(self, text, position):
        """The first safe cut after a newline at or after `position`, or -1."""
        found = self.safe_cut.search(text, position)
        return -1 if found is None else found.end()

    def _last_safe_cut(self, text, low, high):
        """The last safe cut c with low < c <= high < len(text), or low if there is none."""
        newline = text.rfind("\n", low, high)
        while newline != -1:
            if self.safe_cut.match(text, newline):
                return newline + 1
            newline = text.rfind("\n", low, newline)
        return low


# ----------------------------------------------------------------------------------------------------
# training helpers

def _special_splitter(names):
    """Regex that finds any of the given special-token strings (longest first), or None for no names."""
    if not names:
        return None
    return re.compile("|".join(map(re.escape, sorted(names, key=lambda name: (-len(name), name)))))


def _count_texts(splitter, texts, special_names=()):
    """Pre-token frequencies of a list of texts (runs in worker processes too). Special-token strings are
    cut out first, so that merges are never learned from them."""
    counts = Counter()
    specials = _special_splitter([name for name in special_names if any(name in text for text in texts)])
    for text in texts:
        for segment in (specials.split(text) if specials else (text,)):
            counts.update(splitter.findall(segment))
    return counts


def _count_batch_in_worker(args):
    pattern, special_names, texts = args
    return _count_texts(_Splitter(pattern), texts, special_names)


def _batches_of_texts(texts, splitter, batch_chars=_SAFE_CHUNK_CHARS):
    """Group the input (a str or an iterable of str) into lists of about batch_chars characters."""
    if isinstance(texts, str):
        texts = (texts,)
    elif isinstance(texts, (bytes, bytearray)):
        raise TypeError("texts must be a str or an iterable of str, not bytes; decode it first")
    batch, size = [], 0
    for number, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts must be a str or an iterable of str; item {number} is {type(text).__name__}")
        for chunk in splitter.safe_chunks(text):
            batch.append(chunk)
            size += len(chunk)
            if size >= batch_chars:
                yield batch, size
                batch, size = [], 0
    if batch:
        yield batch, size


def _count_pre_tokens(texts, splitter, workers, progress, special_names=()):
    counts = Counter()
    bar, seen = None, 0

    def advance(size):
        nonlocal bar, seen
        seen += size
        if bar is None and (progress is True or (progress is None and seen >= _AUTO_PROGRESS_BYTES
                                                 and sys.stderr.isatty())):
            from tqdm import tqdm
            bar = tqdm(desc="counting pre-tokens", unit="char", unit_scale=True, initial=seen)
        elif bar is not None:
            bar.update(size)

    batches = _batches_of_texts(texts, splitter)
    if workers <= 1:
        for batch, size in batches:
            counts.update(_count_texts(splitter, batch, special_names))
            advance(size)
    else:
        # Batches go out workers * 2 at a time so a streamed corpus is never read far ahead of counting.
        with multiprocessing.get_context().Pool(workers) as pool:
            while True:
                window = [batch for _, batch in zip(range(workers * 2), batches)]
                if not window:
                    break
                for (batch, size), batch_counts in zip(window, pool.imap(
                        _count_batch_in_worker, [(splitter.pattern, special_names, batch) for batch, _ in window])):
                    counts.update(batch_counts)
                    advance(size)
    if bar is not None:
        bar.close()
    return counts, seen


def _merge_and_count(word, left, right, new_id, frequency, index, pair_counts, pair_to_words, grown_pairs):
    """Join every (left, right) in word, scanning left to right without overlaps, and update the pair
    counts where the word changed. Returns the new word, or None if the pair is not in it (a stale index
    entry). The count of (left, right) itself is not maintained: the caller drops that pair.

    Per joined occurrence at i:  x a b y -> x c y  loses (x,a) and (b,y), gains (x,c) and (c,y); when two
    occurrences touch (a b a b -> c c) the shared middle is handled once, by the left occurrence, whose
    right neighbour then is c."""
    merged, i, n = [], 0, len(word)
    end_of_last_join = -1
    while i < n:
        if word[i] == left and i + 1 < n and word[i + 1] == right:
            if i > 0 and i != end_of_last_join:
                before = word[i - 1]
                pair_counts[(before, left)] -= frequency
                gained = (before, new_id)
                pair_counts[gained] = pair_counts.get(gained, 0) + frequency
                grown_pairs.add(gained)
                pair_to_words.setdefault(gained, set()).add(index)
            if i + 2 < n:
                after = word[i + 2]
                pair_counts[(right, after)] -= frequency
                joins_next = after == left and i + 3 < n and word[i + 3] == right
                gained = (new_id, new_id) if joins_next else (new_id, after)
                pair_counts[gained] = pair_counts.get(gained, 0) + frequency
                grown_pairs.add(gained)
                pair_to_words.setdefault(gained, set()).add(index)
            merged.append(new_id)
            i += 2
            end_of_last_join = i
        else:
            merged.append(word[i])
            i += 1
    return merged if len(merged) < n else None


def _learn_merges(pre_token_counts, n_merges, progress):
    """BPE on pre-token frequencies. Returns (token_bytes, merges): token_bytes[id] for every mergeable id,
    merges[k] = (left, right) that built token 256 + k."""
    words, frequencies = [], []
    for piece, frequency in pre_token_counts.items():
        try:
            data = piece.encode("utf-8")
        except UnicodeEncodeError as error:
            raise ValueError(f"the corpus contains a lone surrogate ({piece[error.start]!r} in the pre-token "
                             f"{piece!r}), which has no UTF-8 encoding; clean the text first") from None
        if len(data) > 1:                       # single bytes hold no pair
            words.append(list(data))
            frequencies.append(frequency)

    pair_counts = {}
    pair_to_words = {}
    for index, (word, frequency) in enumerate(zip(words, frequencies)):
        for pair in zip(word, word[1:]):
            pair_counts[pair] = pair_counts.get(pair, 0) + frequency
            pair_to_words.setdefault(pair, set()).add(index)
    # Max-heap via negated counts; equal counts pop smallest (left, right) first: the documented tie-break.
    heap = [(-count, left, right) for (left, right), count in pair_counts.items()]
    heapq.heapify(heap)

    token_bytes = [bytes([value]) for value in range(256)]
    bytes_to_id = {data: value for value, data in enumerate(token_bytes)}
    merges = []
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=n_merges, desc="learning merges", unit="merge")
    while len(merges) < n_merges and heap:
        negative_count, left, right = heapq.heappop(heap)
        pair = (left, right)
        live_count = pair_counts.get(pair, 0)
        if live_count != -negative_count or live_count <= 0:
            # Stale entry. Counts only fall without a push, so a live count above zero needs its entry back.
            if 0 < live_count < -negative_count:
                heapq.heappush(heap, (-live_count, left, right))
            continue
        data = token_bytes[left] + token_bytes[right]
        new_id = bytes_to_id.get(data)
        if new_id is None:
            new_id = len(token_bytes)
            token_bytes.append(data)
            bytes_to_id[data] = new_id
            merges.append(pair)
            if bar is not None:
                bar.update(1)
        grown_pairs = set()
        for index in pair_to_words.pop(pair):
            merged = _merge_and_count(words[index], left, right, new_id, frequencies[index], index,
                                      pair_counts, pair_to_words, grown_pairs)
            if merged is not None:
                words[index] = merged
        del pair_counts[pair]
        for grown in grown_pairs:
            if pair_counts[grown] > 0:
                heapq.heappush(heap, (-pair_counts[grown], grown[0], grown[1]))
    if bar is not None:
        bar.close()
    return token_bytes, merges


# ----------------------------------------------------------------------------------------------------
# encoding helpers

def _bpe_short(data, ranks):
    """tiktoken's merge rule on one pre-token's bytes, by list scan: O(n^2) but fast for short pieces."""
    parts = [data[i:i + 1] for i in range(len(data))]
    get = ranks.get
    pair_ranks = [get(parts[i] + parts[i + 1], _INFINITE_RANK) for i in range(len(parts) - 1)]
    while pair_ranks:
        best = min(pair_ranks)
        if best == _INFINITE_RANK:
            break
        i = pair_ranks.index(best)              # leftmost of the lowest rank
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
        del pair_ranks[i]
        if i > 0:
            pair_ranks[i - 1] = get(parts[i - 1] + parts[i], _INFINITE_RANK)
        if i < len(pair_ranks):
            pair_ranks[i] = get(parts[i] + parts[i + 1], _INFINITE_RANK)
    return [ranks[part] for part in parts]


def _bpe_long(data, ranks):
    """The same rule with a heap over (rank, start) and a linked list of parts: O(n log n).

    A part starts at byte `start` and ends at part_end[start]; a heap entry (rank, start, end) stands for
    the pair of parts covering data[start:end] and is live while `start` still begins a part whose
    neighbour ends at `end` (boundaries only ever disappear, so that pins the pair down)."""
    n = len(data)
    part_end = list(range(1, n + 1))
    part_before = list(range(-1, n - 1))
    alive = [True] * n
    get = ranks.get
    heap = []
    for start in range(n - 1):
        rank = get(data[start:start + 2])
        if rank is not None:
            heap.append((rank, start, start + 2))
    heapq.heapify(heap)
    while heap:
        rank, start, end = heapq.heappop(heap)
        middle = part_end[start]
        if not alive[start] or middle >= n or part_end[middle] != end:
            continue
        alive[middle] = False                   # join [start, middle) and [middle, end)
        part_end[start] = end
        if end < n:
            part_before[end] = start
        before = part_before[start]
        if before >= 0:
            rank = get(data[before:end])
            if rank is not None:
                heapq.heappush(heap, (rank, before, end))
        if end < n:
            after_end = part_end[end]
            rank = get(data[start:after_end])
            if rank is not None:
                heapq.heappush(heap, (rank, start, after_end))
    ids, start = [], 0
    while start < n:
        ids.append(ranks[data[start:part_end[start]]])
        start = part_end[start]
    return ids


def _pair_ranks(ranks):
    """Dict (left id, right id) -> id of the joined token, for EVERY way of cutting every token into two
    tokens (not only the merge that built it): in tiktoken's rule the rank of two adjacent parts is the
    rank of their joined bytes, however the parts came about."""
    pairs = {}
    for data, rank in ranks.items():
        for cut in range(1, len(data)):
            left = ranks.get(data[:cut])
            if left is not None:
                right = ranks.get(data[cut:])
                if right is not None:
                    pairs[left, right] = rank
    return pairs


def _bpe_ids(data, pair_ranks):
    """_bpe_short on ids: the parts are always tokens, so the rank of two adjacent parts is
    pair_ranks[(left id, right id)] (= the id of the joined token), with no bytes joined or hashed."""
    ids = list(data)
    get = pair_ranks.get
    ranks = list(map(get, zip(data, data[1:]), repeat(_INFINITE_RANK)))
    best = min(ranks, default=_INFINITE_RANK)
    while best != _INFINITE_RANK:
        i = ranks.index(best)                   # leftmost of the lowest rank
        ids[i] = best
        del ids[i + 1], ranks[i]
        if i:
            ranks[i - 1] = get((ids[i - 1], best), _INFINITE_RANK)
        if i < len(ranks):
            ranks[i] = get((best, ids[i + 1]), _INFINITE_RANK)
        elif not ranks:                         # one part left (only if data is itself a token)
            break
        best = min(ranks)
    return tuple(ids)


class _PieceCache(dict):
    """pre-token (str) -> tuple of ids; a miss runs BPE. Emptied wholesale past CACHE_LIMIT entries."""

    def __init__(self, ranks):
        super().__init__()
        self.ranks = ranks
        self.pair_ranks = None                  # built on the first piece that needs merging

    def __missing__(self, piece):
        try:
            data = piece.encode("utf-8")
        except UnicodeEncodeError as error:
            raise ValueError(f"text contains a lone surrogate ({piece[error.start]!r} in {piece!r}), which has "
                             "no UTF-8 encoding; clean the text first (e.g. "
                             "text.encode('utf-8', 'replace').decode())") from None
        rank = self.ranks.get(data)
        if rank is not None:
            ids = (rank,)
        elif len(data) <= _SHORT_PIECE:
            if self.pair_ranks is None:
                self.pair_ranks = _pair_ranks(self.ranks)
            ids = _bpe_ids(data, self.pair_ranks)
        else:
            ids = tuple(_bpe_long(data, self.ranks))
        if len(self) >= CACHE_LIMIT:
            self.clear()
        self[piece] = ids
        return ids


_worker_tokenizer = None


def _init_encode_worker(tokenizer):
    global _worker_tokenizer
    _worker_tokenizer = tokenizer


def _encode_in_worker(args):
    text, allowed_special = args
    # An array of uint32 pickles as one bytes blob, many times faster than a list of Python ints.
    typecode = "I" if _worker_tokenizer.vocab_size <= 1 << 32 else "Q"
    return array.array(typecode, _worker_tokenizer.encode(text, allowed_special=allowed_special))


def _readable(data):
    return data.decode("utf-8", errors="backslashreplace")


# ----------------------------------------------------------------------------------------------------

class Tokenizer:
    """Byte-level BPE with tiktoken-compatible encoding. Build one with `Tokenizer.train` or `load`.

    merges:          list of (left id, right id); merge k creates id 256 + k with the two tokens' bytes
                     joined. Every joined byte string must be new.
    pattern:         split regex string or a name ("gpt4", "gpt2").
    special_tokens:  names in order (ids follow the merges) or a dict name -> id (ids outside the merge
                     range, distinct).
    """

    def __init__(self, merges=(), pattern=GPT4_PATTERN, special_tokens=()):
        self._pattern = resolve_pattern(pattern)
        token_bytes = [bytes([value]) for value in range(256)]
        ranks = {data: value for value, data in enumerate(token_bytes)}
        clean_merges = []
        for number, pair in enumerate(merges):
            if len(pair) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in pair):
                raise ValueError(f"merge {number} must be two integer ids, got {pair!r}")
            left, right = pair
            new_id = len(token_bytes)
            if not (0 <= left < new_id and 0 <= right < new_id):
                raise ValueError(f"merge {number} ({left}, {right}) refers to an id that does not exist yet "
                                 f"(ids below {new_id} exist at that point)")
            data = token_bytes[left] + token_bytes[right]
            if data in ranks:
                raise ValueError(f"merge {number} ({left}, {right}) builds {_readable(data)!r}, which is already "
                                 f"token {ranks[data]}")
            token_bytes.append(data)
            ranks[data] = new_id
            clean_merges.append((left, right))
        self._merges = clean_merges
        self._ranks = ranks
        self._special_tokens = self._assign_special_ids(special_tokens, len(token_bytes))
        self._id_to_bytes = dict(enumerate(token_bytes))
        for name, value in self._special_tokens.items():
            self._id_to_bytes[value] = name.encode("utf-8")
        self._vocab_size = max(self._id_to_bytes) + 1
        self._splitter = _Splitter(self._pattern)
        self._cache = _PieceCache(self._ranks)
        self._special_regex_cache = {}

    @staticmethod
    def _assign_special_ids(special_tokens, n_mergeable):
        if isinstance(special_tokens, str):
            raise TypeError("special_tokens must be a list of names or a dict name -> id, not a single str "
                            f"(did you mean [{special_tokens!r}]?)")
        if isinstance(special_tokens, dict):
            named = dict(special_tokens)
        else:
            names = list(special_tokens)
            if len(set(names)) != len(names):
                raise ValueError(f"special tokens are repeated: {sorted({n for n in names if names.count(n) > 1})}")
            named = {name: n_mergeable + offset for offset, name in enumerate(names)}
        seen_ids = {}
        for name, value in named.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"special token names must be non-empty str, got {name!r}")
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"special token {name!r} needs a non-negative int id, got {value!r}")
            if value < n_mergeable:
                raise ValueError(f"special token {name!r} has id {value}, inside the merge range 0..{n_mergeable - 1}; "
                                 f"special ids must be >= {n_mergeable}")
            if value in seen_ids:
                raise ValueError(f"special tokens {seen_ids[value]!r} and {name!r} share id {value}")
            seen_ids[value] = name
            try:
                name.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"special token {name!r} contains a lone surrogate") from None
        return named

    # ------------------------------------------------------------------------------------------------
    # training

    @classmethod
    def train(cls, texts, vocab_size, special_tokens=(), pattern=GPT4_PATTERN, *, workers=1, progress=None):
        """Learn a BPE vocabulary of `vocab_size` ids (256 bytes + merges + special tokens).

        texts:          a str, or an iterable of str (a generator streaming files is fine; each item is
                        pre-tokenized on its own and only the pre-token counts are kept).
        special_tokens: names (ids right after the merges, in order) or a dict name -> id.
        pattern:        split regex or "gpt4" / "gpt2".
        workers:        processes that count pre-tokens (the merge loop itself is serial).
        progress:       True/False shows/hides tqdm bars; None shows them only for corpora above 50 MB
                        when stderr is a terminal.
        """
        pattern = resolve_pattern(pattern)
        if isinstance(special_tokens, str):
            raise TypeError(f"special_tokens must be a list of names or a dict, not a str (did you mean "
                            f"[{special_tokens!r}]?)")
        special_tokens = dict(special_tokens) if isinstance(special_tokens, dict) else list(special_tokens)
        if not isinstance(vocab_size, int) or isinstance(vocab_size, bool):
            raise TypeError(f"vocab_size must be an int, got {type(vocab_size).__name__}")
        if vocab_size < 256 + len(special_tokens):
            raise ValueError(f"vocab_size={vocab_size} is too small: it must hold the 256 byte tokens plus "
                             f"{len(special_tokens)} special token(s), i.e. at least {256 + len(special_tokens)}")
        if not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be a positive int, got {workers!r}")
        n_merges = vocab_size - 256 - len(special_tokens)
        cls._assign_special_ids(special_tokens, 256 + n_merges)   # fail before the long part, not after

        splitter = _Splitter(pattern)
        counts, n_chars = _count_pre_tokens(texts, splitter, workers, progress, tuple(special_tokens))
        if not counts or n_chars == 0:
            raise ValueError("the corpus is empty: no text to learn merges from")
        show_merges = progress is True or (progress is None and n_chars >= _AUTO_PROGRESS_BYTES
                                           and sys.stderr.isatty())
        _, merges = _learn_merges(counts, n_merges, show_merges)
        tokenizer = cls(merges, pattern, special_tokens)
        if len(merges) < n_merges:
            warnings.warn(f"the corpus ran out of pairs after {len(merges)} of {n_merges} merges; vocab_size is "
                          f"{tokenizer.vocab_size}, not {vocab_size}", stacklevel=2)
        return tokenizer

    # ------------------------------------------------------------------------------------------------
    # properties

    @property
    def pattern(self):
        """The split regex string (pass it to tiktoken as pat_str)."""
        return self._pattern

    @property
    def merges(self):
        """List of (left id, right id); entry k built token 256 + k."""
        return list(self._merges)

    @property
    def special_tokens(self):
        """Dict special-token name -> id."""
        return dict(self._special_tokens)

    @property
    def vocab_size(self):
        """One more than the largest id (the size an embedding table needs)."""
        return self._vocab_size

    def mergeable_ranks(self):
        """Dict token bytes -> rank (= id), the 256 single bytes first: tiktoken's `mergeable_ranks`."""
        return dict(self._ranks)

    def token_bytes(self, token_id):
        """The bytes of one id (a special token's name in UTF-8)."""
        try:
            return self._id_to_bytes[token_id]
        except (KeyError, TypeError):
            raise ValueError(f"unknown token id {token_id!r} (vocab_size is {self.vocab_size})") from None

    def __repr__(self):
        name = next((name for name, value in PATTERNS.items() if value == self._pattern), "custom")
        return (f"Tokenizer(vocab_size={self.vocab_size}, merges={len(self._merges)}, "
                f"special_tokens={len(self._special_tokens)}, pattern={name})")

    # ------------------------------------------------------------------------------------------------
    # encoding and decoding

    def encode_ordinary(self, text):
        """Ids of text, with special-token strings encoded as plain text."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        ids = []
        extend, lookup = ids.extend, self._cache.__getitem__
        for chunk in self._splitter.safe_chunks(text):      # bounds the memory held by the pieces
            # ids.extend(tuple of ids) for every piece, looped in C: any() runs the map to its end because
            # extend returns None. About 20% faster than ids += chain.from_iterable(...), which makes an
            # iterator per piece.
            any(map(extend, map(lookup, self._splitter.findall(chunk))))
        return ids

    def encode(self, text, allowed_special=()):
        """Ids of text. Special tokens named in allowed_special ("all" for every one) become their ids; any
        other special token appearing in the text raises ValueError (use encode_ordinary for plain text)."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        allowed = self._allowed_set(allowed_special)
        for name in self._special_tokens:
            if name not in allowed and name in text:
                raise ValueError(
                    f"the text contains the special token {name!r}, which is not allowed here. Pass "
                    f"allowed_special={{{name!r}}} (or 'all') to encode it as the special token, or call "
                    "encode_ordinary() to encode it as plain text.")
        present = [name for name in allowed if name in text]
        if not present:
            return self.encode_ordinary(text)
        key = frozenset(present)
        splitter = self._special_regex_cache.get(key)
        if splitter is None:
            # Longest first, so a name that extends another wins, as a greedy reader would expect.
            splitter = re.compile("(" + _special_splitter(key).pattern + ")")
            self._special_regex_cache[key] = splitter
        ids = []
        for position, segment in enumerate(splitter.split(text)):
            if position % 2:                    # odd positions of split() are the captured specials
                ids.append(self._special_tokens[segment])
            elif segment:
                ids.extend(self.encode_ordinary(segment))
        return ids

    def _allowed_set(self, allowed_special):
        if isinstance(allowed_special, str):
            allowed_special = (allowed_special,)
        if "all" in allowed_special:
            return set(self._special_tokens)
        allowed = set(allowed_special)
        unknown = allowed - set(self._special_tokens)
        if unknown:
            raise ValueError(f"allowed_special names unknown special tokens {sorted(unknown)}; this tokenizer has "
                             f"{sorted(self._special_tokens)}")
        return allowed

    def encode_batch(self, texts, allowed_special=(), workers=1):
        """[encode(text) for text in texts], spread over `workers` processes when workers > 1."""
        texts = list(texts)
        self._allowed_set(allowed_special)      # bad names fail here, not in a worker
        if workers <= 1 or len(texts) < 2:
            return [self.encode(text, allowed_special) for text in texts]
        workers = min(workers, len(texts))
        chunksize = max(1, len(texts) // (workers * 4))
        allowed = (allowed_special,) if isinstance(allowed_special, str) else tuple(allowed_special)
        with multiprocessing.get_context().Pool(workers, initializer=_init_encode_worker,
                                                initargs=(self,)) as pool:
            encoded = pool.map(_encode_in_worker, [(text, allowed) for text in texts], chunksize=chunksize)
        return [ids.tolist() for ids in encoded]

    def decode_bytes(self, ids):
        """The exact bytes of ids (special tokens as their names in UTF-8)."""
        if hasattr(ids, "tolist"):              # numpy arrays: plain ints are much faster to look up
            ids = ids.tolist()
        try:
            return b"".join(map(self._id_to_bytes.__getitem__, ids))
        except (KeyError, TypeError):
            bad = next(i for i in ids if not isinstance(i, int) or i not in self._id_to_bytes)
            raise ValueError(f"unknown token id {bad!r} (vocab_size is {self.vocab_size})") from None

    def decode(self, ids):
        """Text of ids; byte sequences that are not valid UTF-8 become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    # pickling (for encode_batch workers): rebuild from the definition, not the cache
    def __getstate__(self):
        return {"merges": self._merges, "pattern": self._pattern, "special_tokens": self._special_tokens}

    def __setstate__(self, state):
        self.__init__(state["merges"], state["pattern"], state["special_tokens"])

    def __eq__(self, other):
        return isinstance(other, Tokenizer) and self.__getstate__() == other.__getstate__()

    __hash__ = None

    # ------------------------------------------------------------------------------------------------
    # files

    def _checksum(self):
        payload = json.dumps([FILE_VERSION, self._pattern, sorted(self._special_tokens.items()),
                              self._merges], ensure_ascii=True, separators=(",", ":"))
        return hashlib.sha256(payload.encode("ascii")).hexdigest()

    def save(self, path):
        """Write one human-readable JSON file (UTF-8): format, version, pattern, special tokens, the merges
        one per line as [left id, right id, "token text"], and a sha256 over the content. Written to a
        temporary file first and renamed, so an interrupted save never leaves a half file behind."""
        token_bytes = self._id_to_bytes
        lines = [
            "{",
            f'  "format": {json.dumps(FILE_FORMAT)},',
            f'  "version": {FILE_VERSION},',
            f'  "pattern": {json.dumps(self._pattern, ensure_ascii=False)},',
            f'  "special_tokens": {json.dumps(self._special_tokens, ensure_ascii=False)},',
            f'  "sha256": "{self._checksum()}",',
            '  "merges": [',
        ]
        merge_lines = [f"    [{left}, {right}, {json.dumps(_readable(token_bytes[256 + k]), ensure_ascii=False)}]"
                       for k, (left, right) in enumerate(self._merges)]
        lines.append(",\n".join(merge_lines))
        lines += ["  ]", "}", ""]
        temporary = f"{path}.tmp{os.getpid()}"
        with open(temporary, "w", encoding="utf-8") as file:
            file.write("\n".join(lines))
        os.replace(temporary, path)

    @classmethod
    def load(cls, path):
        """Read a file written by save(); TokenizerFileError (a ValueError) says what is wrong with it."""
        with open(path, "rb") as file:
            raw = file.read()
        try:
            content = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise TokenizerFileError(f"{path}: not a tokenizer file (not UTF-8 text)") from None
        except json.JSONDecodeError as error:
            raise TokenizerFileError(f"{path}: not valid JSON ({error.msg} at line {error.lineno}, column "
                                     f"{error.colno}); the file is truncated or corrupted") from None
        if not isinstance(content, dict) or content.get("format") != FILE_FORMAT:
            raise TokenizerFileError(f"{path}: not a tinygrad_llm tokenizer file (expected \"format\": "
                                     f"\"{FILE_FORMAT}\")")
        version = content.get("version")
        if version != FILE_VERSION:
            raise TokenizerFileError(f"{path}: tokenizer file version {version!r} is not supported; this "
                                     f"tinygrad_llm reads version {FILE_VERSION}")
        missing = [key for key in ("pattern", "special_tokens", "merges", "sha256") if key not in content]
        if missing:
            raise TokenizerFileError(f"{path}: missing field(s) {missing}")
        merges = content["merges"]
        if not isinstance(merges, list) or not isinstance(content["special_tokens"], dict):
            raise TokenizerFileError(f"{path}: \"merges\" must be a list and \"special_tokens\" an object")
        pairs = []
        for number, entry in enumerate(merges):
            if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[2], str)):
                raise TokenizerFileError(f"{path}: merge {number} must be [left id, right id, \"text\"], got {entry!r}")
            pairs.append(tuple(entry[:2]))
        try:
            tokenizer = cls(pairs, content["pattern"], content["special_tokens"])
        except (TypeError, ValueError) as error:
            raise TokenizerFileError(f"{path}: invalid content: {error}") from None
        for number, entry in enumerate(merges):
            if entry[2] != _readable(tokenizer._id_to_bytes[256 + number]):
                raise TokenizerFileError(f"{path}: merge {number} says it builds {entry[2]!r} but its ids build "
                                         f"{_readable(tokenizer._id_to_bytes[256 + number])!r}; the file is corrupted")
        if content["sha256"] != tokenizer._checksum():
            raise TokenizerFileError(f"{path}: sha256 does not match the content; the file was corrupted or "
                                     "edited (after a deliberate edit, re-save it with Tokenizer.save)")
        return tokenizer

    def export_tiktoken(self, path):
        """Write tiktoken's plain format, one "base64(token bytes) rank" line per mergeable token, so that
        tiktoken.load.load_tiktoken_bpe(path) returns mergeable_ranks(). Special tokens and the pattern are
        not part of that format: pass tok.special_tokens and tok.pattern to tiktoken.Encoding yourself."""
        with open(path, "w", encoding="ascii") as file:
            for data, rank in sorted(self._ranks.items(), key=lambda item: item[1]):
                file.write(f"{base64.b64encode(data).decode('ascii')} {rank}\n")


# ---------------------------------------------------------------------------------------------- char level
END_OF_TEXT = "<|endoftext|>"


class CharVocab:
    """A character-level vocabulary: one id per distinct character, sorted, then special tokens.

    `encode_ordinary` matches the Tokenizer protocol; a character outside the vocabulary raises KeyError
    naming it. Saved as JSON (`vocab.json`), never pickled."""

    def __init__(self, chars, special_tokens=(END_OF_TEXT,)):
        self.chars = list(chars)
        if len(set(self.chars)) != len(self.chars):
            raise ValueError("duplicate characters in vocabulary")
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        self.special_tokens = {s: len(self.chars) + i for i, s in enumerate(special_tokens)}
        self.itos = {i: c for c, i in self.stoi.items()}
        self.itos.update({i: s for s, i in self.special_tokens.items()})

    @classmethod
    def from_text(cls, text_or_texts, special_tokens=(END_OF_TEXT,)):
        chars = set()
        for text in ([text_or_texts] if isinstance(text_or_texts, str) else text_or_texts):
            chars.update(text)
        return cls(sorted(chars), special_tokens)

    @property
    def vocab_size(self):
        return len(self.chars) + len(self.special_tokens)

    @property
    def eot_id(self):
        return self.special_tokens.get(END_OF_TEXT)

    def encode_ordinary(self, text):
        stoi = self.stoi
        try:
            return [stoi[c] for c in text]
        except KeyError as e:
            raise KeyError(f"character {e.args[0]!r} is not in the vocabulary") from None

    def encode(self, text):
        return self.encode_ordinary(text)

    def decode(self, ids):
        return "".join(self.itos[int(i)] for i in ids)

    def save(self, path):
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"type": "char", "chars": "".join(self.chars), "special_tokens": list(self.special_tokens)},
                      f, ensure_ascii=False)

    @classmethod
    def from_dict(cls, state, where="vocab.json"):
        """A CharVocab from its JSON object; ValueError naming `where` and the field for anything malformed."""
        if not isinstance(state, dict) or state.get("type") != "char":
            raise ValueError(f"{where} is not a CharVocab file (expected an object with \"type\": \"char\")")
        chars, specials = state.get("chars"), state.get("special_tokens", [])
        if not isinstance(chars, str) or not chars:
            raise ValueError(f"{where}: field 'chars' must be a non-empty string, got {chars!r:.60}")
        if not isinstance(specials, list) or not all(isinstance(s, str) and s for s in specials):
            raise ValueError(f"{where}: field 'special_tokens' must be a list of strings, got {specials!r:.60}")
        if len(set(chars)) != len(chars) or len(set(specials)) != len(specials) or set(chars) & set(specials):
            raise ValueError(f"{where}: field 'chars' or 'special_tokens' repeats an entry")
        return cls(list(chars), tuple(specials))

    @classmethod
    def load(cls, path):
        try:
            with open(path, encoding="utf-8") as f:
                state = json.load(f)
        except UnicodeDecodeError:
            raise ValueError(f"{path} is not a CharVocab file (not UTF-8 text)") from None
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not a CharVocab file (not valid JSON: {error.msg})") from None
        return cls.from_dict(state, str(path))


def load_tokenizer(path):
    """A tokenizer file: a CharVocab (`"type": "char"`, as in vocab.json) or a byte-level BPE Tokenizer
    file, told apart by their JSON. FileNotFoundError for a missing path, ValueError for a bad file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            content = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError):
        content = None                       # Tokenizer.load names what is wrong with the file
    if isinstance(content, dict) and content.get("type") == "char":
        return CharVocab.from_dict(content, str(path))
    if isinstance(content, (list, str, int, float)) or (isinstance(content, dict) and "format" not in content):
        raise ValueError(f"{path} is neither a CharVocab file (\"type\": \"char\") nor a tinygrad_llm "
                         f"tokenizer file (\"format\": \"{FILE_FORMAT}\")")
    return Tokenizer.load(path)


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 over what every id means (its bytes, special tokens by name): two tokenizers of the same
    size but different vocabularies get different fingerprints."""
    digest = hashlib.sha256()
    specials = getattr(tokenizer, "special_tokens", {})
    specials = dict(specials) if isinstance(specials, dict) else {}
    by_id = {i: s for s, i in specials.items()}
    for i in range(tokenizer.vocab_size):
        if i in by_id:
            piece = b"\x00special:" + by_id[i].encode("utf-8")
        elif hasattr(tokenizer, "token_bytes"):
            try:
                piece = tokenizer.token_bytes(i)
            except ValueError:
                piece = b"\x00unused"
        else:
            piece = tokenizer.decode([i]).encode("utf-8")
        digest.update(len(piece).to_bytes(4, "little") + piece)
    return digest.hexdigest()
