"""The package's global random state, used when an op is not given an explicit seed (dropout, init).

`manual_seed(s)` makes a run reproducible; `get_state()`/`set_state()` let checkpoints save and restore it
exactly (the state is a JSON-friendly dict, never a pickle).
"""
from __future__ import annotations

import numpy as np

_generator = np.random.default_rng(0)


def manual_seed(seed: int) -> None:
    global _generator
    _generator = np.random.default_rng(int(seed))


def generator() -> np.random.Generator:
    return _generator


def next_seed():
    """A fresh 63-bit seed drawn from the global generator (for ops that build their own generator); inside
    `device_seeds(base)`, a DeviceSeed instead, and nothing is drawn."""
    if _device_stream is not None:
        base, counter = _device_stream
        counter[0] += 1
        return DeviceSeed(base, counter[0] * SEED_STRIDE)
    return int(_generator.integers(0, 2**63 - 1))


# ---------------------------------------------------------------------------------------------------
# Seeds that live in device memory. A captured training step (a CUDA graph) replays the same kernel
# launches with the same arguments every step, so a seed passed by value would give every step the same
# dropout masks. Inside `device_seeds(base)` the ops get DeviceSeed(base, k · SEED_STRIDE) for their k-th
# draw: the kernels add the 64-bit value base[0], read from device memory when they run, to the offset
# they were given, and the training step writes a fresh base[0] before each step.

SEED_STRIDE = 0x9E3779B97F4A7C15       # 2⁶⁴ / golden ratio: the offsets of successive draws stay far apart
MASK64 = 0xFFFFFFFFFFFFFFFF
_device_stream = None                  # (base, [draws so far]) inside device_seeds()


class DeviceSeed:
    """A 64-bit seed made of a host `offset` and `base[0]`, a one-element uint64 array (on the GPU: device
    memory the kernels read when they run). Kernels combine the two word by word (see dropout_words);
    `int(seed)` reads base on the host (a sync on the GPU) and gives offset + base[0] modulo 2⁶⁴, for
    the array paths that seed a generator."""

    __slots__ = ("base", "offset")

    def __init__(self, base, offset: int):
        if getattr(base, "dtype", None) != np.uint64 or getattr(base, "size", 0) != 1:
            raise TypeError("DeviceSeed: base must be a one-element uint64 array")
        self.base, self.offset = base, int(offset) & MASK64

    def base_value(self) -> int:
        data = self.base.get() if hasattr(self.base, "get") else self.base
        return int(np.asarray(data).reshape(()))

    def __int__(self) -> int:
        return (self.base_value() + self.offset) & MASK64

    def __repr__(self) -> str:
        return f"DeviceSeed(offset={self.offset:#x})"


class device_seeds:
    """`with device_seeds(base):` — next_seed() gives DeviceSeed(base, k · SEED_STRIDE) for its k-th call
    (k from 1) and draws nothing from the global generator; the same calls in the same order give the same
    offsets every time, which is what lets a captured step be replayed. Not re-entrant."""

    def __init__(self, base):
        DeviceSeed(base, 0)                      # checks base
        self.base = base

    def __enter__(self):
        global _device_stream
        if _device_stream is not None:
            raise RuntimeError("device_seeds() is already active")
        _device_stream = (self.base, [0])
        return self

    def __exit__(self, *exc):
        global _device_stream
        _device_stream = None


def get_state() -> dict:
    return _generator.bit_generator.state


def set_state(state: dict) -> None:
    _generator.bit_generator.state = state


# ---------------------------------------------------------------------------------------------------
# The counter-based hash behind attention dropout: a keep/drop decision for element (row, column) of
# a score matrix that anyone holding the seed can recompute, in any order, on any device, without
# storing it. The CUDA kernels (kernels/attention_common.cuh, attn_dropout_*) compute the same bits.
#
#     s0, s1   = the low and high 32 bits of the 64-bit seed (s0 advanced by row_offset · ROW_MULTIPLIER)
#     key(r)   = fmix32(r · ROW_MULTIPLIER + s0)                      once per row
#     bits(r,c)= fmix32(key(r) ^ (c · COLUMN_MULTIPLIER + s1))        once per element
#     keep(r,c)= bits(r, c) < threshold,   threshold = ⌊keep · 2³²⌋
#
# fmix32 is MurmurHash3's 32-bit finaliser (a bijection with full avalanche). All arithmetic is modulo
# 2³², so row indices past 2³² wrap (the same way on every device). Rows are the query rows of the flat
# (B, H, Tq) order, columns the key positions.

ROW_MULTIPLIER = 0x9E3779B9          # 2³² / golden ratio, odd: r ↦ r · M is a bijection modulo 2³²
COLUMN_MULTIPLIER = 0x7FEB352D       # another odd constant, so rows and columns never line up


def fmix32(x, xp=np):
    """MurmurHash3's finaliser on a uint32 array, in place (x is returned)."""
    shifted = xp.empty_like(x)
    for shift, multiplier in ((16, 0x85EBCA6B), (13, 0xC2B2AE35)):
        xp.right_shift(x, shift, out=shifted)
        x ^= shifted
        x *= np.uint32(multiplier)
    xp.right_shift(x, 16, out=shifted)
    x ^= shifted
    return x


def dropout_words(seed, keep: float, row_offset: int = 0, base: int = 0) -> tuple:
    """(s0, s1, threshold) of the hash for a 64-bit `seed`, keep probability `keep` in (0, 1) and rows
    counted from `row_offset` (a batch chunk starting at a later row): plain ints below 2³².

    `base` (what a kernel reads from device memory) adds its low word to s0 and its high word to s1; a
    DeviceSeed is its offset with base[0] read on the host, so these are the words its kernels use."""
    if isinstance(seed, DeviceSeed):
        seed, base = seed.offset, seed.base_value()
    seed, base = int(seed) & MASK64, int(base) & MASK64
    s0 = (seed + int(row_offset) * ROW_MULTIPLIER + base) & 0xFFFFFFFF
    return s0, ((seed >> 32) + (base >> 32)) & 0xFFFFFFFF, min(int(keep * 2.0**32), 0xFFFFFFFF)


def hash_bits(words: tuple, rows, columns, xp=np):
    """bits(r, c) for every r in `rows` and c in `columns` (integer arrays, broadcast against each
    other: e.g. rows (..., n, 1) and columns (e,)), a uint32 array of their broadcast shape."""
    s0, s1 = np.uint32(words[0]), np.uint32(words[1])
    key = xp.asarray(rows).astype(np.uint32) * np.uint32(ROW_MULTIPLIER)
    key += s0
    fmix32(key, xp)
    column = xp.asarray(columns).astype(np.uint32) * np.uint32(COLUMN_MULTIPLIER)
    column += s1
    return fmix32(key ^ column, xp)
