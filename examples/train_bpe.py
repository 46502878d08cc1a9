"""Byte-level BPE end to end: train a tokenizer, write token shards, train a small model, sample.

    python examples/train_bpe.py                                   # the built-in corpus (first 1 MB)
    python examples/train_bpe.py --data my_text.txt --vocab-size 1024 --max-steps 1000

1. `Tokenizer.train` learns `--vocab-size` ids (256 bytes, the merges, <|endoftext|>) on the text.
2. `write_token_shards` encodes it into llm.c-format shards, the last 10 % of the text for validation.
3. `train` fits a small Llama-style model on the shards (the DataLoader's shuffled windows) and reports
   validation loss and bits per byte, which, unlike loss per token, compare across tokenizers.
4. `generate_text` samples from it.
Everything lands in --out-dir (tokenizer.json, data/, checkpoints/, metrics.jsonl).
"""
import os

os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")   # before NumPy loads OpenBLAS: see tinygrad_llm/cpu_threads.py

import argparse
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from tinygrad_llm.data.shards import EOT, write_token_shards  # noqa: E402
from tinygrad_llm.generate import generate_text  # noqa: E402
from tinygrad_llm.checkpoint import load_checkpoint  # noqa: E402
from tinygrad_llm.tokenizer import Tokenizer  # noqa: E402
from tinygrad_llm.train import TrainConfig, train  # noqa: E402

BUILTIN_CHARS = 1_000_000         # of the built-in corpus: enough for a small vocabulary, quick to train


def builtin_text() -> str:
    """The first BUILTIN_CHARS characters of the built-in Shakespeare corpus (downloaded once, then cached)."""
    from tinygrad_llm.data.corpus import iter_shakespeare
    text = "\n\n".join(document.text for document in iter_shakespeare())
    return text[:BUILTIN_CHARS]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="a UTF-8 text file (default: the built-in corpus)")
    parser.add_argument("--out-dir", default="runs/bpe_example")
    parser.add_argument("--vocab-size", type=int, default=512)
    parser.add_argument("--max-steps", type=int, default=600)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    if args.data is None:
        text = builtin_text()
    elif not os.path.isfile(args.data):
        parser.error(f"{args.data} not found: pass --data path/to/text.txt")
    else:
        with open(args.data, encoding="utf-8") as f:
            text = f.read()
    os.makedirs(args.out_dir, exist_ok=True)

    tokenizer_path = os.path.join(args.out_dir, "tokenizer.json")
    tokenizer = Tokenizer.train(text, args.vocab_size, special_tokens=[EOT])
    tokenizer.save(tokenizer_path)
    ids = tokenizer.encode_ordinary(text)
    print(f"tokenizer: {tokenizer.vocab_size} ids, {len(text.encode('utf-8')) / len(ids):.2f} bytes per token")

    data_dir = os.path.join(args.out_dir, "data")
    shards = write_token_shards([text], tokenizer, data_dir, prefix="text", val_fraction=0.1, split="tail")
    print(f"shards: {shards['train']['tokens']:,} train and {shards['val']['tokens']:,} val tokens in {data_dir}")

    run_dir = os.path.join(args.out_dir, "run")
    config = TrainConfig(data=data_dir, tokenizer=tokenizer_path, out_dir=run_dir, d_model=128, n_layers=4,
                         n_heads=4, ffn_hidden=384, seq_len=128, batch_size=12, max_steps=args.max_steps,
                         warmup_steps=50, lr=1e-3, eval_interval=max(1, args.max_steps // 4), eval_iters=10,
                         progress=not args.no_progress, resume=os.path.isdir(os.path.join(run_dir, "checkpoints")))
    summary = train(config)
    print(f"val loss {summary['val_loss']:.3f} nats/token = {summary['val_bpb']:.3f} bits per byte")
    model, _ = load_checkpoint(run_dir, which="best")
    print("--- sample ---")
    generate_text(model, tokenizer, "ROMEO:", max_new_tokens=120, temperature=0.8, top_k=40, seed=0,
                  stream=sys.stdout)
    print()


if __name__ == "__main__":
    main()
