"""The GPU training step replayed from a CUDA graph (tinygrad_llm.device_step) against the same step run
uncaptured: the same losses, norms and weights; seeds that change every replay; skipped steps; a new
batch shape captured again; and a whole `train` run that says its step was captured."""
from __future__ import annotations

import numpy as np
import pytest

from text_sample import SHAKESPEARE
from tinygrad_llm import backend, precision, rng
from tinygrad_llm.data.feed import build_data
from tinygrad_llm.device_step import DeviceStep
from tinygrad_llm.model import GPT
from tinygrad_llm.optim import AdamW
from tinygrad_llm.train import TrainConfig, train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not backend.gpu_available(), reason="needs an NVIDIA GPU and CuPy")]


@pytest.fixture()
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(SHAKESPEARE * 3, encoding="utf-8")
    return str(path)


def _setup(text_file, tmp_path, policy="fp32", **overrides):
    values = dict(data=text_file, out_dir=str(tmp_path / "run"), d_model=128, n_layers=2, n_heads=2,
                  ffn_hidden=256, batch_size=4, seq_len=64, max_steps=20, warmup_steps=2, lr=1e-2,
                  grad_clip=1.0, progress=False, seed=0, device="cuda")
    values.update(overrides)
    config = TrainConfig(**values)
    data = build_data(config)
    precision.set_policy(policy)
    rng.manual_seed(0)
    model = GPT(config.model_config(data.tokenizer.vocab_size))
    model.to(device="cuda")
    optimizer = AdamW(model.named_parameters(), lr=config.lr, betas=(config.beta1, config.beta2),
                      eps=config.eps, weight_decay=config.weight_decay)
    return config, data, model, optimizer


def _run(text_file, tmp_path, graphs, steps=5, policy="fp32", **overrides):
    config, data, model, optimizer = _setup(text_file, tmp_path, policy, **overrides)
    try:
        step = DeviceStep(model, optimizer, config, data.tokenizer.vocab_size, graphs=graphs)
        trace, captured = [], []
        for i in range(steps):
            trace.append(step(data.train, i))
            captured.append(step.captured)
        assert step.not_captured is None
        return trace, captured, [backend.to_numpy(p.data) for p in model.parameters()], step
    finally:
        precision.set_policy("fp32")


@pytest.mark.parametrize("policy, overrides", [
    ("fp32", {}),
    ("bf16", dict(dropout=0.1, attention_dropout=0.1, n_heads=2)),     # head dim 64: the attention kernels
    ("bf16", dict(grad_accum=2, dropout=0.1)),
])
def test_replayed_steps_equal_the_uncaptured_step(text_file, tmp_path, policy, overrides):
    eager, eager_captured, eager_weights, _ = _run(text_file, tmp_path, False, policy=policy, **overrides)
    replayed, replayed_captured, replayed_weights, _ = _run(text_file, tmp_path, True, policy=policy, **overrides)
    assert eager_captured == [False] * 5 and replayed_captured == [False] + [True] * 4
    for a, b in zip(eager, replayed):
        assert a[3] and b[3] and a[2] == b[2]
        np.testing.assert_allclose(a[:2], b[:2], rtol=1e-3)       # dq's atomics may reorder float sums
    assert eager[0][0] != eager[-1][0]
    for a, b in zip(eager_weights, replayed_weights):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)


def test_every_replay_draws_new_dropout_masks(text_file, tmp_path):
    config, data, model, optimizer = _setup(text_file, tmp_path, dropout=0.3, attention_dropout=0.3, lr=0.0,
                                            warmup_steps=0)
    step = DeviceStep(model, optimizer, config, data.tokenizer.vocab_size, graphs=True)
    losses = []
    for _ in range(4):
        data.train.step = 0
        losses.append(step(data.train, 0)[0])              # the same batch and weights every time
    assert step.captured
    assert len(set(losses)) == 4


def test_a_replayed_non_finite_step_is_skipped(text_file, tmp_path):
    config, data, model, optimizer = _setup(text_file, tmp_path)
    step = DeviceStep(model, optimizer, config, data.tokenizer.vocab_size, graphs=True)
    step(data.train, 0)
    step(data.train, 1)
    assert step.captured and optimizer.step_count == 2
    weight = model.lm_head.weight.data
    weight[0, 0] = float("nan")                             # in place: the graph reads the same buffer
    before = [backend.to_numpy(p.data) for p in model.parameters()]
    _, grad_norm, _, applied = step(data.train, 2)
    assert step.captured and not applied and optimizer.step_count == 2
    for a, b in zip(before, (backend.to_numpy(p.data) for p in model.parameters())):
        np.testing.assert_array_equal(a, b)


def test_a_new_batch_shape_is_captured_again(text_file, tmp_path):
    config, data, model, optimizer = _setup(text_file, tmp_path)
    step = DeviceStep(model, optimizer, config, data.tokenizer.vocab_size, graphs=True)
    step(data.train, 0)
    step(data.train, 1)
    first = step.graph
    short = type("Short", (), {"step": 0, "batch": lambda self, i: tuple(a[:, :32] for a in data.train.batch(i))})()
    step(short, 2)
    assert step.captured and step.graph is not first
    bad = type("Bad", (), {"step": 0, "batch": lambda self, i: (np.full((4, 64), 10 ** 6), data.train.batch(i)[1])})()
    with pytest.raises(IndexError, match="embedding: ids must lie in"):
        step(bad, 3)


