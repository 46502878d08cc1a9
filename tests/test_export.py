"""Hugging Face export: tokenizer.json read by `tokenizers`, the chat template rendered by Jinja, and the
weights checked by a NumPy Llama forward written here from config.json + model.safetensors.

No network, no GPU. transformers is used only where it is installed (CI does not install it)."""
from __future__ import annotations

import functools
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from text_sample import SHAKESPEARE
from tinygrad_llm.data.shards import CharVocab
from tinygrad_llm.export import ExportError, export_hf, tokenizer_from_hf_json, tokenizer_json
from tinygrad_llm.model import GPT, GPTConfig
from tinygrad_llm.tokenizer import CHAT_SPECIAL_TOKENS, CHAT_TEMPLATE, GPT2_PATTERN, GPT4_PATTERN, Tokenizer

MULTILINGUAL = ("Héllo wörld! Ça va? 你好，世界。 Привет, мир! Γειά σου κόσμε. こんにちは 🙂🙃 नमस्ते\n"
                "it's 12345 678 don't WE'LL\n\n  tabs\tand  spaces   \r\n trailing  ")
WITH_SPECIALS = ("<|system|>\nBe brief.<|end|>\n<|user|>\nWie geht's? 你好<|end|>\n<|assistant|>\nGut 🙂<|end|>\n"
                 "<|endoftext|>First Citizen:<|endoftext|><|endoftext|>")


@functools.lru_cache(maxsize=None)
def train_tokenizer(pattern=GPT4_PATTERN, vocab_size=700):
    """A small BPE with the chat special tokens (trained once per pattern and size; never mutated)."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")              # the small corpus may run out of pairs
        return Tokenizer.train(SHAKESPEARE + MULTILINGUAL * 4, vocab_size, list(CHAT_SPECIAL_TOKENS), pattern)


@pytest.fixture(scope="module")
def bpe():
    return train_tokenizer()


def small_model(vocab_size, tie=False, kv_heads=2, seed=0):
    """A fresh model with random weights larger than the init's, so that logits are far from uniform."""
    model = GPT(GPTConfig(vocab_size=vocab_size, d_model=64, n_layers=2, n_heads=4, n_kv_heads=kv_heads,
                          ffn_hidden=96, max_seq_len=48, tie_embeddings=tie, rope_theta=500.0))
    generator = np.random.default_rng(seed)
    model.load_state_dict({name: ((1.0 if name.endswith("norm.weight") else 0.0)
                                  + (0.3 if name.endswith("norm.weight") else 0.15) * generator.standard_normal(array.shape))
                           .astype(np.float32) for name, array in model.state_dict().items()})
    return model


def our_logits(model, ids):
    return np.asarray(model(np.asarray([ids]), return_logits=True).data, dtype=np.float64)[0]


# ------------------------------------------------------------------------------------- tokenizer.json
@pytest.mark.parametrize("pattern", [GPT4_PATTERN, GPT2_PATTERN])
def test_tokenizers_library_gives_our_ids(pattern):
    tokenizers = pytest.importorskip("tokenizers")
    ours = train_tokenizer(pattern)
    theirs = tokenizers.Tokenizer.from_str(json.dumps(tokenizer_json(ours)))
    texts = [MULTILINGUAL, WITH_SPECIALS, SHAKESPEARE[:4000], " ", "\n\n\n", "a  \n  b\r\n\r\nc   "]
    for text in texts:
        ids = ours.encode(text, allowed_special="all")
        assert theirs.encode(text, add_special_tokens=False).ids == ids
        assert theirs.decode(ids, skip_special_tokens=False) == text


_HF_CACHE = {}


@settings(max_examples=60)
@given(st.lists(st.one_of(st.text(), st.sampled_from(CHAT_SPECIAL_TOKENS), st.sampled_from(MULTILINGUAL.split(" ")),
                          st.text(alphabet=" \t\n\r'sdmtlvre0123456789aZ.,!?", max_size=12)), max_size=8))
def test_tokenizers_library_gives_our_ids_on_any_text(parts):
    tokenizers = pytest.importorskip("tokenizers")
    if "bpe" not in _HF_CACHE:
        ours = train_tokenizer()
        _HF_CACHE["bpe"] = ours, tokenizers.Tokenizer.from_str(json.dumps(tokenizer_json(ours)))
    ours, theirs = _HF_CACHE["bpe"]
    text = "".join(parts)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return                                            # lone surrogates: no UTF-8, refused by both
    assert theirs.encode(text, add_special_tokens=False).ids == ours.encode(text, allowed_special="all")


def test_tokenizers_library_reads_a_char_vocabulary():
    tokenizers = pytest.importorskip("tokenizers")
    vocab = CharVocab.from_text(SHAKESPEARE + MULTILINGUAL, special_tokens=("<|endoftext|>",))
    theirs = tokenizers.Tokenizer.from_str(json.dumps(tokenizer_json(vocab)))
    text = "<|endoftext|>" + MULTILINGUAL + "<|endoftext|>" + SHAKESPEARE[:500]
    expected = [vocab.eot_id] + vocab.encode(MULTILINGUAL) + [vocab.eot_id] + vocab.encode(SHAKESPEARE[:500])
    assert theirs.encode(text, add_special_tokens=False).ids == expected
    assert theirs.decode(expected, skip_special_tokens=False) == text


