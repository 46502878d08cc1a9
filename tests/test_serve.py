"""The server: the official OpenAI client against it (completions, chat, streamed and not), prompt
scoring as lm-evaluation-harness asks for it, bad requests (all 4xx, the server keeps serving), the API
key, the bounded queue, metrics and the access log, and greedy answers equal to `generate`'s whatever
else is in the batch (a loopback load test with concurrent streaming clients)."""
from __future__ import annotations

import json
import logging
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from serve_fixtures import running_server, tiny_model_and_tokenizer  # noqa: E402
from text_sample import SHAKESPEARE  # noqa: E402

from tinygrad_llm import no_grad  # noqa: E402
from tinygrad_llm.cli import main  # noqa: E402
from tinygrad_llm.generate import generate  # noqa: E402
from tinygrad_llm.moderation import Blocklist, Moderator  # noqa: E402
from tinygrad_llm.serve.app import create_app  # noqa: E402
from tinygrad_llm.serve.chat import chat_prompt_ids  # noqa: E402
from tinygrad_llm.serve.engine import Engine, QueueFull, SamplingParams, Sequence  # noqa: E402
from tinygrad_llm.serve.engine import _choose, _log_softmax, _TextSoFar  # noqa: E402
from tinygrad_llm.tokenizer import CharVocab  # noqa: E402

MODEL = "tiny"


@pytest.fixture(scope="module")
def tiny():
    return tiny_model_and_tokenizer()


@pytest.fixture(scope="module")
def server(tiny):
    model, tokenizer = tiny
    with running_server(create_app(model, tokenizer, MODEL, max_batch=16, max_queue=256)) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=30)


def greedy_text(model, tokenizer, ids, max_tokens, stop_tokens=()):
    eot = tokenizer.special_tokens["<|endoftext|>"]
    out = list(generate(model, ids, max_tokens, temperature=0, eot_id=eot, stop_tokens=stop_tokens))
    return tokenizer.decode(out) if out else "", len(out)


def prompts(count, length=24):
    return [SHAKESPEARE[(37 * i) % 1500:(37 * i) % 1500 + length] for i in range(count)]


# ---------------------------------------------------------------------------------------------- the API
def test_models_health_and_page(server):
    with httpx.Client(base_url=server) as http:
        assert http.get("/v1/models").json()["data"][0]["id"] == MODEL
        health = http.get("/health").json()
        assert health["status"] == "ok" and health["auth"] is False
        page = http.get("/")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert "/v1/chat/completions" in page.text and "http://" not in page.text.replace("http://www.w3", "")


def test_completion_equals_generate_streamed_or_not(client, tiny):
    model, tokenizer = tiny
    prompt = prompts(1)[0]
    expected, count = greedy_text(model, tokenizer, tokenizer.encode_ordinary(prompt), 12)
    result = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    assert result.choices[0].text == expected
    assert result.usage.completion_tokens == count
    assert result.usage.prompt_tokens == len(tokenizer.encode_ordinary(prompt))
    assert result.choices[0].finish_reason == ("length" if count == 12 else "stop")
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == result.choices[0].finish_reason


def test_chat_equals_generate_on_the_chat_template(client, tiny):
    model, tokenizer = tiny
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who comes here?"}]
    ids, stop_ids = chat_prompt_ids(tokenizer, messages)
    expected, _ = greedy_text(model, tokenizer, ids, 20, stop_tokens=stop_ids)
    expected = expected.split("<|end|>")[0]
    result = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0)
    assert result.choices[0].message.role == "assistant"
    assert result.choices[0].message.content == expected
    assert result.choices[0].finish_reason in ("stop", "length")
    assert result.usage.prompt_tokens == len(ids)
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].usage.completion_tokens == result.usage.completion_tokens


