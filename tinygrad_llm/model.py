"""GPTConfig and GPT: a Llama-style decoder-only transformer, wired from the ops of tinygrad_llm.functional.

    ids (B, T) -> embed_tokens -> dropout
               -> N × [ x + dropout(o_proj(attention(rope(q), rope(k), v)))   on rms_norm(x)
                        x + dropout(down_proj(silu(gate_proj(h)) · up_proj(h)))  on rms_norm(x) ]
               -> norm -> lm_head -> logits (B, T, V)

Parameter names and (out, in) weight layouts are those of Hugging Face's `LlamaForCausalLM`, so
`state_dict()` maps one to one onto it (see `tinygrad_llm.export`). RoPE uses the rotate-half pairing
of Llama; attention is grouped-query (`n_kv_heads` key/value heads shared by `n_heads` query heads).

Speed: q, k and v come out of one GEMM against the three weights concatenated along the output axis and
go through one op (F.rope_attention: RoPE, attention, the layout o_proj wants); gate and up likewise
come out of one GEMM into F.swiglu's packed form, except on NumPy arrays, where two GEMMs give them as
contiguous arrays for F.swiglu's passes; training's head is F.linear_cross_entropy. Each
residual add and the RMSNorm that reads its sum are one F.add_rms_norm (an MLP branch is added by the
next layer's first norm, or the final norm). The separate
Hugging Face parameters stay the ones that are stored and updated; the concatenation is a cheap copy of
the weights redone every forward. CPU tuning choices are `OpOptions`, given to GPT.

Generation uses a `KVCache`: the prompt is run once (prefill), then each new token is one position that
attends to every cached key, through the same attention op (RoPE tables start at the cache length).
Dropout: `dropout` acts on the embeddings and on each residual branch, `attention_dropout` on the attention
probabilities (inside F.rope_attention, a hashed mask that is never stored); both only in training mode.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import numpy as np

from . import backend, precision
from . import functional as F
from .backend import array_module
from .nn import Dropout, Embedding, Linear, Module, ModuleList, Parameter, RMSNorm, init_normal
from .ops.rope import rope_angles
from .tensor import Tensor


@dataclass(frozen=True)
class OpOptions:
    """How the ops run, not what they compute (tests/test_model.py checks every setting gives the same
    gradients). keep_attention_probabilities: on the CPU, attention keeps P between forward and backward
    (faster, T×T per cache-sized batch chunk of memory). chunked_norm: RMSNorm on NumPy arrays works in
    threaded row chunks. split_gate_up: on NumPy arrays the MLP computes gate and up with two GEMMs
    instead of one against the stacked weights (other arrays always stack them)."""
    keep_attention_probabilities: bool = True
    chunked_norm: bool = True
    split_gate_up: bool = True


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
    attention_dropout: float = 0.0     # on the attention probabilities (the reference models' attn_pdrop)

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
        if not 0.0 <= float(self.attention_dropout) < 1.0:
            problems.append(f"attention_dropout must be in [0, 1), got {self.attention_dropout}")
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
    def field_defaults(cls) -> dict:
        """Every field's default: what a saved config written before a field existed stands for."""
        return {f.name: f.default for f in fields(cls)}

    @classmethod
    def from_dict(cls, values: dict) -> "GPTConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown GPTConfig fields: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        return cls(**values)


class KVCache:
    """Keys and values of every layer for positions 0 … length−1, preallocated to `max_len` positions.

    k[i], v[i]: (B, Hkv, max_len, D) arrays of layer i; only [:, :, :length] are valid. The attention op
    (F.rope_attention with cache=) writes the new positions into them.
    """

    def __init__(self, config: GPTConfig, batch: int, max_len: int, dtype=np.float32, device="cpu"):
        xp = backend.cupy_module() if backend.normalize_device(device) == "cuda" else np
        shape = (batch, config.n_kv_heads, max_len, config.head_dim)
        self.k = [xp.zeros(shape, dtype=dtype) for _ in range(config.n_layers)]
        self.v = [xp.zeros(shape, dtype=dtype) for _ in range(config.n_layers)]
        self.max_len = max_len
        self.length = 0


