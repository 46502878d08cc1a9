"""Reliability: every broken file, flag and crash ends in one clear line or a clean recovery.

One test (or more) per failure mode: recovery without latest.json, divergence, shard ids beyond the
vocabulary, tokenizer references, malformed state fields, unverified or bad weights, oversized models,
non-finite flags, Ctrl-C, exact-resume metrics, moved runs, vocabularies of the same size.
"""
from __future__ import annotations

import json
import os
import shutil
import signal

import numpy as np
import pytest

from text_sample import SHAKESPEARE
from tinygrad_llm.checkpoint import (CheckpointError, load_checkpoint, resolve_checkpoint, run_tokenizer_path,
                                     seal_state)
from tinygrad_llm.cli import main
from tinygrad_llm.data.shards import write_shard
from tinygrad_llm.tokenizer import CharVocab, Tokenizer, load_tokenizer
from tinygrad_llm.train import DivergenceMonitor, TrainConfig, train

QUIET = dict(log=lambda message: None)


@pytest.fixture()
def text_file(tmp_path):
    path = tmp_path / "shakespeare.txt"
    path.write_text(SHAKESPEARE * 3, encoding="utf-8")
    return str(path)


def small(data, out_dir, **overrides):
    values = dict(data=data, out_dir=str(out_dir), d_model=32, n_layers=2, n_heads=4, ffn_hidden=64,
                  batch_size=4, seq_len=16, max_steps=10, warmup_steps=2, lr=3e-3, eval_interval=5,
                  eval_iters=2, log_interval=1, progress=False, seed=0)
    values.update(overrides)
    return TrainConfig(**values)


def weights(run):
    model, state = load_checkpoint(str(run))
    return state["step"], model.state_dict()


def assert_same_weights(a, b):
    assert a[0] == b[0]
    for name in a[1]:
        np.testing.assert_array_equal(a[1][name], b[1][name], err_msg=name)


def step_records(run):
    """metrics.jsonl's step and evaluation records without the timing fields."""
    out = []
    with open(os.path.join(run, "metrics.jsonl")) as f:
        for record in map(json.loads, f):
            if "event" not in record:
                out.append({k: v for k, v in record.items() if k not in ("tokens_per_s", "train_s")})
    return out


