"""tinygrad_llm: build a Llama-style language model from scratch on NumPy, with hand-derived gradients.

Shape glossary, used in every docstring and shape comment:
    B batch   T time (sequence length)   C channels (model width)   H heads   Hkv key/value heads
    D head dimension (C / H)   G query heads per kv head (H / Hkv)   V vocabulary   F feed-forward width
    N rows (B·T folded together)

    import tinygrad_llm as tg
    import tinygrad_llm.functional as F
    x = tg.Tensor(np.random.randn(4, 8), requires_grad=True)
    F.rms_norm(x, w).sum().backward()
"""
from . import functional as F
from .rng import manual_seed
from .tensor import Function, Tensor, no_grad

__version__ = "0.6.0"

# Tensor methods and operators, bound in one explicit list (no reflection).
Tensor.__add__ = lambda self, other: F.add(self, other)
Tensor.__radd__ = lambda self, other: F.add(other, self)
Tensor.__sub__ = lambda self, other: F.sub(self, other)
Tensor.__rsub__ = lambda self, other: F.sub(other, self)
Tensor.__mul__ = lambda self, other: F.mul(self, other)
Tensor.__rmul__ = lambda self, other: F.mul(other, self)
Tensor.__truediv__ = lambda self, other: F.div(self, other)
Tensor.__rtruediv__ = lambda self, other: F.div(other, self)
Tensor.__pow__ = lambda self, other: F.pow(self, other)
Tensor.__rpow__ = lambda self, other: F.pow(other, self)
Tensor.__matmul__ = lambda self, other: F.matmul(self, other)
Tensor.__rmatmul__ = lambda self, other: F.matmul(other, self)
Tensor.__neg__ = lambda self: F.neg(self)
Tensor.__getitem__ = lambda self, index: F.getitem(self, index)
Tensor.exp = F.exp
Tensor.log = F.log
Tensor.sqrt = F.sqrt
Tensor.tanh = F.tanh
Tensor.relu = F.relu
Tensor.sum = F.sum
Tensor.mean = F.mean
Tensor.max = F.max
Tensor.reshape = F.reshape
Tensor.permute = F.permute
Tensor.transpose = F.transpose
Tensor.matmul = F.matmul
Tensor.softmax = F.softmax
Tensor.log_softmax = F.log_softmax
Tensor.T = property(lambda self: F.transpose(self))

__all__ = ["Tensor", "Function", "no_grad", "manual_seed", "F"]