class Attention(Module):
    def __init__(self, config: GPTConfig, dtype=np.float32, options: OpOptions = OpOptions()):
        super().__init__()
        c, kv = config.d_model, config.n_kv_heads * config.head_dim
        residual_std = 0.02 / math.sqrt(2 * config.n_layers)
        self.q_proj = Linear(c, c, dtype=dtype)
        self.k_proj = Linear(c, kv, dtype=dtype)
        self.v_proj = Linear(c, kv, dtype=dtype)
        self.o_proj = Linear(c, c, std=residual_std, dtype=dtype)
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.options = options
        self.attention_dropout = float(config.attention_dropout)

    def forward(self, x, rope_tables, cache: KVCache | None = None, layer: int = 0, start: int = 0):
        batch, time, _ = x.shape
        heads, kv_heads = self.n_heads, self.n_kv_heads
        # a view when the optimizer's flat buffer holds the three end to end (no copy a step)
        weight = F.concatenate([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight], axis=0, view=True)
        qkv = F.linear(x, weight)                                          # (B, T, C + 2·Hkv·D)
        qkv = qkv.reshape(batch, time, heads + 2 * kv_heads, self.head_dim)   # -> (B, T, H + 2Hkv, D)
        stores = None if cache is None else (cache.k[layer], cache.v[layer], start)
        dropout = self.attention_dropout if self.training and cache is None else 0.0
        y = F.rope_attention(qkv, heads, kv_heads, *rope_tables,
                             keep_probabilities=self.options.keep_attention_probabilities, cache=stores,
                             dropout=dropout)
        return F.linear(y, self.o_proj.weight)                            # (B, T, C)


class MLP(Module):
    def __init__(self, config: GPTConfig, dtype=np.float32, options: OpOptions = OpOptions()):
        super().__init__()
        self.split_gate_up = options.split_gate_up
        c, hidden = config.d_model, config.ffn_hidden
        self.gate_proj = Linear(c, hidden, dtype=dtype)
        self.up_proj = Linear(c, hidden, dtype=dtype)
        self.down_proj = Linear(hidden, c, std=0.02 / math.sqrt(2 * config.n_layers), dtype=dtype)
        self.hidden = hidden

    def forward(self, x):
        if self.split_gate_up and array_module(x.data) is np:
            # NumPy: two GEMMs give gate and up as contiguous arrays (SwiGLU's passes run 1.4–1.9× faster
            # than over the two strided halves of one gate‖up array; the GEMMs cost the same)
            gate, up = F.linear(x, self.gate_proj.weight), F.linear(x, self.up_proj.weight)   # (B, T, F) each
            return F.linear(F.swiglu(gate, up), self.down_proj.weight)                        # -> (B, T, C)
        weight = F.concatenate([self.gate_proj.weight, self.up_proj.weight], axis=0, view=True)
        gate_up = F.linear(x, weight)                                      # (B, T, 2F)
        return F.linear(F.swiglu(gate_up), self.down_proj.weight)          # (B, T, F) -> (B, T, C)


class DecoderLayer(Module):
    def __init__(self, config: GPTConfig, dtype=np.float32, options: OpOptions = OpOptions()):
        super().__init__()
        chunked = options.chunked_norm
        self.input_layernorm = RMSNorm(config.d_model, config.norm_eps, dtype=dtype, chunked=chunked)
        self.self_attn = Attention(config, dtype=dtype, options=options)
        self.post_attention_layernorm = RMSNorm(config.d_model, config.norm_eps, dtype=dtype, chunked=chunked)
        self.mlp = MLP(config, dtype=dtype, options=options)
        self.dropout = Dropout(config.dropout)

    def forward(self, x, pending, rope_tables, cache=None, layer=0, start=0):
        """(x, pending) -> (x', branch): the residual stream arrives with the previous layer's MLP branch
        not yet added (`pending`, None before the first layer); it is added in one op with this layer's
        first norm, and this layer's MLP branch is handed on the same way (to the next layer or the final
        norm)."""
        if pending is None:
            h = self.input_layernorm(x)                                   # pre-norm
        else:
            x, h = _add_norm(x, pending, self.input_layernorm)
        x, h = _add_norm(x, self.dropout(self.self_attn(h, rope_tables, cache, layer, start)),
                         self.post_attention_layernorm)
        return x, self.dropout(self.mlp(h))


