"""Decoding attention's compiled loop (ops/fused_cpu.c, decode_attention_f32) of this tree against another
revision's, side by side in one process: both sources built (tinygrad_llm.native), then ABAB rounds of one
decoding step's attention over every layer, 32 rows of a batch, each row's keys at the same position.

    python benchmarks/decode_attention_ab.py --base f30e0fd --rounds 8

Shapes: the default model (4 layers, 4 heads of 32, position 116: the middle of 200 new tokens after a
16-token prompt) and GPT-2 size (12 layers, 12 heads of 64, position 20), or --configs
"layers,heads,dim,position;...". Two cache states: "L3", the same step repeated (its keys and values stay
in the caches as far as they fit), and "memory", a 64 MiB array written between calls (they come from
memory, as in a decoding step whose weights pass through the caches in between). Printed: CPU ms of the
step's attention (min and median of the rounds), this / base, the largest difference between the two
outputs, and the load average. Random keys, values and queries; the cache's rows are the batch's rows.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tinygrad_llm import native  # noqa: E402

SOURCE = "tinygrad_llm/ops/fused_cpu.c"
_P, _I = ctypes.c_void_p, ctypes.c_int64


def load(source: str):
    library = native.build(source, libraries=("-lm",))
    function = library.decode_attention_f32
    function.argtypes = [_P, _I, _P, _I, _P, _I, _P, _P, _P, _P, _P, _P, _P, _P, _P, _I, _I, _I, _I, _I, _I]
    function.restype = None
    return function


def step_arrays(layers: int, heads: int, dim: int, position: int, rows: int = 32) -> dict:
    length, rng = position + 2, np.random.default_rng(0)
    angles = rng.standard_normal((length, dim // 2))
    return {
        "layers": [(rng.standard_normal((rows, heads, length, dim)).astype(np.float32),       # keys (B, H, L, D)
                    rng.standard_normal((rows, heads, length, dim)).astype(np.float32),       # values
                    rng.standard_normal((rows, 3 * heads * dim)).astype(np.float32))          # q‖k‖v (B, 3 H D)
                   for _ in range(layers)],
        "slots": np.arange(rows, dtype=np.int64), "positions": np.full(rows, position, dtype=np.int64),
        "cos": np.cos(angles).astype(np.float32), "sin": np.sin(angles).astype(np.float32),
        "out": np.empty((rows, heads * dim), dtype=np.float32),
        "scratch": np.empty(rows * (heads * dim + length), dtype=np.float32),
        "rows": rows, "heads": heads, "dim": dim, "length": length}


def run_step(function, arrays: dict) -> tuple:
    """(CPU seconds, output of the last layer) for one step's attention over every layer."""
    rows, heads, dim, length = arrays["rows"], arrays["heads"], arrays["dim"], arrays["length"]
    width = heads * dim
    start = time.process_time()
    for k_store, v_store, qkv in arrays["layers"]:
        base = qkv.ctypes.data
        function(base, 3 * width, base + 4 * width, 3 * width, base + 8 * width, 3 * width,
                 arrays["slots"].ctypes.data, arrays["positions"].ctypes.data, arrays["positions"].ctypes.data,
                 arrays["cos"].ctypes.data, arrays["sin"].ctypes.data, k_store.ctypes.data, v_store.ctypes.data,
                 arrays["out"].ctypes.data, arrays["scratch"].ctypes.data, 0, rows, heads, heads, dim, length)
    return time.process_time() - start, arrays["out"].copy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="a git revision whose fused_cpu.c is the baseline")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--configs", default="4,4,32,116;12,12,64,20", help="layers,heads,dim,position;...")
    args = parser.parse_args()
    command = "python benchmarks/decode_attention_ab.py " + " ".join(sys.argv[1:])
    with tempfile.TemporaryDirectory() as folder:
        base_source = os.path.join(folder, "fused_cpu.c")
        with open(base_source, "wb") as handle:
            handle.write(subprocess.run(["git", "-C", ROOT, "show", f"{args.base}:{SOURCE}"], check=True,
                                        capture_output=True).stdout)
        functions = {"base": load(base_source), "this": load(os.path.join(ROOT, SOURCE))}
    print(f"# {command}\n# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average at start "
          f"{os.getloadavg()[0]:.1f}")
    print("| layers | heads × dim | position | caches | base ms (min / median) | this ms (min / median) "
          "| this / base (min) | max difference |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    flush = np.ones(16 << 20, dtype=np.float32)                        # 64 MiB written between calls
    for config in args.configs.split(";"):
        layers, heads, dim, position = (int(value) for value in config.split(","))
        arrays = step_arrays(layers, heads, dim, position)
        for state in ("L3", "memory"):
            times, outputs = {name: [] for name in functions}, {}
            for round_ in range(args.rounds):
                order = list(functions) if round_ % 2 == 0 else list(functions)[::-1]
                for name in order:
                    if state == "memory":
                        flush += 1.0
                    seconds, out = run_step(functions[name], arrays)
                    times[name].append(seconds)
                    outputs.setdefault(name, out)
            difference = float(np.abs(outputs["this"] - outputs["base"]).max())
            base, this = (np.array(times[name]) * 1e3 for name in ("base", "this"))
            print(f"| {layers} | {heads} × {dim} | {position} | {state} | {base.min():.3f} / {np.median(base):.3f} "
                  f"| {this.min():.3f} / {np.median(this):.3f} | {this.min() / base.min():.3f} | {difference:.1e} |")
    print(f"# load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
