"""Multiple-choice evaluation: accuracy of a run on the built-in tasks beside chance, and items per second.

    python benchmarks/evals.py RUN                           # the three built-in tasks, 500 items each
    python benchmarks/evals.py RUN --limit 200 --repeat 3 --batch-sizes 8,32,128
    python benchmarks/evals.py RUN --tables strategies --limit 100
    python benchmarks/evals.py BASE_RUN --add-chat-tokens --tables accuracy   # the chat forms before fine-tuning
    python benchmarks/evals.py RUN --device cuda

Table 1, per built-in task (the chat form when the run's tokenizer has the chat tokens): items scored,
acc and acc_norm with their bootstrap standard errors, chance level (1 / number of choices), items whose
context was cut to the window, items skipped, items per second (the whole scoring: forwards, log-softmax,
bookkeeping; the task is built and encoded before the clock starts).

Table 2, the two batching strategies of tinygrad_llm.evals.scoring side by side on the same items:
"rows" (every choice its own row, many items per forward) at each --batch-sizes, and "shared" (the
context once through the KV cache per item, then all choices in one forward). "shared" only applies to
items that fit the window without truncation, so this table uses the shakespeare_next_line items with each
context cut (as text) to the last characters that leave room for the longest choice: no request is
truncated and both strategies score every item the same way. Each setting runs --repeat times; the
slowest run is reported. The last column is the largest difference of a choice's log-likelihood from the
rows-strategy scores at the first batch size (float32 rounding only).
"""
import argparse
import datetime
import os
import platform
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from tinygrad_llm.cli import _load  # noqa: E402
from tinygrad_llm.cli_evals import load_task  # noqa: E402
from tinygrad_llm.evals.builtin import TASK_NAMES  # noqa: E402
from tinygrad_llm.evals.runner import evaluate_task  # noqa: E402
from tinygrad_llm.evals.tasks import Item, Task  # noqa: E402


def fitting_items(task, window: int):
    """The task's items with every context cut on the left (as text) so that context + longest choice
    fits the window of a character-level model: no request needs truncation."""
    items = []
    for item in task.items:
        room = window - max(len(item.target_delimiter + choice) for choice in item.choices)
        if room < 2:
            continue
        items.append(Item(item.context[-room:], item.choices, item.gold, item.target_delimiter, item.id))
    return Task(task.name + "_fitting", items)


def accuracy_table(model, tokenizer, args):
    print("| task | items | acc ± se | acc_norm ± se | chance | truncated | skipped | items/s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in args.tasks.split(","):
        task = load_task(name, tokenizer, args.limit)
        results = evaluate_task(model, tokenizer, task, batch_size=args.batch_size)
        metrics = results["metrics"]
        print(f"| {results['task']} | {results['n_items']} | {metrics['acc']['value']:.3f} ± "
              f"{metrics['acc']['stderr']:.3f} | {metrics['acc_norm']['value']:.3f} ± {metrics['acc_norm']['stderr']:.3f} "
              f"| {results['chance']:.3f} | {results['truncated']} | {sum(results['skipped'].values())} | "
              f"{results['items_per_second']:.1f} |", flush=True)


def strategy_table(model, tokenizer, args):
    window = model.config.max_seq_len
    task = fitting_items(load_task("shakespeare_next_line", tokenizer, args.limit), window)
    settings = [("rows", size) for size in map(int, args.batch_sizes.split(","))] + [("shared", 0)]
    print(f"\n{len(task.items)} shakespeare_next_line items cut to fit the window of {window} tokens; "
          f"slowest of {args.repeat} runs")
    print("| strategy | batch size | items/s | choices/s | truncated | max abs diff of ll |")
    print("| --- | --- | --- | --- | --- | --- |")
    reference = None
    for strategy, size in settings:
        runs = []
        for _ in range(args.repeat):
            started = time.perf_counter()
            results = evaluate_task(model, tokenizer, task, batch_size=size or 1, strategy=strategy,
                                    bootstrap_iters=10)
            runs.append((time.perf_counter() - started, results))
        seconds, results = max(runs, key=lambda run: run[0])
        lls = [ll for item in results["items"] for ll in item["lls"]]
        reference = reference or lls
        difference = max(abs(a - b) for a, b in zip(lls, reference))
        choices = sum(len(item["lls"]) for item in results["items"])
        shown = str(size) if strategy == "rows" else "one item"
        print(f"| {strategy} | {shown} | {results['n_items'] / seconds:.1f} | {choices / seconds:.1f} | "
              f"{results['truncated']} | {difference:.1e} |", flush=True)


def main():
    parser = argparse.ArgumentParser(description="accuracy and speed of multiple-choice evaluation")
    parser.add_argument("run", help="run directory (tinygrad-llm train --out-dir)")
    parser.add_argument("--tasks", default=",".join(TASK_NAMES))
    parser.add_argument("--limit", type=int, default=500, help="items per task")
    parser.add_argument("--batch-size", type=int, default=32, help="rows per forward for table 1")
    parser.add_argument("--batch-sizes", default="8,32,128", help="rows per forward compared in table 2")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tables", default="accuracy,strategies", help="which tables to print")
    parser.add_argument("--add-chat-tokens", action="store_true",
                        help="give a base run the chat tokens first (new rows: the mean of the old ones, as "
                             "post-training starts), so that the chat forms score the model fine-tuning starts from")
    args = parser.parse_args()
    model, state, tokenizer = _load(args.run, False, args.device)
    if args.add_chat_tokens:
        from tinygrad_llm.posttrain.chat import grow_vocabulary, with_chat_tokens
        tokenizer = with_chat_tokens(tokenizer)
        grow_vocabulary(model, tokenizer.vocab_size)
    print(f"# {datetime.date.today()}  {platform.node()}  {platform.processor() or platform.machine()}  "
          f"nproc {os.cpu_count()}  python {platform.python_version()}")
    print(f"# command: python benchmarks/evals.py {' '.join(sys.argv[1:])}")
    print(f"# run {args.run}{' + chat tokens' if args.add_chat_tokens else ''}: step {state['step']}, {model.config.n_layers} layers, d_model {model.config.d_model}, "
          f"vocab {model.config.vocab_size}, window {model.config.max_seq_len}, device {args.device}\n")
    tables = args.tables.split(",")
    if "accuracy" in tables:
        accuracy_table(model, tokenizer, args)
    if "strategies" in tables:
        strategy_table(model, tokenizer, args)


if __name__ == "__main__":
    main()
