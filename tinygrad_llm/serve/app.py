"""The HTTP side: an OpenAI-compatible API on Starlette, the chat page, health and metrics.

    app = create_app(model, tokenizer, model_name="shakespeare", max_batch=8, api_key=None, moderator=None)
    uvicorn.run(app, host="127.0.0.1", port=8000)

Routes:
    GET  /                       the chat page (one self-contained HTML file, page.html)
    GET  /health                 {"status": "ok", ...} while the scheduler thread runs, else 503
    GET  /metrics                Prometheus text format (metrics.py)
    GET  /v1/models              the one model served
    POST /v1/completions         prompt (str, [str], [int] or [[int]]), max_tokens, temperature, top_p, top_k,
                                 stop, seed, stream, stream_options, logprobs, echo, n=1
    POST /v1/chat/completions    messages through the chat template (chat.py), the same sampling fields,
                                 logprobs + top_logprobs, stream

Errors use OpenAI's shape, {"error": {"message", "type", "param", "code"}}: 400 bad JSON or fields,
401 missing or wrong API key, 404 unknown route or model, 405, 413 body too large, 429 queue full (with
Retry-After), 500 when the model fails, 503 while shutting down.

Moderation (tinygrad_llm.moderation): with a policy, each prompt (each chat message) is checked before it is
queued: `block` answers at once with finish_reason "content_filter" and no generation, `redact` replaces
the words before tokenization, `log` only counts. The output is checked as it streams (engine.py). Every
choice carries a non-standard "moderation" field with both verdicts, which OpenAI clients ignore.

Security: the API key (Bearer token) is compared with hmac.compare_digest; request bodies are read up to
`max_body_bytes` and refused past it; prompts longer than the context are refused (400), never cut; the
"model" field is only compared with the served name, and nothing in a request names a file.

One JSON line per request goes to the `tinygrad_llm.serve.access` logger (id, route, status, duration,
tokens, finish reasons, client); prompt and output text only with `log_prompts=True`.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import json
import logging
import threading
import time
import uuid
from importlib import resources

from ..generate import _eot_id
from .chat import chat_prompt_ids
from .engine import Engine, QueueFull, SamplingParams, Sequence
from .metrics import ServeMetrics

ACCESS_LOG = logging.getLogger("tinygrad_llm.serve.access")
ROUTES = ("/", "/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions")
MAX_PROMPTS = 64            # prompts in one /v1/completions request
MAX_MESSAGES = 256
MAX_STOP = 4
MAX_STOP_CHARS = 256
MAX_LOGPROBS = 20
RETRY_AFTER_SECONDS = 1


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def _error_response(error: APIError):
    from starlette.responses import JSONResponse
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


async def _send_error(send, error: APIError, request_id: str):
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"x-request-id", request_id.encode())]
    headers += [(k.lower().encode(), str(v).encode()) for k, v in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# ---------------------------------------------------------------------------------------------- validation
def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _get(body: dict, name: str, check, what: str, default=None):
    """body[name] if present and not null, after `check(value)` holds; else default. 400 naming the field."""
    value = body.get(name)
    if value is None:
        return default
    try:
        ok = check(value)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise APIError(400, f"'{name}' must be {what}, got {json.dumps(value)[:80]}", param=name)
    return value


def _sampling(body: dict, context: int, max_tokens_default: int, logprobs=None, echo=False) -> SamplingParams:
    max_tokens = _get(body, "max_tokens", lambda v: _is_int(v) and v >= 0, "an integer >= 0", None)
    if max_tokens is None:
        max_tokens = _get(body, "max_completion_tokens", lambda v: _is_int(v) and v >= 0, "an integer >= 0",
                          max_tokens_default)
    temperature = _get(body, "temperature", lambda v: _is_number(v) and 0 <= v <= 2, "a number in [0, 2]", 1.0)
    top_p = _get(body, "top_p", lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]", None)
    top_k = _get(body, "top_k", lambda v: _is_int(v) and v >= 0, "an integer >= 0", None)
    seed = _get(body, "seed", lambda v: _is_int(v) and v >= 0, "an integer >= 0", None)
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if (not isinstance(stop, list) or len(stop) > MAX_STOP
            or not all(isinstance(s, str) and len(s) <= MAX_STOP_CHARS for s in stop)):
        raise APIError(400, f"'stop' must be a string or a list of at most {MAX_STOP} strings of at most "
                            f"{MAX_STOP_CHARS} characters", param="stop")
    n = _get(body, "n", _is_int, "an integer", 1)
    if n != 1:
        raise APIError(400, "only n=1 is supported", param="n")
    return SamplingParams(max_tokens=min(max_tokens, context), temperature=float(temperature),
                          top_p=None if top_p is None else float(top_p), top_k=top_k or None, seed=seed,
                          stop=tuple(stop), logprobs=logprobs, echo=echo)


def _stream_flags(body: dict):
    stream = _get(body, "stream", lambda v: isinstance(v, bool), "true or false", False)
    options = _get(body, "stream_options", lambda v: isinstance(v, dict), "an object", {})
    include_usage = _get(options, "include_usage", lambda v: isinstance(v, bool), "true or false", False)
    return stream, include_usage


# ---------------------------------------------------------------------------------------------- the app
class _Server:
    """What the routes share: the engine, tokenizer, moderator, metrics and limits."""

    def __init__(self, model, tokenizer, model_name, max_batch, max_queue, api_key, moderator, max_body_bytes,
                 log_prompts):
        self.metrics = ServeMetrics()
        self.engine = Engine(model, tokenizer, max_batch=max_batch, max_queue=max_queue, metrics=self.metrics)
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.vocab_size = model.config.vocab_size
        self.context = model.config.max_seq_len
        self.api_key = api_key.encode("utf-8") if api_key else None
        self.moderator = moderator if moderator is not None and moderator.active else None
        self.max_body_bytes = max_body_bytes
        self.log_prompts = log_prompts
        self.eot_id = _eot_id(tokenizer)
        self.created = int(time.time())
        self.loop = None                                  # the event loop, set when the app starts
        self._pending = []                                # (queue, event) emitted during the current step
        self._pending_lock = threading.Lock()
        self._token_texts = {}                            # token id -> its text, for logprobs
        self.engine.on_step_end = self._flush

    # -------------------------------------------------------------- engine thread -> event loop
    def _emit(self, queue, event) -> None:
        with self._pending_lock:
            self._pending.append((queue, event))

    def _flush(self) -> None:
        with self._pending_lock:
            items, self._pending = self._pending, []
        if items and self.loop is not None:
            try:
                self.loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:                          # the event loop is closed: nobody is listening
                pass

    # -------------------------------------------------------------- request plumbing
    def authorised(self, scope) -> bool:
        if self.api_key is None:
            return True
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    return hmac.compare_digest(token.strip(), self.api_key)
        return False

    async def read_json(self, request) -> dict:
        size, chunks = 0, []
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise APIError(413, f"request body is larger than {self.max_body_bytes} bytes", code="body_too_large")
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks).decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise APIError(400, "the body is not valid JSON") from None
        if not isinstance(body, dict):
            raise APIError(400, "the body must be a JSON object")
        model = _get(body, "model", lambda v: isinstance(v, str), "a string", self.model_name)
        if model != self.model_name:
            raise APIError(404, f"the model '{model[:100]}' does not exist; this server serves '{self.model_name}'",
                           param="model", code="model_not_found")
        return body

    def encode(self, text: str):
        encode = getattr(self.tokenizer, "encode_ordinary", None) or self.tokenizer.encode
        try:
            ids = list(encode(text))
        except (KeyError, ValueError) as error:           # a character outside a character vocabulary
            raise APIError(400, f"the prompt cannot be tokenized: {error}") from None
        if not ids:
            if self.eot_id is None:
                raise APIError(400, "the prompt is empty and the tokenizer has no end-of-text token to start from")
            ids = [self.eot_id]
        return ids

    def check_ids(self, ids, param="prompt"):
        if len(ids) > self.context:
            raise APIError(400, f"the prompt has {len(ids)} tokens; this model's context is {self.context} tokens",
                           param=param, code="context_length_exceeded")

    def moderate_input(self, text: str):
        """The input verdict (None without a policy that checks input)."""
        if self.moderator is None or not self.moderator.check_input:
            return None
        verdict = self.moderator.check(text)
        if verdict.action != "allow":
            self.metrics.safety.labels(stage="input", action=verdict.action).inc()
        return verdict

    def token_text(self, token: int) -> str:
        text = self._token_texts.get(token)
        if text is None:
            text = self._token_texts[token] = self.tokenizer.decode([token])
        return text

    async def submit(self, request, sequences):
        """Queue `sequences` (all or none) and return the asyncio.Queue their events arrive on; 429 when full."""
        queue = asyncio.Queue()
        emit = functools.partial(self._emit, queue)
        for seq in sequences:
            seq.emit = emit
        request.state.sequences = sequences
        try:
            self.engine.submit(sequences)
        except QueueFull:
            raise APIError(429, "the server is busy: too many requests are waiting; retry shortly",
                           kind="rate_limit_error",
                           code="queue_full", headers={"Retry-After": str(RETRY_AFTER_SECONDS)}) from None
        return queue


def _client_gone_watcher(request, engine, sequences, queue):
    async def watch():
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                engine.cancel(sequences)
                queue.put_nowait(None)
                return
    return asyncio.ensure_future(watch())


def create_app(model, tokenizer, model_name: str = "model", max_batch: int = 8, max_queue: int = 64,
               api_key: str | None = None, moderator=None, max_body_bytes: int = 1 << 20, log_prompts: bool = False):
    """The Starlette app; the scheduler thread starts and stops with the app's lifespan."""
    try:
        from starlette.applications import Starlette
        from starlette.exceptions import HTTPException
        from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
        from starlette.routing import Route
    except ImportError:
        raise ImportError("serving needs starlette and uvicorn: pip install -e .[serve]") from None
    server = _Server(model, tokenizer, model_name, max_batch, max_queue, api_key, moderator, max_body_bytes,
                     log_prompts)
    page = resources.files(__package__).joinpath("page.html").read_text(encoding="utf-8")

    async def index(request):
        return HTMLResponse(page)

    async def health(request):
        active, queued = server.engine.counts()
        ok = server.engine.alive
        return JSONResponse({"status": "ok" if ok else "unavailable", "model": server.model_name, "active": active,
                             "queued": queued, "max_batch": server.engine.max_batch, "context": server.context,
                             "moderation": server.moderator is not None, "auth": server.api_key is not None},
                            status_code=200 if ok else 503)

    async def metrics(request):
        body, content_type = server.metrics.render()
        return Response(body, media_type=content_type)

    async def models(request):
        return JSONResponse({"object": "list", "data": [{"id": server.model_name, "object": "model",
                                                        "created": server.created, "owned_by": "tinygrad_llm"}]})

    async def completions(request):
        body = await server.read_json(request)
        stream, include_usage = _stream_flags(body)
        logprobs = _get(body, "logprobs", lambda v: _is_int(v) and 0 <= v <= MAX_LOGPROBS,
                        f"an integer in [0, {MAX_LOGPROBS}]", None)
        echo = _get(body, "echo", lambda v: isinstance(v, bool), "true or false", False)
        params = _sampling(body, server.context, 16, logprobs, echo)
        prompts = _prompts(body.get("prompt"), server)
        choices, sequences = [], []
        for index, (text, ids) in enumerate(prompts):
            verdict = server.moderate_input(text if text is not None else server.tokenizer.decode(ids))
            if verdict is not None and verdict.action == "redact" and text is not None:
                text, ids = verdict.text, server.encode(verdict.text)
                server.check_ids(ids)
            choice = {"index": index, "prompt_text": text if text is not None else server.tokenizer.decode(ids),
                      "prompt_ids": ids, "input": verdict.to_dict() if verdict is not None else None}
            choices.append(choice)
            if verdict is not None and verdict.blocked:
                choice["blocked"] = True
                continue
            sequences.append(Sequence(ids, params, None, server.tokenizer, index, {server.eot_id} - {None},
                                      server.moderator))
        request.state.log.update(prompt_tokens=sum(len(c["prompt_ids"]) for c in choices))
        if server.log_prompts:
            request.state.log.update(prompt=[c["prompt_text"] for c in choices])
        queue = await server.submit(request, sequences) if sequences else None
        completion_id = "cmpl-" + uuid.uuid4().hex[:24]
        created = int(time.time())

        def chunk(choices_out, usage=None):
            out = {"id": completion_id, "object": "text_completion", "created": created, "model": server.model_name,
                   "choices": choices_out}
            if usage is not None:
                out["usage"] = usage
            return out

        state = {c["index"]: _ChoiceState(c, echo, logprobs, server) for c in choices}
        if stream:
            def render(event):
                if event is _BLOCKED:
                    return [_sse(chunk([s.completion_chunk(s.choice["prompt_text"] if echo else "", None,
                                                           "content_filter")]))
                            for s in state.values() if s.choice.get("blocked")]
                s = state[event.index]
                text = (s.choice["prompt_text"] if echo and not s.sent_echo else "") + event.text
                s.sent_echo = True
                return [_sse(chunk([s.completion_chunk(text, event, event.finish_reason)]))]

            events = _sse_events(_drain(request, server, queue, sequences, state), queue, render,
                                 (lambda: chunk([], _usage(state))) if include_usage else None)
            return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        async for event in _drain(request, server, queue, sequences, state):
            pass
        return JSONResponse(chunk([s.completion() for s in state.values()], _usage(state)))

    async def chat_completions(request):
        body = await server.read_json(request)
        stream, include_usage = _stream_flags(body)
        want_logprobs = _get(body, "logprobs", lambda v: isinstance(v, bool), "true or false", False)
        top = _get(body, "top_logprobs", lambda v: _is_int(v) and 0 <= v <= MAX_LOGPROBS,
                   f"an integer in [0, {MAX_LOGPROBS}]", 0)
        params = _sampling(body, server.context, server.context, top if want_logprobs else None)
        params.stop = params.stop + ("<|end|>",)           # the turn's end, when the template is plain text
        messages = _messages(body.get("messages"))
        verdict = server.moderate_input("\n".join(m["content"] for m in messages))
        if verdict is not None and verdict.action == "redact":
            messages = [dict(m, content=server.moderator.check(m["content"]).text) for m in messages]
        try:
            ids, stop_ids = chat_prompt_ids(server.tokenizer, messages)
        except (KeyError, ValueError) as error:
            raise APIError(400, f"the messages cannot be tokenized: {error}", param="messages") from None
        server.check_ids(ids, "messages")
        choice = {"index": 0, "prompt_text": None, "prompt_ids": ids, "input": verdict.to_dict() if verdict else None}
        sequences = []
        if verdict is not None and verdict.blocked:
            choice["blocked"] = True
        else:
            sequences.append(Sequence(ids, params, None, server.tokenizer, 0, stop_ids | ({server.eot_id} - {None}),
                                      server.moderator))
        request.state.log.update(prompt_tokens=len(ids))
        if server.log_prompts:
            request.state.log.update(prompt=messages)
        queue = await server.submit(request, sequences) if sequences else None
        completion_id = "chatcmpl-" + uuid.uuid4().hex[:24]
        created = int(time.time())
        state = {0: _ChoiceState(choice, False, top if want_logprobs else None, server)}

        def chunk(choices_out, usage=None, obj="chat.completion.chunk"):
            out = {"id": completion_id, "object": obj, "created": created, "model": server.model_name,
                   "choices": choices_out}
            if usage is not None:
                out["usage"] = usage
            return out

        if stream:
            s = state[0]

            def render(event):
                if event is _BLOCKED:
                    return [_sse(chunk([s.chat_chunk(None, "content_filter")]))]
                return [_sse(chunk([s.chat_chunk(event, event.finish_reason)]))]

            opening = _sse(chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                   "finish_reason": None}]))
            events = _sse_events(_drain(request, server, queue, sequences, state), queue, render,
                                 (lambda: chunk([], _usage(state))) if include_usage else None, opening)
            return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        async for event in _drain(request, server, queue, sequences, state):
            pass
        return JSONResponse(chunk([state[0].chat_message()], _usage(state), obj="chat.completion"))

    async def on_api_error(request, error: APIError):
        return _error_response(error)

    async def on_http_error(request, error: HTTPException):
        kinds = {404: ("not_found_error", "no such route"), 405: ("invalid_request_error", "method not allowed")}
        kind, message = kinds.get(error.status_code, ("invalid_request_error", str(error.detail)))
        return _error_response(APIError(error.status_code, f"{message}: {request.method} {request.url.path}", kind))

    async def on_unexpected(request, error: Exception):
        logging.getLogger("tinygrad_llm.serve").exception("request failed")
        return _error_response(APIError(500, f"internal error: {type(error).__name__}", "server_error"))

    async def lifespan(app):
        server.loop = asyncio.get_running_loop()
        server.engine.start()
        try:
            yield
        finally:
            server.engine.stop()

    app = Starlette(routes=[Route("/", index), Route("/health", health), Route("/metrics", metrics),
                            Route("/v1/models", models),
                            Route("/v1/completions", completions, methods=["POST"]),
                            Route("/v1/chat/completions", chat_completions, methods=["POST"])],
                    exception_handlers={APIError: on_api_error, HTTPException: on_http_error, Exception: on_unexpected},
                    lifespan=contextlib.asynccontextmanager(lifespan))
    app.state.server = server
    return _Gate(app, server)


