"""Decoding beside llama.cpp: the same weights, the same GGUF file's types, the same thread count, at batch 1
and, with --batches, at batch B (B sequences decoded at once).

    pip install llama-cpp-python                          # optional (the `llamacpp` extra), built from source
    python benchmarks/decode_llamacpp.py                  # default and GPT-2-size models, f32/q8_0/q4_0, 1, 2 threads
    python benchmarks/decode_llamacpp.py --models default --types q8_0 --threads 1
    python benchmarks/decode_llamacpp.py --models gpt2 --threads 1 --batches 1,32 --prompt-len 16   # batch 32 over 1
    python benchmarks/decode_llamacpp.py --profile --models gpt2 --types q8_0   # where our decode step's time goes
    TINYGRAD_LLM_CPU_KERNELS=0 python benchmarks/decode_llamacpp.py --types q8_0,q4_0   # ours on the op's NumPy path

For each model (decode.py's MODELS: the default `tinygrad-llm train` shape and a GPT-2-size one, random
weights) and weight type, the float model is built once from a fixed seed and exported with the project's
own GGUF writer (tinygrad_llm.export.export_gguf, what `tinygrad-llm export --gguf` runs) as f32, q8_0 or
q4_0 into $TMPDIR/tinygrad_llm_llamacpp_<model>_<type>.gguf (rebuilt when missing). llama.cpp loads that
file through llama-cpp-python's bindings of its C API; our side rebuilds the same float model from the same
seed and, for q8_0 / q4_0, quantizes it with tinygrad_llm.quant (whose Q8_0 and Q4_0 bytes equal gguf's, so
both sides hold the same weights), then decodes with tinygrad_llm.generate.Decoder, as `sample`, `chat`, the
server and decode.py do (the quantized linear op on its C kernels, tinygrad_llm/quant/cpu_kernels.c, where a
C compiler built them; the environment, and with it TINYGRAD_LLM_CPU_KERNELS, passes to the measuring
processes).

Batches (--batches, default 1): for each batch size B, B prompts of --prompt-len random token ids (the same
length for every sequence; batch B's prompts are the first B rows of one random array, so every batch's
first sequence has batch 1's prompt) are each processed in one call (prompt tok/s = B · prompt-len / time),
then --new-tokens greedy steps of B tokens each (decode tok/s = B · new-tokens / time, all sequences; "tok per
CPU-s" divides by the process's CPU time instead, which leaves out the time spent waiting for a core on a
shared machine); each step is an argmax per sequence over its logits on the Python side for both. Ours: each
prompt prefilled into its own slot of a BatchedKVCache, then Decoder.decode_step over the B slots (the
compiled CPU step), as decode.py times a batch. llama.cpp: one context per batch size with n_seq_max = B,
n_ctx = B · (prompt-len + new-tokens + 8), n_batch = n_ubatch large enough for a prompt or a step,
n_threads = n_threads_batch = threads; a step is one llama_batch (llama_batch_init) of B tokens, each under
its own seq_id at its own position with its logits requested, one llama_decode, the (B, V) logits read with
llama_get_logits. Its KV cache is one stream per sequence (--llama-kv split, kv_unified off; llama.cpp pads
each stream to 256 cells) or one shared by all (unified), and its flash attention follows
--llama-flash-attn (default auto, llama.cpp's own default; llama_cpp.Llama turns it off unless asked: at
batch 1 it makes no difference at GPT-2 size, at batch 32 off is slower).

Each measurement runs in a fresh process with OPENBLAS_NUM_THREADS = OMP_NUM_THREADS = TINYGRAD_LLM_THREADS
= threads, OPENBLAS_THREAD_TIMEOUT=4 (as the CLI sets) and OMP_WAIT_POLICY=PASSIVE (llama.cpp's OpenMP
threads sleep at a barrier instead of spinning: on a loaded 2-core machine, spinning once dropped its
2-thread decode of the default model to 2 tokens/s; OpenBLAS's threads follow the timeout instead). A process
measures every batch size in turn, each after a warm-up (8 prompt tokens and 4 steps at that batch size:
caches, thread pools, our compiled step, first-call costs). Ours and llama.cpp alternate (ours, llama.cpp,
ours, llama.cpp, ... --rounds times) so that the machine's load hits both; each figure is the worst round,
"ours / llama.cpp" compares worst with worst, and "×batch 1" is the worst over rounds of a round's batch-B
figure over its batch-1 figure (measured by the same process, one after the other). "same greedy ids" counts the
positions, over all B sequences, where the two sides chose the same token in the first round (the first
mismatch sends a sequence's two continuations apart; quantized llama.cpp also rounds the activations to 8
bits). The tokenizer is a small character vocabulary with <|endoftext|> (the ids past it are unused padding
in the GGUF file): the token ids are random, so only the vocabulary size matters for speed.
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
FLASH_ATTN = {"auto": lambda lib: lib.LLAMA_FLASH_ATTN_TYPE_AUTO, "on": lambda lib: lib.LLAMA_FLASH_ATTN_TYPE_ENABLED,
              "off": lambda lib: lib.LLAMA_FLASH_ATTN_TYPE_DISABLED}                     # llama.cpp's settings


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
    """(reset(batch, length), prefill(prompts (B, P)) -> next ids (B,), step(ids (B,)) -> next ids (B,), decoder)
    over tinygrad_llm.generate.Decoder: each prompt prefilled into its own slot, then one decode_step of B
    tokens, as decode.py and the server run a batch. The KV cache of a batch size is kept from one reset to
    the next (its slots released), so the compiled step built in the warm-up is the one timed."""
    from tinygrad_llm.generate import Decoder, model_weights
    model = float_model(model_name)
    if kind != "float32":
        from tinygrad_llm.quant.runs import QuantizedModel, quantize_weights
        model = QuantizedModel(model.config, kind, quantize_weights(model_weights(model), kind))
    decoder = Decoder(model)
    caches, state = {}, {}

    def reset(batch, length):
        cache = caches.get(batch)
        if cache is None or cache.max_len < length:
            cache = caches[batch] = decoder.new_cache(batch, length)
        for slot in cache.active_slots:
            cache.release(slot)
        state["cache"], state["slots"] = cache, [cache.allocate() for _ in range(batch)]

    def prefill(prompts):
        return np.array([int(np.argmax(decoder.prefill(state["cache"], slot, ids)))
                         for slot, ids in zip(state["slots"], prompts)])

    def step(tokens):
        return decoder.decode_step(state["cache"], tokens, state["slots"]).argmax(axis=1)
    return reset, prefill, step, decoder


def llama(model_name: str, kind: str, threads: int, context: int, kv: str = "split", flash_attn: str = "auto"):
    """The same four over llama.cpp's C API (llama-cpp-python's bindings): one context per batch size B with
    n_seq_max = B and n_ctx = B · context, the KV cache one stream per sequence (kv "split": kv_unified off)
    or one stream that all sequences share ("unified"), flash attention as `flash_attn` says ("auto":
    llama.cpp's own default), n_threads = n_threads_batch = threads. A prompt is one llama_decode of its
    tokens under its sequence id; a step is one llama_decode of B tokens, each with its own sequence id and
    position and its logits requested, read back as (B, V)."""
    import llama_cpp
    llama_cpp.llama_backend_init()
    model = llama_cpp.llama_model_load_from_file(gguf_path(model_name, kind).encode(),
                                                 llama_cpp.llama_model_default_params())
    if not model:
        raise RuntimeError(f"llama.cpp could not load {gguf_path(model_name, kind)}")
    vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
    contexts, state = {}, {}

    def reset(batch, length):
        if batch not in contexts:
            params = llama_cpp.llama_context_default_params()
            params.n_ctx, params.n_seq_max, params.kv_unified = batch * context, batch, kv == "unified"
            params.n_batch = params.n_ubatch = max(context, batch)
            params.n_threads = params.n_threads_batch = threads
            params.flash_attn_type = FLASH_ATTN[flash_attn](llama_cpp)
            ctx = llama_cpp.llama_init_from_model(model, params)
            if not ctx or llama_cpp.llama_n_ctx_seq(ctx) < length:
                raise RuntimeError(f"llama.cpp: no context of {batch} sequences × {length} positions")
            contexts[batch] = (ctx, llama_cpp.llama_batch_init(max(context, batch), 0, 1))
        ctx, tokens_batch = contexts[batch]
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
        state.update(ctx=ctx, batch=tokens_batch, positions=[0] * batch)

    def decode(rows):
        """rows: (token, position, sequence id, logits wanted); one llama_decode."""
        tokens_batch = state["batch"]
        tokens_batch.n_tokens = len(rows)
        for i, (token, position, sequence, wanted) in enumerate(rows):
            tokens_batch.token[i], tokens_batch.pos[i] = token, position
            tokens_batch.n_seq_id[i], tokens_batch.seq_id[i][0] = 1, sequence
            tokens_batch.logits[i] = int(wanted)
        status = llama_cpp.llama_decode(state["ctx"], tokens_batch)
        if status != 0:
            raise RuntimeError(f"llama_decode returned {status}")

    def prefill(prompts):
        out = []
        for sequence, ids in enumerate(prompts):
            ids = [int(t) for t in ids]
            decode([(t, p, sequence, p == len(ids) - 1) for p, t in enumerate(ids)])
            state["positions"][sequence] = len(ids)
            last = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(state["ctx"], -1), shape=(vocab,))
            out.append(int(np.argmax(last)))
        return np.array(out)

    def step(tokens):
        positions = state["positions"]
        decode([(int(t), positions[s], s, True) for s, t in enumerate(tokens)])
        state["positions"] = [p + 1 for p in positions]
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits(state["ctx"]), shape=(len(tokens), vocab))
        return logits.argmax(axis=1)                                          # (B, V) -> (B,)
    return reset, prefill, step, model


def measure(side: str, model_name: str, kind: str, threads: int, batches: list, prompt_len: int,
            new_tokens: int, kv: str = "split", flash_attn: str = "auto") -> list:
    """One dict per batch size B, in this process: B prompts prefilled one after another, then new_tokens
    greedy steps of B tokens each. The prompts of batch B are the first B rows of one random (max B, P)
    array, so batch 1's prompt is every batch's first sequence."""
    context = prompt_len + new_tokens + 8
    if side == "ours":
        reset, prefill, step, _ = ours(model_name, kind)
    else:
        reset, prefill, step, _ = llama(model_name, kind, threads, context, kv, flash_attn)
    prompts = np.random.default_rng(1).integers(0, MODELS[model_name]["vocab_size"], (max(batches), prompt_len))
    rows = []
    for batch in batches:
        reset(batch, context)                             # warm-up: caches, thread pools, first-call costs
        tokens = prefill(prompts[:batch, :8])
        for _ in range(4):
            tokens = step(tokens)
        reset(batch, context)
        start = time.perf_counter()
        tokens = prefill(prompts[:batch])
        prefill_s = time.perf_counter() - start
        generated = [tokens]
        start, cpu = time.perf_counter(), time.process_time()
        for _ in range(new_tokens):
            tokens = step(tokens)
            generated.append(tokens)
        decode_s, cpu = time.perf_counter() - start, time.process_time() - cpu
        rows.append({"batch": batch, "tokens": np.stack(generated, axis=1).tolist(),     # (B, new_tokens + 1)
                     "prefill_ms": 1e3 * prefill_s, "prompt_tok_s": batch * prompt_len / prefill_s,
                     "decode_tok_s": batch * new_tokens / decode_s, "decode_ms": 1e3 * decode_s / new_tokens,
                     "decode_tok_cpu_s": batch * new_tokens / cpu if cpu > 0 else float("nan")})
    return rows


def profile(model_name: str, kind: str, prompt_len: int, new_tokens: int) -> str:
    """cProfile (CPU time) of our batch-1 decode steps."""
    reset, prefill, step, _ = ours(model_name, kind)
    reset(1, prompt_len + new_tokens + 8)
    tokens = prefill(np.random.default_rng(1).integers(0, MODELS[model_name]["vocab_size"], (1, prompt_len)))
    profiler = cProfile.Profile(time.process_time)
    start = time.process_time()
    profiler.enable()
    for _ in range(new_tokens):
        tokens = step(tokens)
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
    parser.add_argument("--batches", default="1", help="sequences decoded at once, e.g. 1,32 (each side, one process)")
    parser.add_argument("--llama-kv", default="split", choices=["split", "unified"],
                        help="llama.cpp's KV cache: one stream per sequence (split) or one for all (unified)")
    parser.add_argument("--llama-flash-attn", default="auto", choices=list(FLASH_ATTN),
                        help="llama.cpp's flash attention (auto: its own default)")
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
    try:
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        raise SystemExit(f"decode_llamacpp.py: error: --batches takes sizes like 1,32, not {args.batches!r}")
    if min(batches) < 1:
        raise SystemExit(f"decode_llamacpp.py: error: a batch size must be at least 1, not {min(batches)}")
    for kind in kinds:
        if kind not in GGUF_TYPES:
            raise SystemExit(f"decode_llamacpp.py: error: unknown type {kind!r}; choose from {', '.join(GGUF_TYPES)}")
    if args.child:
        if args.write:
            write_gguf(models[0], kinds[0])
        elif args.profile:
            print(profile(models[0], kinds[0], args.prompt_len, args.new_tokens))
        else:
            print(json.dumps(measure(args.side, models[0], kinds[0], threads[0], batches, args.prompt_len,
                                     args.new_tokens, args.llama_kv, args.llama_flash_attn)))
        return
    common = ["--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens),
              "--llama-kv", args.llama_kv, "--llama-flash-attn", args.llama_flash_attn]
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
    print(f"# batches {','.join(map(str, batches))}: B prompts of {args.prompt_len} random ids (the same length "
          f"for every sequence), each in one call, then {args.new_tokens} greedy steps of B tokens; "
          f"{args.rounds} alternating rounds, worst round shown; \"×batch 1\": the worst round's ratio; llama.cpp "
          f"KV cache {args.llama_kv}, flash attention {args.llama_flash_attn}")
    print("| model | weights | threads | batch | ours prompt tok/s | llama.cpp prompt tok/s | ours decode tok/s | "
          "llama.cpp decode tok/s | ours / llama.cpp (decode) | ours ×batch 1 | llama.cpp ×batch 1 | "
          "ours tok per CPU-s | llama.cpp tok per CPU-s | ours ×batch 1 (CPU-s) | llama.cpp ×batch 1 (CPU-s) | "
          "same greedy ids | load |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    keys = ("prompt_tok_s", "decode_tok_s", "decode_tok_cpu_s")
    for model_name in models:
        for kind in kinds:
            if not os.path.isfile(gguf_path(model_name, kind)):
                run_child(["--write", "--models", model_name, "--types", kind], 1)
            for count in threads:
                rounds = {"ours": [], "llama": []}             # side -> rounds -> one dict per batch
                for _ in range(args.rounds):
                    for side in ("ours", "llama"):
                        argv = ["--side", side, "--models", model_name, "--types", kind, "--threads", str(count),
                                "--batches", ",".join(map(str, batches))]
                        rounds[side].append(json.loads(run_child(argv + common, count)))
                one = batches.index(1) if 1 in batches else None
                for index, batch in enumerate(batches):
                    worst, ratio = {}, {}
                    for side, runs in rounds.items():
                        worst[side] = {key: min(run[index][key] for run in runs) for key in keys}
                        # this batch over batch 1 in the same round (process), for the decode figures
                        ratio[side] = {key: "—" if one is None else
                                       f"{min(run[index][key] / run[one][key] for run in runs):.2f}"
                                       for key in ("decode_tok_s", "decode_tok_cpu_s")}
                    pairs = [(a, b) for ours_ids, llama_ids in zip(rounds["ours"][0][index]["tokens"],
                                                                   rounds["llama"][0][index]["tokens"])
                             for a, b in zip(ours_ids, llama_ids)]
                    print(f"| {model_name} | {kind} | {count} | {batch} | {worst['ours']['prompt_tok_s']:.0f} | "
                          f"{worst['llama']['prompt_tok_s']:.0f} | {worst['ours']['decode_tok_s']:.1f} | "
                          f"{worst['llama']['decode_tok_s']:.1f} | "
                          f"{worst['ours']['decode_tok_s'] / worst['llama']['decode_tok_s']:.2f}x | "
                          f"{ratio['ours']['decode_tok_s']} | {ratio['llama']['decode_tok_s']} | "
                          f"{worst['ours']['decode_tok_cpu_s']:.1f} | {worst['llama']['decode_tok_cpu_s']:.1f} | "
                          f"{ratio['ours']['decode_tok_cpu_s']} | {ratio['llama']['decode_tok_cpu_s']} | "
                          f"{sum(a == b for a, b in pairs)}/{len(pairs)} | {os.getloadavg()[0]:.1f} |", flush=True)


if __name__ == "__main__":
    main()
