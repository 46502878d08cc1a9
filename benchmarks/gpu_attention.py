"""Time the attention paths of the GPU next to PyTorch's SDPA, same run.

    PYTHONPATH=. python3 benchmarks/gpu_attention.py [--first N]  # a table (--first N: the first N shapes)
    PYTHONPATH=. python3 benchmarks/gpu_attention.py --dropout 0.1   # attention dropout on both sides
    from benchmarks.gpu_attention import run; rows = run()      # what benchmarks/gpu.py calls

Head dims 64 and 128 run the flash-attention kernels (tinygrad_llm.gpu.attention; the "build" column names
the forward/backward builds). Head dims with no kernel (32, 96) run what the op runs there: the
NumPy-expressed CausalAttention on CuPy arrays, batched GEMMs with the (B, H, T, T) probabilities in
memory; their build column reads "GEMM". A row whose path fails (e.g. a dtype CuPy's matmul does not know)
prints the error instead of times.

Each row: forward and forward+backward times (median over 10 batches of 20 back-to-back calls, CUDA
events, after 30 warm-up calls), TFLOP/s
counting the causal half (forward 4·B·H·T²·D / 2, backward 2.5× that), and, when PyTorch is installed,
torch.nn.functional.scaled_dot_product_attention on the same shapes and dtype, twice: forced to the
flash backend ("flash") and with PyTorch's own choice ("SDPA", which on an H100/H200 may be cuDNN's
attention; the issue's 0.086 / 0.359 ms anchor was taken that way). is_causal=True; for GQA rows SDPA
gets k and v repeated to H heads, i.e. the same arithmetic. "ratio" = SDPA time / ours (above 1: ours wins).
Our forward+backward is what the op runs: forward, then Δ pre-pass + backward + dq cast.
Inputs are random normal (never zeros). Also prints the relative difference of our output to SDPA's.
`--dropout P`: attention dropout on both sides (our kernels' `_dropout` builds with a fixed seed, SDPA's
dropout_p = P); the relative difference is then meaningless (two different masks) and left out.
"""
from __future__ import annotations

import contextlib
import sys

import numpy as np

from timing import median_ms  # benchmarks/timing.py, beside this file

SHAPES = [  # (batch, heads, kv_heads, time, head_dim, dtype)
    (16, 12, 12, 1024, 64, "bfloat16"),     # the GPT-2 small shape: SDPA 0.086 / 0.359 ms on an H200
    (16, 12, 12, 1024, 64, "float16"),
    (16, 12, 4, 1024, 64, "bfloat16"),      # GQA 3
    (8, 16, 16, 1024, 128, "bfloat16"),
    (4, 12, 12, 4096, 64, "bfloat16"),
    (16, 12, 12, 1024, 32, "float16"),      # no kernel: the batched-GEMM path
    (16, 12, 12, 1024, 32, "bfloat16"),
    (8, 16, 16, 1024, 96, "float16"),       # no kernel: the batched-GEMM path
]


def _median_ms(fn):
    """Our kernels: 10 samples of 20 back-to-back calls after 30 warm-up calls (benchmarks/timing.py)."""
    return median_ms(fn, "cupy", repeats=10, inner=20, warmup=30)


def _sdpa(batch, heads, kv_heads, time, head_dim, dtype_name, q_host, k_host, v_host, dy_host, dropout=0.0):
    """{"flash" or "default": (forward ms, forward+backward ms, output as float32 numpy)} of PyTorch SDPA."""
    try:
        import torch
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except Exception:
        return None
    dtype = getattr(torch, dtype_name)
    group = heads // kv_heads
    q = torch.from_numpy(q_host).cuda().to(dtype).requires_grad_(True)
    k = torch.from_numpy(np.repeat(k_host, group, axis=1)).cuda().to(dtype).requires_grad_(True)
    v = torch.from_numpy(np.repeat(v_host, group, axis=1)).cuda().to(dtype).requires_grad_(True)
    dy = torch.from_numpy(dy_host).cuda().to(dtype)
    def sdpa(q, k, v, is_causal):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=is_causal, dropout_p=dropout)

    def timed(fn):
        return median_ms(fn, "torch", repeats=10, inner=20, warmup=30)

    def forward_backward():
        q.grad = k.grad = v.grad = None
        sdpa(q, k, v, is_causal=True).backward(dy)

    results = {}
    for label, backends in (("flash", [SDPBackend.FLASH_ATTENTION]), ("default", None)):
        try:
            context = sdpa_kernel(backends) if backends else contextlib.nullcontext()
            with context:
                with torch.no_grad():
                    forward = timed(lambda: sdpa(q, k, v, is_causal=True))
                    out = sdpa(q, k, v, is_causal=True).float().cpu().numpy()
                results[label] = (forward, timed(forward_backward), out)
        except RuntimeError as error:       # e.g. a backend that refuses these shapes
            print(f"  SDPA {label}: {error}"[:200])
    return results


class _GemmPath:
    """The op's NumPy-expressed path on CuPy arrays, with the launchers' signatures."""

    @staticmethod
    def causal_attention_forward(q, k, v, dropout=None):
        from tinygrad_llm.ops.attention import CausalAttention
        op = CausalAttention()
        out = op.forward(q, k, v, dropout=dropout)                  # the op's (p, seed), or None
        return out, op

    @staticmethod
    def causal_attention_backward(dy, q, k, v, out, op, dropout=None):
        return op.backward(dy)


