"""GGUF export: read back by gguf.GGUFReader, metadata and tokenizer as llama.cpp expects them, Q8_0/Q4_0
bytes equal to gguf.quants, and a NumPy Llama forward in llama.cpp's convention (adjacent-pair RoPE on
the file's permuted q/k rows, tensors dequantised by gguf.quants) against our logits.

Two checks per type. Exact: our model loaded with the file's weights (dequantised, q/k rows put back)
gives the GGUF forward's logits to 1e-5 relative, so the file says what we meant, quantized or not.
Against the original weights: the root-mean-square logit error relative to the root-mean-square logit
stays below f32 1e-5, f16 5e-3, q8_0 6e-2, q4_0 6e-1. These bounds are for the test's random model,
whose sharp attention amplifies weight error (measured worst over 3 seeds: f16 1.2e-3, q8_0 3.3e-2,
q4_0 4.3e-1); docs/export.md states them, and the weights' own error bounds are in quant/formats.py."""
from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

gguf = pytest.importorskip("gguf")

from test_export import MULTILINGUAL, WITH_SPECIALS, numpy_llama, our_logits, small_model, train_tokenizer  # noqa: E402
from text_sample import SHAKESPEARE  # noqa: E402
from tinygrad_llm.data.shards import CharVocab  # noqa: E402
from tinygrad_llm.export import (ExportError, export_gguf, rope_rows_from_gguf, rope_rows_to_gguf,  # noqa: E402
                                 tokenizer_json)
from tinygrad_llm.export.hf_tokenizer import byte_level_text  # noqa: E402
from tinygrad_llm.tokenizer import CHAT_TEMPLATE, GPT2_PATTERN, Tokenizer  # noqa: E402

LOGIT_BOUNDS = {"f32": 1e-5, "f16": 5e-3, "q8_0": 6e-2, "q4_0": 6e-1}
GGUF_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
              "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}


def gguf_name(name: str) -> str:
    """llama.cpp's tensor name for one of ours, spelled out here independently of gguf's name map."""
    if name in GGUF_NAMES:
        return GGUF_NAMES[name]
    _, _, layer, rest = name.split(".", 3)                      # model.layers.N.<part>.weight
    return f"blk.{layer}.{GGUF_NAMES[rest[:-len('.weight')]]}.weight"


@pytest.fixture(scope="module")
def bpe():
    return train_tokenizer()


def read(path):
    reader = gguf.GGUFReader(str(path))
    fields = {name: field.contents() for name, field in reader.fields.items()}
    tensors = {}
    for tensor in reader.tensors:
        data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        shape = tuple(int(n) for n in reversed(tensor.shape))          # ggml lists the fastest axis first
        tensors[tensor.name] = (np.asarray(data, dtype=np.float32).reshape(shape), tensor)
    return fields, tensors


def adjacent_pair_rope(x, theta):
    """llama.cpp's RoPE for the llama architecture on (heads, T, D): dimensions 2i and 2i + 1 rotate."""
    time, dim = x.shape[1], x.shape[2]
    frequencies = theta ** (-np.arange(0, dim, 2) / dim)                       # (D/2,)
    angles = np.arange(time)[:, None] * frequencies[None, :]                   # (T, D/2)
    even, odd = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = even * np.cos(angles) - odd * np.sin(angles)
    out[..., 1::2] = even * np.sin(angles) + odd * np.cos(angles)
    return out


def gguf_forward(fields, tensors, ids):
    config = {"num_attention_heads": fields["llama.attention.head_count"],
              "num_key_value_heads": fields["llama.attention.head_count_kv"],
              "rms_norm_eps": fields["llama.attention.layer_norm_rms_epsilon"],
              "rope_theta": fields["llama.rope.freq_base"], "num_hidden_layers": fields["llama.block_count"],
              "tie_word_embeddings": "output.weight" not in tensors}
    weights = {name: array for name, (array, _) in tensors.items()}
    return numpy_llama(weights, config, ids, rope=adjacent_pair_rope, names=gguf_name)


@pytest.mark.parametrize("kind", ["f32", "f16", "q8_0", "q4_0"])
def test_gguf_forward_matches_our_logits(bpe, tmp_path, kind):
    model = small_model(bpe.vocab_size, tie=kind == "q4_0")
    path = tmp_path / f"model-{kind}.gguf"
    export_gguf(model, bpe, str(path), kind)
    fields, tensors = read(path)
    ids = bpe.encode(WITH_SPECIALS, allowed_special="all")[:48]
    ours, theirs = our_logits(model, ids), gguf_forward(fields, tensors, ids)
    assert np.abs(ours).max() > 1.0
    rms = lambda x: float(np.sqrt(np.mean(x * x)))
    error = rms(ours - theirs) / rms(ours)
    assert error <= LOGIT_BOUNDS[kind]
    if kind != "f32":
        assert error > 1e-5                                                   # really rounded
    config, stored = model.config, {gguf_name(name): name for name in model.state_dict()}
    loaded = {}
    for name, (array, _) in tensors.items():
        if stored[name].endswith("q_proj.weight"):
            array = rope_rows_from_gguf(array, config.n_heads)
        elif stored[name].endswith("k_proj.weight"):
            array = rope_rows_from_gguf(array, config.n_kv_heads)
        loaded[stored[name]] = array
    model.load_state_dict(loaded)
    np.testing.assert_allclose(our_logits(model, ids), theirs, rtol=1e-5, atol=1e-5 * np.abs(theirs).max())
    types = {name: tensor.tensor_type.name for name, (_, tensor) in tensors.items()}
    assert types["output_norm.weight"] == "F32" and types["blk.0.attn_norm.weight"] == "F32"
    assert types["blk.1.ffn_down.weight"] == {"f32": "F32", "f16": "F16", "q8_0": "Q8_0", "q4_0": "Q4_0"}[kind]


