"""Decode speed of this tree against another revision, side by side: ABAB rounds of benchmarks/decode.py's
measurement (one fresh subprocess per configuration and round), so that both see the same machine load.

    python benchmarks/decode_ab.py --base HEAD~3 --models gpt2 --types q8_0,q4_0,float32 --threads 1 --rounds 3

The base revision is exported with `git archive` into a temporary directory (its own decode.py runs there).
Each round runs, for every (model, type, threads), the base then this tree (the order alternates between
rounds), each a decode.py child process with --repeat 1: batch sizes in turn, tokens per CPU-second
(process time: what an idle core would give at 1 thread) and the ratio to batch 1 of the same process.
Printed: the worst round of each (the lowest tokens/s, the lowest ratio) and `uptime`'s load average
at the start and end. Weights as in decode.py (random; quantized ones from its prepared files).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def export(revision: str, target: str) -> None:
    archive = subprocess.run(["git", "-C", ROOT, "archive", revision], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", target], input=archive, check=True)


def child(tree: str, model: str, kind: str, threads: int, args) -> list:
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads),
               TINYGRAD_LLM_THREADS=str(threads), OPENBLAS_THREAD_TIMEOUT="4")
    command = [sys.executable, os.path.join(tree, "benchmarks", "decode.py"), "--child", "--models", model,
               "--types", kind, "--batches", args.batches, "--prompt-len", str(args.prompt_len),
               "--new-tokens", str(args.new_tokens), "--repeat", "1"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=tree)
    if done.returncode:
        raise SystemExit(f"{tree}: {' '.join(command[2:])} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="HEAD", help="the git revision to compare against (default HEAD)")
    parser.add_argument("--models", default="gpt2")
    parser.add_argument("--types", default="q8_0,q4_0,float32")
    parser.add_argument("--threads", default="1")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"# python benchmarks/decode_ab.py {' '.join(sys.argv[1:])}")
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average at start {os.getloadavg()}")
    with tempfile.TemporaryDirectory(prefix="decode_ab_") as base_tree:
        export(args.base, base_tree)
        trees = {"base": base_tree, "this": ROOT}
        configs = [(m, k, int(t)) for m in args.models.split(",") for k in args.types.split(",")
                   for t in args.threads.split(",")]
        for model, kind, _ in configs:                   # the prepared quantized file, outside the timings
            if kind != "float32":
                child(ROOT, model, kind, 1, argparse.Namespace(**{**vars(args), "batches": "1", "new_tokens": 1}))
        results = {}
        for round_ in range(args.rounds):
            for config in configs:
                for name in (("base", "this") if round_ % 2 == 0 else ("this", "base")):
                    for row in child(trees[name], *config, args):
                        results.setdefault((*config, row["batch"], name), []).append(row)
    print(f"# load average at end {os.getloadavg()}; worst of {args.rounds} rounds each")
    print("| model | type | threads | batch | base tok/CPU-s | this tok/CPU-s | this / base | base ×batch 1 "
          "| this ×batch 1 |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for model, kind, threads in configs:
        for batch in [int(b) for b in args.batches.split(",")]:
            base, this = results[(model, kind, threads, batch, "base")], results[(model, kind, threads, batch, "this")]
            rate = lambda rows: min(r["tokens_per_cpu_s"] for r in rows)
            ratio = lambda rows: min(r.get("cpu_ratio", 1.0) for r in rows)
            print(f"| {model} | {kind} | {threads} | {batch} | {rate(base):.0f} | {rate(this):.0f} | "
                  f"{rate(this) / rate(base):.3f} | {ratio(base):.2f} | {ratio(this):.2f} |")


if __name__ == "__main__":
    main()
