"""The flash-attention kernels (tinygrad_llm.gpu.attention) against the NumPy op, in float64.

Every check draws fresh random inputs, poisons every output buffer with NaN before the launch (so an
element the kernel forgot to write fails), and compares ‖kernel − reference‖ / ‖reference‖ with the
reference computed by `CausalAttention` on the inputs upcast to float64 (bf16/fp16 inputs are rounded
first, so only the kernel's own arithmetic is measured). Tolerances: 1e-2 for bf16 and fp16, 1e-5 for
fp32. Both paths of head dims 64 and 128 are checked on a Hopper GPU (the wgmma builds and the mma.sync
ones the other GPUs run). GPU tests skip cleanly where CuPy or a GPU is missing.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinygrad_llm import backend, gpu
from tinygrad_llm.gpu import arrays, attention, compiler, registry
from tinygrad_llm.ops.attention import CausalAttention

TOLERANCE = {"bfloat16": 1e-2, "float16": 1e-2, "float32": 1e-5}


def _dtype(name):
    if name == "bfloat16":
        ml_dtypes = pytest.importorskip("ml_dtypes")
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _reference(q, k, v, dy):
    """out, lse, dq, dk, dv of the NumPy op in float64."""
    op = CausalAttention()
    q, k, v, dy = (np.asarray(a, dtype=np.float64) for a in (q, k, v, dy))
    out = op.forward(q, k, v)
    lse = op.saved[5].reshape(q.shape[:3])        # saved: path, q, k, v, out, L (B, Hkv, G·Tq, 1), packed
    dq, dk, dv = op.backward(dy)
    return out, lse, dq, dk, dv


def _relative_error(got, want):
    """‖got − want‖ / ‖want‖, where a reference of RMS below 1e-3 counts as zero (T = 1 has dq = dk = 0
    exactly; the kernel's rounding noise there is not a relative error)."""
    got = np.asarray(backend.to_numpy(got), dtype=np.float64)
    assert np.isfinite(got).all(), "non-finite values: an output element was left unwritten (NaN poison)"
    return np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-3 * np.sqrt(want.size))


def _inputs(rng, dtype, batch, heads, kv_heads, query_len, key_len, head_dim):
    """q, k, v, dy rounded to dtype (host arrays)."""
    shapes = [(batch, heads, query_len, head_dim), (batch, kv_heads, key_len, head_dim),
              (batch, kv_heads, key_len, head_dim), (batch, heads, query_len, head_dim)]
    return [rng.standard_normal(shape).astype(np.float32).astype(dtype) for shape in shapes]


@pytest.fixture
def poisoned(monkeypatch):
    monkeypatch.setattr(arrays, "POISON_OUTPUTS", True)


def test_supports_needs_gpu_arrays_and_known_head_dims():
    q = np.zeros((1, 2, 4, 64), np.float32)
    assert not attention.supports(q, q, q)                      # host arrays never take the kernel
    assert not gpu.supports("causal_attention", q, q, q)


CASES = [  # (batch, heads, kv_heads, query_len, key_len)
    (1, 1, 1, 1, 1),          # T = 1
    (2, 2, 1, 37, 37),        # odd T, GQA 2
    (1, 4, 1, 130, 130),      # more than two tiles, GQA 4
    (2, 3, 3, 64, 64),        # exactly one tile
    (1, 4, 2, 1, 77),         # a decoding step: one query, 77 cached keys
    (1, 2, 2, 33, 200),       # Tq < Tk, both off the tile size
    (1, 4, 4, 100, 100),      # GQA 1
]


# (head dim, dtype, hopper): hopper True runs the wgmma builds (compute capability 9.0 only), "other" the
# same with the second wgmma forward (wp3 at head dim 64) at every shape, False the mma.sync
# builds every other GPU runs, None whatever the GPU picks (float32 has one path)
PATHS = [(64, "bfloat16", True), (64, "bfloat16", "other"), (64, "bfloat16", False), (64, "float16", True),
         (64, "float16", "other"), (64, "float16", False),
         (128, "bfloat16", True), (128, "bfloat16", False), (128, "float16", True), (128, "float16", False),
         (64, "float32", None), (128, "float32", None)]


