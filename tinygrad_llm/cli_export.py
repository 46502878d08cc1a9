"""The `export` and `import` commands of `tinygrad-llm`.

    tinygrad-llm export runs/default --hf exported/                      # Hugging Face directory + model card
    tinygrad-llm export runs/default --gguf model.gguf --type q8_0       # llama.cpp (needs the gguf extra)
    tinygrad-llm import exported/ --out-dir runs/imported                # a run that sample/eval/export accept

The tokenizer of a run is found by checkpoint.tokenizer_from_state, which trusts no path in state.json:
a character vocabulary is stored inline; a tokenizer file is read from the run directory (`run_file`, a
plain file name, resolved inside the run, so a moved run still finds it), or from the recorded path only
when that path lies inside the run directory or its sha256 matches the one recorded. Nothing is copied:
the tokenizer is converted (export/hf_tokenizer.py).
"""
from __future__ import annotations

import hashlib
import os
import sys

TYPES = ("f32", "f16", "q8_0", "q4_0")
EXIT_USAGE, EXIT_FAILURE = 2, 1


class CommandError(Exception):
    """A user-facing failure of export or import: printed as one line, exit status `code`. (Its own class,
    so that this module never imports cli.py, which imports it.)"""

    def __init__(self, message: str, code: int = EXIT_FAILURE):
        super().__init__(message)
        self.code = code


def _one_line_errors(run):
    """Run a command; a CommandError becomes `tinygrad-llm <command>: error: ...` and its exit status."""
    def command(args) -> int:
        try:
            return run(args)
        except CommandError as error:
            print(f"tinygrad-llm {args.command}: error: {error}", file=sys.stderr)
            return error.code
    command.__doc__ = run.__doc__
    return command


def add_parsers(subparsers) -> None:
    p = subparsers.add_parser("export", help="export a checkpoint for Hugging Face transformers and/or llama.cpp",
                              description="Write a Hugging Face Llama directory (--hf) and/or a GGUF file (--gguf), "
                                          "each with a model card filled from the run's files.")
    p.add_argument("checkpoint", help="run directory, checkpoints/ directory or step directory")
    p.add_argument("--hf", metavar="DIR", help="Hugging Face output directory (config.json, model.safetensors, "
                                               "tokenizer.json, tokenizer_config.json, README.md, ...)")
    p.add_argument("--gguf", metavar="FILE", help="GGUF output file (its model card goes to FILE without .gguf "
                                                  "+ .README.md)")
    p.add_argument("--type", default="f16", metavar="TYPE", help=f"GGUF tensor type: {', '.join(TYPES)} (default f16)")
    p.add_argument("--best", action="store_true", help="export the best checkpoint instead of the latest")
    p.add_argument("--force", action="store_true", help="write into a non-empty --hf directory / over a --gguf file")
    p.add_argument("--tokenizer", default=None, metavar="FILE", help="tokenizer file, instead of the run's own")
    p.add_argument("--license", default=None, metavar="ID", help="license for the model card (e.g. mit, apache-2.0)")
    p.add_argument("--name", default=None, help="model name for the card and GGUF (default: the run's directory name)")
    p.set_defaults(export_parser=p)

    p = subparsers.add_parser("import", help="import a Hugging Face Llama directory as a run",
                              description="Turn a Hugging Face Llama directory (config.json, model.safetensors, "
                                          "tokenizer.json) into a run directory for sample, eval and export.")
    p.add_argument("hf_dir", help="Hugging Face model directory")
    p.add_argument("--out-dir", required=True, help="run directory to create")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out-dir")


# ---------------------------------------------------------------------------------------------- tokenizer
def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def run_tokenizer(state: dict, checkpoint_dir: str, override: str | None = None):
    """The tokenizer of a checkpoint (checkpoint.tokenizer_from_state: inline, or the run's verified file),
    or the --tokenizer file given instead."""
    from .checkpoint import tokenizer_from_state
    from .tokenizer import load_tokenizer
    return load_tokenizer(override) if override else tokenizer_from_state(state, checkpoint_dir)


