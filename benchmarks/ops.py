"""Forward and forward+backward time of each fused op on the CPU, at LLM-like shapes, and PyTorch's time for
the same op side by side where PyTorch happens to be installed (it is never a dependency of the project).

    python benchmarks/ops.py                      # B=16 T=128 C=256 H=8 V=4096, float32, markdown table
    python benchmarks/ops.py --repeat 9 --threads 2 --ops rms_norm,causal_attention

Shapes: B batch, T time, C channels, H heads, D = C/H head dim, V vocabulary, F = 4C feed-forward width.
Each figure is the median of --repeat runs after one warm-up, in milliseconds. Like the training loop, the
script raises glibc's malloc thresholds first (backend.tune_host_allocator; --default-allocator skips it),
which affects both libraries in this process alike. Forward+backward means: the
op on leaf tensors that require gradients, then backward with a fixed random upstream gradient (the same
array for both libraries). PyTorch is limited to --threads intra-op threads (torch.set_num_threads) so
that both sides may use the same cores; NumPy's elementwise code is single-threaded, its matmuls use
the BLAS threads (OPENBLAS_NUM_THREADS / OMP_NUM_THREADS, set here to --threads before NumPy is imported).
PyTorch's versions are its idiomatic ones: F.rms_norm, F.silu(g)·u, rotate-half RoPE written in torch,
F.scaled_dot_product_attention(is_causal=True), F.cross_entropy, F.embedding, F.linear, F.dropout, and
compositions of those for the packed forms (swiglu on gate‖up, rope_attention on q‖k‖v, linear_cross_entropy).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--time", type=int, default=128)
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--ops", default="", help="comma-separated subset of the op names")
    parser.add_argument("--no-torch", action="store_true", help="skip PyTorch even where it is installed")
    parser.add_argument("--default-allocator", action="store_true",
                        help="leave glibc's malloc thresholds alone (by default they are raised as train.py does, "
                             "for both libraries, see backend.tune_host_allocator)")
    return parser.parse_args()


ARGS = parse_args()
for variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(variable, str(ARGS.threads))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

import tinygrad_llm.functional as F  # noqa: E402
from tinygrad_llm import backend  # noqa: E402
from tinygrad_llm import Tensor  # noqa: E402
from tinygrad_llm.ops.rope import rope_angles  # noqa: E402

try:
    if ARGS.no_torch:
        raise ImportError
    import torch  # noqa: E402  (optional: only for the side-by-side column)
    import torch.nn.functional as TF  # noqa: E402
    torch.set_num_threads(ARGS.threads)
except ImportError:
    torch = None


def median_ms(fn, repeat):
    fn()                                                     # warm-up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def time_ours(op, arrays, upstream, repeat):
    """(forward ms, forward+backward ms) for a tinygrad_llm op."""
    def forward():
        op(*[Tensor(a) for a in arrays])

    def forward_backward():
        tensors = [Tensor(a, requires_grad=a.dtype.kind == "f") for a in arrays]
        op(*tensors).backward(upstream)

    return median_ms(forward, repeat), median_ms(forward_backward, repeat)


def time_torch(op, arrays, upstream, repeat):
    """(forward ms, forward+backward ms) for the PyTorch version, on the same arrays."""
    sources = [torch.from_numpy(a) for a in arrays]
    grad = torch.from_numpy(np.asarray(upstream))

    def forward():
        with torch.no_grad():
            op(*sources)

    def forward_backward():
        leaves = [s.detach().requires_grad_(s.is_floating_point()) for s in sources]
        op(*leaves).backward(grad)

    return median_ms(forward, repeat), median_ms(forward_backward, repeat)


def torch_rope(cos, sin):
    """Rotate-half RoPE in torch with precomputed (T, D/2) tables: what a Llama implementation does."""
    cos_full = torch.from_numpy(np.concatenate([cos, cos], axis=-1))        # (T, D/2) -> (T, D)
    sin_full = torch.from_numpy(np.concatenate([sin, sin], axis=-1))

    def rope(x):
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos_full + rotated * sin_full

    return rope


def torch_rope_attention(cos, sin, heads):
    """RoPE on the q and k slices of a packed (B, T, 3H, D) projection, then causal SDPA, as (B, T, H·D)."""
    rope = torch_rope(cos, sin)

    def rope_attention(qkv):
        batch, time, _, head_dim = qkv.shape
        q, k, v = (qkv[:, :, i * heads:(i + 1) * heads].transpose(1, 2) for i in range(3))   # 3 × (B, H, T, D)
        out = TF.scaled_dot_product_attention(rope(q), rope(k), v, is_causal=True)
        return out.transpose(1, 2).reshape(batch, time, heads * head_dim)                  # -> (B, T, H·D)

    return rope_attention


def cases(B, T, C, H, V):
    """(name, shape text, arrays, ours(*tensors), torch(*tensors) or None, output shape) per op."""
    rng = np.random.default_rng(0)
    D, FF = C // H, 4 * C

    def normal(*shape, scale=1.0):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    cos, sin = (a.astype(np.float32) for a in rope_angles(np.arange(T), D, 10000.0))
    ids = rng.integers(0, V, size=(B, T))
    targets = rng.integers(0, V, size=(B, T))
    yield ("rms_norm", f"x ({B},{T},{C})", [normal(B, T, C), normal(C) + 1.0],
           lambda x, w: F.rms_norm(x, w),
           lambda x, w: TF.rms_norm(x, (C,), w, eps=1e-5), (B, T, C))
    yield ("swiglu", f"g, u ({B},{T},{FF})", [normal(B, T, FF), normal(B, T, FF)],
           lambda g, u: F.swiglu(g, u), lambda g, u: TF.silu(g) * u, (B, T, FF))
    yield ("rope", f"x ({B},{H},{T},{D})", [normal(B, H, T, D)],
           lambda x: F.rope(x), torch_rope(cos, sin) if torch else None, (B, H, T, D))
    yield ("causal_attention", f"q, k, v ({B},{H},{T},{D})", [normal(B, H, T, D), normal(B, H, T, D), normal(B, H, T, D)],
           lambda q, k, v: F.causal_attention(q, k, v),
           lambda q, k, v: TF.scaled_dot_product_attention(q, k, v, is_causal=True), (B, H, T, D))
    yield ("causal_attention GQA", f"q ({B},{H},{T},{D}), k, v ({B},{H // 4},{T},{D})",
           [normal(B, H, T, D), normal(B, H // 4, T, D), normal(B, H // 4, T, D)],
           lambda q, k, v: F.causal_attention(q, k, v),
           lambda q, k, v: TF.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), (B, H, T, D))
    yield ("cross_entropy", f"logits ({B},{T},{V})", [normal(B, T, V, scale=2.0), targets],
           lambda x, t: F.cross_entropy(x, t),
           lambda x, t: TF.cross_entropy(x.reshape(-1, V), t.reshape(-1)), ())
    yield ("softmax", f"x ({B},{H},{T},{T})", [normal(B, H, T, T)],
           lambda x: F.softmax(x), lambda x: torch.softmax(x, dim=-1), (B, H, T, T))
    yield ("log_softmax", f"x ({B},{T},{V})", [normal(B, T, V)],
           lambda x: F.log_softmax(x), lambda x: torch.log_softmax(x, dim=-1), (B, T, V))
    yield ("silu", f"x ({B},{T},{FF})", [normal(B, T, FF)], lambda x: F.silu(x), lambda x: TF.silu(x), (B, T, FF))
    yield ("gelu", f"x ({B},{T},{FF})", [normal(B, T, FF)],
           lambda x: F.gelu(x), lambda x: TF.gelu(x, approximate="tanh"), (B, T, FF))
    yield ("embedding", f"ids ({B},{T}), W ({V},{C})", [ids, normal(V, C)],
           lambda i, w: F.embedding(i, w), lambda i, w: TF.embedding(i, w), (B, T, C))
    yield ("linear", f"x ({B},{T},{C}), W ({FF},{C})", [normal(B, T, C), normal(FF, C, scale=C ** -0.5)],
           lambda x, w: F.linear(x, w), lambda x, w: TF.linear(x, w), (B, T, FF))
    yield ("dropout p=0.1", f"x ({B},{T},{C})", [normal(B, T, C)],
           lambda x: F.dropout(x, 0.1, seed=0), lambda x: TF.dropout(x, 0.1, training=True), (B, T, C))
    # the packed forms the model trains with
    yield ("swiglu packed", f"gate‖up ({B},{T},{2 * FF})", [normal(B, T, 2 * FF)],
           lambda gate_up: F.swiglu(gate_up), lambda gate_up: TF.silu(gate_up[..., :FF]) * gate_up[..., FF:],
           (B, T, FF))
    yield ("rope_attention", f"qkv ({B},{T},{3 * H},{D})", [normal(B, T, 3 * H, D)],
           lambda qkv: F.rope_attention(qkv, H, H, cos, sin, keep_probabilities=True),
           torch_rope_attention(cos, sin, H) if torch else None, (B, T, C))
    yield ("linear_cross_entropy", f"x ({B},{T},{C}), W ({V},{C})",
           [normal(B, T, C), normal(V, C, scale=C ** -0.5), targets],
           lambda x, w, t: F.linear_cross_entropy(x, w, t),
           lambda x, w, t: TF.cross_entropy(TF.linear(x, w).reshape(-1, V), t.reshape(-1)), ())


def machine_line():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    versions = f"Python {platform.python_version()}, NumPy {np.__version__}"
    if torch is not None:
        versions += f", PyTorch {torch.__version__}"
    return f"{cpu}, {os.cpu_count()} cores, {versions}; threads {ARGS.threads}; load average before the run {load}"


def allocator_line(tuned: bool) -> str:
    return "glibc malloc thresholds raised to 1 GiB (as in training)" if tuned else "default allocator"


def main():
    tuned = False if ARGS.default_allocator else backend.tune_host_allocator()
    wanted = {name.strip() for name in ARGS.ops.split(",") if name.strip()}
    command = "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"Command: `{command}`  ")
    print(f"Machine: {machine_line()}  ")
    print(f"Date: {now}; float32; {allocator_line(tuned)}; median of {ARGS.repeat} runs after one warm-up, "
          "milliseconds\n")
    header = "| op | shape | ours fwd | ours fwd+bwd |"
    rule = "| --- | --- | --- | --- |"
    if torch is not None:
        header += " torch fwd | torch fwd+bwd | ours/torch fwd+bwd |"
        rule += " --- | --- | --- |"
    print(header)
    print(rule, flush=True)
    upstream_rng = np.random.default_rng(1)
    for name, shape, arrays, ours, theirs, out_shape in cases(ARGS.batch, ARGS.time, ARGS.channels, ARGS.heads,
                                                               ARGS.vocab):
        if wanted and name not in wanted and name.split()[0] not in wanted:
            continue
        upstream = upstream_rng.standard_normal(out_shape).astype(np.float32)
        forward, both = time_ours(ours, arrays, upstream, ARGS.repeat)
        row = f"| {name} | {shape} | {forward:.2f} | {both:.2f} |"
        if torch is not None:
            torch_forward, torch_both = time_torch(theirs, arrays, upstream, ARGS.repeat)
            row += f" {torch_forward:.2f} | {torch_both:.2f} | {both / torch_both:.1f}× |"
        print(row, flush=True)
    if torch is None:
        reason = "--no-torch" if ARGS.no_torch else "PyTorch is not installed (pip install torch to add it; never a dependency)"
        print(f"\nNo side-by-side PyTorch column: {reason}.")


if __name__ == "__main__":
    main()
