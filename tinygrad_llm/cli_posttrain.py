"""The post-training commands of `tinygrad-llm`: sft, dpo, chat.

    tinygrad-llm sft runs/default --builtin plays --out-dir runs/sft [--lora-rank 8]
    tinygrad-llm sft runs/default --data conversations.jsonl --out-dir runs/sft
    tinygrad-llm dpo runs/sft --builtin plays --beta 0.1 --out-dir runs/dpo
    tinygrad-llm chat runs/dpo            # type a message, Enter; /reset clears the history, /quit ends

Options of sft and dpo are the fields of tinygrad_llm.posttrain.loop.PostTrainConfig as flags
(`--max-steps 300`, `--lr 1e-3`, `--resume`, `--no-progress`, ...); each command has its own defaults for
the learning rate and the number of steps. cli.py adds these parsers with `add_parsers(subparsers)` and
runs them through `COMMANDS`, so errors (raised here as ValueError, FileNotFoundError, CheckpointError)
become its one-line `tinygrad-llm <command>: error: ...`; this module never imports cli.py back.
"""
from __future__ import annotations

import argparse
import sys

EXIT_FAILURE = 1                 # cli.py's status for a failed command (this module never imports cli.py)
STAGE_DEFAULTS = {"sft": {"lr": 3e-4, "max_steps": 300}, "dpo": {"lr": 2e-4, "max_steps": 100}}   # benchmarks/RESULTS.md
HIDDEN = ("stage", "base", "out_dir", "data", "builtin")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_stage_parser(subparsers, stage, help_text, base_help):
    from .posttrain.data import BUILTIN_NAMES
    from .posttrain.loop import CONFIG_FIELDS, PostTrainConfig
    defaults = PostTrainConfig(**STAGE_DEFAULTS[stage])
    p = subparsers.add_parser(stage, help=help_text, description=help_text, argument_default=argparse.SUPPRESS)
    p.add_argument("base", metavar="RUN", help=base_help)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", metavar="FILE", help="JSONL file: conversations (sft) or preferences (dpo)")
    source.add_argument("--builtin", metavar="NAME", help=f"built-in task: {', '.join(BUILTIN_NAMES)}")
    p.add_argument("--out-dir", dest="out_dir", required=True, metavar="DIR", help="run directory to write")
    helps = {"lora_rank": "LoRA rank (0: full fine-tuning)", "lora_alpha": "LoRA alpha (0: the rank)",
             "lora_targets": "projections to adapt: q,k,v,o,gate,up,down or all",
             "beta": "DPO's beta", "val_data": "held-out JSONL for a --data run",
             "resume": "continue the run in --out-dir from its latest checkpoint"}
    for name in CONFIG_FIELDS:
        if name in HIDDEN or (name == "beta" and stage != "dpo"):
            continue
        default = getattr(defaults, name)
        text = helps.get(name, "") + f" (default: {default!r})"
        if isinstance(default, bool):
            p.add_argument(_flag(name), dest=name, action=argparse.BooleanOptionalAction, help=text)
        else:
            p.add_argument(_flag(name), dest=name, type=type(default), metavar=type(default).__name__.upper(),
                           help=text)
    return p


def add_parsers(subparsers):
    """Add the sft, dpo and chat subcommands to the `tinygrad-llm` parser."""
    _add_stage_parser(subparsers, "sft", "supervised fine-tuning on chat-formatted conversations",
                      "the pretrained run to start from")
    _add_stage_parser(subparsers, "dpo", "direct preference optimisation against the starting model",
                      "the run to start from (an SFT run), also the frozen reference")
    p = subparsers.add_parser("chat", help="chat with a fine-tuned run through the chat template")
    p.add_argument("run", metavar="RUN", help="run directory, checkpoints/ directory or step directory")
    p.add_argument("--system", default=None, help="a system message opening the conversation")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--best", action="store_true", help="use the best checkpoint instead of the latest")
    p.add_argument("--device", default="cpu")


