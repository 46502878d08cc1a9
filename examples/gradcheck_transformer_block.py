"""A short gradcheck tour through one transformer block, in float64.

    python examples/gradcheck_transformer_block.py

Every hand-written backward on the way from a block's input to its output is checked against central
finite differences of L = ⟨f(x), g⟩ for a random upstream gradient g (tinygrad_llm.gradcheck), first one
piece at a time, then the whole block with respect to its input and each of its seven parameters:

    x ─ rms_norm ─ q,k,v projections (one GEMM) ─ RoPE ─ causal GQA attention ─ o_proj ─(+x)─┐
    ┌───────────────────────────────────────────────────────────────────────────────────────┘
    └ rms_norm ─ gate,up projections (one GEMM) ─ SwiGLU ─ down_proj ─(+)─ y
"""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

import tinygrad_llm.functional as F  # noqa: E402
from tinygrad_llm import Tensor, manual_seed  # noqa: E402
from tinygrad_llm.gradcheck import gradcheck  # noqa: E402
from tinygrad_llm.model import DecoderLayer, GPTConfig  # noqa: E402
from tinygrad_llm.ops.rope import rope_angles  # noqa: E402


def report(name, result):
    print(f"  {name:<34} {'ok ' if result.ok else 'BAD'}  worst rel. error {result.worst_relative_error:.1e}"
          f"  ({result.checked_elements} elements)")
    return result.ok


def main():
    manual_seed(0)
    rng = np.random.default_rng(0)
    batch, time, heads, kv_heads, head_dim = 2, 5, 4, 2, 4
    channels = heads * head_dim
    config = GPTConfig(vocab_size=8, d_model=channels, n_layers=1, n_heads=heads, n_kv_heads=kv_heads,
                       ffn_hidden=24, max_seq_len=time)
    x = rng.standard_normal((batch, time, channels))
    cos, sin = rope_angles(np.arange(time), head_dim, config.rope_theta)
    ok = True

    print("the pieces:")
    w = 1 + 0.1 * rng.standard_normal(channels)
    ok &= report("rms_norm (x, gain)", gradcheck(lambda a, b: F.rms_norm(a, b), [x, w]))
    weight = 0.3 * rng.standard_normal((3 * channels, channels))
    ok &= report("linear (x, W)", gradcheck(lambda a, b: F.linear(a, b), [x, weight]))
    q = rng.standard_normal((batch, heads, time, head_dim))
    ok &= report("rope at offset 3", gradcheck(lambda a: F.rope(a, 3), [q]))
    k, v = rng.standard_normal((2, batch, kv_heads, time, head_dim))
    ok &= report("causal attention, 4 q / 2 kv heads", gradcheck(F.causal_attention, [q, k, v]))
    qkv = rng.standard_normal((batch, time, heads + 2 * kv_heads, head_dim))
    ok &= report("fused rope + attention (packed qkv)",
                 gradcheck(lambda a: F.rope_attention(a, heads, kv_heads, cos, sin), [qkv]))
    gate_up = 2 * rng.standard_normal((batch, time, 2 * config.ffn_hidden))
    ok &= report("fused swiglu (packed gate/up)", gradcheck(lambda a: F.swiglu(a), [gate_up]))

    print("the whole block, with respect to its input and each parameter:")
    layer = DecoderLayer(config)
    layer.to(dtype=np.float64)
    for p in layer.parameters():
        p.data[...] = p.data * 10 if p.ndim == 2 else 1 + 0.2 * rng.standard_normal(p.shape)
    rope_tables = tuple(t.astype(np.float64) for t in (cos, sin))
    ok &= report("block input x", gradcheck(lambda a: layer(a, rope_tables), [x]))
    for name, parameter in layer.named_parameters():
        owner_path, attribute = name.rsplit(".", 1)
        owner = layer
        for part in owner_path.split("."):
            owner = getattr(owner, part)

        def block_of(value, owner=owner, attribute=attribute, original=parameter):
            setattr(owner, attribute, value)
            try:
                return layer(Tensor(x), rope_tables)
            finally:
                setattr(owner, attribute, original)

        ok &= report(name, gradcheck(block_of, [parameter.data.copy()], max_elements_per_input=40))
    print("all gradients match" if ok else "SOME GRADIENTS DISAGREE")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
