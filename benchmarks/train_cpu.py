"""Training throughput on the CPU: tokens/s of one fwd + bwd + AdamW step, tinygrad_llm beside PyTorch.

    python benchmarks/train_cpu.py                       # both configs, 2 threads, 3 alternating rounds
    python benchmarks/train_cpu.py --configs a --threads 1 --steps 5 --rounds 2
    python benchmarks/train_cpu.py --parity 200 --data ../shared/data/tinyshakespeare.txt
    python benchmarks/train_cpu.py --configs char --attention-dropout 0.1   # both sides drop attention probabilities

Configs (the issue's): (a) 6 layers, d 256, 8 heads, ffn 704, T 128, B 16, V 4096;
(char) nanoGPT's shakespeare_char CPU model: 4 layers, 4 heads, d 128, ffn 384, T 64, B 12, V 65.
A step is the full training step: forward, cross-entropy, backward, global-norm clipping to 1.0, AdamW
(β 0.9/0.99, weight decay 0.1 on matrices). tinygrad_llm runs as the `tinygrad-llm` command does:
OPENBLAS_THREAD_TIMEOUT=4 and the threading plan of `tinygrad_llm.threading_plan` (`--plan auto` measures
and caches it; pool, blas or single fix it), with at most --threads threads. As a training run chooses its
plan once at its start, `auto` is resolved once per config and thread count before any round is timed
(the most threads first, while the machine is quietest) and every round of it runs that plan: the load
of the benchmark's own previous rounds cannot switch a later round to the busy machine's plan. Each round
also runs the guard of a training run (`threading_plan.Guard`, held to the single plan's step measured
with the plan): a round in which it moved to `single` for a while (a core taken) shows its plan with a *. PyTorch runs
benchmarks/torch_baseline.py (the same model, step and optimizer) with torch.set_num_threads(--threads).
Each measurement runs in its own subprocess with the same thread count for both libraries
(OMP/OpenBLAS/MKL env vars too); rounds alternate ours / PyTorch so that load from other processes hits
both alike. Printed per config and thread count: the median step of the median round, the slowest
round's median ("worst"), process CPU time per step, and the ratio of tokens/s (ours / PyTorch) for each
alternating pair: the median pair and the worst pair. `--parity N` instead trains the char model for N
steps in both libraries from the same initial weights on the same batches with the same AdamW, schedule
and clipping, and prints both losses (a check that the two compute the same training, not a timing).
`--baseline-tree DIR` adds a third worker per round, this script of another checkout (a before/after of
a change under the same load): its ms, cpu, and the per-round speedup of this tree over it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_baseline import CONFIGS, time_steps  # noqa: E402  (PyTorch itself is imported only by its worker)


def worker_ours(config: dict, steps: int, warmup: int, plan: str, single_ms: float = 0.0) -> dict:
    import numpy as np
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
    from tinygrad_llm import backend, manual_seed, threading_plan
    from tinygrad_llm.model import GPT
    from tinygrad_llm.optim import AdamW
    backend.tune_host_allocator()
    model_config, choice = _plan_of(config, plan)
    manual_seed(0)
    model = GPT(model_config)
    optimizer = AdamW(model.named_parameters(), lr=3e-4, betas=(0.9, 0.99), weight_decay=0.1)
    rng = np.random.default_rng(0)
    shape = (config["batch_size"], config["seq_len"])
    x, y = rng.integers(0, config["vocab_size"], shape), rng.integers(0, config["vocab_size"], shape)

    guard = threading_plan.Guard(choice["plan"], single_ms)     # as a training run's (train.py), when `auto`

    def step():
        start = time.perf_counter()
        _, loss = model(x, y, return_logits=False)
        loss.backward()
        norm = optimizer.gather_grads()
        optimizer.step(grad_scale=min(1.0, 1.0 / (norm + 1e-6)))
        optimizer.zero_grad()
        guard.step(time.perf_counter() - start)
    return dict(time_steps(step, steps, warmup), plan=choice["plan"], plan_source=choice["source"],
                guard_switches=guard.switches)


def _plan_of(config: dict, plan: str):
    """(GPTConfig, threading_plan.choose's result): the model of a config and the plan a run of it starts with
    (measured or read from the cache for `auto`)."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
    from tinygrad_llm import threading_plan
    from tinygrad_llm.model import GPTConfig
    model_config = GPTConfig(vocab_size=config["vocab_size"], d_model=config["d_model"], n_layers=config["n_layers"],
                             n_heads=config["n_heads"], ffn_hidden=config["ffn_hidden"], max_seq_len=config["seq_len"],
                             attention_dropout=config.get("attention_dropout", 0.0))
    batch, seq_len = config["batch_size"], config["seq_len"]
    choice = threading_plan.choose(plan, threading_plan.model_shape(model_config, batch, seq_len),
                                   threading_plan.model_step_factory(model_config, batch, seq_len))
    return model_config, choice


def worker_plan(config: dict, plan: str) -> dict:
    """The threading plan a run of this config starts with (measured or read from the cache), nothing timed."""
    _, choice = _plan_of(config, plan)
    return {"plan": choice["plan"], "plan_source": choice["source"], "step_ms": choice["step_ms"]}


def worker_torch(config: dict, steps: int, warmup: int, threads: int) -> dict:
    import torch_baseline
    return time_steps(torch_baseline.make_step(config, threads), steps, warmup)


def parity(steps: int, data_path: str) -> int:
    """Same init, batches and optimizer in both libraries; print the losses side by side."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
    from tinygrad_llm import manual_seed
    from tinygrad_llm.model import GPT, GPTConfig
    from tinygrad_llm.optim import AdamW, lr_schedule
    from tinygrad_llm.train import RandomWindows
    torch.set_num_threads(1)
    text = open(data_path, encoding="utf-8").read()
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    tokens = np.array([index[c] for c in text], dtype=np.int64)[:int(0.9 * len(text))]
    c = CONFIGS["char"]
    config = GPTConfig(vocab_size=len(chars), d_model=c["d_model"], n_layers=c["n_layers"], n_heads=c["n_heads"],
                       ffn_hidden=c["ffn_hidden"], max_seq_len=c["seq_len"])
    manual_seed(1)
    model = GPT(config)
    optimizer = AdamW(model.named_parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)
    P = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in model.state_dict().items()}
    torch_optimizer = torch.optim.AdamW([{"params": [p for p in P.values() if p.dim() >= 2], "weight_decay": 0.1},
                                         {"params": [p for p in P.values() if p.dim() < 2], "weight_decay": 0.0}],
                                        lr=1e-3, betas=(0.9, 0.99))
    H, D, T, C = config.n_heads, config.head_dim, c["seq_len"], config.d_model
    inverse = 1.0 / 10000.0 ** (torch.arange(0, D, 2).float() / D)
    angles = torch.outer(torch.arange(T).float(), inverse).repeat(1, 2)
    cos, sin = angles.cos(), angles.sin()
    rotate_half = lambda x: torch.cat((-x[..., D // 2:], x[..., :D // 2]), -1)
    norm = lambda x, w: w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))

    def torch_logits(ids):        # Hugging Face Llama's forward, spelled out over the state-dict names
        x = P["model.embed_tokens.weight"][ids]
        B = ids.shape[0]
        for i in range(config.n_layers):
            p = f"model.layers.{i}."
            h = norm(x, P[p + "input_layernorm.weight"])
            q, k, v = ((h @ P[p + f"self_attn.{n}_proj.weight"].T).view(B, T, H, D).transpose(1, 2) for n in "qkv")
            q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
            x = x + a @ P[p + "self_attn.o_proj.weight"].T
            h = norm(x, P[p + "post_attention_layernorm.weight"])
            x = x + (F.silu(h @ P[p + "mlp.gate_proj.weight"].T) * (h @ P[p + "mlp.up_proj.weight"].T)) \
                @ P[p + "mlp.down_proj.weight"].T
        return norm(x, P["model.norm.weight"]) @ P["lm_head.weight"].T

    batches = RandomWindows(tokens, c["batch_size"], T, 1337)
    print("step   ours loss  torch loss   ours |g|  torch |g|   max |Δw|")
    for step in range(steps):
        lr = lr_schedule(step, 1e-3, 100, 2000, 0.1)
        x, y = batches.batch(step)
        _, loss = model(x, y, return_logits=False)
        loss.backward()
        norm_ours = optimizer.gather_grads()
        optimizer.step(lr=lr, grad_scale=min(1.0, 1.0 / (norm_ours + 1e-6)))
        optimizer.zero_grad()
        torch_loss = F.cross_entropy(torch_logits(torch.from_numpy(x)).view(-1, len(chars)), torch.from_numpy(y).reshape(-1))
        torch_loss.backward()
        norm_torch = float(torch.nn.utils.clip_grad_norm_(list(P.values()), 1.0))
        for group in torch_optimizer.param_groups:
            group["lr"] = lr
        torch_optimizer.step()
        torch_optimizer.zero_grad()
        if step % 25 == 0 or step == steps - 1:
            ours_state = model.state_dict()
            drift = max(float(np.abs(ours_state[k] - P[k].detach().numpy()).max()) for k in P)
            print(f"{step:>4} {loss.item():>11.4f} {torch_loss.item():>11.4f} {norm_ours:>10.4f} {norm_torch:>10.4f} "
                  f"{drift:>10.2e}", flush=True)
    return 0


def run_worker(kind: str, config_name: str, steps: int, warmup: int, threads: int, plan: str,
               tree: str | None = None, attention_dropout: float = 0.0, single_ms: float = 0.0) -> dict:
    """One measurement in a fresh subprocess; `tree`: run this script of another checkout instead."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads))
    env.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")     # what `tinygrad-llm` sets; no effect on PyTorch's own BLAS
    script = os.path.join(tree, "benchmarks", "train_cpu.py") if tree else os.path.abspath(__file__)
    command = [sys.executable, script, "--worker", kind, "--configs", config_name,
               "--steps", str(steps), "--warmup", str(warmup), "--threads", str(threads), "--plan", plan]
    if attention_dropout:
        command += ["--attention-dropout", str(attention_dropout)]
    if single_ms and kind == "ours" and not tree:
        command += ["--single-ms", str(single_ms)]
    env["TINYGRAD_LLM_THREADS"] = str(threads)         # the most threads tinygrad_llm's plan may use
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{kind} worker failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def torch_available() -> bool:
    return subprocess.run([sys.executable, "-c", "import torch"], capture_output=True).returncode == 0


def load_average() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="a,char", help="comma-separated: a, char")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="alternating ours/PyTorch rounds")
    parser.add_argument("--threads", default=str(min(2, os.cpu_count() or 1)),
                        help="thread count(s) for both libraries, comma-separated (e.g. 1,2)")
    parser.add_argument("--plan", default="auto", help="tinygrad_llm's threading plan: auto, pool, blas, single")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--parity", type=int, default=0, metavar="STEPS",
                        help="train both libraries identically for STEPS steps and compare (needs torch)")
    parser.add_argument("--data", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir,
                                                      os.pardir, "shared", "data", "tinyshakespeare.txt"))
    parser.add_argument("--baseline-tree", metavar="DIR",
                        help="also time the tinygrad_llm of another checkout (e.g. `git worktree add DIR <commit>`), "
                             "interleaved with this one: a before/after under the same load")
    parser.add_argument("--attention-dropout", type=float, default=0.0,
                        help="dropout on the attention probabilities, both sides (training mode)")
    parser.add_argument("--worker", choices=["ours", "torch", "plan"], help=argparse.SUPPRESS)
    parser.add_argument("--single-ms", type=float, default=0.0, help=argparse.SUPPRESS)   # the guard's reference
    args = parser.parse_args(argv)
    if not 0.0 <= args.attention_dropout < 1.0:
        parser.error(f"--attention-dropout must be in [0, 1), got {args.attention_dropout}")
    if args.parity:
        if not torch_available():
            parser.error("--parity needs PyTorch")
        return parity(args.parity, args.data)
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown config(s) {unknown}; choose from {list(CONFIGS)}")
    try:
        thread_counts = [int(t) for t in args.threads.split(",") if t.strip()]
    except ValueError:
        parser.error(f"--threads takes whole numbers, got {args.threads!r}")
    if args.worker:
        config = dict(CONFIGS[names[0]], attention_dropout=args.attention_dropout)
        if args.worker == "plan":
            result = worker_plan(config, args.plan)
        else:
            result = (worker_ours(config, args.steps, args.warmup, args.plan, args.single_ms) if args.worker == "ours"
                      else worker_torch(config, args.steps, args.warmup, thread_counts[0]))
        print(json.dumps(result))
        return 0
    with_torch = not args.no_torch and torch_available()
    print(f"{' '.join(sys.argv)}\n{platform.platform()}, {os.cpu_count()} CPUs ({_cpu_name()}), load average "
          f"{load_average()} at the start; {args.rounds} rounds x {args.steps} steps (+{args.warmup} warm-up), "
          f"PyTorch {'side by side' if with_torch else 'not available'}")
    print("ms = median step of a round; worst = the slowest round's median; ratio = ours tokens/s / PyTorch's, "
          "per alternating pair (median pair, worst pair); cpu = process CPU ms per step (median)")
    print(f"{'config':7} {'thr':>3} {'plan':>7} {'ours ms':>8} {'worst':>7} {'cpu':>6} {'tok/s':>7} "
          f"{'torch ms':>8} {'worst':>7} {'cpu':>6} {'tok/s':>7} {'ratio':>6} {'worst':>6}")
    plans = {}               # (threads, config) -> the plan every round of it runs, chosen once before any timing
    single_ms = {}           # (threads, config) -> the single plan's step measured then: the guard's reference
    for threads in sorted(thread_counts, reverse=True):
        for name in names:
            plans[threads, name] = args.plan
            if args.plan == "auto":
                chosen = run_worker("plan", name, 0, 0, threads, "auto", attention_dropout=args.attention_dropout)
                plans[threads, name] = chosen["plan"]
                single_ms[threads, name] = (chosen["step_ms"] or {}).get("single") or 0.0
                timings = chosen["step_ms"] and ", ".join(f"{p} {ms:.0f}" for p, ms in chosen["step_ms"].items())
                print(f"plan for {name} at {threads} thread(s): {chosen['plan']} ({chosen['plan_source']}"
                      f"{'; ms/step ' + timings if timings else ''})", flush=True)
    results = []
    for threads in thread_counts:
        for name in names:
            config = CONFIGS[name]
            tokens = config["batch_size"] * config["seq_len"]
            ours, theirs, before, plans_run = [], [], [], set()
            plan = plans[threads, name]
            for _ in range(args.rounds):
                if args.baseline_tree:
                    before.append(run_worker("ours", name, args.steps, args.warmup, threads, plan,
                                             tree=args.baseline_tree, attention_dropout=args.attention_dropout))
                run = run_worker("ours", name, args.steps, args.warmup, threads, plan,
                                 attention_dropout=args.attention_dropout, single_ms=single_ms.get((threads, name)))
                ours.append(run)
                plans_run.add(f"{run['plan']}{'*' if run.get('guard_switches') else ''}")
                if with_torch:
                    theirs.append(run_worker("torch", name, args.steps, args.warmup, threads, args.plan,
                                             attention_dropout=args.attention_dropout))
            row = {"config": name, "threads": threads, "plan": ",".join(sorted(plans_run)), "tokens_per_step": tokens,
                   **_summary("ours", ours, tokens)}
            line = (f"{name:7} {threads:>3} {row['plan']:>7} {row['ours_ms']:>8.1f} {row['ours_worst_ms']:>7.1f} "
                    f"{row['ours_cpu_ms']:>6.1f} {row['ours_tokens_per_s']:>7.0f}")
            if theirs:
                row.update(_summary("torch", theirs, tokens))
                pairs = [statistics.median(t["wall"]) / statistics.median(o["wall"]) for o, t in zip(ours, theirs)]
                row.update(ratio=statistics.median(pairs), worst_ratio=min(pairs), pair_ratios=pairs)
                line += (f" {row['torch_ms']:>8.1f} {row['torch_worst_ms']:>7.1f} {row['torch_cpu_ms']:>6.1f} "
                         f"{row['torch_tokens_per_s']:>7.0f} {row['ratio']:>5.2f}x {row['worst_ratio']:>5.2f}x")
            if before:
                row.update(_summary("baseline", before, tokens))
                pairs = [statistics.median(b["wall"]) / statistics.median(o["wall"]) for o, b in zip(ours, before)]
                row.update(speedup=statistics.median(pairs), worst_speedup=min(pairs), speedup_pairs=pairs)
                line += (f"  | baseline tree {row['baseline_ms']:.1f} ms (worst {row['baseline_worst_ms']:.1f}, cpu "
                         f"{row['baseline_cpu_ms']:.1f}): this tree {row['speedup']:.2f}x faster, worst pair "
                         f"{row['worst_speedup']:.2f}x")
            print(line, flush=True)
            results.append(row)
    if any("*" in row["plan"] for row in results):
        print("plan*: the guard (threading_plan.Guard) moved some round to `single` for a while (a core taken)")
    print(f"load average {load_average()} at the end")
    print(json.dumps({"results": results}))
    return 0


def _summary(side: str, runs: list, tokens: int) -> dict:
    medians = [statistics.median(r["wall"]) for r in runs]
    cpu = statistics.median([c for r in runs for c in r["cpu"]])
    ms = statistics.median(medians) * 1e3
    return {f"{side}_ms": ms, f"{side}_worst_ms": max(medians) * 1e3, f"{side}_cpu_ms": cpu * 1e3,
            f"{side}_tokens_per_s": tokens / ms * 1e3, f"{side}_round_ms": [m * 1e3 for m in medians]}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    except OSError:
        return "?"


if __name__ == "__main__":
    sys.exit(main())
