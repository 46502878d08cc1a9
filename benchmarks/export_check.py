"""Exported files in the runtimes people use: transformers and llama.cpp (llama-cpp-python) against ours.

    python benchmarks/export_check.py --data ../shared/data/tinyshakespeare.txt      # trains a small run first
    python benchmarks/export_check.py --run runs/bpe --heldout held_out.txt          # an existing run

Optional extras, never needed by the package or its tests: transformers with PyTorch (CPU is enough) and
llama-cpp-python (it compiles llama.cpp). Each check runs where its library imports, and says so where it
does not. Run it with an interpreter that has them, with this checkout on PYTHONPATH.

What it does:
 1. Without --run: trains a byte-level BPE (GPT4 split, the chat special tokens) on the first 90 % of
    --data, prepares shards with it (`tinygrad-llm prepare --split tail`), trains a small GQA model
    (2 layers, d 64, 4 heads, 2 key/value heads, --steps steps of 8 x --context tokens; `tinygrad-llm
    train` in its own process), all in --work.
 2. Exports the run: `--hf` and `--gguf` of every type (f32, f16, q8_0, q4_0).
 3. transformers: AutoTokenizer ids on the held-out text equal ours; `generate(do_sample=False)` for 64
    tokens equals `tinygrad-llm sample --temperature 0 --max-new-tokens 64` (the ids of our generate() and
    the CLI's text); the largest logit difference on a prompt.
 4. llama.cpp, for each GGUF type: it loads; its tokenizer gives our ids on the held-out text; its greedy
    continuation of 64 tokens (argmax of its logits, no repetition penalty) against ours; perplexity on
    --windows held-out windows of the full context, against ours in float32.
Pass criteria (issue 15): transformers greedy equal; llama.cpp greedy equal for f32 and f16; q8_0
perplexity within 1 % of ours.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import platform
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from tinygrad_llm.checkpoint import load_checkpoint  # noqa: E402
from tinygrad_llm.cli import main as cli  # noqa: E402
from tinygrad_llm.cli_export import run_tokenizer  # noqa: E402
from tinygrad_llm.generate import generate  # noqa: E402
from tinygrad_llm.tokenizer import CHAT_SPECIAL_TOKENS, Tokenizer  # noqa: E402

TYPES = ("f32", "f16", "q8_0", "q4_0")


def run_cli(argv):
    code = cli(argv)
    if code != 0:
        raise SystemExit(f"tinygrad-llm {' '.join(argv)} failed with {code}")


def run_cli_process(argv):
    """The command in its own process: `tinygrad-llm train` then sets its BLAS threads as on a command line."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if subprocess.run([sys.executable, "-m", "tinygrad_llm", *argv], env=env).returncode != 0:
        raise SystemExit(f"tinygrad-llm {' '.join(argv)} failed")


def build_run(args):
    text = open(args.data, encoding="utf-8").read()
    cut = int(len(text) * 0.9)
    os.makedirs(args.work, exist_ok=True)
    train_text, heldout = text[:cut], text[cut:]
    train_file = os.path.join(args.work, "train.txt")
    with open(train_file, "w", encoding="utf-8") as file:
        file.write(train_text)
    tokenizer = Tokenizer.train(train_text, args.vocab, list(CHAT_SPECIAL_TOKENS))
    tokenizer.save(os.path.join(args.work, "tokenizer.json"))
    shards = os.path.join(args.work, "shards")
    run_cli(["prepare", train_file, "--out", shards, "--tokenizer", os.path.join(args.work, "tokenizer.json"),
             "--split", "tail", "--val-fraction", "0.1", "--no-progress", "--no-filters", "--no-near-dedup"])
    run = os.path.join(args.work, "run")
    run_cli_process(["train", "--data", shards, "--tokenizer", os.path.join(args.work, "tokenizer.json"),
                     "--out-dir", run, "--d-model", "64", "--n-layers", "2", "--n-heads", "4", "--n-kv-heads", "2",
                     "--ffn-hidden", "192", "--seq-len", str(args.context), "--batch-size", "8",
                     "--max-steps", str(args.steps), "--eval-interval", str(args.steps), "--eval-iters", "4",
                     "--warmup-steps", "20", "--lr", "3e-3", "--no-progress"])
    return run, heldout


