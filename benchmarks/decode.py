"""Decode latency: time to first token (prefill) and decode tokens/s at batch 1, 8 and 32, peak memory,
for float32 / q8_0 / q4_0 weights, on the default model and a GPT-2-size one (random weights), on the CPU
at 1 and 2 threads. GPU rows are printed as "not measured here" unless CuPy sees a GPU.

    python benchmarks/decode.py                                  # the full table (several minutes on 2 cores)
    python benchmarks/decode.py --models default --batches 1,32  # a quick look
    python benchmarks/decode.py --matmul                         # the CPU quantized-matmul alternatives
    TINYGRAD_LLM_CPU_KERNELS=0 python benchmarks/decode.py       # the quantized op's NumPy path (no C kernels)
    python benchmarks/decode.py --linears --models gpt2 --threads 1 --batches 1,8,32 --repeat 3
                                              # one step's matrix products: C kernels, NumPy path, float32
    python benchmarks/decode.py --orientation --threads 1        # Linear: x @ Wᵀ against (W @ xᵀ)ᵀ (FEW_ROWS)
    python benchmarks/decode.py --profile --models default --types q8_0   # where a decode step's time goes
    python benchmarks/decode.py --step-ops --models gpt2 --threads 1 --batches 1,32 --prompt-len 16 --new-tokens 8
                                              # the same, per part of the compiled CPU step (CPU ms a step)
    python benchmarks/decode.py --device cuda                    # one GPU: fp32/bf16/fp16 and q8_0/q4_0 kernels
    python benchmarks/decode.py --device cuda --transformers     # + transformers generate (bf16, static cache, compiled)
    python benchmarks/decode.py --device cuda --graphs both      # decode steps from CUDA graphs and uncaptured

Quantized weights are made by one subprocess and written to $TMPDIR/tinygrad_llm_decode_*.safetensors
(reused by later runs; delete them after changing the model configs), then read by the measuring one, so
its peak RSS is that of a loaded quantized model. Each (model, weight type, threads) runs in a fresh subprocess with OPENBLAS_NUM_THREADS = TINYGRAD_LLM_THREADS
= threads (and OPENBLAS_THREAD_TIMEOUT=4, as the CLI sets), so the thread count takes effect and the peak
RSS (ru_maxrss) is that configuration's own. For each batch size B: B random prompts of --prompt-len tokens
are prefilled one after another into a BatchedKVCache (TTFT = the time until every sequence has its
first token's logits), then --new-tokens greedy decode steps of B tokens each (tokens/s = B · steps / time).
The batch sizes take turns (one trial of each per round, --repeat rounds, in one process): each figure is
the worst (slowest) of the rounds, and "×batch 1" is the worst over rounds of that round's tokens/s divided
by batch 1's in the same round, so a change of load between rounds cannot fake or hide the ratio. "tok per CPU-s"
divides by the process's CPU time (time.process_time, all its threads) instead of the wall clock: on a
shared machine it leaves out the time the process waited for a core, so at 1 thread it is what an idle
core would give; at 2 threads it is throughput per CPU-second, not per wall-second.
llama.cpp (llama-cpp-python) and transformers columns appear only when those packages are installed.

GPU (--device cuda): one process, no subprocesses. Rows for float32 weights under each --precisions policy
(tinygrad_llm.precision: the GEMMs in bf16/fp16, norms, attention and the KV cache in float32) and for
q8_0 / q4_0 weights (the quantized CUDA kernels, fp32 policy). Same prompts and steps as on the CPU; every
decode step ends with the logits copied to the host (what sampling needs), so the timings include the
synchronisation. Decode steps replay from CUDA graphs (--graphs on, what Decoder does by default; "off"
runs them uncaptured, "both" prints both); the KV cache of a batch size is kept across trials, as a
server keeps its one cache, so the graphs are captured in the warm-up trial. Peak GPU memory is the most CuPy's memory pool held during that configuration (the pool is
emptied before each). --transformers adds Hugging Face transformers' `generate` on a random LlamaForCausalLM
of the same shape (bf16, greedy, a static cache, whose decoding forward `generate` compiles itself, and
its default dynamic cache without compile for reference; "compiled" is printed only when the model has
generate's compiled call afterwards) at --transformers-batches: TTFT = generate(1 new token), decode tokens/s =
B · (N − 1) / (time of N new tokens − time of 1). It is skipped with a message when torch or transformers
is missing or torch sees no GPU. Defaults for the GPU: --models gpt2 --new-tokens 32 --repeat 3.
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
    settings = argparse.Namespace(prompt_len=prompt_len, new_tokens=new_tokens, repeat=repeat, batches=batches)
    rows = interleaved_rows(decoder, vocab, settings, warm_up=False)
    for row in rows:
        row.update({"model": model_name, "type": kind, "weight_bytes": weight_bytes, "parameters": parameters,
                    "bytes_per_parameter": weight_bytes / parameters})
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


def step_ops(model_name: str, kind: str, batch: int, prompt_len: int, new_tokens: int, repeat: int) -> str:
    """Where a CPU decoding step's time goes: the step's bound calls (generate._CpuStep) run one by one, each
    timed in CPU time (process time), summed over the layers by role; then the head and the greedy argmax.
    `repeat` rounds of `new_tokens` steps from the same cache positions; the worst round's mean per step."""
    from tinygrad_llm.generate import Decoder
    model, _, _ = build(model_name, kind)
    decoder = Decoder(model)
    cache = decoder.new_cache(batch, prompt_len + new_tokens + 1)
    slots = np.array([cache.allocate() for _ in range(batch)])
    prompts = np.random.default_rng(0).integers(0, model.config.vocab_size, (batch, prompt_len))
    first = np.stack([decoder.prefill(cache, s, p) for s, p in zip(slots, prompts)]).argmax(axis=1)
    decoder.decode_step(cache, first, slots)                                  # builds the step
    step = decoder._cpu_step(cache, batch)
    if step is None:
        return f"{model_name} {kind} batch {batch}: no compiled step here (op by op)"
    layer = decoder.layers[0]
    mlp = ["gate‖up", "SwiGLU"] if layer.gate_up is not None else ["gate", "up", "SwiGLU"]
    names = ((["q‖k‖v"] if layer.qkv is not None else ["q", "k", "v"]) + ["attention", "o", "add + norm"]
             + mlp + ["down", "add + norm"])
    labels = ["first norm"] + names * len(decoder.layers)
    if len(labels) != len(step.calls):
        return f"{model_name} {kind} batch {batch}: unexpected step layout ({len(step.calls)} calls)"
    worst, worst_total = {}, 0.0
    for _ in range(repeat):
        cache.lengths[slots] = prompt_len
        tokens, totals, whole = first, {}, time.process_time()
        for _ in range(new_tokens):
            step.slots[...], step.positions[...] = slots, cache.lengths[slots]
            start = time.process_time()
            step.streams[0][...] = decoder._embed(tokens)
            totals["embedding"] = totals.get("embedding", 0.0) + time.process_time() - start
            for label, call in zip(labels, step.calls):
                start = time.process_time()
                call()
                totals[label] = totals.get(label, 0.0) + time.process_time() - start
            start = time.process_time()
            logits = step.head()
            middle = time.process_time()
            tokens = logits.argmax(axis=1)
            totals["head"] = totals.get("head", 0.0) + middle - start
            totals["argmax"] = totals.get("argmax", 0.0) + time.process_time() - middle
            cache.lengths[slots] += 1
        whole = time.process_time() - whole
        if whole > worst_total:
            worst, worst_total = totals, whole
    lines = [f"{model_name} {kind} batch {batch}: {worst_total / new_tokens * 1e3:.2f} CPU ms a step (worst of "
             f"{repeat} rounds), {batch * new_tokens / worst_total:.0f} tokens per CPU-s",
             "| part | CPU ms a step | share |", "| --- | --- | --- |"]
    for label, total in sorted(worst.items(), key=lambda item: -item[1]):
        lines.append(f"| {label} | {total / new_tokens * 1e3:.3f} | {100 * total / worst_total:.1f} % |")
    return "\n".join(lines)


