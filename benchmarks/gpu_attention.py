"""Time the attention paths of the GPU next to PyTorch's SDPA, same run.

    PYTHONPATH=. python3 benchmarks/gpu_attention.py [--first N]  # a table (--first N: the first N shapes)
    PYTHONPATH=. python3 benchmarks/gpu_attention.py --dropout 0.1   # attention dropout on both sides
    PYTHONPATH=. python3 benchmarks/gpu_attention.py --d128 [--rounds N]  # head dim 128: wgmma vs mma.sync
    PYTHONPATH=. python3 benchmarks/gpu_attention.py --check         # relative errors of every build, no timing
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
`--d128`: the head-dim-128 shapes (D128_SHAPES), each timed with the wgmma builds and with the mma.sync
builds (TINYGRAD_LLM_ATTENTION_WGMMA=64) one after the other, SDPA once per shape; `--rounds N` repeats
the whole table N times and then prints the worst round of each row (the largest forward+backward time).
`--check`: out, lse, dq, dk, dv of every bf16 build (wgmma and mma.sync, head dims 64 and 128) against the
float64 NumPy op on small shapes (T = 1, odd T, Tq < Tk, GQA), a table of relative errors (bound 1e-2).
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
    (8, 16, 4, 1024, 128, "bfloat16"),      # GQA 4 at head dim 128 (`--first 6`: every row of issue 20's targets)
    (16, 12, 12, 1024, 32, "float16"),      # no kernel: the batched-GEMM path
    (16, 12, 12, 1024, 32, "bfloat16"),
    (8, 16, 16, 1024, 96, "float16"),       # no kernel: the batched-GEMM path
]

D128_SHAPES = [  # issue 20's head-dim-128 shape (SDPA 0.393 ms forward+backward on an H200), fp16, GQA, T 4096
    (8, 16, 16, 1024, 128, "bfloat16"),
    (8, 16, 16, 1024, 128, "float16"),
    (8, 16, 4, 1024, 128, "bfloat16"),
    (2, 16, 16, 4096, 128, "bfloat16"),
]
MMA_SYNC_D128 = "64"        # TINYGRAD_LLM_ATTENTION_WGMMA value that runs head dim 128 on the mma.sync builds


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


@contextlib.contextmanager
def _wgmma_head_dims(value):
    """TINYGRAD_LLM_ATTENTION_WGMMA set to `value` inside the block (None: left as it is)."""
    import os
    from tinygrad_llm.gpu.attention import WGMMA_ENV
    before = os.environ.get(WGMMA_ENV)
    if value is not None:
        os.environ[WGMMA_ENV] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(WGMMA_ENV, None)
        else:
            os.environ[WGMMA_ENV] = before


def run(shapes=SHAPES, dropout=0.0, variants=(None,)):
    """Time every shape; print a table; return one dict per shape and variant. `variants`: values of
    TINYGRAD_LLM_ATTENTION_WGMMA to time each shape under, one row each (None: the environment's own);
    SDPA is timed once per shape."""
    rows = []
    rng = np.random.default_rng(0)
    for shape in shapes:
        batch, heads, kv_heads, time, head_dim, _ = shape
        host = [rng.standard_normal(size, dtype=np.float32) for size in
                ((batch, heads, time, head_dim), (batch, kv_heads, time, head_dim),
                 (batch, kv_heads, time, head_dim), (batch, heads, time, head_dim))]
        reference = None
        for variant in variants:
            with _wgmma_head_dims(variant):
                row, reference = _time_shape(shape, host, dropout, reference)
            rows.append(row)
    _print_table(rows)
    return rows


def _time_shape(shape, host, dropout, reference):
    """One row: our path for `shape` on the host inputs (q, k, v, dy as float32), and SDPA unless
    `reference` already holds its results. Returns (row, SDPA results)."""
    import cupy as cp
    from tinygrad_llm.gpu import attention
    from tinygrad_llm.ops.attention import kernel_dropout
    batch, heads, kv_heads, time, head_dim, dtype_name = shape
    if dtype_name == "bfloat16":
        import ml_dtypes
        dtype = np.dtype(ml_dtypes.bfloat16)
    else:
        dtype = np.dtype(dtype_name)
    q_host, k_host, v_host, dy_host = host
    q, k, v, dy = (cp.asarray(a.astype(dtype)) for a in (q_host, k_host, v_host, dy_host))
    shape = f"B{batch} H{heads} Hkv{kv_heads} T{time} D{head_dim} {dtype_name}"
    path = attention.kernel_for(head_dim, dtype, shape=(batch, heads, time, time))
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
        q = k = v = dy = None
        cp.get_default_memory_pool().free_all_blocks()
        return row, reference
    flops = 4.0 * batch * heads * time * time * head_dim / 2
    row.update(fwd_ms=forward, bwd_ms=backward, fwdbwd_ms=both,
               fwd_tflops=flops / forward / 1e9, fwdbwd_tflops=3.5 * flops / both / 1e9)
    if reference is None:
        reference = _sdpa(batch, heads, kv_heads, time, head_dim, dtype_name, q_host, k_host, v_host, dy_host,
                          dropout) or {}
    ours = np.asarray(out.get(), dtype=np.float32)
    for label, (sdpa_forward, sdpa_both, sdpa_out) in reference.items():
        row.update({f"sdpa_{label}_fwd_ms": sdpa_forward, f"sdpa_{label}_fwdbwd_ms": sdpa_both,
                    f"sdpa_{label}_over_ours_fwdbwd": sdpa_both / both,
                    f"rel_diff_to_sdpa_{label}": float("nan") if dropout else
                    float(np.linalg.norm(ours - sdpa_out) / np.linalg.norm(sdpa_out))})
    q = k = v = dy = out = saved = None
    cp.get_default_memory_pool().free_all_blocks()
    return row, reference


def _print_table(rows):
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


def worst_rounds(rounds):
    """The worst round of each row over several runs of the same table: the round with the largest
    forward+backward time, its SDPA figures from the same round."""
    worst = []
    for same in zip(*rounds):
        timed = [row for row in same if "fwdbwd_ms" in row]
        worst.append(max(timed, key=lambda row: row["fwdbwd_ms"]) if timed else same[0])
    return worst


CHECK_CASES = [  # (batch, heads, kv_heads, query_len, key_len)
    (1, 1, 1, 1, 1), (2, 2, 1, 37, 37), (1, 4, 1, 130, 130), (1, 2, 2, 33, 200), (1, 4, 2, 1, 77), (2, 4, 4, 300, 300),
]


def check():
    """Relative errors (out, lse, dq, dk, dv) of every bf16 build against the float64 NumPy op; returns the
    worst error and prints a table. Each build's kernels run on fresh random inputs."""
    import cupy as cp
    import ml_dtypes

    from tinygrad_llm.gpu import attention
    from tinygrad_llm.ops.attention import CausalAttention
    rng = np.random.default_rng(0)
    dtype = np.dtype(ml_dtypes.bfloat16)
    hopper = attention.hopper_available()
    paths = [(64, hopper and "64,128"), (64, "none"), (128, hopper and "64,128"), (128, "none")]
    print(f"{'head dim':>8} {'build':>30} {'case B H Hkv Tq Tk':>20} {'out':>8} {'lse':>8} {'dq':>8} {'dk':>8} {'dv':>8}")
    worst = 0.0
    for head_dim, variant in paths:
        if not variant:
            continue
        with _wgmma_head_dims(variant):
            build = attention.kernel_for(head_dim, dtype)
            for batch, heads, kv_heads, query_len, key_len in CHECK_CASES:
                case = f"{batch} {heads} {kv_heads} {query_len} {key_len}"
                shapes = [(batch, heads, query_len, head_dim), (batch, kv_heads, key_len, head_dim),
                          (batch, kv_heads, key_len, head_dim), (batch, heads, query_len, head_dim)]
                q, k, v, dy = (rng.standard_normal(s).astype(np.float32).astype(dtype) for s in shapes)
                op = CausalAttention()
                want = [op.forward(*(a.astype(np.float64) for a in (q, k, v)))]
                want.append(op.saved[5].reshape(q.shape[:3]))
                want += list(op.backward(dy.astype(np.float64)))
                try:
                    out, lse = attention.causal_attention_forward(*(cp.asarray(a) for a in (q, k, v)))
                    grads = attention.causal_attention_backward(*(cp.asarray(a) for a in (dy, q, k, v)), out, lse)
                    got = [np.asarray(cp.asnumpy(a), dtype=np.float64) for a in (out, lse) + tuple(grads)]
                except Exception as error:
                    print(f"{head_dim:>8} {build:>30} {case:>20} failed: {type(error).__name__}: {error}"[:200])
                    worst = float("inf")
                    continue
                errors = [np.linalg.norm(g - w) / max(np.linalg.norm(w), 1e-3 * np.sqrt(w.size))
                          if np.isfinite(g).all() else float("inf") for g, w in zip(got, want)]
                worst = max(worst, *errors)
                print(f"{head_dim:>8} {build:>30} {case:>20} " + " ".join(f"{e:8.1e}" for e in errors))
    print(f"worst relative error {worst:.1e} ({'within' if worst <= 1e-2 else 'OVER'} the 1e-2 bound)")
    sys.stdout.flush()
    return worst


if __name__ == "__main__":
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tinygrad_llm import backend
    if not backend.gpu_available():
        sys.exit("benchmarks/gpu_attention.py needs an NVIDIA GPU with CuPy; none is usable here")
    def option(name, default, kind):
        return kind(sys.argv[sys.argv.index(name) + 1]) if name in sys.argv else default
    if "--check" in sys.argv:
        sys.exit(0 if check() <= 1e-2 else 1)
    dropout = option("--dropout", 0.0, float)
    if "--d128" in sys.argv:
        rounds = [run(D128_SHAPES, dropout=dropout, variants=(None, MMA_SYNC_D128))
                  for _ in range(option("--rounds", 1, int))]
        if len(rounds) > 1:
            print(f"worst of {len(rounds)} rounds (largest forward+backward time of each row):")
            _print_table(worst_rounds(rounds))
    else:
        # --first N: only the first N shapes of SHAPES (N = 1: the B16 H12 T1024 D64 bf16 alone)
        run(SHAPES[:option("--first", len(SHAPES), int)], dropout=dropout)