@pytest.fixture()
def shard_run(tmp_path):
    """A shard directory with a BPE tokenizer file, and a short run trained on it."""
    text = SHAKESPEARE * 2
    tokenizer = Tokenizer.train(text, vocab_size=300, special_tokens=["<|endoftext|>"])
    tok_path = tmp_path / "tok.json"
    tokenizer.save(str(tok_path))
    data = tmp_path / "shards"
    data.mkdir()
    ids = np.asarray(tokenizer.encode_ordinary(text))
    write_shard(data / "d_train_000000.bin", ids[: len(ids) * 9 // 10], tokenizer.vocab_size)
    write_shard(data / "d_val_000000.bin", ids[len(ids) * 9 // 10:], tokenizer.vocab_size)
    run = tmp_path / "run"
    train(small(str(data), run, tokenizer=str(tok_path)), **QUIET)
    return {"data": data, "tokenizer": tok_path, "run": run, "vocab_size": tokenizer.vocab_size}


# ---------------------------------------------------------------------------------------------- recovery
def stop_at(monkeypatch, stop_step):
    """Make train() raise KeyboardInterrupt at the start of step `stop_step` (a kill between checkpoints)."""
    import tinygrad_llm.train as train_module
    from tinygrad_llm.optim import lr_schedule

    def schedule(step, *args, **kwargs):
        if step == stop_step:
            raise KeyboardInterrupt
        return lr_schedule(step, *args, **kwargs)
    monkeypatch.setattr(train_module, "lr_schedule", schedule)
    return lambda: monkeypatch.setattr(train_module, "lr_schedule", lr_schedule)


def test_resume_recovers_when_latest_json_is_lost(text_file, tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    train(small(text_file, straight, max_steps=15), **QUIET)
    run = tmp_path / "run"
    undo = stop_at(monkeypatch, 12)
    train(small(text_file, run, max_steps=15), **QUIET)
    undo()
    checkpoints = run / "checkpoints"
    os.remove(checkpoints / "latest.json")
    os.remove(checkpoints / "best.json")
    (checkpoints / "step_00000015.abcd.tmp").mkdir()                  # debris of a killed save
    (checkpoints / "latest.json.xyz.tmp").write_text("{")
    assert resolve_checkpoint(str(run)).endswith("step_00000010")      # sample/eval/export find it too
    train(small(text_file, run, max_steps=15, resume=True), **QUIET)
    assert not [name for name in os.listdir(checkpoints) if name.endswith(".tmp")]
    assert_same_weights(weights(straight), weights(run))


def test_resume_skips_a_corrupt_newest_step_directory_when_latest_json_is_lost(text_file, tmp_path):
    run = tmp_path / "run"
    train(small(text_file, run, max_steps=10), **QUIET)
    os.remove(run / "checkpoints" / "latest.json")
    os.remove(run / "checkpoints" / "best.json")
    with open(run / "checkpoints" / "step_00000010" / "model.safetensors", "r+b") as f:
        f.truncate(100)
    assert resolve_checkpoint(str(run)).endswith("step_00000005")


def test_a_run_killed_inside_its_first_checkpoint_resumes_from_step_zero(text_file, tmp_path, monkeypatch):
    straight, run = tmp_path / "straight", tmp_path / "run"
    train(small(text_file, straight), **QUIET)
    undo = stop_at(monkeypatch, 7)
    train(small(text_file, run), **QUIET)
    undo()
    for name in os.listdir(run / "checkpoints"):                       # as if killed during the first save
        shutil.rmtree(run / "checkpoints" / name) if (run / "checkpoints" / name).is_dir() \
            else os.remove(run / "checkpoints" / name)
    (run / "checkpoints" / "step_00000005.q1.tmp").mkdir()
    with pytest.raises(CheckpointError):
        resolve_checkpoint(str(run))
    summary = train(small(text_file, run, resume=True), **QUIET)
    assert summary["start_step"] == 0 and summary["steps"] == 10
    assert_same_weights(weights(straight), weights(run))
    assert step_records(straight) == step_records(run)


# ---------------------------------------------------------------------------------------------- divergence
@pytest.mark.parametrize("lr", [1e3, 30.0])
def test_a_diverging_run_stops_and_writes_no_checkpoint_after_the_trouble(text_file, tmp_path, lr, capsys):
    run = tmp_path / "run"
    train(small(text_file, run, max_steps=10), **QUIET)
    summary = train(small(text_file, run, max_steps=40, lr=lr, resume=True), **QUIET)
    assert summary["diverged"] and summary["stopped"].startswith("diverged")
    assert "step_00000010" in summary["stopped"]                       # the last checkpoint before the trouble
    step, _ = weights(run)
    assert step == 10
    with open(run / "checkpoints" / "best.json") as f:
        assert json.load(f)["step"] <= 10
    code = main(["train", "--data", text_file, "--out-dir", str(run), "--resume", "--max-steps", "40",
                 "--lr", str(lr), "--d-model", "32", "--n-layers", "2", "--n-heads", "4", "--ffn-hidden", "64",
                 "--batch-size", "4", "--seq-len", "16", "--warmup-steps", "2", "--eval-interval", "5",
                 "--eval-iters", "2", "--log-interval", "1", "--seed", "0", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and "diverged" in err and "step_00000010" in err and len(err.strip().splitlines()) == 1


def test_a_run_diverging_before_any_checkpoint_says_there_is_none(text_file, tmp_path):
    summary = train(small(text_file, tmp_path / "run", lr=1e3), **QUIET)
    assert summary["diverged"] and "none" in summary["stopped"]
    assert not os.path.isdir(tmp_path / "run" / "checkpoints")


def test_divergence_monitor_spikes_and_ceiling():
    monitor = DivergenceMonitor(vocab_size=65, sigma=3.0, window=20)
    rng = np.random.default_rng(0)
    for value in 2.0 + 0.05 * rng.standard_normal(20):
        assert monitor.check(float(value)) is None
    assert monitor.check(2.1) is None                                  # ordinary noise
    assert "spiked" in monitor.check(3.5)
    assert "above" in monitor.check(9.5)                               # 2·ln(65) + 1 ≈ 9.35
    assert "non-finite" in monitor.check(float("nan"))
    assert DivergenceMonitor(65, sigma=0.0).check(50.0) is None        # sigma 0 switches the checks off


# ---------------------------------------------------------------------------------------------- token ids
def test_shard_ids_beyond_the_vocabulary_are_refused_when_the_data_opens(tmp_path):
    data = tmp_path / "shards"
    data.mkdir()
    CharVocab(list("abcdef"), special_tokens=()).save(data / "vocab.json")
    write_shard(data / "d_train_000000.bin", np.arange(400) % 6, 6)
    write_shard(data / "d_val_000000.bin", np.r_[np.arange(300) % 6, 9], 10)
    with pytest.raises(ValueError, match=r"d_val_000000\.bin holds token id 9.*only 6 ids"):
        train(small(str(data), tmp_path / "run"), **QUIET)


# ---------------------------------------------------------------------------------------------- tokenizer references, moved runs
def test_tokenizer_reference_outside_the_run_is_refused(shard_run, tmp_path, capsys):
    run = shard_run["run"]
    path = run_tokenizer_path(str(run))
    assert path == str(run / "tokenizer.json")
    secret = tmp_path / "secret.txt"
    secret.write_text("not for export")
    state_path = os.path.join(resolve_checkpoint(str(run)), "state.json")
    with open(state_path) as f:
        state = json.load(f)
    state["tokenizer"] = {"type": "file", "path": str(secret)}            # crafted: no sha256, outside the run
    with open(state_path, "w") as f:
        json.dump(seal_state(state), f)
    with pytest.raises(CheckpointError, match="outside|inside the run"):
        run_tokenizer_path(str(run))
    state["tokenizer"] = {"type": "file", "run_file": "../../secret.txt"}
    with open(state_path, "w") as f:
        json.dump(seal_state(state), f)
    assert main(["export", str(run), "--hf", str(tmp_path / "hf")]) == 1
    assert "run_file" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "hf" / "tinygrad_tokenizer.json")


def test_a_replaced_tokenizer_file_is_refused_by_its_sha256(shard_run):
    run = shard_run["run"]
    other = Tokenizer.train(SHAKESPEARE, vocab_size=280, special_tokens=["<|endoftext|>"])
    other.save(str(run / "tokenizer.json"))
    with pytest.raises(CheckpointError, match="sha256"):
        run_tokenizer_path(str(run))


def test_a_moved_run_started_with_relative_paths_still_evaluates_and_exports(shard_run, tmp_path, monkeypatch,
                                                                             capsys):
    monkeypatch.chdir(tmp_path)
    train(small("shards", "relative", tokenizer="tok.json", max_steps=5), **QUIET)
    shutil.move(str(tmp_path / "relative"), str(tmp_path / "moved"))
    os.remove(shard_run["tokenizer"])                                     # the original tokenizer is gone too
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["eval", str(tmp_path / "moved"), "--eval-iters", "1"]) == 0
    assert main(["export", str(tmp_path / "moved"), "--hf", "hf"]) == 0
    capsys.readouterr()
    from tinygrad_llm.export import tokenizer_from_hf_json                 # the exported tokenizer.json, read back
    exported = tokenizer_from_hf_json(json.load(open(elsewhere / "hf" / "tokenizer.json", encoding="utf-8")))
    assert exported == load_tokenizer(str(tmp_path / "moved" / "tokenizer.json"))
    with open(tmp_path / "moved" / "config.json") as f:
        assert os.path.isabs(json.load(f)["train_config"]["data"])


# ---------------------------------------------------------------------------------------------- malformed fields
def _edit_state(run, edit, reseal=True):
    """Edit the latest state.json; resealed (its state_sha256 recomputed) as a crafted file would be."""
    path = os.path.join(resolve_checkpoint(str(run)), "state.json")
    with open(path) as f:
        state = json.load(f)
    state = edit(state)
    if reseal and isinstance(state, dict):
        state = seal_state(state)
    with open(path, "w") as f:
        json.dump(state, f)
    return path


@pytest.mark.parametrize("edit, message", [
    (lambda s: [s], "must hold a JSON object"),
    (lambda s: dict(s, tokenizer="vocab.json"), "field 'tokenizer' must be an object"),
    (lambda s: {k: v for k, v in s.items() if k != "step"}, "has no field 'step'"),
    (lambda s: dict(s, step="7"), "field 'step' must be an int"),
    (lambda s: {k: v for k, v in s.items() if k != "files"}, "has no field 'files'"),
    (lambda s: dict(s, files={}), "no sha256 for model.safetensors"),
    (lambda s: {k: v for k, v in s.items() if k != "tokenizer"}, "has no field 'tokenizer'"),
    (lambda s: dict(s, tokenizer={"type": "char", "chars": 5}), "'chars' must be a str"),
])
def test_malformed_state_fields_name_the_file_and_the_field(text_file, tmp_path, capsys, edit, message):
    run = tmp_path / "run"
    train(small(text_file, run, max_steps=5), **QUIET)
    _edit_state(run, edit)
    assert main(["sample", str(run), "--max-new-tokens", "2"]) == 1
    err = capsys.readouterr().err
    assert message in err and "state.json" in err and len(err.strip().splitlines()) == 1


def test_an_edited_state_json_is_refused_by_its_own_sha256(text_file, tmp_path, capsys):
    run = tmp_path / "run"
    train(small(text_file, run, max_steps=5), **QUIET)
    _edit_state(run, lambda s: dict(s, model_config=dict(s["model_config"], rope_theta=500.0)), reseal=False)
    assert main(["sample", str(run), "--max-new-tokens", "2"]) == 1
    assert "modified after saving" in capsys.readouterr().err


@pytest.mark.parametrize("field_name", ["rng", "loader", "train_config"])
def test_resume_names_a_missing_training_field(text_file, tmp_path, field_name):
    run = tmp_path / "run"
    train(small(text_file, run, max_steps=5), **QUIET)
    _edit_state(run, lambda s: {k: v for k, v in s.items() if k != field_name})
    with pytest.raises(CheckpointError, match=f"state.json has no field '{field_name}'"):
        train(small(text_file, run, resume=True), **QUIET)


@pytest.mark.parametrize("content, message", [
    ([1, 2], "neither a CharVocab"), ({"type": "char", "chars": 5}, "field 'chars'"),
    ({"chars": "abc"}, "neither a CharVocab"), ({"type": "char", "chars": "aab"}, "repeats"),
])
def test_malformed_vocab_json_names_the_field(tmp_path, content, message):
    path = tmp_path / "vocab.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=message):
        load_tokenizer(str(path))


@pytest.mark.parametrize("pointer, message", [
    ({"path": 5}, "field 'path' must be a str"), ({"step": 5}, "has no field 'path'"),
    ([], "must hold a JSON object"), ({"path": "../../etc"}, "must name a step directory"),
])
def test_malformed_latest_json_names_the_field(text_file, tmp_path, capsys, pointer, message):
    run = tmp_path / "run"
    train(small(text_file, run, max_steps=5), **QUIET)
    (run / "checkpoints" / "latest.json").write_text(json.dumps(pointer))
    assert main(["eval", str(run)]) == 1
    err = capsys.readouterr().err
    assert message in err and "latest.json" in err


# ---------------------------------------------------------------------------------------------- weights
def _resave(run, change):
    from tinygrad_llm.checkpoint import write_safetensors
    from safetensors.numpy import load_file
    directory = resolve_checkpoint(str(run))
    arrays = dict(load_file(os.path.join(directory, "model.safetensors")))
    change(arrays)
    digest = write_safetensors(os.path.join(directory, "model.safetensors"), arrays)
    _edit_state(run, lambda s: dict(s, files=dict(s["files"], **{"model.safetensors": digest})))


def test_integer_or_non_finite_weights_are_refused_with_the_tensor_name(text_file, tmp_path):
    run = tmp_path / "run"
    train(small(text_file, run, max_steps=5), **QUIET)
    name = "model.norm.weight"
    _resave(run, lambda a: a.__setitem__(name, a[name].astype(np.int32)))
    with pytest.raises(CheckpointError, match=f"{name} has dtype int32"):
        load_checkpoint(str(run))

    def poison(arrays):
        arrays[name] = arrays[name].astype(np.float32)
        arrays[name][0] = np.nan
    _resave(run, poison)
    with pytest.raises(CheckpointError, match=f"{name} holds NaN"):
        load_checkpoint(str(run))


# ---------------------------------------------------------------------------------------------- sizes
def test_sizes_beyond_memory_are_refused_before_allocating(text_file, tmp_path, capsys):
    run = tmp_path / "run"
    train(small(text_file, run, max_steps=5), **QUIET)
    _edit_state(run, lambda s: dict(s, model_config=dict(s["model_config"], vocab_size=10 ** 13)))
    assert main(["sample", str(run)]) == 1
    err = capsys.readouterr().err
    assert "needs" in err and "PiB" in err and "memory" in err
    longer = tmp_path / "longer.txt"
    longer.write_text(SHAKESPEARE * 10, encoding="utf-8")
    code = main(["train", "--data", str(longer), "--out-dir", str(tmp_path / "big"), "--seq-len", "2000",
                 "--batch-size", "100000", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and "needs" in err and "memory" in err


# ---------------------------------------------------------------------------------------------- non-finite flags
@pytest.mark.parametrize("argv", [
    ["train", "--grad-clip", "nan"], ["train", "--eps", "nan"], ["train", "--weight-decay", "inf"],
    ["train", "--lr=-inf"], ["sample", "run", "--temperature", "nan"], ["sample", "run", "--top-p", "nan"],
])
def test_non_finite_flags_are_refused_at_parse_time(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "finite" in capsys.readouterr().err


def test_non_finite_values_in_a_config_file_are_refused(tmp_path, capsys):
    toml = tmp_path / "c.toml"
    toml.write_text("grad_clip = nan\n")
    assert main(["train", "--config", str(toml)]) == 1
    assert "grad_clip must be a finite number" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- Ctrl-C
def test_ctrl_c_saves_a_checkpoint_and_exits_130(text_file, tmp_path, monkeypatch, capsys):
    import tinygrad_llm.train as train_module
    from tinygrad_llm.optim import lr_schedule

    def interrupted_at_step_7(step, *args, **kwargs):
        if step == 7:
            os.kill(os.getpid(), signal.SIGINT)                        # as a Ctrl-C during step 7
        return lr_schedule(step, *args, **kwargs)

    monkeypatch.setattr(train_module, "lr_schedule", interrupted_at_step_7)
    run = tmp_path / "run"
    argv = ["train", "--data", text_file, "--out-dir", str(run), "--d-model", "32", "--n-layers", "2",
            "--n-heads", "4", "--ffn-hidden", "64", "--batch-size", "4", "--seq-len", "16", "--max-steps", "10",
            "--warmup-steps", "2", "--eval-interval", "5", "--eval-iters", "2", "--log-interval", "1",
            "--seed", "0", "--lr", "3e-3", "--no-progress"]
    assert main(argv) == 130
    assert "interrupted" in capsys.readouterr().err
    assert weights(run)[0] == 8                                         # step 7 finished, then saved
    monkeypatch.setattr(train_module, "lr_schedule", lr_schedule)
    assert main(argv + ["--resume"]) == 0
    train(small(text_file, tmp_path / "straight"), **QUIET)
    assert_same_weights(weights(tmp_path / "straight"), weights(run))
    assert step_records(tmp_path / "straight") == step_records(run)


# ---------------------------------------------------------------------------------------------- metrics after resume
def test_metrics_after_resume_equal_an_uninterrupted_run(text_file, tmp_path, monkeypatch):
    options = dict(max_steps=12, log_interval=3, eval_interval=5)
    train(small(text_file, tmp_path / "straight", **options), **QUIET)
    undo = stop_at(monkeypatch, 8)                                     # three steps after the step-5 checkpoint
    train(small(text_file, tmp_path / "split", **options), **QUIET)
    undo()
    train(small(text_file, tmp_path / "split", resume=True, **options), **QUIET)
    assert step_records(tmp_path / "straight") == step_records(tmp_path / "split")


# ---------------------------------------------------------------------------------------------- vocabularies
def test_eval_refuses_data_of_another_vocabulary_of_the_same_size(text_file, tmp_path, capsys):
    run = tmp_path / "run"
    train(small(text_file, run, max_steps=5), **QUIET)
    shifted = "".join(chr(ord(c) + 1) if c.isalpha() else c for c in SHAKESPEARE * 3)
    other = tmp_path / "other.txt"
    other.write_text(shifted, encoding="utf-8")
    assert len(set(shifted)) == len(set(SHAKESPEARE))
    assert main(["eval", str(run), "--data", str(other)]) == 1
    assert "another vocabulary" in capsys.readouterr().err
    assert main(["eval", str(run), "--data", text_file, "--eval-iters", "1"]) == 0


def test_a_format_1_checkpoint_without_a_state_seal_still_loads(text_file, tmp_path):
    run = tmp_path / "run"
    train(small(text_file, run, max_steps=5), **QUIET)
    before = weights(run)
    _edit_state(run, lambda s: dict({k: v for k, v in s.items() if k != "state_sha256"}, format_version=1),
                reseal=False)
    assert_same_weights(before, weights(run))
    assert main(["sample", str(run), "--max-new-tokens", "2"]) == 0
