"""Text generation: greedy, temperature, top-k and top-p sampling with a KV cache, one sequence or a batch.

    from tinygrad_llm.generate import generate, generate_text, generate_batch
    for token in generate(model, prompt_ids, max_new_tokens=200, temperature=0.8, top_k=40): ...
    text = generate_text(model, tokenizer, "ROMEO:", max_new_tokens=200, stop=["\\n\\n"], stream=sys.stdout)
    outputs = generate_batch(model, [ids_a, ids_b, ids_c], max_new_tokens=50, temperature=0)   # one list each

`model` is a GPT (float32 on the CPU; on the GPU also under a bf16/fp16 policy) or a quantized run
(tinygrad_llm.quant.runs.QuantizedModel): anything with `.config` and either `named_parameters()` (Hugging
Face names) or `inference_weights()` (the same names -> float arrays or QuantizedMatrix).

The decoding API (what the server's continuous batching runs on):

    decoder = Decoder(model)                      # the weights by name (references, not copies, on the CPU)
    cache = decoder.new_cache(slots=8)            # BatchedKVCache: every layer's keys/values, preallocated
    slot = cache.allocate()                       # a free slot (sequences join between steps)
    logits = decoder.prefill(cache, slot, ids)    # (V,) NumPy (float32; float64 for a float64 model)
    logits = decoder.decode_step(cache, tokens, slots)   # (n, V): one new token for each of n slots
    cache.release(slot)                           # the sequence leaves; the slot is free again

`BatchedKVCache` holds `k[layer]`, `v[layer]` of shape (slots, Hkv, max_len, D) and `lengths[slot]`, the
number of positions stored (the slot's next position). Each slot is its own sequence at its own
positions: `decode_step` takes any subset of slots, in any order, each one token, and attends each only to
its own `lengths[slot]` keys (ragged, no padding: RoPE at each slot's own position, a −∞ mask past each
slot's length). `prefill` runs one sequence's prompt (T tokens, one GEMM per weight) from the slot's
current length, so it also extends a slot (a chat turn). A slot is full at `max_len` (the model's
max_seq_len by default): the caller releases and re-prefills it (generate slides its window so).
Nothing here keeps gradients. A Decoder holds references to the model's arrays (no copy of a float32
model on the CPU), taken when it is built: build a new one if training replaces them.

KV cache: the prompt is run through the model once (prefill) and every layer's keys and values are kept;
each new token is then one position (rope at the slot's length, attention over the slot's cached keys).

Context limit, handled explicitly: the model sees at most `max_seq_len` tokens. A longer prompt is cut to
its last `max_seq_len` tokens (a warning says so). When generation fills the context, the window slides:
from then on each step recomputes the cache from the last `max_seq_len` tokens (the new token included),
so the model always conditions on exactly the most recent `max_seq_len` tokens.

Stops: at `eot_id` (the end-of-text token, not emitted), at any of a sequence's `stop_tokens` (not
emitted), or when the decoded continuation contains one of the `stop` strings (the text is cut before it).
Streaming holds back only what could still turn into a stop string or is an incomplete UTF-8 sequence.

CPU decoding steps run as `_CpuStep`: the ops' compiled calls bound once per cache and batch size to
preallocated buffers (see its docstring); where the compiled loops are missing, op by op as on the GPU.

Simplifications: a batch's prompts are prefilled one after another (each is one GEMM per weight already);
a GPU decode step without graphs runs attention once per run of consecutive slots (each run's keys a view
of the cache, no gather), so a batch scattered over many non-adjacent slots costs one small attention call
per run. A CPU step keeps up to CPU_STEPS batch sizes' buffers per cache.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import numpy as np

from . import backend, precision
from .gpu import kernel
from .ops.activation import SwiGLU, swiglu_call
from .ops.attention import CacheRows, CausalAttention, decode_attention_call
from .ops.embedding import Embedding
from .ops.matmul import Linear
from .ops.norm import RMSNorm, rms_norm_call
from .ops.quantized import QuantizedLinear, linear_call, tile_for_cpu
from .ops.rope import rope_angles
from .quant.formats import QuantizedMatrix
from .tensor import no_grad


CHUNKED_NORM_ROWS = 64     # RMSNorm takes its threaded row-chunk path above this many rows (decode steps don't)
CPU_STEPS = 8              # CPU decoding steps (one a batch size) kept per cache
STACK_BYTES = 16 << 20     # CPU: q‖k‖v and gate‖up stacked into copies when these total at most this many bytes


class BatchedKVCache:
    """Keys and values of every layer for `slots` independent sequences, preallocated to `max_len` positions.

    k[layer], v[layer]: (slots, Hkv, max_len, D); lengths[s]: positions stored in slot s, all valid in
    [:, :, :lengths[s]]. allocate() / release() hand slots out and take them back (lowest free first).
    """

    def __init__(self, config, slots: int, max_len: int | None = None, dtype=np.float32, device="cpu"):
        if int(slots) <= 0:
            raise ValueError(f"a KV cache needs at least one slot, got {slots}")
        self.max_len = int(max_len or config.max_seq_len)
        if not 0 < self.max_len <= config.max_seq_len:
            raise ValueError(f"max_len must be in [1, {config.max_seq_len}] (the model's context), got {max_len}")
        xp = backend.cupy_module() if backend.normalize_device(device) == "cuda" else np
        shape = (int(slots), config.n_kv_heads, self.max_len, config.head_dim)
        self.k = [xp.zeros(shape, dtype=dtype) for _ in range(config.n_layers)]
        self.v = [xp.zeros(shape, dtype=dtype) for _ in range(config.n_layers)]
        self.slots = int(slots)
        self.lengths = np.zeros(self.slots, dtype=np.int64)
        self.step_graphs = {}             # (decoder id, batch size) -> _StepGraph: captured decoding steps
        self._free = list(range(self.slots))
        self._in_use = set()

    @property
    def free_slots(self) -> list:
        return sorted(self._free)

    @property
    def active_slots(self) -> list:
        return sorted(self._in_use)

    def allocate(self) -> int:
        """Take the lowest free slot (length 0); RuntimeError when every slot is in use."""
        if not self._free:
            raise RuntimeError(f"all {self.slots} KV cache slots are in use")
        self._free.sort()
        slot = self._free.pop(0)
        self._in_use.add(slot)
        self.lengths[slot] = 0
        return slot

    def release(self, slot: int) -> None:
        """Give a slot back: its sequence is done (its arrays are simply overwritten by the next one)."""
        slot = self.check(slot)
        self._in_use.discard(slot)
        self.lengths[slot] = 0
        self._free.append(slot)

    def check(self, slot) -> int:
        """The slot as an int; ValueError unless it is allocated."""
        slot = int(slot)
        if slot not in self._in_use:
            raise ValueError(f"KV cache slot {slot} is not allocated (active: {self.active_slots})")
        return slot

    def holds(self, slots) -> bool:
        """Whether every slot in `slots` (ints) is allocated."""
        return self._in_use.issuperset(slots)

    @property
    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in self.k) + sum(a.nbytes for a in self.v))


@dataclass
class _Layer:
    attention_norm: object
    q: object
    k: object
    v: object
    o: object
    mlp_norm: object
    gate: object
    up: object
    down: object
    qkv: object = None          # q‖k‖v and gate‖up stacked (one GEMM each): the GPU's low-precision copies,
    gate_up: object = None      # and on the CPU small models' copies (STACK_BYTES)


def model_weights(model) -> dict:
    """name -> array (or QuantizedMatrix): a quantized run's inference_weights(), or a model's parameters."""
    if hasattr(model, "inference_weights"):
        return dict(model.inference_weights())
    return {name: p.data for name, p in model.named_parameters()}


class Decoder:
    """KV-cached forward passes of a model for prefill and batched decoding (no autograd).

    The same ops as GPT.forward, their forwards run on the raw arrays of the weights by name (`_forward`:
    no Tensors, no graph): Embedding (or a quantized embedding's own row lookup), RMSNorm, the linear op
    (Linear for a float weight, QuantizedLinear for a QuantizedMatrix), CausalAttention's packed RoPE form
    with the ragged batched-cache option (ops/attention.CacheRows: every slot at its own position,
    attending to its own keys only) and SwiGLU. Logits come back as NumPy arrays (float32, or float64 for a
    float64 model). The tests hold it to GPT.forward's logits.
    On the GPU under a bf16/fp16 policy (tinygrad_llm.precision) the float weight matrices are cast to
    the low dtype once, here (a copy beside the float32 masters), with q‖k‖v and gate‖up stacked so that
    each is one GEMM, and every GEMM runs in it (the gate‖up product stays in it through SwiGLU into the
    down projection); norms, attention and the KV cache stay float32. A quantized embedding is looked up
    on the host. On the GPU the decoding steps replay from CUDA graphs (`_step_graph`).
    On the CPU a small model (stacked copies ≤ STACK_BYTES) gets q‖k‖v and gate‖up stacked too, float or
    quantized, so that a layer is 4 products instead of 7: at that size a token is per-call Python, not
    arithmetic. A CPU decoding step runs as a _CpuStep (the ops' compiled calls bound to buffers once); op
    by op, with its rows kept 2-D, (n, C), where the compiled loops are missing.
    """

    def __init__(self, model, cuda_graphs: bool | None = None):
        config = self.config = model.config
        weights = model_weights(model)
        try:
            embed = weights["model.embed_tokens.weight"]
            self.layers = [_Layer(*(weights[f"model.layers.{i}.{name}"] for name in (
                "input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
                "self_attn.v_proj.weight", "self_attn.o_proj.weight", "post_attention_layernorm.weight",
                "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")))
                for i in range(config.n_layers)]
            self.norm = weights["model.norm.weight"]
        except KeyError as missing:
            raise ValueError(f"Decoder: the model has no weight {missing}") from None
        self.embed = embed
        self.lm_head = weights.get("lm_head.weight", embed)          # tied embeddings: one matrix
        self.device = backend.device_of(self.norm)
        self.xp = backend.array_module(self.norm)
        self.dtype = np.dtype(np.float32) if self.norm.dtype == np.float16 else np.dtype(self.norm.dtype)
        if self.dtype.kind != "f":                                    # bfloat16 master copies: compute in float32
            self.dtype = np.dtype(np.float32)
        as_compute = lambda w: w.astype(self.dtype, copy=False)     # norm gains in the compute dtype, once
        self.layers = [_Layer(**dict(vars(layer), attention_norm=as_compute(layer.attention_norm),
                                     mlp_norm=as_compute(layer.mlp_norm))) for layer in self.layers]
        self.norm = as_compute(self.norm)
        if hasattr(self.embed, "take_rows") and self.device != "cpu":
            self.embed = self.embed.to("cpu")                         # quantized lookups run on the host
        low = precision.get_policy().compute
        if low is not None and self.device != "cpu":                  # bf16/fp16 policy: GEMM operands cast once
            cast = lambda w: w.astype(precision.dtype_named(low)) if getattr(w, "ndim", 0) == 2 else w
            self.layers = [self._stacked(_Layer(*(cast(w) for w in vars(layer).values()))) for layer in self.layers]
            self.lm_head = cast(self.lm_head)
        elif self.device == "cpu" and sum(w.nbytes for layer in self.layers for w in (
                layer.q, layer.k, layer.v, layer.gate, layer.up)) <= STACK_BYTES:
            self.layers = [self._stacked(layer, quantized=True) for layer in self.layers]
        if self.device == "cpu":                                      # the kernels' tiled layout, in place
            for weight in [self.lm_head, self.embed] + [w for layer in self.layers for w in vars(layer).values()]:
                tile_for_cpu(weight)
        # (max_len, D/2) tables computed by NumPy, then moved (CuPy would compile kernels for them)
        cos, sin = rope_angles(np.arange(config.max_seq_len), config.head_dim, config.rope_theta)
        self.cos, self.sin = (backend.to_device(t.astype(self.dtype), self.device) for t in (cos, sin))
        if cuda_graphs is None:
            cuda_graphs = os.environ.get("TINYGRAD_LLM_CUDA_GRAPHS", "1") != "0"
        self.cuda_graphs = bool(cuda_graphs) and self.device == "cuda"

    def _stacked(self, layer, quantized: bool = False):
        """The layer with q‖k‖v and gate‖up each stacked into one matrix (rows: out features): a copy, so
        only for the low-precision copies the decoder makes anyway (GPU) or a small model's weights (CPU,
        where a call's Python costs more than its product). QuantizedMatrix weights (of one kind) are
        stacked with `quantized`, else such a layer is left as it is."""
        parts = (layer.q, layer.k, layer.v, layer.gate, layer.up)
        if any(isinstance(w, QuantizedMatrix) for w in parts):
            if not quantized or len({(w.kind if isinstance(w, QuantizedMatrix) else None) for w in parts}) != 1:
                return layer
            stack = QuantizedMatrix.stacked
        else:
            stack = self.xp.concatenate
        return _Layer(layer.attention_norm, None, None, None, layer.o, layer.mlp_norm, None, None, layer.down,
                      qkv=stack([layer.q, layer.k, layer.v]),                                # (C + 2·Hkv·D, C)
                      gate_up=stack([layer.gate, layer.up]))                                 # (2F, C)

    def new_cache(self, slots: int, max_len: int | None = None) -> BatchedKVCache:
        return BatchedKVCache(self.config, slots, max_len, self.dtype, self.device)

    # ------------------------------------------------------------------ the public steps
    def prefill(self, cache: BatchedKVCache, slot: int, ids, all_logits: bool = False):
        """Run `ids` (T,) into `slot` from its current length. Returns the last position's logits (V,),
        or every position's (T, V) with all_logits."""
        slot = cache.check(slot)
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        start, time = int(cache.lengths[slot]), ids.shape[0]
        if time == 0:
            raise ValueError("prefill needs at least one token")
        if start + time > cache.max_len:
            raise ValueError(f"slot {slot} holds {start} positions; {time} more exceed the cache's {cache.max_len}")
        self._check_ids(ids)
        with no_grad():
            x = self._layers(self._embed(ids)[None], cache, CacheRows([slot], [start], time, self.xp))  # (1, T, C)
            cache.lengths[slot] = start + time
            return self._host(self._head(x[0] if all_logits else x[0, -1:]))[slice(None) if all_logits else 0]

    def decode_step(self, cache: BatchedKVCache, tokens, slots):
        """One new token for each of `slots` (n,), at each slot's own position. Returns logits (n, V)."""
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        slots = np.asarray(slots, dtype=np.int64).reshape(-1)
        if tokens.shape != slots.shape:
            raise ValueError(f"decode_step: {tokens.shape[0]} tokens for {slots.shape[0]} slots")
        if slots.size == 0:
            raise ValueError("decode_step needs at least one slot")
        listed = slots.tolist()
        if not cache.holds(listed):
            for slot in listed:
                cache.check(slot)                                                     # raises, naming the slot
        if len(set(listed)) != len(listed):
            raise ValueError(f"decode_step: a slot appears twice in {listed}")
        positions = cache.lengths[slots]
        lengths, ids = positions.tolist(), tokens.tolist()            # checked as Python ints: a step is ~1 row
        if max(lengths) >= cache.max_len:
            full = slots[positions >= cache.max_len].tolist()
            raise ValueError(f"KV cache slots {full} are full ({cache.max_len} positions): release and re-prefill")
        if min(lengths) == 0:
            raise ValueError(f"decode_step: slots {slots[positions == 0].tolist()} are empty; prefill them first")
        if min(ids) < 0 or max(ids) >= self.config.vocab_size:
            self._check_ids(tokens)                                                # raises
        step = self._cpu_step(cache, slots.size) if self.device == "cpu" else None
        if step is not None:
            logits = step.run(tokens, slots, positions)
            cache.lengths[slots] = positions + 1
            return logits                                                          # (n, V)
        with no_grad():
            x = self._embed(tokens)                                                 # (n, C)
            graph = self._step_graph(cache, slots.size)
            if graph is None and self.device == "cpu":     # the rows stay (n, C) through the layers: fewer reshapes
                logits = self._head(self._layers(x, cache, CacheRows(slots, positions, 1, self.xp)))
            else:
                x = x[:, None]                                                      # (n, C) -> (n, 1, C)
                if graph is not None:
                    logits = graph.run(x, slots, positions)
                else:
                    logits = self._head(self._layers(x, cache, CacheRows(slots, positions, 1, self.xp))[:, 0])
            cache.lengths[slots] = positions + 1
            return self._host(logits)                                              # (n, V)

    def forward(self, ids):
        """Logits (B, T, V) of whole sequences (B, T), without a cache (evaluation of quantized runs)."""
        ids = np.asarray(ids)
        if ids.ndim != 2:
            raise ValueError(f"Decoder.forward expects ids of shape (B, T), got {tuple(ids.shape)}")
        cache = self.new_cache(1, ids.shape[1])
        rows = []
        for row in ids:
            slot = cache.allocate()
            rows.append(self.prefill(cache, slot, row, all_logits=True))
            cache.release(slot)
        return np.stack(rows)

    # ------------------------------------------------------------------ the pieces
    def _check_ids(self, ids):
        if ids.size and (ids.min() < 0 or ids.max() >= self.config.vocab_size):
            raise IndexError(f"token ids must be in [0, {self.config.vocab_size}), got {ids.min()}…{ids.max()}")

    def _embed(self, ids):
        """(N,) ids -> (N, C) in the compute dtype."""
        if hasattr(self.embed, "take_rows"):                     # a QuantizedMatrix: dequantise the rows used
            rows = self.embed.take_rows(ids)
            return backend.to_device(rows, self.device) if self.device != "cpu" else rows
        return _forward(Embedding, ids, self.embed).astype(self.dtype, copy=False)    # ids checked on the host

    def _linear(self, x, weight):
        """The linear op for this weight (float or quantized), its output in the compute dtype. One row of x
        on the CPU goes to the quantized op's dispatch point for a float weight too (its first branch is
        x @ Wᵀ, Linear's product for one row, with less Python before it)."""
        if isinstance(weight, QuantizedMatrix) or (x.size == x.shape[-1] and type(weight) is np.ndarray):
            if x.ndim == 2:                                                          # (N, in): as it is
                y = _forward(QuantizedLinear, x, weight)
            else:
                y = _forward(QuantizedLinear, x.reshape(-1, x.shape[-1]), weight).reshape(*x.shape[:-1], -1)
        else:
            y = _forward(Linear, x, weight)
        return y if y.dtype is self.dtype or y.dtype == self.dtype else y.astype(self.dtype)

    def _norm(self, x, weight):
        """RMSNorm; its threaded row chunks only for many rows (a prompt), not a row per sequence."""
        return _forward(RMSNorm, x, weight, eps=self.config.norm_eps, chunked=x.size > CHUNKED_NORM_ROWS * x.shape[-1])

    def _layers(self, x, cache, rows):
        """x (B, T, C): row b is the sequence in cache slot rows.slots[b], T new positions from rows.starts[b];
        or x (B, C) for one new position a row (CPU decoding: the rows stay 2-D, and so does the result)."""
        config, xp = self.config, self.xp
        heads, kv_heads, head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        rows_only = x.ndim == 2
        batch, time = (x.shape[0], 1) if rows_only else x.shape[:2]
        positions = rows.write[1]                                                   # (B·T,) on the device
        cos, sin = self.cos[positions], self.sin[positions]                         # (B·T, D/2)
        for i, layer in enumerate(self.layers):
            h = self._norm(x, layer.attention_norm)
            if layer.qkv is not None:
                qkv = self._linear(h, layer.qkv)                                    # (B, T, C + 2·Hkv·D)
            else:
                qkv = xp.concatenate([self._linear(h, layer.q), self._linear(h, layer.k),
                                      self._linear(h, layer.v)], axis=-1)           # (B, T, C + 2·Hkv·D)
            qkv = qkv.reshape(batch, time, heads + 2 * kv_heads, head_dim)         # -> (B, T, H + 2Hkv, D)
            y = _forward(CausalAttention, qkv, packed=(heads, kv_heads, cos, sin), cache=(cache.k[i], cache.v[i], rows))
            if rows_only:
                y = y.reshape(batch, -1)                                            # (B, 1, H·D) -> (B, H·D)
            x = x + self._linear(y, layer.o)
            h = self._norm(x, layer.mlp_norm)
            if layer.gate_up is not None and self.device == "cpu":
                hidden = _forward(SwiGLU, self._linear(h, layer.gate_up), packed=True)
            elif layer.gate_up is not None:          # gate‖up stays in the GEMM's dtype through SwiGLU
                hidden = _forward(SwiGLU, _forward(Linear, h, layer.gate_up), packed=True)
            else:
                hidden = _forward(SwiGLU, self._linear(h, layer.gate), self._linear(h, layer.up))
            x = x + self._linear(hidden, layer.down)
        return x

    def _head(self, x):
        """(N, C) -> (N, V) logits, on the model's device."""
        return self._linear(self._norm(x, self.norm), self.lm_head)

    @staticmethod
    def _host(logits):
        """Logits as a NumPy array (float32 or float64)."""
        logits = backend.to_numpy(logits)
        return logits if logits.dtype in (np.float32, np.float64) else logits.astype(np.float32)

    def _step_graph(self, cache, batch: int):
        """The captured decoding step for `batch` rows of this cache, or None (run the step uncaptured).

        Graphs run on the GPU when the decoding attention kernel handles the cache (it reads every row's
        cache row and length on the device; the other attention path depends on them on the host). A
        batch size's first step runs uncaptured (it compiles the kernels), its second is captured, later
        ones replay. A capture that fails turns graphs off for this decoder, with a warning.
        """
        if not self.cuda_graphs:
            return None
        key = (id(self), batch)
        graph = cache.step_graphs.get(key)
        if graph is None:
            if kernel("decode_attention", cache.k[0], cache.v[0]) is None:
                return None
            cache.step_graphs[key] = False                                          # seen once: run uncaptured
            return None
        if graph is False:
            try:
                graph = cache.step_graphs[key] = _StepGraph(self, cache, batch)
            except Exception as error:
                self.cuda_graphs = False
                cache.step_graphs.pop(key, None)
                warnings.warn(f"decoding without CUDA graphs: capturing the step failed ({error})", stacklevel=3)
                return None
        return graph

    def _cpu_step(self, cache, batch: int):
        """The CPU decoding step of `batch` rows on this cache (_CpuStep, built at its first use and kept on the
        cache beside the GPU's graphs), or None where the ops' compiled loops do not all apply (then the
        step runs op by op)."""
        key = (id(self), batch)
        step = cache.step_graphs.get(key)
        if step is None:
            step = _CpuStep.build(self, cache, batch)
            built = [k for k, v in cache.step_graphs.items() if isinstance(v, _CpuStep)]
            if len(built) >= CPU_STEPS:                               # a server's batch size varies: keep a few
                del cache.step_graphs[built[0]]
            cache.step_graphs[key] = step if step is not None else False
        return step or None


def _forward(op, *arrays, **options):
    """The op's forward on raw arrays, keeping nothing for a backward: what the functional op computes
    under no_grad, without wrapping every array in a Tensor (a decoding step calls ~10 ops a layer)."""
    function = op()
    function.needs_input_grad = (False,) * len(arrays)
    out = function.forward(*arrays, **options)
    function.free()
    return out


class _StepGraph:
    """One decoding step of `batch` rows on one cache, captured (backend.CudaGraph) from Decoder._layers and
    _head: its inputs are fixed device buffers that each step overwrites: the embedded tokens (batch, 1, C)
    and the rows' cache rows and positions (2, batch). It keeps the decoder (its weights) alive."""

    def __init__(self, decoder, cache, batch: int):
        xp, config = decoder.xp, decoder.config
        self.decoder = decoder
        self.x = xp.zeros((batch, 1, config.d_model), dtype=decoder.dtype)
        self.rows = xp.zeros((2, batch), dtype=np.int64)                          # cache rows; positions
        rows = CacheRows(np.arange(batch), np.zeros(batch), 1, xp, device=(self.rows[0], self.rows[1]))
        self.graph = backend.CudaGraph(lambda: decoder._head(decoder._layers(self.x, cache, rows)[:, 0]))

    def run(self, x, slots, positions):
        """Logits (batch, V) on the device for embedded tokens x (batch, 1, C) at these slots and positions."""
        self.x[...] = x
        self.rows.set(np.stack([slots, positions]))
        return self.graph.replay()


class _CpuStep:
    """One decoding step of `batch` rows on one CPU cache as a fixed list of the ops' own compiled calls, each
    bound once to preallocated buffers (the CPU's counterpart of _StepGraph): at the size of the default model
    a token is ~40 op calls and their Python (Function objects, checks, array allocations, the arrays'
    addresses), not arithmetic, so the calls are set up once and a step only refills its inputs: the
    embedded tokens and the rows' cache rows and positions, which the attention loop reads at each call.

    Per layer: RMSNorm (fused with the residual add that precedes it: ops/norm.rms_norm_call), q‖k‖v,
    attention (ops/attention.decode_attention_call: RoPE, the cache write and the attention over the row's
    keys in one loop), o, the add and norm, gate‖up, SwiGLU (ops/activation.swiglu_call), down; then the
    head. Linear layers are ops/quantized.linear_call (a float weight's product, or the Q8_0 / Q4_0
    kernels). The residual stream alternates between two buffers (the fused add writes the other one).
    Unstacked q, k, v (and gate, up) go to their own buffers, which attention (and SwiGLU) read as they
    are; stacked ones to one buffer, read in column views. The head writes a new logits array each step
    (the caller keeps it).
    """

    def __init__(self, decoder, cache, batch: int):
        config, dtype = decoder.config, decoder.dtype
        heads, kv_heads, head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        empty = lambda *shape: np.empty(shape, dtype=dtype)
        self.decoder, self.embed = decoder, decoder.embed
        self.streams = [empty(batch, config.d_model), empty(batch, config.d_model)]   # the residual stream
        normed, branch = empty(batch, config.d_model), empty(batch, config.d_model)
        attended = empty(batch, heads * head_dim)
        self.slots, self.positions = np.zeros(batch, dtype=np.int64), np.zeros(batch, dtype=np.int64)
        eps, stream = config.norm_eps, 0
        calls = [rms_norm_call(self.streams[0], decoder.layers[0].attention_norm, eps, normed)]

        def projections(widths, weights, stacked):
            """normed times each weight, or times the stacked one, split in column views: (outputs, calls)."""
            if stacked is None:
                outs = [empty(batch, width) for width in widths]
                return outs, [linear_call(normed, w, out) for w, out in zip(weights, outs)]
            out, bounds = empty(batch, sum(widths)), np.cumsum([0, *widths])
            return [out[:, a:b] for a, b in zip(bounds[:-1], bounds[1:])], [linear_call(normed, stacked, out)]

        def add_norm(weight):                            # stream + branch -> the other stream, and its norm
            nonlocal stream
            stream = 1 - stream
            return rms_norm_call(self.streams[1 - stream], weight, eps, normed, branch=branch,
                                 total=self.streams[stream])

        for i, layer in enumerate(decoder.layers):
            (q, k, v), products = projections((heads * head_dim, kv_heads * head_dim, kv_heads * head_dim),
                                              (layer.q, layer.k, layer.v), layer.qkv)
            calls += products
            calls.append(decode_attention_call(q, k, v, cache.k[i], cache.v[i], self.slots, self.positions,
                                               self.positions, decoder.cos, decoder.sin, heads, kv_heads, attended))
            calls.append(linear_call(attended, layer.o, branch))
            calls.append(add_norm(layer.mlp_norm))
            hidden = empty(batch, config.ffn_hidden)
            if layer.gate_up is not None:
                gate_up = empty(batch, 2 * config.ffn_hidden)
                calls += [linear_call(normed, layer.gate_up, gate_up), swiglu_call(gate_up, None, hidden)]
            else:
                (gate, up), products = projections((config.ffn_hidden,) * 2, (layer.gate, layer.up), None)
                calls += products + [swiglu_call(gate, up, hidden)]
            calls.append(linear_call(hidden, layer.down, branch))
            last = i + 1 == len(decoder.layers)
            calls.append(add_norm(decoder.norm if last else decoder.layers[i + 1].attention_norm))
        self.calls = calls
        self.head = linear_call(normed, decoder.lm_head)                     # a new (batch, V) array each step

    @classmethod
    def build(cls, decoder, cache, batch: int):
        """The step, or None where one of the ops' compiled calls does not apply."""
        if decoder.device != "cpu" or not isinstance(cache.k[0], np.ndarray):
            return None
        step = cls(decoder, cache, batch)
        return step if all(call is not None for call in (*step.calls, step.head)) else None

    def run(self, tokens, slots, positions):
        """Logits (batch, V), a new array, for tokens (batch,) (checked) at these cache rows and positions."""
        self.slots[...] = slots
        self.positions[...] = positions
        if type(self.embed) is np.ndarray and self.embed.dtype == self.streams[0].dtype:
            np.take(self.embed, tokens, axis=0, out=self.streams[0], mode="clip")   # weight[ids]; ids checked
        else:
            self.streams[0][...] = self.decoder._embed(tokens)
        for call in self.calls:
            call()
        return Decoder._host(self.head())


def _nucleus(probs: np.ndarray, top_p: float) -> np.ndarray:
    """The ids of the smallest set of most likely tokens whose mass reaches top_p: the first `keep` of the
    ids sorted by falling probability (ties by id), with keep the first prefix whose running sum ≥ top_p.

    Sorting the whole vocabulary (~4.7 ms at 50 257 tokens) is what this avoids where it can (0.5–0.7 ms when
    the nucleus is a few hundred tokens; ~0.5 ms more than the full sort when it is most of the
    vocabulary, a flat distribution such as a random model's): it sorts only
    a head of candidates, every id whose probability is at least a threshold (ties included): first the
    64th largest probability; if those hold less than top_p, (1 − top_p) / V, since the ids below it
    hold less than 1 − top_p between them. The candidates are then the head of the full order and their
    running sums are its running sums, element for element, so the set is the full sort's exactly; a
    prefix that does not reach top_p within them (rounding) is looked for in the full order."""
    size = probs.size
    thresholds = ([np.partition(probs, -64)[-64]] if size > 64 else []) + [(1.0 - top_p) / size]
    for threshold in thresholds:
        candidates = np.flatnonzero(probs >= threshold)
        if candidates.size > size // 8:
            break                                # a flat distribution: sorting them costs what the full sort does
        if probs[candidates].sum() < top_p:
            continue
        head = candidates[np.argsort(-probs[candidates], kind="stable")]
        keep = int(np.searchsorted(np.cumsum(probs[head]), top_p) + 1)
        if keep <= head.size:
            return head[:keep]
    order = np.argsort(-probs, kind="stable")
    keep = int(np.searchsorted(np.cumsum(probs[order]), top_p) + 1)
    return order[:keep]


def sample_next(logits: np.ndarray, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                rng: np.random.Generator | None = None) -> int:
    """One token id from a (V,) logit vector. temperature 0 → greedy (argmax, on the logits as they come:
    widening to float64 is exact, so it cannot change the argmax)."""
    if temperature < 0:
        raise ValueError(f"temperature must be ≥ 0, got {temperature}")
    if temperature == 0:
        return int(np.argmax(logits))
    logits = np.asarray(logits, dtype=np.float64)
    logits = logits / temperature
    if top_k is not None and top_k > 0 and top_k < logits.size:
        kth = np.partition(logits, -top_k)[-top_k]
        logits = np.where(logits < kth, -np.inf, logits)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    if top_p is not None and 0.0 < top_p < 1.0:
        mask = np.zeros_like(probs, dtype=bool)
        mask[_nucleus(probs, top_p)] = True
        probs = np.where(mask, probs, 0.0)
        probs /= probs.sum()
    rng = rng or np.random.default_rng()
    return int(rng.choice(probs.size, p=probs))


def _full_logits(model, decoder, context):
    """The last position's logits from the whole context, no cache: GPT.forward itself for a GPT (the
    reference the cached path is tested against), the decoder's cache-free pass otherwise."""
    if not hasattr(model, "named_parameters"):
        return decoder.forward(np.asarray(context)[None, :])[0, -1]
    was_training = model.training
    model.eval()
    try:
        with no_grad():
            ids = backend.to_device(np.asarray(context, dtype=np.int64)[None, :], model.device)
            return backend.to_numpy(model(ids, last_only=True).data)[0, -1]         # (1, 1, V) -> (V,)
    finally:
        model.train(was_training)


def _crop(context: list, limit: int, stacklevel: int = 3) -> list:
    if len(context) > limit:
        warnings.warn(f"prompt of {len(context)} tokens is longer than the context ({limit}); keeping its last "
                      f"{limit} tokens", stacklevel=stacklevel)
        return context[-limit:]
    return context


def generate(model, prompt_ids, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, eot_id: int | None = None, seed: int | None = None,
             use_cache: bool = True, stop_tokens=()):
    """Yield up to max_new_tokens new token ids (stops early at eot_id or a stop token, neither yielded)."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be ≥ 0, got {max_new_tokens}")
    context = [int(t) for t in prompt_ids]
    if not context:
        raise ValueError("generate needs at least one prompt token")
    limit = model.config.max_seq_len
    context = _crop(context, limit)
    stops = set(int(t) for t in stop_tokens or ()) | ({int(eot_id)} if eot_id is not None else set())
    rng = np.random.default_rng(seed)
    decoder = model if isinstance(model, Decoder) else Decoder(model)
    if use_cache:
        cache = decoder.new_cache(1)
        slot = cache.allocate()
        logits = decoder.prefill(cache, slot, context)                                    # prefill
    else:
        logits = _full_logits(model, decoder, context)
    for _ in range(max_new_tokens):
        token = sample_next(logits, temperature, top_k, top_p, rng)
        if token in stops:
            return
        yield token
        context.append(token)
        if not use_cache:
            context = context[-limit:]
            logits = _full_logits(model, decoder, context)
        elif cache.lengths[slot] < limit:
            logits = decoder.decode_step(cache, [token], [slot])[0]                        # one position
        else:                                                                              # slide the window
            context = context[-limit:]
            cache.release(slot)
            slot = cache.allocate()
            logits = decoder.prefill(cache, slot, context)


def _per_sequence(value, count: int, name: str) -> list:
    """One list per sequence from `value`: a flat list (of ids or strings) shared by all, or `count` lists."""
    value = list(value or ())
    if value and all(isinstance(v, (list, tuple, set, frozenset)) for v in value):
        if len(value) != count:
            raise ValueError(f"{name}: {len(value)} per-sequence lists for {count} prompts")
        return [list(v) for v in value]
    return [value] * count


def generate_batch(model, prompts, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                   top_p: float | None = None, eot_id: int | None = None, seed=None, stop_tokens=(),
                   should_stop=None) -> list:
    """Generate for a batch of prompts (lists of ids, any lengths) at once; returns one list of new ids each.

    Every prompt gets its own KV cache slot, its own positions and its own sampler: `seed` is one seed for
    all (each sequence's generator starts from it, so a sequence samples what `generate` would give it
    alone) or a list of seeds. `stop_tokens`: ids for all, or one list per prompt (not emitted, like
    eot_id). `should_stop(index, ids)`: called after each new token; True ends that sequence (generate_text_batch
    uses it for stop strings). Sequences that stop leave the batch; the others go on.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be ≥ 0, got {max_new_tokens}")
    prompts = [[int(t) for t in p] for p in prompts]
    if not prompts:
        return []
    if any(not p for p in prompts):
        raise ValueError("generate_batch needs at least one token in every prompt")
    count, limit = len(prompts), model.config.max_seq_len
    contexts = [_crop(p, limit) for p in prompts]
    seeds = seed if isinstance(seed, (list, tuple)) else [seed] * count
    if len(seeds) != count:
        raise ValueError(f"generate_batch: {len(seeds)} seeds for {count} prompts")
    stops = [set(int(t) for t in group) | ({int(eot_id)} if eot_id is not None else set())
             for group in _per_sequence(stop_tokens, count, "stop_tokens")]
    rngs = [np.random.default_rng(s) for s in seeds]
    decoder = model if isinstance(model, Decoder) else Decoder(model)
    cache = decoder.new_cache(count)
    slots = [cache.allocate() for _ in range(count)]
    logits = {i: decoder.prefill(cache, slots[i], contexts[i]) for i in range(count)}
    outputs = [[] for _ in range(count)]
    active = list(range(count)) if max_new_tokens > 0 else []
    while active:
        going, stepping = [], []
        for i in active:
            token = sample_next(logits[i], temperature, top_k, top_p, rngs[i])
            if token in stops[i]:
                continue
            outputs[i].append(token)
            contexts[i].append(token)
            if len(outputs[i]) >= max_new_tokens or (should_stop is not None and should_stop(i, outputs[i])):
                continue
            going.append(i)
            if cache.lengths[slots[i]] < limit:
                stepping.append(i)
            else:                                                        # slide this sequence's window
                contexts[i] = contexts[i][-limit:]
                cache.release(slots[i])
                slots[i] = cache.allocate()
                logits[i] = decoder.prefill(cache, slots[i], contexts[i])
        if stepping:
            step_logits = decoder.decode_step(cache, [contexts[i][-1] for i in stepping], [slots[i] for i in stepping])
            for row, i in enumerate(stepping):
                logits[i] = step_logits[row]
        active = going
    return outputs


def _decode(tokenizer, ids) -> str:
    return tokenizer.decode(ids) if ids else ""


def _prompt_ids(tokenizer, prompt: str) -> list:
    ids = tokenizer.encode_ordinary(prompt) if hasattr(tokenizer, "encode_ordinary") else tokenizer.encode(prompt)
    if not ids:
        eot = _eot_id(tokenizer)
        if eot is None:
            raise ValueError("empty prompt and the tokenizer has no end-of-text token to start from")
        ids = [eot]
    return list(ids)


def _cut_at_stop(text: str, stop) -> tuple:
    """(text before the first stop string, whether one was found)."""
    cut = min((text.find(s) for s in stop if s in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int = 200, temperature: float = 1.0,
                  top_k: int | None = None, top_p: float | None = None, stop=(), seed: int | None = None,
                  stream=None, use_cache: bool = True) -> str:
    """The continuation of `prompt` as text. `stream`: a file (or callable) that receives text as it comes."""
    prompt_ids = _prompt_ids(tokenizer, prompt)
    stop = [s for s in (stop or ()) if s]
    write = (stream if callable(stream) else (lambda text: (stream.write(text), stream.flush()))) if stream else None
    holdback = max((len(s) for s in stop), default=1) - 1
    ids, emitted, text = [], 0, ""
    for token in generate(model, prompt_ids, max_new_tokens, temperature, top_k, top_p, _eot_id(tokenizer),
                          seed, use_cache):
        ids.append(token)
        text, stopped = _cut_at_stop(_decode(tokenizer, ids), stop)
        if stopped:
            break
        if write is not None:
            safe = len(text) - holdback
            while safe > emitted and text[safe - 1] == "\ufffd":                      # incomplete UTF-8
                safe -= 1
            if safe > emitted:
                write(text[emitted:safe])
                emitted = safe
    if write is not None and len(text) > emitted:
        write(text[emitted:])
    return text


def generate_text_batch(model, tokenizer, prompts, max_new_tokens: int = 200, temperature: float = 1.0,
                        top_k: int | None = None, top_p: float | None = None, stop=(), seed=None) -> list:
    """The continuations of several prompts, decoded together. `stop`: strings for all, or one list per prompt."""
    prompts = list(prompts)
    stops = [[s for s in group if s] for group in _per_sequence(stop, len(prompts), "stop")]

    def should_stop(index, ids):
        return bool(stops[index]) and _cut_at_stop(_decode(tokenizer, ids), stops[index])[1]

    outputs = generate_batch(model, [_prompt_ids(tokenizer, p) for p in prompts], max_new_tokens, temperature,
                             top_k, top_p, _eot_id(tokenizer), seed, should_stop=should_stop)
    return [_cut_at_stop(_decode(tokenizer, ids), stops[i])[0] for i, ids in enumerate(outputs)]


def _eot_id(tokenizer):
    special = getattr(tokenizer, "special_tokens", None)
    if isinstance(special, dict):
        return special.get("<|endoftext|>")
    return getattr(tokenizer, "eot_id", None)
