"""LoRA adapters on a GPT's projections: train A and B, keep the base weights frozen, merge on save.

    lora = LoRA(model, rank=8, alpha=8, targets=("q_proj", "v_proj"))   # freezes every model parameter
    optimizer = AdamW(lora.named_parameters(), ...)                     # moments for the adapters only
    with lora.applied():                                                # q_proj.weight is now W + s·B A
        _, loss = model(x, y, return_logits=False)
    loss.backward()                                                     # gradients reach A and B only
    state = lora.merged_state_dict()                                    # what a checkpoint stores

Each adapted Linear keeps its frozen Parameter W; `applied()` swaps in the Tensor F.lora_weight(W, A, B, s)
for the duration of a forward pass (the model reads `.weight` and packs q‖k‖v and gate‖up as usual), then
puts W back, so `model.state_dict()` never sees the adapters. s = α / r. A starts N(0, 1/in) and B at
zero (PEFT's convention): the adapted model starts exactly at the base model. A draws from its own
generator (seeded), so adding adapters does not move the package's global RNG.

Tokens the base model never saw (the chat tokens `with_chat_tokens` appends) get their embedding rows, and
their output-head rows when the head is untied, trained in full (`new_rows`): a frozen mean row cannot
learn what <|end|> means, and without it a LoRA model never learns to stop. The table is then the frozen
old rows concatenated with the trainable new ones during a forward pass.

Simplification: the adapted weight W' is formed in full each forward and its full-size gradient in each
backward (the op's docstring says why); the saving is in trained parameters and optimizer state.
"""
from __future__ import annotations

import contextlib

import numpy as np

from .. import backend
from .. import functional as F
from ..nn import Linear, Parameter
from ..tensor import Tensor

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SHORT_NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj",
               "down": "down_proj"}


def parse_targets(text: str) -> tuple:
    """"q,v" or "q_proj,v_proj" or "all" -> the projection names; ValueError for an unknown one."""
    if text.strip() == "all":
        return LORA_TARGETS
    names = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        name = SHORT_NAMES.get(part, part)
        if name not in LORA_TARGETS:
            raise ValueError(f"unknown LoRA target {part!r}; choose from {', '.join(SHORT_NAMES)} (or 'all')")
        names.append(name)
    if not names:
        raise ValueError("no LoRA targets given")
    return tuple(dict.fromkeys(names))


