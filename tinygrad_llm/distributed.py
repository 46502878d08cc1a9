"""Data-parallel training: one process per CPU slot (MPI) or per GPU (NCCL), the same result as one process.

    mpiexec -n 2 tinygrad-llm train --batch-size 16 ...          # two ranks, 8 rows of each batch apiece

Every rank holds the whole model. A step's global batch is drawn exactly as one process would draw it
(from the seed and the step), and rank r takes its r-th contiguous block of rows, so the batch does not
depend on the world size. After the backward pass the gradients are summed over the ranks; each rank's
backward was seeded with its share of the global target tokens, so the sum is the mean over the global
batch, as one process would compute it.

Overlap. The gradients are reduced in buckets of about `bucket_bytes`, laid out as slices of the
optimizer's flat gradient buffers in the order the backward pass finishes them (the head and last layers
first). The engine calls back as soon as a parameter's gradient is final (`Tensor.backward(on_leaf_grad=)`);
when the last parameter of a bucket is in, a non-blocking all-reduce of that slice starts while the rest
of the backward pass runs. Inner steps of gradient accumulation reduce nothing.

ZeRO stage 1 (`zero=True`): AdamW keeps the moments of 1/world of every flat buffer per rank
(`optim.AdamW(shard=...)`), updates those parameters only, and the ranks all-gather the updated slices.
Checkpoints hold the whole state (the moment slices are combined), so a run resumes under any world size.

Failures. A rank that raises prints one line and aborts the job (MPI_Abort), so the others never wait
forever; a collective that does not complete within `timeout` seconds (a rank died or hangs) aborts too.
Configurations are compared at start: ranks that disagree are refused before the first step.

Simplifications: data parallelism only (tensor parallelism is described in docs/distributed.md); buckets
are all-reduced, not reduce-scattered, also under ZeRO-1; one communicator per job.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time

import numpy as np

from . import backend

DEFAULT_BUCKET_BYTES = 4 << 20
DEFAULT_TIMEOUT_S = 600.0
ABORT_GRACE_S = 0.5               # seconds an aborting rank waits after printing its error, before MPI_Abort

_RANK_VARIABLES = (("PMI_RANK", "PMI_SIZE"), ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
                   ("MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE"))


class DistributedError(RuntimeError):
    """A failure of the job as a whole: a rank died, timed out, or disagrees with the others."""


def launched_world() -> tuple:
    """(rank, size) that an MPI launcher (mpiexec of MPICH, Open MPI, MVAPICH) gave this process, or (0, 1)."""
    for rank_name, size_name in _RANK_VARIABLES:
        if rank_name in os.environ and size_name in os.environ:
            return int(os.environ[rank_name]), int(os.environ[size_name])
    return 0, 1


# ------------------------------------------------------------------------------------------ communicators
class SingleProcess:
    """The communicator of a job of one: every collective is the identity."""

    rank, size, name = 0, 1, "single"

    def start_allreduce(self, buffer):
        return _Done()

    def allreduce(self, buffer):
        return buffer

    def allgather_slices(self, buffer, bounds):
        return buffer

    def sum_host(self, array: np.ndarray) -> np.ndarray:
        return array

    def gather_objects(self, value) -> list:
        return [value]

    def broadcast_object(self, value):
        return value

    def barrier(self) -> None:
        pass

    def abort(self, message: str, code: int = 1) -> None:
        raise DistributedError(message)


class _Done:
    def wait(self) -> None:
        pass


class _MPIRequest:
    """A non-blocking MPI collective, waited for with a deadline."""

    def __init__(self, communicator, request, what: str):
        self.communicator, self.request, self.what = communicator, request, what

    def wait(self) -> None:
        deadline = time.monotonic() + self.communicator.timeout
        pause = 1e-5
        while not self.request.Test():
            if time.monotonic() > deadline:
                self.communicator.abort(f"{self.what} did not complete within {self.communicator.timeout:g} s: "
                                        f"another rank died or is stuck")
            time.sleep(pause)
            pause = min(pause * 2, 1e-3)


class MPICommunicator:
    """Collectives over MPI (mpi4py) on host arrays: the CPU processes of `mpiexec -n N`."""

    name = "mpi"

    def __init__(self, timeout: float = DEFAULT_TIMEOUT_S):
        try:
            from mpi4py import MPI
        except ImportError:
            raise DistributedError("this process was started by an MPI launcher but mpi4py is missing: "
                                   "pip install -e .[dist]") from None
        self.MPI = MPI
        self.comm = MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.timeout = float(timeout)

    def start_allreduce(self, buffer):
        """Start summing `buffer` (a contiguous host array) over the ranks, in place."""
        request = self.comm.Iallreduce(self.MPI.IN_PLACE, buffer, op=self.MPI.SUM)
        return _MPIRequest(self, request, f"rank {self.rank}: an all-reduce of {buffer.nbytes} bytes")

    def allreduce(self, buffer):
        self.start_allreduce(buffer).wait()
        return buffer

    def allgather_slices(self, buffer, bounds):
        """Fill every rank's `buffer` with each rank's own slice bounds[r] = (lo, hi) of it."""
        counts = [hi - lo for lo, hi in bounds]
        displacements = [lo for lo, _ in bounds]
        request = self.comm.Iallgatherv(self.MPI.IN_PLACE, [buffer, (counts, displacements)])
        _MPIRequest(self, request, f"rank {self.rank}: an all-gather of {buffer.nbytes} bytes").wait()
        return buffer

    def sum_host(self, array: np.ndarray) -> np.ndarray:
        return self.allreduce(np.ascontiguousarray(array))

    def gather_objects(self, value) -> list:
        return self.comm.allgather(json.dumps(value, sort_keys=True, default=str))

    def broadcast_object(self, value):
        return json.loads(self.comm.bcast(json.dumps(value, default=str) if self.rank == 0 else None, root=0))

    def barrier(self) -> None:
        _MPIRequest(self, self.comm.Ibarrier(), f"rank {self.rank}: a barrier").wait()

    def abort(self, message: str, code: int = 1) -> None:
        print(f"tinygrad-llm (rank {self.rank} of {self.size}): error: {message}", file=sys.stderr, flush=True)
        time.sleep(ABORT_GRACE_S)        # mpiexec forwards the line before MPI_Abort tears the job down
        self.comm.Abort(code)


class NCCLCommunicator(MPICommunicator):
    """Collectives over NCCL on GPU arrays, one GPU a rank; MPI carries the NCCL id and host-side values.

    NVLink multicast (NVLS) is switched off unless the environment already chose: it reserves memory at
    start and fails on some drivers, for no gain on the all-reduce sizes of data parallelism.
    """

    name = "nccl"

    def __init__(self, timeout: float = DEFAULT_TIMEOUT_S):
        super().__init__(timeout)
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        cp = backend.cupy_module()
        devices = cp.cuda.runtime.getDeviceCount()
        cp.cuda.Device(self.rank % devices).use()
        self.nccl = backend.nccl_module()
        unique_id = self.nccl.get_unique_id() if self.rank == 0 else None
        unique_id = self.comm.bcast(unique_id, root=0)
        self.nccl_comm = self.nccl.NcclCommunicator(self.size, unique_id, self.rank)
        self.cp = cp
        self._types = {"float32": self.nccl.NCCL_FLOAT32, "float64": self.nccl.NCCL_FLOAT64,
                       "float16": self.nccl.NCCL_FLOAT16}

    def _type(self, buffer):
        name = np.dtype(buffer.dtype).name
        if name not in self._types:
            raise DistributedError(f"NCCL all-reduce of {name} buffers is not supported")
        return self._types[name]

    def start_allreduce(self, buffer):
        if not backend.is_cupy_array(buffer):
            return super().start_allreduce(buffer)
        stream = self.cp.cuda.get_current_stream()
        self.nccl_comm.allReduce(buffer.data.ptr, buffer.data.ptr, buffer.size, self._type(buffer),
                                 self.nccl.NCCL_SUM, stream.ptr)
        return _Done()              # ordered on the stream: later kernels see the sum

    def allgather_slices(self, buffer, bounds):
        if not backend.is_cupy_array(buffer):
            return super().allgather_slices(buffer, bounds)
        stream = self.cp.cuda.get_current_stream()
        self.nccl.groupStart()
        for root, (lo, hi) in enumerate(bounds):    # each rank broadcasts its slice: slices may differ in size
            if hi > lo:
                self.nccl_comm.broadcast(buffer[lo:hi].data.ptr, buffer[lo:hi].data.ptr, hi - lo,
                                         self._type(buffer), root, stream.ptr)
        self.nccl.groupEnd()
        return buffer


def communicator(device: str = "cpu", timeout: float = DEFAULT_TIMEOUT_S):
    """The communicator for this process: SingleProcess when not launched by MPI, else MPI (CPU) or NCCL
    (device 'cuda')."""
    _, size = launched_world()
    if size <= 1:
        return SingleProcess()
    if backend.normalize_device(device) == "cuda":
        return NCCLCommunicator(timeout)
    return MPICommunicator(timeout)


# ------------------------------------------------------------------------------------------ data parallel
class _Bucket:
    def __init__(self, group, start, end, params):
        self.group, self.start, self.end = group, start, end
        self.params = list(params)
        self.pending = len(self.params)
        self.request = None

    @property
    def nbytes(self) -> int:
        return (self.end - self.start) * self.group.grad.itemsize


class DataParallel:
    """Gradient all-reduce in buckets overlapped with backward, optional ZeRO-1, for one model + AdamW.

        dp = DataParallel(model, optimizer, communicator("cpu"), zero=False)
        seeds = dp.backward_seeds(token_counts)          # this rank's micro-batches' target-token counts
        for micro, (x, y) in enumerate(batches):
            _, loss = model(x, y, return_logits=False)
            dp.backward(loss, seeds[micro], last=micro == len(batches) - 1)
        grad_norm = dp.reduce()                          # sums over ranks, returns the global norm
        dp.step(lr=lr, grad_scale=clip)                  # AdamW, then the ZeRO all-gather
    """

    def __init__(self, model, optimizer, comm, bucket_bytes: int = DEFAULT_BUCKET_BYTES, overlap: bool = True):
        self.model, self.optimizer, self.comm = model, optimizer, comm
        self.overlap = bool(overlap) and comm.size > 1
        self.zero = optimizer.shard is not None
        if self.zero and optimizer.shard != (comm.rank, comm.size):
            raise DistributedError(f"the optimizer is sharded as {optimizer.shard}, the job is rank "
                                   f"{comm.rank} of {comm.size}")
        if self.zero:
            optimizer.combine_shards = comm.sum_host
        optimizer._ensure_bound()
        self.buckets, self._bucket_of = [], {}
        for group in optimizer.groups:
            current, size = [], 0
            # parameters in reverse order: the backward pass finishes the last layers first
            for index in reversed(range(len(group.params))):
                current.append(index)
                size += group.sizes[index] * group.grad.itemsize
                if size >= bucket_bytes or index == 0:
                    first, last = current[-1], current[0]
                    bucket = _Bucket(group, group.offsets[first], group.offsets[last + 1],
                                     [group.params[i] for i in current])
                    self.buckets.append(bucket)
                    for i in current:
                        self._bucket_of[id(group.params[i])] = (bucket, group, i)
                    current, size = [], 0
        self.bytes_per_step = sum(b.nbytes for b in self.buckets) if comm.size > 1 else 0
        self.exposed_seconds = 0.0       # time spent waiting for reductions after the backward pass
        self._started = set()

    # ---------------------------------------------------------------- the step
    def backward_seeds(self, token_counts) -> list:
        """The backward seed of each of this rank's micro-batches: its share of the global target tokens,
        count / Σ over ranks and micro-batches (a loss that is a mean over its own tokens then sums to the
        global mean)."""
        counts = np.asarray(token_counts, dtype=np.float64)
        total = float(self.comm.sum_host(np.array([counts.sum()]))[0])
        if total <= 0:
            raise DistributedError("the global batch has no target tokens")
        return [float(c) / total for c in counts]

    def backward(self, loss, seed: float, last: bool = True) -> None:
        """loss.backward seeded with `seed`; on the last micro-batch, buckets start reducing as they fill."""
        # a seed of 1 is left to backward(): the loss op then skips its multiply and nothing is copied
        grad = None if seed == 1.0 and loss.size == 1 else \
            backend.to_device(np.asarray(seed, dtype=loss.dtype), backend.device_of(loss.data))
        if last and self.overlap:
            self._started = set()
            for bucket in self.buckets:
                bucket.pending, bucket.request = len(bucket.params), None
            loss.backward(grad, on_leaf_grad=self._gradient_ready)
        else:
            loss.backward(grad)

    def _gradient_ready(self, tensor) -> None:
        entry = self._bucket_of.get(id(tensor))
        if entry is None:
            return
        bucket, group, index = entry
        start, end = group.offsets[index], group.offsets[index + 1]
        group.grad[start:end] = tensor.grad.ravel()
        bucket.pending -= 1
        if bucket.pending == 0:
            bucket.request = self.comm.start_allreduce(group.grad[bucket.start:bucket.end])
            self._started.add(id(bucket))

    def reduce(self) -> float:
        """Finish the gradient sum over the ranks; returns the global gradient norm (what clipping needs)."""
        if self.comm.size == 1:
            return self.optimizer.gather_grads()
        if not self.overlap:
            self.optimizer.gather_grads()
            for bucket in self.buckets:
                bucket.request = self.comm.start_allreduce(bucket.group.grad[bucket.start:bucket.end])
            self._started = {id(b) for b in self.buckets}
        waited = time.perf_counter()
        for bucket in self.buckets:
            if id(bucket) not in self._started:       # parameters that got no gradient this step count as 0
                for p in bucket.params:
                    _, group, index = self._bucket_of[id(p)]
                    start, end = group.offsets[index], group.offsets[index + 1]
                    group.grad[start:end] = 0 if p.grad is None else p.grad.ravel()
                bucket.request = self.comm.start_allreduce(bucket.group.grad[bucket.start:bucket.end])
            bucket.request.wait()
        self.exposed_seconds += time.perf_counter() - waited
        self._started = set()
        return self.optimizer.gathered_norm()

    def step(self, lr: float | None = None, grad_scale: float = 1.0) -> None:
        """The optimizer step; under ZeRO-1 each rank updated its slice and the slices are all-gathered."""
        self.optimizer.step(lr=lr, grad_scale=grad_scale)
        if self.zero:
            for group in self.optimizer.groups:
                bounds = [_shard(group.offsets[-1], r, self.comm.size) for r in range(self.comm.size)]
                self.comm.allgather_slices(group.flat, bounds)

    # ---------------------------------------------------------------- checks
    def check_same_everywhere(self, description: dict) -> None:
        """Refuse to start when the ranks' configurations (or parameter counts) differ."""
        if self.comm.size == 1:
            return
        mine = _flatten(dict(description, parameters=int(sum(p.size for p in self.optimizer.params))))
        everyone = [json.loads(text) for text in self.comm.gather_objects(mine)]
        for rank, theirs in enumerate(everyone):
            different = sorted(k for k in set(theirs) | set(everyone[0]) if theirs.get(k) != everyone[0].get(k))
            if different:
                raise DistributedError(f"rank {rank}'s configuration differs from rank 0's in "
                                       + ", ".join(f"{k} ({theirs.get(k)!r} vs {everyone[0].get(k)!r})"
                                                   for k in different[:5]))

    def optimizer_state_bytes(self) -> int:
        """Bytes of AdamW moments held by this rank (what ZeRO-1 divides by the world size)."""
        return int(sum(g.exp_avg.nbytes + g.exp_avg_sq.nbytes for g in self.optimizer.groups))


