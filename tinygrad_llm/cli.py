"""The `tinygrad-llm` command: prepare, train, sample, eval, export, import, plot (and train-classifier).

    tinygrad-llm train                                   # built-in Shakespeare, default small model, ~5 min
    tinygrad-llm train --config shakespeare_char --data ../shared/data/tinyshakespeare.txt   # bundled TOML
    tinygrad-llm train --data ../shared/data/tinyshakespeare.txt --out-dir runs/char --resume
    tinygrad-llm sample runs/default --prompt "ROMEO:" --max-new-tokens 300 --temperature 0.8 --top-k 40
    tinygrad-llm eval runs/default [--best]
    tinygrad-llm export runs/default --hf exported/ [--gguf model.gguf --type q8_0]   # cli_export.py
    tinygrad-llm import exported/ --out-dir runs/imported
    tinygrad-llm plot runs/default                       # runs/default/loss.png (needs matplotlib)

Training options come from the TrainConfig defaults, then a TOML file (`--config`, sections allowed),
then flags (`--max-steps 500`, `--no-progress`, ...), later ones winning. Errors (bad flags, missing
paths, invalid values, corrupt checkpoints, a diverged run) print one `tinygrad-llm <command>: error: ...`
line and exit with status 2 (usage) or 1 (anything else); Ctrl-C exits 130 (`train` saves a checkpoint
first).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

EXIT_USAGE, EXIT_FAILURE, EXIT_INTERRUPTED = 2, 1, 130


class CommandError(Exception):
    """A user-facing failure: printed as one line, exit status `code`."""

    def __init__(self, message: str, code: int = EXIT_FAILURE):
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------------------------------------- parsers
def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


_finite_float.__name__ = "float"           # argparse names the type in its messages


def add_train_parser(subparsers):
    from .train_config import CONFIG_FIELDS, TrainConfig
    p = subparsers.add_parser("train", help="train a model (default: the built-in Shakespeare corpus)",
                              description="Train a Llama-style model. Defaults < --config TOML < flags.",
                              argument_default=argparse.SUPPRESS)
    p.add_argument("--config", dest="config_file", metavar="FILE", help="TOML file of training options")
    defaults = TrainConfig()
    helps = {"data": "prepared shard directory or .txt file (default: the built-in corpus)",
             "out_dir": "run directory: checkpoints, metrics.jsonl, config.json",
             "resume": "continue the run in --out-dir from its latest checkpoint",
             "device": "cpu or cuda", "dtype": "fp32, tf32, bf16 or fp16 picks the GPU precision policy (parameters stay float32); "
                      "float32 (default) or float64 sets the parameter dtype",
             "precision": "GPU mixed precision policy: fp32, tf32, bf16, fp16 (ignored on the CPU)",
             "sample_tokens": "print a sample of this many tokens at the end",
             "threads_plan": "CPU threads: auto (measured once, cached), pool, blas or single; "
                             "$TINYGRAD_LLM_THREADS_PLAN overrides"}
    for name, spec in CONFIG_FIELDS.items():
        default = getattr(defaults, name)
        text = helps.get(name, "") + f" (default: {default!r})"
        if isinstance(default, bool):
            p.add_argument(_flag(name), dest=name, action=argparse.BooleanOptionalAction, help=text)
        else:
            kind = _finite_float if isinstance(default, float) else type(default)
            p.add_argument(_flag(name), dest=name, type=kind, metavar=type(default).__name__.upper(), help=text)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tinygrad-llm", description="Train, sample, evaluate and export a "
                                     "small Llama-style language model on NumPy.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    try:
        from .cli_prepare import add_classifier_parser, add_prepare_parser
        add_prepare_parser(sub)
        add_classifier_parser(sub)
    except ImportError:          # the data pipeline is missing: say so when `prepare` is used
        p = sub.add_parser("prepare", help="prepare token shards (needs tinygrad_llm.cli_prepare)")
        p.add_argument("rest", nargs=argparse.REMAINDER)
    add_train_parser(sub)
    from .cli_posttrain import add_parsers as add_posttrain_parsers     # sft, dpo, chat
    add_posttrain_parsers(sub)
    from .cli_serve import add_parsers as add_serve_parsers
    add_serve_parsers(sub)

    p = sub.add_parser("sample", help="generate text from a checkpoint")
    p.add_argument("checkpoint", help="run directory, checkpoints/ directory or step directory")
    p.add_argument("--prompt", default="\n", help="prompt text (default: a newline)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=300)
    p.add_argument("--temperature", type=_finite_float, default=0.8, help="0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=_finite_float, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--best", action="store_true", help="use the best checkpoint instead of the latest")
    p.add_argument("--tokenizer", default=None, help="tokenizer file, if the checkpoint's is not found")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole context every token")
    p.add_argument("--chat", action="store_true",
                   help="send --prompt as a user turn through the chat template; the reply stops at <|end|>")
    p.add_argument("--device", default="cpu")

    p = sub.add_parser("eval", help="validation loss, perplexity and bits per byte of a checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("--data", default=None, help="data to evaluate on (default: the run's own data)")
    p.add_argument("--eval-iters", type=_positive_int, default=None)
    p.add_argument("--batch-size", type=_positive_int, default=None)
    p.add_argument("--best", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--task", default=None, help="multiple-choice task: a JSONL file or a built-in name (cli_evals.py)")
    p.add_argument("--limit", type=_positive_int, default=None, help="score at most this many items of --task")
    p.add_argument("--output", default=None, help="write --task results with per-item scores to this JSON file")
    p.add_argument("--against", default=None, metavar="RUN", help="score a second run on the same --task items")

    from .cli_export import add_parsers as add_export_parsers
    add_export_parsers(sub)                  # export, import
    from .cli_quant import add_parsers as add_quant_parsers
    add_quant_parsers(sub)                   # quantize

    p = sub.add_parser("plot", help="draw the loss curves of a run into a PNG (needs matplotlib)")
    p.add_argument("run_dir")
    p.add_argument("--out", default=None, help="PNG path (default: RUN_DIR/loss.png)")
    return parser


# ---------------------------------------------------------------------------------------------- commands
def run_train(args) -> int:
    from .train import train
    from .train_config import TrainConfig, config_from_dict, load_toml
    values = {}
    if getattr(args, "config_file", None):
        values.update(load_toml(args.config_file))
    flags = {k: v for k, v in vars(args).items() if k not in ("command", "config_file", "func")}
    config = config_from_dict(values, TrainConfig())
    config = config_from_dict(flags, config)
    if not config.data and not any(k in values or k in flags for k in ("sample_tokens",)):
        config.sample_tokens = 500          # the out-of-the-box run shows what it learned
    if "out_dir" not in values and "out_dir" not in flags and not config.resume:
        config.out_dir = _fresh_run_dir(config.out_dir)   # a second plain `train` starts runs/default-2
    if config.data and not os.path.exists(config.data):
        raise CommandError(f"--data {config.data}: no such file or directory")
    summary = train(config)
    if summary.get("stopped") == "interrupted":
        print(f"tinygrad-llm train: interrupted; resume with --resume --out-dir {config.out_dir}", file=sys.stderr)
        return EXIT_INTERRUPTED
    if summary.get("stopped"):
        raise CommandError(summary["stopped"])
    print(f"\nsaved to {os.path.join(config.out_dir, 'checkpoints')}; try: tinygrad-llm sample {config.out_dir} "
          f"--prompt 'ROMEO:'")
    return 0


def _fresh_run_dir(base: str) -> str:
    candidate, n = base, 1
    while os.path.isdir(os.path.join(candidate, "checkpoints")):
        n += 1
        candidate = f"{base}-{n}"
    return candidate


def _load(checkpoint: str, best: bool, device: str = "cpu", tokenizer_file: str | None = None):
    from .checkpoint import load_checkpoint, tokenizer_from_state
    from .cli_quant import load_quantized
    from .tokenizer import load_tokenizer
    quantized = load_quantized(checkpoint, device, tokenizer_file)      # a `tinygrad-llm quantize` run
    if quantized is not None:
        return quantized
    model, state = load_checkpoint(checkpoint, which="best" if best else "latest")
    model.to(device=device)
    tokenizer = load_tokenizer(tokenizer_file) if tokenizer_file else tokenizer_from_state(state, state["directory"])
    if tokenizer.vocab_size != model.config.vocab_size:
        raise CommandError(f"the tokenizer has {tokenizer.vocab_size} ids but the model {model.config.vocab_size}")
    return model, state, tokenizer


def run_sample(args) -> int:
    from .generate import generate_text
    if args.temperature < 0:
        raise CommandError("--temperature must be >= 0", EXIT_USAGE)
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise CommandError("--top-p must be in (0, 1]", EXIT_USAGE)
    if args.top_k is not None and args.top_k <= 0:
        raise CommandError("--top-k must be positive", EXIT_USAGE)
    model, state, tokenizer = _load(args.checkpoint, args.best, args.device, args.tokenizer)
    prompt = args.prompt.replace("\\n", "\n")            # a typed "\n" means a newline
    if args.chat:
        from .posttrain.chat import chat_reply, has_chat_tokens
        if not has_chat_tokens(tokenizer):
            raise CommandError(f"{args.checkpoint} has no chat tokens (a base model?): fine-tune it with "
                               f"`tinygrad-llm sft` first, or sample without --chat")
        chat_reply(model, tokenizer, [{"role": "user", "content": prompt}], args.max_new_tokens, args.temperature,
                   args.top_k, args.top_p, args.seed, stream=sys.stdout)
        sys.stdout.write("\n")
        return 0
    sys.stdout.write(prompt)
    generate_text(model, tokenizer, prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                  top_k=args.top_k, top_p=args.top_p, stop=args.stop, seed=args.seed, stream=sys.stdout,
                  use_cache=not args.no_cache)
    sys.stdout.write("\n")
    return 0


def run_eval(args) -> int:
    if args.task or args.against:
        from .cli_evals import run_task_eval
        return run_task_eval(args, _load)
    from .checkpoint import require_field
    from .tokenizer import tokenizer_fingerprint
    from .train import build_data, evaluate
    from .train_config import TrainConfig, config_from_dict
    model, state, tokenizer = _load(args.checkpoint, args.best, args.device)
    from .train_config import CONFIG_FIELDS
    saved = require_field(state, "train_config", dict, os.path.join(state["directory"], "state.json"))
    saved = {k: v for k, v in saved.items() if k in CONFIG_FIELDS}     # fields of older versions are dropped
    saved.update(resume=False, progress=False)
    if args.data:
        saved["data"] = args.data
    if saved.get("tokenizer"):                        # the run's own verified copy, wherever the run is now
        from .checkpoint import tokenizer_file_of
        saved["tokenizer"] = tokenizer_file_of(state, state["directory"]) or ""
    if args.batch_size:
        saved["batch_size"] = args.batch_size
    config = config_from_dict(saved, TrainConfig())
    data = build_data(config)
    if data.tokenizer.vocab_size != model.config.vocab_size:
        raise CommandError(f"the data's vocabulary ({data.tokenizer.vocab_size}) is not the model's "
                           f"({model.config.vocab_size})")
    if tokenizer_fingerprint(data.tokenizer) != tokenizer_fingerprint(tokenizer):
        raise CommandError(f"the data of {config.data} uses another vocabulary than the model (same size "
                           f"{tokenizer.vocab_size}, different tokens): its loss would mean nothing")
    result = evaluate(model, data.val, args.eval_iters or config.eval_iters, data.bytes_per_token, args.device)
    if state.get("quantized"):                                            # the perplexity change vs the float run
        from .cli_quant import compare_with_float
        result.update(compare_with_float(state, result, lambda float_model: evaluate(
            float_model.to(device=args.device), data.val, args.eval_iters or config.eval_iters, data.bytes_per_token,
            args.device)))
    result["step"] = state["step"]
    result["checkpoint"] = state["directory"]
    print(json.dumps(result, indent=1))
    return 0


def run_export(args) -> int:
    from .cli_export import run_export as run
    return run(args)


def run_import(args) -> int:
    from .cli_export import run_import as run
    return run(args)


def run_quantize(args) -> int:
    from .cli_quant import run_quantize as run
    return run(args)


def run_plot(args) -> int:
    path = os.path.join(args.run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise CommandError(f"{path} not found: give a run directory made by `tinygrad-llm train`")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise CommandError("plot needs matplotlib, an optional extra: pip install matplotlib "
                           "(or pip install -e .[plot])") from None
    train_points, val_points = [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if "loss" in record and "event" not in record and isinstance(record["loss"], (int, float)):
                train_points.append((record["step"], record["loss"]))
            if "val_loss" in record and "event" not in record:
                val_points.append((record["step"], record["val_loss"]))
    if not train_points and not val_points:
        raise CommandError(f"{path} holds no loss records yet")
    figure, axis = plt.subplots(figsize=(7, 4))
    if train_points:
        axis.plot(*zip(*train_points), label="train loss", linewidth=1)
    if val_points:
        axis.plot(*zip(*val_points), "o-", label="val loss")
    axis.set_xlabel("step")
    axis.set_ylabel("cross-entropy (nats/token)")
    axis.set_title(os.path.basename(os.path.abspath(args.run_dir)))
    axis.grid(alpha=0.3)
    axis.legend()
    out = args.out or os.path.join(args.run_dir, "loss.png")
    figure.tight_layout()
    figure.savefig(out, dpi=120)
    print(f"wrote {out}")
    return 0


COMMANDS = {"train": run_train, "sample": run_sample, "eval": run_eval, "export": run_export, "plot": run_plot,
            "import": run_import}
COMMANDS["quantize"] = run_quantize
from .cli_posttrain import COMMANDS as POSTTRAIN_COMMANDS  # noqa: E402  (sft, dpo, chat)
COMMANDS.update(POSTTRAIN_COMMANDS)


def _reexec_with_blas_settings(argv) -> None:
    """Run the command line again with OPENBLAS_THREAD_TIMEOUT=4 when it is unset.

    OpenBLAS reads it once, when NumPy loads it (before this module runs), and by default its idle
    worker threads spin for ~2^28 cycles after every GEMM, competing with the elementwise work on the
    same cores; with a short timeout the row pool's threads can share the cores (`threading_plan` then
    measures whether they should: benchmarks/RESULTS.md).
    Only for a real command line (argv None), never inside a program that called main(argv);
    TINYGRAD_LLM_REEXEC=0 turns it off.
    """
    if argv is not None or os.environ.get("OPENBLAS_THREAD_TIMEOUT") or os.environ.get("TINYGRAD_LLM_REEXEC") == "0":
        return
    if len(sys.argv) < 2 or sys.argv[1] not in ("train", "eval", "sample"):
        return
    os.environ["OPENBLAS_THREAD_TIMEOUT"] = "4"
    try:
        os.execv(sys.executable, [sys.executable, "-m", "tinygrad_llm", *sys.argv[1:]])
    except OSError:
        return                                           # carry on without it


def main(argv=None) -> int:
    _reexec_with_blas_settings(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    from .checkpoint import CheckpointError
    try:
        if args.command == "prepare":
            if hasattr(args, "rest"):
                raise CommandError("prepare needs the data pipeline (tinygrad_llm.cli_prepare), which is missing")
            from .cli_prepare import run_prepare
            return run_prepare(args)
        if args.command == "train-classifier":
            from .cli_prepare import run_train_classifier
            return run_train_classifier(args)
        if args.command == "serve":
            from .cli_serve import run_serve
            return run_serve(args, _load)
        return COMMANDS[args.command](args)
    except CommandError as error:
        print(f"tinygrad-llm {args.command}: error: {error}", file=sys.stderr)
        return error.code
    except (CheckpointError, FileNotFoundError, FileExistsError, ValueError, TypeError, RuntimeError,
            KeyError, OSError) as error:
        message = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
        print(f"tinygrad-llm {args.command}: error: {message}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print(f"tinygrad-llm {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
