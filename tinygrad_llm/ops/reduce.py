"""Reductions over any axes, with keepdims. 16-bit floats are summed in float32 and cast back."""
from __future__ import annotations

from ..backend import array_module
from ..tensor import Function
from .matmul import accumulation_dtype


def _reduce(x, method: str, axes, keepdims):
    """x.sum / x.mean over axes, accumulated in float32 for bfloat16 and float16 (a long bf16 sum drifts)."""
    accumulate = accumulation_dtype(x.dtype) if x.dtype.kind in "fV" else x.dtype
    if accumulate == x.dtype:
        return getattr(x, method)(axis=axes, keepdims=keepdims)
    return getattr(x, method)(axis=axes, keepdims=keepdims, dtype=accumulate).astype(x.dtype)


def normalize_axes(axis, ndim: int) -> tuple:
    """axis (None, an int or a tuple, negatives allowed) as a sorted tuple of non-negative axes."""
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    normalized = []
    for a in axes:
        if not -ndim <= a < max(ndim, 1):
            raise ValueError(f"axis {a} is out of range for a tensor with {ndim} dimensions")
        normalized.append(a % max(ndim, 1))
    if len(set(normalized)) != len(normalized):
        raise ValueError(f"repeated axis in {axis}")
    return tuple(sorted(normalized))


def _kept_shape(shape: tuple, axes: tuple) -> tuple:
    """shape with every reduced axis set to 1 (what keepdims=True would give)."""
    return tuple(1 if i in axes else n for i, n in enumerate(shape))


class Sum(Function):
    """Forward:  y = Σ_axes x
    Backward: dx = dy broadcast back over the reduced axes
    Shapes:   x (...), y with the axes removed (or kept as 1)
    Saves:    x's shape, the axes
    """

    def forward(self, x, axis=None, keepdims=False):
        axes = normalize_axes(axis, x.ndim)
        self.save(shape=x.shape, axes=axes)
        return _reduce(x, "sum", axes, keepdims)

    def backward(self, dy):
        shape, axes = self.saved
        return _broadcast(dy.reshape(_kept_shape(shape, axes)), shape)   # (reduced) -> (...)


def _broadcast(a, shape):
    """a broadcast to shape, as a fresh writable array."""
    return array_module(a).broadcast_to(a, shape).copy()


class Mean(Function):
    """Forward:  y = Σ_axes x / n,  n = number of elements reduced
    Backward: dx = dy / n broadcast back over the reduced axes
    Shapes:   x (...), y with the axes removed (or kept as 1)
    Saves:    x's shape, the axes
    """

    def forward(self, x, axis=None, keepdims=False):
        axes = normalize_axes(axis, x.ndim)
        self.save(shape=x.shape, axes=axes)
        return _reduce(x, "mean", axes, keepdims)

    def backward(self, dy):
        shape, axes = self.saved
        count = 1
        for a in axes:
            count *= shape[a]
        return _broadcast(dy.reshape(_kept_shape(shape, axes)) / dy.dtype.type(count), shape)


class Max(Function):
    """Forward:  y = max_axes x
    Backward: dx = dy at the maximal elements, shared equally among ties; 0 elsewhere
    Shapes:   x (...), y with the axes removed (or kept as 1)
    Saves:    the tie-normalised mask of maximal elements
    """

    def forward(self, x, axis=None, keepdims=False):
        axes = normalize_axes(axis, x.ndim)
        y = x.max(axis=axes, keepdims=True)
        mask = (x == y).astype(x.dtype)
        mask /= mask.sum(axis=axes, keepdims=True)          # ties share the gradient
        self.save(mask=mask, axes=axes)
        return y if keepdims else y.reshape([n for i, n in enumerate(y.shape) if i not in axes])

    def backward(self, dy):
        mask, axes = self.saved
        return mask * dy.reshape(_kept_shape(mask.shape, axes))