def _config(args, stage):
    from .posttrain.loop import PostTrainConfig
    values = dict(STAGE_DEFAULTS[stage])
    values.update({k: v for k, v in vars(args).items() if k not in ("command", "func")})
    values["stage"] = stage
    return PostTrainConfig(**values)


def _report(summary, stage):
    if summary.get("stopped") and summary["stopped"] != "interrupted":
        return EXIT_FAILURE
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in summary.items() if k.startswith("val_"))
    print(f"\n{stage}: {summary['steps']} steps in {summary['train_seconds']:.1f} s" + (f"; {metrics}" if metrics else "")
          + f"\nsaved to {summary['out_dir']}/checkpoints; try: tinygrad-llm chat {summary['out_dir']}")
    return 0


def run_sft(args) -> int:
    from .posttrain.sft import sft
    config = _config(args, "sft")
    return _report(sft(config), "sft")


def run_dpo(args) -> int:
    from .posttrain.dpo import dpo
    config = _config(args, "dpo")
    return _report(dpo(config), "dpo")


def load_chat_model(path, best=False, device="cpu"):
    """(model, tokenizer) of a run whose tokenizer has the chat tokens; ValueError when it has none."""
    from .checkpoint import load_checkpoint, tokenizer_from_state
    from .posttrain.chat import has_chat_tokens
    model, state = load_checkpoint(path, which="best" if best else "latest")
    tokenizer = tokenizer_from_state(state, state["directory"])
    if not has_chat_tokens(tokenizer):
        raise ValueError(f"{path} has no chat tokens (a base model?): fine-tune it first with "
                         f"`tinygrad-llm sft {path} --builtin plays --out-dir DIR`")
    model.to(device=device)
    return model, tokenizer


def run_chat(args, stdin=None, stdout=None) -> int:
    from .posttrain.chat import chat_reply
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    if args.temperature < 0 or args.max_new_tokens <= 0:
        raise ValueError("--temperature must be >= 0 and --max-new-tokens positive")
    model, tokenizer = load_chat_model(args.run, args.best, args.device)
    opening = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(opening)
    interactive = stdin.isatty()
    if interactive:
        stdout.write("chat: type a message and press Enter; /reset clears the history, /quit (or Ctrl-D) ends\n")
    while True:
        if interactive:
            stdout.write("> ")
            stdout.flush()
        line = stdin.readline()
        if not line:
            break
        text = line.rstrip("\n")
        if text.strip() in ("/quit", "/exit"):
            break
        if text.strip() == "/reset":
            messages = list(opening)
            continue
        if not text.strip():
            continue
        messages.append({"role": "user", "content": text})
        _drop_oldest_turns(tokenizer, messages, len(opening), model.config.max_seq_len - 16)
        try:
            reply = chat_reply(model, tokenizer, messages, args.max_new_tokens, args.temperature, args.top_k,
                               args.top_p, args.seed, stream=stdout)
        except (KeyError, ValueError) as error:      # a character the vocabulary lacks, a special-token string
            message = error.args[0] if error.args else error
            stdout.write(f"(cannot encode that message: {message})\n")
            messages.pop()
            continue
        stdout.write("\n")
        stdout.flush()
        messages.append({"role": "assistant", "content": reply})
    return 0


def _drop_oldest_turns(tokenizer, messages, keep, budget):
    """Forget the oldest user/assistant turns (never the first `keep` messages, never the newest) until the
    conversation with its generation prompt fits in `budget` tokens."""
    from .posttrain.chat import apply_chat_template
    while len(messages) > keep + 1:
        try:
            length = len(apply_chat_template(tokenizer, messages, add_generation_prompt=True)[0])
        except (KeyError, ValueError):
            return
        if length <= budget:
            return
        del messages[keep:keep + 2 if len(messages) > keep + 2 else keep + 1]


COMMANDS = {"sft": run_sft, "dpo": run_dpo, "chat": run_chat}
