"""The model card (README.md) of an export, filled only from the run's own files.

    facts = run_facts(checkpoint_dir, state)        # what the run recorded
    text = model_card(facts, model, tokenizer, formats=["hf"], license_id="mit")

Sources, all optional except the checkpoint's state.json:
    <checkpoint>/state.json      model and training config, step, best validation loss, tokenizer reference
    <run>/metrics.jsonl          evaluations (val loss, perplexity, bits per byte), throughput, training time
    <data>/report.json           the `prepare` report: documents and bytes read and kept, tokens per split
                                 (found through the training config's data path when it still exists)

A fact the run did not record is written as "not recorded", never guessed. The YAML header carries
license (the --license given to export, else "unknown": runs record none), tags, datasets (the names of
the training data) and the pipeline tag.
"""
from __future__ import annotations

import json
import os

from ..tokenizer import CHAT_TEMPLATE
from .hf import has_chat_tokens

NOT_RECORDED = "not recorded"


def _read_json(path: str):
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except (OSError, ValueError):
        return None


def _metrics(path: str) -> list:
    records = []
    try:
        with open(path, encoding="utf-8") as file:
            for line in file:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue                      # a line cut short by a crash
                if isinstance(record, dict):
                    records.append(record)
    except OSError:
        pass
    return records


def run_facts(checkpoint_dir: str, state: dict) -> dict:
    """What the card needs, from the checkpoint's state and the files of its run and data."""
    run_dir = os.path.dirname(os.path.dirname(os.path.abspath(checkpoint_dir)))
    train_config = state.get("train_config") if isinstance(state.get("train_config"), dict) else {}
    records = _metrics(os.path.join(run_dir, "metrics.jsonl"))
    step = state.get("step")
    evaluations = [r for r in records if "val_loss" in r and r.get("event") is None and isinstance(r.get("step"), int)]
    at_step = [r for r in evaluations if r["step"] == step]
    throughput = [r["tokens_per_s"] for r in records if isinstance(r.get("tokens_per_s"), (int, float))]
    train_seconds = [r["train_s"] for r in records if isinstance(r.get("train_s"), (int, float))]
    starts = [r for r in records if r.get("event") in ("start", "resume")]
    data = train_config.get("data") or None
    report = None
    if isinstance(data, str) and os.path.isdir(data):
        report = _read_json(os.path.join(data, "report.json"))
    return {"step": step, "train_config": train_config, "best_val_loss": state.get("best_val_loss"),
            "evaluation": (at_step or evaluations or [None])[-1], "tokens_per_s": throughput[-1] if throughput else None,
            "train_seconds": train_seconds[-1] if train_seconds else None, "start": starts[-1] if starts else None,
            "data": data, "report": report if isinstance(report, dict) else None,
            "tokenizer_ref": state.get("tokenizer") if isinstance(state.get("tokenizer"), dict) else {},
            "imported_from": state.get("imported_from")}


