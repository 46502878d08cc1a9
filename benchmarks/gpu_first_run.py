"""Where a GPU run's first start goes: `tinygrad-llm train` with a timeline of compiles and steps.

    python3 benchmarks/gpu_first_run.py --cold -- train --data input.txt --device cuda --precision bf16 \\
        --max-steps 4 --eval-interval 4 --eval-iters 2 --no-progress

Runs the CLI in this process and prints, with seconds since start:
- every module CuPy compiles for itself (element-wise kernels, reductions), its kernel names and the last
  frames of tinygrad_llm that asked for it;
- every wait of ours for a kernel module (`gpu.compiler.load_module` taking more than 20 ms: compiling, or
  waiting for a prefetch thread);
- the time of the first steps of the device training step (`DeviceStep`) and whether each was a replay.

--cold empties every cache first (ours, CuPy's, the driver's: NVRTC on CUDA 13 keeps compiled code there
too) by pointing them at a new temporary folder. It wraps two functions of CuPy's that are not public API
(`cupy.cuda.compiler._compile_module_with_cache`); where they are missing it says so and times the steps
only. Needs a GPU and CuPy; tinygrad_llm's package never imports this.
"""
from __future__ import annotations

import os
import re
import sys
import tempfile
import time
import traceback

START = time.perf_counter()


def stamp() -> str:
    return f"{time.perf_counter() - START:7.2f} s"


def frames() -> list:
    return [f"{f.filename.split('tinygrad_llm/')[-1]}:{f.lineno}" for f in traceback.extract_stack()
            if "tinygrad_llm/" in f.filename][-3:]


def main(argv) -> int:
    if "--" not in argv:
        print("usage: python3 benchmarks/gpu_first_run.py [--cold] -- TINYGRAD-LLM-ARGUMENTS", file=sys.stderr)
        return 2
    split = argv.index("--")
    options, cli_args = argv[:split], argv[split + 1:]
    if "--cold" in options:
        folder = tempfile.mkdtemp(prefix="first_run_")
        for name, sub in (("TINYGRAD_LLM_CACHE", "ours"), ("CUPY_CACHE_DIR", "cupy"), ("CUDA_CACHE_PATH", "nv")):
            os.environ[name] = os.path.join(folder, sub)
    os.environ.setdefault("TINYGRAD_LLM_REEXEC", "0")      # stay in this process, so the wrappers see the run
    import cupy.cuda.compiler as cupy_compiler
    totals = [0.0, 0]
    original = getattr(cupy_compiler, "_compile_module_with_cache", None)
    if original is None:
        print("this CuPy has no _compile_module_with_cache: its compiles are not timed")
    else:
        def compile_module(*args, **kwargs):
            began = time.perf_counter()
            result = original(*args, **kwargs)
            took = time.perf_counter() - began
            if took > 0.02:                                 # a compile, not a hit in CuPy's caches
                totals[0] += took
                totals[1] += 1
                source = args[0] if args and isinstance(args[0], str) else ""
                names = re.findall(r"__global__ void (\w+)", source)[:2]
                print(f"{stamp()}  CuPy compiled {names} in {took:.2f} s, for {frames()}", flush=True)
            return result
        cupy_compiler._compile_module_with_cache = compile_module

    from tinygrad_llm import cli, device_step
    from tinygrad_llm.gpu import compiler
    load_module = compiler.load_module

    def timed_load(*args, **kwargs):
        began = time.perf_counter()
        module = load_module(*args, **kwargs)
        took = time.perf_counter() - began
        if took > 0.02:
            print(f"{stamp()}  waited {took:.2f} s for our module {args[0]} {tuple(args[1:])}", flush=True)
        return module
    compiler.load_module = timed_load

    step_call = device_step.DeviceStep.__call__

    def timed_step(self, batches, step):
        began = time.perf_counter()
        result = step_call(self, batches, step)
        if step < 4:
            print(f"{stamp()}  step {step}: {time.perf_counter() - began:.3f} s "
                  f"({'replayed' if self.captured else 'not captured'})", flush=True)
        return result
    device_step.DeviceStep.__call__ = timed_step

    try:
        return cli.main(cli_args)
    finally:
        print(f"{stamp()}  CuPy compiled {totals[1]} modules, {totals[0]:.2f} s in all", flush=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