def test_chat_template_ids_keep_typed_special_strings_as_text(tiny):
    _, tokenizer = tiny
    ids, stop_ids = chat_prompt_ids(tokenizer, [{"role": "user", "content": "a<|end|>b"}])
    special = tokenizer.special_tokens
    assert ids.count(special["<|end|>"]) == 1                      # only the turn's own end token
    rendered = "<|user|>\na<|end|>b<|end|>\n<|assistant|>\n"
    assert tokenizer.decode(ids) == rendered
    plain = [{"role": "user", "content": "hello"}]
    assert chat_prompt_ids(tokenizer, plain)[0] == tokenizer.encode(
        "<|user|>\nhello<|end|>\n<|assistant|>\n", allowed_special=set(special))
    assert stop_ids == {special[name] for name in ("<|end|>", "<|endoftext|>", "<|system|>", "<|user|>",
                                                   "<|assistant|>")}


def test_same_seed_same_sample_and_stop_strings(client):
    prompt = prompts(2)[1]
    a = client.completions.create(model=MODEL, prompt=prompt, max_tokens=15, temperature=1.0, top_p=0.9, seed=5)
    b = client.completions.create(model=MODEL, prompt=prompt, max_tokens=15, temperature=1.0, top_p=0.9, seed=5)
    assert a.choices[0].text == b.choices[0].text
    full = client.completions.create(model=MODEL, prompt=prompt, max_tokens=15, temperature=0).choices[0].text
    stop = full[3:5]
    cut = client.completions.create(model=MODEL, prompt=prompt, max_tokens=15, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[:full.find(stop)] and cut.choices[0].finish_reason == "stop"


def test_echo_scores_a_prompt_like_lm_evaluation_harness(server, tiny):
    model, tokenizer = tiny
    prompt = prompts(1, 40)[0]
    ids = tokenizer.encode_ordinary(prompt)
    with no_grad():
        logits = model(np.asarray(ids)[None, :]).numpy()[0].astype(np.float64)   # (T, V) from GPT.forward
    reference = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    with httpx.Client(base_url=server, timeout=30) as http:
        body = http.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 0, "echo": True,
                                                  "logprobs": 1, "temperature": 0}).json()
        choice = body["choices"][0]
        assert choice["text"] == prompt
        scores = choice["logprobs"]["token_logprobs"]
        assert scores[0] is None and len(scores) == len(ids)
        np.testing.assert_allclose(scores[1:], [reference[t - 1, ids[t]] for t in range(1, len(ids))], atol=1e-4)
        assert "".join(choice["logprobs"]["tokens"]) == prompt
        # what lm-eval's local-completions sends: token-id lists, max_tokens 1, echo, logprobs 1
        batch = [ids[:10], ids]
        body = http.post("/v1/completions", json={"model": MODEL, "prompt": batch, "max_tokens": 1, "echo": True,
                                                  "logprobs": 1, "temperature": 0, "seed": 1234}).json()
        assert [c["index"] for c in body["choices"]] == [0, 1]
        for choice, context in zip(body["choices"], batch):
            logprobs = choice["logprobs"]
            assert len(logprobs["token_logprobs"]) == len(context) + 1
            for token_logprob, top in zip(logprobs["token_logprobs"][1:], logprobs["top_logprobs"][1:]):
                assert token_logprob <= max(top.values()) + 1e-12      # the greedy check lm-eval makes
            greedy = logprobs["top_logprobs"][-1]                         # the generated token is the argmax
            assert logprobs["token_logprobs"][-1] == max(greedy.values())


