"""Modules: named parameters, strict state dicts, train/eval mode and device moves.

A `Module` finds its parameters and sub-modules by walking its attributes in the order they were set
(a `Parameter`, a `Module`, or a `ModuleList` of modules), so names come out as dotted paths such as
`model.layers.0.self_attn.q_proj.weight`, the Hugging Face layout. A Parameter reachable under two names
(tied embeddings) is reported once, under the first name.

Simplifications: no hooks, no buffers (RoPE tables are recomputed by the op), no nested dicts of modules.
`load_state_dict` copies values into the existing arrays, so optimizers and tied weights that hold the
Parameter objects keep seeing the loaded values.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np

from . import backend
from . import functional as F
from . import rng
from .tensor import Tensor


class StateDictError(KeyError):
    """A state dict does not match the module: missing, unexpected or mis-shaped keys."""

    def __str__(self) -> str:          # KeyError would wrap the message in quotes
        return str(self.args[0]) if self.args else ""


class Parameter(Tensor):
    """A Tensor that a Module owns and an optimizer updates (requires_grad=True, float32 unless given).

    `grad_buffer`: where backward() writes the parameter's gradient when .grad is None (an optimizer
    points it at the parameter's slice of its flat gradient buffer, so no second copy is needed there);
    None: a fresh array. A .grad that is the buffer is overwritten by the next backward after zero_grad()."""

    __slots__ = ("grad_buffer",)

    def __init__(self, data, dtype=None):
        if dtype is None and isinstance(data, np.ndarray) and data.dtype.kind == "f":
            dtype = data.dtype
        super().__init__(data, requires_grad=True, dtype=dtype or np.float32)
        self.grad_buffer = None


class Module:
    """Base class: subclasses set Parameters and Modules as attributes and define `forward`."""

    def __init__(self):
        self.training = True

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, *args, **kwargs):
        raise NotImplementedError

    # ---------------------------------------------------------------- discovery
    def named_children(self):
        for name, value in vars(self).items():
            if isinstance(value, Module):
                yield name, value

    def named_modules(self, prefix: str = ""):
        yield prefix, self
        for name, child in self.named_children():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name)

    def named_parameters(self, prefix: str = ""):
        """(dotted name, Parameter) pairs in definition order; a shared Parameter appears once."""
        seen = set()
        for module_name, module in self.named_modules(prefix):
            for name, value in vars(module).items():
                if isinstance(value, Parameter) and id(value) not in seen:
                    seen.add(id(value))
                    yield (f"{module_name}.{name}" if module_name else name), value

    def parameters(self) -> list:
        return [p for _, p in self.named_parameters()]

    def num_parameters(self) -> int:
        return sum(p.size for p in self.parameters())

    # ---------------------------------------------------------------- modes, gradients, devices
    def train(self, mode: bool = True) -> "Module":
        for _, module in self.named_modules():
            module.training = mode
        return self

    def eval(self) -> "Module":
        return self.train(False)

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    def to(self, device=None, dtype=None) -> "Module":
        """Move every parameter to 'cpu'/'cuda' and/or cast it to a floating dtype, in place.

        The Parameter objects stay the same (tied weights stay tied); their gradients are dropped.
        """
        for p in self.parameters():
            data = p.data
            if device is not None:
                data = backend.to_device(data, device)
            if dtype is not None and data.dtype != np.dtype(dtype):
                if np.dtype(dtype).kind != "f":
                    raise TypeError(f"parameters must stay floating point, got dtype {dtype}")
                data = data.astype(dtype)
            p.data = data
            p.grad = None
        return self

    @property
    def device(self) -> str:
        params = self.parameters()
        return params[0].device if params else "cpu"

    @property
    def dtype(self):
        params = self.parameters()
        return params[0].dtype if params else np.dtype(np.float32)

    # ---------------------------------------------------------------- state dicts
    def state_dict(self) -> "OrderedDict[str, np.ndarray]":
        """Name -> a NumPy copy of the parameter (copied off the GPU when needed)."""
        return OrderedDict((name, np.array(backend.to_numpy(p.data), copy=True))
                           for name, p in self.named_parameters())

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Copy arrays into the parameters. strict: every key must match by name and shape, both ways.

        Raises StateDictError listing every missing, unexpected and mis-shaped key at once. Values are
        cast to each parameter's dtype and moved to its device.
        """
        params = dict(self.named_parameters())
        missing = [name for name in params if name not in state]
        unexpected = [name for name in state if name not in params]
        mismatched = [f"{name}: checkpoint {tuple(np.shape(state[name]))} vs model {p.shape}"
                      for name, p in params.items()
                      if name in state and tuple(np.shape(state[name])) != p.shape]
        if mismatched or (strict and (missing or unexpected)):
            lines = [f"{type(self).__name__}.load_state_dict: the state dict does not match the model"]
            if missing:
                lines.append(f"  missing keys ({len(missing)}): {', '.join(missing)}")
            if unexpected:
                lines.append(f"  unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
            if mismatched:
                lines.append(f"  mis-shaped keys ({len(mismatched)}): {'; '.join(mismatched)}")
            raise StateDictError("\n".join(lines))
        for name, p in params.items():
            if name not in state:
                continue
            value = state[name].data if isinstance(state[name], Tensor) else state[name]
            value = backend.to_device(np.asarray(backend.to_numpy(value)), p.device)
            p.data[...] = value          # in place: keeps views and the Parameter identity
            p.grad = None


class ModuleList(Module):
    """A list of modules, named 0, 1, 2, ... (as in `model.layers.0`)."""

    def __init__(self, modules=()):
        super().__init__()
        self._modules = list(modules)

    def named_children(self):
        for i, module in enumerate(self._modules):
            yield str(i), module

    def __iter__(self):
        return iter(self._modules)

    def __len__(self) -> int:
        return len(self._modules)

    def __getitem__(self, index):
        return self._modules[index]

    def append(self, module: Module) -> None:
        self._modules.append(module)


def init_normal(shape, std: float, dtype=np.float32) -> Parameter:
    """A Parameter drawn from N(0, std²) with the package's global generator (tinygrad_llm.rng)."""
    return Parameter((rng.generator().standard_normal(shape) * std).astype(dtype), dtype=dtype)


class Linear(Module):
    """y = x @ Wᵀ, W shaped (out, in) as in PyTorch and Hugging Face; no bias (Llama has none)."""

    def __init__(self, in_features: int, out_features: int, std: float = 0.02, dtype=np.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = init_normal((out_features, in_features), std, dtype)

    def forward(self, x):
        return F.linear(x, self.weight)


class Embedding(Module):
    """A (V, C) table of vectors looked up by integer ids."""

    def __init__(self, num_embeddings: int, dim: int, std: float = 0.02, dtype=np.float32):
        super().__init__()
        self.weight = init_normal((num_embeddings, dim), std, dtype)

    def forward(self, ids):
        return F.embedding(ids, self.weight)


class RMSNorm(Module):
    """Root-mean-square normalisation with a learned gain initialised at 1 (chunked: see F.rms_norm)."""

    def __init__(self, dim: int, eps: float = 1e-5, dtype=np.float32, chunked: bool = True):
        super().__init__()
        self.eps = eps
        self.chunked = chunked
        self.weight = Parameter(np.ones(dim, dtype=dtype), dtype=dtype)

    def forward(self, x):
        return F.rms_norm(x, self.weight, self.eps, chunked=self.chunked)


class Dropout(Module):
    """Inverted dropout while training; the identity in eval mode."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = float(p)

    def forward(self, x):
        return F.dropout(x, self.p, self.training)
