"""Evaluation beyond perplexity: multiple-choice tasks scored the way lm-evaluation-harness scores them.

    from tinygrad_llm.evals import evaluate_task, read_task_file, builtin_task
    task = read_task_file("hellaswag_val.jsonl", limit=200)        # or builtin_task("shakespeare_next_line")
    results = evaluate_task(model, tokenizer, task, batch_size=32)
    results["metrics"]["acc"]["value"], results["metrics"]["acc_norm"]["value"], results["chance"]

Modules: scoring (log-likelihood of a continuation: encoding, window, batching; the one log-prob
function), metrics (acc, acc_norm, acc_bytes, standard errors), tasks (Item, Task, the JSONL formats),
builtin (tasks made from held-out plays of the built-in corpus), runner (evaluate_task).
The command line is `tinygrad-llm eval RUN --task FILE|NAME` (tinygrad_llm/cli_evals.py); docs/evaluation.md
gives the formulas.
"""
from .metrics import bootstrap_stderr, item_predictions, mean_stderr
from .runner import evaluate_task
from .scoring import encode_pair, score_groups, token_logprobs
from .tasks import Item, Task, TaskFileError, read_task_file, write_task_file

__all__ = ["Item", "Task", "TaskFileError", "bootstrap_stderr", "encode_pair", "evaluate_task", "item_predictions",
           "mean_stderr", "read_task_file", "score_groups", "token_logprobs", "write_task_file"]