def test_bad_requests_are_4xx_in_openai_shape_and_the_server_keeps_serving(server, tiny):
    too_long = "x " * 200
    cases = [
        (b"{not json", 400), (b"[1, 2]", 400), (b"\xff\xfe", 400),
        (json.dumps({"model": MODEL}).encode(), 400),                                   # no prompt
        (json.dumps({"prompt": "hi", "max_tokens": "5"}).encode(), 400),
        (json.dumps({"prompt": "hi", "max_tokens": -1}).encode(), 400),
        (json.dumps({"prompt": "hi", "temperature": 3}).encode(), 400),
        (json.dumps({"prompt": "hi", "top_p": 0}).encode(), 400),
        (json.dumps({"prompt": "hi", "stream": "yes"}).encode(), 400),
        (json.dumps({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}).encode(), 400),
        (json.dumps({"prompt": "hi", "n": 2}).encode(), 400),
        (json.dumps({"prompt": "hi", "seed": -1}).encode(), 400),
        (json.dumps({"prompt": "hi", "top_k": 1.5}).encode(), 400),
        (json.dumps({"prompt": "hi", "logprobs": 99}).encode(), 400),
        (json.dumps({"prompt": [[1, 2], "mixed"]}).encode(), 400),
        (json.dumps({"prompt": [1, 99999]}).encode(), 400),                              # id past the vocabulary
        (json.dumps({"prompt": too_long}).encode(), 400),                                 # past the context
        (json.dumps({"prompt": {"a": 1}}).encode(), 400),
        (json.dumps({"prompt": "hi", "model": "../../etc/passwd"}).encode(), 404),
    ]
    with httpx.Client(base_url=server, timeout=30) as http:
        for body, status in cases:
            response = http.post("/v1/completions", content=body, headers={"content-type": "application/json"})
            assert response.status_code == status, (body, response.text)
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"]
        chat_cases = [{"messages": []}, {"messages": "hi"}, {"messages": [{"content": "no role"}]},
                      {"messages": [{"role": "wizard", "content": "x"}]},
                      {"messages": [{"role": "user", "content": 5}]},
                      {"messages": [{"role": "user", "content": "x"}], "logprobs": "yes"},
                      {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 50}]
        for body in chat_cases:
            response = http.post("/v1/chat/completions", json=body)
            assert response.status_code == 400, (body, response.text)
        oversize = http.post("/v1/completions", content=b"{" + b" " * (1 << 21) + b"}",
                             headers={"content-type": "application/json"})
        assert oversize.status_code == 413 and oversize.json()["error"]["code"] == "body_too_large"
        assert http.get("/v1/completions").status_code == 405
        assert http.get("/v1/nothing").json()["error"]["type"] == "not_found_error"
        assert http.get("/health").json()["status"] == "ok"
        assert http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200


def test_api_key_is_required_on_the_api_but_not_for_health(tiny):
    model, tokenizer = tiny
    with running_server(create_app(model, tokenizer, MODEL, max_batch=2, api_key="s3cret")) as url:
        with httpx.Client(base_url=url, timeout=30) as http:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"},
                            {"Authorization": "Basic s3cret"}):
                response = http.get("/v1/models", headers=headers)
                assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
            assert http.get("/health").status_code == 200
        good = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert good.completions.create(model=MODEL, prompt="hi", max_tokens=2).choices[0].finish_reason
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()


def _slowed(app, seconds=0.05):
    """Slow every decode step of the app's engine down, so that a request holds its slot for a while."""
    import time
    decoder = app.server.engine.decoder
    real_step = decoder.step

    def slow_step(slots, tokens):
        time.sleep(seconds)
        return real_step(slots, tokens)
    decoder.step = slow_step
    return app


def test_a_full_queue_answers_429_with_retry_after(tiny):
    model, tokenizer = tiny
    app = _slowed(create_app(model, tokenizer, MODEL, max_batch=1, max_queue=0))
    with running_server(app) as url:
        with httpx.Client(base_url=url, timeout=30) as http:
            with http.stream("POST", "/v1/completions", json={"prompt": "hi", "max_tokens": 60, "stream": True,
                                                              "logprobs": 0}) as busy:
                next(busy.iter_lines())                              # the only slot is taken, no queue
                response = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
                assert response.status_code == 429 and response.headers["retry-after"] == "1"
                assert response.json()["error"]["type"] == "rate_limit_error"
            assert http.get("/health").json()["status"] == "ok"
            assert 'status="429"' in http.get("/metrics").text


