"""Data-parallel training over MPI: the same losses and weights as one process.

Each test starts tests/distributed_worker.py under `mpiexec -n 2` (MPICH from its PyPI wheel, a test
extra) and alone, and compares what rank 0 wrote: the global loss of each of 50 steps (float64, within
1e-6 relative) and the final weights (within 1e-5). Also: ZeRO-1 halves the optimizer state per rank, a
run saved under two ranks resumes under one, a rank that dies ends the job instead of hanging it, and
ranks with different configurations are refused.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tinygrad_llm.optim import shard_bounds

WORKER = Path(__file__).resolve().parent / "distributed_worker.py"
ROOT = WORKER.parent.parent


def _mpiexec() -> str | None:
    beside = Path(sys.executable).parent / "mpiexec"
    return str(beside) if beside.exists() else shutil.which("mpiexec")


def _have_mpi() -> bool:
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return False
    return _mpiexec() is not None


# one thread a rank; Open MPI's launcher refuses root (containers, CI) unless told, MPICH ignores these
_QUIET_MPI = {"TINYGRAD_LLM_THREADS": "1", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
              "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}

needs_mpi = pytest.mark.skipif(not _have_mpi(), reason="needs mpi4py and an mpiexec (pip install -e .[dist])")


def _run(tmp_path, name, ranks, *options, expect_ok=True, timeout=120):
    out = tmp_path / f"{name}.json"
    command = [sys.executable, str(WORKER), str(out), *options]
    if ranks > 1:
        command = [_mpiexec(), "-n", str(ranks)] + command
    env = dict(os.environ, PYTHONPATH=str(ROOT), **_QUIET_MPI)
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    if expect_ok:
        assert result.returncode == 0, result.stderr[-2000:]
        return json.loads(out.read_text()), out
    return result, out


def _assert_same_run(one, many):
    want, got = np.array(one["losses"]), np.array(many["losses"])
    assert len(want) == len(got) == 50
    assert np.all(np.abs(got - want) <= 1e-6 * np.abs(want))
    assert want[-1] < want[0]                                        # it trained
    for name, weights in one["weights"].items():
        assert np.max(np.abs(np.array(many["weights"][name]) - np.array(weights))) <= 1e-5, name


def test_shard_bounds_cover_the_range_once():
    for total in (0, 1, 7, 64, 1001):
        for world in (1, 2, 3, 8):
            parts = [shard_bounds(total, r, world) for r in range(world)]
            assert parts[0][0] == 0 and parts[-1][1] == total
            assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
            sizes = [hi - lo for lo, hi in parts]
            assert max(sizes) - min(sizes) <= 1


@needs_mpi
def test_two_ranks_match_one_process(tmp_path):
    one, _ = _run(tmp_path, "one", 1)
    two, _ = _run(tmp_path, "two", 2)
    _assert_same_run(one, two)
    assert two["buckets"] > 2                                         # several buckets were in flight
    assert two["bytes_per_step"] == sum(len(w) for w in one["weights"].values()) * 8


@needs_mpi
def test_zero1_matches_and_halves_the_optimizer_state(tmp_path):
    one, _ = _run(tmp_path, "one", 1)
    zero, _ = _run(tmp_path, "zero", 2, "--zero")
    _assert_same_run(one, zero)
    assert abs(zero["optimizer_state_bytes"] - one["optimizer_state_bytes"] / 2) <= 16 * 2


@needs_mpi
def test_gradient_accumulation_without_overlap_matches(tmp_path):
    one, _ = _run(tmp_path, "one", 1, "--accum", "2", "--batch", "4")
    two, _ = _run(tmp_path, "two", 2, "--accum", "2", "--batch", "4", "--no-overlap")
    _assert_same_run(one, two)


@needs_mpi
def test_state_saved_under_two_sharded_ranks_resumes_under_one(tmp_path):
    straight, _ = _run(tmp_path, "straight", 1)
    _, saved = _run(tmp_path, "first", 2, "--zero", "--steps", "20", "--save-at", "20")
    resumed, _ = _run(tmp_path, "rest", 1, "--resume-from", str(saved) + ".state")
    _assert_same_run(straight, resumed)


@needs_mpi
def test_a_rank_that_dies_ends_the_job(tmp_path):
    result, out = _run(tmp_path, "dies", 2, "--die-at", "3", expect_ok=False, timeout=90)
    assert result.returncode != 0
    assert not out.exists()


@needs_mpi
def test_ranks_with_different_configurations_are_refused(tmp_path):
    result, _ = _run(tmp_path, "odd", 2, "--odd-rank-d-model", "16", expect_ok=False, timeout=90)
    assert result.returncode != 0
    assert "configuration differs from rank 0's in model.d_model (16 vs 32)" in result.stderr


def test_on_leaf_grad_fires_once_per_leaf_with_its_final_gradient():
    from tinygrad_llm import Tensor
    rng = np.random.default_rng(0)
    a = Tensor(rng.standard_normal((3, 4)), requires_grad=True)
    b = Tensor(rng.standard_normal((4,)), requires_grad=True)
    seen = []
    loss = ((a * b).sum() + (a * a).sum() + b.sum())                 # a and b are each used twice
    loss.backward(on_leaf_grad=lambda t: seen.append((t, t.grad.copy())))
    assert [t for t, _ in seen].count(a) == 1 and [t for t, _ in seen].count(b) == 1
    for tensor, grad_then in seen:
        np.testing.assert_array_equal(grad_then, tensor.grad)       # nothing was added afterwards
    np.testing.assert_allclose(a.grad, b.data + 2 * a.data)
    np.testing.assert_allclose(b.grad, a.data.sum(0) + 1)


def test_rank_slice_splits_the_global_batch_in_rank_order():
    from tinygrad_llm.distributed import DistributedError, RankSlice
    from tinygrad_llm.data.feed import RandomWindows
    source = RandomWindows(np.arange(500), batch_size=6, seq_len=8, seed=1)
    whole_x, whole_y = source.batch(4)
    parts = [RankSlice(source, r, 3).batch(4) for r in range(3)]
    np.testing.assert_array_equal(np.concatenate([x for x, _ in parts]), whole_x)
    np.testing.assert_array_equal(np.concatenate([y for _, y in parts]), whole_y)
    with pytest.raises(DistributedError, match="does not split over 4 ranks"):
        RankSlice(source, 0, 4).batch(0)


def test_single_process_data_parallel_equals_plain_training():
    from tinygrad_llm import manual_seed
    from tinygrad_llm.distributed import DataParallel, SingleProcess
    from tinygrad_llm.model import GPT, GPTConfig
    from tinygrad_llm.optim import AdamW
    config = GPTConfig(vocab_size=19, d_model=16, n_layers=1, n_heads=2, ffn_hidden=32, max_seq_len=8)
    rng = np.random.default_rng(5)
    x, y = rng.integers(0, 19, (2, 8)), rng.integers(0, 19, (2, 8))
    results = []
    for wrapped in (False, True):
        manual_seed(3)
        model = GPT(config, dtype=np.float64)
        optimizer = AdamW(model.named_parameters(), lr=1e-2)
        _, loss = model(x, y)
        if wrapped:
            parallel = DataParallel(model, optimizer, SingleProcess())
            parallel.backward(loss, parallel.backward_seeds([y.size])[0])
            norm = parallel.reduce()
            parallel.step()
        else:
            loss.backward()
            norm = optimizer.gather_grads()
            optimizer.step()
        results.append((norm, [p.data.copy() for p in model.parameters()]))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-12)
    for want, got in zip(results[0][1], results[1][1]):
        np.testing.assert_allclose(got, want, rtol=1e-12)


# ------------------------------------------------------------------ `mpiexec -n 2 tinygrad-llm train`
def _train_cli(tmp_path, name, ranks, *extra, corpus=None):
    out = tmp_path / name
    argv = ["-m", "tinygrad_llm", "train", "--data", str(corpus), "--out-dir", str(out), "--dtype", "float64",
            "--n-layers", "1", "--d-model", "32", "--n-heads", "2", "--ffn-hidden", "64", "--batch-size", "4",
            "--seq-len", "16", "--eval-interval", "10", "--eval-iters", "2", "--log-interval", "1",
            "--warmup-steps", "2", "--no-progress", *extra]
    command = [sys.executable, *argv]
    if ranks > 1:
        command = [_mpiexec(), "-n", str(ranks)] + command
    env = dict(os.environ, PYTHONPATH=str(ROOT), TINYGRAD_LLM_REEXEC="0", **_QUIET_MPI)
    result = subprocess.run(command, capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in records if "loss" in r and "event" not in r}
    from safetensors.numpy import load_file
    final = out / "checkpoints" / "step_00000020" / "model.safetensors"
    return losses, (load_file(str(final)) if final.exists() else None), result


@needs_mpi
def test_the_train_command_under_mpiexec_matches_one_process_and_resumes_under_another_world(tmp_path):
    from text_sample import SHAKESPEARE
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(SHAKESPEARE * 3, encoding="utf-8")
    one, one_weights, _ = _train_cli(tmp_path, "one", 1, "--max-steps", "20", corpus=corpus)
    two, two_weights, run = _train_cli(tmp_path, "two", 2, "--max-steps", "20", "--zero", corpus=corpus)
    assert "data parallel: 2 ranks over mpi" in run.stdout
    assert sorted(one) == sorted(two) == list(range(1, 21))
    for step, loss in one.items():
        assert abs(two[step] - loss) <= 1e-6 * loss, step
    for name, weights in one_weights.items():
        assert np.max(np.abs(two_weights[name] - weights)) <= 1e-5, name
    # ten steps under two sharded ranks, then ten more under one process, against ten and ten under one
    # process (the same schedule: max_steps changes the learning-rate curve, so both halves use 10 then 20)
    _train_cli(tmp_path, "split", 2, "--max-steps", "10", "--zero", corpus=corpus)
    rest, rest_weights, _ = _train_cli(tmp_path, "split", 1, "--max-steps", "20", "--resume", corpus=corpus)
    _train_cli(tmp_path, "alone", 1, "--max-steps", "10", corpus=corpus)
    alone, alone_weights, _ = _train_cli(tmp_path, "alone", 1, "--max-steps", "20", "--resume", corpus=corpus)
    assert sorted(rest) == sorted(alone) == list(range(1, 21))
    for step, loss in alone.items():
        assert abs(rest[step] - loss) <= 1e-6 * loss, step
    for name, weights in alone_weights.items():
        assert np.max(np.abs(rest_weights[name] - weights)) <= 1e-5, name
