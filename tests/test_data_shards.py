"""llm.c shard header and round trip, atomic writes, CharVocab, the document split, parallel tokenization."""
import os

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from tinygrad_llm.data import shards
from tinygrad_llm.tokenizer import CharVocab
from tinygrad_llm.data.shards import (EOT, SHARD_MAGIC, ShardError, read_header, read_shard, split_document,
                                      write_shard, write_token_shards)


def test_header_layout_matches_llm_c(tmp_path):
    path = write_shard(tmp_path / "s.bin", np.array([5, 1, 65535, 0]), vocab_size=50257)
    raw = open(path, "rb").read()
    header = np.frombuffer(raw[:1024], dtype="<i4")
    assert header[0] == SHARD_MAGIC == 20240520 and header[1] == 1 and header[2] == 4 and not header[3:].any()
    assert np.frombuffer(raw[1024:], dtype="<u2").tolist() == [5, 1, 65535, 0]
    assert len(raw) == 1024 + 2 * 4


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, 2 ** 17), max_size=300), st.booleans())
def test_round_trip_uint16_and_uint32(tmp_path_factory, tokens, mmap):
    path = tmp_path_factory.mktemp("rt") / "s.bin"
    vocab = 2 ** 17 + 1 if any(t >= 2 ** 16 for t in tokens) else 2 ** 16
    write_shard(path, np.array(tokens, dtype=np.int64), vocab_size=vocab)
    version, count, dtype = read_header(path)
    assert (version, count) == ((2 if vocab > 2 ** 16 else 1), len(tokens))
    assert read_shard(path, mmap=mmap).tolist() == tokens


def test_truncated_or_foreign_files_are_refused(tmp_path):
    path = write_shard(tmp_path / "s.bin", np.arange(100), vocab_size=100)
    with open(path, "r+b") as f:
        f.truncate(1024 + 150)
    with pytest.raises(ShardError, match="truncated"):
        read_shard(path)
    (tmp_path / "x.bin").write_bytes(b"\x00" * 2048)
    with pytest.raises(ShardError, match="magic"):
        read_shard(tmp_path / "x.bin")
    with pytest.raises(ShardError, match="out of range"):
        write_shard(tmp_path / "y.bin", np.array([70000]), vocab_size=1000)


def test_write_is_atomic(tmp_path, monkeypatch):
    def crash(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(shards.os, "fsync", crash)
    with pytest.raises(KeyboardInterrupt):
        write_shard(tmp_path / "s.bin", np.arange(10), vocab_size=10)
    assert not (tmp_path / "s.bin").exists()           # only a .tmp, never the real name


def test_char_vocab_round_trip_and_save_load(tmp_path):
    text = "First Citizen:\nBefore we proceed any further, hear me speak."
    vocab = CharVocab.from_text(text)
    assert vocab.vocab_size == len(set(text)) + 1 and vocab.eot_id == len(set(text))
    ids = vocab.encode_ordinary(text)
    assert vocab.decode(ids) == text
    assert vocab.chars == sorted(set(text))
    vocab.save(tmp_path / "vocab.json")
    again = CharVocab.load(tmp_path / "vocab.json")
    assert again.encode_ordinary(text) == ids and again.special_tokens == {EOT: vocab.eot_id}
    with pytest.raises(KeyError, match="not in the vocabulary"):
        vocab.encode_ordinary("Z")


def test_split_is_deterministic_and_near_the_fraction():
    docs = [f"document number {i}" for i in range(4000)]
    names = [split_document(d, 0.1)[0][0] for d in docs]
    assert names == [split_document(d, 0.1)[0][0] for d in reversed(docs)][::-1]
    assert 0.08 < names.count("val") / len(docs) < 0.12
    assert split_document("abcdefghij", 0.1, "tail") == [("train", "abcdefghi"), ("val", "j")]


def test_token_shards_join_documents_with_eot_and_match_across_workers(tmp_path):
    texts = [f"doc {i}: " + "abc" * (i % 7) for i in range(200)]
    vocab = CharVocab.from_text(texts)
    one = write_token_shards(texts, vocab, tmp_path / "a", prefix="t", val_fraction=0.2, shard_tokens=500, workers=1)
    two = write_token_shards(texts, vocab, tmp_path / "b", prefix="t", val_fraction=0.2, shard_tokens=500, workers=2)
    assert one == two and len(one["train"]["shards"]) > 1
    for split in ("train", "val"):
        a = np.concatenate([read_shard(tmp_path / "a" / n) for n in one[split]["shards"]])
        b = np.concatenate([read_shard(tmp_path / "b" / n) for n in two[split]["shards"]])
        assert np.array_equal(a, b) and len(a) == one[split]["tokens"]
    train = np.concatenate([read_shard(tmp_path / "a" / n) for n in one["train"]["shards"]])
    pieces = vocab.decode(train).split(EOT)
    expected = [t for t in texts if split_document(t, 0.2)[0][0] == "train"]
    assert pieces[0] == "" and pieces[1:] == expected
    assert all(len(read_shard(tmp_path / "a" / n)) == 500 for n in one["train"]["shards"][:-1])


def test_interrupted_tokenization_leaves_no_shards(tmp_path):
    vocab = CharVocab.from_text("abc")

    def docs():
        for i in range(50):
            yield "abc" * 100
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        write_token_shards(docs(), vocab, tmp_path, prefix="t", shard_tokens=1000)
    assert [n for n in os.listdir(tmp_path) if n.startswith("t_")] == []
