"""Continuous batching: one scheduler thread runs a decode step for every active sequence.

    engine = Engine(model, tokenizer, max_batch=8, max_queue=32)
    engine.start()
    engine.submit([Sequence(prompt_ids, SamplingParams(max_tokens=20, temperature=0), emit=callback)])
    ...
    engine.stop()

The loop, on its own thread (NumPy and BLAS release the GIL, so the HTTP event loop stays responsive):

    1. drop sequences whose client went away (`cancel`), freeing their KV slots at once;
    2. admit waiting sequences while slots are free: score the prompt if asked (echo + logprobs),
       prefill it into the slot and sample its first token;
    3. one decode step for every active sequence (decoder.step), then each one's next token: one argmax
       for all the greedy rows and one log-softmax for all the rows that want logprobs (_choose);
    4. a sequence that stopped (end token, stop string, max_tokens, context full, content filter)
       leaves the batch right away and its slot goes back to the free list.

New requests therefore join at step boundaries and never wait for the batch to drain. The waiting
queue is bounded: `submit` raises QueueFull when more than `max_queue` sequences would wait beyond the
free slots (the HTTP layer answers 429).

Each sequence turns its tokens into text itself (each new token's bytes through an incremental UTF-8
decoder, never the whole output again; cut at a stop string; hold back what could still become a stop
string or an incomplete UTF-8 character) and, with a moderator whose policy checks output, holds back
the unfinished last word so that a blocklisted word is judged whole before any of it is sent. Every
change is delivered through the sequence's `emit` callback as an Event; the callback is called on the
engine thread and must only hand the event over. After each step
(and after each prefill, so that a first token goes out before the next prompt's prefill) the engine
calls `on_step_end` (when set): the HTTP layer collects the events and hands them to its event loop in
one call_soon_threadsafe, one wake-up per step rather than one per token.

Simplifications: a prompt is prefilled in one forward at a step boundary, so a long prompt delays
the other sequences' next token by its prefill time (no chunked prefill); no prefix sharing between
sequences; no sliding window: a sequence stops with finish_reason "length" when its context is full.
"""
from __future__ import annotations

import codecs
import collections
import logging
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from ..generate import sample_next
from .decoder import SlotDecoder


class QueueFull(Exception):
    """The waiting queue is full: try again later."""


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple = ()                   # stop strings: the text is cut before the first one
    logprobs: int | None = None        # None: none; N >= 0: each token's log-probability and the top N
    echo: bool = False                 # score the prompt's tokens too (with logprobs)


