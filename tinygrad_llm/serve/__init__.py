"""`tinygrad-llm serve`: an OpenAI-compatible HTTP server with continuous batching, metrics and moderation.

    decoder.py   KV slots, prefill and one decode step over many sequences: the only code that runs the model
    engine.py    the scheduler thread: continuous batching, sampling, stop strings, output moderation
    chat.py      chat messages -> prompt ids in the project's chat template
    metrics.py   the Prometheus metrics
    app.py       the Starlette app: the API routes, errors, the API key, limits, the access log
    page.html    the chat page served at /

Needs the `serve` extra (starlette, uvicorn, prometheus-client); the blocklist needs the `moderation`
extra (better-profanity's word list). `create_app` is the entry point; the command line is cli_serve.py.
"""


def create_app(*args, **kwargs):
    """See tinygrad_llm.serve.app.create_app (imported on call: the package imports without Starlette)."""
    from .app import create_app as create
    return create(*args, **kwargs)