def test_engine_queue_bound_and_cancelled_sequences_leave_at_once(tiny):
    model, tokenizer = tiny
    engine = Engine(model, tokenizer, max_batch=2, max_queue=3)
    events = []
    make = lambda n: [Sequence([1, 2, 3], SamplingParams(max_tokens=40, temperature=0), events.append, tokenizer, i)
                      for i in range(n)]
    engine.submit(make(5))                       # not started: they wait (2 free slots + a queue of 3)
    with pytest.raises(QueueFull):
        engine.submit(make(1))
    engine._waiting.clear()
    seen = []

    def cancel_after_three(event):
        seen.append(event)
        if len(seen) == 3:
            engine.cancel([victim])
    victim = Sequence([4, 5, 6], SamplingParams(max_tokens=40, temperature=0), cancel_after_three, tokenizer, 0)
    other = Sequence([7, 8], SamplingParams(max_tokens=40, temperature=0), events.append, tokenizer, 1)
    engine.start()
    try:
        done = threading.Event()
        other.emit = lambda event: (events.append(event), event.finish_reason and done.set())
        engine.submit([victim, other])
        assert done.wait(20)
    finally:
        engine.stop()
    assert victim.cancelled and victim.finish_reason is None
    assert len(seen) <= 4                                        # at most the step in flight when cancelled
    assert other.finish_reason in ("stop", "length") and engine.decoder.free == 2


def test_a_sequence_that_fails_mid_batch_does_not_stop_the_others(tiny):
    """A sequence whose sampling raises during a batched step ends with an error; the other sequence of
    the same step still gets every token greedy decoding alone would give it."""
    model, tokenizer = tiny
    engine = Engine(model, tokenizer, max_batch=2)
    done, other_done, other_events = threading.Event(), threading.Event(), []

    def break_after_first(event):
        bad.params.temperature = -1.0                 # sample_next refuses it at the next step
        if event.finish_reason:
            done.set()
    bad = Sequence([4, 5, 6], SamplingParams(max_tokens=20, temperature=0), break_after_first, tokenizer, 0)
    other = Sequence([7, 8], SamplingParams(max_tokens=12, temperature=0),
                     lambda event: (other_events.append(event), event.finish_reason and other_done.set()), tokenizer, 1)
    engine.start()
    try:
        engine.submit([bad, other])
        assert done.wait(20) and other_done.wait(20)
    finally:
        engine.stop()
    assert bad.finish_reason == "error"
    text, count = greedy_text(model, tokenizer, [7, 8], 12)
    assert other.finish_reason in ("stop", "length") and "".join(e.text for e in other_events) == text
    assert engine.decoder.free == 2


def test_metrics_and_one_access_log_line_per_request(server, caplog):
    with caplog.at_level(logging.INFO, logger="tinygrad_llm.serve.access"):
        with httpx.Client(base_url=server, timeout=30) as http:
            http.post("/v1/completions", json={"prompt": "secret words", "max_tokens": 3, "temperature": 0})
            http.post("/v1/completions", content=b"{bad")
            metrics = http.get("/metrics").text
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "tinygrad_llm.serve.access"]
    completions = [line for line in lines if line["path"] == "/v1/completions"]
    assert [line["status"] for line in completions] == [200, 400]
    assert completions[0]["prompt_tokens"] > 0 and completions[0]["completion_tokens"] >= 1
    assert all("secret" not in json.dumps(line) for line in lines)
    for name in ("tinygrad_llm_requests_total", "tinygrad_llm_time_to_first_token_seconds_bucket",
                 "tinygrad_llm_inter_token_seconds_bucket", "tinygrad_llm_prompt_tokens_total",
                 "tinygrad_llm_completion_tokens_total", "tinygrad_llm_active_sequences",
                 "tinygrad_llm_queued_sequences"):
        assert name in metrics, name
    assert 'route="/v1/completions",status="400"' in metrics


def test_moderation_blocks_input_and_counts_it(tiny):
    model, tokenizer = tiny
    moderator = Moderator(Blocklist(["frobnicate", "wug wug"]), "block")
    with running_server(create_app(model, tokenizer, MODEL, max_batch=2, moderator=moderator)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        blocked = client.completions.create(model=MODEL, prompt="please FR0BN1CATE now", max_tokens=5)
        assert blocked.choices[0].finish_reason == "content_filter" and blocked.choices[0].text == ""
        assert blocked.usage.completion_tokens == 0
        chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "w u g  wug"}],
                                              stream=True)
        finishes = [c.choices[0].finish_reason for c in chat if c.choices]
        assert finishes[-1] == "content_filter"
        streamed = list(client.completions.create(model=MODEL, prompt="frobnicate", max_tokens=5, stream=True))
        assert [c.choices[0].finish_reason for c in streamed] == ["content_filter"]    # nothing else queued
        fine = client.completions.create(model=MODEL, prompt="a fine prompt", max_tokens=3)
        assert fine.choices[0].finish_reason in ("stop", "length")
        metrics = httpx.get(url + "/metrics").text
        assert 'tinygrad_llm_safety_events_total{action="block",stage="input"} 3.0' in metrics


