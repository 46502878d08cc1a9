"""The training loop: loss falls, exact resume, non-finite steps, schedule, AdamW, accumulation, eval."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from text_sample import SHAKESPEARE
from tinygrad_llm import manual_seed
from tinygrad_llm.checkpoint import load_checkpoint
from tinygrad_llm.model import GPT, GPTConfig
from tinygrad_llm.nn import Parameter
from tinygrad_llm.optim import AdamW, clip_grad_norm_, global_grad_norm, lr_schedule
from tinygrad_llm.train import TrainConfig, config_from_dict, train


@pytest.fixture()
def text_file(tmp_path):
    path = tmp_path / "shakespeare.txt"
    path.write_text(SHAKESPEARE * 3, encoding="utf-8")
    return str(path)


def small_config(text_file, out_dir, **overrides):
    values = dict(data=text_file, out_dir=str(out_dir), d_model=32, n_layers=2, n_heads=4, ffn_hidden=64,
                  batch_size=4, seq_len=32, max_steps=20, warmup_steps=2, lr=3e-3, eval_interval=10,
                  eval_iters=2, log_interval=1, progress=False, seed=0)
    values.update(overrides)
    return TrainConfig(**values)


def losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [(r["step"], r["loss"]) for r in map(json.loads, f) if "loss" in r and "event" not in r]


def test_loss_falls_on_real_text(text_file, tmp_path):
    summary = train(small_config(text_file, tmp_path / "run", max_steps=60, eval_interval=30), log=lambda m: None)
    curve = losses(tmp_path / "run")
    assert np.mean([l for _, l in curve[:5]]) > np.mean([l for _, l in curve[-5:]]) + 0.8
    assert summary["val_loss"] < math.log(len(set(SHAKESPEARE))) - 0.5
    assert 0 < summary["val_bpb"] and math.isclose(summary["val_ppl"], math.exp(summary["val_loss"]))
    assert os.path.isfile(tmp_path / "run" / "checkpoints" / "best.json")


def test_resume_is_bit_exact(text_file, tmp_path, monkeypatch):
    """N steps, kill, resume for N more == 2N steps straight: same losses, same weights, bit for bit."""
    import tinygrad_llm.train as train_module
    options = dict(dropout=0.1, grad_accum=2, max_steps=12, eval_interval=6)
    train(small_config(text_file, tmp_path / "straight", **options), log=lambda m: None)

    def killed_at_step_8(step, *args, **kwargs):      # a kill two steps after the step-6 checkpoint
        if step == 8:
            raise KeyboardInterrupt
        return lr_schedule(step, *args, **kwargs)

    monkeypatch.setattr(train_module, "lr_schedule", killed_at_step_8)
    summary = train(small_config(text_file, tmp_path / "split", **options), log=lambda m: None)
    assert summary["stopped"] == "interrupted" and summary["steps"] == 8
    monkeypatch.setattr(train_module, "lr_schedule", lr_schedule)
    train(small_config(text_file, tmp_path / "split", resume=True, **options), log=lambda m: None)
    straight, split = losses(tmp_path / "straight"), dict(losses(tmp_path / "split"))
    assert len(straight) == 12 and dict(straight) == split            # steps 7, 8 redone identically
    a, _ = load_checkpoint(str(tmp_path / "straight"))
    b, state = load_checkpoint(str(tmp_path / "split"))
    assert state["step"] == 12
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        np.testing.assert_array_equal(x, y, err_msg=name)


def test_non_finite_steps_are_skipped_then_stop_the_run(text_file, tmp_path, monkeypatch):
    run = tmp_path / "run"
    train(small_config(text_file, run, max_steps=10, eval_interval=5), log=lambda m: None)
    good, _ = load_checkpoint(str(run))
    monkeypatch.setattr(AdamW, "gather_grads", lambda self: float("nan"))
    messages = []
    summary = train(small_config(text_file, run, max_steps=30, eval_interval=5, resume=True, max_bad_steps=3),
                    log=messages.append)
    assert summary["stopped"] and "3 non-finite steps" in summary["stopped"]
    assert sum("update skipped" in m for m in messages) == 3
    with open(run / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert [r["streak"] for r in records if r.get("event") == "skipped"] == [1, 2, 3]
    kept, state = load_checkpoint(str(run))                       # the last good checkpoint, untouched
    assert state["step"] == 10
    for (name, x), (_, y) in zip(good.state_dict().items(), kept.state_dict().items()):
        np.testing.assert_array_equal(x, y, err_msg=name)


def test_lr_schedule_warmup_cosine_to_ten_percent():
    assert lr_schedule(0, 1.0, 10, 110) == pytest.approx(1 / 11)
    assert lr_schedule(9, 1.0, 10, 110) == pytest.approx(10 / 11)
    assert lr_schedule(10, 1.0, 10, 110) == pytest.approx(1.0)
    assert lr_schedule(60, 1.0, 10, 110) == pytest.approx(0.55)
    assert lr_schedule(110, 1.0, 10, 110) == pytest.approx(0.1)
    assert lr_schedule(500, 1.0, 10, 110) == pytest.approx(0.1)
    assert lr_schedule(110, 1.0, 10, 110, min_lr_ratio=0.0) == pytest.approx(0.0)


def test_adamw_matches_the_reference_update_and_decays_only_matrices():
    rng = np.random.default_rng(0)
    w0, b0 = rng.standard_normal((3, 4)).astype(np.float32), rng.standard_normal(4).astype(np.float32)
    w, b = Parameter(w0.copy()), Parameter(b0.copy())
    opt = AdamW([("w", w), ("b", b)], lr=0.1, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.5)
    m = {"w": np.zeros_like(w0, dtype=np.float64), "b": np.zeros_like(b0, dtype=np.float64)}
    v = {k: np.zeros_like(a) for k, a in m.items()}
    ref = {"w": w0.astype(np.float64), "b": b0.astype(np.float64)}
    for t in range(1, 4):
        grads = {"w": rng.standard_normal((3, 4)), "b": rng.standard_normal(4)}
        w.grad, b.grad = grads["w"].astype(np.float32), grads["b"].astype(np.float32)
        opt.step(lr=0.1)
        for k, wd in (("w", 0.5), ("b", 0.0)):
            ref[k] *= 1 - 0.1 * wd
            m[k] = 0.9 * m[k] + 0.1 * grads[k]
            v[k] = 0.99 * v[k] + 0.01 * grads[k] ** 2
            ref[k] -= 0.1 / (1 - 0.9 ** t) * m[k] / (np.sqrt(v[k]) / math.sqrt(1 - 0.99 ** t) + 1e-8)
        opt.zero_grad()
    np.testing.assert_allclose(w.numpy(), ref["w"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(b.numpy(), ref["b"], rtol=1e-5, atol=1e-6)


def test_global_norm_clipping():
    a, b = Parameter(np.zeros(3)), Parameter(np.zeros((2, 2)))
    a.grad, b.grad = np.array([3.0, 0, 0], np.float32), np.full((2, 2), 2.0, np.float32)
    assert global_grad_norm([a, b]) == pytest.approx(5.0)
    opt = AdamW([a, b])
    assert opt.gather_grads() == pytest.approx(5.0)
    assert clip_grad_norm_([a, b], 1.0) == pytest.approx(5.0)
    assert global_grad_norm([a, b]) == pytest.approx(1.0, rel=1e-5)


def test_gradient_accumulation_scaling_equals_the_full_batch_gradient():
    manual_seed(0)
    model = GPT(GPTConfig(vocab_size=9, d_model=16, n_layers=1, n_heads=2, ffn_hidden=16, max_seq_len=8))
    ids = np.random.default_rng(0).integers(0, 9, (4, 9))
    _, loss = model(ids[:, :-1], ids[:, 1:])
    loss.backward()
    full = {n: p.grad.copy() for n, p in model.named_parameters()}
    model.zero_grad()
    for half in (slice(0, 2), slice(2, 4)):             # what train() does with grad_accum=2
        _, loss = model(ids[half, :-1], ids[half, 1:])
        loss.backward(np.asarray(0.5, dtype=np.float32))
    for n, p in model.named_parameters():
        np.testing.assert_allclose(p.grad, full[n], rtol=1e-4, atol=1e-7, err_msg=n)


def test_backward_writes_gradients_into_the_optimizer_buffer_and_the_step_is_unchanged():
    """With an optimizer, each parameter's gradient lands in its slice of the flat gradient buffer (no
    gather copy); the updates equal those from gradients assigned by hand, tied weights included."""
    ids = np.random.default_rng(0).integers(0, 9, (2, 9))
    results = []
    for through_buffer in (True, False):
        manual_seed(0)
        model = GPT(GPTConfig(vocab_size=9, d_model=16, n_layers=1, n_heads=2, ffn_hidden=16, max_seq_len=8,
                              tie_embeddings=True))
        opt = AdamW(model.named_parameters(), lr=0.01, weight_decay=0.1)
        for _ in range(2):
            opt.zero_grad()
            _, loss = model(ids[:, :-1], ids[:, 1:])
            loss.backward()
            if through_buffer:
                for p, group in ((p, g) for g in opt.groups for p in g.params):
                    assert p.grad is p.grad_buffer and np.shares_memory(p.grad, group.grad)
            else:
                for p in opt.params:
                    p.grad = p.grad.copy()                 # a gradient of its own: gathered by copying
            opt.step()
        results.append([p.numpy().copy() for p in opt.params])
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


def test_config_errors_are_clear(text_file, tmp_path):
    with pytest.raises(ValueError, match="lr must be a positive number"):
        small_config(text_file, tmp_path, lr=-1.0).validate()
    with pytest.raises(ValueError, match="unknown configuration keys: bogus"):
        config_from_dict({"bogus": 1})
    with pytest.raises(ValueError, match="max_steps must be an integer"):
        config_from_dict({"max_steps": "ten"})
    with pytest.raises(FileNotFoundError, match="data not found"):
        train(small_config(str(tmp_path / "missing_dir"), tmp_path / "r"), log=lambda m: None)
    train(small_config(text_file, tmp_path / "r2", max_steps=2, eval_interval=2), log=lambda m: None)
    with pytest.raises(FileExistsError, match="--resume"):
        train(small_config(text_file, tmp_path / "r2", max_steps=2, eval_interval=2), log=lambda m: None)


def test_the_library_never_imports_the_command_line():
    """train, its configuration, checkpoints and the data package call no parser: the CLI calls them."""
    import ast
    import tinygrad_llm
    root = os.path.dirname(tinygrad_llm.__file__)
    paths = [os.path.join(root, name) for name in ("train.py", "train_config.py", "checkpoint.py", "optim.py",
                                                   "tokenizer.py")]
    paths += [os.path.join(root, "data", name) for name in os.listdir(os.path.join(root, "data")) if name.endswith(".py")]
    for path in paths:
        tree = ast.parse(open(path, encoding="utf-8").read())
        for node in ast.walk(tree):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                assert "cli" not in name.split("."), f"{path} imports {name}"
                assert name != "argparse", f"{path} imports argparse"


def test_train_config_takes_its_model_fields_from_gpt_config():
    from dataclasses import fields
    from tinygrad_llm.train_config import MODEL_FIELDS
    model_defaults = {f.name: f.default for f in fields(GPTConfig)}
    assert set(MODEL_FIELDS) == set(model_defaults) - {"vocab_size", "max_seq_len"}
    config = TrainConfig(d_model=48, n_heads=6, seq_len=20)
    assert all(getattr(TrainConfig(), name) == model_defaults[name] for name in MODEL_FIELDS)
    built = config.model_config(vocab_size=70)
    assert (built.d_model, built.n_heads, built.vocab_size, built.max_seq_len) == (48, 6, 70, 20)