def _flatten(values: dict, prefix: str = "") -> dict:
    """{"model": {"d_model": 32}} -> {"model.d_model": 32}, so that a difference names its field."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _shard(total: int, rank: int, world: int) -> tuple:
    from .optim import shard_bounds
    return shard_bounds(total, rank, world)


class RankSlice:
    """Rank r's rows of a batch source's global batches: rows [r·B/W, (r+1)·B/W) of batch(index).

    The source draws the same global batch whatever the world size, so the job sees the same data as one
    process. B must be divisible by the world size.
    """

    def __init__(self, source, rank: int, world: int):
        self.source, self.rank, self.world = source, int(rank), int(world)

    def batch(self, index: int):
        x, y = self.source.batch(index)
        rows = x.shape[0]
        if rows % self.world:
            raise DistributedError(f"a batch of {rows} rows does not split over {self.world} ranks; use a "
                                   f"batch size divisible by the number of processes")
        share = rows // self.world
        part = slice(self.rank * share, (self.rank + 1) * share)     # (B, T) -> (B/W, T)
        return x[part], y[part]

    @property
    def step(self):
        return self.source.step

    @step.setter
    def step(self, value):
        self.source.step = value

    def state_dict(self) -> dict:
        return self.source.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.source.load_state_dict(state)


def config_fingerprint(values: dict) -> str:
    """A short hash of a JSON-able configuration (for logs)."""
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:12]


def install_abort_on_error(comm) -> None:
    """Make an uncaught exception on any rank print one line and abort the whole job, so that the other
    ranks do not wait in a collective forever."""
    if comm.size == 1:
        return
    previous = sys.excepthook

    def hook(kind, value, trace):
        if issubclass(kind, KeyboardInterrupt):
            previous(kind, value, trace)
        comm.abort(f"{kind.__name__}: {value}")

    sys.excepthook = hook


def tokens_in(targets, ignore_index: int = -100) -> int:
    """The number of target positions that count in the loss."""
    return int((np.asarray(backend.to_numpy(targets)) != ignore_index).sum())


__all__ = ["DistributedError", "launched_world", "communicator", "SingleProcess", "MPICommunicator",
           "NCCLCommunicator", "DataParallel", "RankSlice", "install_abort_on_error", "tokens_in",
           "config_fingerprint"]
