"""Decode latency: time to first token (prefill) and decode tokens/s at batch 1, 8 and 32, peak memory,
for float32 / q8_0 / q4_0 weights, on the default model and a GPT-2-size one (random weights), on the CPU
at 1 and 2 threads. GPU rows are printed as "not measured here" unless CuPy sees a GPU.

    python benchmarks/decode.py                                  # the full table (several minutes on 2 cores)
    python benchmarks/decode.py --models default --batches 1,32  # a quick look
    python benchmarks/decode.py --matmul                         # the CPU quantized-matmul alternatives
    python benchmarks/decode.py --profile --models default --types q8_0   # where a decode step's time goes

Quantized weights are made by one subprocess and written to $TMPDIR/tinygrad_llm_decode_*.safetensors
(reused by later runs; delete them after changing the model configs), then read by the measuring one, so
its peak RSS is that of a loaded quantized model. Each (model, weight type, threads) runs in a fresh subprocess with OPENBLAS_NUM_THREADS = TINYGRAD_LLM_THREADS
= threads (and OPENBLAS_THREAD_TIMEOUT=4, as the CLI sets), so the thread count takes effect and the peak
RSS (ru_maxrss) is that configuration's own. For each batch size B: B random prompts of --prompt-len tokens
are prefilled one after another into a BatchedKVCache (TTFT = the time until every sequence has its
first token's logits), then --new-tokens greedy decode steps of B tokens each (tokens/s = B · steps / time).
Each figure is the worst (slowest) of --repeat runs, as the project's benchmarks report. "tok per CPU-s"
divides by the process's CPU time (time.process_time, all its threads) instead of the wall clock: on a
shared machine it leaves out the time the process waited for a core, so at 1 thread it is what an idle
core would give; at 2 threads it is throughput per CPU-second, not per wall-second.
llama.cpp (llama-cpp-python) and transformers columns appear only when those packages are installed.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import platform
import pstats
import resource
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MODELS = {   # name -> GPTConfig fields; "default" is `tinygrad-llm train`'s model on the char corpus
    "default": dict(vocab_size=65, d_model=128, n_layers=4, n_heads=4, ffn_hidden=384, max_seq_len=256),
    "gpt2": dict(vocab_size=50257, d_model=768, n_layers=12, n_heads=12, ffn_hidden=2048, max_seq_len=1024,
                 tie_embeddings=True),   # 124M parameters like GPT-2 small (SwiGLU with 2048 = GPT-2's MLP size)
}


def build(model_name: str, kind: str):
    """A random-weight model of MODELS[model_name]; for q8_0 / q4_0 the quantized weights are read from a
    file that a separate process wrote (prepare_file), so this process's peak RSS never held the float
    model, as when a quantized run is loaded. Returns (model, weight bytes, parameter count)."""
    from tinygrad_llm import manual_seed
    from tinygrad_llm.model import GPT, GPTConfig
    config = GPTConfig(**MODELS[model_name])
    if kind == "float32":
        manual_seed(0)
        model = GPT(config)
        return model, int(sum(p.data.nbytes for p in model.parameters())), model.num_parameters()
    from safetensors.numpy import load_file
    from tinygrad_llm.quant.runs import QuantizedModel, weights_from_arrays
    model = QuantizedModel(config, kind, weights_from_arrays(config, kind, dict(load_file(prepared_path(model_name, kind)))))
    return model, model.nbytes, model.num_parameters()


def prepared_path(model_name: str, kind: str) -> str:
    return os.path.join(os.environ.get("TMPDIR", "/tmp"), f"tinygrad_llm_decode_{model_name}_{kind}.safetensors")


def prepare_file(model_name: str, kind: str) -> None:
    """Quantize the random float model and write its arrays where build() reads them."""
    from safetensors.numpy import save_file
    from tinygrad_llm import manual_seed
    from tinygrad_llm.model import GPT, GPTConfig
    from tinygrad_llm.quant.runs import _arrays, quantize_weights
    manual_seed(0)
    model = GPT(GPTConfig(**MODELS[model_name]))
    arrays = _arrays(quantize_weights({name: p.data for name, p in model.named_parameters()}, kind))
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, prepared_path(model_name, kind))


def measure(model_name: str, kind: str, batches, prompt_len: int, new_tokens: int, repeat: int) -> list:
    from tinygrad_llm.generate import Decoder
    model, weight_bytes, parameters = build(model_name, kind)
    decoder = Decoder(model)
    vocab = model.config.vocab_size
    rows = []
    for batch in batches:
        worst_ttft, worst_rate, worst_cpu_rate, cache_bytes = 0.0, float("inf"), float("inf"), 0
        for trial in range(repeat):
            rng = np.random.default_rng(trial)
            prompts = rng.integers(0, vocab, (batch, prompt_len))
            cache = decoder.new_cache(batch, prompt_len + new_tokens)
            slots = [cache.allocate() for _ in range(batch)]
            start = time.perf_counter()
            logits = np.stack([decoder.prefill(cache, slot, prompt) for slot, prompt in zip(slots, prompts)])
            ttft = time.perf_counter() - start
            tokens = logits.argmax(axis=1)
            start, cpu_start = time.perf_counter(), time.process_time()
            for _ in range(new_tokens):
                tokens = decoder.decode_step(cache, tokens, slots).argmax(axis=1)
            rate = batch * new_tokens / (time.perf_counter() - start)
            cpu_rate = batch * new_tokens / (time.process_time() - cpu_start)
            worst_ttft, worst_rate = max(worst_ttft, ttft), min(worst_rate, rate)
            worst_cpu_rate = min(worst_cpu_rate, cpu_rate)
            cache_bytes = cache.nbytes
        rows.append({"model": model_name, "type": kind, "batch": batch, "ttft_ms": 1e3 * worst_ttft,
                     "tokens_per_s": worst_rate, "tokens_per_cpu_s": worst_cpu_rate, "weight_bytes": weight_bytes, "parameters": parameters,
                     "bytes_per_parameter": weight_bytes / parameters, "kv_cache_bytes": cache_bytes})
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024          # Linux: KiB
    for row in rows:
        row["peak_rss_bytes"] = peak
    return rows


def profile(model_name: str, kind: str, batch: int, prompt_len: int, new_tokens: int) -> str:
    from tinygrad_llm.generate import Decoder
    model, _, _ = build(model_name, kind)
    decoder = Decoder(model)
    cache = decoder.new_cache(batch, prompt_len + new_tokens + 1)
    slots = [cache.allocate() for _ in range(batch)]
    prompts = np.random.default_rng(0).integers(0, model.config.vocab_size, (batch, prompt_len))
    tokens = np.stack([decoder.prefill(cache, s, p) for s, p in zip(slots, prompts)]).argmax(axis=1)
    profiler = cProfile.Profile(time.process_time)      # CPU time: not the waits of a shared machine
    profiler.enable()
    for _ in range(new_tokens):
        tokens = decoder.decode_step(cache, tokens, slots).argmax(axis=1)
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(18)
    return text.getvalue()


def matmul_alternatives(repeat: int) -> list:
    """The CPU quantized linear: the op's path against dequantising whole tiles and the int8 dot product."""
    from tinygrad_llm.ops import quantized
    from tinygrad_llm.quant import QuantizedMatrix
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((2048, 768)) * 0.02).astype(np.float32)   # the GPT-2-size up_proj
    rows = []

    def worst_ms(function):
        function()
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            for _ in range(10):
                function()
            times.append((time.perf_counter() - start) / 10 * 1e3)
        return max(times)

    for kind in ("q8_0", "q4_0", "int8"):
        matrix = QuantizedMatrix.quantize(weight, kind)
        for batch in (1, 8, 32):
            x = rng.standard_normal((batch, 768)).astype(np.float32)
            tile = np.empty_like(weight)

            def dequantise_then_gemm():
                tile[...] = matrix.dequantize()
                return x @ tile.T

            row = {"type": kind, "batch": batch, "op_ms": worst_ms(lambda: quantized.linear_forward(x, matrix)),
                   "dequantise_then_gemm_ms": worst_ms(dequantise_then_gemm),
                   "float32_gemm_ms": worst_ms(lambda: x @ weight.T)}
            if kind == "int8":
                row["int8_dot_ms"] = worst_ms(lambda: quantized.int8_dot_linear(x, matrix))
            rows.append(row)
    return rows