def test_tokenizer_json_reads_back_to_the_same_tokenizer(bpe):
    assert tokenizer_from_hf_json(json.loads(json.dumps(tokenizer_json(bpe)))) == bpe
    vocab = CharVocab.from_text(MULTILINGUAL, special_tokens=("<|endoftext|>", "<|end|>"))
    back = tokenizer_from_hf_json(json.loads(json.dumps(tokenizer_json(vocab))))
    assert back.chars == vocab.chars and back.special_tokens == vocab.special_tokens


def test_tokenizer_json_we_cannot_reproduce_is_refused(bpe):
    content = tokenizer_json(bpe)
    content["model"]["merges"] = content["model"]["merges"][::-1]           # not in rank order
    with pytest.raises(ValueError, match="not ordered"):
        tokenizer_from_hf_json(content)
    content = tokenizer_json(bpe)
    content["normalizer"] = {"type": "NFC"}
    with pytest.raises(ValueError, match="normalizer"):
        tokenizer_from_hf_json(content)


def _mutations():
    """A tokenizer.json with one field replaced, deleted or given another JSON type."""
    values = st.one_of(st.none(), st.booleans(), st.integers(-3, 1000), st.text(max_size=6), st.just([]), st.just({}),
                       st.just([["a", "b"]]), st.just({"type": "ByteLevel"}))
    paths = st.sampled_from([("model",), ("model", "type"), ("model", "vocab"), ("model", "merges"),
                             ("pre_tokenizer",), ("pre_tokenizer", "pretokenizers"), ("added_tokens",),
                             ("normalizer",), ("model", "merges", 0), ("model", "vocab", "a"), ("added_tokens", 0)])
    return st.tuples(paths, st.one_of(values, st.just("<delete>")))


@settings(max_examples=80)
@given(st.lists(_mutations(), min_size=1, max_size=3))
def test_a_mutated_tokenizer_json_reads_back_or_is_refused(mutations):
    content = json.loads(json.dumps(tokenizer_json(train_tokenizer(GPT4_PATTERN, 300))))
    for path, value in mutations:
        parent = content
        for key in path[:-1]:
            parent = parent.get(key) if isinstance(parent, dict) else (
                parent[key] if isinstance(parent, list) and isinstance(key, int) and key < len(parent) else None)
        key = path[-1]
        if isinstance(parent, dict) or (isinstance(parent, list) and isinstance(key, int) and key < len(parent)):
            if value == "<delete>":
                del parent[key]
            else:
                parent[key] = value
    try:
        back = tokenizer_from_hf_json(content)
    except ValueError:
        return                                                   # refused, with a message
    assert isinstance(back, (Tokenizer, CharVocab))


# ------------------------------------------------------------------------------------- the chat template
def chat_ids(tokenizer, messages, add_generation_prompt):
    """The ids of the project's chat format, built turn by turn from its definition (tokenizer.py):
    role token, newline + content, <|end|>, newline; "<|assistant|>\\n" to prompt a reply."""
    special = tokenizer.special_tokens
    ids = []
    for message in messages:
        ids += [special[f"<|{message['role']}|>"]] + tokenizer.encode_ordinary("\n" + message["content"])
        ids += [special["<|end|>"]] + tokenizer.encode_ordinary("\n")
    if add_generation_prompt:
        ids += [special["<|assistant|>"]] + tokenizer.encode_ordinary("\n")
    return ids


@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_jinja_renders_the_chat_template_to_our_ids(bpe, tmp_path, add_generation_prompt):
    jinja2 = pytest.importorskip("jinja2")
    export_hf(small_model(bpe.vocab_size), bpe, str(tmp_path))
    config = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["chat_template"] == CHAT_TEMPLATE
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Wie geht's? 你好\nZwei Zeilen."},
                {"role": "assistant", "content": "Gut 🙂"}, {"role": "user", "content": "Und dann?"}]
    text = jinja2.Environment().from_string(config["chat_template"]).render(
        messages=messages, add_generation_prompt=add_generation_prompt, bos_token=config["bos_token"])
    expected = chat_ids(bpe, messages, add_generation_prompt)
    assert bpe.encode(text, allowed_special="all") == expected
    ids, assistant_mask = bpe.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert list(ids) == expected and len(assistant_mask) == len(ids)
    tokenizers = pytest.importorskip("tokenizers")
    theirs = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert theirs.encode(text, add_special_tokens=False).ids == expected


