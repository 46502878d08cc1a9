"""The CPU threading plan of a training run: who gets the cores, the row pool or BLAS.

Two kinds of threads can work on a CPU step: OpenBLAS's own (the GEMMs) and `cpu_threads`' row pool (the
fused elementwise ops and AdamW). Which mix is fastest depends on the machine, the NumPy/BLAS build, the
model's shape and how busy the cores are, and the wrong mix can double a step's time. So the plan is
measured, not guessed: a few training steps of a scratch copy of the run's model under each candidate,
the candidates interleaved so that load from other processes hits them alike, the fastest kept.

Plans (N = the usable cores, at most 8 and at most any of $TINYGRAD_LLM_THREADS, $OPENBLAS_NUM_THREADS,
$OMP_NUM_THREADS that is set):
    pool    the row pool with N threads, BLAS with N threads
    blas    no row pool (everything elementwise on the calling thread), BLAS with N threads
    single  one thread for everything: plain NumPy
`auto` measures the candidates; the choice is cached in `<cache>/threading.json` ($TINYGRAD_LLM_CACHE,
else ~/.cache/tinygrad_llm), keyed by the machine (CPU model, usable cores), the NumPy and BLAS build,
OPENBLAS_THREAD_TIMEOUT, whether the machine is busy (load average at least its CPU count), whether the
ops' compiled CPU loops (ops/fused_cpu) are in use and the model/batch shape; any change of those
measures again. A corrupt cache
file is ignored with a warning and rewritten. $TINYGRAD_LLM_THREADS_PLAN overrides the configured plan.
While a run trains, `Guard` moves it to `single` for a while when the plan `auto` chose runs slower than
the single plan measured at the start (another process took a core since).

Simplifications: BLAS's thread count is switched at run time through threadpoolctl (an optional extra,
`pip install tinygrad_llm[cpu]`); without it BLAS keeps the count it started with, the `single` plan
keeps only the pool at one thread, and `auto` compares `pool` and `blas`. On one usable core `auto` is
`single` (and the others amount to it). Busy or idle is a coarse split: a measurement reflects the load
the machine had when it was taken; delete the cache file to measure again. The scratch steps use random tokens (the same shapes as the run), never the run's model,
optimizer or random stream, so a run trains the same whichever plan it gets.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
import time
import warnings

import numpy as np

from . import cpu_threads
from .ops import fused_cpu

PLANS = ("pool", "blas", "single")
CHOICES = ("auto",) + PLANS
ENV_PLAN = "TINYGRAD_LLM_THREADS_PLAN"
CACHE_FILE = "threading.json"


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask), at most 8 and at most $TINYGRAD_LLM_THREADS,
    $OPENBLAS_NUM_THREADS and $OMP_NUM_THREADS where they are set."""
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:                                     # not Linux
        count = os.cpu_count() or 1
    for variable in ("TINYGRAD_LLM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        limit = os.environ.get(variable, "").strip()
        if limit.isdigit() and int(limit) > 0:
            count = min(count, int(limit))
    return max(1, min(count, 8))


def cache_path() -> str:
    root = os.environ.get("TINYGRAD_LLM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "tinygrad_llm")
    return os.path.join(root, CACHE_FILE)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _blas_build() -> str:
    """NumPy's version and its BLAS library's name, version and build options."""
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        text = f"{blas.get('name')} {blas.get('version')} {blas.get('openblas configuration', '')}"
    except Exception:                                          # an older NumPy without mode="dicts"
        text = "unknown"
    return f"numpy {np.__version__}; {text}"


def cache_key(shape: dict) -> str:
    """What the measured plan depends on, as one string (its hash names the cache entry)."""
    parts = {"cpu": _cpu_model(), "cores": usable_cores(), "machine": platform.machine(), "blas": _blas_build(),
             "openblas_thread_timeout": os.environ.get("OPENBLAS_THREAD_TIMEOUT", ""),
             "blas_control": _threadpoolctl() is not None, "busy": machine_busy(), "shape": shape,
             "fused_cpu_loops": fused_cpu.library() is not None}
    return json.dumps(parts, sort_keys=True)


def machine_busy() -> bool:
    """Whether other processes already keep the cores busy (1-minute load average ≥ the CPU count): the
    plan that wins then (usually `single`) is not the one that wins on an idle machine."""
    try:
        return os.getloadavg()[0] >= (os.cpu_count() or 1)
    except (AttributeError, OSError):
        return False


def _threadpoolctl():
    try:
        import threadpoolctl
    except ImportError:
        return None
    return threadpoolctl


def set_blas_threads(count: int) -> bool:
    """Limit BLAS to `count` threads from now on; False when that cannot be done (no threadpoolctl)."""
    control = _threadpoolctl()
    if control is None:
        return False
    control.threadpool_limits(limits=count, user_api="blas")
    return True


def apply(plan: str, cores: int | None = None) -> None:
    """Set the row pool and BLAS thread counts of `plan` for this process."""
    if plan not in PLANS:
        raise ValueError(f"unknown threading plan {plan!r}; choose from {', '.join(CHOICES)}")
    cores = cores or usable_cores()
    cpu_threads.set_thread_count(cores if plan == "pool" else 1)
    set_blas_threads(1 if plan == "single" else cores)


def requested(configured: str = "auto") -> str:
    """The plan asked for: $TINYGRAD_LLM_THREADS_PLAN if set, else `configured`."""
    plan = (os.environ.get(ENV_PLAN) or configured or "auto").strip().lower()
    if plan not in CHOICES:
        source = f"${ENV_PLAN}" if os.environ.get(ENV_PLAN) else "threads_plan"
        raise ValueError(f"{source} must be one of {', '.join(CHOICES)}, got {plan!r}")
    return plan


def read_cache(path: str) -> dict:
    """The cache's entries; {} (with a warning) when the file is unreadable or not what it should be."""
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            entries = json.load(f)
        if not isinstance(entries, dict) or not all(isinstance(v, dict) for v in entries.values()):
            raise ValueError("not an object of entries")
        return entries
    except (OSError, ValueError) as error:
        warnings.warn(f"ignoring the threading-plan cache {path}: {error}", stacklevel=2)
        return {}


def write_cache(path: str, entries: dict) -> None:
    """Atomic write (temp file, fsync, rename); a cache that cannot be written is only a missed saving."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        handle, temp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".threading-", suffix=".json")
        with os.fdopen(handle, "w", encoding="utf-8") as f:
            json.dump(entries, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except OSError as error:
        warnings.warn(f"could not write the threading-plan cache {path}: {error}", stacklevel=2)


def measure(step, candidates, rounds: int = 3) -> dict:
    """Seconds of `step()` under each plan: one warm-up step each, then `rounds` rounds through the
    candidates in turn; each plan's fastest step (the least disturbed by other processes)."""
    best = {plan: float("inf") for plan in candidates}
    for plan in candidates:
        apply(plan)
        step()
    for _ in range(rounds):
        for plan in candidates:
            apply(plan)
            start = time.perf_counter()
            step()
            best[plan] = min(best[plan], time.perf_counter() - start)
    return best


def choose(configured: str, shape: dict, step_factory=None) -> dict:
    """Pick, apply and describe the plan. `shape` (a JSON-able dict) keys the cache; `step_factory()`
    returns a function running one scratch training step (called only when the plan must be measured).

    Without `step_factory` (data-parallel ranks sharing the cores) `auto` means `single`.
    Returns {"plan", "source" (flag, env, cache, measured, one core, not measured), "pool_threads",
    "blas_threads", "step_ms" (measured plans, when known)}."""
    plan = requested(configured)
    cores = usable_cores()
    source = "env" if os.environ.get(ENV_PLAN) else "flag"
    step_ms = None
    if plan == "auto":
        candidates = PLANS if _threadpoolctl() is not None else ("pool", "blas")
        if cores == 1:
            plan, source = "single", "one core"
        elif step_factory is None:                             # several ranks share this machine's cores
            plan, source = "single", "not measured"
        else:
            path = cache_path()
            entries = read_cache(path)
            key = cache_key(shape)
            name = hashlib.sha256(key.encode()).hexdigest()[:16]
            entry = entries.get(name)
            if entry and entry.get("key") == key and entry.get("plan") in candidates:
                plan, source, step_ms = entry["plan"], "cache", entry.get("step_ms")
            else:
                seconds = measure(step_factory(), candidates)
                plan = min(seconds, key=seconds.get)
                step_ms = {p: round(s * 1e3, 2) for p, s in seconds.items()}
                entries[name] = {"key": key, "plan": plan, "step_ms": step_ms, "measured_at": time.time()}
                write_cache(path, entries)
                source = "measured"
    apply(plan, cores)
    blas_threads = 1 if plan == "single" else cores
    if plan == "single" and _threadpoolctl() is None:
        blas_threads = None                                    # unchanged: BLAS keeps its own count
    return {"plan": plan, "source": source, "pool_threads": cpu_threads.thread_count(),
            "blas_threads": blas_threads, "step_ms": step_ms}


GUARD_FACTOR = 1.25      # a step this many times the single plan's measured step is slower than plain NumPy ...
GUARD_STEPS = 3          # ... this many steps in a row switch the run to `single`
GUARD_RETRY = 4          # steps on `single` before the plan is tried again (doubled after each failed try ...
GUARD_RETRY_MAX = 1600
GUARD_SETTLED = 50       # ... back to GUARD_RETRY once the plan has run this many steps since it came back)


class Guard:
    """Keeps a run off a plan with several threads while that plan is slower than plain NumPy.

    The plan is measured once, at the start, on the machine as it was then. When another process takes a
    core later, the threads of a `pool` or `blas` plan wait for each other at every GEMM (the one whose
    core is taken runs in the scheduler's time slices), and a step can take several times the one-thread
    step: the char config at two threads ran 137–206 ms a step against 55–58 on `single` with the second
    core taken (benchmarks/RESULTS.md). The guard holds the step times to the single plan's step measured
    at the start (`single_ms`): after GUARD_STEPS steps in a row above GUARD_FACTOR times it, the run goes
    to `single`; after `retry` steps there it tries the chosen plan again, which stays unless its next
    GUARD_STEPS steps are all slow again (then `single` for twice as long, at most GUARD_RETRY_MAX steps).
    Inactive when the plan is `single` or `single_ms` is unknown. Simplification: a step's time includes
    whatever else it does; requiring several slow steps in a row keeps a lone slow step (a garbage
    collection) from switching.
    """

    def __init__(self, plan: str, single_ms, log=None):
        self.plan, self.current = plan, plan
        self.limit = GUARD_FACTOR * float(single_ms) / 1e3 if single_ms and plan != "single" else None
        self.log = log or (lambda message: None)
        self.slow = self.left = self.on_plan = 0
        self.retry = GUARD_RETRY
        self.switches = 0

    @classmethod
    def for_choice(cls, choice: dict, log=None) -> "Guard":
        """The guard of a `choose` result: active for a plan that `auto` picked (measured or cached), not
        for one fixed by the flag or the environment."""
        single = (choice.get("step_ms") or {}).get("single") if choice["source"] in ("measured", "cache") else None
        return cls(choice["plan"], single, log)

    def step(self, seconds: float) -> None:
        """Account one training step that took `seconds` (wall clock); switch plans as described above."""
        if self.limit is None:
            return
        if self.current == "single":
            self.left -= 1
            if self.left <= 0:
                self._switch(self.plan, f"trying plan {self.plan} again")
            return
        self.on_plan += 1
        self.slow = self.slow + 1 if seconds > self.limit else 0
        if self.slow < GUARD_STEPS:
            if self.on_plan > GUARD_SETTLED:
                self.retry = GUARD_RETRY                      # the plan has run well for a while
            return
        self.retry = min(2 * self.retry, GUARD_RETRY_MAX) if self.switches and self.on_plan <= 2 * GUARD_STEPS \
            else self.retry
        self.left = self.retry
        self._switch("single", f"{GUARD_STEPS} steps above {GUARD_FACTOR:g}× the single plan's "
                               f"{self.limit / GUARD_FACTOR * 1e3:.0f} ms (a core taken?); plan single for "
                               f"{self.left} steps")

    def _switch(self, plan: str, why: str) -> None:
        apply(plan)
        self.current, self.slow, self.on_plan = plan, 0, 0
        self.switches += 1
        self.log(f"threads: {why}")


def model_shape(model_config, batch_size: int, seq_len: int, dtype="float32") -> dict:
    """The cache key's shape part for a GPT config and a batch."""
    return dict(model_config.to_dict(), batch_size=int(batch_size), seq_len=int(seq_len), dtype=np.dtype(dtype).name)


def model_step_factory(model_config, batch_size: int, seq_len: int, dtype=np.float32):
    """A function that builds a scratch model of `model_config` and returns its training step (forward,
    cross-entropy, backward, gradient norm, AdamW) on random tokens of (batch_size, seq_len). The global
    random stream is left as it was."""
    def factory():
        from . import rng
        from .model import GPT
        from .optim import AdamW
        state = rng.get_state()
        try:
            model = GPT(model_config)
        finally:
            rng.set_state(state)
        model.to(dtype=dtype)
        optimizer = AdamW(model.named_parameters(), lr=0.0, weight_decay=0.1)
        tokens = np.random.default_rng(0).integers(0, model_config.vocab_size, (2, batch_size, seq_len))

        def step():
            _, loss = model(tokens[0], tokens[1], return_logits=False)
            loss.backward()
            norm = optimizer.gather_grads()
            optimizer.step(grad_scale=min(1.0, 1.0 / (norm + 1e-6)))
            optimizer.zero_grad()
        return step
    return factory


def describe(choice: dict) -> str:
    """One log line."""
    timings = ""
    if choice.get("step_ms"):
        timings = "; ms/step " + ", ".join(f"{p} {ms:.0f}" for p, ms in choice["step_ms"].items())
    blas = choice["blas_threads"] if choice["blas_threads"] is not None else "unchanged"
    return (f"threads: plan {choice['plan']} ({choice['source']}), row pool {choice['pool_threads']}, "
            f"BLAS {blas}{timings}")
