"""Tensor, Function and the backward pass: the whole autograd engine.

A Tensor wraps one ndarray (NumPy, or CuPy on the GPU). Every differentiable operation is a `Function`
subclass whose `forward` and `backward` work on raw arrays; `Function.apply` runs the forward, wraps the
result in a Tensor and, when a gradient may be needed, records the Function as the result's creator.
`Tensor.backward` walks that graph in reverse topological order (built iteratively, so a chain of
20 000 ops is fine), accumulates gradients of tensors used more than once, checks every gradient's shape
and dtype against its input, and frees each Function's saved arrays as soon as its backward has run.

Simplifications: one output per Function (split is a list of slices); gradients are plain arrays,
never Tensors, so there is no double backward; only leaves keep `.grad` unless `retain_grad()` was called.
"""
from __future__ import annotations

import contextlib
import threading

import numpy as np

from . import backend

_state = threading.local()


def grad_enabled() -> bool:
    return getattr(_state, "grad_enabled", True)


@contextlib.contextmanager
def no_grad():
    """Within this block no graph is recorded: outputs have requires_grad=False and nothing is saved."""
    previous = grad_enabled()
    _state.grad_enabled = False
    try:
        yield
    finally:
        _state.grad_enabled = previous


class Function:
    """Base class of every op. Subclasses implement `forward(*arrays, **options)` and `backward(dy)`.

    `backward` returns one gradient per Tensor argument of `apply`, in order (a bare array when there is
    exactly one), or None for an input that needs none. `self.needs_input_grad` tells which are wanted.
    State that backward needs is stored with `self.save(name=array, ...)` and read back as the tuple
    `self.saved`, in the order it was saved.

    A subclass with `takes_pending = True` has `backward(dy, pending)` instead: `pending` holds, per
    Tensor input, the gradient that the input's other uses have already sent it (None where none has),
    and the gradients it returns include those, so that a kernel can add them in its own pass over the
    rows instead of the engine adding them after. It must not write into a pending array.
    A subclass with `gradient_targets = True` is also passed `into=`: per Tensor input, the array its
    gradient may be written into (a leaf's `grad_buffer` while the leaf has no gradient yet this pass, or
    what the input's own Function offers through `output_target`; None otherwise). Writing the whole
    gradient there and returning that array saves the engine a copy. `output_target(free)`, where a
    Function defines it, returns an array for its output's gradient built from its leaf inputs' buffers
    (`free(tensor)` gives a leaf's buffer, or None when it may not be written), or None.
    """

    __slots__ = ("inputs", "needs_input_grad", "_saved", "_freed")
    takes_pending = False
    gradient_targets = False

    def __init__(self):
        self.inputs: tuple = ()
        self.needs_input_grad: tuple = ()
        self._saved: tuple | None = None
        self._freed = False

    def save(self, **named_arrays) -> None:
        self._saved = tuple(named_arrays.values())

    @property
    def saved(self) -> tuple:
        if self._freed:
            raise RuntimeError(
                f"{type(self).__name__}: saved arrays were already freed by an earlier backward; "
                "call backward(retain_graph=True) the first time to run backward twice")
        return self._saved if self._saved is not None else ()

    def free(self) -> None:
        self._saved = None
        self._freed = True

    def forward(self, *args, **kwargs):
        raise NotImplementedError

    def backward(self, dy):
        raise NotImplementedError

    @classmethod
    def apply(cls, *args, **kwargs) -> "Tensor":
        function = cls()
        tensors = tuple(a for a in args if isinstance(a, Tensor))
        raw_args = [a.data if isinstance(a, Tensor) else a for a in args]
        function.needs_input_grad = tuple(t.requires_grad for t in tensors)
        out = function.forward(*raw_args, **kwargs)
        requires_grad = grad_enabled() and any(function.needs_input_grad)
        result = Tensor(out, requires_grad=requires_grad)
        if requires_grad:
            function.inputs = tensors
            result._ctx = function
        else:
            function.free()
        return result