# ---------------------------------------------------------------------------------------------- export
@_one_line_errors
def run_export(args) -> int:
    from .checkpoint import load_checkpoint
    from .export import ExportError, check_output_dir, export_gguf, export_hf, gguf_vocabulary, model_card, run_facts
    if not args.hf and not args.gguf:
        args.export_parser.error("give --hf DIR and/or --gguf FILE")          # usage error: exits with 2
    if args.type not in TYPES:
        raise CommandError(f"unknown --type {args.type!r}; choose one of {', '.join(TYPES)}", EXIT_USAGE)
    gguf_card = None
    if args.gguf:
        gguf_card = (args.gguf[:-5] if args.gguf.endswith(".gguf") else args.gguf) + ".README.md"
    try:
        if args.hf:
            check_output_dir(args.hf, args.force)
        if args.gguf and os.path.exists(args.gguf) and not args.force:
            raise ExportError(f"{args.gguf} already exists; pass --force to replace it")
        if os.path.isfile(os.path.join(args.checkpoint, "quantized.json")):
            raise CommandError(f"{args.checkpoint} is a quantized run (tinygrad-llm quantize); export the float run it "
                               f"was made from (--gguf --type q8_0 / q4_0 writes the same blocks)")
        model, state = load_checkpoint(args.checkpoint, which="best" if args.best else "latest")
        tokenizer = run_tokenizer(state, state["directory"], args.tokenizer)
        if args.gguf:
            gguf_vocabulary(tokenizer, model.config.vocab_size)          # refuse before anything is written
        run_dir = os.path.dirname(os.path.dirname(os.path.abspath(state["directory"])))
        name = args.name or os.path.basename(run_dir)
        facts = run_facts(state["directory"], state)
        formats = (["hf"] if args.hf else []) + ([f"gguf-{args.type}"] if args.gguf else [])
        card = model_card(facts, model, tokenizer, formats, args.license, name)
        if args.hf:
            config = export_hf(model, tokenizer, args.hf, card=card, force=args.force)
            print(f"wrote {args.hf}: config.json, model.safetensors, tokenizer.json, tokenizer_config.json, "
                  f"special_tokens_map.json, generation_config.json, README.md ({config['num_hidden_layers']} layers, "
                  f"vocab {config['vocab_size']})")
        if args.gguf:
            result = export_gguf(model, tokenizer, args.gguf, args.type, name=name, force=True, license_id=args.license)
            from .checkpoint import atomic_write_bytes
            atomic_write_bytes(gguf_card, card.encode("utf-8"))
            print(f"wrote {args.gguf} ({args.type}, {len(result['tensors'])} tensors, {os.path.getsize(args.gguf):,} "
                  f"bytes, pre-tokenizer {result['pre']}) and {gguf_card}")
    except ExportError as error:
        raise CommandError(str(error)) from None
    return 0


# ---------------------------------------------------------------------------------------------- import
@_one_line_errors
def run_import(args) -> int:
    from .checkpoint import atomic_write_json, save_checkpoint
    from .data.shards import CharVocab
    from .export import ExportError, check_output_dir, import_hf
    if os.path.isdir(os.path.join(args.out_dir, "checkpoints")):
        raise CommandError(f"{args.out_dir} already holds a run (checkpoints/); import into a new directory")
    try:
        check_output_dir(args.out_dir, args.force)
        model, tokenizer, info = import_hf(args.hf_dir)
    except ExportError as error:
        raise CommandError(str(error)) from None
    os.makedirs(args.out_dir, exist_ok=True)
    if isinstance(tokenizer, CharVocab):
        ref = {"type": "char", "chars": "".join(tokenizer.chars), "special_tokens": list(tokenizer.special_tokens)}
    else:
        path = os.path.join(args.out_dir, "tokenizer.json")
        tokenizer.save(path)
        ref = {"type": "file", "path": os.path.abspath(path), "run_file": "tokenizer.json", "sha256": _sha256(path)}
    source = os.path.abspath(args.hf_dir)
    atomic_write_json(os.path.join(args.out_dir, "config.json"),
                      {"model_config": model.config.to_dict(), "tokenizer": ref, "imported_from": source})
    directory = save_checkpoint(os.path.join(args.out_dir, "checkpoints"), 0, model,
                                state={"model_config": model.config.to_dict(), "tokenizer": ref,
                                       "imported_from": source, "hf_config": info["config"],
                                       # eval's windows: the whole context (no training data to go by)
                                       "train_config": {"seq_len": model.config.max_seq_len}}, keep_last=1)
    print(f"imported {args.hf_dir} into {directory} ({model.num_parameters():,} parameters, vocab "
          f"{model.config.vocab_size}); try: tinygrad-llm sample {args.out_dir} --prompt 'Hello'")
    return 0
