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