def matmul_alternatives(repeat: int) -> list:
    """The CPU quantized linear: the op (its C kernels for Q8_0 / Q4_0 where they are built) against its
    NumPy path, dequantising the whole matrix then one GEMM, and the int8 dot product."""
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
                   "numpy_path_ms": worst_ms(lambda: _numpy_path(x, matrix)),
                   "dequantise_then_gemm_ms": worst_ms(dequantise_then_gemm),
                   "float32_gemm_ms": worst_ms(lambda: x @ weight.T)}
            if kind == "int8":
                row["int8_dot_ms"] = worst_ms(lambda: quantized.int8_dot_linear(x, matrix))
            rows.append(row)
    return rows


def _numpy_path(x, matrix):
    """The quantized op's NumPy path (no C kernels, no rounded activations), for the NumPy-path columns."""
    from tinygrad_llm.ops import quantized
    from tinygrad_llm.quant import cpu_kernels
    saved = quantized.KERNEL_ROWS, cpu_kernels.ROUNDED_ROWS
    quantized.KERNEL_ROWS, cpu_kernels.ROUNDED_ROWS = 0, 1 << 62
    try:
        return quantized.linear_forward(x, matrix)
    finally:
        quantized.KERNEL_ROWS, cpu_kernels.ROUNDED_ROWS = saved


