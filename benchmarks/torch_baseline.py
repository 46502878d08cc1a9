"""The PyTorch baseline of the CPU benchmarks: tinygrad_llm's model and training step written in PyTorch.

    python benchmarks/torch_baseline.py --config a --threads 2          # ms/step and tokens/s
    python benchmarks/torch_baseline.py --config char --threads 1 --steps 20
    python benchmarks/torch_baseline.py --train-char ../shared/data/tinyshakespeare.txt --seed 1337
    python benchmarks/torch_baseline.py --train-char FILE --attention-dropout 0.1   # SDPA's dropout_p while training

The same architecture and parameter count as tinygrad_llm's GPT (RMSNorm, rotate-half RoPE, causal
scaled-dot-product attention, SwiGLU, no biases, untied head, the same initialisation scale) and the same
step: forward, cross-entropy, backward, global-norm clipping to 1.0, AdamW (β 0.9/0.99, weight decay 0.1
on matrices only), gradients set to None. Eager mode (no torch.compile). `benchmarks/train_cpu.py` times
this beside tinygrad_llm; run alone it prints its own timings. PyTorch is needed only here: nothing in
the package imports it.

`--train-char FILE` trains the char config for 2000 steps as
`tinygrad-llm train --config tinygrad_llm/configs/shakespeare_char.toml` does (characters of the file,
first 90 % train / last 10 % validation, random windows, lr 1e-3 with 100 warm-up steps and a cosine to
1e-4, clipping 1.0), evaluating 20 random validation batches every 250 steps; it prints the training
seconds (evaluation excluded), the validation losses and, at the end, the loss over every non-overlapping
window of the validation split. Batches come from torch's generator seeded with --seed, so the runs are
not batch-for-batch those of tinygrad_llm.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

CONFIGS = {
    "a": dict(vocab_size=4096, d_model=256, n_layers=6, n_heads=8, ffn_hidden=704, seq_len=128, batch_size=16),
    "char": dict(vocab_size=65, d_model=128, n_layers=4, n_heads=4, ffn_hidden=384, seq_len=64, batch_size=12),
}


def build_model(config: dict):
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    d, heads, hidden, T = config["d_model"], config["n_heads"], config["ffn_hidden"], config["seq_len"]
    head_dim = d // heads
    attention_dropout = config.get("attention_dropout", 0.0)        # tinygrad_llm's GPTConfig.attention_dropout

    class Norm(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(d))

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * self.weight

    inverse_frequency = 1.0 / 10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim)
    angles = torch.outer(torch.arange(T).float(), inverse_frequency).repeat(1, 2)    # (T, D)
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
            # (B, T, C) -> (B, H, T, D)
            q, k, v = (p(h).view(B, T, heads, head_dim).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
            a = F.scaled_dot_product_attention(rope(q), rope(k), v, is_causal=True,
                                               dropout_p=attention_dropout if self.training else 0.0)
            x = x + self.o_proj(a.transpose(1, 2).reshape(B, T, d))          # (B, H, T, D) -> (B, T, C)
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

    return Model()


def make_step(config: dict, threads: int, seed: int = 0):
    """One training step of a fresh model on fixed random tokens, as a function."""
    import torch
    import torch.nn.functional as F
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = build_model(config)
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    gains = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": matrices, "weight_decay": 0.1}, {"params": gains, "weight_decay": 0.0}],
                                  lr=3e-4, betas=(0.9, 0.99))
    shape = (config["batch_size"], config["seq_len"])
    x, y = torch.randint(0, config["vocab_size"], shape), torch.randint(0, config["vocab_size"], shape)

    def step():
        loss = F.cross_entropy(model(x).view(-1, config["vocab_size"]), y.view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def train_char(path: str, seed: int, threads: int, steps: int = 2000, eval_interval: int = 250,
               eval_iters: int = 20, attention_dropout: float = 0.0) -> dict:
    import torch
    import torch.nn.functional as F
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    text = open(path, encoding="utf-8").read()
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([index[c] for c in text], dtype=torch.long)
    split = int(0.9 * len(data))
    train_data, val_data = data[:split], data[split:]
    config = dict(CONFIGS["char"], vocab_size=len(chars), attention_dropout=attention_dropout)
    B, T = config["batch_size"], config["seq_len"]
    model = build_model(config)
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    gains = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": matrices, "weight_decay": 0.1}, {"params": gains, "weight_decay": 0.0}],
                                  lr=1e-3, betas=(0.9, 0.99))

    def batch(source):
        starts = torch.randint(len(source) - T - 1, (B,))
        x = torch.stack([source[s:s + T] for s in starts])                 # (B, T)
        return x, torch.stack([source[s + 1:s + T + 1] for s in starts])

    def lr_at(step):                        # warmup, then cosine from 1e-3 to 1e-4 (tinygrad_llm.optim.lr_schedule)
        if step < 100:
            return 1e-3 * (step + 1) / 101
        progress = min(1.0, (step - 100) / max(1, steps - 100))
        return 1e-4 + 0.5 * (1e-3 - 1e-4) * (1 + math.cos(math.pi * progress))

    def validation_loss():
        model.eval()
        with torch.no_grad():
            losses = [F.cross_entropy(model(x).view(-1, len(chars)), y.view(-1)).item()
                      for x, y in (batch(val_data) for _ in range(eval_iters))]
        model.train()
        return sum(losses) / len(losses)

    seconds, evaluations = 0.0, []
    for step in range(steps):
        start = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        x, y = batch(train_data)
        loss = F.cross_entropy(model(x).view(-1, len(chars)), y.view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds += time.perf_counter() - start
        if (step + 1) % eval_interval == 0 or step + 1 == steps:
            evaluations.append({"step": step + 1, "train_s": seconds, "val_loss": validation_loss()})
    return {"seed": seed, "train_seconds": seconds, "evaluations": evaluations,
            "full_val_loss": full_validation_loss(model, val_data, T, len(chars))}


def full_validation_loss(model, tokens, seq_len: int, vocab_size: int, rows: int = 64) -> float:
    """Mean loss over every non-overlapping window of the validation split (windows t·T … t·T + T, the
    targets shifted by one), the low-noise figure that `benchmarks/char_quality.py` compares."""
    import torch
    import torch.nn.functional as F
    count = (len(tokens) - 1) // seq_len
    starts = torch.arange(count) * seq_len
    total = 0.0
    model.eval()
    with torch.no_grad():
        for first in range(0, count, rows):
            chunk = starts[first:first + rows]
            x = torch.stack([tokens[s:s + seq_len] for s in chunk])                     # (rows, T)
            y = torch.stack([tokens[s + 1:s + seq_len + 1] for s in chunk])
            total += F.cross_entropy(model(x).view(-1, vocab_size), y.view(-1), reduction="sum").item()
    model.train()
    return total / (count * seq_len)


def time_steps(step, steps: int, warmup: int) -> dict:
    """Wall and process-CPU seconds of each timed step."""
    wall, cpu = [], []
    for i in range(warmup + steps):
        start, start_cpu = time.perf_counter(), time.process_time()
        step()
        if i >= warmup:
            wall.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
    return {"wall": wall, "cpu": cpu}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="a")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="print only the timings as JSON")
    parser.add_argument("--train-char", metavar="FILE", help="train the char config on FILE for 2000 steps instead")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--attention-dropout", type=float, default=0.0,
                        help="--train-char: dropout on the attention probabilities while training")
    args = parser.parse_args(argv)
    if not 0.0 <= args.attention_dropout < 1.0:
        parser.error(f"--attention-dropout must be in [0, 1), got {args.attention_dropout}")
    try:
        import torch
    except ImportError:
        print("torch_baseline.py: error: PyTorch is not installed (pip install torch)", file=sys.stderr)
        return 1
    if args.train_char:
        result = train_char(args.train_char, args.seed, args.threads, attention_dropout=args.attention_dropout)
        for record in result["evaluations"]:
            print(f"step {record['step']:>4}  {record['train_s']:7.1f} s  val {record['val_loss']:.4f}")
        print(f"whole validation split: {result['full_val_loss']:.4f}")
        print(json.dumps(result))
        return 0
    config = CONFIGS[args.config]
    times = time_steps(make_step(config, args.threads), args.steps, args.warmup)
    if args.json:
        print(json.dumps(times))
        return 0
    tokens = config["batch_size"] * config["seq_len"]
    wall = sorted(times["wall"])[len(times["wall"]) // 2]
    print(f"PyTorch {torch.__version__}, config {args.config}, {args.threads} thread(s): median {wall * 1e3:.1f} ms/step, "
          f"{tokens / wall:,.0f} tokens/s; worst {max(times['wall']) * 1e3:.1f} ms; "
          f"CPU time {sorted(times['cpu'])[len(times['cpu']) // 2] * 1e3:.1f} ms/step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