def test_train_on_the_gpu_runs_the_captured_step(text_file, tmp_path):
    lines = []
    summary = train(TrainConfig(data=text_file, out_dir=str(tmp_path / "run"), d_model=128, n_layers=2,
                                n_heads=2, ffn_hidden=256, batch_size=4, seq_len=64, max_steps=12, eval_interval=6,
                                eval_iters=2, log_interval=1, progress=False, device="cuda", precision="bf16",
                                dropout=0.1, attention_dropout=0.1), log=lines.append)
    assert any("replayed from a CUDA graph" in line for line in lines), lines
    assert summary["steps"] == 12 and np.isfinite(summary["val_loss"]) and summary["last_loss"] < summary["first_loss"]


def test_a_resumed_gpu_run_captures_its_step_again(text_file, tmp_path):
    """The checkpoint's weights and moments are loaded into the optimizer's buffers before the first step,
    so the resumed run captures its own graph and goes on from the saved step."""
    common = dict(data=text_file, out_dir=str(tmp_path / "run"), d_model=128, n_layers=2, n_heads=2, ffn_hidden=256,
                  batch_size=4, seq_len=64, eval_interval=4, eval_iters=2, log_interval=1, progress=False,
                  device="cuda", precision="bf16", sample_tokens=0)
    train(TrainConfig(max_steps=4, **common), log=lambda line: None)
    lines = []
    summary = train(TrainConfig(max_steps=8, resume=True, **common), log=lines.append)
    assert any("resumed from" in line for line in lines) and any("replayed from a CUDA graph" in line for line in lines)
    assert summary["start_step"] == 4 and summary["steps"] == 8 and np.isfinite(summary["val_loss"])


@pytest.mark.parametrize("policy, dtype", [("bf16", "bfloat16"), ("fp32", "float32")])
def test_prefetch_lists_every_module_a_training_step_loads(text_file, tmp_path, monkeypatch, policy, dtype):
    """gpu.prefetch_training names every kernel module the step launches (head dim 64, dropout on), so a
    first run compiles them all at once; a module missing from the list would compile mid-step."""
    from tinygrad_llm import gpu
    from tinygrad_llm.gpu import compiler
    monkeypatch.setenv("TINYGRAD_LLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(compiler, "_modules", {})
    monkeypatch.setattr(compiler, "_functions", {})
    listed = {compiler._key(*module) for module in gpu.prefetch_training(dtype, 64)}
    _run(text_file, tmp_path, True, steps=2, policy=policy, dropout=0.1, attention_dropout=0.1)
    loaded = set(compiler._modules)
    assert loaded - listed == set()
    assert any(filename.startswith("attention_") for filename, _, _ in loaded)
    assert any(filename == "rms_norm.cu" for filename, _, _ in loaded)


@pytest.mark.parametrize("loss, square_sum, clip", [
    (2.5, 9.0, 1.0),                  # clipped: 1 / (3 + 1e-6)
    (2.5, 0.25, 1.0),                 # under the clip: 1
    (2.5, 9.0, 0.0),                  # no clipping
    (float("nan"), 4.0, 1.0),         # a non-finite loss: skipped
    (1.0, float("inf"), 1.0),         # a non-finite norm: skipped
])
def test_the_step_decision_kernel_matches_the_numpy_tail(loss, square_sum, clip):
    from tinygrad_llm import gpu
    cp = backend.cupy_module()
    values, report = cp.full(4, 7.0, dtype=cp.float32), cp.zeros(3, dtype=cp.float32)
    gpu.step_decision(cp.asarray([loss], dtype=cp.float32), cp.asarray([square_sum], dtype=cp.float32), clip,
                      values, report)
    norm = np.sqrt(np.float32(square_sum))
    finite = bool(np.isfinite(loss) and np.isfinite(norm))
    scale = min(np.float32(1.0), np.float32(clip) / (norm + np.float32(1e-6))) if clip > 0 else np.float32(1.0)
    got_values, got_report = backend.to_numpy(values), backend.to_numpy(report)
    if finite:
        np.testing.assert_allclose(got_values[0], scale, rtol=1e-6)
    else:
        assert np.isnan(got_values[0])
    np.testing.assert_array_equal(got_values[1:], 7.0)                    # only the scale is written
    np.testing.assert_array_equal(got_report[[0, 2]], [np.float32(loss), 1.0 if finite else 0.0])
    np.testing.assert_allclose(got_report[1], norm, rtol=1e-6)


def test_the_loss_and_square_sum_kernels_match_numpy():
    from tinygrad_llm import gpu
    cp = backend.cupy_module()
    generator = np.random.default_rng(3)
    hosts = [generator.standard_normal(n).astype(np.float32) for n in (1, 4097, 300_000, 1_500_000)]
    total = gpu.sum_of_squares([cp.asarray(h) for h in hosts])          # 372 chunks: more partials than threads
    expected = sum(float(np.dot(h.astype(np.float64), h.astype(np.float64))) for h in hosts)
    np.testing.assert_allclose(float(backend.to_numpy(total)[0]), expected, rtol=1e-5)
    acc = cp.full(1, 123.0, dtype=cp.float32)
    gpu.accumulate_loss(acc, cp.asarray([2.0], dtype=cp.float32), 0.25, first=True)
    gpu.accumulate_loss(acc, cp.asarray([4.0], dtype=cp.float32), 0.75, first=False)
    assert float(backend.to_numpy(acc)[0]) == 3.5
    with pytest.raises(ValueError, match="one float32 number"):
        gpu.accumulate_loss(acc, cp.zeros(2, dtype=cp.float32), 1.0, first=True)