class _Words:
    """A stand-in tokenizer whose token i is words[i]: output moderation on a known text."""

    def __init__(self, words):
        self.words = words

    def decode(self, ids):
        return "".join(self.words[i] for i in ids)


@pytest.mark.parametrize("action, text, reason", [("block", "hello ", "content_filter"),
                                                  ("redact", "hello ********** world", "length")])
def test_output_moderation_judges_whole_words(action, text, reason):
    words = ["hello ", "frob", "nicate ", "world"]
    moderator = Moderator(Blocklist(["frobnicate"]), action)
    events = []
    seq = Sequence([0], SamplingParams(max_tokens=4), events.append, _Words(words), moderator=moderator)
    for token in range(4):
        if not seq.done:
            seq.advance(token, None)
    assert "".join(e.text for e in events) == text
    assert events[-1].finish_reason == reason
    assert "frob" not in "".join(e.text for e in events)


def test_serve_refuses_a_public_host_without_a_key(capsys):
    assert main(["serve", "runs/nothing", "--host", "0.0.0.0"]) == 2
    assert "without an API key" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- under load
def test_load_concurrent_streaming_clients_get_generates_answers(server, tiny):
    """48 concurrent streaming clients, 96 requests of different prompts and lengths: none lost, every
    greedy answer equal to `generate` on its own, the server alive afterwards."""
    import asyncio
    model, tokenizer = tiny
    texts = prompts(96, 20)
    lengths = [8 + (i * 7) % 17 for i in range(96)]
    expected = [greedy_text(model, tokenizer, tokenizer.encode_ordinary(t), n)[0] for t, n in zip(texts, lengths)]

    async def one(http, i):
        pieces = []
        async with http.stream("POST", "/v1/completions", json={"model": MODEL, "prompt": texts[i], "stream": True,
                                                                 "max_tokens": lengths[i], "temperature": 0}) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    pieces.append(json.loads(line[6:])["choices"][0]["text"])
                elif line == "data: [DONE]":
                    pieces.append(None)
        assert pieces[-1] is None, "the stream did not end with [DONE]"
        return "".join(pieces[:-1])

    async def run():
        limits = httpx.Limits(max_connections=48)
        async with httpx.AsyncClient(base_url=server, timeout=60, limits=limits) as http:
            semaphore = asyncio.Semaphore(48)

            async def bounded(i):
                async with semaphore:
                    return await one(http, i)
            return await asyncio.wait_for(asyncio.gather(*(bounded(i) for i in range(96))), 60)

    answers = asyncio.run(run())
    assert answers == expected
    with httpx.Client(base_url=server) as http:
        health = http.get("/health").json()
        assert health["status"] == "ok" and health["active"] == 0 and health["queued"] == 0
        assert "tinygrad_llm_decode_batch_size_bucket" in http.get("/metrics").text


def _saved_run(tmp_path, model, tokenizer):
    """A run directory as `train` leaves it: checkpoints/ and the run's own copy of the tokenizer file."""
    import hashlib
    from tinygrad_llm.checkpoint import save_checkpoint
    run = tmp_path / "run"
    run.mkdir()
    tokenizer.save(str(run / "tokenizer.json"))
    reference = {"type": "file", "path": str(run / "tokenizer.json"), "run_file": "tokenizer.json",
                 "sha256": hashlib.sha256((run / "tokenizer.json").read_bytes()).hexdigest()}
    save_checkpoint(str(run / "checkpoints"), 1, model,
                    state={"model_config": model.config.to_dict(), "tokenizer": reference})
    return str(run)