def _number(value, digits=4) -> str:
    if isinstance(value, bool) or value is None:
        return NOT_RECORDED if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _table(rows) -> list:
    lines = ["| | |", "| --- | --- |"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    return lines


def _dataset_names(facts: dict) -> list:
    report = facts["report"]
    if report and isinstance(report.get("config"), dict) and report["config"].get("prefix"):
        return [str(report["config"]["prefix"])]
    if facts["data"]:
        return [os.path.splitext(os.path.basename(os.path.normpath(facts["data"])))[0]]
    return []


def _yaml_list(values) -> str:
    return "[" + ", ".join(json.dumps(value) for value in values) + "]"


def _data_section(facts: dict) -> list:
    lines = ["## Training data", ""]
    if facts["imported_from"]:
        return lines + [f"Imported from `{facts['imported_from']}`; the training data is {NOT_RECORDED}.", ""]
    lines.append(f"Data: `{facts['data']}`" if facts["data"] else "Data: the built-in corpus.")
    report = facts["report"]
    if not report:
        lines += ["", f"The `prepare` report: {NOT_RECORDED} (a .txt file, or the data directory moved).", ""]
        return lines
    sources, tokens = report.get("sources") or {}, report.get("tokens") or {}
    rows = [("documents read", _number(sources.get("documents"))), ("bytes read", _number(sources.get("bytes_read"))),
            ("documents kept", _number(report.get("kept_documents"))), ("bytes kept", _number(report.get("kept_bytes")))]
    for split in ("train", "val"):
        part = tokens.get(split) if isinstance(tokens.get(split), dict) else {}
        rows.append((f"{split} documents / tokens", f"{_number(part.get('documents'))} / {_number(part.get('tokens'))}"))
    for stage in report.get("stages") or []:
        if isinstance(stage, dict) and stage.get("dropped"):
            dropped = ", ".join(f"{reason} {count}" for reason, count in stage["dropped"].items())
            rows.append((f"dropped by {stage.get('stage')}", dropped))
    rows.append(("split", f"{tokens.get('split', NOT_RECORDED)}, val fraction {tokens.get('val_fraction', NOT_RECORDED)}"))
    return lines + ["", "From the `prepare` report (`report.json`):", ""] + _table(rows) + [""]


def model_card(facts: dict, model, tokenizer, formats=("hf",), license_id: str | None = None,
               name: str | None = None) -> str:
    """The README.md text. `formats`: "hf" and/or GGUF kinds ("gguf-q8_0", ...) this export wrote."""
    config, train = model.config, facts["train_config"]
    parameters = sum(int(array.size) for array in model.state_dict().values())
    datasets = _dataset_names(facts)
    tags = ["tinygrad_llm", "llama", "text-generation"] + (["gguf"] if any(f.startswith("gguf") for f in formats) else [])
    title = name or "tinygrad_llm model"
    header = ["---", f"license: {license_id or 'unknown'}", f"tags: {_yaml_list(tags)}"]
    if datasets:
        header.append(f"datasets: {_yaml_list(datasets)}")
    header += ["pipeline_tag: text-generation", "library_name: transformers" if "hf" in formats else "library_name: gguf",
               "---", ""]
    lines = header + [f"# {title}", "",
                      f"A Llama-style decoder-only language model of {parameters:,} parameters, trained from scratch "
                      "with tinygrad_llm (NumPy autograd, no deep-learning framework). Every figure on this card "
                      "comes from the run's own files.", ""]
    if not license_id:
        lines += ["License: the run records none; `export --license ID` sets it.", ""]
    lines += ["## Architecture", ""] + _table([
        ("parameters", f"{parameters:,}"), ("layers", config.n_layers), ("hidden size", config.d_model),
        ("attention heads / key-value heads", f"{config.n_heads} / {config.n_kv_heads}"),
        ("head dimension", config.head_dim), ("feed-forward (SwiGLU) size", config.ffn_hidden),
        ("context length", config.max_seq_len), ("vocabulary", config.vocab_size),
        ("RoPE θ", config.rope_theta), ("RMSNorm ε", config.norm_eps),
        ("tied input/output embeddings", config.tie_embeddings)]) + [""]
    lines += _data_section(facts)
    specials = sorted(tokenizer.special_tokens.items(), key=lambda item: item[1])
    kind = "character-level" if hasattr(tokenizer, "chars") else "byte-level BPE"
    rows = [("type", kind), ("size", tokenizer.vocab_size),
            ("special tokens", ", ".join(f"`{n}` ({i})" for n, i in specials) or "none")]
    if hasattr(tokenizer, "pattern"):
        rows.append(("merges", len(tokenizer.merges)))
    lines += ["## Tokenizer", ""] + _table(rows) + [""]
    if has_chat_tokens(tokenizer):
        lines += ["Chat template (Jinja, in tokenizer_config.json):", "", "```jinja", CHAT_TEMPLATE, "```", ""]
    else:
        lines += ["No chat template: the vocabulary has no chat role tokens.", ""]
    lines += ["## Training", ""]
    if facts["imported_from"]:
        lines += [f"Imported from `{facts['imported_from']}`; the training configuration is {NOT_RECORDED}.", ""]
    elif train:
        tokens_per_step = None
        if all(isinstance(train.get(k), int) for k in ("batch_size", "seq_len", "grad_accum")):
            tokens_per_step = train["batch_size"] * train["seq_len"] * train["grad_accum"]
        step = facts["step"]
        start = facts["start"] or {}
        lines += _table([
            ("steps", _number(step)),
            ("tokens per step (batch × sequence × accumulation)", _number(tokens_per_step)),
            ("tokens seen", _number(tokens_per_step * step if tokens_per_step and isinstance(step, int) else None)),
            ("optimizer", f"AdamW, β = ({train.get('beta1')}, {train.get('beta2')}), ε {train.get('eps')}, "
                          f"weight decay {train.get('weight_decay')}"),
            ("learning rate", f"{train.get('lr')} peak, {train.get('warmup_steps')} warm-up steps, cosine to "
                              f"{train.get('min_lr_ratio')} × peak"),
            ("gradient clipping", _number(train.get("grad_clip"))), ("dropout", _number(train.get("dropout"))),
            ("attention dropout", _number(train.get("attention_dropout"))),
            ("precision", f"{train.get('precision', NOT_RECORDED)} (parameters {train.get('dtype', NOT_RECORDED)})"),
            ("device", start.get("device", train.get("device", NOT_RECORDED))), ("seed", str(train.get("seed", NOT_RECORDED))),
            ("training time", f"{facts['train_seconds']:.1f} s" if facts["train_seconds"] is not None else NOT_RECORDED),
            ("throughput (last logged)", f"{facts['tokens_per_s']:,.0f} tokens/s" if facts["tokens_per_s"] else NOT_RECORDED)])
        lines.append("")
    else:
        lines += [f"Training configuration: {NOT_RECORDED}.", ""]
    lines += ["## Evaluation", ""]
    evaluation = facts["evaluation"]
    if evaluation:
        lines += [f"On the run's held-out validation split, at step {evaluation.get('step')} (metrics.jsonl):", ""]
        lines += _table([("loss (nats/token)", _number(evaluation.get("val_loss"))),
                         ("perplexity", _number(evaluation.get("val_ppl"))),
                         ("bits per byte", _number(evaluation.get("val_bpb"))),
                         ("best validation loss of the run", _number(facts["best_val_loss"]))])
        lines.append("")
    else:
        lines += [f"Evaluation results: {NOT_RECORDED}.", ""]
    lines += ["## Intended use and limitations", "",
              f"A small model for learning and experiments: it continues text in the style of its training data "
              f"and knows nothing beyond it. It sees at most {config.max_seq_len} tokens of context. It has no "
              "safety tuning and its only evaluation is the held-out loss above: do not rely on what it writes "
              "being true, appropriate or original. Outputs can reproduce passages of the training data.", ""]
    lines += ["## Files and use", ""]
    if "hf" in formats:
        lines += ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
                  "model = AutoModelForCausalLM.from_pretrained(PATH)",
                  "tokenizer = AutoTokenizer.from_pretrained(PATH)", "```", ""]
    for kind_name in formats:
        if kind_name.startswith("gguf"):
            lines += [f"GGUF ({kind_name[5:]}): `llama-cli -m FILE -p \"...\"`, or llama-cpp-python's `Llama(FILE)`.", ""]
    return "\n".join(lines)
