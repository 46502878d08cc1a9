"""`tinygrad-llm serve`: the OpenAI-compatible server's command line (the server is tinygrad_llm.serve).

    tinygrad-llm serve runs/default                                   # http://127.0.0.1:8000, loopback only
    tinygrad-llm serve runs/default --host 0.0.0.0 --api-key "$KEY"   # reachable from elsewhere: a key is required
    tinygrad-llm serve runs/default --max-batch 32 --safety policy.toml --device cuda
    tinygrad-llm serve runs/default --quant q8_0                      # weights quantized in memory at start
    tinygrad-llm serve runs/default-q4_0                              # a run written by `tinygrad-llm quantize`

cli.py wires it in with `add_parsers(subparsers)` and dispatches to `run_serve(args, load)`, handing over
its checkpoint loader (`load(path, best, device, tokenizer_file) -> (model, state, tokenizer)`, the one
`sample` uses), so that this module never imports cli.py back. Without an API
key the server refuses any host but a loopback address. The key can also come from the environment
variable TINYGRAD_LLM_API_KEY (then it is not visible in the process list).
"""
from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys

API_KEY_ENV = "TINYGRAD_LLM_API_KEY"
EXIT_USAGE, EXIT_FAILURE = 2, 1


class ServeError(Exception):
    """A user-facing failure of `serve`: printed as one line, exit status `code`."""

    def __init__(self, message: str, code: int = EXIT_FAILURE):
        super().__init__(message)
        self.code = code


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def add_parsers(subparsers):
    p = subparsers.add_parser("serve", help="serve a checkpoint over an OpenAI-compatible HTTP API (needs [serve])",
                              description="Serve a checkpoint: /v1/completions, /v1/chat/completions, /v1/models, "
                                          "/metrics, /health and a chat page at /.")
    p.add_argument("checkpoint", help="run directory, checkpoints/ directory or step directory")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; any other "
                                                       "needs --api-key)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on /v1/ (or set {API_KEY_ENV})")
    p.add_argument("--max-batch", type=_positive_int, default=8, help="sequences decoded together (KV slots)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot before 429 (default 64)")
    p.add_argument("--quant", default=None, metavar="TYPE", help="quantize the weights at start: q8_0, q4_0 or "
                                                                 "int8 (a `tinygrad-llm quantize` run needs no flag)")
    p.add_argument("--safety", metavar="POLICY.toml", default=None, help="moderation policy (see docs/serving.md)")
    p.add_argument("--model-name", default=None, help="the name in /v1/models (default: the run directory's name)")
    p.add_argument("--max-body-bytes", type=_positive_int, default=1 << 20)
    p.add_argument("--log-prompts", action="store_true", help="put prompt and output text in the access log")
    p.add_argument("--best", action="store_true", help="serve the best checkpoint instead of the latest")
    p.add_argument("--tokenizer", default=None, help="tokenizer file, if the checkpoint's is not found")
    return p


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_model(args, load):
    """(model, state, tokenizer) to serve: the checkpoint as `load` (cli.py's, as `sample` uses) reads it,
    quantized when --quant says so."""
    if not args.quant:
        return load(args.checkpoint, args.best, args.device, args.tokenizer)
    from .generate import model_weights
    from .quant.runs import KINDS, QuantizedModel, quantize_weights
    if args.quant not in KINDS:
        raise ServeError(f"--quant must be one of {', '.join(KINDS)}, got {args.quant!r}", EXIT_USAGE)
    model, state, tokenizer = load(args.checkpoint, args.best, "cpu", args.tokenizer)
    if isinstance(model, QuantizedModel):
        raise ServeError(f"{args.checkpoint} is already a quantized run ({model.kind}); serve it without --quant")
    quantized = QuantizedModel(model.config, args.quant, quantize_weights(model_weights(model), args.quant))
    return quantized.to(device=args.device), dict(state, quantized=args.quant), tokenizer


def run_serve(args, load) -> int:
    try:
        return _serve(args, load)
    except ServeError as error:
        print(f"tinygrad-llm serve: error: {error}", file=sys.stderr)
        return error.code


def _serve(args, load) -> int:
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if not api_key and not is_loopback(args.host):
        raise ServeError(f"refusing to listen on {args.host} without an API key: pass --api-key KEY (or set "
                           f"{API_KEY_ENV}), or keep the default loopback host", EXIT_USAGE)
    if not 0 <= args.port <= 65535:
        raise ServeError(f"--port must be in 0..65535, got {args.port}", EXIT_USAGE)
    if args.max_queue < 0:
        raise ServeError("--max-queue must be >= 0", EXIT_USAGE)
    try:
        import uvicorn
        from .serve.app import create_app
    except ImportError:
        raise ServeError("serve needs starlette, uvicorn and prometheus-client: pip install -e .[serve]") from None
    moderator = None
    if args.safety:
        from .moderation import Moderator
        moderator = Moderator.from_policy(args.safety)
    model, state, tokenizer = load_model(args, load)
    name = args.model_name or os.path.basename(os.path.normpath(os.path.abspath(args.checkpoint)))
    app = create_app(model, tokenizer, name, max_batch=args.max_batch, max_queue=args.max_queue, api_key=api_key,
                     moderator=moderator, max_body_bytes=args.max_body_bytes, log_prompts=args.log_prompts)
    access = logging.getLogger("tinygrad_llm.serve.access")
    if not access.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        access.addHandler(handler)
        access.setLevel(logging.INFO)
        access.propagate = False
    safety = f"moderation policy {args.safety}" if moderator is not None else "no moderation policy"
    auth = "API key required on /v1/" if api_key else "no API key: listening on loopback only"
    weights = f", {state['quantized']} weights" if state.get("quantized") else ""
    print(f"serving {name} (step {state['step']}{weights}, context {model.config.max_seq_len}, "
          f"max batch {args.max_batch}) "
          f"on http://{args.host}:{args.port}; {auth}; {safety}", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0
