"""Training throughput on the CPU: tokens/s of one fwd + bwd + AdamW step, tinygrad_llm beside PyTorch.

    python benchmarks/train_cpu.py                       # both configs, 2 threads, 3 alternating rounds
    python benchmarks/train_cpu.py --configs a --threads 1 --steps 5 --rounds 2
    python benchmarks/train_cpu.py --parity 200 --data ../shared/data/tinyshakespeare.txt

Configs (the issue's): (a) 6 layers, d 256, 8 heads, ffn 704, T 128, B 16, V 4096;
(char) nanoGPT's shakespeare_char CPU model: 4 layers, 4 heads, d 128, ffn 384, T 64, B 12, V 65.
A step is the full training step: forward, cross-entropy, backward, global-norm clipping to 1.0, AdamW
(β 0.9/0.99, weight decay 0.1 on matrices). tinygrad_llm runs as the `tinygrad-llm` command does
(OPENBLAS_THREAD_TIMEOUT=4, so its row-parallel ops get the threads too). Each measurement runs in its own subprocess with the same
thread count for both libraries (OMP/OpenBLAS/MKL env vars and torch.set_num_threads); rounds alternate
ours / PyTorch so that load from other processes hits both alike; the median step time over all rounds
is reported. `--parity N` instead trains the char model for N steps in both libraries from the same
initial weights on the same batches with the same AdamW, schedule and clipping, and prints both losses
(a check that the two compute the same training, not a timing). The PyTorch model (written here, same architecture and parameter count: RMSNorm, rotate-half
RoPE, causal SDPA, SwiGLU, no biases, untied head) is run only when torch can be imported.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CONFIGS = {
    "a": dict(vocab_size=4096, d_model=256, n_layers=6, n_heads=8, ffn_hidden=704, seq_len=128, batch_size=16),
    "char": dict(vocab_size=65, d_model=128, n_layers=4, n_heads=4, ffn_hidden=384, seq_len=64, batch_size=12),
}


def worker_ours(config: dict, steps: int, warmup: int) -> list:
    import numpy as np
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
    from tinygrad_llm import backend, manual_seed
    from tinygrad_llm.model import GPT, GPTConfig
    from tinygrad_llm.optim import AdamW
    backend.tune_host_allocator()
    manual_seed(0)
    model = GPT(GPTConfig(vocab_size=config["vocab_size"], d_model=config["d_model"], n_layers=config["n_layers"],
                          n_heads=config["n_heads"], ffn_hidden=config["ffn_hidden"], max_seq_len=config["seq_len"]))
    optimizer = AdamW(model.named_parameters(), lr=3e-4, betas=(0.9, 0.99), weight_decay=0.1)
    rng = np.random.default_rng(0)
    shape = (config["batch_size"], config["seq_len"])
    x, y = rng.integers(0, config["vocab_size"], shape), rng.integers(0, config["vocab_size"], shape)
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        _, loss = model(x, y, return_logits=False)
        loss.backward()
        norm = optimizer.gather_grads()
        optimizer.step(grad_scale=min(1.0, 1.0 / (norm + 1e-6)))
        optimizer.zero_grad()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def worker_torch(config: dict, steps: int, warmup: int, threads: int) -> list:
    import math
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    d, heads, hidden, T = config["d_model"], config["n_heads"], config["ffn_hidden"], config["seq_len"]
    head_dim = d // heads

    class Norm(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(d))

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * self.weight

    inverse_frequency = 1.0 / 10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim)
    angles = torch.outer(torch.arange(T).float(), inverse_frequency).repeat(1, 2)
    cos, sin = angles.cos(), angles.sin()

    def rope(x):
        x1, x2 = x[..., :head_dim // 2], x[..., head_dim // 2:]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.input_layernorm, self.post_attention_layernorm = Norm(), Norm()
            self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d, bias=False) for _ in range(4))
            self.gate_proj, self.up_proj = nn.Linear(d, hidden, bias=False), nn.Linear(d, hidden, bias=False)
            self.down_proj = nn.Linear(hidden, d, bias=False)

        def forward(self, x):
            B = x.shape[0]
            h = self.input_layernorm(x)
            q, k, v = (p(h).view(B, T, heads, head_dim).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
            a = F.scaled_dot_product_attention(rope(q), rope(k), v, is_causal=True)
            x = x + self.o_proj(a.transpose(1, 2).reshape(B, T, d))
            h = self.post_attention_layernorm(x)
            return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed_tokens = nn.Embedding(config["vocab_size"], d)
            self.layers = nn.ModuleList(Layer() for _ in range(config["n_layers"]))
            self.norm, self.lm_head = Norm(), nn.Linear(d, config["vocab_size"], bias=False)
            for name, p in self.named_parameters():
                if p.dim() == 2:
                    scaled = name.endswith(("o_proj.weight", "down_proj.weight"))
                    nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * config["n_layers"]) if scaled else 0.02)

        def forward(self, ids):
            x = self.embed_tokens(ids)
            for layer in self.layers:
                x = layer(x)
            return self.lm_head(self.norm(x))

    model = Model()
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    gains = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": matrices, "weight_decay": 0.1}, {"params": gains, "weight_decay": 0.0}],
                                  lr=3e-4, betas=(0.9, 0.99))
    shape = (config["batch_size"], T)
    x, y = torch.randint(0, config["vocab_size"], shape), torch.randint(0, config["vocab_size"], shape)
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        loss = F.cross_entropy(model(x).view(-1, config["vocab_size"]), y.view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


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


def run_worker(kind: str, config_name: str, steps: int, warmup: int, threads: int) -> list:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads))
    env.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")     # what `tinygrad-llm` uses; no effect on PyTorch's MKL
    command = [sys.executable, os.path.abspath(__file__), "--worker", kind, "--configs", config_name,
               "--steps", str(steps), "--warmup", str(warmup), "--threads", str(threads)]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{kind} worker failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def torch_available() -> bool:
    return subprocess.run([sys.executable, "-c", "import torch"], capture_output=True).returncode == 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="a,char", help="comma-separated: a, char")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="alternating ours/PyTorch rounds")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--parity", type=int, default=0, metavar="STEPS",
                        help="train both libraries identically for STEPS steps and compare (needs torch)")
    parser.add_argument("--data", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir,
                                                      os.pardir, "shared", "data", "tinyshakespeare.txt"))
    parser.add_argument("--worker", choices=["ours", "torch"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.parity:
        if not torch_available():
            parser.error("--parity needs PyTorch")
        return parity(args.parity, args.data)
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown config(s) {unknown}; choose from {list(CONFIGS)}")
    if args.worker:
        config = CONFIGS[names[0]]
        times = (worker_ours(config, args.steps, args.warmup) if args.worker == "ours"
                 else worker_torch(config, args.steps, args.warmup, args.threads))
        print(json.dumps(times))
        return 0
    with_torch = not args.no_torch and torch_available()
    print(f"threads {args.threads}, {args.rounds} rounds x {args.steps} steps (+{args.warmup} warmup), "
          f"PyTorch {'side by side' if with_torch else 'not available'}")
    print(f"{'config':8} {'tokens/step':>11} {'ours ms':>9} {'ours tok/s':>11} {'torch ms':>9} {'torch tok/s':>12} {'ratio':>6}")
    results = []
    for name in names:
        config = CONFIGS[name]
        tokens = config["batch_size"] * config["seq_len"]
        ours, theirs = [], []
        for _ in range(args.rounds):
            ours += run_worker("ours", name, args.steps, args.warmup, args.threads)
            if with_torch:
                theirs += run_worker("torch", name, args.steps, args.warmup, args.threads)
        ours_ms = statistics.median(ours) * 1e3
        row = {"config": name, "tokens_per_step": tokens, "ours_ms": ours_ms, "ours_tokens_per_s": tokens / ours_ms * 1e3}
        line = f"{name:8} {tokens:>11} {ours_ms:>9.1f} {row['ours_tokens_per_s']:>11.0f}"
        if theirs:
            torch_ms = statistics.median(theirs) * 1e3
            row.update(torch_ms=torch_ms, torch_tokens_per_s=tokens / torch_ms * 1e3, ratio=torch_ms / ours_ms)
            line += f" {torch_ms:>9.1f} {row['torch_tokens_per_s']:>12.0f} {row['ratio']:>5.2f}x"
        print(line, flush=True)
        results.append(row)
    print(json.dumps({"threads": args.threads, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
