"""Rule-based quality filters in the style of Gopher (Rae et al. 2021, App. A) and C4 (Raffel et al. 2020).

Each filter is a named statistic of a document with an allowed [low, high] range; a document outside
any enabled range is dropped and counted under that filter's name (the first failing filter in the
order below, so counts add up to the number dropped). Every bound is configurable through
`FilterConfig` (a dict of {name: (low, high)} overrides plus a set of disabled names).

| name                 | statistic                                                   | default keeps |
|----------------------|-------------------------------------------------------------|---------------|
| word_count           | whitespace-separated words                                  | 50 .. 10^6    |
| mean_word_length     | mean characters per word                                    | 3 .. 10       |
| symbol_word_ratio    | ('#' words + '...'/'…' occurrences) / words                 | <= 0.1        |
| bullet_lines         | share of lines starting with a bullet (•, -, *, ‣, ◦, ▪)    | <= 0.9        |
| ellipsis_lines       | share of lines ending in '...' or '…'                       | <= 0.3        |
| non_alpha_words      | share of words without any alphabetic character            | <= 0.2        |
| non_alpha_chars      | share of non-space characters that are not letters          | <= 0.35       |
| duplicate_lines      | share of lines (of >= 4 words) that repeat an earlier line  | <= 0.3        |
| duplicate_paragraphs | share of paragraphs that repeat an earlier one              | <= 0.3        |
| top_2gram_coverage   | characters covered by the most frequent word 2-gram         | <= 0.20       |
| top_3gram_coverage   | ... 3-gram                                                  | <= 0.18       |
| top_4gram_coverage   | ... 4-gram                                                  | <= 0.16       |
| markup_density       | characters inside HTML/XML tags / all characters            | <= 0.05       |

Simplifications against the papers: Gopher's stop-word rule and C4's line-level edits (dropping
lines without terminal punctuation, "lorem ipsum", "javascript") are not applied: the first removes
verse, the second rewrites documents rather than judging them. duplicate_lines ignores lines shorter
than four words, because a play repeats its speaker names ("Ham.") on hundreds of lines and Gopher's
unrestricted rule would drop every play of the built-in corpus.
"""
import re
import string
from dataclasses import dataclass, field

import numpy as np

_BULLETS = ("•", "-", "*", "‣", "◦", "▪", "●", "·")
_ELLIPSIS = re.compile(r"(\.\.\.|…)")
_HASH_WORD = re.compile(r"(?:^|\s)#")
_BULLET_LINE = re.compile(r"^[ \t]*[•\-*‣◦▪●·]", re.MULTILINE)
_ELLIPSIS_LINE = re.compile(r"(\.\.\.|…)[ \t]*$", re.MULTILINE)
_ALPHA_WORD = re.compile(r"[^\W\d_]\S*")        # from a word's first letter to its end: one match per word
_LETTERS = re.compile(r"[^\W\d_]+")
_ASCII_LETTERS = string.ascii_letters.encode("ascii")
_NONEMPTY_LINE = re.compile(r"\S[^\n]*")
_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9:-]*(\s[^<>]*)?/?>|<!--.*?-->", re.DOTALL)

DEFAULT_BOUNDS = {
    "word_count": (50, 1_000_000),
    "mean_word_length": (3.0, 10.0),
    "symbol_word_ratio": (0.0, 0.1),
    "bullet_lines": (0.0, 0.9),
    "ellipsis_lines": (0.0, 0.3),
    "non_alpha_words": (0.0, 0.2),
    "non_alpha_chars": (0.0, 0.35),
    "duplicate_lines": (0.0, 0.3),
    "duplicate_paragraphs": (0.0, 0.3),
    "top_2gram_coverage": (0.0, 0.20),
    "top_3gram_coverage": (0.0, 0.18),
    "top_4gram_coverage": (0.0, 0.16),
    "markup_density": (0.0, 0.05),
}
FILTER_NAMES = tuple(DEFAULT_BOUNDS)


@dataclass
class FilterConfig:
    """Bounds per filter ({name: (low, high)}, merged over the defaults) and names switched off."""
    bounds: dict = field(default_factory=dict)
    disabled: set = field(default_factory=set)

    def __post_init__(self):
        unknown = (set(self.bounds) | set(self.disabled)) - set(FILTER_NAMES)
        if unknown:
            raise ValueError(f"unknown filter(s) {sorted(unknown)}; known: {', '.join(FILTER_NAMES)}")
        self.bounds = {**DEFAULT_BOUNDS, **{k: tuple(v) for k, v in self.bounds.items()}}

    def enabled(self):
        return [n for n in FILTER_NAMES if n not in self.disabled]