def perplexity(logits_of, windows):
    """exp(mean cross-entropy) of next-token predictions over windows; logits_of(ids) -> (T, V)."""
    total, count = 0.0, 0
    for ids in windows:
        logits = np.asarray(logits_of(ids), dtype=np.float64)[:-1]
        logits -= logits.max(-1, keepdims=True)
        log_probabilities = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        total -= log_probabilities[np.arange(len(ids) - 1), ids[1:]].sum()
        count += len(ids) - 1
    return math.exp(total / count)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", help="an existing run directory (else one is trained from --data)")
    parser.add_argument("--data", default=os.path.join(REPO, "..", "shared", "data", "tinyshakespeare.txt"))
    parser.add_argument("--heldout", help="held-out text file (default: the last 10 %% of --data)")
    parser.add_argument("--work", default=os.path.join(REPO, "runs", "export_check"))
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--windows", type=int, default=16, help="held-out windows for perplexity")
    parser.add_argument("--prompt", default="ROMEO:\nWhat say you, my lord?\n\n")
    parser.add_argument("--new-tokens", type=int, default=64, help="greedy tokens compared (prompt + these must "
                                                                   "fit the context: no sliding window)")
    args = parser.parse_args()
    command = "python " + " ".join(sys.argv)
    started = time.time()
    if args.run:
        run = args.run
        heldout = open(args.heldout or args.data, encoding="utf-8").read()
        if not args.heldout:
            heldout = heldout[int(len(heldout) * 0.9):]
    else:
        run, heldout = build_run(args)
    model, state = load_checkpoint(run)
    tokenizer = run_tokenizer(state, state["directory"])
    context = model.config.max_seq_len
    out = os.path.join(args.work, "export")
    run_cli(["export", run, "--hf", os.path.join(out, "hf"), "--force"])
    for kind in TYPES:
        run_cli(["export", run, "--gguf", os.path.join(out, f"model-{kind}.gguf"), "--type", kind, "--force"])

    encode = (lambda text: tokenizer.encode(text, allowed_special="all")) if hasattr(tokenizer, "pattern") \
        else tokenizer.encode
    heldout_ids = encode(heldout)
    windows = [heldout_ids[i * context:(i + 1) * context] for i in range(args.windows)]
    windows = [w for w in windows if len(w) == context]
    prompt_ids = encode(args.prompt)
    if len(prompt_ids) + args.new_tokens > context:
        raise SystemExit(f"prompt ({len(prompt_ids)} tokens) + --new-tokens must fit the context ({context})")
    ours = list(generate(model, prompt_ids, args.new_tokens, temperature=0.0, eot_id=None))
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        run_cli(["sample", run, "--prompt", args.prompt, "--temperature", "0", "--max-new-tokens", str(args.new_tokens)])
    cli_text = buffer.getvalue()
    eot = tokenizer.special_tokens.get("<|endoftext|>")
    ours_until_eot = ours[:ours.index(eot)] if eot in ours else ours
    rows = [("ours: CLI sample text == decode(generate ids)",
             str(cli_text == args.prompt + tokenizer.decode(ours_until_eot) + "\n"))]
    our_ppl = perplexity(lambda ids: model(np.asarray([ids]), return_logits=True).data[0], windows)
    rows.append(("ours: held-out perplexity (float32)", f"{our_ppl:.4f}"))

    try:
        import torch
        import transformers
    except ImportError as error:
        rows.append(("transformers", f"not run: {error}"))
    else:
        hf_dir = os.path.join(out, "hf")
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32)
        hf_tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
        rows.append((f"transformers {transformers.__version__}: tokenizer ids == ours (held-out text)",
                     str(hf_tokenizer(heldout, add_special_tokens=False)["input_ids"] == heldout_ids)))
        hf_model.generation_config.eos_token_id = None          # 64 tokens, as ours
        hf_model.generation_config.pad_token_id = eot
        with torch.no_grad():
            generated = hf_model.generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=args.new_tokens,
                                          min_new_tokens=args.new_tokens)[0, len(prompt_ids):].tolist()
            logits = hf_model(torch.tensor([windows[0]])).logits[0].double().numpy()
        first = next((i for i, (a, b) in enumerate(zip(generated, ours)) if a != b), None)
        rows.append((f"transformers: greedy {args.new_tokens} tokens == ours", f"{generated == ours}"
                     + ("" if first is None else f" (first difference at token {first})")))
        reference = np.asarray(model(np.asarray([windows[0]]), return_logits=True).data[0], dtype=np.float64)
        rows.append(("transformers: max |logit difference| (one window)", f"{np.abs(logits - reference).max():.2e}"))

    try:
        import llama_cpp
    except ImportError as error:
        rows.append(("llama.cpp", f"not run: {error}"))
    else:
        for kind in TYPES:
            path = os.path.join(out, f"model-{kind}.gguf")
            llm = llama_cpp.Llama(model_path=path, n_ctx=context, logits_all=True, verbose=False, seed=0,
                                  n_threads=os.cpu_count())
            name = f"llama.cpp {llama_cpp.__version__} {kind}"
            same_ids = llm.tokenize(heldout.encode("utf-8"), add_bos=False, special=True) == heldout_ids
            rows.append((f"{name}: tokenizer ids == ours (held-out text)", str(same_ids)))

            def logits_of(ids):
                llm.reset()
                llm.eval(ids)
                return np.array(llm.scores[:len(ids)])

            llm.reset()
            llm.eval(prompt_ids)
            greedy = []
            for _ in range(args.new_tokens):
                token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
                greedy.append(token)
                llm.eval([token])
            first = next((i for i, (a, b) in enumerate(zip(greedy, ours)) if a != b), None)
            rows.append((f"{name}: greedy {args.new_tokens} tokens == ours", f"{greedy == ours}"
                         + ("" if first is None else f" (first difference at token {first})")))
            their_ppl = perplexity(logits_of, windows)
            rows.append((f"{name}: held-out perplexity", f"{their_ppl:.4f} ({(their_ppl / our_ppl - 1) * 100:+.3f} % "
                                                          f"against ours)"))
            del llm

    print(f"# {command}")
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, Python {platform.python_version()}, NumPy {np.__version__}")
    print(f"# run {run}: {model.num_parameters():,} parameters, context {context}, vocab {model.config.vocab_size}, "
          f"{len(windows)} held-out windows of {context} tokens, prompt {len(prompt_ids)} tokens")
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name.ljust(width)}  {value}")
    print(f"# {time.time() - started:.0f} s")
    with open(os.path.join(args.work, "export_check.json"), "w", encoding="utf-8") as file:
        json.dump({"command": command, "rows": rows}, file, indent=1)


if __name__ == "__main__":
    main()