# ---------------------------------------------------------------------------------------------- helpers
def _deliver(items) -> None:
    for queue, event in items:
        queue.put_nowait(event)


_BLOCKED = object()        # a marker event: the input-blocked choices are to be answered now


async def _drain(request, server, queue, sequences, state):
    """Yield _BLOCKED once if any choice was blocked on input, then every engine event until all finish.
    Raises APIError(500) when the engine reports a failure before anything was sent."""
    if any(s.choice.get("blocked") for s in state.values()):
        for s in state.values():
            if s.choice.get("blocked"):
                s.finish_reason = "content_filter"
        yield _BLOCKED
    if queue is None:
        return
    watcher = _client_gone_watcher(request, server.engine, sequences, queue)
    try:
        remaining = {seq.index for seq in sequences}
        while remaining:
            event = await queue.get()
            if event is None:                          # the client went away
                return
            s = state[event.index]
            s.take(event)
            if event.error is not None:
                server.engine.cancel(sequences)
                raise APIError(500 if event.finish_reason == "error" else 503, f"generation failed: {event.error}",
                               "server_error")
            if event.finish_reason is not None:
                remaining.discard(event.index)
            yield event
    finally:
        watcher.cancel()
        log = request.state.log
        log["completion_tokens"] = sum(s.completion_tokens for s in state.values())
        log["finish_reasons"] = [s.finish_reason for s in state.values()]
        if server.log_prompts:
            log["output"] = [s.text for s in state.values()]


