"""Fuzzing every file the project reads: a mutated file either loads to the same result or fails with
the documented exception (CheckpointError, or a ValueError such as ShardError / TokenizerFileError),
which the CLI prints as one line with exit status 1 — never another exception, never a silent change.

Files: checkpoint state.json (edited as is, and "crafted": edited then resealed with a valid
state_sha256, so the field checks behind the seal are reached), the safetensors header (with the
recorded sha256 updated, so the parser is reached), latest.json, vocab.json, BPE tokenizer files,
shard headers, TOML configs. The loaders run in-process; two CLI runs in a subprocess check the line.
"""
from __future__ import annotations

import copy
import json
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from text_sample import SHAKESPEARE
from tinygrad_llm import rng as global_rng
from tinygrad_llm.checkpoint import (CheckpointError, load_checkpoint, resolve_checkpoint, seal_state,
                                     tokenizer_from_state, write_safetensors)
from tinygrad_llm.data.feed import RandomWindows, build_data
from tinygrad_llm.data.shards import read_shard, write_shard
from tinygrad_llm.model import GPT, GPTConfig
from tinygrad_llm.optim import AdamW
from tinygrad_llm.tokenizer import CharVocab, Tokenizer, load_tokenizer, tokenizer_fingerprint
from tinygrad_llm.train import TrainConfig, resume_training, train
from tinygrad_llm.train_config import config_from_dict, load_toml

EXPECTED = (CheckpointError, ValueError)
FUZZ = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", 40)), deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                       HealthCheck.function_scoped_fixture])
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6)


