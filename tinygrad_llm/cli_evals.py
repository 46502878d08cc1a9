"""`tinygrad-llm eval RUN --task FILE|NAME`: multiple-choice evaluation from the command line.

    tinygrad-llm eval runs/default --task shakespeare_next_line
    tinygrad-llm eval runs/default --task hellaswag_val.jsonl --limit 500 --batch-size 64 --output hs.json
    tinygrad-llm eval runs/float --task shakespeare_speaker --against runs/float-q8    # side by side

NAME is a built-in task (tinygrad_llm.evals.builtin.TASK_NAMES). The chat form of a task is used when the
run's tokenizer has the chat tokens; NAME_chat or NAME_plain forces one form. FILE is a JSONL task file
(tinygrad_llm.evals.tasks). stdout gets the summary as JSON (metrics with standard errors, chance level,
counts of skipped and truncated items); --output also writes every item's scores, atomically.

`compare_runs` is the hook for a float run and its quantized copy: it loads both with the same loader and
scores both on the same items, and reports the two results side by side with the items where they differ.

cli.py's run_eval calls `run_task_eval(args, load)` with its run loader; failures are raised as ValueError
(TaskFileError is one) or FileNotFoundError, which cli.py prints as one `tinygrad-llm eval: error: ...`
line with exit status 1; usage errors print that line here and return status 2.
"""
from __future__ import annotations

import json
import os
import sys

from .evals.builtin import TASK_NAMES, builtin_task, is_chat_tokenizer
from .evals.runner import evaluate_task
from .evals.tasks import read_task_file

DEFAULT_BATCH_SIZE = 32
EXIT_USAGE = 2                   # cli.py's status for a usage error (this module never imports cli.py back)


def load_task(spec: str, tokenizer, limit: int | None = None):
    """A Task from a built-in name (NAME, NAME_chat, NAME_plain) or a JSONL file path."""
    name, forced = spec, None
    if spec.endswith("_chat") and spec[:-len("_chat")] in TASK_NAMES:
        name, forced = spec[:-len("_chat")], True
    elif spec.endswith("_plain") and spec[:-len("_plain")] in TASK_NAMES:
        name, forced = spec[:-len("_plain")], False
    if forced and not is_chat_tokenizer(tokenizer):
        raise ValueError(f"--task {spec}: the run's tokenizer has no chat tokens (<|user|>, <|assistant|>, "
                           f"<|end|>); use {name} or {name}_plain")
    if name in TASK_NAMES:
        return builtin_task(name, chat=is_chat_tokenizer(tokenizer) if forced is None else forced, limit=limit)
    if not os.path.exists(spec):
        raise FileNotFoundError(f"--task {spec}: no such file, and not a built-in task ({', '.join(TASK_NAMES)})")
    return read_task_file(spec, limit=limit)


def evaluate_run(checkpoint: str, task_spec, load, limit=None, batch_size=DEFAULT_BATCH_SIZE, best=False,
                 device="cpu", progress=True) -> dict:
    """Load a run, build or read the task, score it; the results dict of evals.runner.evaluate_task.

    task_spec: a name or path (see load_task), or a Task already built. `load(checkpoint, best, device)`
    returns (model, state, tokenizer), as cli._load does."""
    model, state, tokenizer = load(checkpoint, best, device)
    task = task_spec if hasattr(task_spec, "items") else load_task(task_spec, tokenizer, limit)
    results = evaluate_task(model, tokenizer, task, batch_size=batch_size, progress=progress)
    results["checkpoint"] = state.get("directory", checkpoint)
    results["step"] = state.get("step")
    return results


def compare_runs(first: str, second: str, task_spec, load, limit=None, batch_size=DEFAULT_BATCH_SIZE, best=False,
                 device="cpu", progress=True, load_second=None) -> dict:
    """Score two runs (a float run and its quantized copy, say) on the same items; both results side by side.

    The task is built once, with the first run's tokenizer, so both runs see identical items (both runs
    must share a tokenizer). `load_second` loads the second run when it needs another loader (default:
    `load`). Returns {"first", "second", "difference" (second − first, per metric), "same_prediction" (the
    share of items where both runs pick the same choice), "changed_items" (ids where they do not)}."""
    model, state, tokenizer = load(first, best, device)
    task = task_spec if hasattr(task_spec, "items") else load_task(task_spec, tokenizer, limit)
    a = evaluate_task(model, tokenizer, task, batch_size=batch_size, progress=progress)
    a.update(checkpoint=state.get("directory", first), step=state.get("step"))
    del model
    b = evaluate_run(second, task, load_second or load, batch_size=batch_size, best=best, device=device,
                     progress=progress)
    if [item["id"] for item in a["items"]] != [item["id"] for item in b["items"]]:
        raise ValueError("the two runs could not score the same items (different tokenizers?); "
                           f"scored {a['n_items']} and {b['n_items']}")
    same = [x["pred"] == y["pred"] for x, y in zip(a["items"], b["items"])]
    return {"first": a, "second": b,
            "difference": {m: b["metrics"][m]["value"] - a["metrics"][m]["value"] for m in a["metrics"]},
            "same_prediction": sum(same) / len(same) if same else float("nan"),
            "changed_items": [x["id"] for x, keep in zip(a["items"], same) if not keep]}


def summary(results: dict) -> dict:
    """The results without the per-item records (what stdout shows)."""
    return {key: value for key, value in results.items() if key != "items"}


def write_json(data, path: str) -> None:
    """JSON to `path` atomically (temporary name, fsync, rename)."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"--output {path}: directory {directory} does not exist")
    temporary = path + ".tmp"
    with open(temporary, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def _usage_error(message: str) -> int:
    print(f"tinygrad-llm eval: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def run_task_eval(args, load) -> int:
    """The `eval --task` command. `load(checkpoint, best, device)` -> (model, state, tokenizer): cli.py's loader."""
    if not args.task:
        return _usage_error("--against compares two runs on a task: give --task FILE|NAME too")
    if getattr(args, "data", None) or getattr(args, "eval_iters", None):
        return _usage_error("--data and --eval-iters measure perplexity; they do not go with --task")
    if args.output and os.path.isdir(args.output):
        return _usage_error(f"--output {args.output} is a directory; give a file name")
    batch_size = args.batch_size or DEFAULT_BATCH_SIZE
    if getattr(args, "against", None):
        result = compare_runs(args.checkpoint, args.against, args.task, load, args.limit, batch_size, args.best,
                              args.device)
        shown = {"first": summary(result["first"]), "second": summary(result["second"]),
                 "difference": result["difference"], "same_prediction": result["same_prediction"]}
    else:
        result = evaluate_run(args.checkpoint, args.task, load, args.limit, batch_size, args.best, args.device)
        shown = summary(result)
    if args.output:
        write_json(result, args.output)
    print(json.dumps(shown, indent=1))
    return 0
