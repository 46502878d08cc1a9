"""Batches for training and evaluation: windows of a text file, or the shards `prepare` wrote.

    data = build_data(config)        # config: data, tokenizer, val_fraction, batch_size, seq_len, seed
    x, y = data.train.batch(index)   # (B, T) int64 each, y = x shifted by one

Sources (`config.data`):
  * a directory of llm.c shards (`*_train_*.bin`, `*_val_*.bin`) with `vocab.json` (character
    tokenizer) or a BPE tokenizer file given as `config.tokenizer`: batches from the DataLoader;
  * a plain `.txt` file: character level, the first (1 − val_fraction) for training and the rest for
    validation (nanoGPT's shakespeare_char split), windows at random offsets;
  * empty: the built-in Shakespeare corpus, prepared once into the cache by the data pipeline.

Every batch is a pure function of (seed, batch index), so a resumed run needs only the index. Token ids
are checked against the vocabulary when the data is opened (the largest id of each shard), so a shard
made with another tokenizer fails at once with its name, not as an IndexError hours later.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np

from ..tokenizer import CharVocab, load_tokenizer


class RandomWindows:
    """Batches of B windows of T + 1 tokens at random offsets in one token array (nanoGPT's get_batch).

    Batch number `index` uses np.random.default_rng([seed, index]): a pure function of (seed, index),
    so resuming needs only the index. x, y: (B, T) int64, y = x shifted by one.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int):
        if len(tokens) < seq_len + 2:
            raise ValueError(f"{len(tokens)} tokens are too few for windows of {seq_len + 1}")
        self.tokens, self.batch_size, self.seq_len, self.seed = tokens, batch_size, seq_len, seed
        self.step = 0
        self._offsets = np.arange(seq_len + 1)

    def batch(self, index: int):
        starts = np.random.default_rng([self.seed, index]).integers(0, len(self.tokens) - self.seq_len - 1,
                                                                     self.batch_size)
        windows = self.tokens[starts[:, None] + self._offsets].astype(np.int64)  # (B, T + 1)
        return windows[:, :-1], windows[:, 1:]

    def state_dict(self) -> dict:
        return {"kind": "random_windows", "step": self.step, "seed": self.seed, "batch_size": self.batch_size,
                "seq_len": self.seq_len, "tokens": int(len(self.tokens))}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or not isinstance(state.get("step"), int) or state["step"] < 0:
            raise ValueError(f"loader state must be an object with a non-negative integer 'step', got {state!r:.80}")
        for key in ("seed", "batch_size", "seq_len", "tokens"):
            if state.get(key) != self.state_dict()[key]:
                raise ValueError(f"loader state has {key}={state.get(key)!r}, this data gives "
                                 f"{self.state_dict()[key]!r}: the data or configuration changed")
        self.step = int(state["step"])


class ShardBatches:
    """The data pipeline's DataLoader, addressed by batch index like RandomWindows."""

    def __init__(self, loader):
        self.loader = loader
        self.batch_size, self.seq_len = loader.batch_size, loader.seq_len

    @property
    def step(self):
        return self.loader.step

    @step.setter
    def step(self, value):
        self.loader.step = value

    def batch(self, index: int):
        return self.loader.batch(index)

    def state_dict(self) -> dict:
        return dict(self.loader.state_dict(), kind="shards")

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict):
            raise ValueError(f"loader state must be an object, got {state!r:.80}")
        try:
            self.loader.load_state_dict({k: v for k, v in state.items() if k != "kind"})
        except KeyError as error:
            raise ValueError(f"loader state has no field {error.args[0]!r}") from None
        except TypeError as error:
            raise ValueError(f"loader state has a field of the wrong type: {error}") from None


@dataclass
class Data:
    train: object
    val: object
    tokenizer: object
    tokenizer_ref: dict               # how to find the tokenizer again: {"type": ..., "path"/"chars": ...}
    bytes_per_token: np.ndarray       # (V,) UTF-8 bytes of each token id (0 for special tokens)