def _choose_path(hopper, monkeypatch, head_dim=64):
    """hopper True: the wgmma builds (skips off compute capability 9.0; the environment's list of wgmma head
    dims is cleared, so they are what runs); "other": the same, with this head dim's second forward build
    taken at every shape; False: the mma.sync builds, also on Hopper; None: the default."""
    if hopper and not attention.hopper_available():
        pytest.skip("the wgmma builds need compute capability 9.0 (sm_90a)")
    if hopper:
        monkeypatch.delenv(attention.WGMMA_ENV, raising=False)
    if hopper == "other":
        build, _ = attention._HOPPER_FORWARD_OTHER[head_dim]
        monkeypatch.setitem(attention._HOPPER_FORWARD_OTHER, head_dim, (build, 0.0))
    if hopper is False:
        monkeypatch.setattr(attention, "hopper_available", lambda: False)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim,dtype_name,hopper", PATHS, ids=lambda p: str(p))
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}H{}Hkv{}Tq{}Tk{}".format(*c))
def test_forward_backward_match_numpy_float64(head_dim, dtype_name, hopper, case, poisoned, monkeypatch):
    """Every kernel the package ships, forward and backward, against the NumPy op."""
    _choose_path(hopper, monkeypatch, head_dim)
    cp = backend.cupy_module()
    dtype = _dtype(dtype_name)
    rng = np.random.default_rng()
    batch, heads, kv_heads, query_len, key_len = case
    q, k, v, dy = _inputs(rng, dtype, batch, heads, kv_heads, query_len, key_len, head_dim)
    gq, gk, gv, gdy = (cp.asarray(a) for a in (q, k, v, dy))
    assert gpu.supports("causal_attention", gq, gk, gv)

    out, lse = attention.causal_attention_forward(gq, gk, gv)
    dq, dk, dv = attention.causal_attention_backward(gdy, gq, gk, gv, out, lse)
    assert out.dtype == gq.dtype and dq.dtype == gq.dtype and dk.dtype == gk.dtype and dv.dtype == gv.dtype
    assert lse.dtype == np.float32 and lse.shape == (batch, heads, query_len)

    want = _reference(q, k, v, dy)
    tolerance = TOLERANCE[dtype_name]
    for name, got, expected in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, dq, dk, dv), want):
        error = _relative_error(got, expected)
        assert error <= tolerance, f"{name}: relative error {error:.2e} > {tolerance:.0e}"


def _assert_forward_backward_match_numpy(dtype_name, batch, heads, kv_heads, time, head_dim):
    """Forward and backward of random inputs of this shape on the GPU against the float64 op."""
    cp = backend.cupy_module()
    q, k, v, dy = _inputs(np.random.default_rng(), _dtype(dtype_name), batch, heads, kv_heads, time, time, head_dim)
    gq, gk, gv, gdy = (cp.asarray(a) for a in (q, k, v, dy))
    out, lse = attention.causal_attention_forward(gq, gk, gv)
    grads = attention.causal_attention_backward(gdy, gq, gk, gv, out, lse)
    for name, got, expected in zip(("out", "lse", "dq", "dk", "dv"), (out, lse) + tuple(grads),
                                   _reference(q, k, v, dy)):
        error = _relative_error(got, expected)
        assert error <= TOLERANCE[dtype_name], f"{name}: relative error {error:.2e}"


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim,dtype_name,time,hopper", [(64, "bfloat16", 1000, None), (64, "float32", 1000, None),
                                                             (128, "bfloat16", 1000, None), (64, "bfloat16", 2100, "other")])
def test_large_sequence_matches_numpy(head_dim, dtype_name, time, hopper, poisoned, monkeypatch):
    """Long sequences; 2100 queries on wp3 at head dim 64 (on Hopper), its first 192-row tile partial."""
    _choose_path(hopper, monkeypatch, head_dim)
    _assert_forward_backward_match_numpy(dtype_name, 2, 4, 2, time, head_dim)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim,hopper", [(64, None), (64, "other"), (128, None)])