@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
def test_quantized_blocks_are_gguf_quants_bytes(bpe, tmp_path, kind):
    model = small_model(bpe.vocab_size)
    path = tmp_path / "model.gguf"
    export_gguf(model, bpe, str(path), kind)
    reader = gguf.GGUFReader(str(path))
    stored = {tensor.name: tensor for tensor in reader.tensors}
    qtype = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}[kind]
    config = model.config
    for name, array in model.state_dict().items():
        if array.ndim != 2:
            continue
        if name.endswith("q_proj.weight"):
            array = rope_rows_to_gguf(array, config.n_heads)
        elif name.endswith("k_proj.weight"):
            array = rope_rows_to_gguf(array, config.n_kv_heads)
        expected = gguf.quants.quantize(np.asarray(array, dtype=np.float32), qtype)
        assert np.array_equal(np.asarray(stored[gguf_name(name)].data).reshape(expected.shape), expected), name


def test_rope_row_permutation_is_llama_cpps_and_undoes(bpe):
    rows = np.arange(2 * 8)[:, None] * np.ones((1, 3))                          # 2 heads of D = 8
    permuted = rope_rows_to_gguf(rows, 2)
    assert permuted[:8, 0].tolist() == [0, 4, 1, 5, 2, 6, 3, 7]                 # i and i + D/2 side by side
    assert permuted[8:, 0].tolist() == [8, 12, 9, 13, 10, 14, 11, 15]
    assert np.array_equal(rope_rows_from_gguf(permuted, 2), rows)


@given(st.integers(1, 4), st.integers(1, 8), st.integers(1, 3))
def test_rope_row_permutation_round_trips(heads, half, columns):
    rows = np.random.default_rng(heads * 100 + half).standard_normal((heads * 2 * half, columns))
    permuted = rope_rows_to_gguf(rows, heads)
    assert np.array_equal(rope_rows_from_gguf(permuted, heads), rows)
    head = permuted[:2 * half]                                   # head 0: pairs (i, i + D/2) interleaved
    assert np.array_equal(head[0::2], rows[:half]) and np.array_equal(head[1::2], rows[half:2 * half])


def test_gguf_metadata_and_tokenizer(bpe, tmp_path):
    model = small_model(bpe.vocab_size)
    path = tmp_path / "model.gguf"
    export_gguf(model, bpe, str(path), "f16", name="tiny", license_id="mit")
    fields, tensors = read(path)
    config = model.config
    assert fields["general.architecture"] == "llama" and fields["general.name"] == "tiny"
    assert fields["general.license"] == "mit" and fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    assert fields["llama.context_length"] == config.max_seq_len and fields["llama.embedding_length"] == 64
    assert fields["llama.feed_forward_length"] == 96 and fields["llama.block_count"] == 2
    assert fields["llama.attention.head_count_kv"] == 2 and fields["llama.rope.dimension_count"] == 16
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "llama-bpe"
    assert fields["tokenizer.chat_template"] == CHAT_TEMPLATE
    specials = bpe.special_tokens
    assert fields["tokenizer.ggml.eos_token_id"] == specials["<|endoftext|>"]
    assert fields["tokenizer.ggml.eot_token_id"] == specials["<|end|>"]
    assert fields["tokenizer.ggml.add_bos_token"] is False
    hf = tokenizer_json(bpe)                       # the same byte-level strings and merges as tokenizer.json
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert len(tokens) == config.vocab_size and fields["tokenizer.ggml.merges"] == hf["model"]["merges"]
    for text, token_id in hf["model"]["vocab"].items():
        assert tokens[token_id] == text and types[token_id] == gguf.TokenType.NORMAL
    for name, token_id in specials.items():
        assert tokens[token_id] == name and types[token_id] == gguf.TokenType.CONTROL
    assert tensors["token_embd.weight"][0].shape == (config.vocab_size, 64)


def test_gguf_pads_the_vocabulary_to_the_embedding_rows(bpe, tmp_path):
    model = small_model(bpe.vocab_size + 3)                     # a model with spare rows
    export_gguf(model, bpe, str(tmp_path / "model.gguf"), "f32")
    fields, _ = read(tmp_path / "model.gguf")
    assert fields["tokenizer.ggml.tokens"][-3:] == [f"[PAD{bpe.vocab_size + i}]" for i in range(3)]
    assert fields["tokenizer.ggml.token_type"][-1] == gguf.TokenType.UNUSED


