"""Timing on the GPU with device events, shared by the GPU benchmarks.

`median_ms(fn, library)` warms up (which also lifts the clocks from idle), then takes `repeats` samples,
each the mean time per call of `inner` back-to-back calls between two CUDA events, and returns the
median in milliseconds. `library` is "cupy" (our code) or "torch" (the PyTorch side of a comparison).
"""
from __future__ import annotations

import numpy as np


def _events(library):
    """(make an event pair, synchronize the device, elapsed ms between two recorded events)."""
    if library == "cupy":
        import cupy as cp
        return ((lambda: (cp.cuda.Event(), cp.cuda.Event())), cp.cuda.Device().synchronize,
                cp.cuda.get_elapsed_time)
    if library == "torch":
        import torch
        make = lambda: (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))  # noqa: E731
        return make, torch.cuda.synchronize, lambda start, end: start.elapsed_time(end)
    raise ValueError(f"library must be 'cupy' or 'torch', got {library!r}")


def median_ms(fn, library="cupy", repeats=10, inner=5, warmup=10) -> float:
    make_pair, synchronize, elapsed = _events(library)
    for _ in range(warmup):
        fn()
    synchronize()
    times = []
    for _ in range(repeats):
        start, end = make_pair()
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        times.append(elapsed(start, end) / inner)
    return float(np.median(times))
