"""`tinygrad-llm quantize`, and what lets `sample` / `eval` take a quantized run (tinygrad_llm.quant.runs).

    tinygrad-llm quantize runs/default --type q8_0 --out runs/default-q8_0
    tinygrad-llm sample runs/default-q8_0 --prompt "ROMEO:"
    tinygrad-llm eval runs/default-q8_0        # also evaluates the float run it came from: the perplexity change
"""
from __future__ import annotations

import math

from .quant.formats import KINDS


def add_parsers(subparsers) -> None:
    p = subparsers.add_parser("quantize", help="quantize a run's weights (q8_0, q4_0 or int8) for inference",
                              description="Write a quantized copy of a run: sample and eval accept it.")
    p.add_argument("checkpoint", help="run directory, checkpoints/ directory or step directory (float weights)")
    p.add_argument("--type", dest="quant_type", choices=KINDS, required=True,
                   help="q8_0 / q4_0: llama.cpp's 32-weight blocks; int8: one scale per output channel")
    p.add_argument("--out", required=True, help="the new quantized run directory (must not exist, or be empty)")
    p.add_argument("--best", action="store_true", help="quantize the best checkpoint instead of the latest")


def run_quantize(args) -> int:
    from .quant.runs import quantize_run
    info = quantize_run(args.checkpoint, args.quant_type, args.out, which="best" if args.best else "latest")
    print(f"wrote {args.out}: {info['type']}, {info['parameters']:,} parameters in {info['weight_bytes']:,} bytes "
          f"({info['bytes_per_parameter']:.4f} bytes/parameter) from step {info['source']['step']}; try: "
          f"tinygrad-llm sample {args.out}")
    return 0


def load_quantized(path: str, device: str = "cpu", tokenizer_file: str | None = None):
    """(model, state, tokenizer) for a quantized run directory, or None when `path` is not one."""
    from .quant.runs import is_quantized_run, load_quantized_run
    if not is_quantized_run(path):
        return None
    from .checkpoint import tokenizer_from_state
    from .tokenizer import load_tokenizer
    model, info = load_quantized_run(path)
    model.to(device=device)
    state = dict(info, step=info["source"].get("step"), quantized=info["type"])
    # a CharVocab inline, or the run's copy of the file, checked against the sha256 quantize recorded
    tokenizer = load_tokenizer(tokenizer_file) if tokenizer_file else tokenizer_from_state(state, info["directory"])
    return model, state, tokenizer


def compare_with_float(state: dict, result: dict, evaluate_float) -> dict:
    """The float run's perplexity on the same batches and the relative change; `evaluate_float(model)`
    evaluates a model the way the quantized one was. A missing float run is reported, not fatal."""
    from .checkpoint import CheckpointError, load_checkpoint
    source = state["source"]["checkpoint"]
    try:
        model, _ = load_checkpoint(source)
    except CheckpointError as error:
        return {"float_checkpoint": source, "float_comparison": f"unavailable: {error}"}
    reference = evaluate_float(model)
    change = result["val_ppl"] / reference["val_ppl"] - 1.0
    return {"quantization": state["quantized"], "float_checkpoint": source, "float_val_loss": reference["val_loss"],
            "float_val_ppl": reference["val_ppl"], "ppl_change_percent": 100.0 * change,
            "bytes_per_parameter": state.get("bytes_per_parameter", math.nan)}
