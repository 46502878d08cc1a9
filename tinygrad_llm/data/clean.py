"""Text cleaning: Unicode NFC, line endings, whitespace, Project Gutenberg boilerplate.

`clean_text` is a pure function of its input, so re-running it on its own output changes nothing
(tested). What it normalises:

  - a leading byte-order mark is dropped; CRLF and lone CR become LF; form feeds and other
    Unicode line/paragraph separators become LF;
  - Unicode NFC (composed accents, so "é" is one code point however it arrived);
  - control characters other than tab and newline are removed; tabs and runs of spaces inside a line
    become one space; trailing spaces are stripped; three or more blank lines collapse to two (one
    empty line between paragraphs); leading/trailing blank lines are removed;
  - Gutenberg header and licence: everything up to a `*** START OF THIS PROJECT GUTENBERG ...` or
    `*END*THE SMALL PRINT!` line, and everything from `*** END OF THIS PROJECT GUTENBERG ...` or
    `End of the Project Gutenberg EBook` on. Only when such markers exist: the texts of the
    built-in corpus were already stripped by their packager and pass through untouched.

Simplification: leading indentation is collapsed too (poetry loses its indents); keep it with
`keep_indent=True`.
"""
import re
import unicodedata
from dataclasses import dataclass

_GUTENBERG_START = re.compile(
    r"^\s*(\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*|\*END\*\s*THE SMALL PRINT.*)$",
    re.IGNORECASE | re.MULTILINE)
_GUTENBERG_END = re.compile(
    r"^\s*(\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG.*|End of (the )?Project Gutenberg.*)$",
    re.IGNORECASE | re.MULTILINE)
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f]")
_LINE_SEPARATORS = re.compile(r"\r\n?|[\x0c\x85\u2028\u2029]")
# Only what must change is matched (a run of 2+ blanks, or one blank other than a plain space): a
# pattern matching every single space would rebuild the whole text for nothing.
_BLANK = "[ \\t\\u00a0\\u2000-\\u200a\\u202f\\u205f\\u3000]"
_SPACES = re.compile(_BLANK + "{2,}|[\\t\\u00a0\\u2000-\\u200a\\u202f\\u205f\\u3000]")
_TRAILING = re.compile(r"[ \t]+$", re.MULTILINE)
_SPACE_AROUND_NEWLINE = re.compile(r" \n ?|\n ")   # after spaces are collapsed, at most one each side
_BLANK_RUNS = re.compile(r"\n{3,}")
_GUTENBERG_HINTS = ("GUTENBERG", "Gutenberg", "gutenberg", "SMALL PRINT", "small print")


@dataclass
class CleanStats:
    """Counts of what cleaning changed, summed over documents."""
    documents: int = 0
    gutenberg_stripped: int = 0
    chars_in: int = 0
    chars_out: int = 0


def strip_gutenberg(text: str):
    """Remove a Project Gutenberg header/licence and footer; returns (text, whether anything was cut)."""
    if not any(hint in text for hint in _GUTENBERG_HINTS):   # plain substring scans: cheap
        return text, False
    start = _GUTENBERG_START.search(text)
    end = _GUTENBERG_END.search(text, start.end() if start else 0)
    if not start and not end:
        return text, False
    return text[start.end() if start else 0: end.start() if end else len(text)], True


def clean_text(text: str, strip_boilerplate=True, keep_indent=False, stats: CleanStats = None) -> str:
    """Normalise one document's text (see the module docstring for the exact rules)."""
    if stats is not None:
        stats.documents += 1
        stats.chars_in += len(text)
    text = text.lstrip("\ufeff")
    if any(c in text for c in "\r\x0c\x85\u2028\u2029"):   # substring scans are far cheaper than a regex pass
        text = _LINE_SEPARATORS.sub("\n", text)
    if strip_boilerplate:
        text, cut = strip_gutenberg(text)
        if cut and stats is not None:
            stats.gutenberg_stripped += 1
    text = _CONTROL.sub("", text)
    if not text.isascii():
        text = unicodedata.normalize("NFC", text)
    if keep_indent:
        text = _TRAILING.sub("", text)
    else:
        if "  " in text or "\t" in text or not text.isascii():
            text = _SPACES.sub(" ", text)
        if " \n" in text or "\n " in text:
            text = _SPACE_AROUND_NEWLINE.sub("\n", text)
    if "\n\n\n" in text:
        text = _BLANK_RUNS.sub("\n\n", text)
    text = text.strip("\n")
    if not keep_indent:
        text = text.strip(" ")
    if stats is not None:
        stats.chars_out += len(text)
    return text
