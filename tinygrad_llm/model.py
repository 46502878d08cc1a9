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

from . import backend
from . import functional as F
from .nn import Dropout, Embedding, Linear, Module, ModuleList, Parameter, RMSNorm, init_normal
from .tensor import Tensor


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

    def forward(self, x, cache: KVCache | None = None, layer: int = 0, start: int = 0):
        batch, time, channels = x.shape
        heads, kv_heads, head_dim = self.n_heads, self.n_kv_heads, self.head_dim
        weight = F.concatenate([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight], axis=0)
        qkv = F.linear(x, weight)                                          # (B, T, C + 2·Hkv·D)
        qkv = qkv.reshape(batch, time, heads + 2 * kv_heads, head_dim)     # -> (B, T, H + 2Hkv, D)
        qkv = qkv.permute(0, 2, 1, 3)                                      # -> (B, H + 2Hkv, T, D)
        q = qkv[:, :heads]                                                 # (B, H, T, D)
        k = qkv[:, heads:heads + kv_heads]                                 # (B, Hkv, T, D)
        v = qkv[:, heads + kv_heads:]                                      # (B, Hkv, T, D)
        q = F.rope(q, start, self.rope_theta)
        k = F.rope(k, start, self.rope_theta)
        if cache is not None:
            k, v = cache.append(layer, k.data, v.data, start)              # (B, Hkv, start + T, D)
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
        gate, up = gate_up[..., :self.hidden], gate_up[..., self.hidden:]  # 2 × (B, T, F)
        return F.linear(F.swiglu(gate, up), self.down_proj.weight)         # (B, T, F) -> (B, T, C)


class DecoderLayer(Module):
    def __init__(self, config: GPTConfig, dtype=np.float32):
        super().__init__()
        self.input_layernorm = RMSNorm(config.d_model, config.norm_eps, dtype=dtype)
        self.self_attn = Attention(config, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(config.d_model, config.norm_eps, dtype=dtype)
        self.mlp = MLP(config, dtype=dtype)
        self.dropout = Dropout(config.dropout)

    def forward(self, x, cache=None, layer=0, start=0):
        x = x + self.dropout(self.self_attn(self.input_layernorm(x), cache, layer, start))
        return x + self.dropout(self.mlp(self.post_attention_layernorm(x)))


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
                ignore_index: int = -100):
        """ids (B, T) integers. cache: continue from cache.length (and extend the cache).
        last_only: logits of the final position only, (B, 1, V) (what sampling needs)."""
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
        x = trunk.dropout(F.embedding(ids, trunk.embed_tokens.weight))     # (B, T, C)
        for i, layer in enumerate(trunk.layers):
            x = layer(x, cache, i, start)
        if cache is not None:
            cache.length = start + ids.shape[1]
        if last_only:
            x = x[:, -1:]                                                   # (B, T, C) -> (B, 1, C)
        logits = F.linear(trunk.norm(x), self.lm_head.weight)              # (B, T, V)
        if targets is None:
            return logits
        return logits, F.cross_entropy(logits, targets, ignore_index=ignore_index)

    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        return KVCache(self.config, batch, max_len or self.config.max_seq_len, self.dtype, self.device)
