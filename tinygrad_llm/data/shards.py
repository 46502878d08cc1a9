"""Token shards in llm.c's `.bin` layout, a character-level vocabulary, and parallel tokenization.

Shard layout (llm.c `dev/data/data_common.py`, so shards interoperate with llm.c and nanoGPT-style
loaders): a header of 256 little-endian int32 — [0] magic 20240520, [1] version (1: tokens are uint16,
2: tokens are uint32), [2] number of tokens — then the tokens. A shard is written to `<name>.tmp` and
renamed to `<name>` only after the last byte is flushed and the header's count matches, so a crash or
Ctrl-C never leaves a complete-looking half shard; `read_shard` also checks the file size against the
header and refuses a truncated file.

Documents are joined with the end-of-text token placed *before* each document (llm.c's convention: the
model always sees `<|endoftext|>` as the start of a new document). The train/val split is by document:
a document goes to val when blake2b(text) mod 2^64 / 2^64 < val_fraction, independent of order, worker
count or which other documents exist. For a single long file (the classic char-level tinyshakespeare
benchmark) `split="tail"` instead puts the last val_fraction of each document's characters in val.

Tokenizers: anything with `encode_ordinary(text) -> list[int]`, `vocab_size` and `special_tokens`
({str: id}) — tinygrad_llm.tokenizer.Tokenizer or tinygrad_llm.tokenizer.CharVocab.
"""
import hashlib
import json
import multiprocessing
import os

import numpy as np

from ..tokenizer import CharVocab, load_tokenizer  # noqa: F401  (they live with the tokenizer)

SHARD_MAGIC = 20240520
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
EOT = "<|endoftext|>"


class ShardError(ValueError):
    """A shard file is malformed, truncated or was never completed."""


def token_dtype(vocab_size: int):
    """uint16 (llm.c version 1) when every id fits, else uint32 (version 2)."""
    return np.uint16 if vocab_size <= 2 ** 16 else np.uint32


def write_shard(path, tokens, vocab_size=None):
    """Write `tokens` (1-D ints) as one llm.c shard, atomically (temp name, fsync, rename)."""
    tokens = np.asarray(tokens)
    if vocab_size is None:
        vocab_size = int(tokens.max()) + 1 if tokens.size else 1
    dtype = token_dtype(vocab_size)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= np.iinfo(dtype).max + 1):
        raise ShardError(f"token ids out of range for {np.dtype(dtype).name}")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0] = SHARD_MAGIC
    header[1] = 1 if dtype == np.uint16 else 2
    header[2] = tokens.size
    if tokens.size >= 2 ** 31:
        raise ShardError("a shard holds at most 2^31 - 1 tokens (int32 header count)")
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype(np.dtype(dtype).newbyteorder("<"), copy=False).tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def read_header(path):
    """(version, token count, token dtype) of a shard, after checking magic and file size."""
    with open(path, "rb") as f:
        raw = f.read(HEADER_BYTES)
    if len(raw) < HEADER_BYTES:
        raise ShardError(f"{path}: shorter than the 1024-byte header")
    header = np.frombuffer(raw, dtype="<i4")
    if header[0] != SHARD_MAGIC:
        raise ShardError(f"{path}: bad magic {header[0]} (expected {SHARD_MAGIC})")
    if header[1] not in (1, 2):
        raise ShardError(f"{path}: unsupported version {header[1]}")
    dtype = np.dtype("<u2") if header[1] == 1 else np.dtype("<u4")
    count = int(header[2])
    expected = HEADER_BYTES + count * dtype.itemsize
    size = os.path.getsize(path)
    if size != expected:
        raise ShardError(f"{path}: {size} bytes but the header promises {count} tokens ({expected} bytes); "
                         f"the shard is truncated or was not written completely")
    return int(header[1]), count, dtype


def read_shard(path, mmap=True):
    """The tokens of a shard as a read-only memmap (or an in-memory array with mmap=False)."""
    _, count, dtype = read_header(path)
    if mmap:
        return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(count,))
    with open(path, "rb") as f:
        f.seek(HEADER_BYTES)
        return np.frombuffer(f.read(), dtype=dtype)


