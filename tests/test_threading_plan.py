"""The CPU threading plan: overrides, the per-machine cache (hit, invalidation, corrupt file), the log line."""
from __future__ import annotations

import json
import re
import os

import pytest

from tinygrad_llm import cpu_threads, threading_plan
from tinygrad_llm.model import GPTConfig

SHAPE = {"d_model": 32, "batch_size": 4}


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """A private cache directory, two usable cores, an idle machine, no plan from the environment; thread
    counts restored."""
    monkeypatch.setenv("TINYGRAD_LLM_CACHE", str(tmp_path))
    monkeypatch.delenv(threading_plan.ENV_PLAN, raising=False)
    monkeypatch.setattr(threading_plan, "usable_cores", lambda: 2)
    monkeypatch.setattr(threading_plan, "machine_busy", lambda: False)     # the real load average moves
    before = cpu_threads.thread_count()
    yield
    cpu_threads.set_thread_count(before)


class CountingFactory:
    """A step factory whose steps cost nothing; records how often it was asked to build one."""
    def __init__(self):
        self.built = 0

    def __call__(self):
        self.built += 1
        return lambda: None


def test_override_by_argument_skips_measuring():
    factory = CountingFactory()
    for plan, pool in (("pool", 2), ("blas", 1), ("single", 1)):
        choice = threading_plan.choose(plan, SHAPE, factory)
        assert (choice["plan"], choice["source"], choice["pool_threads"]) == (plan, "flag", pool)
        assert cpu_threads.thread_count() == pool
    assert factory.built == 0


def test_environment_overrides_the_configured_plan(monkeypatch):
    monkeypatch.setenv(threading_plan.ENV_PLAN, "single")
    factory = CountingFactory()
    choice = threading_plan.choose("pool", SHAPE, factory)
    assert (choice["plan"], choice["source"]) == ("single", "env")
    assert factory.built == 0 and cpu_threads.thread_count() == 1


def test_bad_plan_names_are_clear_errors(monkeypatch):
    with pytest.raises(ValueError, match="threads_plan must be one of"):
        threading_plan.choose("fast", SHAPE, CountingFactory())
    monkeypatch.setenv(threading_plan.ENV_PLAN, "many")
    with pytest.raises(ValueError, match="TINYGRAD_LLM_THREADS_PLAN"):
        threading_plan.choose("auto", SHAPE, CountingFactory())


def test_auto_measures_once_then_reads_the_cache(monkeypatch):
    timings = {"pool": 3.0, "blas": 1.0, "single": 2.0}
    monkeypatch.setattr(threading_plan, "measure", lambda step, candidates: {p: timings[p] for p in candidates})
    factory = CountingFactory()
    first = threading_plan.choose("auto", SHAPE, factory)
    assert (first["plan"], first["source"], factory.built) == ("blas", "measured", 1)
    with open(threading_plan.cache_path()) as f:
        assert [entry["plan"] for entry in json.load(f).values()] == ["blas"]
    timings.update(blas=9.0)                                   # a new measurement would now pick `single`
    second = threading_plan.choose("auto", SHAPE, factory)
    assert (second["plan"], second["source"], factory.built) == ("blas", "cache", 1)
    assert second["step_ms"] == first["step_ms"]


@pytest.mark.parametrize("change", ["blas build", "config shape", "thread timeout", "machine load"])
def test_cache_is_invalidated_when_the_build_or_the_shape_changes(monkeypatch, change):
    timings = {"pool": 1.0, "blas": 2.0, "single": 3.0}
    monkeypatch.setattr(threading_plan, "measure", lambda step, candidates: {p: timings[p] for p in candidates})
    factory = CountingFactory()
    assert threading_plan.choose("auto", SHAPE, factory)["plan"] == "pool"
    timings.update(pool=9.0)
    shape = SHAPE
    if change == "blas build":
        monkeypatch.setattr(threading_plan, "_blas_build", lambda: "numpy 9.9; another OpenBLAS")
    elif change == "config shape":
        shape = dict(SHAPE, d_model=64)
    elif change == "thread timeout":
        monkeypatch.setenv("OPENBLAS_THREAD_TIMEOUT", "7")
    else:
        monkeypatch.setattr(threading_plan, "machine_busy", lambda: True)
    choice = threading_plan.choose("auto", shape, factory)
    assert (choice["plan"], choice["source"], factory.built) == ("blas", "measured", 2)
    with open(threading_plan.cache_path()) as f:
        assert len(json.load(f)) == 2                          # the old entry stays for the old build/shape


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"abc": 3}'])
def test_corrupt_cache_is_ignored_with_a_warning_and_rewritten(monkeypatch, content):
    monkeypatch.setattr(threading_plan, "_threadpoolctl", lambda: object())    # every plan is a candidate
    monkeypatch.setattr(threading_plan, "apply", lambda plan, cores=None: None)
    monkeypatch.setattr(threading_plan, "measure", lambda step, candidates: {p: 1.0 + (p != "single") for p in candidates})
    path = threading_plan.cache_path()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(content)
    with pytest.warns(UserWarning, match="ignoring the threading-plan cache"):
        choice = threading_plan.choose("auto", SHAPE, CountingFactory())
    assert (choice["plan"], choice["source"]) == ("single", "measured")
    with open(path) as f:
        assert [entry["plan"] for entry in json.load(f).values()] == ["single"]