def test_persistent_forward_over_several_rounds_of_items_matches_numpy(head_dim, hopper, poisoned, monkeypatch):
    """The Hopper forward is persistent (one block a multiprocessor, items dealt in pairs round after
    round): with more items (128 or 192 rows, as the build takes) than two rounds of blocks, of one to four
    key tiles, every item is computed once and right (the mma.sync builds elsewhere)."""
    _choose_path(hopper, monkeypatch, head_dim)
    batch, heads, kv_heads, time = 4, 32, 8, 400            # 4 · 32 · 4 or (wp3) 4 · 32 · 3 items
    blocks = arrays.multiprocessors()
    build, _ = attention._builds(head_dim, attention.hopper_available(), (batch * heads, time, time, blocks))
    block_q = build.block_q if build.hopper else 128
    assert batch * heads * -(-time // block_q) > 2 * blocks
    _assert_forward_backward_match_numpy("bfloat16", batch, heads, kv_heads, time, head_dim)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim,dtype_name", [(64, "bfloat16"), (64, "float32"), (128, "bfloat16")])
def test_output_at_t_ignores_keys_after_t(head_dim, dtype_name):
    """Causality: replacing the keys and values after position t leaves outputs 0 … t bit-identical."""
    cp = backend.cupy_module()
    dtype = _dtype(dtype_name)
    rng = np.random.default_rng()
    q, k, v, _ = _inputs(rng, dtype, 1, 4, 2, 150, 150, head_dim)
    t = 70
    k2, v2 = k.copy(), v.copy()
    k2[:, :, t + 1:] = rng.standard_normal(k2[:, :, t + 1:].shape).astype(np.float32).astype(dtype)
    v2[:, :, t + 1:] = rng.standard_normal(v2[:, :, t + 1:].shape).astype(np.float32).astype(dtype)
    out, lse = attention.causal_attention_forward(cp.asarray(q), cp.asarray(k), cp.asarray(v))
    out2, lse2 = attention.causal_attention_forward(cp.asarray(q), cp.asarray(k2), cp.asarray(v2))
    first, second = backend.to_numpy(out), backend.to_numpy(out2)
    assert np.array_equal(first[:, :, :t + 1].view(np.uint8), second[:, :, :t + 1].view(np.uint8))
    assert np.array_equal(backend.to_numpy(lse)[:, :, :t + 1], backend.to_numpy(lse2)[:, :, :t + 1])
    assert not np.array_equal(first[:, :, t + 1:].view(np.uint8), second[:, :, t + 1:].view(np.uint8))


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
def test_dk_dv_are_deterministic(head_dim):
    """dk and dv are summed inside one block (no atomics): two runs agree bit for bit."""
    cp = backend.cupy_module()
    dtype = _dtype("bfloat16")
    rng = np.random.default_rng()
    q, k, v, dy = (cp.asarray(a) for a in _inputs(rng, dtype, 2, 4, 1, 200, 200, head_dim))
    out, lse = attention.causal_attention_forward(q, k, v)
    _, dk1, dv1 = attention.causal_attention_backward(dy, q, k, v, out, lse)
    _, dk2, dv2 = attention.causal_attention_backward(dy, q, k, v, out, lse)
    assert np.array_equal(backend.to_numpy(dk1).view(np.uint16), backend.to_numpy(dk2).view(np.uint16))
    assert np.array_equal(backend.to_numpy(dv1).view(np.uint16), backend.to_numpy(dv2).view(np.uint16))


@pytest.mark.gpu
def test_op_dispatches_to_the_kernel(monkeypatch):
    """F.causal_attention on GPU tensors runs these kernels and agrees with the CPU path."""
    import tinygrad_llm.functional as F
    from tinygrad_llm import Tensor
    calls = []
    forward, backward = gpu.causal_attention_forward, gpu.causal_attention_backward
    monkeypatch.setattr(gpu, "causal_attention_forward", lambda *a: calls.append("f") or forward(*a))
    monkeypatch.setattr(gpu, "causal_attention_backward", lambda *a: calls.append("b") or backward(*a))
    rng = np.random.default_rng()
    q, k, v, dy = _inputs(rng, np.float32, 2, 4, 2, 45, 45, 64)
    results = {}
    for device in ("cpu", "cuda"):
        tensors = [Tensor(backend.to_device(a, device), requires_grad=True) for a in (q, k, v)]
        out = F.causal_attention(*tensors)
        (out * Tensor(backend.to_device(dy, device))).sum().backward()
        results[device] = [backend.to_numpy(out.data)] + [backend.to_numpy(t.grad) for t in tensors]
    assert calls == ["f", "b"]
    for got, want in zip(results["cuda"], results["cpu"]):
        assert _relative_error(got, want.astype(np.float64)) <= 1e-5


def _model_gradients(device, ids, targets, config):
    from tinygrad_llm import manual_seed
    from tinygrad_llm.model import GPT
    manual_seed(1234)
    model = GPT(config).to(device)
    _, loss = model(backend.to_device(ids, device), backend.to_device(targets, device))
    loss.backward()
    return {name: backend.to_numpy(p.grad).astype(np.float64) for name, p in model.named_parameters()}


@pytest.mark.gpu
def test_whole_model_gradients_match_cpu(monkeypatch):
    """A small GQA model (D = 64, G = 2) in float32. Its parameter gradients on the GPU with the attention
    kernels in place match (a) the GPU run with attention on its NumPy-expressed path (CuPy), which
    isolates these kernels, to 1e-4, and (b) the CPU path to 1e-3, which also covers the other GPU kernels."""
    from tinygrad_llm.model import GPTConfig
    config = GPTConfig(vocab_size=97, d_model=128, n_layers=2, n_heads=2, n_kv_heads=1, ffn_hidden=256,
                       max_seq_len=64)
    rng = np.random.default_rng()
    ids = rng.integers(0, config.vocab_size, size=(2, 45))
    targets = rng.integers(0, config.vocab_size, size=(2, 45))

    calls = []
    backward = gpu.causal_attention_backward
    monkeypatch.setattr(gpu, "causal_attention_backward", lambda *a, **kw: calls.append(1) or backward(*a, **kw))
    with_kernel = _model_gradients("cuda", ids, targets, config)
    assert len(calls) == config.n_layers, "the attention kernel was not used on the GPU"
    monkeypatch.setitem(registry.SUPPORTS, "causal_attention", lambda *arrays: False)
    without_kernel = _model_gradients("cuda", ids, targets, config)
    assert len(calls) == config.n_layers
    cpu = _model_gradients("cpu", ids, targets, config)

    kernel_errors = {name: _relative_error(with_kernel[name], want) for name, want in without_kernel.items()}
    cpu_errors = {name: _relative_error(with_kernel[name], want) for name, want in cpu.items()}
    worst = max(kernel_errors, key=kernel_errors.get)
    assert kernel_errors[worst] <= 1e-4, f"kernel vs NumPy path on the GPU: {worst} {kernel_errors[worst]:.2e}"
    worst = max(cpu_errors, key=cpu_errors.get)
    assert cpu_errors[worst] <= 1e-3, f"GPU vs CPU: {worst} {cpu_errors[worst]:.2e}"


def test_hopper_builds_give_way_to_portable_ones_elsewhere(monkeypatch):
    """The wgmma builds (sm_90a) run at head dims 64 and 128 in bf16/fp16 on compute capability 9.0; any
    other GPU runs the mma.sync builds of the same head dim; head dims without a kernel have no build."""
    monkeypatch.delenv(attention.WGMMA_ENV, raising=False)
    assert attention.kernel_for(64, np.float16, hopper=True) == \
        "forward wp2 or wp3 (by shape), backward wk (wgmma, sm_90a)"
    assert attention.kernel_for(128, np.float16, hopper=True) == "forward wp2, backward wk (wgmma, sm_90a)"
    for empty in [(0, 12, 1024, 1024), (2, 12, 0, 0)]:            # no work: the default build, no error
        assert attention.kernel_for(64, np.float16, hopper=True, shape=empty, blocks=132) == \
            "forward wp2, backward wk (wgmma, sm_90a)"
    for head_dim in attention.HEAD_DIMS:
        assert attention.kernel_for(head_dim, np.float16, hopper=False).endswith("(mma.sync)")
    assert attention.kernel_for(32, np.float16, hopper=True) is None
    assert attention.kernel_for(128, np.float32, hopper=True) == "float32 kernels"


@pytest.mark.parametrize("value,wgmma", [("64", {64}), ("128", {128}), ("64,128", {64, 128}), (" 128 , 64 ", {64, 128}),
                                         ("none", set()), ("", set())])
def test_environment_picks_the_head_dims_of_the_wgmma_builds(value, wgmma, monkeypatch):
    """TINYGRAD_LLM_ATTENTION_WGMMA lists the head dims that take the wgmma builds on Hopper (the way back to
    the mma.sync builds of a head dim without a code change); the others run their mma.sync builds."""
    monkeypatch.setenv(attention.WGMMA_ENV, value)
    fallback = {64: "forward w4m2, backward w4m2q32p (mma.sync)", 128: "forward w8, backward w4 (mma.sync)"}
    for head_dim in attention.HEAD_DIMS:
        want = "forward wp2, backward wk (wgmma, sm_90a)" if head_dim in wgmma else fallback[head_dim]
        assert attention.kernel_for(head_dim, np.float16, hopper=True, shape=(16, 12, 1024, 1024), blocks=132) == want
        assert attention.kernel_for(head_dim, np.float16, hopper=False) == fallback[head_dim]


# (batch · heads, query length, key length, forward wp2 ms, forward wp3 ms): H100 (132 multiprocessors),
# bf16, head dim 64, benchmarks/RESULTS.md session 17 (T 1024 and 4096 from session 16), the slower round
MEASURED_FORWARDS = [(192, 1024, 1024, 0.101, 0.106), (144, 1536, 1536, 0.151, 0.144),
                     (96, 2048, 2048, 0.162, 0.177), (72, 3072, 3072, 0.256, 0.239), (48, 4096, 4096, 0.280, 0.239)]


@pytest.mark.parametrize("batch_heads,query_len,key_len,wp2_ms,wp3_ms", MEASURED_FORWARDS)
def test_head_dim_64_takes_the_forward_build_measured_faster(batch_heads, query_len, key_len, wp2_ms, wp3_ms,
                                                                monkeypatch):
    """At head dim 64 on Hopper, the load model picks the forward build that was timed faster on each of
    the measured shapes; head dim 128 always wp2; the mma.sync builds and the backward never change."""
    monkeypatch.delenv(attention.WGMMA_ENV, raising=False)
    batch, heads = batch_heads // 12, 12
    forward = "wp2" if wp2_ms < wp3_ms else "wp3"
    shape = (batch, heads, query_len, key_len)
    assert attention.kernel_for(64, np.float16, hopper=True, shape=shape, blocks=132) == \
        f"forward {forward}, backward wk (wgmma, sm_90a)"
    assert attention.kernel_for(128, np.float16, hopper=True, shape=shape, blocks=132) == \
        "forward wp2, backward wk (wgmma, sm_90a)"
    assert attention.kernel_for(64, np.float16, hopper=False, shape=shape, blocks=132) == \
        "forward w4m2, backward w4m2q32p (mma.sync)"
    forward_build, _ = attention._builds(64, True, (batch_heads, query_len, key_len, 132))
    assert (forward_build.name, forward_build.block_q) == (forward, 128 if forward == "wp2" else 192)


def _replayed_loads(batch_heads, query_len, key_len, blocks, block_q):
    """The persistent forward's assignment, item by item, as attention_hopper.cu's work() walks it: each
    block's items 0, 1, 2, … (pair index // 2, long tile first), skipping a middle tile's empty partner."""
    q_blocks = -(-query_len // block_q)
    pad = q_blocks * block_q - query_len
    items = batch_heads * q_blocks
    grid = min(items, blocks)
    pairs_per_head = (q_blocks + 1) // 2
    loads = [0] * grid
    for x in range(grid):
        for index in range(2 * items + 2):
            if items > grid:
                pair = (index >> 1) * grid + x
                p = pair % pairs_per_head
                if pair >= batch_heads * pairs_per_head:
                    break
                if (index & 1) and 2 * p + 1 == q_blocks:
                    continue
                tile = p if index & 1 else q_blocks - 1 - p
            else:
                if index > 0:
                    break
                tile = q_blocks - 1 - x % q_blocks
            key_end = min(key_len, tile * block_q - pad + block_q + key_len - query_len)
            loads[x] += block_q * -(-key_end // 128)
    return loads


@settings(max_examples=60, deadline=None)
@given(batch_heads=st.integers(1, 400), query_len=st.integers(1, 5000), extra_keys=st.integers(0, 300),
       blocks=st.sampled_from([1, 7, 114, 132]), block_q=st.sampled_from([128, 192]))
def test_forward_loads_replay_the_kernels_assignment(batch_heads, query_len, extra_keys, blocks, block_q):
    """forward_loads (vectorized) agrees with a walk through the kernel's items, and every query tile of
    every head is counted once: the loads add up to the causal work, tile by tile."""
    key_len = query_len + extra_keys
    loads = attention.forward_loads(batch_heads, query_len, key_len, blocks, block_q)
    assert list(loads) == _replayed_loads(batch_heads, query_len, key_len, blocks, block_q)
    q_blocks = -(-query_len // block_q)
    first = query_len - (q_blocks - 1) * block_q                       # rows of the (partial) first tile
    tile_ends = [min(key_len, first + j * block_q + extra_keys) for j in range(q_blocks)]
    assert sum(loads) == batch_heads * block_q * sum(-(-end // 128) for end in tile_ends)


@pytest.mark.parametrize("value", ["96", "64,32", "yes", "64;128"])
def test_environment_naming_no_wgmma_head_dim_is_an_error(value, monkeypatch):
    monkeypatch.setenv(attention.WGMMA_ENV, value)
    with pytest.raises(ValueError, match=attention.WGMMA_ENV):
        attention.kernel_for(64, np.float16, hopper=True)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
def test_hopper_runs_the_wgmma_build_by_default(head_dim, monkeypatch):
    """On compute capability 9.0, bf16 attention launches the wgmma kernels (and is right)."""
    if not attention.hopper_available():
        pytest.skip("needs compute capability 9.0")
    monkeypatch.delenv(attention.WGMMA_ENV, raising=False)
    names = []
    launch = attention._kernel
    monkeypatch.setattr(attention, "_kernel", lambda file, name, *rest: names.append(name) or launch(file, name, *rest))
    cp = backend.cupy_module()
    rng = np.random.default_rng()
    q, k, v, dy = _inputs(rng, _dtype("bfloat16"), 2, 4, 2, 300, 300, head_dim)
    gq, gk, gv, gdy = (cp.asarray(a) for a in (q, k, v, dy))
    out, lse = attention.causal_attention_forward(gq, gk, gv)
    grads = attention.causal_attention_backward(gdy, gq, gk, gv, out, lse)
    assert f"attention_forward_bf16_d{head_dim}_wp2" in names
    assert f"attention_backward_bf16_d{head_dim}_wk" in names
    for name, got, expected in zip(("out", "lse", "dq", "dk", "dv"), (out, lse) + tuple(grads),
                                   _reference(q, k, v, dy)):
        assert _relative_error(got, expected) <= TOLERANCE["bfloat16"], name


@pytest.mark.gpu
def test_sm90a_module_is_compiled_once_and_cached_on_disk(tmp_path, monkeypatch):
    """compiler.load_module(..., arch="sm_90a") compiles through NVRTC into <cache>/kernels and, in a fresh
    process (here: an emptied module table), loads that cubin without compiling again."""
    monkeypatch.setenv("TINYGRAD_LLM_CACHE", str(tmp_path))
    monkeypatch.setattr(compiler, "_modules", {})
    compiler.load_module(attention.HOPPER_FILE, arch="sm_90a")
    cubins = list((tmp_path / "kernels").glob("attention_hopper-sm_90a-*.cubin"))
    assert len(cubins) == 1 and cubins[0].stat().st_size > 0
    monkeypatch.setattr(compiler, "_modules", {})
    monkeypatch.setattr(compiler, "compile_cubin", lambda *args: pytest.fail("the cached cubin was compiled again"))
    module = compiler.load_module(attention.HOPPER_FILE, arch="sm_90a")
    assert module.get_function("attention_backward_fp16_d64_wk") is not None
    assert module.get_function("attention_forward_bf16_d128_wp2_dropout") is not None
    assert module.get_function("attention_forward_fp16_d64_wp3") is not None


@pytest.mark.gpu
def test_sm90a_compile_error_names_the_file_and_shows_the_log(tmp_path, monkeypatch):
    kernels = tmp_path / "kernels"
    kernels.mkdir()
    (kernels / "broken.cu").write_text('extern "C" __global__ void broken() { not_declared_anywhere(); }\n')
    monkeypatch.setenv("TINYGRAD_LLM_KERNELS_DIR", str(kernels))
    monkeypatch.setenv("TINYGRAD_LLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(compiler, "_modules", {})
    with pytest.raises(RuntimeError, match=r"(?s)NVRTC could not compile broken\.cu.*not_declared_anywhere"):
        compiler.load_module("broken.cu", arch="sm_90a")
    assert not list((tmp_path / "cache").rglob("*.cubin"))


# ------------------------------------------------------------------ strided layouts and the packed op
def _embedded(cp, array, extra, first, poison=True):
    """array (B, heads, T, D) (host or None) as the (B, heads, T, D) view of heads first … first + heads − 1
    of a token-major buffer (B, T, heads + extra, D) (the layout of a packed projection); the rest of the
    buffer holds NaN, so a kernel that writes outside the view, or an output element left unwritten, shows.
    Returns (view, buffer)."""
    batch, heads, time, head_dim = array.shape
    buffer = cp.full((batch, time, heads + extra, head_dim), np.nan, dtype=array.dtype)
    view = buffer[:, :, first:first + heads].transpose(0, 2, 1, 3)          # (B, T, ·, D) -> (B, heads, T, D)
    if not poison:
        view[...] = cp.asarray(array)
    return view, buffer


def _outside(buffer, first, heads):
    """The heads of buffer (B, T, ·, D) outside first … first + heads − 1, on the host."""
    host = backend.to_numpy(buffer).astype(np.float32)
    return np.concatenate([host[:, :, :first], host[:, :, first + heads:]], axis=2)


STRIDED_CASES = [  # (batch, heads, kv_heads, query_len, key_len)
    (2, 4, 2, 130, 130),      # GQA 2, more than one tile of every build
    (1, 2, 2, 33, 200),       # Tq < Tk, both off the tile size
]


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim,dtype_name,hopper", PATHS, ids=lambda p: str(p))
@pytest.mark.parametrize("case", STRIDED_CASES, ids=lambda c: "B{}H{}Hkv{}Tq{}Tk{}".format(*c))
def test_strided_views_are_read_and_written_in_place(head_dim, dtype_name, hopper, case, monkeypatch):
    """q, k, v, dy and the outputs out, dq, dk, dv as views of token-major buffers (what the packed op
    hands the kernels): the kernels read and write them through their strides, with no copy (contiguous is
    refused for 4-d arrays here), touch nothing outside them, and give what the NumPy op gives; out, lse,
    dk and dv bit for bit what the contiguous launch gives (the same arithmetic at other addresses)."""
    _choose_path(hopper, monkeypatch, head_dim)
    cp = backend.cupy_module()
    dtype = _dtype(dtype_name)
    batch, heads, kv_heads, query_len, key_len = case
    q, k, v, dy = _inputs(np.random.default_rng(), dtype, batch, heads, kv_heads, query_len, key_len, head_dim)
    gq, gq_buffer = _embedded(cp, q, 3, 1, poison=False)
    gk, gk_buffer = _embedded(cp, k, 1, 0, poison=False)
    gv, gv_buffer = _embedded(cp, v, 2, 2, poison=False)
    gdy, _ = _embedded(cp, dy, 0, 0, poison=False)
    out, out_buffer = _embedded(cp, q, 1, 1)
    dq, dq_buffer = _embedded(cp, q, 2, 0)
    dk, dk_buffer = _embedded(cp, k, 2, 1)
    dv, dv_buffer = _embedded(cp, v, 1, 0)
    copy = attention.contiguous
    monkeypatch.setattr(attention, "contiguous", lambda x: pytest.fail("a strided view was copied") if x.ndim == 4
                        else copy(x))

    got_out, lse = attention.causal_attention_forward(gq, gk, gv, out=out)
    grads = attention.causal_attention_backward(gdy, gq, gk, gv, out, lse, dq=dq, dk=dk, dv=dv)
    assert got_out is out and all(got is given for got, given in zip(grads, (dq, dk, dv)))
    for buffer, first, count in ((out_buffer, 1, heads), (dq_buffer, 0, heads), (dk_buffer, 1, kv_heads),
                                 (dv_buffer, 0, kv_heads)):
        assert np.isnan(_outside(buffer, first, count)).all(), "a kernel wrote outside its output view"

    want = _reference(q, k, v, dy)
    for name, got, expected in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, dq, dk, dv), want):
        error = _relative_error(got, expected)
        assert error <= TOLERANCE[dtype_name], f"{name}: relative error {error:.2e} > {TOLERANCE[dtype_name]:.0e}"

    monkeypatch.setattr(attention, "contiguous", copy)
    plain = [cp.asarray(a) for a in (q, k, v, dy)]
    plain_out, plain_lse = attention.causal_attention_forward(*plain[:3])
    _, plain_dk, plain_dv = attention.causal_attention_backward(plain[3], *plain[:3], plain_out, plain_lse)
    for name, got, expected in (("out", out, plain_out), ("lse", lse, plain_lse), ("dk", dk, plain_dk),
                                ("dv", dv, plain_dv)):
        got, expected = backend.to_numpy(cp.ascontiguousarray(got)), backend.to_numpy(expected)
        assert np.array_equal(got.view(f"u{got.itemsize}"), expected.view(f"u{expected.itemsize}")), name


@pytest.mark.gpu
def test_outputs_the_kernels_cannot_write_are_refused():
    cp = backend.cupy_module()
    q = cp.zeros((1, 2, 8, 64), dtype=np.float16)
    with pytest.raises(ValueError, match="out must be"):
        attention.causal_attention_forward(q, q, q, out=cp.zeros((1, 2, 8, 128), dtype=np.float16)[..., ::2])
    with pytest.raises(ValueError, match="out must be"):
        attention.causal_attention_forward(q, q, q, out=cp.zeros((1, 2, 8, 64), dtype=np.float32))


def _inside(view, array) -> bool:
    """view's elements lie in array's memory."""
    return array.data.ptr <= view.data.ptr < array.data.ptr + array.nbytes


def _packed_inputs(generator, dtype, batch, heads, kv_heads, time, head_dim):
    from tinygrad_llm.ops.rope import rope_angles
    qkv = generator.standard_normal((batch, time, heads + 2 * kv_heads, head_dim)).astype(np.float32).astype(dtype)
    dy = generator.standard_normal((batch, time, heads * head_dim)).astype(np.float32).astype(dtype)
    cos, sin = rope_angles(np.arange(time), head_dim, 10000.0)
    return qkv, dy, cos, sin


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim,dtype_name,hopper", PATHS, ids=lambda p: str(p))
def test_packed_rope_attention_matches_numpy(head_dim, dtype_name, hopper, monkeypatch):
    """The packed op (RoPE + attention on qkv (B, T, H + 2Hkv, D) -> (B, T, H·D)) on the GPU kernels
    against the same op in float64 on NumPy: y and d(qkv), GQA, T off the tile size. The kernels get
    strided views, never copies: the forward's q and k are one token-major rotated buffer, v a view of
    qkv, O a view of y (what the op keeps for its backward, so it keeps only the rotated buffer and L)."""
    _choose_path(hopper, monkeypatch, head_dim)
    cp = backend.cupy_module()
    dtype = _dtype(dtype_name)
    batch, heads, kv_heads, time = 2, 4, 2, 150
    qkv, dy, cos, sin = _packed_inputs(np.random.default_rng(), dtype, batch, heads, kv_heads, time, head_dim)
    copy = attention.contiguous
    monkeypatch.setattr(attention, "contiguous", lambda x: pytest.fail("a strided view was copied") if x.ndim == 4
                        else copy(x))
    op = CausalAttention()
    gqkv = cp.asarray(qkv)
    y = op.forward(gqkv, packed=(heads, kv_heads, cp.asarray(cos), cp.asarray(sin)))
    (_, path, (q, k, v, o, lse)), = op.saved[0]                           # parts: one chunk on the GPU
    assert path is gpu
    item = np.dtype(dtype).itemsize
    assert q.strides == k.strides == (time * (heads + kv_heads) * head_dim * item, head_dim * item,
                                      (heads + kv_heads) * head_dim * item, item)  # one (B, T, H + Hkv, D)
    assert k.data.ptr == q.data.ptr + heads * head_dim * item                      # buffer holds q and k
    assert _inside(v, gqkv) and _inside(o, y)                                       # views, no copies
    d_qkv = op.backward(cp.asarray(dy))

    reference = CausalAttention()
    want_y = reference.forward(qkv.astype(np.float64), packed=(heads, kv_heads, cos, sin))
    want_d_qkv = reference.backward(dy.astype(np.float64))
    for name, got, expected in (("y", y, want_y), ("d(qkv)", d_qkv, want_d_qkv)):
        error = _relative_error(got, expected)
        assert error <= TOLERANCE[dtype_name], f"{name}: relative error {error:.2e} > {TOLERANCE[dtype_name]:.0e}"


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim,time,chunk", [(64, 600, None), (128, 1100, None), (128, 600, 5)])
def test_backward_over_several_chunks_of_heads_matches_numpy(head_dim, time, chunk, poisoned, monkeypatch):
    """The wgmma backward deals its (b, kv head, key block) blocks in chunks of heads, key block 0 of
    each head of a chunk first: with 64 (b, kv head) pairs, four chunks of 16 (or 13, the last of 4, with
    chunks of 5), odd and even key-block counts, every block's dk, dv and dq share land where they
    belong (the mma.sync builds elsewhere)."""
    if chunk is not None:
        monkeypatch.setattr(attention, "_HOPPER_BACKWARD_CHUNK", chunk)
    _assert_forward_backward_match_numpy("bfloat16", 4, 32, 16, time, head_dim)
