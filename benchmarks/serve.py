"""Serving benchmark: aggregate tokens/s and time to first token at 1, 8 and 32 concurrent streaming clients.

    python benchmarks/serve.py                       # CPU, the default model below, 64 tokens per request
    python benchmarks/serve.py --concurrency 1 8 32 --max-tokens 64 --requests-per-client 2
    python benchmarks/serve.py --d-model 128 --layers 2      # a smaller model
    python benchmarks/serve.py --device cuda                 # the GPU rows (needs CuPy and a GPU)

What is measured: one `tinygrad-llm serve`-equivalent server (tinygrad_llm.serve.create_app under uvicorn,
--max-batch 32) runs in a child process; this process is the client (httpx, asyncio). For each
concurrency c, c clients each send --requests-per-client streaming /v1/completions requests one after
another (greedy, `max_tokens` tokens; the tokenizer has no end-of-text token, so every request produces
exactly max_tokens tokens; logprobs=0 so that every token is its own event). Reported per c:

    tokens/s     all completion tokens / wall time from the first request sent to the last [DONE]
    TTFT p50/p99 request sent -> first streamed token, over all of c's requests (nearest-rank percentiles)
    speedup      tokens/s over the c = 1 row (one client at a time: the server never batches)
    server CPU s the server process's user + system CPU seconds during the level (Linux /proc), and
    tokens/CPU s tokens per server CPU second: on a machine loaded by other jobs the server may get far
                 less than a core, which wall-clock tokens/s cannot show

The model has random weights (the speed of a forward does not depend on their values): a Llama-style GPT
of --d-model, --layers, --heads, 4·d_model/... FFN, a 320-id BPE vocabulary trained on the tests'
Shakespeare sample, --context positions, on --device (cpu, or cuda: the model's weights and the KV cache
on the GPU); the other device's rows are printed as "not measured".
Each concurrency runs after one warm-up request, and the levels run --rounds times interleaved
(1, 8, 32, 1, 8, 32, ...) so that a change in the machine's load hits every level; each row is the level's
worst round. The server runs with OPENBLAS_NUM_THREADS=1 by default: its scheduler thread and its event
loop already keep two cores busy, and on a loaded 2-core machine two BLAS threads per GEMM made a decode
step of 32 sequences 4-5x slower than one thread did.
"""
import argparse
import asyncio
import datetime
import json
import os
import platform
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))


def build(args):
    from text_sample import SHAKESPEARE

    from tinygrad_llm import manual_seed
    from tinygrad_llm.model import GPT, GPTConfig
    from tinygrad_llm.tokenizer import Tokenizer
    tokenizer = Tokenizer.train(SHAKESPEARE, 320)
    manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, d_model=args.d_model, n_layers=args.layers,
                          n_heads=args.heads, ffn_hidden=args.d_model * 8 // 3 // 64 * 64 or 64,
                          max_seq_len=args.context)).eval()
    model.to(device=args.device)
    return model, tokenizer


def serve(args):
    import uvicorn

    from tinygrad_llm.serve.app import create_app
    model, tokenizer = build(args)
    app = create_app(model, tokenizer, "bench", max_batch=args.max_batch, max_queue=1024)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