def step_linears(model_name: str, kinds: list, batches: list, repeat: int) -> list:
    """The matrix products of one decode step of a MODELS model (every layer's q, k, v, o, gate, up, down and
    the output head: random codes and scales, no model built), at each batch size: float32 weights (x @ Wᵀ),
    the quantized op (its C kernels where built) and the op's NumPy path. The three take turns, one step
    each per round, `repeat` rounds; the worst round of each, in CPU ms a step (process time)."""
    from tinygrad_llm.ops import quantized
    from tinygrad_llm.quant import QuantizedMatrix
    config = MODELS[model_name]
    d, f, layers = config["d_model"], config["ffn_hidden"], config["n_layers"]
    shapes = [(d, d)] * 4 * layers + [(f, d), (f, d), (d, f)] * layers + [(config["vocab_size"], d)]
    rng = np.random.default_rng(0)

    def codes(kind, out_features, in_features):
        blocks = in_features // 32
        values = (rng.integers(-127, 128, (blocks, out_features, 32), dtype=np.int8) if kind == "q8_0" else
                  rng.integers(0, 256, (blocks, out_features, 16), dtype=np.uint8))
        return QuantizedMatrix(kind, (out_features, in_features), values,
                               (rng.random((blocks, out_features), dtype=np.float32) * 1e-3).astype(np.float16))

    rows = []
    for kind in kinds:
        if kind == "float32":
            continue
        weights = [codes(kind, *shape) for shape in shapes]
        for batch in batches:
            inputs = {n: rng.standard_normal((batch, n), dtype=np.float32) for n in {d, f}}
            sides = {"op": lambda w: quantized.linear_forward(inputs[w.shape[1]], w),
                     "numpy_path": lambda w: _numpy_path(inputs[w.shape[1]], w)}
            worst = dict.fromkeys(sides, 0.0)
            for function in sides.values():
                for weight in weights:
                    function(weight)                     # warm: the kernels' build, the NumPy path's float32 scales
            for _ in range(repeat):
                for name, function in sides.items():
                    start = time.process_time()
                    for weight in weights:
                        function(weight)
                    worst[name] = max(worst[name], (time.process_time() - start) * 1e3)
            rows.append({"model": model_name, "type": kind, "batch": batch, **worst,
                         "weights": int(sum(a * b for a, b in shapes))})
        del weights
    if "float32" in kinds:
        weights = [(rng.standard_normal(shape, dtype=np.float32) * 0.02) for shape in shapes]
        for batch in batches:
            inputs = {n: rng.standard_normal((batch, n), dtype=np.float32) for n in {d, f}}
            worst = 0.0
            for _ in range(repeat):
                start = time.process_time()
                for weight in weights:
                    inputs[weight.shape[1]] @ weight.T
                worst = max(worst, (time.process_time() - start) * 1e3)
            rows.append({"model": model_name, "type": "float32", "batch": batch, "op": worst,
                         "weights": int(sum(a * b for a, b in shapes))})
    return rows


