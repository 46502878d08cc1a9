"""Shared test setup: the `backend` fixture, the hypothesis profile and the `gpu` marker.

`backend` runs a test once per array library: NumPy always, CuPy only where a GPU is usable (decided by
`tinygrad_llm.backend.gpu_available()`), so no test file is ever copied for the GPU.

Hypothesis profile "default": no deadline (a finite-difference gradcheck takes milliseconds, not
microseconds), few examples, derandomized so that CI sees the same examples every run. Set
HYPOTHESIS_PROFILE=thorough for a longer local search.
"""
from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

from tinygrad_llm import backend as backend_module
from tinygrad_llm import Tensor
from tinygrad_llm.gradcheck import gradcheck

# the quantized op's C kernels (tinygrad_llm/quant/cpu_kernels.py) are built into the temporary folder, not ~/.cache
os.environ.setdefault("TINYGRAD_LLM_CPU_KERNELS_DIR", os.path.join(tempfile.gettempdir(), "tinygrad_llm_test_cpu_kernels"))

settings.register_profile("default", deadline=None, max_examples=50, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("thorough", deadline=None, max_examples=200,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

_GPU = None


def gpu_present() -> bool:
    global _GPU
    if _GPU is None:
        _GPU = backend_module.gpu_available()
    return _GPU


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs an NVIDIA GPU and CuPy (skipped otherwise)")


def pytest_collection_modifyitems(config, items):
    marked = [item for item in items if item.get_closest_marker("gpu") is not None]   # the marker, not a name
    if marked and not gpu_present():
        skip = pytest.mark.skip(reason="no usable GPU (CuPy missing or no CUDA device)")
        for item in marked:
            item.add_marker(skip)


class Backend:
    """One array library for a test: make tensors on its device and read results back as NumPy."""

    def __init__(self, name: str):
        self.name = name
        self.device = "cpu" if name == "numpy" else "cuda"

    def array(self, values, dtype=None):
        values = np.asarray(values) if dtype is None else np.asarray(values, dtype=dtype)
        return backend_module.to_device(values, self.device)

    def tensor(self, values, requires_grad=False, dtype=None):
        return Tensor(self.array(values, dtype), requires_grad=requires_grad)

    def __repr__(self):
        return self.name


@pytest.fixture(scope="session", params=["numpy", pytest.param("cupy", marks=pytest.mark.gpu)])
def backend(request):
    return Backend(request.param)


@pytest.fixture(scope="session")
def assert_gradcheck():
    """assert_gradcheck(fn, inputs, **options): run tinygrad_llm.gradcheck and fail with its report."""

    def check(fn, inputs, **options):
        result = gradcheck(fn, inputs, **options)
        assert result.ok, str(result)
        assert result.checked_elements > 0
        return result

    return check
