"""kill -9 at chosen and at random moments of `tinygrad-llm train`, then `--resume`: the result equals an
uninterrupted run bit for bit (weights, optimizer state and metrics.jsonl's step records).

The chosen moments use the checkpoint module's TINYGRAD_LLM_CRASH_AT hook (SIGKILL at a named point of
the n-th save, including inside the first one, before latest.json exists); the random ones kill the
process a random time after it printed its model line, wherever the loop happens to be.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from text_sample import SHAKESPEARE
from tinygrad_llm.checkpoint import load_checkpoint
from tinygrad_llm.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPTIONS = ["--d-model", "32", "--n-layers", "2", "--n-heads", "4", "--ffn-hidden", "64", "--batch-size", "4",
           "--seq-len", "16", "--max-steps", "24", "--warmup-steps", "2", "--lr", "3e-3", "--eval-interval", "4",
           "--eval-iters", "2", "--log-interval", "3", "--seed", "0", "--dropout", "0.1", "--no-progress"]


def argv(data, run):
    return ["train", "--data", data, "--out-dir", str(run)] + OPTIONS


def spawn(data, run, crash_at=None):
    env = dict(os.environ, TINYGRAD_LLM_REEXEC="0", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TINYGRAD_LLM_CRASH_AT", None)
    if crash_at:
        env["TINYGRAD_LLM_CRASH_AT"] = crash_at
    return subprocess.Popen([sys.executable, "-m", "tinygrad_llm"] + argv(data, run), env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def snapshot(run):
    model, state = load_checkpoint(str(run))
    from safetensors.numpy import load_file
    moments = dict(load_file(os.path.join(state["directory"], "optimizer.safetensors")))
    with open(os.path.join(run, "metrics.jsonl")) as f:
        records = [{k: v for k, v in r.items() if k not in ("tokens_per_s", "train_s")}
                   for r in map(json.loads, f) if "event" not in r]
    return state["step"], model.state_dict(), moments, records


def assert_equal_runs(a, b):
    assert a[0] == b[0]
    for one, other in ((a[1], b[1]), (a[2], b[2])):
        assert one.keys() == other.keys()
        for name in one:
            np.testing.assert_array_equal(one[name], other[name], err_msg=name)
    assert a[3] == b[3]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash")
    data = root / "text.txt"
    data.write_text(SHAKESPEARE * 3, encoding="utf-8")
    straight = root / "straight"
    assert main(argv(str(data), straight)) == 0
    return root, str(data), snapshot(straight)


@pytest.mark.parametrize("crash_at", ["staged_model@1", "renamed@1", "pointed@1", "staged_model@3",
                                      "renamed@4"])
def test_kill_at_a_named_point_of_a_save_then_resume(setup, crash_at, capsys):
    root, data, expected = setup
    run = root / crash_at.replace("@", "_")
    process = spawn(data, run, crash_at)
    process.communicate(timeout=120)
    assert process.returncode == -9                                   # it really was killed
    assert main(argv(data, run) + ["--resume"]) == 0
    capsys.readouterr()
    assert_equal_runs(expected, snapshot(run))


@pytest.mark.parametrize("seed", [0, 1])
def test_kill_at_a_random_moment_then_resume(setup, seed, capsys):
    root, data, expected = setup
    run = root / f"random_{seed}"
    process = spawn(data, run)
    for line in process.stdout:                                       # training starts after this line
        if line.startswith("model:"):
            break
    time.sleep(np.random.default_rng(seed).uniform(0.0, 0.4))
    process.kill()
    process.communicate(timeout=60)
    assert main(argv(data, run) + ["--resume"]) == 0
    capsys.readouterr()
    assert_equal_runs(expected, snapshot(run))
