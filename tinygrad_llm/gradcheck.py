"""Finite-difference gradient checking, for the project's ops and for users' own Functions.

The check compares the backward pass with float64 central differences of the scalar
    L(x) = ⟨f(x), g⟩ = Σ f(x) · g
for a random upstream gradient g. A random g matters: the plain sum Σ f(x) hides broken backwards of
ops whose outputs have a constant sum (softmax rows sum to 1, so every gradient of Σ softmax is 0 and any
backward that returns something orthogonal to the ones vector passes).

    from tinygrad_llm.gradcheck import gradcheck
    result = gradcheck(lambda x, w: F.rms_norm(x, w), [x64, w64])
    assert result.ok, result

Every element of every floating-point input is perturbed (or a random subset of `max_elements_per_input`
for large inputs). Integer inputs (token ids, targets) are passed through unchanged and get no gradient.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import backend
from .tensor import Tensor


class GradcheckError(AssertionError):
    """Raised by gradcheck(raise_on_failure=True) when analytic and numeric gradients disagree."""


@dataclass
class GradcheckResult:
    ok: bool
    worst_relative_error: float       # |analytic − numeric| / max(|numeric|, |analytic|) at the worst element
    worst_input: int                  # which input (index into `inputs`) holds the worst element
    worst_index: tuple                # its multi-index inside that input
    analytic: float                   # the two derivative values there
    numeric: float
    checked_elements: int

    def __str__(self) -> str:
        verdict = "passed" if self.ok else "FAILED"
        return (f"gradcheck {verdict}: worst relative error {self.worst_relative_error:.3e} at input "
                f"{self.worst_input}, index {self.worst_index} (analytic {self.analytic:.6e}, numeric "
                f"{self.numeric:.6e}); {self.checked_elements} elements checked")


def gradcheck(fn, inputs, *, eps: float = 1e-6, atol: float = 1e-6, rtol: float = 1e-4, seed: int = 0,
              max_elements_per_input: int | None = None, raise_on_failure: bool = False) -> GradcheckResult:
    """Check fn's backward pass against central differences in float64.

    fn:      takes Tensors (one per entry of `inputs`) and returns a Tensor.
    inputs:  arrays or Tensors; floating ones are converted to float64 and checked, others passed as is.
    An element passes when |analytic − numeric| ≤ atol + rtol · |numeric|.
    """
    if not inputs:
        raise ValueError("gradcheck needs at least one input")
    arrays = [backend.to_numpy(x.data if isinstance(x, Tensor) else np.asarray(x)) for x in inputs]
    checked = [a.dtype.kind == "f" for a in arrays]
    if not any(checked):
        raise ValueError("gradcheck: no floating-point input to check")
    arrays = [a.astype(np.float64) if c else a for a, c in zip(arrays, checked)]
    device = next((x.device for x in inputs if isinstance(x, Tensor)), "cpu")

    def run(values, requires_grad):
        tensors = [Tensor(backend.to_device(v, device), requires_grad=requires_grad and c)
                   for v, c in zip(values, checked)]
        out = fn(*tensors)
        if not isinstance(out, Tensor):
            raise TypeError(f"gradcheck: fn must return a Tensor, got {type(out).__name__}")
        return tensors, out

    tensors, out = run(arrays, True)
    if out.dtype != np.float64:
        raise TypeError(f"gradcheck: fn returned dtype {out.dtype}; it must keep float64 inputs in float64")
    rng = np.random.default_rng(seed)
    upstream = rng.standard_normal(out.shape)
    out.backward(backend.to_device(upstream, device))
    analytic = [backend.to_numpy(t.grad) if t.grad is not None else np.zeros(t.shape) for t in tensors]

    def objective(values) -> float:
        _, result = run(values, False)
        return float(np.sum(backend.to_numpy(result.data) * upstream))

    worst = GradcheckResult(True, 0.0, -1, (), 0.0, 0.0, 0)
    worst_violation = -1.0
    for which, (array, is_checked) in enumerate(zip(arrays, checked)):
        if not is_checked or array.size == 0:
            continue
        flat_indices = np.arange(array.size)
        if max_elements_per_input is not None and array.size > max_elements_per_input:
            flat_indices = rng.choice(array.size, size=max_elements_per_input, replace=False)
        for flat in flat_indices:
            index = np.unravel_index(flat, array.shape)
            original = array[index]
            array[index] = original + eps
            plus = objective(arrays)
            array[index] = original - eps
            minus = objective(arrays)
            array[index] = original
            numeric = (plus - minus) / (2 * eps)
            exact = float(analytic[which][index])
            difference = abs(exact - numeric)
            violation = difference / (atol + rtol * abs(numeric))
            worst.checked_elements += 1
            if violation > worst_violation:
                worst_violation = violation
                worst.worst_relative_error = difference / max(abs(numeric), abs(exact), 1e-300)
                worst.worst_input, worst.worst_index = which, tuple(int(i) for i in index)
                worst.analytic, worst.numeric = exact, numeric
    worst.ok = worst_violation <= 1.0
    if raise_on_failure and not worst.ok:
        raise GradcheckError(str(worst))
    return worst