def _cpu_seconds(pid):
    """User + system CPU seconds of a process (Linux /proc; 0 elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def percentile(values, q):
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, int(round(q / 100 * len(ordered) + 0.5)) - 1))]


async def one_request(http, prompt, max_tokens):
    started = time.perf_counter()
    first, tokens = None, 0
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "logprobs": 0}
    async with http.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {await response.aread()}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line[6:])["choices"][0]
            count = len((choice.get("logprobs") or {}).get("tokens", []))
            if count and first is None:
                first = time.perf_counter() - started
            tokens += count
    return first, tokens


async def run_level(url, concurrency, per_client, max_tokens, prompts, server_pid):
    import httpx
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        await one_request(http, prompts[0], 4)                                   # warm-up

        async def client(index):
            out = []
            for k in range(per_client):
                out.append(await one_request(http, prompts[(index * per_client + k) % len(prompts)], max_tokens))
            return out
        started, cpu = time.perf_counter(), _cpu_seconds(server_pid)
        results = await asyncio.gather(*(client(i) for i in range(concurrency)))
        seconds, cpu = time.perf_counter() - started, _cpu_seconds(server_pid) - cpu
    flat = [r for rs in results for r in rs]
    tokens = sum(t for _, t in flat)
    ttft = [f for f, _ in flat]
    return {"concurrency": concurrency, "requests": len(flat), "tokens": tokens, "seconds": seconds,
            "server_cpu": cpu, "tokens_per_cpu_s": tokens / cpu if cpu else float("nan"),
            "tokens_per_s": tokens / seconds, "ttft_p50": percentile(ttft, 50), "ttft_p99": percentile(ttft, 99)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--port", type=int, default=8763)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the server's model runs")
    parser.add_argument("--rounds", type=int, default=3, help="the levels run this many times, interleaved")
    parser.add_argument("--blas-threads", default="1", help="OPENBLAS_NUM_THREADS of the server (default 1)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)   # the child process
    args = parser.parse_args()
    if args.serve:
        return serve(args)

    import httpx
    from text_sample import SHAKESPEARE
    command = [sys.executable, os.path.abspath(__file__), "--serve"] + sys.argv[1:]
    child = subprocess.Popen(command, env=dict(os.environ, OPENBLAS_THREAD_TIMEOUT="4",
                                               OPENBLAS_NUM_THREADS=str(args.blas_threads)))
    url = f"http://127.0.0.1:{args.port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or child.poll() is not None:
                raise SystemExit("the server did not start")
            time.sleep(0.2)
        prompts = [SHAKESPEARE[(53 * i) % 1800:(53 * i) % 1800 + 60] for i in range(64)]
        rounds = [[asyncio.run(run_level(url, c, args.requests_per_client, args.max_tokens, prompts, child.pid))
                   for c in args.concurrency] for _ in range(args.rounds)]
    finally:
        child.terminate()
        child.wait(30)

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    print(f"# {datetime.date.today()}  {cpu}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print(f"# command: python benchmarks/serve.py {' '.join(sys.argv[1:])}".rstrip())
    print(f"# model: d_model {args.d_model}, {args.layers} layers, {args.heads} heads, context {args.context}, "
          f"vocab 320, random weights; server --max-batch {args.max_batch}; {args.max_tokens} tokens per request, "
          f"{args.requests_per_client} requests per client")
    print(f"# server OPENBLAS_NUM_THREADS={args.blas_threads}; {args.rounds} interleaved rounds; each row is the "
          f"round with the lowest tokens/s; 'speedup' compares worst with worst, and the range gives every round's")
    print("# server CPU s: the server process's user+system CPU time during the level (a starved server shows "
          "far fewer CPU seconds than wall seconds); tokens/CPU s: tokens per server CPU second")
    print("| device | clients | requests | tokens | seconds | tokens/s | TTFT p50 (ms) | TTFT p99 (ms) | speedup | "
          "speedup range | server CPU s | tokens/CPU s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    worst = {c: min((rows[i] for rows in rounds for i in range(len(rows)) if rows[i]["concurrency"] == c),
                    key=lambda r: r["tokens_per_s"]) for c in args.concurrency}
    ratios = {c: [rows[i]["tokens_per_s"] / next(r["tokens_per_s"] for r in rows if r["concurrency"] == 1)
                  for rows in rounds for i in range(len(rows)) if rows[i]["concurrency"] == c]
              for c in args.concurrency} if 1 in args.concurrency else {}
    base = worst[1]["tokens_per_s"] if 1 in worst else None
    for c, r in worst.items():
        speedup = f"{r['tokens_per_s'] / base:.2f}x" if base else "-"
        spread = f"{min(ratios[c]):.2f}-{max(ratios[c]):.2f}x" if ratios else "-"
        print(f"| {args.device} | {c} | {r['requests']} | {r['tokens']} | {r['seconds']:.2f} | {r['tokens_per_s']:.1f} | "
              f"{r['ttft_p50'] * 1000:.0f} | {r['ttft_p99'] * 1000:.0f} | {speedup} | {spread} | "
              f"{r['server_cpu']:.1f} | {r['tokens_per_cpu_s']:.0f} |")
    other = "cuda" if args.device == "cpu" else "cpu"
    for c in args.concurrency:
        print(f"| {other} | {c} | not measured (this run: --device {args.device}) | | | | | | | | | |")


if __name__ == "__main__":
    main()