def merge_list_bpe(symbols, ranks):
    """A merge-list BPE as llama.cpp runs it on one pre-token: join the adjacent pair of lowest rank, the
    leftmost on ties, until no listed pair is left."""
    symbols = list(symbols)
    while True:
        found = [(ranks[pair], i) for i, pair in enumerate(zip(symbols, symbols[1:])) if pair in ranks]
        if not found:
            return symbols
        _, i = min(found)
        symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]


def gguf_encode(fields, pieces):
    tokens = {text: token_id for token_id, text in enumerate(fields["tokenizer.ggml.tokens"])}
    ranks = {tuple(merge.split(" ")): rank for rank, merge in enumerate(fields["tokenizer.ggml.merges"])}
    ids = []
    for piece in pieces:
        text = byte_level_text(piece.encode("utf-8"))
        ids += [tokens[text]] if text in tokens else [tokens[s] for s in merge_list_bpe(text, ranks)]
    return ids


def test_gguf_vocabulary_encodes_as_ours(bpe, tmp_path):
    export_gguf(small_model(bpe.vocab_size), bpe, str(tmp_path / "model.gguf"), "f32")
    fields, _ = read(tmp_path / "model.gguf")
    import regex
    for text in (MULTILINGUAL, SHAKESPEARE[:2000]):
        assert gguf_encode(fields, regex.findall(bpe.pattern, text)) == bpe.encode(text)


def test_char_vocabulary_is_a_bpe_of_bytes_joined_into_characters(tmp_path):
    vocab = CharVocab.from_text(SHAKESPEARE + MULTILINGUAL + "£€", special_tokens=("<|endoftext|>",))
    export_gguf(small_model(vocab.vocab_size), vocab, str(tmp_path / "model.gguf"), "f32")
    fields, _ = read(tmp_path / "model.gguf")
    tokens = fields["tokenizer.ggml.tokens"]
    assert tokens[vocab.stoi["£"]] == "Â£" and "Â £" in fields["tokenizer.ggml.merges"]
    text = MULTILINGUAL + "£€" + SHAKESPEARE[:300]
    assert gguf_encode(fields, text) == vocab.encode(text)          # one piece per character


def test_ascii_char_vocabulary_is_a_bpe_without_merges(tmp_path):
    vocab = CharVocab.from_text(SHAKESPEARE, special_tokens=("<|endoftext|>",))
    model = small_model(vocab.vocab_size)
    export_gguf(model, vocab, str(tmp_path / "model.gguf"), "f32")
    fields, _ = read(tmp_path / "model.gguf")
    tokens = fields["tokenizer.ggml.tokens"]
    assert tokens[vocab.stoi[" "]] == "Ġ" and tokens[vocab.stoi["\n"]] == "Ċ" and tokens[vocab.stoi["a"]] == "a"
    assert tokens[vocab.eot_id] == "<|endoftext|>"
    merges = fields["tokenizer.ggml.merges"]
    assert len(merges) == 1 and all(len(part) > 1 for part in merges[0].split(" "))   # can never apply


def test_what_gguf_cannot_express_is_refused(bpe, tmp_path):
    vocab = CharVocab.from_text(MULTILINGUAL, special_tokens=())
    with pytest.raises(ExportError, match="without <|endoftext|>"):
        export_gguf(small_model(vocab.vocab_size), vocab, str(tmp_path / "a.gguf"))
    custom = Tokenizer(bpe.merges, r"\w+|\s+|[^\w\s]+|.", {"<|endoftext|>": bpe.vocab_size})
    with pytest.raises(ExportError, match="custom split pattern"):
        export_gguf(small_model(custom.vocab_size), custom, str(tmp_path / "b.gguf"))
    with pytest.raises(ExportError, match="unknown GGUF type"):
        export_gguf(small_model(bpe.vocab_size), bpe, str(tmp_path / "c.gguf"), "q5_k")
    assert not list(tmp_path.iterdir())
    gpt2 = train_tokenizer(GPT2_PATTERN, 400)
    export_gguf(small_model(gpt2.vocab_size), gpt2, str(tmp_path / "d.gguf"), "f32")
    assert read(tmp_path / "d.gguf")[0]["tokenizer.ggml.pre"] == "gpt-2"


def test_an_interrupted_write_leaves_no_file(bpe, tmp_path, monkeypatch):
    model = small_model(bpe.vocab_size)
    path = tmp_path / "model.gguf"

    def fail(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", fail)
    with pytest.raises(KeyboardInterrupt):
        export_gguf(model, bpe, str(path), "q8_0")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    export_gguf(model, bpe, str(path), "q8_0")
    with pytest.raises(ExportError, match="already exists; pass --force"):
        export_gguf(model, bpe, str(path), "f16")
    json.dumps(read(path)[0]["tokenizer.ggml.pre"])
