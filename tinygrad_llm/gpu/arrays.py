"""The helpers every launcher shares: output buffers, contiguous inputs, dtype names, device facts, grids.

POISON_OUTPUTS (tests set it) makes every output buffer start as NaN, so an element a kernel forgot to
write shows up in the comparison with the NumPy op. One NaN pattern serves every dtype: all bits set.
"""
from __future__ import annotations

import numpy as np

from .. import backend

POISON_OUTPUTS = False
_NAN_BITS = {2: 0xFFFF, 4: 0xFFFFFFFF}      # all ones: a NaN in float32, bfloat16 and float16
_SUFFIX = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}
THREADS = 256                               # threads per block of the element-wise kernels
_device_facts: dict = {}                    # device id -> {"sm": ..., "capability": ...}


def suffix(dtype) -> str | None:
    """The kernels' name suffix for a dtype ("f32", "bf16", "f16"), None for any other dtype."""
    return _SUFFIX.get(dtype_name(dtype))


def dtype_name(dtype) -> str:
    """A dtype's name ("bfloat16"), also for the name itself (NumPy knows bfloat16 only once ml_dtypes is
    imported)."""
    return dtype if isinstance(dtype, str) else np.dtype(dtype).name


def float_kind(*arrays) -> bool:
    """Every array is float32, bfloat16 or float16."""
    return all(suffix(a.dtype) is not None for a in arrays)


def same_dtype(*arrays) -> bool:
    return len({np.dtype(a.dtype) for a in arrays}) == 1


def all_on_gpu(*arrays) -> bool:
    return bool(arrays) and all(backend.is_cupy_array(a) for a in arrays)


def empty(shape, dtype):
    """An output buffer: uninitialised, or all NaN when POISON_OUTPUTS is set."""
    out = backend.cupy_module().empty(shape, dtype=dtype)
    if POISON_OUTPUTS:
        out.view(f"u{out.itemsize}").fill(_NAN_BITS[out.itemsize])
    return out


def contiguous(x):
    """x as a C-contiguous array starting on a 16-byte boundary (kernels load 16-byte vectors); a copy
    only when it is not one already."""
    if x.flags.c_contiguous and x.data.ptr % 16 == 0:
        return x
    copy = backend.cupy_module().empty(x.shape, dtype=x.dtype)
    copy[...] = x
    return copy


def aligned(*arrays) -> bool:
    return all(a.data.ptr % 16 == 0 for a in arrays)


def _facts() -> dict:
    device = backend.cupy_module().cuda.Device()
    facts = _device_facts.get(device.id)
    if facts is None:
        attributes = device.attributes
        facts = _device_facts[device.id] = {"sm": attributes["MultiProcessorCount"],
                                            "capability": str(device.compute_capability)}
    return facts


def multiprocessors() -> int:
    """The current GPU's streaming-multiprocessor count."""
    return _facts()["sm"]


def compute_capability() -> str:
    """The current GPU's compute capability as CuPy spells it ("90" for an H100 or H200)."""
    return _facts()["capability"]


def grid(work: int) -> tuple:
    """(grid, block) for a grid-stride loop over `work` items: at most 32 blocks a multiprocessor."""
    blocks = (work + THREADS - 1) // THREADS
    return (max(1, min(blocks, 32 * multiprocessors())),), (THREADS,)


_zero_seeds: dict = {}     # device id -> a one-element uint64 zero (the base of seeds passed by value)


def seed_base(base):
    """The device pointer argument `seed_base` of the kernels with a random stream: `base` (a one-element
    uint64 device array, a rng.DeviceSeed's) as it is, or for None a zero kept on the current device."""
    if base is not None:
        if not backend.is_cupy_array(base):
            raise TypeError("a DeviceSeed for a GPU kernel needs its base in device memory")
        return base
    cp = backend.cupy_module()
    device = cp.cuda.Device().id
    zero = _zero_seeds.get(device)
    if zero is None:
        zero = _zero_seeds[device] = cp.zeros(1, dtype=cp.uint64)
    return zero
