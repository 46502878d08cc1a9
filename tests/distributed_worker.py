"""One process of a data-parallel training job, for tests/test_distributed.py (run under mpiexec or alone).

    mpiexec -n 2 python tests/distributed_worker.py OUT.json [--zero] [--accum 2] [--steps 50] ...

Trains a tiny float64 GPT on random tokens with DataParallel and writes, from rank 0, the global loss of
every step, the final weights (as lists) and the bytes reduced per step to OUT.json. Options let a test
save the state at a step, resume from a saved state, kill a rank, or give one rank another config.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tinygrad_llm import manual_seed  # noqa: E402
from tinygrad_llm.distributed import (DataParallel, RankSlice, communicator, install_abort_on_error,  # noqa: E402
                                      tokens_in)
from tinygrad_llm.model import GPT, GPTConfig  # noqa: E402
from tinygrad_llm.optim import AdamW  # noqa: E402
from tinygrad_llm.data.feed import RandomWindows  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--accum", type=int, default=1)
    parser.add_argument("--zero", action="store_true")
    parser.add_argument("--no-overlap", action="store_true")
    parser.add_argument("--bucket-bytes", type=int, default=4096)
    parser.add_argument("--save-at", type=int, default=0)
    parser.add_argument("--resume-from", default="")
    parser.add_argument("--die-at", type=int, default=0, help="rank 1 exits abruptly at this step")
    parser.add_argument("--odd-rank-d-model", type=int, default=0)
    args = parser.parse_args()

    comm = communicator("cpu", timeout=60)
    install_abort_on_error(comm)
    d_model = args.odd_rank_d_model if (args.odd_rank_d_model and comm.rank % 2) else 32
    config = GPTConfig(vocab_size=37, d_model=d_model, n_layers=2, n_heads=2, ffn_hidden=64, max_seq_len=16)
    manual_seed(7)
    model = GPT(config, dtype=np.float64)
    optimizer = AdamW(model.named_parameters(), lr=3e-3, weight_decay=0.1,
                      shard=(comm.rank, comm.size) if args.zero else None)
    parallel = DataParallel(model, optimizer, comm, bucket_bytes=args.bucket_bytes, overlap=not args.no_overlap)
    parallel.check_same_everywhere({"model": config.to_dict(), "batch": args.batch, "accum": args.accum})
    tokens = np.random.default_rng(3).integers(0, 37, 4000)
    batches = RankSlice(RandomWindows(tokens, args.batch, 16, seed=11), comm.rank, comm.size)

    start, losses = 0, []
    if args.resume_from:
        with open(args.resume_from + ".json") as f:
            meta = json.load(f)
        saved = np.load(args.resume_from + ".npz", allow_pickle=False)
        for name, p in model.named_parameters():
            p.data[...] = saved["param." + name]
        optimizer.load_state_dict({k[len("opt."):]: saved[k] for k in saved.files if k.startswith("opt.")},
                                  meta["optimizer"])
        start, losses = meta["step"], meta["losses"]

    for step in range(start, args.steps):
        if args.die_at and step == args.die_at and comm.rank == 1:
            os._exit(7)
        micro_batches = [batches.batch(step * args.accum + m) for m in range(args.accum)]
        seeds = parallel.backward_seeds([tokens_in(y) for _, y in micro_batches])
        optimizer.zero_grad()
        step_loss = 0.0
        for m, (x, y) in enumerate(micro_batches):
            _, loss = model(x, y, return_logits=False)
            parallel.backward(loss, seeds[m], last=m == args.accum - 1)
            step_loss += seeds[m] * float(loss.item())
        norm = parallel.reduce()
        parallel.step(grad_scale=min(1.0, 1.0 / (norm + 1e-6)))
        losses.append(float(comm.sum_host(np.array([step_loss]))[0]))
        if args.save_at and step + 1 == args.save_at:
            arrays, meta = optimizer.state_dict()          # every rank takes part: the shards are combined
            if comm.rank == 0:
                np.savez(args.out + ".state.npz", **{"param." + n: p.data for n, p in model.named_parameters()},
                         **{"opt." + k: v for k, v in arrays.items()})
                with open(args.out + ".state.json", "w") as f:
                    json.dump({"step": step + 1, "losses": losses, "optimizer": meta}, f)
            comm.barrier()
    if comm.rank == 0:
        result = {"losses": losses, "world": comm.size, "bytes_per_step": parallel.bytes_per_step,
                  "buckets": len(parallel.buckets), "optimizer_state_bytes": parallel.optimizer_state_bytes(),
                  "weights": {n: np.asarray(p.data).ravel().tolist() for n, p in model.named_parameters()}}
        with open(args.out, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main()