class _ChoiceState:
    """One choice's accumulated text, tokens and verdicts, shaped into OpenAI's choice objects."""

    def __init__(self, choice: dict, echo: bool, logprobs, server: _Server):
        self.choice, self.echo, self.logprobs, self.server = choice, echo, logprobs, server
        self.text, self.tokens, self.prompt_tokens = "", [], []
        self.finish_reason, self.usage, self.output_verdict = None, None, None
        self.completion_tokens = 0
        self.sent_echo = False

    def take(self, event) -> None:
        self.text += event.text
        self.tokens += event.tokens
        if event.prompt_tokens is not None:
            self.prompt_tokens = event.prompt_tokens
        if event.finish_reason is not None:
            self.finish_reason, self.usage, self.output_verdict = event.finish_reason, event.usage, event.moderation
            self.completion_tokens = event.usage["completion_tokens"] if event.usage else 0

    def moderation(self):
        if self.choice["input"] is None and self.output_verdict is None:
            return None
        return {"input": self.choice["input"], "output": self.output_verdict}

    def _completion_logprobs(self, entries, offset: int):
        if self.logprobs is None:
            return None
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token, logprob, top in entries:
            text = self.server.token_text(token)
            out["tokens"].append(text)
            out["token_logprobs"].append(logprob)
            out["top_logprobs"].append(None if top is None else {self.server.token_text(t): lp for t, lp in top})
            out["text_offset"].append(offset)
            offset += len(text)
        return out

    def completion(self) -> dict:
        prompt = self.choice["prompt_text"] if self.echo else ""
        entries = (self.prompt_tokens if self.echo else []) + self.tokens
        offset = 0 if self.echo else len(self.choice["prompt_text"])
        choice = {"index": self.choice["index"], "text": prompt + self.text,
                  "logprobs": self._completion_logprobs(entries, offset), "finish_reason": self.finish_reason}
        if self.moderation() is not None:
            choice["moderation"] = self.moderation()
        return choice

    def completion_chunk(self, text, event, finish_reason) -> dict:
        entries = [] if event is None else ((event.prompt_tokens or []) if self.echo else []) + event.tokens
        choice = {"index": self.choice["index"], "text": text,
                  "logprobs": self._completion_logprobs(entries, 0) if entries else None,
                  "finish_reason": finish_reason}
        if finish_reason is not None and self.moderation() is not None:
            choice["moderation"] = self.moderation()
        return choice

    def _chat_logprobs(self, entries):
        if self.logprobs is None:
            return None
        content = []
        for token, logprob, top in entries:
            text = self.server.token_text(token)
            content.append({"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8")),
                            "top_logprobs": [{"token": self.server.token_text(t), "logprob": lp,
                                              "bytes": list(self.server.token_text(t).encode("utf-8"))}
                                             for t, lp in top]})
        return {"content": content}

    def chat_message(self) -> dict:
        choice = {"index": 0, "message": {"role": "assistant", "content": self.text},
                  "logprobs": self._chat_logprobs(self.tokens), "finish_reason": self.finish_reason}
        if self.moderation() is not None:
            choice["moderation"] = self.moderation()
        return choice

    def chat_chunk(self, event, finish_reason) -> dict:
        delta = {"content": event.text} if event is not None and event.text else {}
        entries = event.tokens if event is not None else []
        choice = {"index": 0, "delta": delta, "logprobs": self._chat_logprobs(entries) if entries else None,
                  "finish_reason": finish_reason}
        if finish_reason is not None and self.moderation() is not None:
            choice["moderation"] = self.moderation()
        return choice


