"""Time of one sampled token (`generate.sample_next`) at GPT-2's vocabulary, with and without top_p.

    python benchmarks/sampling.py [--vocab 50257] [--repeat 30]

For logits drawn as N(0, σ²) with σ from flat (a random model's, σ 0.3) to peaked (σ 10), prints the
milliseconds of one draw at temperature 0.8 with top_p off, 0.9 and 0.5, and of the nucleus the same
draw would find by sorting the whole vocabulary (what `_nucleus` avoids), with the nucleus' size.
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tinygrad_llm.generate import _nucleus, sample_next  # noqa: E402


def full_sort_nucleus(probs, top_p):
    order = np.argsort(-probs, kind="stable")
    return order[:int(np.searchsorted(np.cumsum(probs[order]), top_p) + 1)]


def best_ms(fn, repeat):
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args(argv)
    print(f"# python benchmarks/sampling.py {' '.join(argv or sys.argv[1:])}")
    print(f"# {platform.machine()}, {platform.processor() or platform.system()}, NumPy {np.__version__}; "
          "median ms of one call")
    print("| σ | top_p | nucleus size | sample_next ms | its nucleus ms | full-sort nucleus ms |")
    print("| --- | --- | --- | --- | --- | --- |")
    generator = np.random.default_rng(0)
    for sigma in (0.3, 1.0, 3.0, 10.0):
        logits = (generator.standard_normal(args.vocab) * sigma).astype(np.float32)
        scaled = logits.astype(np.float64) / 0.8
        probs = np.exp(scaled - scaled.max())
        probs /= probs.sum()
        for top_p in (None, 0.9, 0.5):
            rng = np.random.default_rng(1)
            draw = best_ms(lambda: sample_next(logits, 0.8, top_p=top_p, rng=rng), args.repeat)
            if top_p is None:
                print(f"| {sigma} | off | - | {draw:.2f} | - | - |")
                continue
            ours = best_ms(lambda: _nucleus(probs, top_p), args.repeat)
            full = best_ms(lambda: full_sort_nucleus(probs, top_p), args.repeat)
            size = _nucleus(probs, top_p).size
            print(f"| {sigma} | {top_p} | {size} | {draw:.2f} | {ours:.2f} | {full:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
