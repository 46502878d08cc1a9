"""Movement ops: they rearrange elements without arithmetic."""
from __future__ import annotations

import numpy as np

from ..backend import array_module, is_cupy_array
from ..tensor import Function


class Reshape(Function):
    """Forward:  y = x viewed with a new shape (same elements, C order)
    Backward: dx = dy reshaped back
    Shapes:   x (...), y `shape`
    Saves:    x's shape
    """

    def forward(self, x, shape):
        self.save(shape=x.shape)
        return x.reshape(shape)

    def backward(self, dy):
        (shape,) = self.saved
        return dy.reshape(shape)


class Permute(Function):
    """Forward:  y = x with its axes reordered: y.shape[i] = x.shape[axes[i]]
    Backward: dx = dy permuted by the inverse permutation
    Shapes:   x (...), y permuted
    Saves:    the inverse permutation
    """

    def forward(self, x, axes):
        axes = tuple(a % x.ndim for a in axes)
        if sorted(axes) != list(range(x.ndim)):
            raise ValueError(f"permute: {axes} is not a permutation of {x.ndim} axes")
        inverse = [0] * len(axes)
        for i, a in enumerate(axes):
            inverse[a] = i
        self.save(inverse=tuple(inverse))
        return x.transpose(axes)

    def backward(self, dy):
        (inverse,) = self.saved
        return dy.transpose(inverse)


def _is_basic_index(index) -> bool:
    """True when index uses only ints, slices, None and Ellipsis (so no element is picked twice)."""
    parts = index if isinstance(index, tuple) else (index,)
    return all(isinstance(p, (int, slice, type(None), type(Ellipsis))) for p in parts)


class GetItem(Function):
    """Forward:  y = x[index]  (ints, slices, None, Ellipsis, integer or boolean arrays)
    Backward: dx = zeros like x, then dy added at index; np.add.at for advanced indices so that an element
              picked twice receives both gradients (plain `dx[index] += dy` would keep only one)
    Shapes:   x (...), y whatever the index selects
    Saves:    x's shape and dtype, the index
    """

    def forward(self, x, index):
        self.save(shape=x.shape, index=index)
        return x[index]

    def backward(self, dy):
        shape, index = self.saved
        xp = array_module(dy)
        dx = xp.zeros(shape, dtype=dy.dtype)
        if _is_basic_index(index):
            dx[index] = dy
        else:
            xp.add.at(dx, index, dy)
        return dx


class Concatenate(Function):
    """Forward:  y = the inputs joined along `axis`
    Backward: each input gets its slice of dy
    Shapes:   inputs agree except along axis; y sums their sizes there
    Saves:    the split points
    view=True: when the inputs already lie end to end in one buffer (C-contiguous, joined along axis 0:
    the q, k, v weights in an optimizer's flat buffer), y is a view of that memory instead of a copy. Only
    for a y that nothing writes into (a GEMM's weight): it aliases the inputs.
    """

    def forward(self, *arrays, axis=0, view=False):
        xp = array_module(*arrays)
        axis = axis % arrays[0].ndim
        sizes = [a.shape[axis] for a in arrays]
        joined = _adjacent_view(arrays, xp) if view and axis == 0 else None
        self.save(axis=axis, sizes=sizes, joined=joined is not None)
        return joined if joined is not None else xp.concatenate(arrays, axis=axis)

    def output_target(self, free):
        """A joined view's gradient target (Function.output_target): the inputs' gradient buffers joined
        the same way, when they too lie end to end; the slices the backward hands out are then those
        buffers' memory, and the autograd keeps them without a copy."""
        axis, sizes, joined = self.saved
        if not joined:
            return None
        buffers = [free(t) for t in self.inputs]
        if any(b is None for b in buffers):
            return None
        return _adjacent_view(buffers, array_module(*buffers))

    def backward(self, dy):
        axis, sizes, _ = self.saved
        grads, start = [], 0
        for size in sizes:
            index = [slice(None)] * dy.ndim
            index[axis] = slice(start, start + size)
            grads.append(dy[tuple(index)])
            start += size
        return tuple(grads)


def _address(a) -> int:
    return a.data.ptr if is_cupy_array(a) else a.__array_interface__["data"][0]


def _adjacent_view(arrays, xp):
    """The arrays joined along axis 0 as a view of their memory when they lie end to end in it, else None."""
    first = arrays[0]
    if first.ndim == 0 or not all(a.flags.c_contiguous and a.dtype == first.dtype and a.shape[1:] == first.shape[1:]
                                  for a in arrays):
        return None
    expected = _address(first)
    for a in arrays:
        if _address(a) != expected:
            return None
        expected += a.nbytes
    shape = (sum(a.shape[0] for a in arrays),) + tuple(first.shape[1:])     # the inputs' rows, one after another
    if xp is not np:
        return xp.ndarray(shape, dtype=first.dtype, memptr=first.data)      # the pointer keeps the memory alive
    root = first
    while isinstance(root.base, np.ndarray):
        root = root.base
    offset = _address(first) - _address(root)
    if not root.flags.c_contiguous or offset < 0 or offset + (expected - _address(first)) > root.nbytes:
        return None
    return np.ndarray(shape, dtype=first.dtype, buffer=root, offset=offset)


class Stack(Function):
    """Forward:  y = the inputs stacked along a new axis
    Backward: input i gets dy taken at position i of that axis
    Shapes:   inputs alike (...); y has one more axis of length len(inputs)
    Saves:    the axis
    """

    def forward(self, *arrays, axis=0):
        xp = array_module(*arrays)
        axis = axis % (arrays[0].ndim + 1)
        self.save(axis=axis, count=len(arrays))
        return xp.stack(arrays, axis=axis)

    def backward(self, dy):
        axis, count = self.saved
        return tuple(dy.take(i, axis=axis) for i in range(count))
