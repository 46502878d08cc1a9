"""Row-parallel NumPy on the CPU: split independent work across a few threads.

NumPy runs each elementwise op on one core, but it releases the GIL inside its loops (and BLAS calls),
so two Python threads working on two halves of an array really run at once; the ops' compiled loops
(ops/fused_cpu.c, called through ctypes, which releases the GIL for the whole call) do the same with one
call per thread instead of one per NumPy pass. The fused training ops
(attention, SwiGLU, RMSNorm, the output head's softmax, in ops/) and the AdamW update split their rows
with `run_chunked` / `run_row_chunks`; GEMMs are already threaded by BLAS and stay as they are.

Thread count: $TINYGRAD_LLM_THREADS if set. Otherwise the pool is on only when $OPENBLAS_THREAD_TIMEOUT is
set (then with $OPENBLAS_NUM_THREADS / $OMP_NUM_THREADS threads, else the CPU count, at most 8): OpenBLAS's
idle worker threads spin for a long while after each GEMM by default and would fight the pool's threads
for the same cores, and OPENBLAS_THREAD_TIMEOUT (read once, when NumPy loads OpenBLAS) makes them sleep
sooner. A training run does not rely on this default: `threading_plan` measures which mix of pool and
BLAS threads is fastest on the machine and sets it with `set_thread_count` (figures in
benchmarks/RESULTS.md). CuPy arrays never go through the pool.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

_pool = None
_threads = None


def thread_count() -> int:
    global _threads
    if _threads is None:
        value = os.environ.get("TINYGRAD_LLM_THREADS", "").strip()
        if value.isdigit() and int(value) > 0:
            _threads = min(int(value), 64)
        elif os.environ.get("OPENBLAS_THREAD_TIMEOUT"):
            limit = (os.environ.get("OPENBLAS_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS") or "").strip()
            _threads = min(int(limit) if limit.isdigit() and int(limit) > 0 else (os.cpu_count() or 1), 8)
        else:
            _threads = 1
    return _threads


def set_thread_count(count: int) -> None:
    """Use `count` threads from now on (1: everything on the calling thread)."""
    global _threads, _pool
    if _pool is not None:
        _pool.shutdown(wait=True)
        _pool = None
    _threads = max(1, int(count))


def parallel_items(function, items: list):
    """[function(item) for item in items], the items spread over the pool (the first on this thread)."""
    global _pool
    if len(items) <= 1 or thread_count() <= 1:
        return [function(item) for item in items]
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=thread_count(), thread_name_prefix="tinygrad_llm")
    futures = [_pool.submit(function, item) for item in items[1:]]
    first = function(items[0])
    return [first] + [f.result() for f in futures]


def split(total: int, min_chunk: int = 1, parts: int | None = None) -> list:
    """Contiguous (start, end) ranges covering range(total): one per thread, none smaller than min_chunk."""
    count = max(1, min(parts or thread_count(), total // max(1, min_chunk)))
    bounds = [total * i // count for i in range(count + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def run_chunked(function, total: int, chunk: int):
    """function(start, end) over range(total) in chunks of `chunk` items (cache-sized pieces), the chunks
    dealt round-robin to the threads; returns the results in chunk order."""
    chunk = max(1, int(chunk))
    if total <= chunk:                                   # one chunk: no lists, no pool
        return [function(0, total)]
    ranges = [(start, min(start + chunk, total)) for start in range(0, total, chunk)]
    threads = min(thread_count(), len(ranges))
    groups = [list(range(i, len(ranges), threads)) for i in range(threads)]
    results = [None] * len(ranges)

    def work(indices):
        for i in indices:
            results[i] = function(*ranges[i])

    parallel_items(work, groups)
    return results


CHUNK_ELEMENTS = 1 << 17     # elements per row chunk on the CPU (512 KiB of float32: stays in L2)
SPLIT_ELEMENTS = 1 << 16     # a pass over fewer elements than this per thread stays on the calling thread


def balanced_parts(rows: int, width: int) -> int:
    """How many row chunks a pass over (rows, width) elements is cut into when the result may depend on
    the thread count: cache-sized chunks, a multiple of the thread count (no thread waits for another's
    extra chunk), and a pass under one chunk still split over the threads when each gets at least
    SPLIT_ELEMENTS (handing less to the pool costs more than it saves; benchmarks/RESULTS.md)."""
    threads, elements = thread_count(), rows * width
    count = -(-elements // CHUNK_ELEMENTS)
    if count <= 1:
        count = max(1, min(threads, elements // SPLIT_ELEMENTS))
    elif threads > 1:
        count = -(-count // threads) * threads
    return max(1, min(rows, count))


def run_row_chunks(function, rows: int, width: int, xp, balanced: bool = False):
    """function(start, end) over cache-sized row ranges (about CHUNK_ELEMENTS elements each, rows of `width`
    elements), threaded, for NumPy arrays; one call over every row for CuPy arrays (xp is their module).
    The ranges depend only on the shape, so per-chunk partial results combine the same way on any thread
    count; `balanced` (for passes whose result does not depend on the chunking, e.g. elementwise ones)
    uses `balanced_parts` instead, which evens the work out over the threads."""
    if xp.__name__ != "numpy":
        return [function(0, rows)]
    if balanced:
        return run_chunked(function, rows, -(-rows // balanced_parts(rows, width)))
    return run_chunked(function, rows, max(1, CHUNK_ELEMENTS // max(1, width)))
