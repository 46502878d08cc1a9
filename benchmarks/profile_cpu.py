"""Where a CPU training step's time goes: process CPU milliseconds per step of each op's forward and backward.

    python benchmarks/profile_cpu.py                    # config (a), one thread, 4 steps
    python benchmarks/profile_cpu.py --config char --steps 30
    python benchmarks/profile_cpu.py --config char --steps 30 --threads 2     # the `pool` plan's wall time

One thread (BLAS and the row pool) by default, or --threads N under the threading plan --plan; the step of `benchmarks/train_cpu.py` (forward, cross-entropy,
backward, clipping, AdamW) on fixed random tokens. Every Function subclass's forward and backward is
wrapped with a process-CPU-time and a wall-clock counter: CPU time is what a step costs whatever the
load, wall time (with several threads) shows the ops that do not spread over the cores; "outside the
ops" is the rest of forward + backward (the engine, Python). The wrappers add a few microseconds per op
call.
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import time


def _threads_argument(argv) -> str:
    """--threads N from the command line before NumPy loads (OpenBLAS reads its thread count once)."""
    for i, arg in enumerate(argv):
        if arg == "--threads" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--threads="):
            return arg.split("=", 1)[1]
    return "1"


os.environ.setdefault("OPENBLAS_NUM_THREADS", _threads_argument(sys.argv))
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")     # what `tinygrad-llm` sets
os.environ.setdefault("TINYGRAD_LLM_THREADS", os.environ["OPENBLAS_NUM_THREADS"])
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

from torch_baseline import CONFIGS  # noqa: E402  (plain data: PyTorch is not imported)


def _subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="a")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="cores for BLAS and the row pool")
    parser.add_argument("--plan", default="pool", choices=["pool", "blas", "single"],
                        help="threading plan with --threads above 1")
    args = parser.parse_args(argv)
    from tinygrad_llm import backend, manual_seed, tensor, threading_plan
    import tinygrad_llm.functional  # noqa: F401  (imports every op)
    from tinygrad_llm.model import GPT, GPTConfig
    from tinygrad_llm.optim import AdamW
    backend.tune_host_allocator()
    plan = "single" if args.threads == 1 else args.plan
    threading_plan.apply(plan, args.threads)
    spent = collections.defaultdict(float)
    wall = collections.defaultdict(float)
    for cls in set(_subclasses(tensor.Function)):
        for method in ("forward", "backward"):
            if method in cls.__dict__:
                def timed(*a, _inner=cls.__dict__[method], _key=f"{cls.__name__}.{method}", **k):
                    start, start_wall = time.process_time(), time.perf_counter()
                    result = _inner(*a, **k)
                    spent[_key] += time.process_time() - start
                    wall[_key] += time.perf_counter() - start_wall
                    return result
                setattr(cls, method, timed)
    config = CONFIGS[args.config]
    manual_seed(0)
    model = GPT(GPTConfig(vocab_size=config["vocab_size"], d_model=config["d_model"], n_layers=config["n_layers"],
                          n_heads=config["n_heads"], ffn_hidden=config["ffn_hidden"], max_seq_len=config["seq_len"]))
    optimizer = AdamW(model.named_parameters(), lr=3e-4, betas=(0.9, 0.99), weight_decay=0.1)
    rng = np.random.default_rng(0)
    shape = (config["batch_size"], config["seq_len"])
    x, y = rng.integers(0, config["vocab_size"], shape), rng.integers(0, config["vocab_size"], shape)
    phases = collections.defaultdict(float)
    wall_phases = collections.defaultdict(float)

    def step():
        start, start_wall = time.process_time(), time.perf_counter()
        _, loss = model(x, y, return_logits=False)
        forward, forward_wall = time.process_time(), time.perf_counter()
        loss.backward()
        backward, backward_wall = time.process_time(), time.perf_counter()
        norm = optimizer.gather_grads()
        optimizer.step(grad_scale=min(1.0, 1.0 / (norm + 1e-6)))
        optimizer.zero_grad()
        end, end_wall = time.process_time(), time.perf_counter()
        for name, a, b, a_wall, b_wall in (("forward", start, forward, start_wall, forward_wall),
                                           ("backward", forward, backward, forward_wall, backward_wall),
                                           ("optimizer", backward, end, backward_wall, end_wall)):
            phases[name] += b - a
            wall_phases[name] += b_wall - a_wall

    for _ in range(2):
        step()
    for counters in (spent, wall, phases, wall_phases):
        counters.clear()
    for _ in range(args.steps):
        step()
    per_step = {k: v / args.steps * 1e3 for k, v in spent.items()}
    wall_per_step = {k: v / args.steps * 1e3 for k, v in wall.items()}
    total = sum(phases.values()) / args.steps * 1e3
    total_wall = sum(wall_phases.values()) / args.steps * 1e3
    load = " ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"{' '.join(sys.argv)}\nconfig {args.config}, {args.threads} thread(s), plan {plan}, {args.steps} steps, "
          f"load average {load}: {total:.1f} CPU ms, {total_wall:.1f} wall ms per step (CPU / wall: "
          + ", ".join(f"{k} {phases[k] / args.steps * 1e3:.1f} / {wall_phases[k] / args.steps * 1e3:.1f}"
                      for k in phases) + ")")
    print(f"  {'':34s} {'CPU ms':>8s} {'share':>6s} {'wall ms':>8s} {'share':>6s}")
    for name, ms in sorted(per_step.items(), key=lambda item: -item[1]):
        print(f"  {name:34s} {ms:8.2f} {ms / total:6.1%} {wall_per_step[name]:8.2f} "
              f"{wall_per_step[name] / total_wall:6.1%}")
    outside = (phases["forward"] + phases["backward"]) / args.steps * 1e3 - sum(per_step.values())
    outside_wall = ((wall_phases["forward"] + wall_phases["backward"]) / args.steps * 1e3
                    - sum(wall_per_step.values()))
    print(f"  {'(outside the ops)':34s} {outside:8.2f} {outside / total:6.1%} {outside_wall:8.2f} "
          f"{outside_wall / total_wall:6.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