def test_one_core_and_shared_cores_never_measure(monkeypatch):
    factory = CountingFactory()
    assert threading_plan.choose("auto", SHAPE, None)["plan"] == "single"        # data-parallel ranks
    monkeypatch.setattr(threading_plan, "usable_cores", lambda: 1)
    choice = threading_plan.choose("auto", SHAPE, factory)
    assert (choice["plan"], choice["source"], choice["pool_threads"]) == ("single", "one core", 1)
    assert factory.built == 0 and not os.path.exists(threading_plan.cache_path())


def test_measure_interleaves_and_keeps_each_plans_fastest_step(monkeypatch):
    applied = []
    monkeypatch.setattr(threading_plan, "apply", lambda plan, cores=None: applied.append(plan))
    seconds = threading_plan.measure(lambda: None, ("pool", "blas"), rounds=2)
    assert applied == ["pool", "blas"] * 3                     # warm-up, then two rounds in turn
    assert set(seconds) == {"pool", "blas"} and all(0 <= s < 1 for s in seconds.values())


def test_scratch_step_leaves_the_random_stream_alone():
    from tinygrad_llm import rng
    config = GPTConfig(vocab_size=17, d_model=16, n_layers=1, n_heads=2, ffn_hidden=32, max_seq_len=8)
    rng.manual_seed(5)
    expected = rng.generator().random(3)
    rng.manual_seed(5)
    step = threading_plan.model_step_factory(config, 2, 8)()
    step()
    assert (rng.generator().random(3) == expected).all()


def test_the_run_logs_its_plan_and_records_it_in_metrics(tmp_path):
    from text_sample import SHAKESPEARE
    from tinygrad_llm.train import TrainConfig, train
    text = tmp_path / "t.txt"
    text.write_text(SHAKESPEARE, encoding="utf-8")
    lines = []
    train(TrainConfig(data=str(text), out_dir=str(tmp_path / "run"), d_model=16, n_layers=1, n_heads=2, ffn_hidden=32,
                      batch_size=2, seq_len=16, max_steps=2, eval_interval=2, eval_iters=1, progress=False,
                      threads_plan="blas"), log=lines.append)
    logged = [line for line in lines if line.startswith("threads:")]
    assert len(logged) == 1 and re.fullmatch(r"threads: plan blas \(flag\), row pool 1, BLAS \d+", logged[0]), logged
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        start = json.loads(f.readline())
    assert start["event"] == "start" and start["threads"]["plan"] == "blas"
    with pytest.raises(ValueError, match="threads_plan"):
        TrainConfig(threads_plan="fast").validate()


def test_guard_moves_a_slowed_plan_to_single_and_tries_it_again(monkeypatch):
    monkeypatch.setattr(threading_plan, "set_blas_threads", lambda count: True)   # leave this process's BLAS alone
    threading_plan.apply("pool")
    lines = []
    guard = threading_plan.Guard("pool", 100.0, lines.append)            # single plan: 100 ms a step
    slow, fast = 0.2, 0.05                                               # the limit is 1.25 × 100 ms
    for seconds in [slow, slow, fast] * 3 + [fast] * 5:                  # never GUARD_STEPS slow ones in a row
        guard.step(seconds)
    assert (guard.current, guard.switches, cpu_threads.thread_count(), lines) == ("pool", 0, 2, [])
    for _ in range(threading_plan.GUARD_STEPS):
        guard.step(slow)
    assert (guard.current, cpu_threads.thread_count()) == ("single", 1)
    assert len(lines) == 1 and f"plan single for {threading_plan.GUARD_RETRY} steps" in lines[0], lines
    for _ in range(threading_plan.GUARD_RETRY - 1):
        guard.step(slow)                                                  # single's own times are not judged
    assert guard.current == "single"
    guard.step(slow)
    assert (guard.current, cpu_threads.thread_count()) == ("pool", 2) and "trying plan pool again" in lines[-1]
    for _ in range(threading_plan.GUARD_STEPS):                           # still slow: back, for twice as long
        guard.step(slow)
    assert guard.current == "single" and guard.left == 2 * threading_plan.GUARD_RETRY
    assert f"plan single for {2 * threading_plan.GUARD_RETRY} steps" in lines[-1]


def test_guard_is_off_for_single_fixed_plans_and_unknown_single_times(monkeypatch):
    monkeypatch.setattr(threading_plan, "set_blas_threads", lambda count: True)
    guards = [threading_plan.Guard("single", 100.0), threading_plan.Guard("blas", None),
              threading_plan.Guard.for_choice({"plan": "blas", "source": "flag", "step_ms": {"single": 100.0}}),
              threading_plan.Guard.for_choice({"plan": "blas", "source": "cache", "step_ms": {"blas": 50.0}})]
    for guard in guards:
        for _ in range(10):
            guard.step(10.0)
        assert guard.switches == 0 and guard.current == guard.plan
    active = threading_plan.Guard.for_choice({"plan": "blas", "source": "cache", "step_ms": {"single": 100.0}})
    for _ in range(threading_plan.GUARD_STEPS):
        active.step(10.0)
    assert active.current == "single"
