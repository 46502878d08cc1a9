"""GPT and the module system: names and layouts, init, state dicts, fused ops, whole-model gradcheck."""
from __future__ import annotations

import math

import numpy as np
import pytest

import tinygrad_llm.functional as F
from tinygrad_llm import Tensor, manual_seed
from tinygrad_llm.gradcheck import gradcheck
from tinygrad_llm.model import GPT, GPTConfig, OpOptions
from tinygrad_llm.nn import StateDictError
from tinygrad_llm.optim import AdamW
from tinygrad_llm.ops.rope import rope_angles


def tiny_config(**overrides):
    values = dict(vocab_size=11, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=24, max_seq_len=12)
    values.update(overrides)
    return GPTConfig(**values)


def test_parameter_names_and_layouts_follow_hugging_face_llama():
    model = GPT(tiny_config())
    shapes = {name: p.shape for name, p in model.named_parameters()}
    expected = {"model.embed_tokens.weight": (11, 16), "model.norm.weight": (16,), "lm_head.weight": (11, 16)}
    for i in range(2):
        prefix = f"model.layers.{i}."
        expected.update({
            prefix + "input_layernorm.weight": (16,), prefix + "post_attention_layernorm.weight": (16,),
            prefix + "self_attn.q_proj.weight": (16, 16), prefix + "self_attn.k_proj.weight": (8, 16),
            prefix + "self_attn.v_proj.weight": (8, 16), prefix + "self_attn.o_proj.weight": (16, 16),
            prefix + "mlp.gate_proj.weight": (24, 16), prefix + "mlp.up_proj.weight": (24, 16),
            prefix + "mlp.down_proj.weight": (16, 24)})
    assert shapes == expected
    assert list(model.state_dict()) == list(shapes)


def test_init_scales_and_norms():
    manual_seed(0)
    config = GPTConfig(vocab_size=512, d_model=128, n_layers=8, n_heads=4, ffn_hidden=256, max_seq_len=16)
    model = GPT(config)
    layer = model.model.layers[0]
    assert abs(layer.self_attn.q_proj.weight.numpy().std() - 0.02) < 0.002
    assert abs(layer.mlp.gate_proj.weight.numpy().std() - 0.02) < 0.002
    residual = 0.02 / math.sqrt(2 * config.n_layers)
    assert abs(layer.self_attn.o_proj.weight.numpy().std() - residual) < 0.1 * residual
    assert abs(layer.mlp.down_proj.weight.numpy().std() - residual) < 0.1 * residual
    assert np.all(layer.input_layernorm.weight.numpy() == 1) and np.all(model.model.norm.weight.numpy() == 1)


def test_forward_shapes_loss_and_tied_embeddings():
    model = GPT(tiny_config(tie_embeddings=True))
    names = [n for n, _ in model.named_parameters()]
    assert "lm_head.weight" not in names and model.lm_head.weight is model.model.embed_tokens.weight
    ids = np.random.default_rng(0).integers(0, 11, (3, 7))
    logits = model(ids)
    assert logits.shape == (3, 7, 11)
    logits, loss = model(ids, ids)
    assert loss.shape == () and np.isfinite(loss.item())
    loss.backward()
    assert model.model.embed_tokens.weight.grad is not None   # both uses of the tied weight accumulate


def test_config_validation_errors():
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="n_kv_heads"):
        GPTConfig(d_model=32, n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="unknown GPTConfig fields"):
        GPTConfig.from_dict({"d_model": 32, "hidden": 3})
    with pytest.raises(ValueError, match="max_seq_len"):
        GPT(tiny_config())(np.zeros((1, 13), dtype=np.int64))


def test_state_dict_round_trip_and_strict_errors():
    manual_seed(1)
    a, b = GPT(tiny_config()), GPT(tiny_config())
    ids = np.arange(8).reshape(1, 8) % 11
    assert not np.allclose(a(ids).numpy(), b(ids).numpy())
    b.load_state_dict(a.state_dict())
    np.testing.assert_array_equal(a(ids).numpy(), b(ids).numpy())
    state = a.state_dict()
    state.pop("model.norm.weight")
    state["extra.weight"] = np.zeros(3, dtype=np.float32)
    state["model.layers.0.self_attn.q_proj.weight"] = np.zeros((4, 4), dtype=np.float32)
    with pytest.raises(StateDictError) as info:
        b.load_state_dict(state)
    message = str(info.value)
    assert "missing keys (1): model.norm.weight" in message
    assert "unexpected keys (1): extra.weight" in message
    assert "model.layers.0.self_attn.q_proj.weight: checkpoint (4, 4) vs model (16, 16)" in message