class Tensor:
    """An n-dimensional array with an optional gradient.

    Python numbers and lists become float32 (`dtype=` picks another). An existing ndarray keeps its dtype,
    so float64 arrays stay float64 (what gradcheck wants) and integer arrays stay integer (token ids).
    """

    __slots__ = ("data", "grad", "requires_grad", "_ctx", "_retain_grad", "__weakref__")
    __array_priority__ = 1000  # numpy scalars defer to Tensor's reflected operators

    def __init__(self, data, requires_grad: bool = False, dtype=None):
        if isinstance(data, Tensor):
            data = data.data
        if isinstance(data, np.generic):
            data = np.asarray(data)                            # numpy scalar (a full reduction) -> 0-d
        if not (isinstance(data, np.ndarray) or backend.is_cupy_array(data)):
            data = np.asarray(data)
            if dtype is None and data.dtype.kind == "f":
                dtype = np.float32  # Python floats default to float32; integers stay integer (ids)
        if dtype is not None and data.dtype != np.dtype(dtype):
            data = data.astype(dtype)
        if requires_grad and data.dtype.kind != "f" and data.dtype.name != "bfloat16":   # ml_dtypes' kind is "V"
            raise TypeError(f"only floating-point tensors can require gradients, got dtype {data.dtype}")
        self.data = data
        self.grad = None
        self.requires_grad = bool(requires_grad)
        self._ctx: Function | None = None
        self._retain_grad = False

    # ---------------------------------------------------------------- properties and conversions
    @property
    def shape(self) -> tuple:
        return tuple(self.data.shape)

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def size(self) -> int:
        return int(self.data.size)

    @property
    def device(self) -> str:
        return backend.device_of(self.data)

    def __len__(self) -> int:
        return self.data.shape[0]

    def numpy(self) -> np.ndarray:
        """The data as a NumPy array (copied from the GPU if needed)."""
        return backend.to_numpy(self.data)

    def item(self) -> float:
        if self.size != 1:
            raise ValueError(f"item() needs a tensor with one element, got shape {self.shape}")
        return self.numpy().reshape(()).item()

    def detach(self) -> "Tensor":
        """The same data, cut from the graph."""
        return Tensor(self.data, requires_grad=False)

    def to(self, device: str) -> "Tensor":
        """A copy on 'cpu' or 'cuda' (this tensor itself when it is already there), cut from the graph."""
        moved = backend.to_device(self.data, device)
        if moved is self.data:
            return self
        out = Tensor(moved, requires_grad=self.requires_grad)
        if self.grad is not None:
            out.grad = backend.to_device(self.grad, device)
        return out

    def astype(self, dtype) -> "Tensor":
        from .ops.elementwise import Cast
        return Cast.apply(self, dtype=np.dtype(dtype))

    def retain_grad(self) -> "Tensor":
        """Keep .grad on this non-leaf tensor after backward."""
        self._retain_grad = True
        return self

    def zero_grad(self) -> None:
        self.grad = None

    def __repr__(self) -> str:
        grad = ", requires_grad=True" if self.requires_grad else ""
        where = "" if self.device == "cpu" else ", device='cuda'"
        return f"Tensor({self.numpy()!r}{grad}{where})"

    def __hash__(self):
        return id(self)

    def __bool__(self):
        raise TypeError("the truth value of a Tensor is ambiguous; compare .numpy() or use .item()")

    # ---------------------------------------------------------------- the backward pass
    def backward(self, grad=None, retain_graph: bool = False, on_leaf_grad=None) -> None:
        """Accumulate d(self)/d(leaf) · grad into every leaf's .grad that requires one.

        `grad` defaults to 1 for a one-element tensor. With retain_graph=False (the default) the saved
        arrays of every Function on the way are freed once used, and the graph is cut.
        `on_leaf_grad(tensor)` is called as soon as a leaf's .grad is final for this pass (every use of
        the leaf has sent its gradient): data-parallel training starts reducing gradients then, while the
        rest of the backward pass runs.
        """
        if not self.requires_grad:
            raise RuntimeError("backward() on a tensor that does not require grad (no input required one, "
                               "or it was computed under no_grad())")
        global _unit_seed
        xp = backend.array_module(self.data)
        if grad is None:
            if self.size != 1:
                raise RuntimeError(f"backward() without a gradient needs a one-element tensor, got shape "
                                   f"{self.shape}; pass grad= of the same shape")
            grad = _unit_seed = xp.ones_like(self.data)
        else:
            grad = grad.data if isinstance(grad, Tensor) else grad
            grad = xp.asarray(grad, dtype=self.dtype)
            if grad.shape != self.data.shape:
                raise ValueError(f"backward(): grad has shape {grad.shape}, tensor has shape {self.shape}")

        order = _topological_order(self)
        grads = {id(self): grad}
        claimed = set()                  # leaves whose grad_buffer was offered as a target in this pass
        for tensor in order:
            dy = grads.pop(id(tensor), None)
            if dy is None:
                continue
            function = tensor._ctx
            if function is None or tensor._retain_grad:
                tensor.grad = _accumulated(tensor, dy)
            if function is None:
                if on_leaf_grad is not None:
                    on_leaf_grad(tensor)
                continue
            if function._freed:
                raise RuntimeError(
                    f"{type(function).__name__}: this graph was already used by a backward pass that freed "
                    "its saved arrays; call backward(retain_graph=True) the first time to run backward twice")
            pending, args, options = None, (dy,), {}
            if function.takes_pending:
                pending = tuple(grads.pop(id(inp), None) if inp.requires_grad else None for inp in function.inputs)
                args = (dy, pending)
            if function.gradient_targets:
                options["into"] = _gradient_targets(function.inputs, grads, claimed)
            input_grads = function.backward(*args, **options)
            if not isinstance(input_grads, tuple):
                input_grads = (input_grads,)
            if len(input_grads) != len(function.inputs):
                raise RuntimeError(f"{type(function).__name__}.backward returned {len(input_grads)} gradients "
                                   f"for {len(function.inputs)} tensor inputs")
            for i, (inp, g) in enumerate(zip(function.inputs, input_grads)):
                if g is None and pending is not None and pending[i] is not None:
                    g = pending[i]                 # no gradient of its own: what was pending stays
                if g is None or not inp.requires_grad:
                    continue
                if g.shape != inp.data.shape or g.dtype != inp.data.dtype:
                    raise RuntimeError(
                        f"{type(function).__name__}.backward returned a gradient of shape {tuple(g.shape)} "
                        f"and dtype {g.dtype} for an input of shape {inp.shape} and dtype {inp.dtype}")
                key = id(inp)
                if key in grads:
                    grads[key] = grads[key] + g
                else:
                    grads[key] = g
            if not retain_graph:
                function.free()
                function.inputs = ()     # release the inputs; _ctx stays so that a second backward can say why
        _unit_seed = None


