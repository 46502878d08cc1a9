"""The same task scored by lm-evaluation-harness and by `tinygrad-llm eval`, side by side, without a server.

    pip install lm-eval                                   # optional: never a dependency of the project
    python examples/lm_eval/write_tasks.py --limit 200    # examples/lm_eval/data/<task>.jsonl
    python examples/lm_eval/harness_check.py runs/default --task shakespeare_next_line --limit 200

The harness side reads the JSONL through this folder's YAML and does everything as it does for any model:
the whitespace rule, the target delimiter, acc and acc_norm with its standard error. Only the
log-likelihood of one (context, continuation) request comes from here, through the small `lm_eval` model
class below: one unbatched forward of the run's model per request, on the window the harness's own
Hugging Face model uses ((context + continuation)[-(max_length + 1):][:-1]), with a plain float64
log-softmax. It shares no code with tinygrad_llm.evals.scoring (only the tokenizer), so equal numbers
check the batching, the truncation and the metrics. Run it from the repository root (the YAMLs name their
data files relative to it). The served path (`local-completions`) is in docs/evaluation.md.
"""
import argparse
import os
import sys

import numpy as np

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir)
sys.path.insert(0, REPO)

from tinygrad_llm.cli import _load  # noqa: E402
from tinygrad_llm.evals.runner import evaluate_task  # noqa: E402
from tinygrad_llm.evals.scoring import encode  # noqa: E402
from tinygrad_llm.evals.tasks import read_task_file  # noqa: E402
from tinygrad_llm.tensor import no_grad  # noqa: E402


def harness_model(model, tokenizer):
    """An lm_eval TemplateLM over the run's model (loglikelihood only)."""
    from lm_eval.api.model import TemplateLM

    class TinygradLM(TemplateLM):
        def __init__(self):
            super().__init__()
            self.max_length = model.config.max_seq_len

        @property
        def eot_token_id(self):
            special = dict(getattr(tokenizer, "special_tokens", None) or {})
            return special.get("<|endoftext|>", 0)

        def tok_encode(self, string, add_special_tokens=None, **kwargs):
            return encode(tokenizer, string)

        def _loglikelihood_tokens(self, requests, disable_tqdm=False, **kwargs):
            out = []
            model.eval()
            with no_grad():
                for _, context, continuation in requests:
                    if len(continuation) > self.max_length:   # cannot be scored in this window: never chosen
                        out.append((float("-inf"), False))
                        continue
                    tokens = (context + continuation)[-(self.max_length + 1):]
                    logits = model(np.asarray(tokens[:-1], dtype=np.int64)[None, :]).data[0]    # (T, V)
                    logits = np.asarray(logits, dtype=np.float64)[-len(continuation):]
                    top = logits.max(axis=1, keepdims=True)
                    log_probs = logits - top - np.log(np.exp(logits - top).sum(axis=1, keepdims=True))
                    picked = log_probs[np.arange(len(continuation)), continuation]
                    out.append((float(picked.sum()), bool((logits.argmax(axis=1) == continuation).all())))
            return out

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            raise NotImplementedError("only multiple-choice tasks here")

        def generate_until(self, requests, disable_tqdm=False):
            raise NotImplementedError("only multiple-choice tasks here")

    return TinygradLM()


def main():
    parser = argparse.ArgumentParser(description="lm-evaluation-harness and tinygrad-llm eval on one task")
    parser.add_argument("run")
    parser.add_argument("--task", default="shakespeare_next_line", help="a YAML of this folder (its task name)")
    parser.add_argument("--limit", type=int, default=200)
    args = parser.parse_args()
    os.chdir(REPO)
    path = os.path.join("examples", "lm_eval", "data", args.task + ".jsonl")
    if not os.path.isfile(path):
        sys.exit(f"{path} not found: run python examples/lm_eval/write_tasks.py first")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    model, state, tokenizer = _load(args.run, False, "cpu")
    harness = simple_evaluate(model=harness_model(model, tokenizer), tasks=[args.task], limit=args.limit,
                              task_manager=TaskManager(include_path=os.path.join("examples", "lm_eval")),
                              log_samples=True, bootstrap_iters=1000)
    theirs = harness["results"][args.task]
    ours = evaluate_task(model, tokenizer, read_task_file(path, limit=args.limit))
    samples = {s["doc"]["id"]: s for s in harness["samples"][args.task]}
    common = [item for item in ours["items"] if item["id"] in samples]
    difference = max(abs(a - b[0]) for item in common
                     for a, b in zip(item["lls"], (r[0] for r in samples[item["id"]]["resps"])))
    print(f"run {args.run} (step {state['step']}), task {args.task}: the harness scored {len(samples)} items, "
          f"tinygrad-llm eval {ours['n_items']} ({ours['truncated']} truncated; skipped {ours['skipped'] or 'none'})")
    print("| metric | lm-evaluation-harness ± its stderr | tinygrad-llm eval ± bootstrap (analytic) stderr | "
          "harness on the items both scored |")
    print("| --- | --- | --- | --- |")
    for metric in ("acc", "acc_norm"):
        a, se = theirs[f"{metric},none"], theirs.get(f"{metric}_stderr,none", float("nan"))
        b, our_se = ours["metrics"][metric]["value"], ours["metrics"][metric]["stderr"]
        analytic = ours["metrics"][metric]["stderr_analytic"]
        both = sum(samples[item["id"]][metric] for item in common) / len(common)
        print(f"| {metric} | {a:.4f} ± {se:.4f} | {b:.4f} ± {our_se:.4f} ({analytic:.4f}) | {both:.4f} |")
    print(f"largest difference of one choice's log-likelihood on the items both scored: {difference:.2e} nats")


if __name__ == "__main__":
    main()