def test_train_eval_modes_and_dropout():
    model = GPT(tiny_config(dropout=0.5))
    ids = np.arange(10).reshape(1, 10) % 11
    model.eval()
    np.testing.assert_array_equal(model(ids).numpy(), model(ids).numpy())
    model.train()
    assert all(m.training for _, m in model.named_modules())
    assert not np.allclose(model(ids).numpy(), model(ids).numpy())


def test_to_dtype_keeps_parameter_identity():
    model = GPT(tiny_config(tie_embeddings=True))
    params = model.parameters()
    model.to(dtype=np.float64)
    assert [id(p) for p in model.parameters()] == [id(p) for p in params]
    assert all(p.dtype == np.float64 for p in params)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def _composed_attention(qkv, heads, kv_heads, theta=10000.0):
    """The unfused oracle: slices, F.rope, F.causal_attention, transpose back."""
    batch, time, _, head_dim = qkv.shape
    qkv = qkv.permute(0, 2, 1, 3)
    q = F.rope(qkv[:, :heads], 0, theta)
    k = F.rope(qkv[:, heads:heads + kv_heads], 0, theta)
    v = qkv[:, heads + kv_heads:]
    return F.causal_attention(q, k, v).permute(0, 2, 1, 3).reshape(batch, time, heads * head_dim)


@pytest.mark.parametrize("keep_probabilities", [True, False])
def test_packed_ops_match_composed_references(keep_probabilities):
    rng = np.random.default_rng(0)
    heads, kv_heads, time, head_dim = 4, 2, 5, 6
    qkv = rng.standard_normal((2, time, heads + 2 * kv_heads, head_dim))
    cos, sin = rope_angles(np.arange(time), head_dim, 10000.0)

    def packed(t):
        return F.rope_attention(t, heads, kv_heads, cos, sin, keep_probabilities=keep_probabilities)

    np.testing.assert_allclose(packed(Tensor(qkv)).numpy(), _composed_attention(Tensor(qkv), heads, kv_heads).numpy(),
                               atol=1e-12)
    assert gradcheck(packed, [qkv]).ok
    gate_up = rng.standard_normal((3, 4, 10)) * 3
    np.testing.assert_allclose(F.swiglu(Tensor(gate_up)).numpy(),
                               F.swiglu(Tensor(gate_up[..., :5]), Tensor(gate_up[..., 5:])).numpy(), atol=1e-12)
    assert gradcheck(lambda t: F.swiglu(t), [gate_up]).ok


