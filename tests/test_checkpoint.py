"""Checkpoints: round trip, atomic writes under a simulated crash, corrupt and mismatched files."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

import tinygrad_llm.checkpoint as checkpoint
from tinygrad_llm import manual_seed
from tinygrad_llm.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from tinygrad_llm.model import GPT, GPTConfig
from tinygrad_llm.optim import AdamW


def make(seed=0, **overrides):
    manual_seed(seed)
    values = dict(vocab_size=10, d_model=16, n_layers=2, n_heads=2, ffn_hidden=16, max_seq_len=8)
    values.update(overrides)
    config = GPTConfig(**values)
    model = GPT(config)
    optimizer = AdamW(model.named_parameters(), lr=1e-2, weight_decay=0.1)
    ids = np.arange(16).reshape(2, 8) % 10
    _, loss = model(ids, ids)
    loss.backward()
    optimizer.step()
    return model, optimizer


def state_for(model, **extra):
    return dict({"model_config": model.config.to_dict(), "rng": {"note": "json"}}, **extra)


def test_round_trip_weights_moments_and_state(tmp_path):
    model, optimizer = make()
    save_checkpoint(str(tmp_path / "checkpoints"), 5, model, optimizer, state_for(model, loader={"step": 5}))
    fresh, fresh_optimizer = make(seed=1)
    loaded, state = load_checkpoint(str(tmp_path), model=fresh, optimizer=fresh_optimizer)
    assert state["step"] == 5 and state["loader"] == {"step": 5}
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        np.testing.assert_array_equal(a, b, err_msg=name)
    arrays, meta = optimizer.state_dict()
    arrays2, meta2 = fresh_optimizer.state_dict()
    assert meta == meta2 and all(np.array_equal(arrays[k], arrays2[k]) for k in arrays)
    rebuilt, _ = load_checkpoint(str(tmp_path / "checkpoints" / "step_00000005"))   # model built from config
    assert rebuilt.config == model.config


def test_crash_during_write_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    directory = str(tmp_path / "checkpoints")
    model, optimizer = make()
    save_checkpoint(directory, 1, model, optimizer, state_for(model))
    before = model.state_dict()
    model.model.norm.weight.data[...] = 7.0                             # the next save would differ
    original = checkpoint.atomic_write_bytes
    calls = []

    def crash_midway(path, data):
        calls.append(path)
        if path.endswith("optimizer.safetensors"):                     # model file written, then the crash
            with open(path + ".partial", "wb") as f:
                f.write(data[: len(data) // 2])
            raise OSError("simulated crash: disk pulled")
        return original(path, data)

    monkeypatch.setattr(checkpoint, "atomic_write_bytes", crash_midway)
    with pytest.raises(OSError, match="simulated crash"):
        save_checkpoint(directory, 2, model, optimizer, state_for(model))
    monkeypatch.setattr(checkpoint, "atomic_write_bytes", original)
    assert any(p.endswith("model.safetensors") for p in calls)
    loaded, state = load_checkpoint(str(tmp_path))
    assert state["step"] == 1
    for name, value in before.items():
        np.testing.assert_array_equal(loaded.state_dict()[name], value)
    assert not os.path.exists(os.path.join(directory, "step_00000002"))
    save_checkpoint(directory, 2, model, optimizer, state_for(model))   # the next save cleans up and works
    assert load_checkpoint(str(tmp_path))[1]["step"] == 2
    assert not [d for d in os.listdir(directory) if d.endswith(".tmp")]


def test_corrupt_files_give_clear_errors(tmp_path):
    directory = str(tmp_path / "checkpoints")
    model, optimizer = make()
    path = save_checkpoint(directory, 3, model, optimizer, state_for(model))
    weights = os.path.join(path, "model.safetensors")
    data = open(weights, "rb").read()
    with open(weights, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors is corrupt"):
        load_checkpoint(directory)
    with open(weights, "wb") as f:
        f.write(data)
    with open(os.path.join(path, "state.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(directory)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(str(tmp_path / "nowhere"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        load_checkpoint(str(tmp_path / "empty"))


def test_mismatched_model_gives_clear_error(tmp_path):
    model, optimizer = make()
    save_checkpoint(str(tmp_path), 1, model, optimizer, state_for(model))
    other, _ = make(d_model=32)
    with pytest.raises(CheckpointError, match=r"differing fields: d_model \(checkpoint 16, model 32\)"):
        load_checkpoint(str(tmp_path), model=other)


def test_pointers_best_and_pruning(tmp_path):
    directory = str(tmp_path / "checkpoints")
    model, optimizer = make()
    save_checkpoint(directory, 1, model, optimizer, state_for(model), keep_last=2, best=True)
    for step in (2, 3, 4):
        save_checkpoint(directory, step, model, optimizer, state_for(model), keep_last=2)
    kept = sorted(d for d in os.listdir(directory) if d.startswith("step_"))
    assert kept == ["step_00000001", "step_00000003", "step_00000004"]     # best survives pruning
    assert load_checkpoint(directory, which="best")[1]["step"] == 1
    assert json.load(open(os.path.join(directory, "latest.json")))["step"] == 4
