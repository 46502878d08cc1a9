"""The classic char-level benchmark: nanoGPT's shakespeare_char CPU configuration, Llama-style.

    python examples/train_shakespeare_char.py                        # the built-in corpus (character-level)
    python examples/train_shakespeare_char.py --data input.txt --max-steps 500 --eval-interval 100

4 layers, 4 heads, d 128, SwiGLU 384, T 64, B 12, 2000 steps, lr 1e-3 -> 1e-4 (cosine, warmup 100),
β2 0.99, weight decay 0.1, clip 1.0, the first 90 % of the characters for training and the last 10 % for
validation. The same model in PyTorch 2.13 on a 2-core CPU reaches val loss 1.697 in 133 s; this prints
our validation curve against training time (evaluation excluded, as there), the time to reach val ≤ 1.70
and a sample.
"""
import os

os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")   # before NumPy loads OpenBLAS: see tinygrad_llm/cpu_threads.py

import argparse
import json
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from tinygrad_llm.train import TrainConfig, config_from_dict, load_toml, train  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG = os.path.join(HERE, os.pardir, "tinygrad_llm", "configs", "shakespeare_char.toml")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="", help="nanoGPT's tinyshakespeare input.txt (default: the built-in corpus)")
    parser.add_argument("--out-dir", default="runs/shakespeare_char")
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--eval-interval", type=int, default=None)
    parser.add_argument("--target", type=float, default=1.70, help="report when val loss first reaches this")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    if args.data and not os.path.isfile(args.data):
        parser.error(f"{args.data} not found: pass --data path/to/tinyshakespeare.txt")
    overrides = {"data": args.data, "out_dir": args.out_dir, "resume": args.resume, "progress": not args.no_progress,
                 "sample_tokens": 300, "sample_prompt": "ROMEO:"}
    if args.max_steps:
        overrides["max_steps"] = args.max_steps
    if args.eval_interval:
        overrides["eval_interval"] = args.eval_interval
    config = config_from_dict(overrides, config_from_dict(load_toml(CONFIG), TrainConfig()))
    summary = train(config)
    with open(os.path.join(args.out_dir, "metrics.jsonl")) as f:
        evals = [r for r in map(json.loads, f) if "val_loss" in r and "event" not in r]
    print("\nstep  train_s  val_loss")
    for r in evals:
        print(f"{r['step']:>4} {r['train_s']:>8.1f} {r['val_loss']:>9.4f}")
    reached = next((r for r in evals if r["val_loss"] <= args.target), None)
    print(f"final val loss {summary.get('val_loss', float('nan')):.4f} after {summary['train_seconds']:.1f} s of training; "
          + (f"val <= {args.target} first at step {reached['step']} ({reached['train_s']:.1f} s)" if reached
             else f"val never reached {args.target}"))


if __name__ == "__main__":
    main()