@pytest.mark.parametrize("block, heads, kv_heads", [(1, 2, 2), (2, 4, 2), (3, 4, 1), (7, 4, 2)])
def test_blocked_causal_attention_matches_the_composed_reference(monkeypatch, block, heads, kv_heads):
    """The CPU training path cuts the query rows into blocks that see only the keys up to their diagonal;
    every block size (one row, uneven last block, a single block) must give the unblocked result and
    gradient, with grouped heads too, and the blocked path must be the one that ran."""
    from tinygrad_llm.ops import attention
    monkeypatch.setattr(attention, "QUERY_BLOCK", block)
    calls = []
    blocked_forward = attention._blocked_forward
    monkeypatch.setattr(attention, "_blocked_forward",
                        lambda *a, **kw: calls.append(a[4]) or blocked_forward(*a, **kw))
    rng = np.random.default_rng(block)
    time, head_dim = 7, 4
    qkv = rng.standard_normal((2, time, heads + 2 * kv_heads, head_dim))
    cos, sin = rope_angles(np.arange(time), head_dim, 10000.0)

    def packed(t):
        return F.rope_attention(t, heads, kv_heads, cos, sin, keep_probabilities=True)

    np.testing.assert_allclose(packed(Tensor(qkv)).numpy(), _composed_attention(Tensor(qkv), heads, kv_heads).numpy(),
                               atol=1e-12)
    assert calls and set(calls) == {block}
    assert gradcheck(packed, [qkv]).ok


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_blocked_causal_attention_with_rows_far_apart(monkeypatch, dtype, fused):
    """The blocked path's NumPy softmax shifts each block of scores by the block's maximum; a query whose
    scores lie far below another row's of the same head (here 1000× larger q rows) must still get its own
    softmax (the per-row fallback), not zeros or NaN, in float32 too. The compiled loop (fused) shifts
    every row by its own maximum: the same result, no fallback."""
    from tinygrad_llm.ops import attention, fused_cpu
    if not fused:
        monkeypatch.setattr(fused_cpu, "_library", None)
    elif fused_cpu.library() is None:
        pytest.skip("the fused CPU loops could not be built here")
    shifted = []
    block_shift = attention._softmax_block_shift
    monkeypatch.setattr(attention, "_softmax_block_shift", lambda s: shifted.append(block_shift(s)) or shifted[-1])
    rng = np.random.default_rng(11)
    time, heads, head_dim = 6, 2, 4
    qkv = rng.standard_normal((2, time, 3 * heads, head_dim))
    qkv[:, 1::2, :heads] *= 1000.0                                # every other query row: huge scores
    cos, sin = rope_angles(np.arange(time), head_dim, 10000.0)
    got = F.rope_attention(Tensor(qkv.astype(dtype)), heads, heads, cos.astype(dtype), sin.astype(dtype),
                           keep_probabilities=True).numpy()
    expected = _composed_attention(Tensor(qkv), heads, heads).numpy()
    assert (False in shifted) if not fused else not shifted       # the fallback ran / the compiled loop did
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, expected, rtol=1e-4 if dtype == np.float32 else 1e-10, atol=1e-4)


def test_tied_embedding_gradient_is_the_sum_of_its_two_uses():
    """With tie_embeddings one matrix is both the embedding table and the output head: its gradient must be
    the lookup's scatter-add plus the head's Gᵀ x, each computed here from a model whose two uses are split."""
    manual_seed(7)
    config = tiny_config(tie_embeddings=True)
    tied = GPT(config)
    tied.to(dtype=np.float64)
    ids = np.random.default_rng(8).integers(0, 11, (2, 7))
    _, loss = tied(ids[:, :-1], ids[:, 1:], return_logits=False)
    loss.backward()
    untied = GPT(tiny_config(tie_embeddings=False))
    untied.to(dtype=np.float64)
    untied.load_state_dict({**tied.state_dict(), "lm_head.weight": tied.lm_head.weight.data.copy()})
    _, loss_split = untied(ids[:, :-1], ids[:, 1:], return_logits=False)
    loss_split.backward()
    embedding_part = untied.model.embed_tokens.weight.grad
    head_part = untied.lm_head.weight.grad
    assert np.abs(embedding_part).max() > 0 and np.abs(head_part).max() > 0
    np.testing.assert_allclose(loss.item(), loss_split.item(), rtol=1e-12)
    np.testing.assert_allclose(tied.model.embed_tokens.weight.grad, embedding_part + head_part, rtol=1e-9, atol=1e-13)
    assert not np.allclose(tied.model.embed_tokens.weight.grad, head_part)         # both uses count


