"""Time the CUDA kernels of tinygrad_llm.gpu next to PyTorch, a GPT-2-size training step, and attention.

    PYTHONPATH=. python3 benchmarks/gpu.py [--out DIR] [--torch-ref .anchors/torch_ref.py] [--compile]
                                           [--skip-kernels] [--skip-e2e] [--skip-attention] [--steps N]
                                           [--kernels a,b] [--residual both|bf16|fp32] [--host-profile]

Kernels: median of CUDA-event timings (5 back-to-back calls per event pair, 10 warm-up calls), on random normal inputs (never zeros), at the sizes
of the GPT-2-size config (B·T = 16 384 rows, C 768, F 2048, V 50 304, H 12, D 64). "GB/s" counts the
fewest bytes the op must move (each input read once, each output written once) over the time; the
PyTorch column runs the same computation with the same dtypes in eager PyTorch (what torch_ref.py does).
The device-to-device copy rate measured first is the bandwidth ceiling.

End to end: one training step (forward, backward, gradient norm and clipping, AdamW) of the Llama-style
GPT with 12 layers, d 768, 12 heads, ffn 2048, V 50 304, T 1024, B 16 under the bf16 policy (bf16 GEMMs
with float32 accumulation, bf16 activations, float32 master weights and AdamW state); tokens/s,
model FLOP/s utilisation (6·params + 12·L·H·D·T FLOP per token, torch_ref.py's count, over the 989 TFLOP/s
dense bf16 peak of an H100/H200 SXM) and the CuPy pool's peak bytes. Then the host's time to issue forward
and backward (near the step time when the step is host-bound), a synced per-op profile (each op's host
and device time, a sync around it), a device-event profile (an event pair around each op, no syncs: device
time per op class while the host keeps ahead) and, with --host-profile, a cProfile of one step. With
--torch-ref the same config runs through the PyTorch reference (eager, and torch.compile with --compile)
in subprocesses afterwards.

Attention: benchmarks/gpu_attention.py's table, including the head dims with no kernel (32, 96), where
the op runs its batched-GEMM path.

Writes benchmarks.json (every figure) and prints a table last. PyTorch is imported by this script only
(for the comparison columns), never by the package.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tinygrad_llm import backend, gpu, precision  # noqa: E402
from tinygrad_llm.gpu.gemm import gemm  # noqa: E402
from tinygrad_llm.optim import adamw_values  # noqa: E402
from timing import median_ms  # noqa: E402  (benchmarks/timing.py, beside this file)

PEAK_BF16_FLOPS = 989e12
ROWS, CHANNELS, HIDDEN, VOCAB, HEADS, HEAD_DIM, BATCH, TIME = 16384, 768, 2048, 50304, 12, 64, 16, 1024


def _cupy_ms(fn, **options):
    return median_ms(fn, "cupy", **options)


def _torch_ms(fn, **options):
    return median_ms(fn, "torch", **options)


def _torch():
    try:
        import torch
        return torch if torch.cuda.is_available() else None
    except Exception:
        return None


def _bf16():
    return precision.dtype_named("bfloat16")


def _row(name, ms, bytes_moved, torch_ms=None, note=""):
    row = dict(name=name, ms=ms, gbps=bytes_moved / ms / 1e6 if ms else None, bytes=bytes_moved)
    if torch_ms is not None:
        row.update(torch_ms=torch_ms, speedup=torch_ms / ms)
    if note:
        row["note"] = note
    return row


# ------------------------------------------------------------------ kernels
def bench_copy():
    cp = backend.cupy_module()
    source = cp.empty(2 ** 30, dtype=cp.uint8)
    target = cp.empty_like(source)
    ms = _cupy_ms(lambda: target.__setitem__(Ellipsis, source))
    return _row("copy 1 GiB (ceiling)", ms, 2 * 2 ** 30)


def bench_cross_entropy(torch):
    cp = backend.cupy_module()
    rows = []
    rng = cp.random.default_rng(0)
    for dtype_name in ("float32", "bfloat16"):
        dtype = precision.dtype_named(dtype_name)
        logits = rng.standard_normal((ROWS, VOCAB), dtype=cp.float32).astype(dtype)
        targets = rng.integers(0, VOCAB, ROWS).astype(cp.int64)
        bytes_moved = 2 * logits.nbytes
        torch_ms = None
        if torch is not None:
            t_logits = torch.as_tensor(logits.astype(cp.float32), device="cuda").to(
                torch.float32 if dtype_name == "float32" else torch.bfloat16).requires_grad_(True)
            t_targets = torch.as_tensor(targets, device="cuda")

            def torch_step():
                t_logits.grad = None
                torch.nn.functional.cross_entropy(t_logits.float(), t_targets).backward()
            torch_ms = _torch_ms(torch_step)
            del t_logits, t_targets
            torch.cuda.empty_cache()
        ms = _cupy_ms(lambda: gpu.cross_entropy_forward_backward(logits, targets, -100))
        rows.append(_row(f"cross-entropy f+b {ROWS}x{VOCAB} {dtype_name}", ms, bytes_moved, torch_ms))
        scratch = logits.copy()
        ms = _cupy_ms(lambda: gpu.cross_entropy_forward_backward(scratch, targets, -100, in_place=True))
        rows.append(_row(f"cross-entropy f+b {ROWS}x{VOCAB} {dtype_name} default, in place", ms, bytes_moved,
                         torch_ms))
        logits = scratch = None
        cp.get_default_memory_pool().free_all_blocks()
    return rows


def bench_rms_norm(torch):
    cp = backend.cupy_module()
    rows = []
    rng = cp.random.default_rng(1)
    for dtype_name in ("float32", "bfloat16"):
        dtype = precision.dtype_named(dtype_name)
        x = rng.standard_normal((ROWS, CHANNELS), dtype=cp.float32).astype(dtype)
        dy = rng.standard_normal((ROWS, CHANNELS), dtype=cp.float32).astype(dtype)
        weight = (1 + 0.1 * rng.standard_normal(CHANNELS, dtype=cp.float32))

        def ours():
            y, r = gpu.rms_norm_forward(x, weight, 1e-5)
            gpu.rms_norm_backward(dy, x, weight, r)
        ms = _cupy_ms(ours)
        bytes_moved = 5 * x.nbytes                         # fwd: read x, write y; bwd: read dy and x, write dx
        torch_ms = None
        if torch is not None:
            t_dtype = torch.float32 if dtype_name == "float32" else torch.bfloat16
            tx = torch.as_tensor(x.astype(cp.float32), device="cuda").to(t_dtype).requires_grad_(True)
            tdy = torch.as_tensor(dy.astype(cp.float32), device="cuda").to(t_dtype)
            tw = torch.as_tensor(weight, device="cuda").requires_grad_(True)

            def torch_step():
                tx.grad = tw.grad = None
                xf = tx.float()
                y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(t_dtype) * tw
                y.backward(tdy.to(y.dtype))
            torch_ms = _torch_ms(torch_step)
        rows.append(_row(f"rms_norm f+b {ROWS}x{CHANNELS} {dtype_name} (w fp32)", ms, bytes_moved, torch_ms))
    # the residual junction of the float32-residual step: s = x + b (b bf16), y = RMSNorm(s) in bf16
    if not hasattr(gpu, "add_rms_norm_forward"):
        return rows
    x = rng.standard_normal((ROWS, CHANNELS), dtype=cp.float32)
    branch = rng.standard_normal((ROWS, CHANNELS), dtype=cp.float32).astype(_bf16())
    weight = (1 + 0.1 * rng.standard_normal(CHANNELS, dtype=cp.float32))
    dy = rng.standard_normal((ROWS, CHANNELS), dtype=cp.float32).astype(_bf16())
    ms = _cupy_ms(lambda: gpu.add_rms_norm_forward(x, branch, weight, 1e-5, _bf16()))
    rows.append(_row(f"add_rms_norm fwd {ROWS}x{CHANNELS} fp32 + bf16 -> fp32, bf16", ms,
                     x.nbytes + branch.nbytes + x.nbytes + branch.nbytes))
    _, _, r = gpu.add_rms_norm_forward(x, branch, weight, 1e-5, _bf16())
    ms = _cupy_ms(lambda: gpu.rms_norm_backward(dy, x, weight, r))
    rows.append(_row(f"rms_norm bwd {ROWS}x{CHANNELS} fp32 x, bf16 dy", ms, dy.nbytes + 2 * x.nbytes))
    return rows


def bench_attention_layout(torch):
    """The packed attention op (q‖k‖v in, RoPE, the head layouts, out as (B, T, H·D)) forward + backward
    next to its attention kernels alone on ready (B, H, T, D) arrays: the difference is the layout work."""
    cp = backend.cupy_module()
    from tinygrad_llm.ops.attention import CausalAttention
    from tinygrad_llm.ops.rope import rope_angles
    rng = cp.random.default_rng(7)
    dtype = _bf16()
    qkv = rng.standard_normal((BATCH, TIME, 3 * HEADS, HEAD_DIM), dtype=cp.float32).astype(dtype)
    dy = rng.standard_normal((BATCH, TIME, HEADS * HEAD_DIM), dtype=cp.float32).astype(dtype)
    cos, sin = rope_angles(cp.arange(TIME), HEAD_DIM, 10000.0, cp)
    cos, sin = cos.astype(dtype), sin.astype(dtype)

    def packed():
        op = CausalAttention()
        op.needs_input_grad = (True,)
        op.forward(qkv, packed=(HEADS, HEADS, cos, sin))
        op.backward(dy)
    ms = _cupy_ms(packed)
    q, k, v = (cp.ascontiguousarray(qkv[:, :, i * HEADS:(i + 1) * HEADS].transpose(0, 2, 1, 3)) for i in range(3))
    d_out = cp.ascontiguousarray(dy.reshape(BATCH, TIME, HEADS, HEAD_DIM).transpose(0, 2, 1, 3))

    def kernels_only():
        out, lse = gpu.causal_attention_forward(q, k, v)
        gpu.causal_attention_backward(d_out, q, k, v, out, lse)
    kernel_ms = _cupy_ms(kernels_only)
    layout_bytes = 2 * (qkv.nbytes + dy.nbytes) + 2 * (qkv.nbytes + dy.nbytes)      # fwd and bwd: read + write
    return [_row(f"packed rope-attention f+b B{BATCH} H{HEADS} T{TIME} D{HEAD_DIM} bf16", ms, 0),
            _row("  its attention kernels alone (f+b)", kernel_ms, 0),
            _row("  the difference: RoPE and head layouts (GB/s: the fewest bytes)", ms - kernel_ms, layout_bytes)]


def bench_swiglu(torch):
    cp = backend.cupy_module()
    rng = cp.random.default_rng(2)
    dtype = _bf16()
    gate_up = rng.standard_normal((ROWS, 2 * HIDDEN), dtype=cp.float32).astype(dtype)
    dy = rng.standard_normal((ROWS, HIDDEN), dtype=cp.float32).astype(dtype)

    def ours():
        gpu.swiglu_packed_forward(gate_up)
        gpu.swiglu_packed_backward(dy, gate_up)
    ms = _cupy_ms(ours)
    bytes_moved = gate_up.nbytes + dy.nbytes + gate_up.nbytes + dy.nbytes + gate_up.nbytes  # f: r gu, w y; b: r gu, dy, w dgu
    torch_ms = None
    if torch is not None:
        t = torch.as_tensor(gate_up.astype(cp.float32), device="cuda").to(torch.bfloat16).requires_grad_(True)
        tdy = torch.as_tensor(dy.astype(cp.float32), device="cuda").to(torch.bfloat16)

        def torch_step():
            t.grad = None
            g, u = t.chunk(2, -1)
            (torch.nn.functional.silu(g) * u).backward(tdy)
        torch_ms = _torch_ms(torch_step)
    return [_row(f"swiglu (packed) f+b {ROWS}x{HIDDEN} bf16", ms, bytes_moved, torch_ms)]


def bench_rope(torch):
    cp = backend.cupy_module()
    rng = cp.random.default_rng(3)
    dtype = _bf16()
    packed = rng.standard_normal((BATCH, TIME, HEADS, HEAD_DIM), dtype=cp.float32).astype(dtype)
    x = packed.transpose(0, 2, 1, 3)                                  # (B, H, T, D) view, as in the model
    angles = cp.arange(TIME, dtype=cp.float64)[:, None] * cp.arange(HEAD_DIM // 2)[None, :] * 1e-3
    cos, sin = cp.cos(angles).astype(dtype), cp.sin(angles).astype(dtype)
    ms = _cupy_ms(lambda: gpu.rope_forward(x, cos, sin))
    bytes_moved = 2 * packed.nbytes
    torch_ms = None
    if torch is not None:
        tx = torch.as_tensor(packed.astype(cp.float32), device="cuda").to(torch.bfloat16).transpose(1, 2)
        tcos = torch.as_tensor(cp.concatenate([cos, cos], -1).astype(cp.float32), device="cuda").to(torch.bfloat16)
        tsin = torch.as_tensor(cp.concatenate([sin, sin], -1).astype(cp.float32), device="cuda").to(torch.bfloat16)

        def torch_step():
            a, b = tx.chunk(2, -1)
            return tx * tcos + torch.cat([-b, a], -1) * tsin
        torch_ms = _torch_ms(torch_step)
    return [_row(f"rope fwd (B{BATCH} H{HEADS} T{TIME} D{HEAD_DIM}, transposed view) bf16", ms, bytes_moved,
                 torch_ms)]


def bench_embedding(torch):
    cp = backend.cupy_module()
    rng = cp.random.default_rng(4)
    ids = rng.integers(0, VOCAB, ROWS).astype(cp.int64)
    dy = rng.standard_normal((ROWS, CHANNELS), dtype=cp.float32)
    ms = _cupy_ms(lambda: gpu.embedding_backward(ids, dy, VOCAB))
    bytes_moved = dy.nbytes + VOCAB * CHANNELS * 4                      # read dy, write dW (zeroing included)
    torch_ms = None
    if torch is not None:
        weight = torch.randn(VOCAB, CHANNELS, device="cuda", requires_grad=True)
        tids = torch.as_tensor(ids, device="cuda")
        tdy = torch.as_tensor(dy, device="cuda")

        def torch_step():
            weight.grad = None
            torch.nn.functional.embedding(tids, weight).backward(tdy)
        torch_ms = _torch_ms(torch_step)
    return [_row(f"embedding bwd {ROWS} ids, {VOCAB}x{CHANNELS} fp32", ms, bytes_moved, torch_ms)]


def bench_adamw(torch, parameter_count=162_220_800):
    cp = backend.cupy_module()
    rng = cp.random.default_rng(5)
    sizes = [parameter_count - 1000, 1000]                              # two groups, as optim.AdamW keeps them
    params = [rng.standard_normal(n, dtype=cp.float32) for n in sizes]
    grads = [rng.standard_normal(n, dtype=cp.float32) for n in sizes]
    ms_, vs_ = [cp.zeros(n, dtype=cp.float32) for n in sizes], [cp.zeros(n, dtype=cp.float32) for n in sizes]
    step = [0]

    def ours():
        step[0] += 1
        values = adamw_values(3e-4, (0.9, 0.95), step[0])
        gpu.adamw_step(params, grads, ms_, vs_, values, 0.9, 0.95, 1e-8, [0.1, 0.0])
    ms = _cupy_ms(ours)
    bytes_moved = parameter_count * 4 * 7                               # read p, g, m, v; write p, m, v
    torch_ms = None
    if torch is not None:
        tparams = [torch.nn.Parameter(torch.randn(n, device="cuda")) for n in sizes]
        for p in tparams:
            p.grad = torch.randn_like(p)
        optimizer = torch.optim.AdamW([{"params": [tparams[0]], "weight_decay": 0.1},
                                       {"params": [tparams[1]], "weight_decay": 0.0}], lr=3e-4,
                                      betas=(0.9, 0.95), fused=True)
        torch_ms = _torch_ms(optimizer.step)
        del tparams, optimizer
    return [_row(f"adamw step {parameter_count / 1e6:.0f}M params (one launch)", ms, bytes_moved, torch_ms,
                 "torch: AdamW(fused=True)")]


def bench_linear(torch):
    cp = backend.cupy_module()
    rng = cp.random.default_rng(6)
    x = rng.standard_normal((ROWS, CHANNELS), dtype=cp.float32).astype(_bf16())
    weight = rng.standard_normal((3 * CHANNELS, CHANNELS), dtype=cp.float32).astype(_bf16())
    ms = _cupy_ms(lambda: gemm(x, weight, transpose_b=True))
    flops = 2 * ROWS * CHANNELS * 3 * CHANNELS
    torch_ms = None
    if torch is not None:
        tx = torch.as_tensor(x.astype(cp.float32), device="cuda").to(torch.bfloat16)
        tw = torch.as_tensor(weight.astype(cp.float32), device="cuda").to(torch.bfloat16)
        torch_ms = _torch_ms(lambda: tx @ tw.T)
    row = _row(f"gemm x@W^T {ROWS}x{CHANNELS}x{3 * CHANNELS} bf16 (fp32 acc)", ms, 0, torch_ms)
    row["tflops"] = flops / ms / 1e9
    return [row]


# ------------------------------------------------------------------ end to end
def gpt2_config():
    from tinygrad_llm.model import GPTConfig
    return GPTConfig(vocab_size=VOCAB, d_model=CHANNELS, n_layers=12, n_heads=HEADS, ffn_hidden=HIDDEN,
                     max_seq_len=TIME)


def shakespeare_config(attention_dropout=0.2):
    """nanoGPT's shakespeare_char GPU configuration (torch_ref.py's 'shakespeare-char'), B 64, T 256. Its
    dropout 0.2 acts on the embeddings and residual branches and, as torch_ref.py's SDPA dropout_p, on the
    attention probabilities (attention_dropout; --attention-dropout 0 leaves that out)."""
    from tinygrad_llm.model import GPTConfig
    return GPTConfig(vocab_size=65, d_model=384, n_layers=6, n_heads=6, ffn_hidden=1024, max_seq_len=256,
                     dropout=0.2, attention_dropout=attention_dropout)


def host_profile(model, optimizer, ids, targets, top=30):
    """cProfile of one step's host side (the step is host-bound when the host's issue time is close to
    the step time): the `top` functions by own time, as pstats prints them."""
    import cProfile
    import io
    import pstats
    cp = backend.cupy_module()
    profiler = cProfile.Profile()
    cp.cuda.Device().synchronize()
    profiler.enable()
    _, loss = model(ids, targets)
    loss.backward()
    norm = optimizer.gather_grads()
    optimizer.step(grad_scale=min(1.0, 1.0 / (norm + 1e-6)))
    optimizer.zero_grad()
    profiler.disable()
    cp.cuda.Device().synchronize()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(top)
    return text.getvalue()


class _FixedBatch:
    """A batch source giving the same host batch for every index (what DeviceStep asks of the loop's data)."""

    def __init__(self, ids, targets):
        self.ids, self.targets, self.step = ids, targets, 0

    def batch(self, index):
        return self.ids, self.targets


def bench_training(policy_name="bf16", steps=6, warmup=2, shakespeare=False, low_precision_residual=True,
                   profile_host=False, attention_dropout=0.2, step_mode="graph"):
    """tokens/s, MFU and pool peak of full training steps of the GPT-2-size model (or the char model).

    step_mode: "graph" — the training loop's GPU step (tinygrad_llm.device_step.DeviceStep), replayed from a
    CUDA graph; "device" — the same step uncaptured; "loop" — forward, backward, the norm read on the host,
    AdamW (train_step's order, no graph)."""
    cp = backend.cupy_module()
    from types import SimpleNamespace
    from tinygrad_llm import manual_seed
    from tinygrad_llm.device_step import DeviceStep
    from tinygrad_llm.model import GPT
    from tinygrad_llm.optim import AdamW
    pool = cp.get_default_memory_pool()
    pool.free_all_blocks()
    precision.set_policy(policy_name)
    precision.LOW_PRECISION_RESIDUAL = low_precision_residual
    try:
        config = shakespeare_config(attention_dropout) if shakespeare else gpt2_config()
        batch, length = (64, 256) if shakespeare else (BATCH, TIME)
        manual_seed(0)
        model = GPT(config).to("cuda")                      # float32 master weights; GPT casts activations
        params = model.num_parameters()
        optimizer = AdamW(model.named_parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
        rng = np.random.default_rng(0)
        host_ids = rng.integers(0, config.vocab_size, (batch, length))
        host_targets = rng.integers(0, config.vocab_size, (batch, length))
        ids, targets = cp.asarray(host_ids), cp.asarray(host_targets)
        schedule = SimpleNamespace(lr=3e-4, warmup_steps=0, max_steps=10 ** 6, min_lr_ratio=0.1, grad_clip=1.0,
                                   grad_accum=1)
        device_step = DeviceStep(model, optimizer, schedule, config.vocab_size, graphs=step_mode == "graph")
        batches = _FixedBatch(host_ids, host_targets)
        times, losses, host_times = [], [], []
        for i in range(warmup + steps):
            cp.cuda.Device().synchronize()
            start = time.perf_counter()
            if step_mode == "loop":
                _, loss = model(ids, targets)
                loss.backward()
                queued = time.perf_counter()                 # the host has issued forward and backward
                norm = optimizer.gather_grads()
                optimizer.step(grad_scale=min(1.0, 1.0 / (norm + 1e-6)))
                optimizer.zero_grad()
                step_loss = float(loss.item())
            else:
                step_loss = device_step(batches, i)[0]
                queued = time.perf_counter()
            cp.cuda.Device().synchronize()
            end = time.perf_counter()
            if i >= warmup:
                times.append(end - start)
                host_times.append(queued - start)
            losses.append(step_loss)
        step_s = float(np.median(times))
        tokens_per_s = batch * length / step_s
        flops_per_token = 6 * params + 12 * config.n_layers * config.n_heads * config.head_dim * length
        residual = "bf16 residual" if low_precision_residual else "fp32 residual"
        char = f" shakespeare-char, attention dropout {attention_dropout:g}" if shakespeare else ""
        graph_bytes = device_step.graph.pool_bytes() if device_step.graph is not None else 0
        if step_mode == "graph" and device_step.not_captured:
            raise RuntimeError(f"the step was not captured: {device_step.not_captured}")
        result = dict(name=f"ours {policy_name}, {residual}{char}, step {step_mode}",
                      params=params, step_ms=step_s * 1e3, tokens_per_s=tokens_per_s,
                      tflops=tokens_per_s * flops_per_token / 1e12,
                      mfu=tokens_per_s * flops_per_token / PEAK_BF16_FLOPS,
                      peak_pool_gib=(pool.total_bytes() + graph_bytes) / 2 ** 30,
                      losses=losses, host_forward_backward_ms=float(np.median(host_times)) * 1e3)
        result["profile_ms"] = profile_step(model, optimizer, ids, targets)
        result["gpu_profile_ms"] = profile_step(model, optimizer, ids, targets, events=True)
        if profile_host:
            result["host_profile"] = host_profile(model, optimizer, ids, targets)
        return result
    finally:
        precision.set_policy("fp32")
        precision.LOW_PRECISION_RESIDUAL = True
        pool.free_all_blocks()


def profile_step(model, optimizer, ids, targets, events=False):
    """One more step with a device sync around every op's forward and backward: total ms by op class
    (inclusive: an op that calls another op's forward counts it too), plus the optimizer and the rest.

    events=True: no syncs; a CUDA event pair around every op's forward and backward instead, read after
    the step, so each op's figure is the device time between its first launch and its last one ending
    (the stream is serial), without the host's launch overhead and without draining the queue per op."""
    cp = backend.cupy_module()
    if events:
        return _event_profile(model, optimizer, ids, targets)
    totals = {}

    def timed(cls, name, original):
        def run(self, *args, **kwargs):
            cp.cuda.Device().synchronize()
            start = time.perf_counter()
            out = original(self, *args, **kwargs)
            cp.cuda.Device().synchronize()
            key = f"{cls.__name__}.{name}"
            totals[key] = totals.get(key, 0.0) + (time.perf_counter() - start) * 1e3
            return out
        return run

    with _every_op_wrapped(timed):
        cp.cuda.Device().synchronize()
        start = time.perf_counter()
        _, loss = model(ids, targets)
        loss.backward()
        middle = time.perf_counter()
        norm = optimizer.gather_grads()
        gathered = time.perf_counter()
        optimizer.step(grad_scale=min(1.0, 1.0 / (norm + 1e-6)))
        optimizer.zero_grad()
        cp.cuda.Device().synchronize()
        end = time.perf_counter()
    totals["optimizer.gather_grads"] = (gathered - middle) * 1e3
    totals["optimizer.step"] = (end - gathered) * 1e3
    totals["whole step (synced ops)"] = (end - start) * 1e3
    return dict(sorted(totals.items(), key=lambda item: -item[1]))


@contextlib.contextmanager
def _every_op_wrapped(timed):
    """Inside the block, each Function subclass's own forward and backward is timed(cls, name, original);
    the originals come back after it, whatever happened inside."""
    originals = [(cls, name, cls.__dict__[name]) for cls in _function_classes() for name in ("forward", "backward")
                 if name in cls.__dict__]
    for cls, name, original in originals:
        setattr(cls, name, timed(cls, name, original))
    try:
        yield
    finally:
        for cls, name, original in originals:
            setattr(cls, name, original)


def _function_classes():
    from tinygrad_llm.tensor import Function
    classes, pending = [], list(Function.__subclasses__())
    while pending:
        cls = pending.pop()
        classes.append(cls)
        pending.extend(cls.__subclasses__())
    return classes


def _event_profile(model, optimizer, ids, targets):
    cp = backend.cupy_module()
    pairs, depth = [], [0]

    def timed(cls, name, original):
        def run(self, *args, **kwargs):
            if depth[0]:                                   # nested op: its caller's pair covers it
                return original(self, *args, **kwargs)
            start, end = cp.cuda.Event(), cp.cuda.Event()
            start.record()
            depth[0] += 1
            try:
                out = original(self, *args, **kwargs)
            finally:
                depth[0] -= 1
            end.record()
            pairs.append((f"{cls.__name__}.{name}", start, end))
            return out
        return run

    with _every_op_wrapped(timed):
        cp.cuda.Device().synchronize()
        marks = [cp.cuda.Event() for _ in range(4)]
        marks[0].record()
        _, loss = model(ids, targets)
        loss.backward()
        marks[1].record()
        norm = optimizer.gather_grads()
        marks[2].record()
        optimizer.step(grad_scale=min(1.0, 1.0 / (norm + 1e-6)))
        optimizer.zero_grad()
        marks[3].record()
        cp.cuda.Device().synchronize()
    totals = {}
    for key, start, end in pairs:
        totals[key] = totals.get(key, 0.0) + cp.cuda.get_elapsed_time(start, end)
    totals["ops (sum)"] = sum(cp.cuda.get_elapsed_time(s, e) for _, s, e in pairs)
    totals["forward+backward"] = cp.cuda.get_elapsed_time(marks[0], marks[1])
    totals["optimizer.gather_grads"] = cp.cuda.get_elapsed_time(marks[1], marks[2])
    totals["optimizer.step"] = cp.cuda.get_elapsed_time(marks[2], marks[3])
    totals["whole step (device)"] = cp.cuda.get_elapsed_time(marks[0], marks[3])
    return dict(sorted(totals.items(), key=lambda item: -item[1]))


def bench_torch_reference(path, compile_too):
    results = []
    for extra in ([], ["--compile"]) if compile_too else ([],):
        command = [sys.executable, path, "throughput", "--config", "gpt2-124m", "--device", "cuda",
                   "--dtype", "bf16", "--steps", "10", "--warmup", "3", *extra]
        done = subprocess.run(command, capture_output=True, text=True, timeout=400)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if not lines:
            results.append(dict(name="torch_ref " + " ".join(extra), error=done.stderr[-2000:]))
            continue
        result = json.loads(lines[-1])
        result["name"] = "torch_ref bf16 " + ("compile" if extra else "eager")
        result["mfu"] = result["tflops"] * 1e12 / PEAK_BF16_FLOPS
        results.append(result)
    return results


# ------------------------------------------------------------------ main
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--torch-ref", default=None, help="path of torch_ref.py for the PyTorch end-to-end rows")
    parser.add_argument("--compile", action="store_true", help="also run torch_ref with torch.compile")
    parser.add_argument("--skip-kernels", action="store_true")
    parser.add_argument("--skip-e2e", action="store_true")
    parser.add_argument("--skip-attention", action="store_true")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--kernels", default=None,
                        help="comma-separated kernel rows to time (copy, cross_entropy, rms_norm, swiglu, rope, "
                             "embedding, adamw, linear, attention_layout); all by default")
    parser.add_argument("--host-profile", action="store_true", help="print a cProfile of one step's host side")
    parser.add_argument("--residual", choices=("both", "bf16", "fp32"), default="both",
                        help="which residual dtype(s) the training step runs with")
    parser.add_argument("--shakespeare", action="store_true", help="also time the char model's training step")
    parser.add_argument("--step-modes", default="graph",
                        help="comma-separated training steps to time: graph (the loop's GPU step, replayed from a "
                             "CUDA graph), device (the same, uncaptured), loop (the host-synced step)")
    parser.add_argument("--attention-dropout", type=float, default=0.2,
                        help="the char model's attention dropout (torch_ref.py's shakespeare-char: 0.2, its dropout)")
    args = parser.parse_args(argv)
    cp = backend.cupy_module()
    torch = _torch()
    report = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
                  device=cp.cuda.runtime.getDeviceProperties(0)["name"].decode(), cupy=cp.__version__,
                  torch=getattr(torch, "__version__", None), kernels=[], training=[], errors=[])

    def attempt(name, fn, into):
        try:
            result = fn()
            into.extend(result if isinstance(result, list) else [result])
        except Exception:
            report["errors"].append(f"{name}: {traceback.format_exc()[-1500:]}")
            print(f"[{name}] failed:\n{traceback.format_exc()[-1500:]}", flush=True)

    chosen = None if args.kernels is None else set(args.kernels.split(","))
    if not args.skip_kernels:
        if chosen is None or "copy" in chosen:
            attempt("copy", bench_copy, report["kernels"])
        for name, fn in (("cross_entropy", bench_cross_entropy), ("rms_norm", bench_rms_norm),
                         ("swiglu", bench_swiglu), ("rope", bench_rope), ("embedding", bench_embedding),
                         ("adamw", bench_adamw), ("linear", bench_linear),
                         ("attention_layout", bench_attention_layout)):
            if chosen is not None and name not in chosen:
                continue
            attempt(name, lambda fn=fn: fn(torch), report["kernels"])
            if torch is not None:
                torch.cuda.empty_cache()
            cp.get_default_memory_pool().free_all_blocks()
    modes = args.step_modes.split(",")
    for mode in modes:
        if not args.skip_e2e and args.residual in ("both", "bf16"):
            attempt(f"training bf16, step {mode}",
                    lambda: bench_training("bf16", args.steps, profile_host=args.host_profile, step_mode=mode),
                    report["training"])
        if not args.skip_e2e and args.residual in ("both", "fp32"):
            attempt(f"training bf16, fp32 residual, step {mode}",
                    lambda: bench_training("bf16", args.steps, low_precision_residual=False,
                                           profile_host=args.host_profile, step_mode=mode),
                    report["training"])
        if args.shakespeare:
            attempt(f"training shakespeare, step {mode}",
                    lambda: bench_training("bf16", 20, 5, shakespeare=True, attention_dropout=args.attention_dropout,
                                           step_mode=mode),
                    report["training"])
    if not args.skip_attention and (Path(__file__).parent / "gpu_attention.py").is_file():
        sys.path.insert(0, str(Path(__file__).parent))
        try:
            import gpu_attention as attention_benchmark
            report["attention"] = attention_benchmark.run()
        except Exception:
            report["errors"].append(f"attention: {traceback.format_exc()[-1500:]}")
    if args.torch_ref:
        if torch is not None:
            torch.cuda.empty_cache()
        cp.get_default_memory_pool().free_all_blocks()
        attempt("torch_ref", lambda: bench_torch_reference(args.torch_ref, args.compile), report["training"])

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmarks.json").write_text(json.dumps(report, indent=1, default=float))
    print(f"\n{report['device']}  {report['date']}  cupy {report['cupy']}  torch {report['torch']}")
    print(f"{'kernel':<62} {'ms':>8} {'GB/s':>7} {'torch ms':>9} {'x torch':>7}")
    for row in report["kernels"]:
        gbps = f"{row['gbps']:7.0f}" if row.get("gbps") else f"{row.get('tflops', 0):5.0f}TF"
        torch_part = f"{row['torch_ms']:9.3f} {row['speedup']:7.2f}" if "torch_ms" in row else ""
        print(f"{row['name']:<62} {row['ms']:8.3f} {gbps:>7} {torch_part}")
    for row in report["training"]:
        if "error" in row:
            print(f"{row['name']}: error {row['error'][-300:]}")
            continue
        peak = row.get("peak_pool_gib", row.get("peak_mem_gib", float("nan")))
        print(f"{row['name']:<40} {row['step_ms']:8.1f} ms/step {row['tokens_per_s']:10.0f} tok/s "
              f"MFU {row['mfu']:.3f}  peak {peak:.1f} GiB")
        if "host_forward_backward_ms" in row:
            print(f"  host time to issue forward+backward: {row['host_forward_backward_ms']:.1f} ms")
        if "profile_ms" in row:
            print("  synced profile (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in list(row["profile_ms"].items())[:16]))
        if "host_profile" in row:
            print(row["host_profile"][-6000:])
        if "gpu_profile_ms" in row:
            print("  device-event profile (ms): " + ", ".join(f"{k} {v:.2f}"
                                                           for k, v in list(row["gpu_profile_ms"].items())[:22]))
    if report["errors"]:
        print(f"{len(report['errors'])} section(s) failed; see benchmarks.json")
    return report


if __name__ == "__main__":
    main()