def _usage(state) -> dict:
    prompt = sum(len(s.choice["prompt_ids"]) for s in state.values())
    completion = sum(s.completion_tokens for s in state.values())
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _sse_events(drained, queue, render, usage=None, opening=None):
    """A streaming response's body: `opening` (an SSE message), then render(event) for each event of
    `drained` (a list of SSE messages), the messages that queued up meanwhile written as one; an APIError
    mid-stream becomes an error message; then usage() when asked for, and `data: [DONE]`."""
    if opening is not None:
        yield opening
    waiting = []                                           # SSE messages not yet written
    try:
        async for event in drained:
            waiting.extend(render(event))
            if queue is None or queue.empty():             # what arrived meanwhile: one write
                yield "".join(waiting)
                waiting.clear()
    except APIError as error:                              # the model failed mid-stream: say so, then end
        waiting.append(_sse(error.body()))
    if waiting:
        yield "".join(waiting)
    if usage is not None:
        yield _sse(usage())
    yield "data: [DONE]\n\n"


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def _prompts(prompt, server: _Server):
    """[(text or None, ids)] from a str, a list of str, a list of ids or a list of id lists."""
    what = "a string, a list of strings, a list of token ids or a list of token-id lists"
    if prompt is None:
        raise APIError(400, "'prompt' is required", param="prompt")
    if isinstance(prompt, str):
        prompt = [prompt]
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise APIError(400, f"'prompt' must be {what}", param="prompt")
    if not (all(isinstance(item, str) for item in prompt) or all(isinstance(item, list) for item in prompt)):
        raise APIError(400, f"'prompt' must be {what}, not a mixture", param="prompt")
    if len(prompt) > MAX_PROMPTS:
        raise APIError(400, f"at most {MAX_PROMPTS} prompts per request, got {len(prompt)}", param="prompt")
    out = []
    for item in prompt:
        if isinstance(item, str):
            ids = server.encode(item)
            out.append((item, ids))
        elif isinstance(item, list) and item and all(_is_int(t) for t in item):
            if not all(0 <= t < server.vocab_size for t in item):
                raise APIError(400, f"token ids must be in [0, {server.vocab_size})", param="prompt")
            out.append((None, list(item)))
        else:
            raise APIError(400, f"'prompt' must be {what}", param="prompt")
        server.check_ids(out[-1][1])
    return out


