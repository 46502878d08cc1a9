"""Document sources: text files, directories and JSONL files, streamed one document at a time.

A `Document` is an id (where it came from), its text and a small metadata dict. Sources never hold
the corpus in memory: `iter_documents` yields documents lazily, one file (or one JSONL line) at a
time, and counts what it could not use in a `SourceStats` instead of raising or silently skipping.

Simplifications: a file is one document (a JSONL line is one document); binary files are recognised
by a NUL byte or a high share of control bytes in their first 8 KiB, the same heuristic `git` and
`grep` use; text is always decoded as UTF-8 (invalid bytes become U+FFFD and are counted).
"""
import json
import os
from dataclasses import dataclass, field

TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
_SNIFF_BYTES = 8192
_CONTROL_BYTES = bytes(set(range(32)) - {9, 10, 12, 13, 27})   # control bytes that text files avoid


@dataclass
class Document:
    """One unit of text moving through the pipeline."""
    id: str
    text: str
    meta: dict = field(default_factory=dict)


@dataclass
class SourceStats:
    """What the readers saw and what they could not use (nothing is dropped without a count)."""
    files: int = 0
    documents: int = 0
    bytes_read: int = 0
    empty: int = 0
    binary: int = 0
    unreadable: int = 0
    bad_json: int = 0
    missing_field: int = 0
    invalid_utf8_docs: int = 0
    invalid_utf8_bytes: int = 0
    skipped: list = field(default_factory=list)   # (path, reason), first 100 only

    def skip(self, path, reason):
        if len(self.skipped) < 100:
            self.skipped.append((str(path), reason))

    def as_dict(self):
        return {k: v for k, v in self.__dict__.items()}


class MissingInputError(FileNotFoundError):
    """Raised before any work starts when an input path does not exist."""


def looks_binary(head: bytes) -> bool:
    """True when a file's first bytes look like binary data rather than text."""
    if not head:
        return False
    if b"\x00" in head:
        return True
    control = sum(head.count(b) for b in _CONTROL_BYTES)
    return control / len(head) > 0.05


def decode_utf8(raw: bytes):
    """Decode UTF-8 with replacement; return (text, number of invalid byte sequences replaced)."""
    try:
        return raw.decode("utf-8"), 0
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        # U+FFFD already present in valid input is not an error: count only the new ones
        return text, text.count("\ufffd") - raw.count("\ufffd".encode("utf-8"))


def expand_paths(paths, suffixes=TEXT_SUFFIXES + JSONL_SUFFIXES):
    """Files named by `paths` (files as given, directories searched recursively), in sorted order.

    Raises MissingInputError naming every missing path, so a typo fails before hours of work."""
    missing = [str(p) for p in paths if not os.path.exists(p)]
    if missing:
        raise MissingInputError("input path(s) not found: " + ", ".join(missing))
    files = []
    for p in paths:
        if os.path.isdir(p):
            found = []
            for root, dirs, names in os.walk(p):
                dirs.sort()
                found += [os.path.join(root, n) for n in names if n.lower().endswith(suffixes)]
            files += sorted(found)
        else:
            files.append(str(p))
    return files


def iter_text_file(path, stats: SourceStats):
    """Yield the file as one Document, or nothing (counted) when it is empty, binary or unreadable."""
    stats.files += 1
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        stats.unreadable += 1
        stats.skip(path, f"unreadable: {e.strerror}")
        return
    stats.bytes_read += len(raw)
    if looks_binary(raw[:_SNIFF_BYTES]):
        stats.binary += 1
        stats.skip(path, "binary")
        return
    text, bad = decode_utf8(raw)
    if bad:
        stats.invalid_utf8_docs += 1
        stats.invalid_utf8_bytes += bad
    if not text.strip():
        stats.empty += 1
        stats.skip(path, "empty")
        return
    stats.documents += 1
    yield Document(id=str(path), text=text, meta={"invalid_utf8": bad} if bad else {})


def iter_jsonl_file(path, stats: SourceStats, text_field="text"):
    """Yield one Document per JSONL line that has a non-empty string in `text_field`."""
    stats.files += 1
    try:
        f = open(path, "rb")
    except OSError as e:
        stats.unreadable += 1
        stats.skip(path, f"unreadable: {e.strerror}")
        return
    with f:
        for lineno, raw in enumerate(f, 1):
            stats.bytes_read += len(raw)
            if not raw.strip():
                continue
            line, bad = decode_utf8(raw)
            try:
                record = json.loads(line)
            except ValueError:
                stats.bad_json += 1
                stats.skip(f"{path}:{lineno}", "bad json")
                continue
            text = record.get(text_field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                stats.missing_field += 1
                stats.skip(f"{path}:{lineno}", f"no string field {text_field!r}")
                continue
            if bad:
                stats.invalid_utf8_docs += 1
                stats.invalid_utf8_bytes += bad
            if not text.strip():
                stats.empty += 1
                continue
            stats.documents += 1
            meta = {k: v for k, v in record.items() if k != text_field}
            yield Document(id=f"{path}:{lineno}", text=text, meta=meta)


def iter_documents(paths, stats: SourceStats = None, text_field="text"):
    """Stream Documents from files, directories (recursive *.txt, *.md, *.jsonl) and JSONL files."""
    stats = stats if stats is not None else SourceStats()
    for path in expand_paths(paths):
        if path.lower().endswith(JSONL_SUFFIXES):
            yield from iter_jsonl_file(path, stats, text_field)
        else:
            yield from iter_text_file(path, stats)
