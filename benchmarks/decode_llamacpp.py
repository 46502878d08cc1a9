"""Batch-1 decoding beside llama.cpp: the same weights, the same GGUF file's types, the same thread count.

    pip install llama-cpp-python                          # optional (the `llamacpp` extra), built from source
    python benchmarks/decode_llamacpp.py                  # default and GPT-2-size models, f32/q8_0/q4_0, 1 and 2 threads
    python benchmarks/decode_llamacpp.py --models default --types q8_0 --threads 1
    python benchmarks/decode_llamacpp.py --profile --models gpt2 --types q8_0   # where our decode step's time goes
    TINYGRAD_LLM_CPU_KERNELS=0 python benchmarks/decode_llamacpp.py --types q8_0,q4_0   # ours on the op's NumPy path

For each model (decode.py's MODELS: the default `tinygrad-llm train` shape and a GPT-2-size one, random
weights) and weight type, the float model is built once from a fixed seed and exported with the project's
own GGUF writer (tinygrad_llm.export.export_gguf, what `tinygrad-llm export --gguf` runs) as f32, q8_0 or
q4_0 into $TMPDIR/tinygrad_llm_llamacpp_<model>_<type>.gguf (rebuilt when missing). llama.cpp
(llama-cpp-python's Llama, n_threads = n_threads_batch = threads) loads that file; our side rebuilds the
same float model from the same seed and, for q8_0 / q4_0, quantizes it with tinygrad_llm.quant (whose Q8_0
and Q4_0 bytes equal gguf's, so both sides hold the same weights), then decodes with
tinygrad_llm.generate.Decoder, as `sample`, `chat` and the server do (the quantized linear op on its C
kernels, tinygrad_llm/quant/cpu_kernels.c, where a C compiler built them; the environment, and with it
TINYGRAD_LLM_CPU_KERNELS, passes to the measuring processes).

Each measurement runs in a fresh process with OPENBLAS_NUM_THREADS = OMP_NUM_THREADS = TINYGRAD_LLM_THREADS
= threads, OPENBLAS_THREAD_TIMEOUT=4 (as the CLI sets) and OMP_WAIT_POLICY=PASSIVE (llama.cpp's OpenMP
threads sleep at a barrier instead of spinning: on a loaded 2-core machine, spinning once dropped its
2-thread decode of the default model to 2 tokens/s; OpenBLAS's threads follow the timeout instead),
after a warm-up: a prompt of --prompt-len
random token ids is processed in one call (prompt tok/s), then --new-tokens greedy tokens are decoded one
at a time (decode tok/s, each step an argmax over the logits on the Python side for both). Ours and
llama.cpp alternate (ours, llama.cpp, ours, llama.cpp, ... --rounds times) so that the machine's load hits
both; each figure is the worst round, and "ours / llama.cpp" compares worst with worst. "same greedy
ids" counts the positions where the two sides chose the same token in the first round (the first
mismatch sends the two sequences apart; quantized llama.cpp also rounds the activations to 8 bits). The tokenizer is
a small character vocabulary with <|endoftext|> (the ids past it are unused padding in the GGUF file): the
token ids are random, so only the vocabulary size matters for speed.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import platform
import pstats
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from decode import MODELS  # noqa: E402  (one definition of the benchmark models)

GGUF_TYPES = {"float32": "f32", "q8_0": "q8_0", "q4_0": "q4_0"}


def float_model(model_name: str):
    from tinygrad_llm import manual_seed
    from tinygrad_llm.model import GPT, GPTConfig
    manual_seed(0)
    return GPT(GPTConfig(**MODELS[model_name])).eval()


def small_vocabulary(vocab_size: int):
    """A character vocabulary of at most 94 printable characters + <|endoftext|>, within vocab_size ids."""
    from tinygrad_llm.tokenizer import CharVocab
    return CharVocab([chr(0x21 + i) for i in range(min(vocab_size - 1, 94))])


def gguf_path(model_name: str, kind: str) -> str:
    return os.path.join(os.environ.get("TMPDIR", "/tmp"), f"tinygrad_llm_llamacpp_{model_name}_{kind}.gguf")


def write_gguf(model_name: str, kind: str) -> None:
    from tinygrad_llm.export import export_gguf
    model = float_model(model_name)
    export_gguf(model, small_vocabulary(model.config.vocab_size), gguf_path(model_name, kind), GGUF_TYPES[kind],
                name=f"decode_llamacpp {model_name}", force=True)


# ---------------------------------------------------------------------------------------------- one side, one process
def ours(model_name: str, kind: str):
    """(prefill(ids) -> next id, step(id) -> next id, reset()) over tinygrad_llm.generate.Decoder."""
    from tinygrad_llm.generate import Decoder, model_weights
    model = float_model(model_name)
    if kind != "float32":
        from tinygrad_llm.quant.runs import QuantizedModel, quantize_weights
        model = QuantizedModel(model.config, kind, quantize_weights(model_weights(model), kind))
    decoder = Decoder(model)
    state = {}

    def reset(length):
        state["cache"] = decoder.new_cache(1, length)
        state["slot"] = state["cache"].allocate()

    def prefill(ids):
        return int(np.argmax(decoder.prefill(state["cache"], state["slot"], ids)))

    def step(token):
        return int(np.argmax(decoder.decode_step(state["cache"], [token], [state["slot"]])[0]))
    return prefill, step, reset, decoder


def llama(model_name: str, kind: str, threads: int, context: int):
    import llama_cpp
    llm = llama_cpp.Llama(model_path=gguf_path(model_name, kind), n_ctx=context, n_batch=context,
                          n_threads=threads, n_threads_batch=threads, verbose=False, seed=0)
    vocab = llm.n_vocab()

    def last_logits():
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,))            # (V,) of the last token

    def prefill(ids):
        llm.eval([int(t) for t in ids])
        return int(np.argmax(last_logits()))

    def step(token):
        llm.eval([token])
        return int(np.argmax(last_logits()))

    def reset(length):
        llm.reset()
    return prefill, step, reset, llm


def measure(side: str, model_name: str, kind: str, threads: int, prompt_len: int, new_tokens: int) -> dict:
    context = prompt_len + new_tokens + 8
    if side == "ours":
        prefill, step, reset, _ = ours(model_name, kind)
    else:
        prefill, step, reset, _ = llama(model_name, kind, threads, context)
    prompt = np.random.default_rng(1).integers(0, MODELS[model_name]["vocab_size"], prompt_len).tolist()
    reset(context)                                        # warm-up: caches, thread pools, first-call costs
    token = prefill(prompt[:8])
    for _ in range(4):
        token = step(token)
    reset(context)
    start = time.perf_counter()
    token = prefill(prompt)
    prefill_s = time.perf_counter() - start
    tokens = [token]
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(new_tokens):
        token = step(token)
        tokens.append(token)
    decode_s, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {"tokens": tokens, "prefill_ms": 1e3 * prefill_s, "prompt_tok_s": prompt_len / prefill_s,
            "decode_tok_s": new_tokens / decode_s, "decode_ms": 1e3 * decode_s / new_tokens,
            "decode_tok_cpu_s": new_tokens / cpu if cpu > 0 else float("nan")}


def profile(model_name: str, kind: str, prompt_len: int, new_tokens: int) -> str:
    """cProfile (CPU time) of our batch-1 decode steps."""
    prefill, step, reset, _ = ours(model_name, kind)
    reset(prompt_len + new_tokens + 8)
    token = prefill(np.random.default_rng(1).integers(0, MODELS[model_name]["vocab_size"], prompt_len).tolist())
    profiler = cProfile.Profile(time.process_time)
    start = time.process_time()
    profiler.enable()
    for _ in range(new_tokens):
        token = step(token)
    profiler.disable()
    text = io.StringIO()
    text.write(f"{new_tokens} decode steps, {1e3 * (time.process_time() - start) / new_tokens:.2f} CPU-ms a step "
               f"under the profiler\n")
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(20)
    return text.getvalue()


def run_child(argv: list, threads: int) -> str:
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads),
               TINYGRAD_LLM_THREADS=str(threads), OPENBLAS_THREAD_TIMEOUT="4", OMP_WAIT_POLICY="PASSIVE")
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", *argv], env=env,
                          capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"child {' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="default,gpt2")
    parser.add_argument("--types", default="float32,q8_0,q4_0")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2, help="ours and llama.cpp alternate this many times")
    parser.add_argument("--profile", action="store_true", help="cProfile of our decode steps (first model and type)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--side", default="ours", help=argparse.SUPPRESS)
    parser.add_argument("--write", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    models, kinds = args.models.split(","), args.types.split(",")
    threads = [int(t) for t in args.threads.split(",")]
    for kind in kinds:
        if kind not in GGUF_TYPES:
            raise SystemExit(f"decode_llamacpp.py: error: unknown type {kind!r}; choose from {', '.join(GGUF_TYPES)}")
    if args.child:
        if args.write:
            write_gguf(models[0], kinds[0])
        elif args.profile:
            print(profile(models[0], kinds[0], args.prompt_len, args.new_tokens))
        else:
            print(json.dumps(measure(args.side, models[0], kinds[0], threads[0], args.prompt_len, args.new_tokens)))
        return
    common = ["--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens)]
    if args.profile:
        print(run_child(["--profile", "--models", models[0], "--types", kinds[0], "--threads", str(threads[0]),
                         *common], threads[0]))
        return
    try:
        import llama_cpp
    except ImportError:
        raise SystemExit("decode_llamacpp.py: error: llama-cpp-python is not installed (pip install -e .[llamacpp])")
    print(f"# python benchmarks/decode_llamacpp.py {' '.join(sys.argv[1:])}".rstrip())
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the start; numpy {np.__version__}, "
          f"llama-cpp-python {llama_cpp.__version__}")
    print(f"# batch 1; prompt {args.prompt_len} random ids in one call, then {args.new_tokens} greedy tokens one at a "
          f"time; {args.rounds} alternating rounds, worst round shown")
    print("| model | weights | threads | ours prompt tok/s | llama.cpp prompt tok/s | ours decode tok/s | "
          "llama.cpp decode tok/s | ours / llama.cpp (decode) | ours decode tok per CPU-s | same greedy ids | load |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for model_name in models:
        for kind in kinds:
            if not os.path.isfile(gguf_path(model_name, kind)):
                run_child(["--write", "--models", model_name, "--types", kind], 1)
            for count in threads:
                results = {"ours": [], "llama": []}
                for _ in range(args.rounds):
                    for side in ("ours", "llama"):
                        argv = ["--side", side, "--models", model_name, "--types", kind, "--threads", str(count)]
                        results[side].append(json.loads(run_child(argv + common, count)))
                worst = {side: {key: min(r[key] for r in rows) for key in ("prompt_tok_s", "decode_tok_s",
                                                                           "decode_tok_cpu_s")}
                         for side, rows in results.items()}
                same = f"{sum(a == b for a, b in zip(results['ours'][0]['tokens'], results['llama'][0]['tokens']))}"
                same += f"/{len(results['ours'][0]['tokens'])}"
                print(f"| {model_name} | {kind} | {count} | {worst['ours']['prompt_tok_s']:.0f} | "
                      f"{worst['llama']['prompt_tok_s']:.0f} | {worst['ours']['decode_tok_s']:.1f} | "
                      f"{worst['llama']['decode_tok_s']:.1f} | "
                      f"{worst['ours']['decode_tok_s'] / worst['llama']['decode_tok_s']:.2f}x | "
                      f"{worst['ours']['decode_tok_cpu_s']:.1f} | {same} | {os.getloadavg()[0]:.1f} |", flush=True)


if __name__ == "__main__":
    main()