@pytest.mark.parametrize("return_logits, tie_embeddings", [(True, False), (False, False), (False, True)])
def test_every_parameter_of_a_two_layer_model_passes_gradcheck(return_logits, tie_embeddings):
    """float64 finite differences through the whole model (embeddings, GQA attention, MLP, norms, loss), with
    the loss from linear + cross_entropy and from the fused head, and with tied embeddings."""
    manual_seed(3)
    model = GPT(tiny_config(d_model=8, n_heads=2, n_kv_heads=1, ffn_hidden=12, vocab_size=7, max_seq_len=6,
                            tie_embeddings=tie_embeddings))
    model.to(dtype=np.float64)
    for p in model.parameters():           # norm gains away from 1 so their gradients are generic
        if p.ndim == 1:
            p.data[...] = 1 + 0.3 * np.random.default_rng(4).standard_normal(p.shape)
    named = list(model.named_parameters())
    ids = np.random.default_rng(5).integers(0, 7, (2, 5))
    targets = np.random.default_rng(6).integers(0, 7, (2, 5))

    def loss_of(*tensors):
        # run the model with the gradcheck tensors standing in for the parameters
        originals = {}
        for (name, p), t in zip(named, tensors):
            owner = model
            *path, attribute = name.split(".")
            for part in path:
                owner = owner[int(part)] if part.isdigit() else getattr(owner, part)
            originals[(id(owner), attribute)] = (owner, attribute, getattr(owner, attribute))
            setattr(owner, attribute, t)
        if tie_embeddings:          # the head's use of the one tied matrix must see the same stand-in
            originals[(id(model.lm_head), "weight")] = (model.lm_head, "weight", model.lm_head.weight)
            model.lm_head.weight = model.model.embed_tokens.weight
        try:
            _, loss = model(ids, targets, return_logits=return_logits)
        finally:
            for owner, attribute, value in originals.values():
                setattr(owner, attribute, value)
        return loss

    result = gradcheck(loss_of, [p.data.copy() for _, p in named], max_elements_per_input=6, seed=0)
    assert result.ok, str(result)
    assert result.checked_elements >= 6 * len(named) - 20


def test_overfits_one_batch():
    manual_seed(0)
    model = GPT(GPTConfig(vocab_size=16, d_model=32, n_layers=2, n_heads=4, ffn_hidden=64, max_seq_len=16))
    ids = np.random.default_rng(0).integers(0, 16, (4, 17))
    x, y = ids[:, :-1], ids[:, 1:]
    optimizer = AdamW(model.named_parameters(), lr=1e-2, betas=(0.9, 0.99))
    for _ in range(150):
        _, loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert loss.item() < 0.05


def test_linear_cross_entropy_matches_composed_path():
    rng = np.random.default_rng(1)
    x, weight = rng.standard_normal((3, 70, 8)), rng.standard_normal((13, 8))   # 210 rows: several threads
    targets = rng.integers(0, 13, (3, 70))
    targets[0, :5] = -100                                                        # ignored positions
    xt, wt = Tensor(x, requires_grad=True), Tensor(weight, requires_grad=True)
    fused = F.linear_cross_entropy(xt, wt, targets)
    fused.backward(np.asarray(2.0))
    xr, wr = Tensor(x, requires_grad=True), Tensor(weight, requires_grad=True)
    composed = F.cross_entropy(F.linear(xr, wr), targets)
    composed.backward(np.asarray(2.0))
    np.testing.assert_allclose(fused.item(), composed.item(), rtol=1e-12)
    np.testing.assert_allclose(xt.grad, xr.grad, atol=1e-12)
    np.testing.assert_allclose(wt.grad, wr.grad, atol=1e-12)
    small = targets[:1, :6]
    assert gradcheck(lambda a, b: F.linear_cross_entropy(a, b, small), [x[:1, :6], weight]).ok
    model = GPT(tiny_config())
    ids = rng.integers(0, 11, (2, 9))
    _, loss = model(ids, ids, return_logits=False)
    np.testing.assert_allclose(loss.item(), model(ids, ids)[1].item(), rtol=1e-5)


def test_chunked_rms_norm_matches_the_plain_path():
    rng = np.random.default_rng(2)
    x, w = rng.standard_normal((5, 300, 7)), 1 + 0.3 * rng.standard_normal(7)    # many chunks
    dy = rng.standard_normal(x.shape)
    a, wa = Tensor(x, requires_grad=True), Tensor(w, requires_grad=True)
    b, wb = Tensor(x, requires_grad=True), Tensor(w, requires_grad=True)
    ya, yb = F.rms_norm(a, wa, 1e-5, chunked=True), F.rms_norm(b, wb, 1e-5, chunked=False)
    assert ya._ctx.saved[0] == "chunked" and yb._ctx.saved[0] == "plain"
    ya.backward(dy)
    yb.backward(dy)
    np.testing.assert_allclose(ya.numpy(), yb.numpy(), atol=1e-12)
    np.testing.assert_allclose(a.grad, b.grad, atol=1e-12)
    np.testing.assert_allclose(wa.grad, wb.grad, atol=1e-10)
    assert gradcheck(lambda t, v: F.rms_norm(t, v, 1e-5, chunked=True), [x[:1, :4], w]).ok