def optional_baselines() -> list:
    lines = []
    for package, what in (("llama_cpp", "llama.cpp (llama-cpp-python)"), ("transformers", "transformers")):
        try:
            __import__(package)
            lines.append(f"{what}: installed, but no side-by-side run is wired into this script yet")
        except ImportError:
            lines.append(f"{what}: not installed (optional; its columns are skipped)")
    return lines


def child(args) -> None:
    if args.prepare:
        prepare_file(args.models[0], args.types[0])
        return
    if args.profile:
        print(profile(args.models[0], args.types[0], args.batches[0], args.prompt_len, args.new_tokens))
        return
    if args.matmul:
        print(json.dumps(matmul_alternatives(args.repeat)))
        return
    print(json.dumps(measure(args.models[0], args.types[0], args.batches, args.prompt_len, args.new_tokens,
                             args.repeat)))


def run_child(argv: list, threads: int) -> str:
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads),
               TINYGRAD_LLM_THREADS=str(threads), OPENBLAS_THREAD_TIMEOUT="4")
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", *argv], env=env,
                          capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"child {' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def gpu_line() -> str:
    from tinygrad_llm import backend
    return ("GPU: present, but this script times the CPU only; GPU rows not measured here" if backend.gpu_available()
            else "GPU: not measured here (no CuPy/GPU on this machine)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="default,gpt2")
    parser.add_argument("--types", default="float32,q8_0,q4_0")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--matmul", action="store_true", help="time the quantized-matmul alternatives")
    parser.add_argument("--profile", action="store_true", help="cProfile of decode steps (first model/type/batch)")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.models, args.types = args.models.split(","), args.types.split(",")
    args.batches = [int(b) for b in args.batches.split(",")]
    threads = [int(t) for t in args.threads.split(",")]
    if args.child:
        child(args)
        return
    command = "python benchmarks/decode.py " + " ".join(sys.argv[1:])
    print(f"# {command}\n# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, numpy {np.__version__}")
    common = ["--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens), "--repeat", str(args.repeat)]
    for model_name in args.models:                     # quantized weights written once, by another process
        for kind in args.types:
            if kind != "float32" and not args.matmul and not os.path.isfile(prepared_path(model_name, kind)):
                run_child(["--prepare", "--models", model_name, "--types", kind], threads[0])
    if args.profile:
        print(run_child(["--profile", "--models", args.models[0], "--types", args.types[0], "--batches",
                         str(args.batches[0]), *common], threads[0]))
        return
    if args.matmul:
        print("| threads | type | batch | op (ms) | dequantise whole + GEMM (ms) | int8 dot (ms) | float32 GEMM (ms) |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for count in threads:
            for row in json.loads(run_child(["--matmul", *common], count)):
                int8 = f"{row['int8_dot_ms']:.2f}" if "int8_dot_ms" in row else "—"
                print(f"| {count} | {row['type']} | {row['batch']} | {row['op_ms']:.2f} | "
                      f"{row['dequantise_then_gemm_ms']:.2f} | {int8} | {row['float32_gemm_ms']:.2f} |")
        return
    all_rows = []
    print("| model | weights | threads | batch | TTFT (ms) | decode tok/s | ×batch 1 | tok per CPU-s | ×batch 1 "
          "| bytes/param | weights MiB | KV cache MiB | peak RSS MiB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for model_name in args.models:
        for kind in args.types:
            for count in threads:
                rows = json.loads(run_child(["--models", model_name, "--types", kind, "--batches",
                                             ",".join(map(str, args.batches)), *common], count))
                base = next((r["tokens_per_s"] for r in rows if r["batch"] == 1), None)
                cpu_base = next((r["tokens_per_cpu_s"] for r in rows if r["batch"] == 1), None)
                for row in rows:
                    row["threads"] = count
                    ratio = f"{row['tokens_per_s'] / base:.1f}" if base else "—"
                    cpu_ratio = f"{row['tokens_per_cpu_s'] / cpu_base:.1f}" if cpu_base else "—"
                    print(f"| {model_name} | {kind} | {count} | {row['batch']} | {row['ttft_ms']:.1f} | "
                          f"{row['tokens_per_s']:.1f} | {ratio} | {row['tokens_per_cpu_s']:.1f} | {cpu_ratio} | "
                          f"{row['bytes_per_parameter']:.4f} | "
                          f"{row['weight_bytes'] / 2**20:.1f} | {row['kv_cache_bytes'] / 2**20:.1f} | "
                          f"{row['peak_rss_bytes'] / 2**20:.0f} |", flush=True)
                all_rows.extend(rows)
    print(f"\n{gpu_line()}")
    for line in optional_baselines():
        print(line)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(all_rows, f, indent=1)


if __name__ == "__main__":
    main()