def test_serve_loads_a_run_and_quantizes_it_on_request(tmp_path, tiny):
    import argparse
    from tinygrad_llm.cli import _load
    from tinygrad_llm.cli_serve import load_model
    from tinygrad_llm.quant.runs import QuantizedModel
    model, tokenizer = tiny
    run = _saved_run(tmp_path, model, tokenizer)
    args = argparse.Namespace(checkpoint=run, best=False, device="cpu", tokenizer=None, quant=None)
    plain, state, loaded_tokenizer = load_model(args, _load)
    assert plain.config == model.config and loaded_tokenizer.encode_ordinary("hi") == tokenizer.encode_ordinary("hi")
    quantized, state, _ = load_model(argparse.Namespace(**dict(vars(args), quant="q8_0")), _load)
    assert isinstance(quantized, QuantizedModel) and state["quantized"] == "q8_0"
    prompt = prompts(1)[0]
    expected, _ = greedy_text(quantized, tokenizer, tokenizer.encode_ordinary(prompt), 10)
    with running_server(create_app(quantized, tokenizer, MODEL, max_batch=4)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        assert client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0).choices[0].text \
            == expected
    assert main(["serve", run, "--quant", "q5_k"]) == 2


def test_a_client_that_disconnects_frees_its_slot_at_once(tiny, caplog):
    """A stream abandoned after its first chunk leaves the batch at the next step (each step is slowed
    down here so that the request could not have finished on its own)."""
    import time
    model, tokenizer = tiny
    app = _slowed(create_app(model, tokenizer, MODEL, max_batch=1))
    with caplog.at_level(logging.INFO, logger="tinygrad_llm.serve.access"), running_server(app) as url:
        with httpx.Client(base_url=url, timeout=30) as http:
            with http.stream("POST", "/v1/completions", json={"prompt": "hi", "max_tokens": 60, "stream": True,
                                                              "logprobs": 0}) as response:
                next(response.iter_lines())                          # the first token arrived; now leave
            started = time.monotonic()
            while http.get("/health").json()["active"] and time.monotonic() - started < 5:
                time.sleep(0.02)
            assert http.get("/health").json()["active"] == 0
            assert app.server.engine.steps < 59                       # it left before finishing its 60 tokens
            follow_up = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
            assert follow_up.status_code == 200
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "tinygrad_llm.serve.access"]
    streamed = [line for line in lines if line["path"] == "/v1/completions"][0]
    assert streamed["completion_tokens"] < 60


def test_a_model_failure_is_a_500_and_the_server_keeps_serving(tiny):
    model, tokenizer = tiny
    app = create_app(model, tokenizer, MODEL, max_batch=2)
    decoder = app.server.engine.decoder
    real_step, calls = decoder.step, []

    def failing_once(slots, tokens):
        calls.append(len(slots))
        if len(calls) == 1:
            raise RuntimeError("the accelerator caught fire")
        return real_step(slots, tokens)
    decoder.step = failing_once
    with running_server(app) as url:
        with httpx.Client(base_url=url, timeout=30) as http:
            failed = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 5})
            assert failed.status_code == 500 and "caught fire" in failed.json()["error"]["message"]
            assert failed.json()["error"]["type"] == "server_error"
            again = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 5, "temperature": 0})
            assert again.status_code == 200 and again.json()["choices"][0]["finish_reason"] in ("stop", "length")
            assert app.server.engine.decoder.free == 2


# ---------------------------------------------------------------------------------------------- per-token work


class _ByteTokens:
    """A byte-level stand-in tokenizer whose token i is the bytes given for it (split UTF-8 characters too)."""

    def __init__(self, pieces):
        self.pieces = pieces

    def token_bytes(self, token):
        return self.pieces[token]

    def decode(self, ids):
        return b"".join(self.pieces[i] for i in ids).decode("utf-8", errors="replace")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=3), min_size=1, max_size=12), st.data())