class LoRA:
    """Low-rank adapters for every Linear of `model` whose attribute name is in `targets`."""

    def __init__(self, model, rank: int, alpha: float | None = None, targets=LORA_TARGETS, seed: int = 0,
                 new_rows: int = 0):
        if not isinstance(rank, int) or rank <= 0:
            raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
        self.model, self.rank = model, rank
        self.alpha = float(alpha) if alpha else float(rank)
        self.scale = self.alpha / rank
        self.targets = tuple(targets)
        generator = np.random.default_rng(seed)
        for parameter in model.parameters():
            parameter.requires_grad = False
        self.entries = []                                    # (module name, Linear, frozen W, A, B)
        for name, module in model.named_modules():
            if not isinstance(module, Linear) or name.rsplit(".", 1)[-1] not in self.targets:
                continue
            weight = module.weight
            out_features, in_features = weight.shape
            if rank > min(out_features, in_features):
                raise ValueError(f"LoRA rank {rank} exceeds the smaller side of {name} {tuple(weight.shape)}")
            a = generator.standard_normal((rank, in_features)) / np.sqrt(in_features)
            a = Parameter(backend.to_device(a.astype(weight.dtype), weight.device), dtype=weight.dtype)
            b = Parameter(backend.to_device(np.zeros((out_features, rank), dtype=weight.dtype), weight.device),
                          dtype=weight.dtype)
            self.entries.append((name, module, weight, a, b))
        if not self.entries:
            raise ValueError(f"the model has no Linear named {', '.join(self.targets)}")
        # rows of tokens the base model never saw (the chat tokens just added): trained in full, since no
        # low-rank update of the projections can give a frozen mean row a meaning of its own
        self.row_entries = []                                # (name, owners, frozen table, trainable new rows)
        if new_rows:
            embed, head = model.model.embed_tokens, model.lm_head
            tables = [("model.embed_tokens", [embed] + ([head] if head.weight is embed.weight else []))]
            if head.weight is not embed.weight:
                tables.append(("lm_head", [head]))
            for name, owners in tables:
                table = owners[0].weight
                rows = Parameter(table.data[-new_rows:].copy(), dtype=table.dtype)
                self.row_entries.append((name, owners, table, rows))

    def named_parameters(self):
        """("<module>.lora_A", A), ("<module>.lora_B", B) for every adapted projection (PEFT's names)."""
        for name, _, _, a, b in self.entries:
            yield f"{name}.lora_A", a
            yield f"{name}.lora_B", b
        for name, _, _, rows in self.row_entries:
            yield f"{name}.new_rows", rows

    def parameters(self) -> list:
        return [p for _, p in self.named_parameters()]

    def num_parameters(self) -> int:
        return sum(p.size for p in self.parameters())

    @contextlib.contextmanager
    def applied(self):
        """Within the block each adapted Linear's weight is W + s·B A (a graph node when gradients are on)."""
        for _, module, weight, a, b in self.entries:
            module.weight = F.lora_weight(weight, a, b, self.scale)
        for _, owners, table, rows in self.row_entries:
            old = Tensor(table.data[:table.shape[0] - rows.shape[0]])                 # frozen rows (a view)
            joined = F.concatenate([old, rows], axis=0)                                # (V, C)
            for owner in owners:
                owner.weight = joined
        try:
            yield
        finally:
            for _, module, weight, _, _ in self.entries:
                module.weight = weight
            for _, owners, table, _ in self.row_entries:
                for owner in owners:
                    owner.weight = table

    def merged_state_dict(self) -> dict:
        """The model's state dict with every adapted weight replaced by W + s·B A (NumPy, the model's dtype)."""
        state = self.model.state_dict()
        for name, _, weight, a, b in self.entries:
            w, a_, b_ = (backend.to_numpy(t.data) for t in (weight, a, b))
            state[f"{name}.weight"] = (w + (b_ @ a_) * w.dtype.type(self.scale)).astype(w.dtype)
        for name, _, _, rows in self.row_entries:
            state[f"{name}.weight"][-rows.shape[0]:] = backend.to_numpy(rows.data)
        return state

    def adapter_arrays(self) -> dict:
        return {name: np.array(backend.to_numpy(p.data), copy=True) for name, p in self.named_parameters()}

    def load_adapter_arrays(self, arrays: dict) -> None:
        expected = dict(self.named_parameters())
        missing = sorted(set(expected) - set(arrays))
        mismatched = [n for n, p in expected.items() if n in arrays and tuple(arrays[n].shape) != p.shape]
        if missing or mismatched:
            raise ValueError(f"the saved adapters do not match: missing {missing[:3]}, mis-shaped {mismatched[:3]}")
        for name, p in expected.items():
            p.data[...] = backend.to_device(np.asarray(arrays[name]), p.device)

    def describe(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets),
                "parameters": self.num_parameters(), "modules": len(self.entries),
                "new_rows": int(self.row_entries[0][3].shape[0]) if self.row_entries else 0}


class MergedView:
    """What save_checkpoint stores for a LoRA run: `state_dict()` gives the merged weights."""

    def __init__(self, lora: LoRA):
        self.lora = lora
        self.config = lora.model.config

    def state_dict(self) -> dict:
        return self.lora.merged_state_dict()


class AdapterOptimizerState:
    """What save_checkpoint stores as the optimizer of a LoRA run: the AdamW moments and the adapters
    themselves (`adapter.<name>`), so that a resumed run continues bit for bit."""

    PREFIX = "adapter."

    def __init__(self, optimizer, lora: LoRA):
        self.optimizer, self.lora = optimizer, lora

    def state_dict(self):
        arrays, meta = self.optimizer.state_dict()
        arrays.update({self.PREFIX + name: value for name, value in self.lora.adapter_arrays().items()})
        return arrays, meta

    def load_state_dict(self, arrays: dict, meta: dict) -> None:
        adapters = {k[len(self.PREFIX):]: v for k, v in arrays.items() if k.startswith(self.PREFIX)}
        moments = {k: v for k, v in arrays.items() if not k.startswith(self.PREFIX)}
        self.lora.load_adapter_arrays(adapters)
        self.optimizer.load_state_dict(moments, meta)