def run(shapes=SHAPES, dropout=0.0):
    """Time every shape; print a table; return one dict per shape."""
    import cupy as cp
    from tinygrad_llm.gpu import attention
    from tinygrad_llm.ops.attention import kernel_dropout
    rows = []
    rng = np.random.default_rng(0)
    for batch, heads, kv_heads, time, head_dim, dtype_name in shapes:
        if dtype_name == "bfloat16":
            import ml_dtypes
            dtype = np.dtype(ml_dtypes.bfloat16)
        else:
            dtype = np.dtype(dtype_name)
        q_host = rng.standard_normal((batch, heads, time, head_dim), dtype=np.float32)
        k_host = rng.standard_normal((batch, kv_heads, time, head_dim), dtype=np.float32)
        v_host = rng.standard_normal((batch, kv_heads, time, head_dim), dtype=np.float32)
        dy_host = rng.standard_normal((batch, heads, time, head_dim), dtype=np.float32)
        q, k, v, dy = (cp.asarray(a.astype(dtype)) for a in (q_host, k_host, v_host, dy_host))
        shape = f"B{batch} H{heads} Hkv{kv_heads} T{time} D{head_dim} {dtype_name}"
        path = attention.kernel_for(head_dim, dtype)
        launcher = attention if path is not None else _GemmPath
        if dropout and launcher is attention:          # the `_dropout` builds, one fixed seed
            options = dict(dropout=kernel_dropout((1234, 1.0 - dropout), 0))
        elif dropout:                                  # the op's own argument, (p, seed)
            options = dict(dropout=(dropout, 1234))
        else:
            options = {}
        build = path.split(" (")[0].replace("forward ", "").replace(", backward ", "/") if path else "GEMM"
        row = dict(shape=shape, build=build)
        try:
            out, saved = launcher.causal_attention_forward(q, k, v, **options)
            forward = _median_ms(lambda: launcher.causal_attention_forward(q, k, v, **options))

            def forward_backward():
                o, s = launcher.causal_attention_forward(q, k, v, **options)
                launcher.causal_attention_backward(dy, q, k, v, o, s, **options)
            both = _median_ms(forward_backward)
            backward = _median_ms(lambda: launcher.causal_attention_backward(dy, q, k, v, out, saved, **options))
        except Exception as error:          # the path itself fails: report it in the row
            row["error"] = f"{type(error).__name__}: {error}"[:120]
            rows.append(row)
            q = k = v = dy = None
            cp.get_default_memory_pool().free_all_blocks()
            continue
        flops = 4.0 * batch * heads * time * time * head_dim / 2
        row.update(fwd_ms=forward, bwd_ms=backward, fwdbwd_ms=both,
                   fwd_tflops=flops / forward / 1e9, fwdbwd_tflops=3.5 * flops / both / 1e9)
        reference = _sdpa(batch, heads, kv_heads, time, head_dim, dtype_name, q_host, k_host, v_host, dy_host,
                          dropout)
        ours = np.asarray(out.get(), dtype=np.float32)
        for label, (sdpa_forward, sdpa_both, sdpa_out) in (reference or {}).items():
            row.update({f"sdpa_{label}_fwd_ms": sdpa_forward, f"sdpa_{label}_fwdbwd_ms": sdpa_both,
                        f"sdpa_{label}_over_ours_fwdbwd": sdpa_both / both,
                        f"rel_diff_to_sdpa_{label}": float("nan") if dropout else
                        float(np.linalg.norm(ours - sdpa_out) / np.linalg.norm(sdpa_out))})
        rows.append(row)
        q = k = v = dy = out = saved = None
        cp.get_default_memory_pool().free_all_blocks()

    header = (f"{'shape':<36} {'build f/b':>14} {'fwd ms':>7} {'bwd ms':>7} {'f+b ms':>7} {'fwd TF/s':>8} "
              f"{'f+b TF/s':>8} | {'flash fwd':>9} {'flash f+b':>9} {'ratio':>5} | {'SDPA fwd':>8} {'SDPA f+b':>8} "
              f"{'ratio':>5} | {'rel diff':>8}")
    print(header)
    for row in rows:
        if "error" in row:
            print(f"{row['shape']:<36} {row['build']:>14} failed: {row['error']}")
            continue
        line = (f"{row['shape']:<36} {row['build']:>14} {row['fwd_ms']:7.3f} "
                f"{row['bwd_ms']:7.3f} {row['fwdbwd_ms']:7.3f} {row['fwd_tflops']:8.1f} {row['fwdbwd_tflops']:8.1f}")
        for label, width in (("flash", 9), ("default", 8)):
            if f"sdpa_{label}_fwd_ms" in row:
                line += (f" | {row[f'sdpa_{label}_fwd_ms']:{width}.3f} {row[f'sdpa_{label}_fwdbwd_ms']:{width}.3f}"
                         f" {row[f'sdpa_{label}_over_ours_fwdbwd']:5.2f}")
            else:
                line += " | " + " " * (2 * width + 7)
        line += f" | {row.get('rel_diff_to_sdpa_flash', float('nan')):8.1e}"
        print(line)
    sys.stdout.flush()
    return rows


if __name__ == "__main__":
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tinygrad_llm import backend
    if not backend.gpu_available():
        sys.exit("benchmarks/gpu_attention.py needs an NVIDIA GPU with CuPy; none is usable here")
    # --first N: only the first N shapes of SHAPES (N = 1: the B16 H12 T1024 D64 bf16 alone)
    first = int(sys.argv[sys.argv.index("--first") + 1]) if "--first" in sys.argv else len(SHAPES)
    run(SHAPES[:first], dropout=float(sys.argv[sys.argv.index("--dropout") + 1]) if "--dropout" in sys.argv else 0.0)