def test_special_token_files(bpe, tmp_path):
    export_hf(small_model(bpe.vocab_size), bpe, str(tmp_path))
    eot, end = bpe.special_tokens["<|endoftext|>"], bpe.special_tokens["<|end|>"]
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["bos_token"] == config["eos_token"] == config["pad_token"] == "<|endoftext|>"
    assert config["add_bos_token"] is False
    assert set(config["added_tokens_decoder"]) == {str(i) for i in bpe.special_tokens.values()}
    special_map = json.loads((tmp_path / "special_tokens_map.json").read_text())
    assert special_map["eos_token"] == "<|endoftext|>" and "<|user|>" in special_map["additional_special_tokens"]
    generation = json.loads((tmp_path / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [eot, end] and generation["bos_token_id"] == eot
    hf = json.loads((tmp_path / "config.json").read_text())
    assert hf["eos_token_id"] == eot and hf["vocab_size"] == bpe.vocab_size


def test_a_vocabulary_without_chat_tokens_gets_no_template(tmp_path):
    vocab = CharVocab.from_text(SHAKESPEARE)
    export_hf(small_model(vocab.vocab_size), vocab, str(tmp_path))
    assert "chat_template" not in json.loads((tmp_path / "tokenizer_config.json").read_text())


# ------------------------------------------------------------------------------------- the weights
def rms_norm(x, weight, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * weight


def rotate_half_rope(x, theta):
    """Hugging Face Llama's RoPE on (heads, T, D): dimension i pairs with i + D/2."""
    time, dim = x.shape[1], x.shape[2]
    frequencies = theta ** (-np.arange(0, dim, 2) / dim)                          # (D/2,)
    angles = np.arange(time)[:, None] * frequencies[None, :]                      # (T, D/2)
    cos, sin = np.concatenate([np.cos(angles)] * 2, -1), np.concatenate([np.sin(angles)] * 2, -1)
    rotated = np.concatenate([-x[..., dim // 2:], x[..., :dim // 2]], -1)
    return x * cos + rotated * sin


def numpy_llama(weights, config, ids, rope=rotate_half_rope, names=None):
    """Logits (T, V) of a Llama decoder in float64 from weights named as `names` maps our names."""
    name = names or (lambda n: n)
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    eps, theta = config["rms_norm_eps"], config["rope_theta"]
    get = lambda n: np.asarray(weights[name(n)], dtype=np.float64)
    x = get("model.embed_tokens.weight")[ids]                                     # (T, C)
    time, channels = x.shape
    dim = channels // heads
    mask = np.triu(np.full((time, time), -np.inf), 1)
    for layer in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{layer}."
        h = rms_norm(x, get(prefix + "input_layernorm.weight"), eps)
        q = (h @ get(prefix + "self_attn.q_proj.weight").T).reshape(time, heads, dim).transpose(1, 0, 2)
        k = (h @ get(prefix + "self_attn.k_proj.weight").T).reshape(time, kv_heads, dim).transpose(1, 0, 2)
        v = (h @ get(prefix + "self_attn.v_proj.weight").T).reshape(time, kv_heads, dim).transpose(1, 0, 2)
        q, k = rope(q, theta), rope(k, theta)                                     # (H, T, D), (Hkv, T, D)
        k, v = np.repeat(k, heads // kv_heads, 0), np.repeat(v, heads // kv_heads, 0)
        scores = q @ k.transpose(0, 2, 1) / math.sqrt(dim) + mask                # (H, T, T)
        probabilities = np.exp(scores - scores.max(-1, keepdims=True))
        probabilities /= probabilities.sum(-1, keepdims=True)
        attended = (probabilities @ v).transpose(1, 0, 2).reshape(time, channels)  # (H, T, D) -> (T, C)
        x = x + attended @ get(prefix + "self_attn.o_proj.weight").T
        h = rms_norm(x, get(prefix + "post_attention_layernorm.weight"), eps)
        gate, up = h @ get(prefix + "mlp.gate_proj.weight").T, h @ get(prefix + "mlp.up_proj.weight").T
        x = x + (gate / (1 + np.exp(-gate)) * up) @ get(prefix + "mlp.down_proj.weight").T
    head = "model.embed_tokens.weight" if config["tie_word_embeddings"] else "lm_head.weight"
    return rms_norm(x, get("model.norm.weight"), eps) @ get(head).T


@pytest.mark.parametrize("tie, kv_heads", [(False, 2), (True, 4)])
def test_hf_layout_matches_a_numpy_llama(bpe, tmp_path, tie, kv_heads):
    from safetensors.numpy import load_file
    model = small_model(bpe.vocab_size, tie, kv_heads)
    export_hf(model, bpe, str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    weights = load_file(str(tmp_path / "model.safetensors"))
    assert ("lm_head.weight" in weights) == (not tie)
    ids = bpe.encode(WITH_SPECIALS, allowed_special="all")[:48]
    ours, reference = our_logits(model, ids), numpy_llama(weights, config, ids)
    assert np.abs(reference).max() > 1.0                                          # not a degenerate model
    np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-5 * np.abs(reference).max())


def test_export_refuses_a_non_empty_directory_and_a_missing_tokenizer(bpe, tmp_path):
    model = small_model(bpe.vocab_size)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="not empty; pass --force"):
        export_hf(model, bpe, str(tmp_path))
    export_hf(model, bpe, str(tmp_path), force=True)
    assert (tmp_path / "notes.txt").read_text() == "mine" and (tmp_path / "tokenizer.json").is_file()
    with pytest.raises(ExportError, match="no tokenizer"):
        export_hf(model, None, str(tmp_path / "other"))
