"""Shared by the server's tests and its benchmark: a tiny random-weight model with a chat-ready BPE
tokenizer, and a real uvicorn server on a free loopback port, in a background thread."""
from __future__ import annotations

import contextlib
import socket
import threading
import time

from text_sample import SHAKESPEARE

from tinygrad_llm import manual_seed
from tinygrad_llm.model import GPT, GPTConfig
from tinygrad_llm.tokenizer import CHAT_SPECIAL_TOKENS, Tokenizer


def tiny_model_and_tokenizer(max_seq_len=64, d_model=32, n_layers=2, seed=0):
    """A BPE tokenizer (320 ids, the chat special tokens included) and a random GPT whose weights are
    scaled up so that its logits differ clearly between tokens (greedy choices are not near-ties)."""
    tokenizer = Tokenizer.train(SHAKESPEARE, 320, special_tokens=list(CHAT_SPECIAL_TOKENS))
    manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, d_model=d_model, n_layers=n_layers, n_heads=4,
                          n_kv_heads=2, ffn_hidden=2 * d_model, max_seq_len=max_seq_len)).eval()
    for parameter in model.parameters():
        parameter.data *= 4
    return model, tokenizer


@contextlib.contextmanager
def running_server(app, timeout=10.0):
    """Serve `app` with uvicorn on 127.0.0.1 (a port picked by the OS); yield its base URL."""
    import uvicorn
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()
