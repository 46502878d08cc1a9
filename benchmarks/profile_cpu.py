"""Where a CPU training step's time goes: process CPU milliseconds per step of each op's forward and backward.

    python benchmarks/profile_cpu.py                    # config (a), one thread, 4 steps
    python benchmarks/profile_cpu.py --config char --steps 30

One thread (BLAS and the row pool), the step of `benchmarks/train_cpu.py` (forward, cross-entropy,
backward, clipping, AdamW) on fixed random tokens. Every Function subclass's forward and backward is
wrapped with a process-CPU-time counter, so the table is CPU time (what a step costs whatever the load),
not wall time; "outside the ops" is the rest of forward + backward (the engine, Python). The wrappers
add a few microseconds per op call.
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("TINYGRAD_LLM_THREADS", "1")
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
    args = parser.parse_args(argv)
    from tinygrad_llm import backend, cpu_threads, manual_seed, tensor
    import tinygrad_llm.functional  # noqa: F401  (imports every op)
    from tinygrad_llm.model import GPT, GPTConfig
    from tinygrad_llm.optim import AdamW
    backend.tune_host_allocator()
    cpu_threads.set_thread_count(1)
    spent = collections.defaultdict(float)
    for cls in set(_subclasses(tensor.Function)):
        for method in ("forward", "backward"):
            if method in cls.__dict__:
                def timed(*a, _inner=cls.__dict__[method], _key=f"{cls.__name__}.{method}", **k):
                    start = time.process_time()
                    result = _inner(*a, **k)
                    spent[_key] += time.process_time() - start
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

    def step():
        start = time.process_time()
        _, loss = model(x, y, return_logits=False)
        forward = time.process_time()
        loss.backward()
        backward = time.process_time()
        norm = optimizer.gather_grads()
        optimizer.step(grad_scale=min(1.0, 1.0 / (norm + 1e-6)))
        optimizer.zero_grad()
        end = time.process_time()
        phases["forward"] += forward - start
        phases["backward"] += backward - forward
        phases["optimizer"] += end - backward

    for _ in range(2):
        step()
    spent.clear()
    phases.clear()
    for _ in range(args.steps):
        step()
    per_step = {k: v / args.steps * 1e3 for k, v in spent.items()}
    total = sum(phases.values()) / args.steps * 1e3
    load = " ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"{' '.join(sys.argv)}\nconfig {args.config}, one thread, {args.steps} steps, load average {load}: "
          f"{total:.1f} CPU ms per step (" + ", ".join(f"{k} {v / args.steps * 1e3:.1f}" for k, v in phases.items())
          + ")")
    for name, ms in sorted(per_step.items(), key=lambda item: -item[1]):
        print(f"  {name:34s} {ms:8.2f} ms  {ms / total:6.1%}")
    outside = (phases["forward"] + phases["backward"]) / args.steps * 1e3 - sum(per_step.values())
    print(f"  {'(outside the ops)':34s} {outside:8.2f} ms  {outside / total:6.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
