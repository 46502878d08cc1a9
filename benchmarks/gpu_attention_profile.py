"""One forward and one backward launch of the flash-attention kernels (B16 H12 T1024 D64 bf16), after a
warm-up pair, for Nsight Compute:

    ncu --clock-control none --kernel-name regex:'attention_(forward|backward)_bf16_d' --launch-skip 2 \
        --launch-count 2 --section SpeedOfLight --section WarpStateStats python3 benchmarks/gpu_attention_profile.py

The backward's side passes beside its main kernel (the Δ / dq-zeroing pre-pass and the dq cast; each
pair of calls launches forward, pre-pass, backward, cast), their durations only:

    ncu --clock-control none --kernel-name regex:'attention_' --launch-skip 4 --launch-count 4 \
        --metrics gpu__time_duration.sum python3 benchmarks/gpu_attention_profile.py

Without Nsight Compute, the same split from CUDA events around each launch, for the benchmark's shapes:

    PYTHONPATH=. python3 benchmarks/gpu_attention_profile.py --launches
"""
import sys

import ml_dtypes
import numpy as np

from tinygrad_llm import backend
from tinygrad_llm.gpu import attention

cp = backend.cupy_module()
rng = np.random.default_rng(0)
q, k, v, dy = (cp.asarray(rng.standard_normal((16, 12, 1024, 64), dtype=np.float32).astype(ml_dtypes.bfloat16))
               for _ in range(4))
for _ in range(2):
    out, lse = attention.causal_attention_forward(q, k, v)
    attention.causal_attention_backward(dy, q, k, v, out, lse)
cp.cuda.Device().synchronize()


def launch_times(shapes=((16, 12, 12, 1024, 64), (16, 12, 4, 1024, 64), (8, 16, 16, 1024, 128),
                         (8, 16, 4, 1024, 128), (4, 12, 12, 4096, 64)), calls=30):
    """Each backward launch of bf16 attention timed alone with CUDA events around it (the Δ / dq-zeroing
    pre-pass, the main kernel, the dq cast), median of `calls` backward calls after 5 warm-up calls; a
    table, one row a shape."""
    events = {}
    launch = attention._kernel

    def timed_kernel(filename, name, *rest):
        function = launch(filename, name, *rest)

        def run(*args, **kwargs):
            start, end = cp.cuda.Event(), cp.cuda.Event()
            start.record()
            function(*args, **kwargs)
            end.record()
            events.setdefault(name, []).append((start, end))
        return run

    attention._kernel = timed_kernel
    try:
        print("| shape | pre-pass (ms) | backward kernel (ms) | dq cast (ms) | sum (ms) |")
        print("| --- | --- | --- | --- | --- |")
        for batch, heads, kv_heads, time, head_dim in shapes:
            q, k, v, dy = (cp.asarray(rng.standard_normal((batch, h, time, head_dim), dtype=np.float32)
                                      .astype(ml_dtypes.bfloat16)) for h in (heads, kv_heads, kv_heads, heads))
            out, lse = attention.causal_attention_forward(q, k, v)
            for _ in range(5):
                attention.causal_attention_backward(dy, q, k, v, out, lse)
            cp.cuda.Device().synchronize()
            events.clear()
            for _ in range(calls):
                attention.causal_attention_backward(dy, q, k, v, out, lse)
            cp.cuda.Device().synchronize()
            medians = {name: float(np.median([cp.cuda.get_elapsed_time(a, b) for a, b in pairs]))
                       for name, pairs in events.items()}
            pre, cast = (next((ms for name, ms in medians.items() if word in name), float("nan"))
                         for word in ("_prepare_", "_convert8_"))
            main = next(ms for name, ms in medians.items() if "_prepare_" not in name and "_convert8_" not in name)
            print(f"| B{batch} H{heads} Hkv{kv_heads} T{time} D{head_dim} | {pre:.4f} | {main:.4f} | {cast:.4f} "
                  f"| {pre + main + cast:.4f} |")
    finally:
        attention._kernel = launch


if __name__ == "__main__" and "--launches" in sys.argv:
    launch_times()
