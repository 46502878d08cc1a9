"""Batches of (B, T) inputs and targets from memory-mapped token shards, resumable exactly.

Each shard is cut into non-overlapping windows of T tokens; a window reads T + 1 tokens (the extra one
is the last target), so a shard of n tokens holds floor((n - 1) / T) windows and windows never cross
shard boundaries. The windows of all shards are numbered in shard order; data-parallel worker `rank`
of `world_size` owns windows rank, rank + world_size, ... — disjoint sets that together cover all.

Batch number `step` consists of the worker's windows number step·B .. step·B + B − 1 in an
epoch-long order: the identity (shuffle=False) or a permutation drawn from
np.random.default_rng([seed, epoch]) (shuffle=True), where epoch = index // (windows of this worker).
A batch is therefore a pure function of (seed, step) and the configuration: resuming needs only the
step, and `state_dict()` saves it with the configuration it was taken under (checked on load) plus
the epoch, shard and token position of the next batch, for humans and logs.

Shapes: x, y (B, T) int64, y[b, t] = x[b, t + 1] except at t = T − 1 where it is the window's extra token.
Simplification: the tail of each shard shorter than one window is never used (at most T tokens per shard).
"""
import glob
import os

import numpy as np

from .shards import read_shard

STATE_VERSION = 1


def shard_paths(data_dir, split="train", prefix=None):
    """Sorted shard paths `<prefix>_<split>_*.bin` in `data_dir` (any prefix when None)."""
    pattern = f"{prefix or '*'}_{split}_*.bin"
    paths = sorted(glob.glob(os.path.join(data_dir, pattern)))
    if not paths:
        raise FileNotFoundError(f"no shards matching {pattern} in {data_dir}")
    return paths


class DataLoader:
    """Deterministic, resumable batches of (x, y) windows from llm.c-format shards.

    DataLoader(paths, batch_size=B, seq_len=T, seed=0, shuffle=True, rank=0, world_size=1)
    `paths`: a list of shard files, one shard path, a glob pattern, or a directory (then `split`)."""

    def __init__(self, paths, batch_size, seq_len, seed=0, shuffle=True, rank=0, world_size=1, split="train"):
        if isinstance(paths, (str, os.PathLike)):
            paths = str(paths)
            if os.path.isdir(paths):
                paths = shard_paths(paths, split)
            elif any(ch in paths for ch in "*?["):
                paths = sorted(glob.glob(paths))
            else:
                paths = [paths]
        if not paths:
            raise FileNotFoundError("no shard paths given")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        self.paths = [str(p) for p in paths]
        self.batch_size, self.seq_len = int(batch_size), int(seq_len)
        self.seed, self.shuffle, self.rank, self.world_size = int(seed), bool(shuffle), int(rank), int(world_size)
        self.shards = [read_shard(p, mmap=True) for p in self.paths]
        per_shard = np.array([max(0, (len(s) - 1) // self.seq_len) for s in self.shards], dtype=np.int64)
        shard_of = np.repeat(np.arange(len(self.shards)), per_shard)                     # (all windows,)
        start_of = (np.arange(per_shard.sum()) - np.repeat(np.cumsum(per_shard) - per_shard, per_shard)) * self.seq_len
        mine = slice(self.rank, None, self.world_size)
        self.window_shard, self.window_start = shard_of[mine], start_of[mine]
        self.num_windows = len(self.window_shard)
        if self.num_windows == 0:
            raise ValueError(f"rank {rank} of {world_size} has no window of {self.seq_len + 1} tokens in "
                             f"{len(self.paths)} shard(s) holding {sum(map(len, self.shards))} tokens")
        self.step = 0
        self._perm_epoch, self._perm = None, None

    def __len__(self):
        """Batches per epoch (the last one wraps into the next epoch)."""
        return -(-self.num_windows // self.batch_size)

    def _order(self, epoch):
        if not self.shuffle:
            return None
        if self._perm_epoch != epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
            self._perm_epoch = epoch
        return self._perm

    def _windows(self, step):
        """Window indices (B,) of batch `step`."""
        index = step * self.batch_size + np.arange(self.batch_size, dtype=np.int64)
        epoch, position = index // self.num_windows, index % self.num_windows
        out = np.empty(self.batch_size, dtype=np.int64)
        for e in np.unique(epoch):                     # a batch spans at most two epochs
            sel = epoch == e
            order = self._order(int(e))
            out[sel] = position[sel] if order is None else order[position[sel]]
        return out

    def batch(self, step):
        """(x, y) of batch `step`, without changing the loader's position."""
        T = self.seq_len
        buf = np.empty((self.batch_size, T + 1), dtype=np.int64)
        for row, w in enumerate(self._windows(step)):
            start = self.window_start[w]
            buf[row] = self.shards[self.window_shard[w]][start: start + T + 1]
        return buf[:, :-1], buf[:, 1:]                 # (B, T+1) -> (B, T), (B, T)

    def next_batch(self):
        x, y = self.batch(self.step)
        self.step += 1
        return x, y

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self):
        """JSON-able state: resuming from it reproduces the following batches exactly."""
        first = int(self._windows(self.step)[0])
        return {"version": STATE_VERSION, "step": self.step, "seed": self.seed, "shuffle": self.shuffle,
                "batch_size": self.batch_size, "seq_len": self.seq_len, "rank": self.rank,
                "world_size": self.world_size, "num_windows": int(self.num_windows),
                "epoch": self.step * self.batch_size // self.num_windows,
                "shard": os.path.basename(self.paths[int(self.window_shard[first])]),
                "position": int(self.window_start[first])}

    def load_state_dict(self, state):
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')} is not {STATE_VERSION}")
        for key in ("seed", "shuffle", "batch_size", "seq_len", "rank", "world_size", "num_windows"):
            if state[key] != getattr(self, key):
                raise ValueError(f"loader state has {key}={state[key]!r} but this loader has {getattr(self, key)!r}; "
                                 f"the data or the configuration changed since the state was saved")
        self.step = int(state["step"])