def _messages(messages):
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list of {role, content} objects", param="messages")
    if len(messages) > MAX_MESSAGES:
        raise APIError(400, f"at most {MAX_MESSAGES} messages per request", param="messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise APIError(400, f"messages[{i}] must be an object with a 'role' string", param="messages")
        role, content = message["role"], message.get("content")
        if role == "developer":                          # OpenAI's newer name for the system role
            role = "system"
        if role not in ("system", "user", "assistant"):
            raise APIError(400, f"messages[{i}].role must be system, user or assistant, got {role[:40]!r}",
                           param="messages")
        if isinstance(content, list):                    # content parts: only text parts are understood
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise APIError(400, f"messages[{i}].content parts must be {{type: 'text', text}} objects",
                               param="messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string", param="messages")
        out.append({"role": role, "content": content})
    return out


class _Gate:
    """ASGI middleware around the app: request ids, the API key, the Content-Length limit, the request
    metrics, the access log, and cancelling a request's sequences however it ends."""

    def __init__(self, app, server: _Server):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        server = self.server
        started = time.perf_counter()
        request_id = "req-" + uuid.uuid4().hex[:16]
        path = scope.get("path", "")
        route = path if path in ROUTES else "other"
        log = {"id": request_id, "method": scope.get("method"), "path": path[:200]}
        scope["state"] = dict(scope.get("state") or {}, log=log, sequences=[])
        status = {"code": 500}

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message = dict(message, headers=list(message.get("headers", [])) + [(b"x-request-id",
                                                                                      request_id.encode())])
            await send(message)

        try:
            if path.startswith("/v1/") and not server.authorised(scope):
                status["code"] = 401
                return await _send_error(send, APIError(401, "missing or wrong API key (Authorization: Bearer KEY)",
                                                        code="invalid_api_key"), request_id)
            for name, value in scope.get("headers", []):
                if name == b"content-length":
                    if not value.isdigit() or int(value) > server.max_body_bytes:
                        status["code"] = 413
                        return await _send_error(send, APIError(413, f"request body is larger than "
                                                                     f"{server.max_body_bytes} bytes",
                                                                code="body_too_large"), request_id)
            await self.app(scope, receive, send_with_id)
        except Exception as error:                     # the client went away mid-stream, or a send failed
            if type(error).__name__ != "ClientDisconnect" and not isinstance(error, OSError):
                raise
            status["code"] = 499
        finally:
            unfinished = [seq for seq in scope["state"].get("sequences", []) if not seq.done]
            if unfinished:
                server.engine.cancel(unfinished)
                log["cancelled"] = len(unfinished)
            seconds = time.perf_counter() - started
            server.metrics.requests.labels(route=route, status=str(status["code"])).inc()
            server.metrics.request_seconds.labels(route=route).observe(seconds)
            client = scope.get("client")
            log.update(status=status["code"], ms=round(seconds * 1000, 1), client=client[0] if client else None)
            ACCESS_LOG.info(json.dumps(log, default=str))
