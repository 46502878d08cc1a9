"""The CUDA kernels of tinygrad_llm.gpu against the ops' NumPy path, and the precision policies.

Every GPU check draws fresh random inputs, poisons every output buffer with NaN before the launch (so an
element a kernel forgot to write fails), and compares ‖kernel − reference‖ / ‖reference‖, where the
reference is the same op's NumPy path run on the CPU in float64 on the very values the kernel saw (bf16 and
fp16 inputs are rounded first, so only the kernel's own arithmetic is measured). Tolerances by dtype:
1e-5 for float32, 1e-2 for bfloat16 and float16. GPU tests skip cleanly where CuPy or a GPU is missing;
the header and policy checks at the top run everywhere.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from tinygrad_llm import backend, gpu, precision
from tinygrad_llm.gpu import arrays, compiler, gemm
from tinygrad_llm.ops.activation import SwiGLU
from tinygrad_llm.ops.embedding import Embedding
from tinygrad_llm.ops.loss import CrossEntropy
from tinygrad_llm.ops.matmul import Linear
from tinygrad_llm.ops.norm import ResidualAdd, RMSNorm
from tinygrad_llm.ops.rope import RoPE

TOLERANCE = {"float32": 1e-5, "bfloat16": 1e-2, "float16": 1e-2}
KERNELS = Path(__file__).resolve().parent.parent / "kernels"
OWN_KERNELS = ["adamw.cu", "cross_entropy.cu", "dropout.cu", "embedding.cu", "rms_norm.cu", "rope.cu", "swiglu.cu"]


def gpu_test(function):
    """A test that needs CuPy and a CUDA device: marked `gpu`, skipped cleanly without them."""
    skip = pytest.mark.skipif(not backend.gpu_available(), reason="needs an NVIDIA GPU and CuPy")
    return pytest.mark.gpu(skip(function))


def _dtype(name):
    return precision.dtype_named(name) if name != "bfloat16" else np.dtype(pytest.importorskip("ml_dtypes").bfloat16)


def _random(rng, shape, dtype, scale=1.0):
    """Standard normal values rounded to dtype (host array)."""
    return (rng.standard_normal(shape) * scale).astype(np.float32).astype(dtype)


def _f64(a):
    return np.asarray(backend.to_numpy(a), dtype=np.float64)


def _relative_error(got, want):
    got = _f64(got)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    assert np.isfinite(got).all(), "non-finite values: an output element was left unwritten (NaN poison)"
    return np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-12)


def _run(function_class, inputs, dy, needs=None, **options):
    """Forward and backward of one op on raw arrays: (y, gradients as a tuple)."""
    op = function_class()
    op.needs_input_grad = needs or (True,) * len(inputs)
    y = op.forward(*inputs, **options)
    grads = op.backward(dy)
    return y, grads if isinstance(grads, tuple) else (grads,)


@pytest.fixture
def poisoned(monkeypatch):
    monkeypatch.setattr(arrays, "POISON_OUTPUTS", True)


@pytest.fixture
def rng():
    return np.random.default_rng()       # fresh inputs every run


# ------------------------------------------------------------------ everywhere: headers and policies
@pytest.mark.parametrize("name", OWN_KERNELS)
def test_kernel_files_open_with_their_contract(name):
    head = (KERNELS / name).read_text().split("#include")[0]
    for word in ("Shapes:", "Launch:"):
        assert word in head, f"{name}: the header must state {word}"
    assert "match" in head, f"{name}: the header must name the NumPy op it must match"


def test_kernels_dir_is_found_from_a_checkout():
    assert (compiler.kernels_dir() / "cross_entropy.cu").is_file()


def test_supports_refuses_host_arrays():
    x = np.zeros((2, 4), np.float32)
    assert not gpu.supports("rms_norm", x, np.ones(4, np.float32))
    assert not gpu.supports("cross_entropy", x)
    assert not gpu.supports("no_such_op", x)
    assert gpu.kernel("rms_norm", x, np.ones(4, np.float32)) is None


LAUNCHERS = ["rms_norm_forward", "rms_norm_backward", "add_rms_norm_forward", "swiglu_forward", "swiglu_backward", "swiglu_packed_forward",
             "swiglu_packed_backward", "rope_forward", "copy_heads", "dropout_forward", "cross_entropy_forward_backward",
             "embedding_backward", "adamw_step", "sum_of_squares", "accumulate_loss", "step_decision", "linear_forward", "linear_backward",
             "causal_attention_forward", "causal_attention_backward", "decode_attention", "quantized_linear"]


def test_the_package_exposes_every_launcher_under_its_op_name():
    missing = [name for name in LAUNCHERS if not callable(getattr(gpu, name, None))]
    assert not missing, missing
    assert set(gpu.registry.SUPPORTS) == {"rms_norm", "add_rms_norm", "swiglu", "swiglu_packed", "rope", "dropout", "cross_entropy",
                                          "embedding", "adamw", "linear", "causal_attention", "decode_attention",
                                          "quantized_linear"}


@gpu_test
def test_kernel_returns_the_launchers_only_while_kernels_are_enabled():
    x = backend.to_device(np.ones((2, 8), np.float32), "cuda")
    weight = backend.to_device(np.ones(8, np.float32), "cuda")
    assert gpu.kernel("rms_norm", x, weight) is gpu
    assert gpu.kernel("no_such_op", x) is None
    backend.set_kernels_enabled(False)
    try:
        assert gpu.kernel("rms_norm", x, weight) is None
    finally:
        backend.set_kernels_enabled(True)


def test_the_cubin_cache_is_the_packages_own(monkeypatch, tmp_path):
    monkeypatch.setenv("TINYGRAD_LLM_CACHE", str(tmp_path))
    assert compiler.cache_dir() == tmp_path / "kernels"
    monkeypatch.delenv("TINYGRAD_LLM_CACHE")
    assert compiler.cache_dir().parts[-2:] == ("tinygrad_llm", "kernels")


def test_attention_kernel_for_names_the_path_or_none():
    assert gpu.attention_kernel_for(64, np.float16, hopper=True) == \
        "forward wp2 or wp3 (by shape), backward wk (wgmma, sm_90a)"
    assert gpu.attention_kernel_for(64, np.float16, hopper=True, shape=(4, 12, 4096, 4096), blocks=132) == \
        "forward wp3, backward wk (wgmma, sm_90a)"
    assert gpu.attention_kernel_for(64, np.float16, hopper=False) == "forward w4m2, backward w4m2q32p (mma.sync)"
    assert gpu.attention_kernel_for(128, np.float16, hopper=False) == "forward w8, backward w4 (mma.sync)"
    assert gpu.attention_kernel_for(128, np.float16, hopper=True) == "forward wp2, backward wk (wgmma, sm_90a)"
    assert gpu.attention_kernel_for(64, np.float32, hopper=True) == "float32 kernels"
    for head_dim in (16, 32, 96):
        assert gpu.attention_kernel_for(head_dim, np.float32, hopper=True) is None
    assert gpu.attention_kernel_for(64, np.float64, hopper=True) is None
    backend.set_kernels_enabled(False)
    try:
        assert gpu.attention_kernel_for(64, np.float16, hopper=True) is None
    finally:
        backend.set_kernels_enabled(True)


def test_a_kernel_that_does_not_compile_raises_with_the_nvrtc_log(monkeypatch, tmp_path):
    broken = tmp_path / "broken.cu"
    broken.write_text('extern "C" __global__ void broken() { this is not cuda; }\n')
    monkeypatch.setenv("TINYGRAD_LLM_KERNELS_DIR", str(tmp_path))
    if not backend.gpu_available():
        assert compiler.kernels_dir() == tmp_path
        with pytest.raises(RuntimeError, match="CUDA was requested"):
            compiler.load_module("broken.cu")
        return
    with pytest.raises(RuntimeError, match="NVRTC could not compile broken.cu"):
        compiler.load_module("broken.cu")


def test_policies_switch_and_restore():
    assert precision.get_policy().name == "fp32"
    with precision.policy("bf16") as active:
        assert active.compute == "bfloat16"
        assert not gemm.linear_supported(np.zeros((2, 2), np.float32), np.zeros((2, 2), np.float32))
    assert precision.get_policy().name == "fp32"
    with pytest.raises(ValueError):
        precision.set_policy("int8")


def test_loss_scaler_backs_off_and_grows():
    scaler = precision.LossScaler(init_scale=1024.0, growth_interval=2)
    assert not scaler.update(finite=False) and scaler.scale == 512.0
    assert scaler.update(finite=True) and scaler.update(finite=True) and scaler.scale == 1024.0


def test_loss_scaler_stays_at_or_below_its_largest_scale():
    scaler = precision.LossScaler(init_scale=2.0 ** 16, growth_interval=1, max_scale=2.0 ** 15)
    assert scaler.scale == 2.0 ** 15 and np.isfinite(np.float16(scaler.scale))
    assert scaler.update(finite=True) and scaler.scale == 2.0 ** 15
    assert not scaler.update(finite=False) and scaler.scale == 2.0 ** 14
    assert scaler.update(finite=True) and scaler.scale == 2.0 ** 15


# ------------------------------------------------------------------ the compile-and-cache helper
@gpu_test
@pytest.mark.parametrize("name", OWN_KERNELS)
def test_every_kernel_file_compiles_with_nvrtc_and_is_cached(name):
    assert compiler.load_module(name) is compiler.load_module(name)


# ------------------------------------------------------------------ RMSNorm
RMS_CASES = [((4, 37, 768), "float32", "float32"), ((3, 5, 100), "float32", "float32"), ((7, 13), "float32", "float32"),
             ((4, 37, 768), "bfloat16", "bfloat16"), ((6, 100), "bfloat16", "bfloat16"),
             ((4, 37, 768), "float16", "float16"), ((2, 64, 768), "bfloat16", "float32"),
             ((5, 9), "float16", "float32"), ((1, 4096), "float32", "float32")]


@gpu_test
@pytest.mark.parametrize("shape,x_dtype,w_dtype", RMS_CASES)
def test_rms_norm_matches_numpy(shape, x_dtype, w_dtype, rng, poisoned):
    x = _random(rng, shape, _dtype(x_dtype))
    weight = (1 + 0.1 * rng.standard_normal(shape[-1])).astype(np.float32).astype(_dtype(w_dtype))
    dy = _random(rng, shape, _dtype(x_dtype))
    want_y, (want_dx, want_dw) = _run(RMSNorm, [_f64(x), _f64(weight)], _f64(dy), eps=1e-5)
    cuda = [backend.to_device(a, "cuda") for a in (x, weight, dy)]
    assert gpu.supports("rms_norm", cuda[0], cuda[1])
    y, (dx, dw) = _run(RMSNorm, cuda[:2], cuda[2], eps=1e-5)
    assert y.dtype == x.dtype and dx.dtype == x.dtype and dw.dtype == weight.dtype
    tolerance = TOLERANCE[x_dtype]
    assert _relative_error(y, want_y) < tolerance
    assert _relative_error(dx, want_dx) < tolerance
    assert _relative_error(dw, want_dw) < tolerance


# (shape, x dtype, branch dtype, y dtype, weight dtype): the float32 stream with a bf16 branch and a bf16
# output is the GPT-2 step's; C = 100 and 13 take the scalar path (C not a multiple of 8)
ADD_NORM_CASES = [((4, 37, 768), "float32", "bfloat16", "bfloat16", "float32"),
                  ((4, 37, 768), "float32", "float32", "float32", "float32"),
                  ((3, 5, 100), "float32", "float16", "float32", "float32"),
                  ((2, 64, 768), "bfloat16", "bfloat16", "bfloat16", "float32"),
                  ((6, 100), "bfloat16", "bfloat16", "bfloat16", "bfloat16"),
                  ((7, 13), "float16", "float16", "float16", "float16")]


@gpu_test
@pytest.mark.parametrize("shape,x_dtype,b_dtype,y_dtype,w_dtype", ADD_NORM_CASES)
def test_add_rms_norm_matches_numpy(shape, x_dtype, b_dtype, y_dtype, w_dtype, rng, poisoned):
    x, branch = _random(rng, shape, _dtype(x_dtype)), _random(rng, shape, _dtype(b_dtype))
    weight = (1 + 0.1 * rng.standard_normal(shape[-1])).astype(np.float32).astype(_dtype(w_dtype))
    dy = _random(rng, shape, _dtype(y_dtype))
    total64 = _f64(x) + _f64(branch.astype(x.dtype))
    want_y, (want_ds, want_dw) = _run(RMSNorm, [total64, _f64(weight)], _f64(dy), eps=1e-5)
    cuda = [backend.to_device(a, "cuda") for a in (x, branch, weight, dy)]
    assert gpu.supports("add_rms_norm", cuda[0], cuda[1], cuda[2], _dtype(y_dtype))
    into = {}
    total = ResidualAdd().forward(cuda[0], cuda[1], norm=(cuda[2], 1e-5, _dtype(y_dtype), into))
    assert "prepared" in into                             # the fused kernel ran
    norm = RMSNorm()
    norm.needs_input_grad = (True, True)
    y = norm.forward(total, cuda[2], eps=1e-5, out_dtype=_dtype(y_dtype), prepared=into["prepared"])
    ds, dw = norm.backward(cuda[3])
    assert total.dtype == x.dtype and y.dtype == _dtype(y_dtype) and ds.dtype == x.dtype and dw.dtype == weight.dtype
    tolerance = max(TOLERANCE[x_dtype], TOLERANCE[y_dtype])
    assert _relative_error(total, total64) < TOLERANCE[x_dtype]
    assert _relative_error(y, want_y) < tolerance
    assert _relative_error(ds, want_ds) < tolerance
    assert _relative_error(dw, want_dw) < tolerance


# (shape, x dtype, dy dtype, weight dtype, low): the float32 stream with bf16/fp16 gradients is the GPT-2
# step's; C = 100 takes the scalar path
PENDING_CASES = [((4, 37, 768), "float32", "bfloat16", "float32", True),
                 ((3, 5, 100), "float32", "float16", "float32", True),
                 ((4, 37, 768), "float32", "float32", "float32", False),
                 ((6, 100), "bfloat16", "bfloat16", "bfloat16", False)]


@gpu_test
@pytest.mark.parametrize("shape,x_dtype,dy_dtype,w_dtype,low", PENDING_CASES)
def test_rms_norm_backward_adds_the_pending_gradient_and_writes_the_low_copy(shape, x_dtype, dy_dtype, w_dtype,
                                                                             low, rng, poisoned):
    x, dy, pending = (_random(rng, shape, _dtype(d)) for d in (x_dtype, dy_dtype, x_dtype))
    weight = (1 + 0.1 * rng.standard_normal(shape[-1])).astype(np.float32).astype(_dtype(w_dtype))
    _, (want_dx, want_dw) = _run(RMSNorm, [_f64(x), _f64(weight)], _f64(dy), eps=1e-5)
    cuda = [backend.to_device(a, "cuda") for a in (x, weight, dy, pending)]
    _, r = gpu.rms_norm_forward(cuda[0], cuda[1], 1e-5)
    plain_dx, plain_dw = gpu.rms_norm_backward(cuda[2], cuda[0], cuda[1], r)
    result = gpu.rms_norm_backward(cuda[2], cuda[0], cuda[1], r, pending=cuda[3], low=low)
    dx, dw = result[:2]
    assert len(result) == (3 if low else 2) and dx.dtype == x.dtype and dw.dtype == weight.dtype
    tolerance = max(TOLERANCE[x_dtype], TOLERANCE[dy_dtype])
    assert _relative_error(dx, want_dx + _f64(pending)) < tolerance
    assert _relative_error(dw, want_dw) < tolerance
    np.testing.assert_array_equal(backend.to_numpy(dw), backend.to_numpy(plain_dw))
    if x.dtype == np.float32:                     # the add in float32 is the engine's add of the two arrays
        np.testing.assert_array_equal(backend.to_numpy(dx), backend.to_numpy(plain_dx) + pending)
    if low:                                       # exactly dx rounded to dy's dtype, as a cast would give
        assert result[2].dtype == dy.dtype
        np.testing.assert_array_equal(backend.to_numpy(result[2]), backend.to_numpy(dx).astype(dy.dtype))


@gpu_test
def test_a_junction_hands_its_branch_the_gradient_the_norm_backward_wrote(rng, poisoned):
    """Two junctions of a float32 stream with bf16 branches, as a layer chains them: the first junction's
    norm backward adds the stream's gradient and writes its bf16 copy, which the residual add hands to the
    branch; every gradient matches the same graph with the pending protocol off."""
    from tinygrad_llm import Tensor
    from tinygrad_llm import functional as F
    shape, bf16 = (2, 16, 256), _dtype("bfloat16")
    arrays = [_random(rng, shape, np.float32), _random(rng, shape, bf16), _random(rng, shape, bf16),
              (1 + 0.1 * rng.standard_normal(256)).astype(np.float32)]
    upstream, upstream_normed = _random(rng, shape, np.float32), _random(rng, shape, bf16)

    def gradients():
        x, b1, b2, w = (Tensor(backend.to_device(a, "cuda"), requires_grad=True) for a in arrays)
        total, normed = F.add_rms_norm(x, b1, w, out_dtype=bf16)
        total2, normed2 = F.add_rms_norm(total, b2 * normed, w, out_dtype=bf16)
        F.concatenate([total2, normed2.astype(np.float32)], axis=-1).backward(   # 2 × (B, T, C) -> (B, T, 2C)
            backend.to_device(np.concatenate([upstream, upstream_normed.astype(np.float32)], axis=-1), "cuda"))
        return [backend.to_numpy(t.grad) for t in (x, b1, b2, w)]

    fused = gradients()
    RMSNorm.takes_pending = False
    try:
        plain = gradients()
    finally:
        RMSNorm.takes_pending = True
    for got, want in zip(fused, plain):
        assert got.dtype == want.dtype
        np.testing.assert_allclose(got.astype(np.float64), want.astype(np.float64), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ SwiGLU
@gpu_test
@pytest.mark.parametrize("shape", [(4, 33, 2048), (5, 7), (3, 1, 24), (1,)])
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16", "float16"])
def test_swiglu_matches_numpy(shape, dtype_name, rng, poisoned):
    dtype = _dtype(dtype_name)
    gate, up, dy = (_random(rng, shape, dtype, 2.0) for _ in range(3))
    want_y, (want_dgate, want_dup) = _run(SwiGLU, [_f64(gate), _f64(up)], _f64(dy))
    cuda = [backend.to_device(a, "cuda") for a in (gate, up, dy)]
    y, (dgate, dup) = _run(SwiGLU, cuda[:2], cuda[2])
    for got, want in ((y, want_y), (dgate, want_dgate), (dup, want_dup)):
        assert got.dtype == dtype
        assert _relative_error(got, want) < TOLERANCE[dtype_name]


@gpu_test
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_swiglu_packed_matches_the_split_form(dtype_name, rng, poisoned):
    dtype = _dtype(dtype_name)
    gate_up = _random(rng, (3, 50, 2 * 136), dtype, 2.0)
    dy = _random(rng, (3, 50, 136), dtype)
    want_y, (want_dgate, want_dup) = _run(SwiGLU, [_f64(gate_up[..., :136]), _f64(gate_up[..., 136:])], _f64(dy))
    y = gpu.swiglu_packed_forward(backend.to_device(gate_up, "cuda"))
    d_gate_up = gpu.swiglu_packed_backward(backend.to_device(dy, "cuda"), backend.to_device(gate_up, "cuda"))
    tolerance = TOLERANCE[dtype_name]
    assert _relative_error(y, want_y) < tolerance
    assert _relative_error(d_gate_up[..., :136], want_dgate) < tolerance
    assert _relative_error(d_gate_up[..., 136:], want_dup) < tolerance


# ------------------------------------------------------------------ RoPE
@gpu_test
@pytest.mark.parametrize("batch,heads,length,head_dim", [(2, 3, 17, 64), (1, 2, 5, 6), (2, 12, 64, 128)])
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16", "float16"])
def test_rope_matches_numpy_on_a_transposed_view(batch, heads, length, head_dim, dtype_name, rng, poisoned):
    dtype = _dtype(dtype_name)
    packed = _random(rng, (batch, length, heads, head_dim), dtype)        # (B, T, H, D), as a projection
    dy = _random(rng, (batch, heads, length, head_dim), dtype)
    want_y, (want_dx,) = _run(RoPE, [_f64(packed).transpose(0, 2, 1, 3)], _f64(dy), positions=3)
    x = backend.to_device(packed, "cuda").transpose(0, 2, 1, 3)           # a strided (B, H, T, D) view
    y, (dx,) = _run(RoPE, [x], backend.to_device(dy, "cuda"), positions=3)
    assert y.flags.c_contiguous and y.dtype == dtype
    tolerance = TOLERANCE[dtype_name] if dtype_name != "float32" else 1e-6
    assert _relative_error(y, want_y) < tolerance
    assert _relative_error(dx, want_dx) < tolerance


@gpu_test
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("head_dim", [64, 6])                           # 6: the one-pair-an-item path
def test_copy_heads_moves_heads_between_the_packed_and_the_attention_layout(dtype_name, head_dim, rng, poisoned):
    cp = backend.cupy_module()
    dtype = _dtype(dtype_name)
    packed = cp.asarray(_random(rng, (2, 17, 3 + 2 * 2, head_dim), dtype))   # (B, T, H + 2Hkv, D)
    source = packed[:, :, 3:5].transpose(0, 2, 1, 3)                         # the k slice as (B, Hkv, T, D)
    gathered = gpu.copy_heads(source)
    assert gathered.flags.c_contiguous and gathered.dtype == dtype
    np.testing.assert_array_equal(_f64(gathered), _f64(source))
    target = arrays.empty((2, 17, 2, head_dim), dtype)                      # poisoned; written through a view
    gpu.copy_heads(gathered, out=target.transpose(0, 2, 1, 3))
    np.testing.assert_array_equal(_f64(target), _f64(packed[:, :, 3:5]))


@gpu_test
def test_rope_writes_into_a_strided_out_and_in_place(rng, poisoned):
    cp = backend.cupy_module()
    x = _random(rng, (2, 4, 9, 32), np.float32)
    cos, sin = (rng.standard_normal((9, 16)).astype(np.float32) for _ in range(2))
    from tinygrad_llm.ops.rope import rotate_into
    want = rotate_into(_f64(x), _f64(cos), _f64(sin), np.empty(x.shape))
    buffer = cp.full((2, 9, 4, 32), cp.nan, dtype=cp.float32)             # (B, T, H, D); out is its transpose
    gpu.rope_forward(cp.asarray(x), cp.asarray(cos), cp.asarray(sin), out=buffer.transpose(0, 2, 1, 3))
    assert _relative_error(buffer.transpose(0, 2, 1, 3), want) < 1e-6
    in_place = cp.asarray(x)
    gpu.rope_forward(in_place, cp.asarray(cos), cp.asarray(sin), out=in_place)
    assert _relative_error(in_place, want) < 1e-6


# ------------------------------------------------------------------ dropout
@gpu_test
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_kernel_drops_at_rate_p_and_scales_the_survivors(dtype_name, p, rng, poisoned):
    from tinygrad_llm.ops.dropout import Dropout
    dtype = _dtype(dtype_name)
    x = _random(rng, (1001, 513), dtype)                                  # odd size: packs and a tail
    cuda_x = backend.to_device(x, "cuda")
    assert gpu.supports("dropout", cuda_x)
    y, (dx,) = _run(Dropout, [cuda_x], backend.to_device(np.ones_like(x), "cuda"), p=p, seed=2024)
    y, dx, x64 = _f64(y), _f64(dx), _f64(x)
    kept = dx != 0
    assert abs(1 - kept.mean() - p) < 0.005, "drop rate"
    scale = float(np.asarray(1.0 / (1.0 - p), dtype=np.float32).astype(dtype))
    np.testing.assert_allclose(dx[kept], scale, rtol=TOLERANCE[dtype_name])
    np.testing.assert_allclose(y, x64 * dx, rtol=TOLERANCE[dtype_name], atol=1e-6)
    again, _ = _run(Dropout, [cuda_x], backend.to_device(np.ones_like(x), "cuda"), p=p, seed=2024)
    other, _ = _run(Dropout, [cuda_x], backend.to_device(np.ones_like(x), "cuda"), p=p, seed=2025)
    assert np.array_equal(_f64(again), y) and not np.array_equal(_f64(other), y)
    neighbours = kept[:, :-1] & kept[:, 1:]                               # no correlation between neighbours
    assert abs(neighbours.mean() - (1 - p) ** 2) < 0.01


# ------------------------------------------------------------------ cross-entropy
def _targets(rng, rows, vocab, ignored_fraction=0.1, ignore_index=-100):
    targets = rng.integers(0, vocab, rows)
    targets[rng.random(rows) < ignored_fraction] = ignore_index
    return targets


@gpu_test
@pytest.mark.parametrize("rows,vocab", [(64, 50304), (33, 1001), (5, 7)])
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16", "float16"])
def test_cross_entropy_matches_numpy(rows, vocab, dtype_name, rng, poisoned):
    dtype = _dtype(dtype_name)
    logits = _random(rng, (rows, vocab), dtype, 3.0)
    targets = _targets(rng, rows, vocab)
    targets[0] = 0                                                         # at least one row kept
    upstream = np.float64(rng.uniform(0.5, 2.0))
    want_loss, (want_dlogits,) = _run(CrossEntropy, [_f64(logits), targets], upstream)
    cuda_logits = backend.to_device(logits, "cuda")
    loss, (dlogits,) = _run(CrossEntropy, [cuda_logits, backend.to_device(targets, "cuda")],
                            backend.cupy_module().asarray(upstream, dtype=np.float32))
    assert loss.shape == () and loss.dtype == np.float32 and dlogits.dtype == dtype   # the loss in float32
    tolerance = TOLERANCE[dtype_name]
    assert abs(float(loss) - float(want_loss)) <= tolerance * abs(float(want_loss))
    assert _relative_error(dlogits, want_dlogits) < tolerance
    ignored = targets == -100
    assert (_f64(dlogits)[ignored] == 0).all(), "ignored rows must have zero gradient"
    np.testing.assert_allclose(_f64(dlogits).sum(axis=1), 0, atol=1e-5 if dtype_name == "float32" else 1e-2)


@gpu_test
def test_cross_entropy_in_place_and_all_ignored(rng, poisoned):
    cp = backend.cupy_module()
    logits = _random(rng, (16, 50304), np.float32, 3.0)
    targets = _targets(rng, 16, 50304, 0.3)
    targets[0] = 5
    want_loss, (want_dlogits,) = _run(CrossEntropy, [_f64(logits), targets], np.asarray(1.0))
    buffer = cp.asarray(logits)
    loss, dlogits = gpu.cross_entropy_forward_backward(buffer, cp.asarray(targets), -100, in_place=True)
    assert dlogits.data.ptr == buffer.data.ptr
    assert abs(float(loss) - want_loss) < 1e-5 * abs(want_loss)
    assert _relative_error(dlogits, want_dlogits) < 1e-5
    loss, dlogits = gpu.cross_entropy_forward_backward(cp.asarray(logits), cp.full(16, -100), -100)
    assert math.isnan(float(loss)) and float(cp.abs(dlogits).max()) == 0.0


# ------------------------------------------------------------------ embedding backward
@gpu_test
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_embedding_backward_accumulates_repeated_ids(dtype_name, rng, poisoned):
    dtype = _dtype(dtype_name)
    vocab, channels = 300, 96
    weight = _random(rng, (vocab, channels), dtype)
    ids = rng.integers(0, 40, (4, 64))                                     # many repeats, most rows untouched
    dy = _random(rng, (4, 64, channels), dtype)
    want_y, (want_dweight,) = _run(Embedding, [ids, _f64(weight)], _f64(dy), needs=(True,))
    y, (dweight,) = _run(Embedding, [backend.to_device(ids, "cuda"), backend.to_device(weight, "cuda")],
                         backend.to_device(dy, "cuda"), needs=(True,))
    assert dweight.dtype == dtype
    assert _relative_error(dweight, want_dweight) < TOLERANCE[dtype_name]


# ------------------------------------------------------------------ multi-tensor AdamW
def _adamw_reference(p, g, m, v, lr, beta1, beta2, eps, wd, step, scale):
    g = g * scale
    p = p * (1 - lr * wd)
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    p = p - lr / (1 - beta1 ** step) * m / (np.sqrt(v) / math.sqrt(1 - beta2 ** step) + eps)
    return p, m, v


@gpu_test
def test_adamw_step_matches_the_formula(rng):
    cp = backend.cupy_module()
    shapes = [(768, 300), (7,), (4097,), (1,), (50, 50)]
    host = [[rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(3)]
    host.append([np.abs(rng.standard_normal(s)).astype(np.float32) for s in shapes])
    params, grads, ms, vs = ([cp.asarray(a) for a in group] for group in host)
    decays = [0.1, 0.0, 0.1, 0.0, 0.05]
    hyper = dict(lr=3e-3, beta1=0.9, beta2=0.95, eps=1e-8, step=7)
    from tinygrad_llm.optim import adamw_values
    values = cp.asarray(adamw_values(hyper["lr"], (hyper["beta1"], hyper["beta2"]), hyper["step"], 0.5),
                        dtype=cp.float32)
    gpu.adamw_step(params, grads, ms, vs, values, hyper["beta1"], hyper["beta2"], hyper["eps"], decays)
    for i in range(len(shapes)):
        want = _adamw_reference(*(np.float64(group[i]) for group in host), hyper["lr"], hyper["beta1"],
                                hyper["beta2"], hyper["eps"], decays[i], hyper["step"], 0.5)
        for got, expected in zip((params[i], ms[i], vs[i]), want):
            assert _relative_error(got, expected) < 1e-5
    before = [[backend.to_numpy(a).copy() for a in group] for group in (params, ms, vs)]
    values[0] = float("nan")                          # a skipped step (decided on the device): nothing moves
    gpu.adamw_step(params, grads, ms, vs, values, hyper["beta1"], hyper["beta2"], hyper["eps"], decays)
    for group, saved in zip((params, ms, vs), before):
        for got, expected in zip(group, saved):
            np.testing.assert_array_equal(backend.to_numpy(got), expected)


@gpu_test
def test_optimizer_uses_the_fused_step_and_matches_the_numpy_path(rng):
    from tinygrad_llm import optim
    from tinygrad_llm.nn import Parameter
    values = [rng.standard_normal(s).astype(np.float32) for s in [(64, 48), (48,), (10, 64)]]
    grads = [rng.standard_normal(v.shape).astype(np.float32) for v in values]
    results = []
    for kernels in (True, False):
        backend.set_kernels_enabled(kernels)
        try:
            params = [Parameter(backend.to_device(v, "cuda")) for v in values]
            opt = optim.AdamW(params, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
            for _ in range(3):
                for p, g in zip(params, grads):
                    p.grad = backend.to_device(g, "cuda")
                opt.step(grad_scale=0.7)
            results.append([backend.to_numpy(p.data) for p in params])
        finally:
            backend.set_kernels_enabled(True)
    for fused, reference in zip(*results):
        assert _relative_error(fused, reference) < 1e-5


# ------------------------------------------------------------------ Linear under the precision policies
@pytest.mark.parametrize("policy_name,x_dtype", [("bf16", "float32"), ("bf16", "bfloat16"), ("fp16", "float32"),
                                                 ("fp16", "float16")])
@gpu_test
def test_linear_under_low_precision_policies(policy_name, x_dtype, rng):
    x = _random(rng, (3, 40, 96), _dtype(x_dtype))
    weight = (0.1 * rng.standard_normal((72, 96))).astype(np.float32)
    dy = _random(rng, (3, 40, 72), _dtype(x_dtype))
    want_y, (want_dx, want_dw) = _run(Linear, [_f64(x), _f64(weight)], _f64(dy))
    with precision.policy(policy_name):
        cuda = [backend.to_device(a, "cuda") for a in (x, weight, dy)]
        assert gpu.supports("linear", cuda[0], cuda[1])
        y, (dx, dw) = _run(Linear, cuda[:2], cuda[2])
    assert y.dtype == precision.dtype_named(x_dtype if x_dtype != "float32" else
                                            {"bf16": "bfloat16", "fp16": "float16"}[policy_name])
    assert dx.dtype == x.dtype and dw.dtype == np.float32
    for got, want in ((y, want_y), (dx, want_dx), (dw, want_dw)):
        assert _relative_error(got, want) < 1e-2


@gpu_test
def test_tf32_policy_changes_float32_products_only_slightly(rng):
    cp = backend.cupy_module()
    a, b = (rng.standard_normal((512, 512)).astype(np.float32) for _ in range(2))
    want = a.astype(np.float64) @ b.astype(np.float64)
    with precision.policy("tf32"):
        tf32 = cp.asarray(a) @ cp.asarray(b)
    exact = cp.asarray(a) @ cp.asarray(b)
    assert _relative_error(exact, want) < 1e-5
    assert _relative_error(tf32, want) < 5e-3


# ------------------------------------------------------------------ the whole model, GPU vs CPU
@gpu_test
def test_small_model_loss_and_gradients_match_the_cpu(rng):
    from tinygrad_llm import model as model_module
    from tinygrad_llm import manual_seed
    config = model_module.GPTConfig(vocab_size=97, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                    ffn_hidden=128, max_seq_len=32)
    ids = rng.integers(0, 97, (3, 32))
    targets = rng.integers(0, 97, (3, 32))
    targets[0, :5] = -100
    results = []
    for device in ("cpu", "cuda"):
        manual_seed(1234)
        model = model_module.GPT(config).to(device)
        _, loss = model(backend.to_device(ids, device), backend.to_device(targets, device))
        loss.backward()
        results.append((loss.item(), {name: backend.to_numpy(p.grad) for name, p in model.named_parameters()}))
    (cpu_loss, cpu_grads), (gpu_loss, gpu_grads) = results
    assert abs(cpu_loss - gpu_loss) < 1e-5 * abs(cpu_loss)
    for name, want in cpu_grads.items():
        assert _relative_error(gpu_grads[name], want) < 1e-4, name



@gpu_test
@pytest.mark.parametrize("residual_low", [False, True])
def test_rope_tables_are_made_once_in_the_dtype_of_q_and_k(residual_low, rng):
    """Under a bf16 policy q and k come out of the Linears in bf16, float32 residual or not: the model makes
    its cos and sin tables in bf16 (no cast in every rope call), and the CPU keeps its own dtype."""
    from tinygrad_llm import model as model_module
    config = model_module.GPTConfig(vocab_size=50, d_model=128, n_layers=1, n_heads=2, ffn_hidden=64, max_seq_len=16)
    model = model_module.GPT(config).to("cuda")
    saved = precision.LOW_PRECISION_RESIDUAL
    precision.LOW_PRECISION_RESIDUAL = residual_low
    try:
        with precision.policy("bf16"):
            model(backend.to_device(rng.integers(0, 50, (1, 16)), "cuda"))
    finally:
        precision.LOW_PRECISION_RESIDUAL = saved
    assert [key[0] for key in model._rope_made] == [_dtype("bfloat16")]
    assert precision.linear_dtype(np.zeros(2, np.float32)) == np.float32


@gpu_test
@pytest.mark.parametrize("policy_name", ["bf16", "fp16"])
def test_small_model_under_a_low_precision_policy_tracks_float32(policy_name, rng):
    from tinygrad_llm import model as model_module
    from tinygrad_llm import manual_seed
    config = model_module.GPTConfig(vocab_size=97, d_model=128, n_layers=2, n_heads=2, n_kv_heads=1,
                                    ffn_hidden=256, max_seq_len=64)     # head dim 64: the attention kernel's
    ids = rng.integers(0, 97, (2, 64))
    targets = rng.integers(0, 97, (2, 64))
    results = []
    low = {"bf16": "bfloat16", "fp16": "float16"}[policy_name]
    for device, active in (("cpu", "fp32"), ("cuda", policy_name)):
        manual_seed(99)
        model = model_module.GPT(config).to(device)
        with precision.policy(active):
            _, loss = model(backend.to_device(ids, device), backend.to_device(targets, device))
            loss.backward()
        assert loss.dtype == np.float32                  # 16-bit logits give a float32 loss, as under autocast
        grads = {name: p.grad for name, p in model.named_parameters()}
        assert all(g.dtype == np.float32 for g in grads.values()), "master-weight gradients must stay float32"
        results.append((float(loss.item()), {name: backend.to_numpy(g) for name, g in grads.items()}))
    (cpu_loss, cpu_grads), (gpu_loss, gpu_grads) = results
    assert abs(cpu_loss - gpu_loss) < 2e-2 * abs(cpu_loss)
    for name, want in cpu_grads.items():
        assert _relative_error(gpu_grads[name], want) < 0.1, name
