"""Post-training on the built-in task: base -> SFT -> SFT + DPO (and SFT with LoRA), scored on held-out plays.

    tinygrad-llm train --seq-len 160 --batch-size 8 --max-steps 800 --out-dir /tmp/base   # a small base model
    python benchmarks/posttrain.py --base /tmp/base --work-dir /tmp/posttrain              # prints a table
    python benchmarks/posttrain.py --base /tmp/base --work-dir /tmp/pt --device cuda       # the same on a GPU

Measured, on the questions of the held-out plays (never seen in SFT or DPO):
  exact match    greedy answer through the chat template == the expected answer, per question kind; beside
                 it two reference points that need no model: "chance" (a name of the excerpt picked at
                 random: the mean of 1 / distinct speakers) and "first name" (always the excerpt's first)
  preference     log π(chosen) > log π(rejected) for the model's own log-probabilities, and DPO's implicit
                 reward accuracy (β·(log π − log π_ref) higher for chosen; ties ½, so the SFT model is 0.5)
  SFT loss       mean −log p per token of the chosen (correct) answers, before and after DPO; and the same
                 with the excerpt cut out of the prompt ("NLL w/o excerpt"): much higher when the model reads
  wall time      of each stage on this machine, with the machine named in the output
Each stage is one `tinygrad_llm.posttrain` call with the options printed. The numbers are single runs
(a seed each), not best-of. The defaults were chosen with --split validation (benchmarks/RESULTS.md says
which runs); --sft-per-task 1000 takes every excerpt (about 42 000 questions from the 30 training plays),
so 3 000 steps of 16 see each about once: too few to memorise answers.

--split validation chooses settings without looking at the held-out plays: the training plays are split once
more (tinygrad_llm.posttrain.data.builtin_split(validation=True)), the stages train on the rest (written
as JSONL into the work directory and read with --data / --val-data, as a user's files would be) and the
table scores the validation plays. --split test (the default) trains on every training play with
--builtin plays and scores the held-out plays.
"""
import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from tinygrad_llm.checkpoint import load_checkpoint, tokenizer_from_state  # noqa: E402
from tinygrad_llm.posttrain.chat import with_chat_tokens  # noqa: E402
from tinygrad_llm.posttrain.data import builtin_split, encode_conversations, encode_preferences  # noqa: E402
from tinygrad_llm.posttrain.dpo import chosen_nll, dpo, pair_logps, preference_metrics  # noqa: E402
from tinygrad_llm.posttrain.evaluate import exact_match  # noqa: E402
from tinygrad_llm.posttrain.loop import PostTrainConfig, load_start  # noqa: E402
from tinygrad_llm.posttrain.sft import held_out_loss, sft  # noqa: E402


def first_of_each(examples, count, key):
    """The first `count` examples of each key(example), in order (a fixed, deterministic subset)."""
    out, seen = [], {}
    for example in examples:
        if seen.get(key(example), 0) < count:
            out.append(example)
            seen[key(example)] = seen.get(key(example), 0) + 1
    return out


def held_out_subset(examples, per_task):
    """The first `per_task` held-out questions of each kind of each play."""
    return first_of_each(examples, per_task, lambda e: (e.play, e.task))


def load_run(path, device):
    model, state = load_checkpoint(path)
    tokenizer = with_chat_tokens(tokenizer_from_state(state, state["directory"]))
    model.to(device=device)
    model.eval()
    return model, tokenizer


def without_excerpt(questions, tokenizer, max_len):
    """The questions as SFT sequences with the excerpt cut out of the prompt (only the question line left)."""
    messages = [[{"role": "user", "content": q.prompt.rsplit("\n", 1)[1]}, {"role": "assistant", "content": q.answer}]
                for q in questions]
    return encode_conversations(messages, tokenizer, max_len)[0]


def score(model, tokenizer, questions, pairs, reference, beta, device):
    """Exact match, preference accuracies and the chosen answers' NLL of one model (with and without the
    excerpt in the prompt: a model that reads the excerpt does much better with it)."""
    result = {"exact": exact_match(model, tokenizer, questions)}
    bare = without_excerpt(questions, tokenizer, model.config.max_seq_len + 1)
    result["nll_without_excerpt"] = held_out_loss(model, bare, device=device)
    chosen, rejected = pair_logps(model, pairs, device=device)
    ref_chosen, ref_rejected = reference if reference is not None else (chosen, rejected)
    result["preference"] = preference_metrics(chosen, rejected, ref_chosen, ref_rejected, beta)
    result["chosen_nll"] = chosen_nll(model, pairs, device=device)
    result["logps"] = (chosen, rejected)
    return result


