"""The one place the server touches the model: KV slots, prefill, one batched decode step, prompt scoring.

    decoder = SlotDecoder(model, slots=8)
    slot = decoder.acquire()                             # a free KV slot, or None when all are in use
    logits = decoder.prefill(slot, prompt_ids)           # (V,) the next-token logits after the prompt
    logits = decoder.prefill(slot, prompt_ids, all_logits=True)   # (T, V): scoring the prompt as well
    logits = decoder.step([slot_a, slot_b], [tok_a, tok_b])   # (2, V), one new position per sequence
    decoder.release(slot)
    logits = decoder.prompt_logits(prompt_ids)           # (T, V), no slot: scoring a prompt

A thin adapter over tinygrad_llm.generate's Decoder and BatchedKVCache, the same code `generate` runs:
one cache of `slots` sequences, each at its own position, and one decode step for any subset of them.
The scheduler (engine.py) and everything above it only call the methods here.
"""
from __future__ import annotations

import numpy as np

from ..generate import Decoder


class SlotDecoder:
    def __init__(self, model, slots: int):
        if slots <= 0:
            raise ValueError(f"slots must be positive, got {slots}")
        self.decoder = Decoder(model)
        self.cache = self.decoder.new_cache(slots)
        self.slots = slots
        self.context = model.config.max_seq_len

    @property
    def free(self) -> int:
        """How many slots are free."""
        return len(self.cache.free_slots)

    def acquire(self):
        return self.cache.allocate() if self.free else None

    def length(self, slot: int) -> int:
        """Positions held in the slot."""
        return int(self.cache.lengths[slot])

    def prefill(self, slot: int, prompt_ids, all_logits: bool = False) -> np.ndarray:
        """Fill the slot with the prompt; return the (V,) logits of the next token, or with all_logits the
        (T, V) logits at every position of the prompt (the last row is the next token's)."""
        return self.decoder.prefill(self.cache, slot, prompt_ids, all_logits=all_logits)

    def step(self, slots, tokens) -> np.ndarray:
        """Append one token to each slot; return the (n, V) next-token logits, one row per slot."""
        return self.decoder.decode_step(self.cache, tokens, slots)

    def release(self, slot: int) -> None:
        self.cache.release(slot)

    def prompt_logits(self, prompt_ids) -> np.ndarray:
        """(T, V) logits at every position of the prompt (position t predicts token t + 1)."""
        return self.decoder.forward(np.asarray(prompt_ids, dtype=np.int64)[None, :])[0]   # (1, T, V) -> (T, V)
