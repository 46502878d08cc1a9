"""GPTConfig and GPT: a Llama-style decoder-only transformer.

    ids (B, T) -> embed_tokens -> dropout
               -> N × [ x + dropout(o_proj(attention(rope(q), rope(k), v)))   on rms_norm(x)
                        x + dropout(down_proj(silu(gate_proj(h)) · up_proj(h)))  on rms_norm(x) ]
               -> norm -> lm_head -> logits (B, T, V)

Parameter names and (out, in) weight layouts are those of Hugging Face's `LlamaForCausalLM`, so
`state_dict()` maps one to one onto it (see `tinygrad_llm.export`). RoPE uses the rotate-half pairing
of Llama; attention is grouped-query (`n_kv_heads` key/value heads shared by `n_heads` query heads).

Speed: q, k and v come out of one GEMM against the three weights concatenated along the output axis
(and gate and up out of one GEMM); the separate Hugging Face parameters stay the ones that are stored
and updated, the concatenation is a cheap copy of the weights redone every forward.

Generation uses a `KVCache`: the prompt is run once (prefill), then each new token is one position
that attends to every cached key; RoPE takes the cache length as its position offset.
Simplification: no attention dropout (dropout acts on the embeddings and on each residual branch).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import numpy as np

from . import backend, precision
from . import functional as F
from .backend import array_module
from .gpu import kernel
from .cpu_threads import parallel_items, run_chunked, split, thread_count
from .nn import Dropout, Embedding, Linear, Module, ModuleList, Parameter, RMSNorm, init_normal
from .ops.attention import CausalAttention, grouped_causal_probabilities
from .ops.rope import rope_angles
from .tensor import Function, Tensor


# ---------------------------------------------------------------- fused training ops
# Functions that fold the glue around attention, the MLP, the norms and the output head into one op each,
# so that the packed projections are sliced, rotated and re-laid-out without the zero-filled gradients of
# GetItem and the extra copies of Permute/Reshape, and so that the CPU works in cache-sized chunks
# (optionally on several threads, tinygrad_llm/cpu_threads.py). The composed path (F.rope,
# F.causal_attention, F.swiglu on slices, F.rms_norm, F.linear + F.cross_entropy) is what KV-cached
# generation and return_logits=True use, and the tests check that both agree.

# CPU tuning switches (tests/test_model.py checks that every setting gives the same gradients): keep the
# attention probabilities between forward and backward; use the chunked RMSNorm instead of the engine op.
CPU_KEEP_PROBABILITIES = True
CPU_CHUNKED_NORM = True
ATTENTION_CHUNK_ELEMENTS = 1 << 17   # scores per attention chunk on the CPU (512 KiB of float32)


def _rows_in_chunks(function, rows: int, width: int, xp):
    """function(start, end) over row ranges of about ATTENTION_CHUNK_ELEMENTS elements, threaded on the CPU."""
    if xp is not np:
        return [function(0, rows)]
    return run_chunked(function, rows, max(1, ATTENTION_CHUNK_ELEMENTS // max(1, width)))


def _rotate_into(x, cos, sin, out, xp):
    """out = RoPE(x): (x₁, x₂) -> (x₁ cos − x₂ sin, x₂ cos + x₁ sin), pairs split at D/2. out may be a view."""
    fast = kernel("rope", x)
    if fast is not None:        # one CUDA launch, strided views read and written in place (kernels/rope.cu)
        return fast.rope_forward(x, cos, sin, out=out)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    o1, o2 = out[..., :half], out[..., half:]
    xp.multiply(x1, cos, out=o1)
    o1 -= x2 * sin
    xp.multiply(x2, cos, out=o2)
    o2 += x1 * sin
    return out


class _KeptProbabilityAttention:
    """Causal GQA attention for the CPU that keeps P between forward and backward (the inner half of
    PackedRopeAttention; not a Function of its own). Same math as ops/attention.CausalAttention, whose
    GPU kernel recomputes P to save memory; on the CPU the T×T probabilities of one cache-sized chunk
    are cheap to keep, and keeping them saves the backward a GEMM and three passes over them.

    Forward:  S = q kᵀ/√D + mask;  P = softmax(S)  (ops/attention.grouped_causal_probabilities);  O = P v
    Backward: dv = Pᵀ dO;  dP = dO vᵀ;  dS = P ∘ (dP − rowsum(dO ∘ O));  dq = dS k / √D;  dk = dSᵀ q / √D
    Shapes:   q, O (b, H, T, D), k, v (b, Hkv, T, D); the G = H/Hkv query heads of a group are stacked
              along rows: (b, Hkv, G·T, D), so every product is one batched matmul.
    """

    def forward(self, q, k, v):
        batch, heads, time, head_dim = q.shape
        group = heads // k.shape[1]
        scale = 1.0 / math.sqrt(head_dim)
        q3 = q.reshape(batch, k.shape[1], group * time, head_dim)           # (b, H, T, D) -> (b, Hkv, G·T, D)
        p, _ = grouped_causal_probabilities(q3, k, group, scale, np)     # P (b, Hkv, G·T, T)
        out = p @ v                                                          # (b, Hkv, G·T, D)
        self.saved = (q3, k, v, p, out, q.dtype.type(scale))
        return out.reshape(batch, heads, time, head_dim)

    def backward(self, d_out):
        q3, k, v, p, out, scale = self.saved
        batch, head_dim = q3.shape[0], q3.shape[3]
        d_out3 = d_out.reshape(q3.shape)                                     # (b, H, T, D) -> (b, Hkv, G·T, D)
        dv = (np.ascontiguousarray(d_out3.swapaxes(-1, -2)) @ p).swapaxes(-1, -2)        # (b, Hkv, T, D)
        ds = d_out3 @ np.ascontiguousarray(v.swapaxes(-1, -2))               # dP (b, Hkv, G·T, T)
        ds -= (d_out3 * out).sum(axis=-1, keepdims=True)                     # dP − Δ
        ds *= p                                                              # dS
        dq = ds @ k                                                          # dS k, then / √D
        dq *= scale
        dk = (np.ascontiguousarray(q3.swapaxes(-1, -2)) @ ds).swapaxes(-1, -2)          # (b, Hkv, T, D)
        dk *= scale
        return dq.reshape(batch, -1, k.shape[2], head_dim), dk, dv       # -> (b, H, T, D)

    def free(self):
        self.saved = None


class PackedRopeAttention(Function):
    """RoPE on q and k, causal grouped-query attention, output laid out for o_proj; one op.

    Forward:  q, k, v = the slices of qkv (B, T, H + 2Hkv, D), each as (B, heads, T, D)
              q, k rotated by RoPE (cos, sin tables for positions 0 … T−1)
              O = causal_attention(q, k, v)  (tinygrad_llm.ops.attention, CUDA kernel when available)
              y = O as (B, T, H·D)
    Backward: dO = dy as (B, H, T, D);  dq, dk, dv = CausalAttention.backward(dO)
              RoPE's transpose is the rotation by −angle, so dq_raw = rotate(dq, cos, −sin), same for k
              all three written into one d(qkv) (B, T, H + 2Hkv, D)
    Shapes:   qkv, dqkv: (B, T, H + 2Hkv, D)   y, dy: (B, T, H·D)   cos, sin: (T, D/2)
    Saves:    per batch slice, the inner CausalAttention (q, k, v, O, L);  cos, sin
    On the CPU the batch is split across threads (tinygrad_llm.cpu_threads): batch rows are independent.
    """

    def forward(self, qkv, heads, kv_heads, cos, sin):
        xp = array_module(qkv)
        batch, time, _, head_dim = qkv.shape
        out = xp.empty((batch, time, heads * head_dim), dtype=qkv.dtype)

        def part(bounds):
            start, end = bounds
            chunk = qkv[start:end]                                                   # (b, T, H + 2Hkv, D)
            rows = end - start
            q = xp.empty((rows, heads, time, head_dim), dtype=qkv.dtype)
            k = xp.empty((rows, kv_heads, time, head_dim), dtype=qkv.dtype)
            _rotate_into(chunk[:, :, :heads].transpose(0, 2, 1, 3), cos, sin, q, xp)           # (b, H, T, D)
            _rotate_into(chunk[:, :, heads:heads + kv_heads].transpose(0, 2, 1, 3), cos, sin, k, xp)
            v = xp.ascontiguousarray(chunk[:, :, heads + kv_heads:].transpose(0, 2, 1, 3))     # (b, Hkv, T, D)
            keep = xp is np and CPU_KEEP_PROBABILITIES
            attention = _KeptProbabilityAttention() if keep else CausalAttention()
            o = attention.forward(q, k, v)                                                     # (b, H, T, D)
            out[start:end] = o.transpose(0, 2, 1, 3).reshape(rows, time, heads * head_dim)    # -> (b, T, H·D)
            return bounds, attention

        if xp is np:   # cache-sized chunks of the batch (the T×T scores of one chunk stay in L2), per thread
            per_chunk = max(1, ATTENTION_CHUNK_ELEMENTS // (heads * time * time))
            chunks = split(batch, parts=-(-batch // per_chunk))
            work = [chunks[i::thread_count()] for i in range(min(thread_count(), len(chunks)))]
            parts = [p for group in parallel_items(lambda group: [part(c) for c in group], work) for p in group]
        else:
            parts = [part((0, batch))]
        self.save(parts=parts, cos=cos, sin=sin, heads=heads, kv_heads=kv_heads)
        return out

    def backward(self, dy):
        parts, cos, sin, heads, kv_heads = self.saved
        xp = array_module(dy)
        batch, time, _ = dy.shape
        head_dim = cos.shape[-1] * 2
        dqkv = xp.empty((batch, time, heads + 2 * kv_heads, head_dim), dtype=dy.dtype)    # (B, T, H + 2Hkv, D)

        def part(item):
            (start, end), attention = item
            rows = end - start
            d_out = xp.ascontiguousarray(
                dy[start:end].reshape(rows, time, heads, head_dim).transpose(0, 2, 1, 3))  # (b, H, T, D)
            dq, dk, dv = attention.backward(d_out)
            attention.free()
            target = dqkv[start:end]
            _rotate_into(dq, cos, -sin, target[:, :, :heads].transpose(0, 2, 1, 3), xp)
            _rotate_into(dk, cos, -sin, target[:, :, heads:heads + kv_heads].transpose(0, 2, 1, 3), xp)
            target[:, :, heads + kv_heads:] = dv.transpose(0, 2, 1, 3)

        work = [parts[i::thread_count()] for i in range(min(thread_count(), len(parts)))]
        parallel_items(lambda group: [part(item) for item in group], work)
        return dqkv


class PackedSwiGLU(Function):
    """SwiGLU on the packed gate/up projection.

    Forward:  g, u = gate_up[..., :F], gate_up[..., F:];  s = σ(g);  y = g · s · u
    Backward: du = dy · g · s
              dg = dy · u · s · (1 + g · (1 − s))
              both written into one d(gate_up)
    Shapes:   gate_up, d(gate_up): (..., 2F)   y, dy: (..., F)
    Saves:    gate_up, s
    Rows are split across threads on the CPU.
    """

    def forward(self, gate_up):
        fast = kernel("swiglu_packed", gate_up)
        if fast is not None:        # the CUDA kernel recomputes σ in the backward: nothing but gate_up saved
            self.save(gate_up=gate_up, s=None)
            return fast.swiglu_packed_forward(gate_up)
        xp = array_module(gate_up)
        hidden = gate_up.shape[-1] // 2
        flat = gate_up.reshape(-1, 2 * hidden)                       # (..., 2F) -> (N, 2F)
        s = xp.empty((flat.shape[0], hidden), dtype=gate_up.dtype)
        y = xp.empty_like(s)
        half = gate_up.dtype.type(0.5)

        def part(start, end):
            gate, up = flat[start:end, :hidden], flat[start:end, hidden:]
            sigma = s[start:end]
            xp.multiply(gate, half, out=sigma)                        # σ(g) = ½ (1 + tanh(g/2)), no overflow
            xp.tanh(sigma, out=sigma)
            sigma *= half
            sigma += half
            out = y[start:end]
            xp.multiply(gate, sigma, out=out)
            out *= up

        _rows_in_chunks(part, flat.shape[0], 2 * hidden, xp)
        self.save(gate_up=gate_up, s=s)
        return y.reshape(*gate_up.shape[:-1], hidden)

    def backward(self, dy):
        gate_up, s = self.saved
        if s is None:               # the forward ran the CUDA kernel
            return kernel("swiglu_packed", gate_up).swiglu_packed_backward(dy, gate_up)
        xp = array_module(dy)
        hidden = gate_up.shape[-1] // 2
        flat = gate_up.reshape(-1, 2 * hidden)
        dy = dy.reshape(-1, hidden)
        d_flat = xp.empty(flat.shape, dtype=dy.dtype)

        def part(start, end):
            gate, up, sigma = flat[start:end, :hidden], flat[start:end, hidden:], s[start:end]
            d_gate, d_up, g = d_flat[start:end, :hidden], d_flat[start:end, hidden:], dy[start:end]
            xp.multiply(g, gate, out=d_up)
            d_up *= sigma                                            # du = dy · silu(g)
            t = 1 - sigma
            t *= gate
            t += 1
            t *= sigma                                               # σ(g)(1 + g(1 − σ(g))) = silu'(g)
            t *= up
            xp.multiply(g, t, out=d_gate)                            # dg = dy · u · silu'(g)

        _rows_in_chunks(part, flat.shape[0], 2 * hidden, xp)
        return d_flat.reshape(gate_up.shape)


class HeadCrossEntropy(Function):
    """The output head and the mean next-token cross-entropy in one op (training: no logits kept).

    Forward:  Z = x Wᵀ (N, V);  m = max_v Z;  lse = m + log Σ_v exp(Z − m)
              loss = mean over kept rows of (lse − Z[target])
              and already the gradient G = (softmax(Z) − onehot(target)) / count, in Z's memory
    Backward: dx = dy · G W;   dW = dy · Gᵀ x
    Shapes:   x (B, T, C)   W (V, C)   targets (B, T) ints (ignore_index rows count nowhere)   loss ()
    Saves:    x, W, G
    The softmax rows are split across threads on the CPU; the GEMMs are BLAS's.
    """

    def forward(self, x, weight, targets, ignore_index=-100):
        xp = array_module(x)
        x2 = x.reshape(-1, x.shape[-1])                                   # (B, T, C) -> (N, C)
        targets = xp.asarray(targets).reshape(-1)                         # (B, T) -> (N,)
        if targets.shape[0] != x2.shape[0]:
            raise ValueError(f"targets {targets.shape} do not match {x2.shape[0]} positions")
        vocab = weight.shape[0]
        keep = targets != ignore_index
        if bool(((targets < 0) | (targets >= vocab))[keep].any()):
            raise IndexError(f"cross_entropy: a target is outside the vocabulary [0, {vocab})")
        count = int(keep.sum())
        grad = x2 @ weight.T                                              # logits Z (N, V), becomes G
        scale = grad.dtype.type(1.0 / max(count, 1))

        def part(start, end):
            z = grad[start:end]
            t = xp.where(keep[start:end], targets[start:end], 0)
            rows = xp.arange(end - start)
            picked = z[rows, t].astype(xp.float64)
            row_max = z.max(axis=1, keepdims=True)
            z -= row_max
            xp.exp(z, out=z)
            row_sum = z.sum(axis=1, keepdims=True)
            lse = row_max[:, 0].astype(xp.float64) + xp.log(row_sum[:, 0].astype(xp.float64))
            loss = float(((lse - picked) * keep[start:end]).sum())
            z *= (keep[start:end, None] * scale) / row_sum                 # softmax / count on kept rows
            z[rows, t] -= keep[start:end] * scale                          # − onehot / count
            return loss

        losses = _rows_in_chunks(part, grad.shape[0], vocab, xp)
        self.save(x=x, weight=weight, grad=grad)
        loss = sum(losses) / count if count else float("nan")
        return xp.asarray(loss, dtype=grad.dtype)                         # float32 even for bf16 activations

    def backward(self, dy):
        x, weight, grad = self.saved
        scale = dy.astype(grad.dtype)
        if float(scale) != 1.0:
            grad = grad * scale
        x2 = x.reshape(-1, x.shape[-1])
        dx = (grad @ weight).reshape(x.shape).astype(x.dtype, copy=False) if self.needs_input_grad[0] else None
        dweight = (grad.T @ x2).astype(weight.dtype, copy=False) if self.needs_input_grad[1] else None
        return dx, dweight


class ChunkedRMSNorm(Function):
    """RMSNorm for the CPU: the same math as ops/norm.py, in cache-sized row chunks spread over threads.

    Forward:  r = 1/√(mean(x², axis=−1) + eps);  y = x · r · w
    Backward: x̂ = x · r (recomputed);  g = dy · w
              dx = r · (g − x̂ · mean(g · x̂, axis=−1))
              dw = Σ_rows dy · x̂   (per-chunk partial sums added in chunk order: deterministic)
    Shapes:   x, y, dy: (..., C)   w, dw: (C,)   r: (N, 1)
    Saves:    x, r, w
    GPU arrays take F.rms_norm (and its kernel) instead; see `rms_norm` below.
    """

    def forward(self, x, weight, eps=1e-5):
        channels = x.shape[-1]
        x2 = x.reshape(-1, channels)                                    # (..., C) -> (N, C)
        y = np.empty_like(x2)
        r = np.empty((x2.shape[0], 1), dtype=x.dtype)
        inverse_channels = x.dtype.type(1.0 / channels)

        def part(start, end):
            rows = x2[start:end]
            square = rows * rows
            np.sum(square, axis=-1, keepdims=True, out=r[start:end])
            scale = r[start:end]
            scale *= inverse_channels
            scale += x.dtype.type(eps)
            np.sqrt(scale, out=scale)
            np.reciprocal(scale, out=scale)
            out = y[start:end]
            np.multiply(rows, scale, out=out)
            out *= weight

        run_chunked(part, x2.shape[0], max(1, ATTENTION_CHUNK_ELEMENTS // channels))
        self.save(x=x, r=r, weight=weight)
        return y.reshape(x.shape)

    def backward(self, dy):
        x, r, weight = self.saved
        channels = x.shape[-1]
        x2, dy2 = x.reshape(-1, channels), dy.reshape(-1, channels)
        dx = np.empty_like(x2)
        inverse_channels = x.dtype.type(1.0 / channels)

        def part(start, end):
            xhat = x2[start:end] * r[start:end]
            partial_dweight = (dy2[start:end] * xhat).sum(axis=0)
            g = dy2[start:end] * weight                                 # forward was y = x̂·w, so dx̂ = dy·w
            projection = (g * xhat).sum(axis=-1, keepdims=True)
            projection *= inverse_channels
            xhat *= projection
            out = dx[start:end]
            np.subtract(g, xhat, out=out)
            out *= r[start:end]
            return partial_dweight

        partials = run_chunked(part, x2.shape[0], max(1, ATTENTION_CHUNK_ELEMENTS // channels))
        dweight = partials[0]
        for partial in partials[1:]:
            dweight = dweight + partial
        return dx.reshape(x.shape), dweight.astype(weight.dtype, copy=False)


def rms_norm(x, weight, eps):
    """RMSNorm: the chunked, threaded CPU op for NumPy arrays, F.rms_norm (kernel-backed) otherwise."""
    if backend.is_cupy_array(x.data) or not CPU_CHUNKED_NORM:
        return F.rms_norm(x, weight, eps)
    return ChunkedRMSNorm.apply(x, weight, eps=eps)


@dataclass
class GPTConfig:
    vocab_size: int = 65
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 0            # 0 means n_heads (plain multi-head attention)
    ffn_hidden: int = 384
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    dropout: float = 0.0

    def __post_init__(self):
        if not self.n_kv_heads:
            self.n_kv_heads = self.n_heads
        self.validate()

    def validate(self) -> None:
        problems = []
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        if not problems:
            if self.d_model % self.n_heads:
                problems.append(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
            elif (self.d_model // self.n_heads) % 2:
                problems.append(f"head dimension {self.d_model // self.n_heads} must be even for RoPE")
            if self.n_heads % self.n_kv_heads:
                problems.append(f"n_kv_heads {self.n_kv_heads} must divide n_heads {self.n_heads}")
        if not 0.0 <= float(self.dropout) < 1.0:
            problems.append(f"dropout must be in [0, 1), got {self.dropout}")
        if not float(self.rope_theta) > 0 or not float(self.norm_eps) > 0:
            problems.append("rope_theta and norm_eps must be positive")
        if problems:
            raise ValueError("invalid GPTConfig: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "GPTConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown GPTConfig fields: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        return cls(**values)


class KVCache:
    """Keys and values of every layer for positions 0 … length−1, preallocated to `max_len` positions.

    k[i], v[i]: (B, Hkv, max_len, D) arrays of layer i; only [:, :, :length] are valid.
    """

    def __init__(self, config: GPTConfig, batch: int, max_len: int, dtype=np.float32, device="cpu"):
        xp = backend.cupy_module() if backend.normalize_device(device) == "cuda" else np
        shape = (batch, config.n_kv_heads, max_len, config.head_dim)
        self.k = [xp.zeros(shape, dtype=dtype) for _ in range(config.n_layers)]
        self.v = [xp.zeros(shape, dtype=dtype) for _ in range(config.n_layers)]
        self.max_len = max_len
        self.length = 0

    def append(self, layer: int, k, v, start: int):
        """Store the new keys/values (B, Hkv, Tnew, D) at positions start…; return all so far as Tensors."""
        end = start + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {end} were asked for")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return Tensor(self.k[layer][:, :, :end]), Tensor(self.v[layer][:, :, :end])


class Attention(Module):
    def __init__(self, config: GPTConfig, dtype=np.float32):
        super().__init__()
        c, kv = config.d_model, config.n_kv_heads * config.head_dim
        residual_std = 0.02 / math.sqrt(2 * config.n_layers)
        self.q_proj = Linear(c, c, dtype=dtype)
        self.k_proj = Linear(c, kv, dtype=dtype)
        self.v_proj = Linear(c, kv, dtype=dtype)
        self.o_proj = Linear(c, c, std=residual_std, dtype=dtype)
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.rope_theta = config.rope_theta

    def forward(self, x, rope_tables, cache: KVCache | None = None, layer: int = 0, start: int = 0):
        batch, time, channels = x.shape
        heads, kv_heads, head_dim = self.n_heads, self.n_kv_heads, self.head_dim
        weight = F.concatenate([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight], axis=0)
        qkv = F.linear(x, weight)                                          # (B, T, C + 2·Hkv·D)
        qkv = qkv.reshape(batch, time, heads + 2 * kv_heads, head_dim)     # -> (B, T, H + 2Hkv, D)
        if cache is None:   # training and full recomputation: the fused op
            y = PackedRopeAttention.apply(qkv, heads, kv_heads, *rope_tables)         # (B, T, C)
            return F.linear(y, self.o_proj.weight)
        # KV-cached decoding (no gradients): composed from the public ops, keys stored in the cache
        qkv = qkv.permute(0, 2, 1, 3)                                      # -> (B, H + 2Hkv, T, D)
        q = F.rope(qkv[:, :heads], start, self.rope_theta)                 # (B, H, T, D)
        k = F.rope(qkv[:, heads:heads + kv_heads], start, self.rope_theta) # (B, Hkv, T, D)
        v = qkv[:, heads + kv_heads:]                                      # (B, Hkv, T, D)
        k, v = cache.append(layer, k.data, v.data, start)                  # (B, Hkv, start + T, D)
        y = F.causal_attention(q, k, v)                                    # (B, H, T, D)
        y = y.permute(0, 2, 1, 3).reshape(batch, time, channels)           # -> (B, T, H, D) -> (B, T, C)
        return F.linear(y, self.o_proj.weight)


class MLP(Module):
    def __init__(self, config: GPTConfig, dtype=np.float32):
        super().__init__()
        c, hidden = config.d_model, config.ffn_hidden
        self.gate_proj = Linear(c, hidden, dtype=dtype)
        self.up_proj = Linear(c, hidden, dtype=dtype)
        self.down_proj = Linear(hidden, c, std=0.02 / math.sqrt(2 * config.n_layers), dtype=dtype)
        self.hidden = hidden

    def forward(self, x):
        weight = F.concatenate([self.gate_proj.weight, self.up_proj.weight], axis=0)
        gate_up = F.linear(x, weight)                                      # (B, T, 2F)
        return F.linear(PackedSwiGLU.apply(gate_up), self.down_proj.weight)  # (B, T, F) -> (B, T, C)


class DecoderLayer(Module):
    def __init__(self, config: GPTConfig, dtype=np.float32):
        super().__init__()
        self.input_layernorm = RMSNorm(config.d_model, config.norm_eps, dtype=dtype)
        self.self_attn = Attention(config, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(config.d_model, config.norm_eps, dtype=dtype)
        self.mlp = MLP(config, dtype=dtype)
        self.dropout = Dropout(config.dropout)

    def forward(self, x, rope_tables, cache=None, layer=0, start=0):
        attention_norm, mlp_norm = self.input_layernorm, self.post_attention_layernorm
        x = x + _like(self.dropout(self.self_attn(rms_norm(x, attention_norm.weight, attention_norm.eps),
                                                  rope_tables, cache, layer, start)), x)
        return x + _like(self.dropout(self.mlp(rms_norm(x, mlp_norm.weight, mlp_norm.eps))), x)


def _like(branch, x):
    """A branch in the residual's dtype: under a bf16/fp16 policy (tinygrad_llm.precision) the Linears
    return the low dtype while the residual stream stays float32, as in PyTorch's autocast."""
    return branch if branch.dtype == x.dtype else branch.astype(x.dtype)