@dataclass
class Event:
    """What one sequence has to say: new text, the tokens behind it, and at the end a finish reason."""
    index: int
    text: str = ""
    tokens: list = field(default_factory=list)        # [(token id, logprob or None, [(id, logprob), ...])]
    prompt_tokens: list | None = None                 # echo: the prompt's tokens in the same form
    finish_reason: str | None = None                  # "stop" | "length" | "content_filter"
    usage: dict | None = None
    moderation: dict | None = None                    # the output verdict, on the last event
    error: str | None = None


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = np.asarray(logits, dtype=np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _top(logprobs: np.ndarray, n: int):
    if n <= 0:
        return []
    n = min(n, logprobs.size)
    best = np.argpartition(-logprobs, n - 1)[:n]
    best = best[np.argsort(-logprobs[best], kind="stable")]
    return [(int(i), float(logprobs[i])) for i in best]


class _TextSoFar:
    """The text of a growing list of generated ids, one token at a time, without decoding the list again.

    Byte-level tokenizers (`token_bytes`): each token's bytes go through an incremental UTF-8 decoder, so a
    character split across tokens appears once its last byte arrives; `final()` adds U+FFFD for bytes left
    incomplete at the end, as decoding the whole list would. Character vocabularies (`itos`): one
    character string per id. Any other tokenizer: the whole list decoded again each token (exact, slower).
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.text = ""
        self._utf8 = None
        self._ids = []
        if hasattr(tokenizer, "token_bytes"):
            self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._itos = getattr(tokenizer, "itos", None) if self._utf8 is None else None
        self.appends_only = self._utf8 is not None or isinstance(self._itos, dict)   # earlier text never changes

    def push(self, token: int) -> str:
        if self._utf8 is not None:
            self.text += self._utf8.decode(self.tokenizer.token_bytes(token))
        elif isinstance(self._itos, dict):
            self.text += self._itos[token]
        else:
            self._ids.append(token)
            self.text = self.tokenizer.decode(self._ids)
        return self.text

    def final(self) -> str:
        """The text with any incomplete trailing UTF-8 sequence shown as U+FFFD."""
        if self._utf8 is not None:
            self.text += self._utf8.decode(b"", final=True)
        return self.text


class Sequence:
    """One prompt being completed: its sampling state, its text and where its events go."""

    def __init__(self, prompt_ids, params: SamplingParams, emit, tokenizer=None, index: int = 0, stop_ids=(),
                 moderator=None):
        self.prompt_ids = [int(t) for t in prompt_ids]
        self.params = params
        self.emit = emit
        self.tokenizer = tokenizer
        self.index = index
        self.stop_ids = set(stop_ids)
        self.moderator = moderator if moderator is not None and moderator.check_output and moderator.active else None
        self.rng = np.random.default_rng(params.seed)
        self.ids: list = []            # generated tokens (stop tokens excluded)
        self.text = ""                 # text sent so far
        self._decoded = _TextSoFar(tokenizer) if tokenizer is not None else None
        self._stops = [stop for stop in params.stop if stop]
        self._longest_stop = max((len(stop) for stop in self._stops), default=1)
        self._searched = 0             # characters of the text already searched for stop strings
        self.verdict = None
        self.slot = None
        self.finish_reason = None
        self.cancelled = False
        self.submitted = time.perf_counter()
        self.last_token_time = None
        self.first_token_time = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.cancelled

    def advance(self, token: int, entry, context_full: bool = False) -> None:
        """Take one sampled token: update the text, send what is safe to send, decide whether to stop.
        context_full: the model has no position left after this token, so it is the last one."""
        finished = None
        if token in self.stop_ids:
            finished = "stop"
            full = self._decoded.final()
        else:
            self.ids.append(token)
            full = self._decoded.push(token)
        stops = self._stops
        if stops:
            # Text only grows at its end, so a stop string not found before can only end in the new part.
            start = self._searched if self._decoded.appends_only else 0
            found = [at for at in (full.find(stop, max(0, start - len(stop) + 1)) for stop in stops) if at >= 0]
            cut = min(found, default=-1)
            self._searched = len(full)
        else:
            cut = -1
        if cut >= 0:
            full, finished = full[:cut], "stop"
        if finished is None and (len(self.ids) >= self.params.max_tokens or context_full):
            finished, full = "length", self._decoded.final()
        safe = len(full)
        if finished is None:
            safe -= self._longest_stop - 1
            while safe > len(self.text) and full[safe - 1] == "\ufffd":          # incomplete UTF-8
                safe -= 1
            if self.moderator is not None:                                       # only whole words
                while safe > len(self.text) and (full[safe - 1].isalnum() or full[safe - 1] in "@$!|+_"):
                    safe -= 1
        candidate = full[:max(safe, len(self.text))]
        if self.moderator is not None and len(candidate) > len(self.text):
            self.verdict = self.moderator.check(candidate)
            if self.verdict.blocked:
                candidate, finished = self.text, "content_filter"
            else:
                candidate = self.text + self.verdict.text[len(self.text):]
        delta = candidate[len(self.text):]
        self.text = candidate
        tokens = [] if entry is None else [entry]
        if finished is not None:
            self.finish(finished, delta, tokens)
        elif delta or tokens:
            self.emit(Event(self.index, delta, tokens))

    def finish(self, reason: str, text: str = "", tokens=(), error: str | None = None) -> None:
        if self.finish_reason is not None:
            return
        self.finish_reason = reason
        moderation = self.verdict.to_dict() if self.verdict is not None else None
        usage = {"prompt_tokens": len(self.prompt_ids), "completion_tokens": len(self.ids),
                 "total_tokens": len(self.prompt_ids) + len(self.ids)}
        self.emit(Event(self.index, text, list(tokens), finish_reason=reason, usage=usage, moderation=moderation,
                        error=error))


class Engine:
    """The scheduler: a bounded waiting queue, `max_batch` KV slots, one thread that decodes them all."""

    def __init__(self, model, tokenizer, max_batch: int = 8, max_queue: int = 64, metrics=None, decoder=None):
        if max_batch <= 0 or max_queue < 0:
            raise ValueError(f"max_batch must be positive and max_queue non-negative, got {max_batch}, {max_queue}")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.decoder = decoder or SlotDecoder(model, max_batch)
        self.context = self.decoder.context
        self.metrics = metrics
        self._waiting = collections.deque()
        self._active = []
        self._cond = threading.Condition()
        self._thread = None
        self._stopping = False
        self.steps = 0
        self.on_step_end = None          # called on the engine thread after each step (the HTTP side flushes events)

    # ------------------------------------------------------------------ the HTTP side
    def start(self) -> None:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="tinygrad-llm-scheduler", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        for seq in list(self._waiting) + self._active:
            seq.finish("error", error="the server is shutting down")
        self._waiting.clear()
        self._active = []
        self._step_end()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def counts(self):
        """(active, queued) sequences."""
        return len(self._active), len(self._waiting)

    def submit(self, sequences) -> None:
        """Queue the sequences of one request, all or none; QueueFull when, beyond the free slots, more than
        `max_queue` sequences would wait."""
        with self._cond:
            if len(self._waiting) + len(sequences) > self.max_queue + self.decoder.free:
                raise QueueFull(f"{len(self._waiting)} sequences are waiting (limit {self.max_queue})")
            self._waiting.extend(sequences)
            self._update_gauges()
            self._cond.notify_all()

    def cancel(self, sequences) -> None:
        """The client went away: the sequences leave at the next step boundary, without an event."""
        with self._cond:
            for seq in sequences:
                seq.cancelled = True
            self._cond.notify_all()

    # ------------------------------------------------------------------ the scheduler thread
    def _update_gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.active.set(len(self._active))
            self.metrics.queued.set(len(self._waiting))

    def _run(self) -> None:
        while not self._stopping:
            try:
                self._turn()
            except Exception as error:                  # a bug here must not leave requests hanging
                logging.getLogger("tinygrad_llm.serve").exception("scheduler step failed")
                with self._cond:
                    for seq in list(self._waiting) + self._active:
                        seq.finish("error", error=f"{type(error).__name__}: {error}")
                        try:
                            self._release(seq)
                        except Exception:
                            seq.slot = None
                    self._waiting.clear()
                    self._active = []
                self._step_end()

    def _turn(self) -> None:
        """One turn of the loop: wait for work, drop the cancelled, admit, step, hand the events over."""
        with self._cond:
            while not self._stopping and not self._waiting and not self._active:
                self._cond.wait()
            if self._stopping:
                return
            self._leave()
            admitted = []
            while self._waiting and (self.decoder.free or not self._needs_slot(self._waiting[0])):
                seq = self._waiting.popleft()
                if seq.cancelled:
                    continue
                if self._needs_slot(seq):
                    seq.slot = self.decoder.acquire()
                admitted.append(seq)
        for seq in admitted:
            self._guarded(seq, self._admit)
            self._step_end()                            # its first token goes out before the next prefill
        with self._cond:
            self._leave()
            self._update_gauges()
        if self._active:
            self._step()
        self._step_end()

    def _step_end(self) -> None:
        if self.on_step_end is not None:
            self.on_step_end()

    @staticmethod
    def _needs_slot(seq) -> bool:
        return seq.params.max_tokens > 0

    def _leave(self) -> None:
        """Free the slots of finished and cancelled sequences (called with the lock held)."""
        keep = []
        for seq in self._active:
            if seq.done:
                self._release(seq)
            else:
                keep.append(seq)
        self._active = keep

    def _release(self, seq) -> None:
        if seq.slot is not None:
            self.decoder.release(seq.slot)
            seq.slot = None

    def _guarded(self, seq, work, *args) -> None:
        try:
            work(seq, *args)
        except Exception as error:                      # one bad sequence never stops the others
            seq.finish("error", error=f"{type(error).__name__}: {error}")
            with self._cond:
                if seq in self._active:
                    self._active.remove(seq)
                self._release(seq)

    def _admit(self, seq) -> None:
        if self.metrics is not None:
            self.metrics.prompt_tokens.inc(len(seq.prompt_ids))
        scored = seq.params.echo and seq.params.logprobs is not None
        if scored:
            if seq.params.max_tokens == 0:
                logits = self.decoder.prompt_logits(seq.prompt_ids)                        # (T, V), no slot
            else:                                       # one prefill scores the prompt and gives the next token
                logits = self.decoder.prefill(seq.slot, seq.prompt_ids, all_logits=True)  # (T, V)
            logprobs = _log_softmax(logits)                                                # (T, V)
            entries = [(seq.prompt_ids[0], None, None)]
            for t in range(1, len(seq.prompt_ids)):
                token = seq.prompt_ids[t]
                entries.append((token, float(logprobs[t - 1, token]), _top(logprobs[t - 1], seq.params.logprobs)))
            seq.emit(Event(seq.index, prompt_tokens=entries))
        if seq.params.max_tokens == 0:
            seq.finish("length")
            return
        logits = logits[-1] if scored else self.decoder.prefill(seq.slot, seq.prompt_ids)     # (V,)
        with self._cond:
            self._active.append(seq)
        self._sample(seq, logits)

    def _step(self) -> None:
        batch = [seq for seq in self._active if not seq.done]
        if not batch:
            return
        try:
            logits = self.decoder.step([seq.slot for seq in batch], [seq.last_token for seq in batch])   # (n, V)
        except Exception as error:
            for seq in batch:
                seq.finish("error", error=f"{type(error).__name__}: {error}")
            return
        self.steps += 1
        if self.metrics is not None:
            self.metrics.batch_size.observe(len(batch))
        logits = np.asarray(logits)
        try:
            tokens, entries = _choose(batch, logits)
        except Exception:                               # one bad sequence never stops the others: one by one
            for seq, row in zip(batch, logits):
                self._guarded(seq, self._sample, row)
            return
        now = time.perf_counter()
        if self.metrics is not None:
            self.metrics.completion_tokens.inc(len(batch))
        for seq, token, entry in zip(batch, tokens, entries):
            self._guarded(seq, self._take, token, entry, now)

    def _sample(self, seq, logits) -> None:
        """One sequence's next token from its (V,) logits: after its prefill, or one by one when the batch's
        choice failed."""
        (token,), (entry,) = _choose([seq], np.asarray(logits)[None, :])
        if self.metrics is not None:
            self.metrics.completion_tokens.inc()
        self._take(seq, token, entry, time.perf_counter())

    def _take(self, seq, token: int, entry, now: float) -> None:
        """A sampled token reaches its sequence: latency metrics, text and events, the stop checks."""
        if self.metrics is not None:
            if seq.first_token_time is None:
                self.metrics.ttft.observe(now - seq.submitted)
            else:
                self.metrics.token_latency.observe(now - seq.last_token_time)
        if seq.first_token_time is None:
            seq.first_token_time = now
        seq.last_token_time = now
        seq.last_token = token
        seq.advance(token, entry, context_full=self.decoder.length(seq.slot) >= self.context)
        if seq.finish_reason == "content_filter" and self.metrics is not None:
            self.metrics.safety.labels(stage="output", action="block").inc()


def _choose(batch, logits: np.ndarray):
    """The next token of each sequence from its row of (n, V) logits, and its logprob entry (None unless asked).

    Greedy rows share one argmax over the batch and the rows that want logprobs one log-softmax, so a step of
    32 sequences costs two NumPy calls here instead of a few per sequence; sampled rows go through
    generate.sample_next one by one (each has its own generator)."""
    n = len(batch)
    tokens = [0] * n
    greedy = [i for i, seq in enumerate(batch) if seq.params.temperature == 0]
    if greedy:
        rows = logits if len(greedy) == n else logits[greedy]
        for i, token in zip(greedy, rows.argmax(axis=-1).tolist()):
            tokens[i] = token
    for i, seq in enumerate(batch):
        params = seq.params
        if params.temperature != 0:
            tokens[i] = sample_next(logits[i], params.temperature, params.top_k, params.top_p, seq.rng)
    entries = [None] * n
    wanted = [i for i, seq in enumerate(batch) if seq.params.logprobs is not None]
    if wanted:
        logprobs = _log_softmax(logits if len(wanted) == n else logits[wanted])         # (n', V) float64
        picked = logprobs[np.arange(len(wanted)), [tokens[i] for i in wanted]].tolist()
        for row, i, value in zip(logprobs, wanted, picked):
            entries[i] = (tokens[i], value, _top(row, batch[i].params.logprobs))
    return tokens, entries