def token_byte_lengths(tokenizer) -> np.ndarray:
    """(V,) number of UTF-8 bytes each token id stands for; special tokens count 0 (for bits per byte)."""
    specials = set(getattr(tokenizer, "special_tokens", {}).values()) if isinstance(
        getattr(tokenizer, "special_tokens", None), dict) else set()
    lengths = np.zeros(tokenizer.vocab_size, dtype=np.int64)
    for i in range(tokenizer.vocab_size):
        if i in specials:
            continue
        if hasattr(tokenizer, "token_bytes"):
            try:
                lengths[i] = len(tokenizer.token_bytes(i))
                continue
            except ValueError:
                continue
        try:
            lengths[i] = len(tokenizer.decode([i]).encode("utf-8"))
        except (KeyError, ValueError):
            lengths[i] = 0
    return lengths


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def builtin_corpus_dir(progress: bool = True) -> str:
    """Prepare the built-in Shakespeare corpus (character tokenizer) once; return the shard directory."""
    from .corpus import cache_dir, iter_shakespeare
    from .pipeline import PipelineConfig, run_pipeline
    from .sources import SourceStats
    out = os.path.join(cache_dir(), "prepared", "shakespeare_char")
    if os.path.isfile(os.path.join(out, "report.json")) and os.path.isfile(os.path.join(out, "vocab.json")):
        return out
    print(f"preparing the built-in Shakespeare corpus into {out} (once)", flush=True)
    stats = SourceStats()
    config = PipelineConfig(near_threshold=0.1, prefix="shakespeare", workers=max(1, min(4, os.cpu_count() or 1)))
    report = run_pipeline(iter_shakespeare(stats=stats, download=True), out, "char", config, stats, progress=progress)
    if not report["tokens"] or report["tokens"]["train"]["tokens"] == 0:
        raise RuntimeError(f"preparing the built-in corpus into {out} wrote no training tokens")
    return out


def check_token_range(paths, shards, vocab_size: int) -> None:
    """ValueError naming the first shard holding a token id ≥ vocab_size (one pass over the memory map)."""
    for path, tokens in zip(paths, shards):
        if len(tokens) and int(tokens.max()) >= vocab_size:
            raise ValueError(f"{path} holds token id {int(tokens.max())}, but the tokenizer has only {vocab_size} "
                             f"ids: the shard was made with another tokenizer (pass the one it was prepared with)")


def build_data(config) -> Data:
    """Open the data of `config` (fields data, tokenizer, val_fraction, batch_size, seq_len, seed)."""
    path = config.data or builtin_corpus_dir()
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError:
            raise ValueError(f"{path} is not UTF-8 text") from None
        if len(text) < 10 * (config.seq_len + 2):
            raise ValueError(f"{path} holds {len(text)} characters: too little text for seq_len {config.seq_len}")
        vocab = CharVocab.from_text(text, special_tokens=())
        tokens = np.asarray(vocab.encode_ordinary(text), dtype=np.uint16 if vocab.vocab_size < 65536 else np.uint32)
        split = int(len(tokens) * (1 - config.val_fraction))
        train = RandomWindows(tokens[:split], config.batch_size, config.seq_len, config.seed)
        val = RandomWindows(tokens[split:], config.batch_size, config.seq_len, config.seed + 1)
        ref = {"type": "char", "chars": "".join(vocab.chars), "source": os.path.abspath(path)}
        return Data(train, val, vocab, ref, token_byte_lengths(vocab))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"data not found: {path} (give a directory made by `tinygrad-llm prepare` or a .txt file)")
    from .loader import DataLoader, shard_paths
    tokenizer_path = config.tokenizer or os.path.join(path, "vocab.json")
    if not os.path.isfile(tokenizer_path):
        raise FileNotFoundError(f"{path} has no vocab.json; pass the BPE tokenizer file it was prepared with "
                                f"(--tokenizer FILE)")
    tokenizer = load_tokenizer(tokenizer_path)
    train_loader = DataLoader(shard_paths(path, "train"), config.batch_size, config.seq_len, seed=config.seed)
    try:
        val_paths = shard_paths(path, "val")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} has no validation shards (*_val_*.bin); prepare with --val-fraction > 0") from None
    val_loader = DataLoader(val_paths, config.batch_size, config.seq_len, seed=config.seed, shuffle=False)
    for loader in (train_loader, val_loader):
        check_token_range(loader.paths, loader.shards, tokenizer.vocab_size)
    ref = {"type": "file", "path": os.path.abspath(tokenizer_path), "sha256": file_sha256(tokenizer_path)}
    return Data(ShardBatches(train_loader), ShardBatches(val_loader), tokenizer, ref, token_byte_lengths(tokenizer))