def orientations(repeat: int) -> list:
    """Linear's two orientations on NumPy, at the GPT-2-size shapes: x @ Wᵀ against (W @ xᵀ)ᵀ (which
    ops/matmul.Linear uses for 2 … FEW_ROWS rows). Interleaved in rounds; the worst round of each."""
    rng = np.random.default_rng(0)
    rows = []
    for out_features, in_features in ((768, 768), (2048, 768), (768, 2048), (50257, 768)):
        weight = rng.standard_normal((out_features, in_features), dtype=np.float32)
        for batch in (1, 2, 8, 32, 128, 512):
            x = rng.standard_normal((batch, in_features), dtype=np.float32)
            calls = max(1, int(2e8 // (2 * out_features * in_features * batch)))
            worst = {"x_wt": 0.0, "w_xt": 0.0}
            for _ in range(repeat):
                for name, function in (("x_wt", lambda: x @ weight.T), ("w_xt", lambda: (weight @ x.T).T)):
                    function()
                    start = time.perf_counter()
                    for _ in range(calls):
                        function()
                    worst[name] = max(worst[name], (time.perf_counter() - start) / calls * 1e3)
            rows.append({"shape": f"{out_features}×{in_features}", "batch": batch, **worst})
    return rows


def optional_baselines() -> list:
    lines = []
    try:
        __import__("llama_cpp")
        lines.append("llama.cpp (llama-cpp-python): installed, but no side-by-side run is wired into this script yet")
    except ImportError:
        lines.append("llama.cpp (llama-cpp-python): not installed (optional; its columns are skipped)")
    lines.append("transformers: GPU only, `--device cuda --transformers`")
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
    if args.step_ops:
        print(step_ops(args.models[0], args.types[0], args.batches[0], args.prompt_len, args.new_tokens, args.repeat))
        return
    if args.orientation:
        print(json.dumps(orientations(args.repeat)))
        return
    if args.linears:
        print(json.dumps(step_linears(args.models[0], args.types, args.batches, args.repeat)))
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
    return ("GPU: present; `--device cuda` times it" if backend.gpu_available()
            else "GPU: not measured here (no CuPy/GPU on this machine; `--device cuda` on one)")


def gpu_rows(args) -> list:
    """Decode timings on the GPU in this process: float32 weights under each precision policy, then the
    quantized types under fp32 (their CUDA kernels)."""
    from tinygrad_llm import backend, precision
    from tinygrad_llm.generate import Decoder
    cp = backend.cupy_module()
    pool = cp.get_default_memory_pool()
    rows = []
    for model_name in args.models:
        for kind in args.types:
            model, weight_bytes, parameters = build_in_memory(model_name, kind)
            model.to(device="cuda")
            for policy in (args.precisions if kind == "float32" else ["fp32"]):
                for graphs in args.graphs:
                    pool.free_all_blocks()               # what the last policy's Decoder held goes back
                    with precision.policy(policy):
                        decoder = Decoder(model, cuda_graphs=graphs == "on")
                        for row in interleaved_rows(decoder, model.config.vocab_size, args, warm_up=True):
                            row.update({"model": model_name, "type": kind, "precision": policy, "graphs": graphs,
                                        "weight_bytes": weight_bytes, "parameters": parameters})
                            rows.append(row)
                    peak = pool.total_bytes()
                    for row in rows:
                        row.setdefault("peak_gpu_bytes", peak)
                    del decoder
            del model
    return rows


def build_in_memory(model_name: str, kind: str):
    """A random-weight model of MODELS[model_name], quantized in this process for q8_0 / q4_0 (the GPU
    table reports GPU memory, so the host's peak does not matter here)."""
    from tinygrad_llm import manual_seed
    from tinygrad_llm.model import GPT, GPTConfig
    from tinygrad_llm.quant.runs import QuantizedModel, quantize_weights
    config = GPTConfig(**MODELS[model_name])
    manual_seed(0)
    model = GPT(config)
    if kind == "float32":
        return model, int(sum(p.data.nbytes for p in model.parameters())), model.num_parameters()
    model = QuantizedModel(config, kind, quantize_weights({n: p.data for n, p in model.named_parameters()}, kind))
    return model, model.nbytes, model.num_parameters()


def decode_trial(decoder, vocab: int, batch: int, args, seed: int, caches: dict) -> tuple:
    """One trial: (TTFT s, decode tokens/s, decode tokens per CPU-second, KV cache bytes). The KV cache of
    a batch size is kept from trial to trial (`caches`), as a server keeps its one cache: on the GPU its
    captured decoding steps (CUDA graphs) are then made once, in the warm-up trial."""
    prompts = np.random.default_rng(seed).integers(0, vocab, (batch, args.prompt_len))
    cache = caches.get(batch)
    if cache is None:
        cache = caches[batch] = decoder.new_cache(batch, args.prompt_len + args.new_tokens)
    for slot in cache.active_slots:
        cache.release(slot)
    slots = [cache.allocate() for _ in range(batch)]
    start = time.perf_counter()
    logits = np.stack([decoder.prefill(cache, slot, prompt) for slot, prompt in zip(slots, prompts)])
    ttft = time.perf_counter() - start
    tokens = logits.argmax(axis=1)
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(args.new_tokens):
        tokens = decoder.decode_step(cache, tokens, slots).argmax(axis=1)          # logits come back to the host
    rate = batch * args.new_tokens / (time.perf_counter() - start)
    cpu_rate = batch * args.new_tokens / max(time.process_time() - cpu_start, 1e-9)
    return ttft, rate, cpu_rate, cache.nbytes


def interleaved_rows(decoder, vocab: int, args, warm_up: bool) -> list:
    """Every batch size once per round (ABAB…), --repeat rounds; per batch: the worst TTFT and tokens/s,
    and the worst over rounds of its tokens/s divided by batch 1's in the same round (a ratio that a
    change of machine load between rounds does not fake)."""
    trials = {batch: [] for batch in args.batches}
    caches = {}
    if warm_up:                                                  # the first GPU launches compile kernels
        for batch in args.batches:
            decode_trial(decoder, vocab, batch, args, 0, caches)
    for round_ in range(args.repeat):
        for batch in args.batches:
            trials[batch].append(decode_trial(decoder, vocab, batch, args, round_, caches))
    base = trials.get(1)
    rows = []
    for batch, runs in trials.items():
        ttft, rate, cpu_rate, cache_bytes = (max(r[0] for r in runs), min(r[1] for r in runs),
                                             min(r[2] for r in runs), runs[-1][3])
        row = {"batch": batch, "ttft_ms": 1e3 * ttft, "tokens_per_s": rate, "tokens_per_cpu_s": cpu_rate,
               "kv_cache_bytes": cache_bytes}
        if base is not None:
            row["ratio"] = min(r[1] / b[1] for r, b in zip(runs, base))
            row["cpu_ratio"] = min(r[2] / b[2] for r, b in zip(runs, base))
        rows.append(row)
    return rows


def transformers_rows(args, device: str = "cuda") -> tuple:
    """transformers `generate` on the GPU (bf16), or ([], why not). (device="cpu" only checks the wiring.)"""
    try:
        import torch
        import transformers
    except ImportError as missing:
        return [], f"transformers baseline skipped: {missing.name} is not installed"
    if device == "cuda" and not torch.cuda.is_available():
        return [], "transformers baseline skipped: torch sees no CUDA GPU"
    gpu = device == "cuda"
    synchronize = torch.cuda.synchronize if gpu else (lambda: None)
    rows = []
    for model_name in args.models:
        fields = MODELS[model_name]
        config = transformers.LlamaConfig(
            vocab_size=fields["vocab_size"], hidden_size=fields["d_model"], intermediate_size=fields["ffn_hidden"],
            num_hidden_layers=fields["n_layers"], num_attention_heads=fields["n_heads"],
            num_key_value_heads=fields.get("n_kv_heads") or fields["n_heads"],
            max_position_embeddings=fields["max_seq_len"], rope_theta=10000.0, rms_norm_eps=1e-5,
            tie_word_embeddings=bool(fields.get("tie_embeddings")), attention_bias=False, mlp_bias=False)
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(config).to(device=device, dtype=torch.bfloat16).eval()
        for cache_kind in ("dynamic", "static"):
            options = {}
            if cache_kind == "static":   # transformers' recipe: a static cache; generate then compiles the
                options["cache_implementation"] = "static"      # decoding forward itself (its compile_config)
            for batch in args.transformers_batches:
                if gpu:
                    torch.cuda.reset_peak_memory_stats()
                ids = torch.randint(0, fields["vocab_size"], (batch, args.prompt_len), device=device)

                def generate(new_tokens):
                    synchronize()
                    start = time.perf_counter()
                    with torch.no_grad():
                        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                       min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **options)
                    synchronize()
                    return time.perf_counter() - start

                try:
                    for _ in range(2):                                  # compile and capture the graphs
                        generate(args.new_tokens)
                        generate(1)
                except Exception as error:                              # report it; the other rows stand
                    print(f"transformers {cache_kind} cache, batch {batch}: failed: {str(error).splitlines()[0]}")
                    continue
                worst_ttft, worst_rate = 0.0, float("inf")
                for _ in range(args.repeat):
                    first, whole = generate(1), generate(args.new_tokens)
                    worst_ttft = max(worst_ttft, first)
                    rate = batch * (args.new_tokens - 1) / (whole - first) if whole > first else float("nan")
                    worst_rate = rate if rate != rate else min(worst_rate, rate)       # nan: a timing too noisy to use
                compiled = cache_kind == "static" and getattr(model, "_compiled_call", None) is not None
                rows.append({"model": model_name, "type": f"transformers bf16, {cache_kind} cache"
                             + (", compiled" if compiled else ""), "batch": batch,
                             "ttft_ms": 1e3 * worst_ttft, "tokens_per_s": worst_rate,
                             "peak_gpu_bytes": torch.cuda.max_memory_allocated() if gpu else 0})
        model = None                                            # the weights go before the cache is emptied
        if gpu:
            torch.cuda.empty_cache()
    return rows, f"transformers {transformers.__version__}, torch {torch.__version__}"


def gpu_main(args, command: str) -> None:
    from tinygrad_llm import backend
    if not backend.gpu_available():
        raise SystemExit("decode.py: --device cuda needs CuPy and an NVIDIA GPU; neither is usable here "
                         "(pip install -e .[gpu] on a GPU machine)")
    cp = backend.cupy_module()
    name = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["name"]
    name = name.decode() if isinstance(name, bytes) else name
    print(f"# {command}\n# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {name}, CuPy {cp.__version__}, "
          f"numpy {np.__version__}; prompts of {args.prompt_len} tokens, {args.new_tokens} greedy steps, "
          f"worst of {args.repeat}")
    rows = gpu_rows(args)
    print("| model | weights | precision | CUDA graphs | batch | TTFT (ms) | decode tok/s | ×batch 1 | ms/step "
          "| weights MiB | KV cache MiB | peak GPU MiB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        ratio = f"{row['ratio']:.1f}" if "ratio" in row else "—"
        print(f"| {row['model']} | {row['type']} | {row['precision']} | {row['graphs']} | {row['batch']} | "
              f"{row['ttft_ms']:.1f} | "
              f"{row['tokens_per_s']:.1f} | {ratio} | "
              f"{1e3 * row['batch'] / row['tokens_per_s']:.2f} | {row['weight_bytes'] / 2**20:.1f} | "
              f"{row['kv_cache_bytes'] / 2**20:.1f} | {row['peak_gpu_bytes'] / 2**20:.0f} |", flush=True)
    if args.transformers:
        cp.get_default_memory_pool().free_all_blocks()
        baseline, note = transformers_rows(args)
        print(f"\n{note}")
        if baseline:
            print("| model | baseline | batch | TTFT (ms) | decode tok/s | ms/step | peak GPU MiB (torch) |")
            print("| --- | --- | --- | --- | --- | --- | --- |")
            for row in baseline:
                print(f"| {row['model']} | {row['type']} | {row['batch']} | {row['ttft_ms']:.1f} | "
                      f"{row['tokens_per_s']:.1f} | {1e3 * row['batch'] / row['tokens_per_s']:.2f} | "
                      f"{row['peak_gpu_bytes'] / 2**20:.0f} |")
            for row in rows:
                theirs = next((r for r in baseline if r["model"] == row["model"] and r["batch"] == row["batch"]
                               and "static" in r["type"]), None)
                if theirs is not None and row["type"] == "float32" and row["precision"] == "bf16":
                    print(f"{row['model']} batch {row['batch']}, bf16, graphs {row['graphs']}: ours / "
                          f"transformers (static, compiled) = "
                          f"{row['tokens_per_s'] / theirs['tokens_per_s']:.2f}× decode tokens/s")
        rows += baseline
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--models", default=None, help="default: default,gpt2 (CPU), gpt2 (cuda)")
    parser.add_argument("--types", default="float32,q8_0,q4_0")
    parser.add_argument("--precisions", default="fp32,bf16,fp16", help="cuda: the policies for float32 weights")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=None, help="default: 16 (CPU), 32 (cuda)")
    parser.add_argument("--repeat", type=int, default=None, help="default: 2 (CPU), 3 (cuda)")
    parser.add_argument("--transformers", action="store_true", help="cuda: also time transformers generate")
    parser.add_argument("--transformers-batches", default="1")
    parser.add_argument("--graphs", default="on", choices=["on", "off", "both"],
                        help="cuda: decode steps replayed from CUDA graphs (on, the default), uncaptured, or both")
    parser.add_argument("--matmul", action="store_true", help="time the quantized-matmul alternatives")
    parser.add_argument("--profile", action="store_true", help="cProfile of decode steps (first model/type/batch)")
    parser.add_argument("--orientation", action="store_true", help="time x @ Wᵀ against (W @ xᵀ)ᵀ (Linear's few-row path)")
    parser.add_argument("--step-ops", action="store_true",
                        help="CPU time of each part of a compiled decoding step (first model and thread count)")
    parser.add_argument("--linears", action="store_true",
                        help="time one decode step's matrix products: quantized op, its NumPy path, float32")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    gpu = args.device == "cuda"
    args.models = (args.models or ("gpt2" if gpu else "default,gpt2")).split(",")
    args.new_tokens = args.new_tokens or (32 if gpu else 16)
    args.repeat = args.repeat or (3 if gpu else 2)
    args.types, args.precisions = args.types.split(","), args.precisions.split(",")
    args.batches = [int(b) for b in args.batches.split(",")]
    args.transformers_batches = [int(b) for b in args.transformers_batches.split(",")]
    args.graphs = ["on", "off"] if args.graphs == "both" else [args.graphs]
    threads = [int(t) for t in args.threads.split(",")]
    unknown = sorted(set(args.models) - set(MODELS))
    if unknown:
        raise SystemExit(f"decode.py: unknown model {unknown[0]!r} (known: {', '.join(MODELS)})")
    if args.child:
        child(args)
        return
    command = "python benchmarks/decode.py " + " ".join(sys.argv[1:])
    if gpu:
        gpu_main(args, command)
        return
    if args.transformers:
        raise SystemExit("decode.py: --transformers times transformers on the GPU; add --device cuda")
    print(f"# {command}\n# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, numpy {np.__version__}")
    common = ["--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens), "--repeat", str(args.repeat)]
    for model_name in args.models:                     # quantized weights written once, by another process
        for kind in args.types:
            if (kind != "float32" and not args.matmul and not args.orientation and not args.linears
                    and not os.path.isfile(prepared_path(model_name, kind))):
                run_child(["--prepare", "--models", model_name, "--types", kind], threads[0])
    if args.profile:
        print(run_child(["--profile", "--models", args.models[0], "--types", args.types[0], "--batches",
                         str(args.batches[0]), *common], threads[0]))
        return
    if args.step_ops:
        for kind in args.types:
            for batch in args.batches:
                print(run_child(["--step-ops", "--models", args.models[0], "--types", kind, "--batches", str(batch),
                                 *common], threads[0]))
        return
    if args.orientation:
        print("| threads | W (out × in) | rows of x | x @ Wᵀ (ms) | (W @ xᵀ)ᵀ (ms) | speed-up |")
        print("| --- | --- | --- | --- | --- | --- |")
        for count in threads:
            for row in json.loads(run_child(["--orientation", *common], count)):
                print(f"| {count} | {row['shape']} | {row['batch']} | {row['x_wt']:.3f} | {row['w_xt']:.3f} | "
                      f"{row['x_wt'] / row['w_xt']:.2f} |")
        return
    if args.linears:
        from tinygrad_llm.quant import cpu_kernels
        print(f"# the op's C kernels: {'built' if cpu_kernels.library() is not None else 'not available (NumPy path)'}")
        print("| model | threads | type | batch | op, CPU ms a step | op's NumPy path | NumPy path / op "
              "| ns a weight (op) |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for model_name in args.models:
            for count in threads:
                for row in json.loads(run_child(["--linears", "--models", model_name, "--types", ",".join(args.types),
                                                 "--batches", ",".join(map(str, args.batches)), *common], count)):
                    numpy_ms = row.get("numpy_path")
                    slower = f"{numpy_ms / row['op']:.2f}" if numpy_ms else "—"
                    print(f"| {row['model']} | {count} | {row['type']} | {row['batch']} | {row['op']:.2f} | "
                          f"{f'{numpy_ms:.2f}' if numpy_ms else '—'} | {slower} | "
                          f"{row['op'] * 1e6 / row['weights']:.3f} |")
        return
    if args.matmul:
        from tinygrad_llm.quant import cpu_kernels
        print(f"# the op's C kernels: {'built' if cpu_kernels.library() is not None else 'not available (NumPy path)'}")
        print("| threads | type | batch | op (ms) | op's NumPy path (ms) | dequantise whole + GEMM (ms) | int8 dot (ms) "
              "| float32 GEMM (ms) |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for count in threads:
            for row in json.loads(run_child(["--matmul", *common], count)):
                int8 = f"{row['int8_dot_ms']:.2f}" if "int8_dot_ms" in row else "—"
                print(f"| {count} | {row['type']} | {row['batch']} | {row['op_ms']:.2f} | {row['numpy_path_ms']:.2f} | "
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
                for row in rows:
                    row["threads"] = count
                    ratio = f"{row['ratio']:.1f}" if "ratio" in row else "—"
                    cpu_ratio = f"{row['cpu_ratio']:.1f}" if "cpu_ratio" in row else "—"
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