def reference_points(questions) -> dict:
    """Exact match of two answers that need no model, per kind: a random name of the excerpt (expected
    value) and always the excerpt's first name."""
    out = {}
    for kind in sorted({q.task for q in questions}) + ["all"]:
        chosen = [q for q in questions if kind in ("all", q.task)]
        names = [[row.split(": ", 1)[0] for row in q.prompt.split("\n")[:-1]] for q in chosen]
        out[kind] = (float(np.mean([1 / len(set(n)) for n in names])),
                     float(np.mean([n[0] == q.answer for n, q in zip(names, chosen)])))
    return out


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", required=True, help="a pretrained run (tinygrad-llm train --out-dir ...)")
    parser.add_argument("--work-dir", required=True, help="where the SFT/DPO/LoRA runs go (replaced)")
    parser.add_argument("--sft-steps", type=int, default=3000)
    parser.add_argument("--dpo-steps", type=int, default=60)
    parser.add_argument("--sft-lr", type=float, default=1e-3)
    parser.add_argument("--dpo-lr", type=float, default=1e-4)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--lora-rank", type=int, default=8, help="0 skips the LoRA run")
    parser.add_argument("--lora-lr", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--per-task", type=int, default=10, help="held-out questions of each kind per play scored")
    parser.add_argument("--sft-per-task", type=int, default=1000, help="SFT training questions of each kind per play")
    parser.add_argument("--dpo-per-task", type=int, default=20, help="DPO training pairs of each kind per play")
    parser.add_argument("--dpo-batch-size", type=int, default=8)
    parser.add_argument("--stages", default="sft,dpo,lora", help="which of sft, dpo, lora to run (dpo needs sft)")
    parser.add_argument("--skip-base", action="store_true", help="do not score the base model")
    parser.add_argument("--sft-run", default="", help="an SFT run to start DPO from (then no SFT stage runs)")
    parser.add_argument("--score-runs", default="", help="LABEL=RUN,...: finished runs to score beside the others")
    parser.add_argument("--split", choices=("test", "validation"), default="test",
                        help="score the held-out plays (test) or validation plays cut from the training plays")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (every stage and the scoring)")
    parser.add_argument("--verbose", action="store_true", help="print each stage's log to stderr")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    command = "python benchmarks/posttrain.py " + " ".join(sys.argv[1:])
    if os.path.exists(args.work_dir):
        shutil.rmtree(args.work_dir)
    os.makedirs(args.work_dir)

    validation = args.split == "validation"
    train, held = builtin_split("plays", per_task=max(args.sft_per_task, args.per_task), validation=validation)
    questions = held_out_subset(held, args.per_task)
    model, tokenizer, _, _ = load_start(args.base, args.device)
    model.eval()
    pairs, _ = encode_preferences([q.preference() for q in questions], tokenizer, model.config.max_seq_len + 1)
    common = dict(batch_size=args.batch_size, progress=False, eval_interval=100, seed=1337, device=args.device)
    sft_source = dict(builtin="plays", per_task=args.sft_per_task)
    dpo_source = dict(builtin="plays", per_task=args.dpo_per_task)
    if validation:            # the stages read the validation split's training plays from files
        dpo_train = first_of_each(train, args.dpo_per_task, lambda e: (e.play, e.task))
        sft_train = first_of_each(train, args.sft_per_task, lambda e: (e.play, e.task))
        sft_source = dict(data=write_jsonl(os.path.join(args.work_dir, "sft_train.jsonl"),
                                           [{"messages": e.messages()} for e in sft_train]),
                          val_data=write_jsonl(os.path.join(args.work_dir, "sft_val.jsonl"),
                                               [{"messages": q.messages()} for q in questions]))
        dpo_source = dict(data=write_jsonl(os.path.join(args.work_dir, "dpo_train.jsonl"),
                                           [e.preference() for e in dpo_train]),
                          val_data=write_jsonl(os.path.join(args.work_dir, "dpo_val.jsonl"),
                                               [q.preference() for q in questions]))
    results, times = {}, {}

    if not args.skip_base:
        results["base"] = score(model, tokenizer, questions, pairs, None, args.beta, args.device)
    sft_run = args.sft_run or os.path.join(args.work_dir, "sft")
    if args.sft_run:                       # an SFT run made before: scored, not trained again
        labels_given = {"sft": f"SFT ({args.sft_run})"}
        results["sft"] = score(*load_run(args.sft_run, args.device), questions, pairs, None, args.beta, args.device)
    else:
        labels_given = {}
    for item in filter(None, args.score_runs.split(",")):       # finished runs, scored only
        label, path = item.rsplit("=", 1)
        labels_given[label] = label
        results[label] = score(*load_run(path, args.device), questions, pairs, None, args.beta, args.device)
    stages = [("sft", "SFT", sft, dict(sft_source, base=args.base, max_steps=args.sft_steps, lr=args.sft_lr)),
              ("dpo", "SFT + DPO", dpo, dict(dpo_source, base=sft_run,
                                             max_steps=args.dpo_steps, lr=args.dpo_lr, beta=args.beta,
                                             batch_size=args.dpo_batch_size)),
              ("lora", f"SFT, LoRA r={args.lora_rank}", sft,
               dict(sft_source, base=args.base, max_steps=args.sft_steps, lr=args.lora_lr, lora_rank=args.lora_rank))]
    wanted = set(args.stages.split(",")) - ({"sft"} if args.sft_run else set())
    stages = [stage for stage in stages if stage[0] in wanted]
    labels = dict(base="base", **labels_given)
    summaries = {}
    for key, label, function, options in stages:
        options = dict(common, **options)
        config = PostTrainConfig(out_dir=os.path.join(args.work_dir, key), **options)
        start = time.perf_counter()
        summaries[key] = function(config, log=(lambda m: print(m, file=sys.stderr, flush=True)) if args.verbose
                                  else (lambda m: None))
        times[key] = time.perf_counter() - start
        labels[key] = label
        trained, tokenizer_run = load_run(config.out_dir, args.device)
        reference = results["sft"]["logps"] if key == "dpo" else None
        results[key] = score(trained, tokenizer_run, questions, pairs, reference, args.beta, args.device)

    tasks = sorted(k for k in next(iter(results.values()))["exact"] if k not in ("all", "count"))
    print(f"# {datetime.date.today()}  {platform.node()}  {platform.processor() or platform.machine()}  "
          f"nproc {os.cpu_count()}  python {platform.python_version()}  numpy {np.__version__}")
    print(f"# command: {command}")
    print(f"# device {args.device}; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"# {'validation' if validation else 'held-out'} plays: {len(questions)} questions ({args.per_task} of "
          f"each kind per play), {len(pairs)} preference pairs")
    points = reference_points(questions)
    print("# no model: " + ", ".join(f"{kind} chance {c:.3f} / first name {f:.3f}" for kind, (c, f) in points.items()))
    header = ["model", "exact (all)"] + [f"exact {t}" for t in tasks] + \
        ["pref acc (log p)", "DPO reward acc", "chosen NLL", "NLL w/o excerpt", "wall s", "trained params", "AdamW MiB"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for key in results:
        r = results[key]
        summary = summaries.get(key, {})
        row = [labels[key], f"{r['exact']['all']:.3f}"] + [f"{r['exact'][t]:.3f}" for t in tasks] + [
            f"{r['preference']['logp_accuracy']:.3f}",
            f"{r['preference']['reward_accuracy']:.3f}" if key == "dpo" else "-",
            f"{r['chosen_nll']:.4f}", f"{r['nll_without_excerpt']:.4f}", f"{times[key]:.0f}" if key in times else "-",
            f"{summary['trained_parameters']:,}" if summary else "-",
            f"{summary['optimizer_state_bytes'] / 2**20:.2f}" if summary else "-"]
        print("| " + " | ".join(row) + " |")
    if "dpo" in results and "sft" in results:
        before, after = results["sft"]["chosen_nll"], results["dpo"]["chosen_nll"]
        print(f"\nheld-out SFT loss (chosen answers) before DPO {before:.4f}, after {after:.4f} "
              f"({100 * (after - before) / before:+.1f} %)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": command, "times": times,
                       "results": {k: {kk: vv for kk, vv in v.items() if kk != "logps"} for k, v in results.items()},
                       "summaries": summaries}, f, indent=1)


if __name__ == "__main__":
    main()