def _paths(node, prefix=()):
    """Every (container, key) of a JSON tree, depth first."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in items:
        yield prefix + (key,)
        yield from _paths(child, prefix + (key,))


@st.composite
def json_mutation(draw, document):
    """A copy of `document` with one value (any of the tree's, chosen uniformly) removed, replaced by an
    arbitrary JSON value, or edited keeping its type."""
    document = copy.deepcopy(document)
    paths = list(_paths(document))
    if not paths or draw(st.integers(0, 19)) == 0:
        return draw(json_values)
    path = paths[draw(st.integers(0, len(paths) - 1))]
    node = document
    for key in path[:-1]:
        node = node[key]
    key, choice = path[-1], draw(st.integers(0, 2))
    if isinstance(node, dict) and choice == 0:
        del node[key]
    elif choice == 1:
        node[key] = draw(tweaked(node[key]))
    else:
        node[key] = draw(json_values)
    return document


def tweaked(value):
    """A plausible edit of `value` that keeps its type: what a hand edit or a bit flip in a number does."""
    if isinstance(value, bool):
        return st.just(not value)
    if isinstance(value, int):
        return st.sampled_from([value + 1, value - 1, 2 * value, -value, 0])
    if isinstance(value, float):
        return st.sampled_from([value * 2, value / 2, value + 0.25, -value, 0.0, 0.5])
    if isinstance(value, str):
        return st.sampled_from([value[:-1], value + "x", value[::-1], value.upper(), ""])
    return json_values


@st.composite
def byte_mutation(draw, data, limit=None):
    """`data` with bytes overwritten, inserted, deleted or cut off (within the first `limit` bytes)."""
    data = bytearray(data)
    span = min(len(data), limit or len(data))
    kind = draw(st.sampled_from(["overwrite", "insert", "delete", "truncate"]))
    at = draw(st.integers(0, max(span - 1, 0)))
    if kind == "overwrite":
        piece = draw(st.binary(min_size=1, max_size=4))
        data[at:at + len(piece)] = piece
    elif kind == "insert":
        data[at:at] = draw(st.binary(min_size=1, max_size=4))
    elif kind == "delete":
        del data[at:at + draw(st.integers(1, 4))]
    else:
        del data[at:]
    return bytes(data)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    text = root / "text.txt"
    text.write_text(SHAKESPEARE * 3, encoding="utf-8")
    run = root / "run"
    train(TrainConfig(data=str(text), out_dir=str(run), d_model=16, n_layers=1, n_heads=2, ffn_hidden=32,
                      batch_size=2, seq_len=8, max_steps=2, warmup_steps=1, eval_interval=2, eval_iters=1,
                      log_interval=1, progress=False, seed=0), log=lambda message: None)
    tokenizer = Tokenizer.train(SHAKESPEARE, vocab_size=280, special_tokens=["<|endoftext|>"])
    tokenizer.save(str(root / "bpe.json"))
    shards = root / "shards"
    shards.mkdir()
    vocab = CharVocab.from_text(SHAKESPEARE)
    vocab.save(shards / "vocab.json")
    ids = np.asarray(vocab.encode_ordinary(SHAKESPEARE))
    write_shard(shards / "d_train_000000.bin", ids[:2000], vocab.vocab_size)
    write_shard(shards / "d_val_000000.bin", ids[2000:], vocab.vocab_size)
    return {"root": root, "run": run, "checkpoint": resolve_checkpoint(str(run)), "bpe": root / "bpe.json",
            "shards": shards, "text": text}


def copy_run(files, into):
    run = os.path.join(into, "run")
    shutil.copytree(files["run"], run)
    return run, os.path.join(resolve_checkpoint(run))


def loaded(run):
    """What sample/eval/export see: the weights, the model config and the tokenizer."""
    model, state = load_checkpoint(run)
    tokenizer = tokenizer_from_state(state, state["directory"])
    return model.config.to_dict(), model.state_dict(), tokenizer_fingerprint(tokenizer)


def same(a, b):
    return a[0] == b[0] and a[2] == b[2] and a[1].keys() == b[1].keys() and all(
        np.array_equal(a[1][k], b[1][k]) for k in a[1])


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------------- state.json
@FUZZ
@given(data=st.data())
def test_state_json_edited_in_place(files, data):
    original = loaded(str(files["run"]))
    with tempfile.TemporaryDirectory() as tmp:
        run, directory = copy_run(files, tmp)
        path = os.path.join(directory, "state.json")
        raw = open(path, "rb").read()
        if data.draw(st.booleans()):
            mutated = data.draw(byte_mutation(raw))
        else:
            mutated = json.dumps(data.draw(json_mutation(json.loads(raw)))).encode()
        open(path, "wb").write(mutated)
        try:
            result = loaded(run)
        except EXPECTED:
            return
        assert same(result, original), "an edited state.json changed what loads"


def test_state_json_every_field_edited(files, tmp_path):
    """Each value of state.json in turn, edited keeping its type: refused, or nothing that loads changed."""
    original = loaded(str(files["run"]))
    run, directory = copy_run(files, str(tmp_path))
    path = os.path.join(directory, "state.json")
    raw = open(path, "rb").read()
    document = json.loads(raw)
    edits = 0
    for field_path in _paths(document):
        edited = copy.deepcopy(document)
        node = edited
        for key in field_path[:-1]:
            node = node[key]
        value = node[field_path[-1]]
        if isinstance(value, (dict, list)):
            continue
        node[field_path[-1]] = (not value if isinstance(value, bool) else value + 1 if isinstance(value, int)
                                else value * 2 + 0.5 if isinstance(value, float) else value + "x"
                                if isinstance(value, str) else 0)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(edited, f)
        edits += 1
        try:
            result = loaded(run)
        except EXPECTED:
            continue
        assert same(result, original), f"editing {'.'.join(map(str, field_path))} changed what loads"
    assert edits > 50
    open(path, "wb").write(raw)


@FUZZ
@given(data=st.data())
def test_state_json_crafted_and_resealed(files, data):
    """Behind a valid seal every field is still checked: a clear error or a working load and resume."""
    with tempfile.TemporaryDirectory() as tmp:
        run, directory = copy_run(files, tmp)
        path = os.path.join(directory, "state.json")
        state = data.draw(json_mutation(read_json(path)))
        with open(path, "w", encoding="utf-8") as f:
            json.dump(seal_state(state) if isinstance(state, dict) else state, f)
        try:
            loaded(run)
        except EXPECTED:
            pass
        saved = global_rng.get_state()
        try:
            config = GPTConfig.from_dict(read_json(os.path.join(files["checkpoint"], "state.json"))["model_config"])
            model = GPT(config)
            optimizer = AdamW(model.named_parameters(), lr=1e-3)
            tokens = np.arange(500) % config.vocab_size
            resume_training(run, model, optimizer, RandomWindows(tokens[:450], 2, 8, 0))
        except EXPECTED:
            pass
        finally:
            global_rng.set_state(saved)


# ---------------------------------------------------------------------------------------------- safetensors
@FUZZ
@given(data=st.data())
def test_safetensors_header(files, data):
    original = loaded(str(files["run"]))
    with tempfile.TemporaryDirectory() as tmp:
        run, directory = copy_run(files, tmp)
        weights = os.path.join(directory, "model.safetensors")
        raw = open(weights, "rb").read()
        header_end = 8 + int.from_bytes(raw[:8], "little")
        mutated = data.draw(byte_mutation(raw, limit=header_end))
        open(weights, "wb").write(mutated)
        import hashlib
        path = os.path.join(directory, "state.json")
        state = read_json(path)
        state["files"]["model.safetensors"] = hashlib.sha256(mutated).hexdigest()     # reach the parser
        with open(path, "w", encoding="utf-8") as f:
            json.dump(seal_state(state), f)
        try:
            result = loaded(run)
        except EXPECTED:
            return
        assert same(result, original)


def test_weights_of_another_file_with_matching_sha256_are_checked_too(files, tmp_path):
    run, directory = copy_run(files, str(tmp_path))
    model, _ = load_checkpoint(run)
    arrays = model.state_dict()
    removed = arrays.pop("model.norm.weight").size
    total = sum(a.size for a in model.state_dict().values())
    digest = write_safetensors(os.path.join(directory, "model.safetensors"), arrays)
    path = os.path.join(directory, "state.json")
    state = read_json(path)
    state["files"]["model.safetensors"] = digest
    with open(path, "w", encoding="utf-8") as f:
        json.dump(seal_state(state), f)
    with pytest.raises(CheckpointError, match=f"describes {total:,} parameters but model.safetensors holds {total - removed:,}"):
        load_checkpoint(run)
    with pytest.raises(CheckpointError, match="missing keys.*model.norm.weight"):
        load_checkpoint(run, model=GPT(model.config))


# ---------------------------------------------------------------------------------------------- pointers
@FUZZ
@given(data=st.data(), which=st.sampled_from(["latest", "best"]))
def test_pointer_files(files, data, which):
    with tempfile.TemporaryDirectory() as tmp:
        run, directory = copy_run(files, tmp)
        path = os.path.join(run, "checkpoints", f"{which}.json")
        raw = open(path, "rb").read()
        if data.draw(st.booleans()):
            open(path, "wb").write(data.draw(byte_mutation(raw)))
        else:
            open(path, "w").write(json.dumps(data.draw(json_mutation(json.loads(raw)))))
        try:
            resolved = resolve_checkpoint(run, which)
        except EXPECTED:
            return
        assert os.path.basename(resolved) == os.path.basename(directory)


# ---------------------------------------------------------------------------------------------- tokenizers
@FUZZ
@given(data=st.data())
def test_bpe_tokenizer_file(files, data):
    raw = open(files["bpe"], "rb").read()
    original = tokenizer_fingerprint(load_tokenizer(str(files["bpe"])))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bpe.json")
        if data.draw(st.booleans()):
            mutated = data.draw(byte_mutation(raw))
        else:
            mutated = json.dumps(data.draw(json_mutation(json.loads(raw)))).encode()
        open(path, "wb").write(mutated)
        try:
            tokenizer = load_tokenizer(path)
        except ValueError:
            return
        assert tokenizer_fingerprint(tokenizer) == original


@FUZZ
@given(data=st.data())
def test_vocab_json(files, data):
    path0 = files["shards"] / "vocab.json"
    raw = path0.read_bytes()
    original = load_tokenizer(str(path0))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "vocab.json")
        if data.draw(st.booleans()):
            mutated = data.draw(byte_mutation(raw))
        else:
            mutated = json.dumps(data.draw(json_mutation(json.loads(raw)))).encode()
        open(path, "wb").write(mutated)
        try:
            vocab = load_tokenizer(path)
        except ValueError:
            return
        # a different vocabulary is a different (valid) file; it must still be one CharVocab can use
        assert isinstance(vocab, CharVocab)
        if mutated == raw:
            assert tokenizer_fingerprint(vocab) == tokenizer_fingerprint(original)
        assert vocab.decode(vocab.encode(vocab.chars[0])) == vocab.chars[0]


# ---------------------------------------------------------------------------------------------- shards
@FUZZ
@given(data=st.data(), split=st.sampled_from(["train", "val"]))
def test_shard_header(files, data, split):
    with tempfile.TemporaryDirectory() as tmp:
        shards = os.path.join(tmp, "shards")
        shutil.copytree(files["shards"], shards)
        path = os.path.join(shards, f"d_{split}_000000.bin")
        original = np.array(read_shard(path, mmap=False))
        raw = open(path, "rb").read()
        mutated = data.draw(byte_mutation(raw, limit=1024))
        open(path, "wb").write(mutated)
        config = TrainConfig(data=shards, batch_size=2, seq_len=8, seed=0)
        try:
            build_data(config)
            tokens = np.array(read_shard(path, mmap=False))
        except ValueError:
            return
        assert np.array_equal(tokens, original), "a shard with an edited header loaded other tokens"


# ---------------------------------------------------------------------------------------------- TOML
@FUZZ
@given(data=st.data())
def test_toml_config(data):
    raw = open(os.path.join(ROOT, "tinygrad_llm", "configs", "shakespeare_char.toml"), "rb").read()
    mutated = data.draw(byte_mutation(raw))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "c.toml")
        open(path, "wb").write(mutated)
        try:
            config = config_from_dict(load_toml(path), TrainConfig())
        except ValueError:
            return
        config.validate()                                   # what loads is a valid configuration
        assert config_from_dict(dataclasses.asdict(config), TrainConfig()) == config   # and reads back the same


# ---------------------------------------------------------------------------------------------- the CLI line
@pytest.mark.parametrize("target, content", [("state.json", b"[1, 2]"), ("model.safetensors", b"\x00" * 20)])
def test_cli_prints_one_line_and_exits_1_for_a_corrupt_checkpoint(files, tmp_path, target, content):
    run, directory = copy_run(files, str(tmp_path))
    with open(os.path.join(directory, target), "wb") as f:
        f.write(content)
    env = dict(os.environ, TINYGRAD_LLM_REEXEC="0", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-m", "tinygrad_llm", "sample", run, "--max-new-tokens", "2"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tinygrad-llm sample: error:") and target in lines[0]