def test_balanced_row_chunks_give_the_same_results_on_any_thread_count(monkeypatch):
    """RMSNorm (with its residual add) and SwiGLU cut their rows into chunks whose count depends on the
    thread count; with chunks of a few rows, 1 and 3 threads must give bit-identical values and gradients,
    equal to the unchunked plain path."""
    from tinygrad_llm import cpu_threads
    monkeypatch.setattr(cpu_threads, "CHUNK_ELEMENTS", 40)
    monkeypatch.setattr(cpu_threads, "SPLIT_ELEMENTS", 8)
    rng = np.random.default_rng(12)
    x, branch, weight = rng.standard_normal((3, 10, 6)), rng.standard_normal((3, 10, 6)), rng.standard_normal(6)
    gate, up, dy = rng.standard_normal((3, 10, 5)), rng.standard_normal((3, 10, 5)), rng.standard_normal((3, 10, 5))

    def run(chunked):
        tensors = [Tensor(a, requires_grad=True) for a in (x, branch, weight, gate, up)]
        total, normed = F.add_rms_norm(*tensors[:3], 1e-5, chunked=chunked)
        (total * normed).sum().backward()
        F.swiglu(tensors[3], tensors[4]).backward(dy)
        return [total.numpy(), normed.numpy()] + [t.grad for t in tensors]

    previous = cpu_threads.thread_count()
    try:
        results = []
        for threads in (1, 3):
            cpu_threads.set_thread_count(threads)
            results.append(run(chunked=True))
    finally:
        cpu_threads.set_thread_count(previous)
    plain = run(chunked=False)
    for one, three, reference in zip(*results, plain):
        np.testing.assert_array_equal(one, three)
        np.testing.assert_allclose(one, reference, rtol=1e-12, atol=1e-12)


def test_threaded_cpu_ops_give_bit_identical_results():
    from tinygrad_llm import cpu_threads
    config = GPTConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64,
                       max_seq_len=32)
    ids = np.random.default_rng(3).integers(0, 40, (6, 33))
    results = []
    previous = cpu_threads.thread_count()
    try:
        for threads in (1, 3):
            cpu_threads.set_thread_count(threads)
            manual_seed(0)
            model = GPT(config)
            optimizer = AdamW(model.named_parameters(), lr=1e-2, weight_decay=0.1)
            _, loss = model(ids[:, :-1], ids[:, 1:], return_logits=False)
            loss.backward()
            optimizer.step()
            results.append((loss.item(), model.state_dict()))
    finally:
        cpu_threads.set_thread_count(previous)
    assert results[0][0] == results[1][0]
    for name, value in results[0][1].items():
        np.testing.assert_array_equal(value, results[1][1][name], err_msg=name)


@pytest.mark.parametrize("keep_probabilities, chunked_norm, split_gate_up",
                         [(False, False, True), (True, False, True), (False, True, True), (True, True, False)])
def test_op_options_do_not_change_the_gradients(keep_probabilities, chunked_norm, split_gate_up):
    ids = np.random.default_rng(4).integers(0, 11, (3, 12))

    def gradients(options):
        manual_seed(5)
        model = GPT(tiny_config(), options=options)
        model.to(dtype=np.float64)
        _, loss = model(ids[:, :-1], ids[:, 1:], return_logits=False)
        loss.backward()
        return {n: p.grad for n, p in model.named_parameters()}

    reference = gradients(OpOptions())                             # the defaults: all on
    options = OpOptions(keep_attention_probabilities=keep_probabilities, chunked_norm=chunked_norm,
                        split_gate_up=split_gate_up)
    for name, grad in gradients(options).items():
        np.testing.assert_allclose(grad, reference[name], rtol=1e-9, atol=1e-12, err_msg=name)
