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


def next_seed() -> int:
    """A fresh 63-bit seed drawn from the global generator (for ops that build their own generator)."""
    return int(_generator.integers(0, 2**63 - 1))


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


def dropout_words(seed: int, keep: float, row_offset: int = 0) -> tuple:
    """(s0, s1, threshold) of the hash for a 64-bit `seed`, keep probability `keep` in (0, 1) and rows
    counted from `row_offset` (a batch chunk starting at a later row): plain ints below 2³²."""
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    s0 = (seed + int(row_offset) * ROW_MULTIPLIER) & 0xFFFFFFFF
    return s0, seed >> 32, min(int(keep * 2.0**32), 0xFFFFFFFF)


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