def document_hash_fraction(text: str) -> float:
    """A document's position in [0, 1) from blake2b of its text: the deterministic split key."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0 ** 64


def split_document(text, val_fraction, split="hash"):
    """[(split name, text)] for one document under the chosen split rule."""
    if split == "hash":
        return [("val" if document_hash_fraction(text) < val_fraction else "train", text)]
    if split == "tail":
        cut = int(len(text) * (1.0 - val_fraction))          # nanoGPT's n = int(0.9 * len(data))
        return [(name, part) for name, part in (("train", text[:cut]), ("val", text[cut:])) if part]
    raise ValueError(f"split must be 'hash' or 'tail', not {split!r}")


class ShardWriter:
    """Accumulates token arrays and writes `<prefix>_<split>_<NNNNNN>.bin` shards of `shard_tokens` tokens."""

    def __init__(self, out_dir, prefix, split, vocab_size, shard_tokens=10_000_000):
        self.out_dir, self.prefix, self.split = out_dir, prefix, split
        self.vocab_size, self.shard_tokens = vocab_size, int(shard_tokens)
        self.dtype = token_dtype(vocab_size)
        self.buffer = np.empty(self.shard_tokens, dtype=self.dtype)
        self.filled = 0
        self.paths = []
        self.tokens_written = 0
        os.makedirs(out_dir, exist_ok=True)

    def add(self, tokens):
        tokens = np.asarray(tokens, dtype=self.dtype)
        while len(tokens):
            take = min(len(tokens), self.shard_tokens - self.filled)
            self.buffer[self.filled: self.filled + take] = tokens[:take]
            self.filled += take
            tokens = tokens[take:]
            if self.filled == self.shard_tokens:
                self._flush()

    def _flush(self):
        if self.filled == 0:
            return
        path = os.path.join(self.out_dir, f"{self.prefix}_{self.split}_{len(self.paths):06d}.bin")
        write_shard(path, self.buffer[: self.filled], self.vocab_size)
        self.paths.append(path)
        self.tokens_written += self.filled
        self.filled = 0

    def close(self):
        self._flush()
        return self.paths


# --- parallel tokenization -------------------------------------------------------------------------
# Workers inherit the tokenizer through fork (it is set as a module global before the pool starts), so
# it is never serialised; only document strings go to the workers and token bytes come back.
_worker_tokenizer = None


def _encode_worker(item):
    split, text, with_eot = item
    ids = _worker_tokenizer.encode_ordinary(text)
    eot = _worker_tokenizer.special_tokens.get(EOT) if with_eot else None
    dtype = token_dtype(_worker_tokenizer.vocab_size)
    out = np.empty(len(ids) + (eot is not None), dtype=dtype)
    if eot is not None:
        out[0] = eot
    out[eot is not None:] = ids
    return split, out.tobytes()


def encode_documents(tokenizer, items, workers=1, chunksize=16, eot=True):
    """Yield (split, uint16/uint32 token array) for (split, text) items, in input order.

    Each document's tokens start with the end-of-text token when `eot` and the tokenizer has one. With workers
    > 1 and a platform that can fork, encoding runs in a process pool; otherwise in this process."""
    global _worker_tokenizer
    dtype = token_dtype(tokenizer.vocab_size)
    _worker_tokenizer = tokenizer
    items = ((split, text, eot) for split, text in items)
    can_fork = "fork" in multiprocessing.get_all_start_methods()
    try:
        if workers > 1 and can_fork:
            with multiprocessing.get_context("fork").Pool(workers) as pool:
                for split, raw in pool.imap(_encode_worker, items, chunksize=chunksize):
                    yield split, np.frombuffer(raw, dtype=dtype)
        else:
            for item in items:
                split, raw = _encode_worker(item)
                yield split, np.frombuffer(raw, dtype=dtype)
    finally:
        _worker_tokenizer = None


def write_token_shards(docs, tokenizer, out_dir, prefix="data", val_fraction=0.1, split="hash",
                       shard_tokens=10_000_000, workers=1, progress=None, eot=True):
    """Tokenize texts into train/val shards; returns {"train": {...}, "val": {...}} with paths and counts.

    `docs` is an iterable of texts. Shards from an earlier run with the same prefix are removed first
    (stale shards would otherwise be picked up by the loader's glob), and so are this run's shards if
    it is interrupted or fails."""
    os.makedirs(out_dir, exist_ok=True)
    for name in os.listdir(out_dir):
        if name.startswith(f"{prefix}_") and (name.endswith(".bin") or name.endswith(".bin.tmp")):
            os.remove(os.path.join(out_dir, name))
    writers = {s: ShardWriter(out_dir, prefix, s, tokenizer.vocab_size, shard_tokens) for s in ("train", "val")}
    documents = {"train": 0, "val": 0}
    items = (part for text in docs for part in split_document(text, val_fraction, split))
    try:
        for name, tokens in encode_documents(tokenizer, items, workers, eot=eot):
            writers[name].add(tokens)
            documents[name] += 1
            if progress is not None:
                progress.update(1)
        result = {}
        for name, w in writers.items():
            paths = w.close()
            result[name] = {"documents": documents[name], "tokens": w.tokens_written,
                            "shards": [os.path.basename(p) for p in paths]}
        return result
    except BaseException:
        # an interrupted run leaves neither a temp shard nor a partial set of finished shards that a
        # loader's glob would take for the whole dataset
        for name in os.listdir(out_dir):
            if name.startswith(f"{prefix}_") and (name.endswith(".bin") or name.endswith(".bin.tmp")):
                os.remove(os.path.join(out_dir, name))
        raise