class _Ids(dict):
    """word -> dense id in order of first appearance."""

    def __missing__(self, word):
        self[word] = value = len(self)
        return value


def _top_ngram_coverage(word_ids, word_lengths, n):
    """Share of word characters covered by the document's most frequent word n-gram (Gopher)."""
    if len(word_ids) < n:
        return 0.0
    keys = word_ids[: len(word_ids) - n + 1].astype(np.int64)
    base = int(word_ids.max()) + 1
    for k in range(1, n):                        # pack n ids into one int64 (exact while base^n < 2^63)
        if base ** (k + 1) >= 2 ** 62:
            keys = (keys * 1_000_003 + word_ids[k: len(word_ids) - n + 1 + k]) & ((1 << 62) - 1)
        else:
            keys = keys * base + word_ids[k: len(word_ids) - n + 1 + k]
    uniq, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    top = int(np.argmax(counts))
    if counts[top] < 2:
        return 0.0
    starts = np.nonzero(inverse == top)[0]
    covered = np.zeros(len(word_ids), dtype=bool)   # overlapping occurrences count their characters once
    for k in range(n):
        covered[starts + k] = True
    return float(word_lengths[covered].sum() / max(1, word_lengths.sum()))


def document_stats(text: str, names=FILTER_NAMES) -> dict:
    """Every filter statistic for one document (only those in `names` are computed)."""
    names = set(names)
    words = text.split()
    n_words = len(words)
    stats = {}
    n_lines = max(1, len(_NONEMPTY_LINE.findall(text)))
    if "word_count" in names:
        stats["word_count"] = n_words
    lengths = np.fromiter(map(len, words), dtype=np.int64, count=n_words)
    if "mean_word_length" in names:
        stats["mean_word_length"] = float(lengths.mean()) if n_words else 0.0
    if "symbol_word_ratio" in names:
        symbols = (len(_HASH_WORD.findall(text)) if "#" in text else 0) + \
            (len(_ELLIPSIS.findall(text)) if ("..." in text or "…" in text) else 0)
        stats["symbol_word_ratio"] = symbols / max(1, n_words)
    if "bullet_lines" in names:
        stats["bullet_lines"] = len(_BULLET_LINE.findall(text)) / n_lines
    if "ellipsis_lines" in names:
        has = "..." in text or "…" in text
        stats["ellipsis_lines"] = (len(_ELLIPSIS_LINE.findall(text)) if has else 0) / n_lines
    if "non_alpha_words" in names:
        with_letter = len(_ALPHA_WORD.findall(text))         # words holding a letter (one match each)
        stats["non_alpha_words"] = max(0, n_words - with_letter) / max(1, n_words)
    if "non_alpha_chars" in names:
        non_space = int(lengths.sum())
        if text.isascii():                            # bytes.translate deletes letters at C speed
            raw = text.encode("ascii")
            letters = len(raw) - len(raw.translate(None, _ASCII_LETTERS))
        else:
            letters = sum(map(len, _LETTERS.findall(text)))
        stats["non_alpha_chars"] = 1.0 - letters / max(1, non_space)
    if "duplicate_lines" in names:
        long_lines = [l.strip() for l in text.split("\n") if len(l.split()) >= 4]
        stats["duplicate_lines"] = (len(long_lines) - len(set(long_lines))) / max(1, len(long_lines))
    if "duplicate_paragraphs" in names:
        paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
        stats["duplicate_paragraphs"] = (len(paragraphs) - len(set(paragraphs))) / max(1, len(paragraphs))
    wanted_ngrams = [n for n in (2, 3, 4) if f"top_{n}gram_coverage" in names]
    if wanted_ngrams:
        vocab = _Ids()
        lowered = text.lower().split()
        ids = np.fromiter(map(vocab.__getitem__, lowered), dtype=np.int64, count=len(lowered))
        if len(lowered) != n_words:                    # lowercasing never adds spaces; stay safe anyway
            lengths = np.fromiter(map(len, lowered), dtype=np.int64, count=len(lowered))
        for n in wanted_ngrams:
            stats[f"top_{n}gram_coverage"] = _top_ngram_coverage(ids, lengths, n)
    if "markup_density" in names:
        stats["markup_density"] = sum(m.end() - m.start() for m in _TAG.finditer(text)) / max(1, len(text))
    return stats


def check_document(text: str, config: FilterConfig = None):
    """Name of the first filter the document fails, or None when it passes them all."""
    config = config or FilterConfig()
    enabled = config.enabled()
    stats = document_stats(text, enabled)
    for name in enabled:
        low, high = config.bounds[name]
        if not (low <= stats[name] <= high):
            return name
    return None