def _add_norm(x, branch, norm):
    """x + branch and its RMSNorm in one op (F.add_rms_norm), the norm's output in the branch's dtype (the
    Linears' low dtype under a bf16/fp16 policy with a float32 residual, else the residual's)."""
    return F.add_rms_norm(x, branch, norm.weight, norm.eps, chunked=norm.chunked, out_dtype=branch.dtype)


class LlamaModel(Module):
    """The trunk, named `model` inside GPT as in Hugging Face: embed_tokens, layers, norm."""

    def __init__(self, config: GPTConfig, dtype=np.float32, options: OpOptions = OpOptions()):
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.d_model, dtype=dtype)
        self.layers = ModuleList(DecoderLayer(config, dtype=dtype, options=options) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps, dtype=dtype, chunked=options.chunked_norm)
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
    `options` (OpOptions) picks how the ops run on the CPU; it changes no result beyond rounding.
    """

    def __init__(self, config: GPTConfig, dtype=np.float32, options: OpOptions | None = None):
        super().__init__()
        self.config = config
        self.options = options or OpOptions()
        self.model = LlamaModel(config, dtype=dtype, options=self.options)
        if config.tie_embeddings:
            self.lm_head = LMHead(self.model.embed_tokens.weight)
        else:
            self.lm_head = LMHead(init_normal((config.vocab_size, config.d_model), 0.02, dtype))

    def forward(self, ids, targets=None, cache: KVCache | None = None, last_only: bool = False,
                ignore_index: int = -100, return_logits: bool = True):
        """ids (B, T) integers; targets (B, T) integers or None.

        Returns logits (B, T, V), or (logits, loss) with targets. cache: continue from cache.length (and
        extend the cache). last_only: logits of the final position only, (B, 1, V) (what sampling needs).
        return_logits=False (training): (None, loss) from F.linear_cross_entropy, which never
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
        # in the dtype of q and k (the Linears' output), so that no step casts them
        rope_tables = self._rope_tables(start, ids.shape[1], x.data, precision.linear_dtype(x.data))
        pending = None
        for i, layer in enumerate(trunk.layers):
            x, pending = layer(x, pending, rope_tables, cache, i, start)
        if cache is not None:
            cache.length = start + ids.shape[1]
        if last_only:
            x, pending = x[:, -1:], pending[:, -1:]                         # (B, T, C) -> (B, 1, C)
        _, x = _add_norm(x, pending, trunk.norm)
        if targets is not None and not return_logits:
            targets = targets.data if isinstance(targets, Tensor) else targets
            return None, F.linear_cross_entropy(x, self.lm_head.weight, targets, ignore_index=ignore_index)
        logits = F.linear(x, self.lm_head.weight)                          # (B, T, V)
        if targets is None:
            return logits
        return logits, F.cross_entropy(logits, targets, ignore_index=ignore_index)

    def _rope_tables(self, start: int, time: int, like, dtype=None):
        """cos and sin (T, D/2) for positions start … start + T − 1 in `dtype` (default like's), on like's device:
        row views of the tables of every position below max_seq_len, made once per dtype and device, so that
        no step copies or computes them (a CUDA graph of the training step, captured again for a new T,
        captures nothing for them). Computed by NumPy and moved: through CuPy they would compile eight
        element-wise kernels on a GPU run's first start."""
        key = (np.dtype(like.dtype if dtype is None else dtype), backend.device_of(like))
        made = self.__dict__.setdefault("_rope_made", {})
        if key not in made:
            cos, sin = rope_angles(np.arange(self.config.max_seq_len), self.config.head_dim, self.config.rope_theta)
            made[key] = tuple(backend.to_device(table.astype(key[0]), key[1]) for table in (cos, sin))
        cos, sin = made[key]
        return cos[start:start + time], sin[start:start + time]                   # (T, D/2) views

    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        return KVCache(self.config, batch, max_len or self.config.max_seq_len, self.dtype, self.device)
