"""Movement ops: they rearrange elements without arithmetic."""
from __future__ import annotations

from ..backend import array_module
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
    """

    def forward(self, *arrays, axis=0):
        xp = array_module(*arrays)
        axis = axis % arrays[0].ndim
        sizes = [a.shape[axis] for a in arrays]
        self.save(axis=axis, sizes=sizes)
        return xp.concatenate(arrays, axis=axis)

    def backward(self, dy):
        axis, sizes = self.saved
        grads, start = [], 0
        for size in sizes:
            index = [slice(None)] * dy.ndim
            index[axis] = slice(start, start + size)
            grads.append(dy[tuple(index)])
            start += size
        return tuple(grads)


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