_unit_seed = None     # the ones a running backward() was seeded with when no grad was given


def _gradient_targets(inputs, grads, claimed) -> tuple:
    """Per input, the array its gradient may be written into: a leaf's grad_buffer while the leaf has no
    .grad, no gradient pending in `grads` and no earlier offer in this pass (`claimed`), or the target the
    input's Function builds from such buffers (output_target); None for everything else and for an
    input's second place in inputs."""

    def free(leaf):
        buffer = getattr(leaf, "grad_buffer", None)
        if (buffer is None or leaf._ctx is not None or not leaf.requires_grad or leaf.grad is not None
                or id(leaf) in grads or id(leaf) in claimed):
            return None
        claimed.add(id(leaf))
        return buffer

    targets, seen = [], set()
    for inp in inputs:
        target = None
        if id(inp) not in seen and id(inp) not in grads and inp.requires_grad:
            if inp._ctx is None:
                target = free(inp)
            elif not inp._retain_grad and hasattr(inp._ctx, "output_target"):
                target = inp._ctx.output_target(free)
        seen.add(id(inp))
        targets.append(target)
    return tuple(targets)


def _same_memory(a, b) -> bool:
    """Whether a and b are the same elements of the same memory (a view of b as b lies)."""
    if type(a) is not type(b) or a.shape != b.shape or a.dtype != b.dtype or a.strides != b.strides:
        return False
    address = (lambda x: x.data.ptr) if backend.is_cupy_array(a) else (lambda x: x.__array_interface__["data"][0])
    return address(a) == address(b)


def _accumulated(tensor, dy):
    """tensor.grad after adding dy: a copy of dy (it may be shared with another tensor's gradient or be
    the caller's `grad` array), written into a Parameter's grad_buffer when it has a fitting one (and dy
    itself when an op already wrote it there: Function.gradient_targets)."""
    grad = tensor.grad
    buffer = getattr(tensor, "grad_buffer", None)
    if grad is None and buffer is not None and (dy is buffer or _same_memory(dy, buffer)):
        return buffer                  # an op already wrote the gradient there
    if grad is None:
        if buffer is not None and buffer.shape == dy.shape and buffer.dtype == dy.dtype \
                and type(buffer) is type(dy):
            buffer[...] = dy
            return buffer
        return dy.copy()
    if grad is buffer:
        grad += dy                 # the buffer is the optimizer's: add in place
        return grad
    return grad + dy


def is_unit_seed(dy) -> bool:
    """Whether `dy` is the gradient of ones that backward() made for a one-element root (no grad given):
    a loss op's backward then skips multiplying by it, without reading it (no host sync on the GPU)."""
    return dy is not None and dy is _unit_seed


def _topological_order(root: Tensor) -> list:
    """Tensors reachable from root, each after every tensor that uses it (root first). Iterative DFS."""
    order, visited = [], set()
    stack = [(root, False)]
    while stack:
        tensor, inputs_done = stack.pop()
        if inputs_done:
            order.append(tensor)
            continue
        if id(tensor) in visited:
            continue
        visited.add(id(tensor))
        stack.append((tensor, True))
        if tensor._ctx is not None:
            for inp in tensor._ctx.inputs:
                if inp.requires_grad and id(inp) not in visited:
                    stack.append((inp, False))
    order.reverse()
    return order


def ensure_tensor(value, like: Tensor | None = None) -> Tensor:
    """value as a Tensor. With `like` (a floating Tensor), a plain number or array becomes a constant of
    like's dtype on like's device."""
    if isinstance(value, Tensor):
        return value
    if like is None:
        return Tensor(value)
    xp = backend.array_module(like.data)
    if backend.is_cupy_array(like.data) and isinstance(value, np.ndarray):
        value = backend.to_device(value, "cuda")
    value = xp.asarray(value)
    if like.dtype.kind == "f" and value.dtype != like.dtype:
        value = value.astype(like.dtype)
    return Tensor(value)
