"""Time to quality on the char config: tinygrad_llm's `train` beside PyTorch, seed by seed.

    python benchmarks/char_quality.py                          # seeds 1337, 2, 3; both sides in turn
    python benchmarks/char_quality.py --seeds 1337 --data ../shared/data/tinyshakespeare.txt

Ours: `tinygrad-llm train --config tinygrad_llm/configs/shakespeare_char.toml --data FILE --seed S` (nanoGPT's
shakespeare_char CPU configuration, 2000 steps, the threading plan it chooses) in a scratch run
directory. PyTorch: `benchmarks/torch_baseline.py --train-char FILE --seed S --threads N` (the same model,
schedule, AdamW and clipping; its own random batches). The two run one after the other for each seed, so
that load from other processes hits both alike.

Printed per seed and side: training seconds to step 2000 (evaluation excluded), the first evaluation step
(every 250) whose validation loss is at most --target and the training seconds it took, the validation
loss at step 2000 as each side's loop reports it (ours: 20 fixed random batches per run; PyTorch: 20 fresh
random batches per evaluation), and the loss over every non-overlapping window of the validation split
(about 111 k characters; the same windows on both sides), which has far less sampling noise than 20
batches. Then the mean and spread of each column.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from train_cpu import load_average   # benchmarks/ is on sys.path when a script in it runs

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, os.pardir))


def full_validation_loss_ours(run_dir: str, data_path: str, rows: int = 64) -> float:
    """The final checkpoint's mean loss over every non-overlapping window of the validation split."""
    sys.path.insert(0, ROOT)
    import numpy as np
    from tinygrad_llm.checkpoint import load_checkpoint
    from tinygrad_llm.tensor import no_grad
    from tinygrad_llm.tokenizer import CharVocab
    model, _ = load_checkpoint(run_dir, which="latest")
    model.eval()
    text = open(data_path, encoding="utf-8").read()
    vocab = CharVocab.from_text(text, special_tokens=())
    tokens = np.asarray(vocab.encode_ordinary(text), dtype=np.int64)
    tokens = tokens[int(len(tokens) * 0.9):]
    seq_len = model.config.max_seq_len
    count = (len(tokens) - 1) // seq_len
    offsets = np.arange(seq_len + 1)
    total = 0.0
    with no_grad():
        for first in range(0, count, rows):
            starts = np.arange(first, min(first + rows, count)) * seq_len
            windows = tokens[starts[:, None] + offsets]                                   # (rows, T + 1)
            _, loss = model(windows[:, :-1], windows[:, 1:], return_logits=False)
            total += float(loss.item()) * windows[:, 1:].size
    return total / (count * seq_len)


def run_ours(seed: int, data_path: str, target: float, attention_dropout: float = 0.0) -> dict:
    with tempfile.TemporaryDirectory(prefix="char_quality_") as run_dir:
        command = [sys.executable, "-m", "tinygrad_llm", "train", "--config",
                   os.path.join(ROOT, "tinygrad_llm", "configs", "shakespeare_char.toml"), "--data", data_path,
                   "--seed", str(seed), "--no-progress", "--sample-tokens", "0", "--out-dir", run_dir,
                   "--attention-dropout", str(attention_dropout)]
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"tinygrad-llm train failed:\n{done.stderr[-2000:]}")
        records = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8")]
        evaluations = [{"step": r["step"], "train_s": r["train_s"], "val_loss": r["val_loss"]}
                       for r in records if "val_loss" in r and "train_s" in r]
        plan = next((r.get("threads", {}) for r in records if r.get("event") == "start"), {})
        full = full_validation_loss_ours(run_dir, data_path)
    return _summary(evaluations, full, target, plan=plan)


def run_torch(seed: int, data_path: str, threads: int, target: float, attention_dropout: float = 0.0) -> dict:
    command = [sys.executable, os.path.join(HERE, "torch_baseline.py"), "--train-char", data_path,
               "--seed", str(seed), "--threads", str(threads), "--attention-dropout", str(attention_dropout)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"torch_baseline.py failed:\n{done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return _summary(result["evaluations"], result["full_val_loss"], target)


def _summary(evaluations: list, full: float, target: float, **extra) -> dict:
    reached = next((e for e in evaluations if e["val_loss"] <= target), None)
    last = evaluations[-1]
    return {"train_s": last["train_s"], "val_final": last["val_loss"], "full_val": full,
            "reached_step": reached["step"] if reached else None,
            "reached_s": reached["train_s"] if reached else None, **extra}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="1337,2,3")
    parser.add_argument("--data", default=os.path.join(ROOT, os.pardir, "shared", "data", "tinyshakespeare.txt"))
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="PyTorch's threads")
    parser.add_argument("--target", type=float, default=1.70, help="validation loss to reach")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--attention-dropout", type=float, default=0.0,
                        help="dropout on the attention probabilities, the same on both sides (the config's is 0)")
    args = parser.parse_args(argv)
    if not 0.0 <= args.attention_dropout < 1.0:
        parser.error(f"--attention-dropout must be in [0, 1), got {args.attention_dropout}")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--seeds takes whole numbers, got {args.seeds!r}")
    if not os.path.isfile(args.data):
        parser.error(f"no such file: {args.data}")
    with_torch = not args.no_torch and subprocess.run([sys.executable, "-c", "import torch"],
                                                      capture_output=True).returncode == 0
    print(f"{' '.join(sys.argv)}\n{os.cpu_count()} CPUs, load average {load_average()} at the start; "
          f"PyTorch {'at ' + str(args.threads) + ' threads' if with_torch else 'not available'}")
    print("train s: training seconds to step 2000; reached: first evaluation step with val <= "
          f"{args.target} (training s); val@2000: the loop's 20-batch figure; whole val: every window")
    print(f"{'seed':>5} {'side':>7} {'train s':>8} {'reached':>14} {'val@2000':>9} {'whole val':>10}  plan/load")
    rows = {"ours": [], "torch": []}
    for seed in seeds:
        sides = [("ours", lambda: run_ours(seed, args.data, args.target, args.attention_dropout))]
        if with_torch:
            sides.append(("torch", lambda: run_torch(seed, args.data, args.threads, args.target,
                                                     args.attention_dropout)))
        for side, run in sides:
            result = dict(run(), seed=seed)
            rows[side].append(result)
            reached = (f"{result['reached_step']} ({result['reached_s']:.1f})" if result["reached_step"]
                       else "not reached")
            plan = result.get("plan", {}).get("plan", "")
            print(f"{seed:>5} {side:>7} {result['train_s']:>8.1f} {reached:>14} {result['val_final']:>9.4f} "
                  f"{result['full_val']:>10.4f}  {plan} load {load_average()}", flush=True)
    for side, results in rows.items():
        if not results:
            continue
        parts = []
        for key in ("train_s", "val_final", "full_val"):
            values = [r[key] for r in results]
            parts.append(f"{key} {statistics.mean(values):.4f} ({min(values):.4f}-{max(values):.4f})")
        print(f"mean (spread) {side}: " + ", ".join(parts))
    print(f"load average {load_average()} at the end")
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