class LlamaModel(Module):
    """The trunk, named `model` inside GPT as in Hugging Face: embed_tokens, layers, norm."""

    def __init__(self, config: GPTConfig, dtype=np.float32):
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.d_model, dtype=dtype)
        self.layers = ModuleList(DecoderLayer(config, dtype=dtype) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps, dtype=dtype)
        self.dropout = Dropout(config.dropout)


class LMHead(Module):
    def __init__(self, weight: Parameter):
        super().__init__()
        self.weight = weight


class GPT(Module):
    """model(ids) -> logits (B, T, V);  model(ids, targets) -> (logits, mean cross-entropy loss).

    Initialisation (drawn from tinygrad_llm.rng, so `manual_seed` makes it reproducible): every weight
    matrix N(0, 0.02²), except o_proj and down_proj at 0.02/√(2·n_layers); norm gains at 1. With
    tie_embeddings the output head reuses embed_tokens.weight (one Parameter, listed once).
    """

    def __init__(self, config: GPTConfig, dtype=np.float32):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, dtype=dtype)
        if config.tie_embeddings:
            self.lm_head = LMHead(self.model.embed_tokens.weight)
        else:
            self.lm_head = LMHead(init_normal((config.vocab_size, config.d_model), 0.02, dtype))

    def forward(self, ids, targets=None, cache: KVCache | None = None, last_only: bool = False,
                ignore_index: int = -100, return_logits: bool = True):
        """ids (B, T) integers; targets (B, T) integers or None.

        Returns logits (B, T, V), or (logits, loss) with targets. cache: continue from cache.length (and
        extend the cache). last_only: logits of the final position only, (B, 1, V) (what sampling needs).
        return_logits=False (training): (None, loss) from the fused head + cross-entropy op, which never
        materialises a second (B, T, V) array.
        """
        ids = ids.data if isinstance(ids, Tensor) else ids
        ids = np.asarray(ids) if not backend.is_cupy_array(ids) else ids
        if ids.ndim != 2:
            raise ValueError(f"GPT expects ids of shape (B, T), got {tuple(ids.shape)}")
        start = cache.length if cache is not None else 0
        if start + ids.shape[1] > self.config.max_seq_len:
            raise ValueError(f"sequence of {start + ids.shape[1]} positions exceeds max_seq_len "
                             f"{self.config.max_seq_len}; crop the context (generate() keeps the last "
                             f"max_seq_len tokens)")
        trunk = self.model
        x = F.embedding(ids, trunk.embed_tokens.weight)                    # (B, T, C)
        activation_dtype = precision.activation_dtype(x.data)              # bf16/fp16 under a GPU policy
        if activation_dtype != x.dtype:
            x = x.astype(activation_dtype)
        x = trunk.dropout(x)
        rope_tables = None if cache is not None else self._rope_tables(ids.shape[1], x.data)
        for i, layer in enumerate(trunk.layers):
            x = layer(x, rope_tables, cache, i, start)
        if cache is not None:
            cache.length = start + ids.shape[1]
        if last_only:
            x = x[:, -1:]                                                   # (B, T, C) -> (B, 1, C)
        if targets is not None and not return_logits and not backend.is_cupy_array(x.data):
            # (on the GPU the unfused head runs instead: a bf16 policy GEMM and the fused CE kernel)
            targets = targets.data if isinstance(targets, Tensor) else targets
            return None, HeadCrossEntropy.apply(rms_norm(x, trunk.norm.weight, trunk.norm.eps), self.lm_head.weight, targets,
                                                ignore_index=ignore_index)
        logits = F.linear(rms_norm(x, trunk.norm.weight, trunk.norm.eps), self.lm_head.weight)              # (B, T, V)
        if targets is None:
            return logits
        return logits, F.cross_entropy(logits, targets, ignore_index=ignore_index)

    def _rope_tables(self, time: int, like):
        """cos and sin (T, D/2) for positions 0 … T−1 in the dtype and on the device of `like` (memoised)."""
        xp = array_module(like)
        key = (time, like.dtype, backend.device_of(like))
        if getattr(self, "_rope_key", None) != key:
            cos, sin = rope_angles(xp.arange(time), self.config.head_dim, self.config.rope_theta, xp)
            self._rope_cache = (cos.astype(like.dtype), sin.astype(like.dtype))
            self._rope_key = key
        return self._rope_cache

    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        return KVCache(self.config, batch, max_len or self.config.max_seq_len, self.dtype, self.device)