def test_text_so_far_matches_decoding_the_whole_list(pieces, data):
    """Token by token, the text is a prefix of the whole list's decoding that lacks at most an incomplete
    character; at the end it is exactly the whole list's decoding."""
    tokenizer = _ByteTokens(pieces + ["é".encode()[:1], "é".encode()[1:], "€".encode()])
    ids = data.draw(st.lists(st.integers(0, len(tokenizer.pieces) - 1), min_size=1, max_size=20))
    text = _TextSoFar(tokenizer)
    for n in range(1, len(ids) + 1):
        so_far, whole = text.push(ids[n - 1]), tokenizer.decode(ids[:n])
        assert whole.startswith(so_far) and len(whole) - len(so_far) <= 1
    assert text.final() == tokenizer.decode(ids)


def test_text_so_far_on_the_project_tokenizers(tiny):
    _, tokenizer = tiny
    ids = tokenizer.encode_ordinary("Ay, my good lord — “quoth” he, ça va?")
    ids.append(tokenizer.special_tokens["<|endoftext|>"])
    chars = CharVocab.from_text("abc\n ")
    for vocab, sequence in ((tokenizer, ids), (chars, chars.encode("a cab\nba"))):
        text = _TextSoFar(vocab)
        for token in sequence:
            text.push(token)
        assert text.final() == vocab.decode(sequence)


def test_one_choice_per_row_as_each_sequence_alone_would_choose():
    """Greedy rows take the argmax of their own row, sampled rows their own generator's draw, and each
    logprob entry is that row's log-softmax: the same as choosing for each sequence on its own."""
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(5, 40)).astype(np.float32)
    settings_ = [SamplingParams(temperature=0), SamplingParams(temperature=0, logprobs=3),
                 SamplingParams(temperature=0.8, seed=11, logprobs=0), SamplingParams(temperature=1.0, seed=5),
                 SamplingParams(temperature=0, logprobs=1)]
    batch = [Sequence([1], params, None) for params in settings_]
    alone = [Sequence([1], params, None) for params in settings_]
    tokens, entries = _choose(batch, logits)
    for i, seq in enumerate(alone):
        (token,), (entry,) = _choose([seq], logits[i:i + 1])
        assert tokens[i] == token
        assert entries[i] == entry
        if seq.params.temperature == 0:
            assert token == int(np.argmax(logits[i]))
        if seq.params.logprobs is not None:
            assert entry[1] == pytest.approx(float(_log_softmax(logits[i])[token]), abs=1e-12)
            assert len(entry[2]) == seq.params.logprobs
        else:
            assert entry is None


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(list(range(5))), min_size=1, max_size=30),
       st.lists(st.text(alphabet="abc ", min_size=1, max_size=4), max_size=3))
def test_stop_strings_cut_the_text_where_whole_text_search_would(tokens, stops):
    """Searching only the new end of the text for stop strings finds the same first stop as searching the
    whole text; the text sent is the whole text cut before it (or all of it at max_tokens)."""
    vocab = CharVocab.from_text("abc ")
    ids = [t % 4 for t in tokens]
    events = []
    seq = Sequence([0], SamplingParams(max_tokens=len(ids), stop=tuple(stops)), events.append, vocab)
    for token in ids:
        if not seq.done:
            seq.advance(token, None)
    whole = vocab.decode(ids)
    cuts = [whole.find(s) for s in stops if s in whole]
    expected = whole[:min(cuts)] if cuts else whole
    assert "".join(e.text for e in events) == expected
    assert events[-1].finish_reason == ("stop" if cuts else "length")


def test_a_full_context_sends_the_text_held_back_for_a_stop_string():
    """The last token the context allows ends the sequence with "length" and sends everything, including
    the text held back because it could still have begun a stop string."""
    vocab = CharVocab.from_text("abxyz")
    events = []
    seq = Sequence([0], SamplingParams(max_tokens=10, stop=("xyz",)), events.append, vocab)
    for token in vocab.encode("ababx"):
        seq.advance(token, None)
    assert "".join(e.text for e in events) == "aba" and not seq.done       # "bx" might begin "xyz": held back
    seq.advance(vocab.encode("y")[0], None, context_full=True)
    assert "".join(e.text for e in events) == "ababxy" and events[-1].finish_reason == "length"
