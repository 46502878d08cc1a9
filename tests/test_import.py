"""`tinygrad-llm export` and `import` end to end: the round trip is exact, the model card comes from the
run's files, the run's tokenizer is found safely (inside the run, or by checksum), and bad input ends in
one line."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from test_export import MULTILINGUAL, small_model, train_tokenizer
from text_sample import SHAKESPEARE
from tinygrad_llm.checkpoint import load_checkpoint, save_checkpoint
from tinygrad_llm.cli import main

SMALL = ["--d-model", "32", "--n-layers", "2", "--n-heads", "4", "--ffn-hidden", "64", "--batch-size", "4",
         "--seq-len", "32", "--max-steps", "4", "--eval-interval", "2", "--eval-iters", "2", "--warmup-steps", "1",
         "--no-progress"]
HF_FILES = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
            "generation_config.json"]


@pytest.fixture(scope="module")
def char_run(tmp_path_factory):
    """A real (tiny) training run on a .txt file: character vocabulary, metrics.jsonl, config.json."""
    root = tmp_path_factory.mktemp("char")
    (root / "text.txt").write_text(SHAKESPEARE * 2, encoding="utf-8")
    assert main(["train", "--data", str(root / "text.txt"), "--out-dir", str(root / "run"), *SMALL]) == 0
    return root


def bpe_run(root, tokenizer=None, step=3):
    """A run directory laid out as `train` lays out a run on shards: <run>/tokenizer.json and a reference
    to it (run_file) in the checkpoint's state.json."""
    tokenizer = tokenizer or train_tokenizer()
    run = root / "run"
    run.mkdir(parents=True)
    tokenizer.save(str(run / "tokenizer.json"))
    model = small_model(tokenizer.vocab_size, kv_heads=2)
    ref = {"type": "file", "path": str(run / "tokenizer.json"), "run_file": "tokenizer.json"}
    save_checkpoint(str(run / "checkpoints"), step, model, state={"model_config": model.config.to_dict(),
                                                                  "tokenizer": ref})
    return run, model, tokenizer


def edit_state(run, change):
    directory = load_checkpoint(str(run))[1]["directory"]
    path = os.path.join(directory, "state.json")
    state = json.load(open(path))
    change(state)
    from tinygrad_llm import checkpoint
    if "state_sha256" in state and hasattr(checkpoint, "state_digest"):
        state["state_sha256"] = checkpoint.state_digest(state)     # anyone can re-sign: export must still refuse
    json.dump(state, open(path, "w"))


def one_line_error(capsys, command):
    err = capsys.readouterr().err
    assert err.startswith(f"tinygrad-llm {command}: error: ") and err.count("\n") == 1, err
    return err


# ------------------------------------------------------------------------------------- round trip
def test_bpe_round_trip_is_exact(tmp_path, capsys):
    run, model, tokenizer = bpe_run(tmp_path)
    assert main(["export", str(run), "--hf", str(tmp_path / "hf")]) == 0
    assert main(["import", str(tmp_path / "hf"), "--out-dir", str(tmp_path / "imported")]) == 0
    imported, state = load_checkpoint(str(tmp_path / "imported"))
    assert imported.config.to_dict() == model.config.to_dict()
    for name, array in model.state_dict().items():
        assert np.array_equal(imported.state_dict()[name], array), name
    from tinygrad_llm.data.shards import load_tokenizer
    assert load_tokenizer(str(tmp_path / "imported" / "tokenizer.json")) == tokenizer
    assert main(["export", str(tmp_path / "imported"), "--hf", str(tmp_path / "hf2")]) == 0
    for name in HF_FILES:
        assert (tmp_path / "hf" / name).read_bytes() == (tmp_path / "hf2" / name).read_bytes(), name
    capsys.readouterr()
    prompt = ["--prompt", "Héllo 你好", "--max-new-tokens", "12", "--temperature", "0"]
    assert main(["sample", str(run), *prompt]) == 0
    first = capsys.readouterr().out
    assert main(["sample", str(tmp_path / "imported"), *prompt]) == 0
    assert capsys.readouterr().out == first


def test_char_run_round_trip_samples_and_evaluates_the_same(char_run, tmp_path, capsys):
    run = char_run / "run"
    assert main(["export", str(run), "--hf", str(tmp_path / "hf"), "--license", "mit"]) == 0
    assert main(["import", str(tmp_path / "hf"), "--out-dir", str(tmp_path / "imported")]) == 0
    capsys.readouterr()
    for command in (["sample", "--prompt", "ROMEO:", "--max-new-tokens", "20", "--temperature", "0"],
                    ["eval", "--data", str(char_run / "text.txt"), "--eval-iters", "1", "--batch-size", "4"]):
        outputs = []
        for directory in (run, tmp_path / "imported"):
            assert main([command[0], str(directory), *command[1:]]) == 0
            outputs.append(capsys.readouterr().out)
        if command[0] == "eval":
            outputs = [json.loads(out)["val_loss"] for out in outputs]
        assert outputs[0] == outputs[1]


def test_model_card_comes_from_the_run_files(char_run, tmp_path):
    run = char_run / "run"
    assert main(["export", str(run), "--hf", str(tmp_path / "hf"), "--license", "mit", "--name", "tiny-bard"]) == 0
    card = (tmp_path / "hf" / "README.md").read_text(encoding="utf-8")
    header = card.split("---")[1]
    assert "license: mit" in header and '"tinygrad_llm"' in header and 'datasets: ["text"]' in header
    assert card.count("# tiny-bard") == 1
    records = [json.loads(line) for line in open(run / "metrics.jsonl")]
    last = [r for r in records if "val_loss" in r and "event" not in r][-1]
    assert f"at step {last['step']}" in card and f"| loss (nats/token) | {last['val_loss']:.4g} |" in card
    assert f"| bits per byte | {last['val_bpb']:.4g} |" in card
    parameters = sum(a.size for a in load_checkpoint(str(run))[0].state_dict().values())
    assert f"| parameters | {parameters:,} |" in card and "| tokens per step (batch × sequence × accumulation) | 128 |" in card
    assert "No chat template" in card                         # a character vocabulary has no role tokens
    train_config = json.load(open(run / "config.json"))["train_config"]
    assert f"| attention dropout | {train_config['attention_dropout']:.4g} |" in card


def test_card_counts_the_prepare_report(tmp_path):
    run, _, _ = bpe_run(tmp_path)
    data = tmp_path / "data"
    data.mkdir()
    report = {"sources": {"documents": 91, "bytes_read": 12389679}, "kept_documents": 47, "kept_bytes": 5866237,
              "tokens": {"train": {"documents": 44, "tokens": 5537071}, "val": {"documents": 3, "tokens": 329212},
                         "split": "hash", "val_fraction": 0.1},
              "stages": [{"stage": "near_dedup", "dropped": {"near_duplicate": 37}}], "config": {"prefix": "bard"}}
    (data / "report.json").write_text(json.dumps(report))
    edit_state(run, lambda state: state.update(train_config={"data": str(data), "batch_size": 2, "seq_len": 8,
                                                             "grad_accum": 1}))
    assert main(["export", str(run), "--hf", str(tmp_path / "hf")]) == 0
    card = (tmp_path / "hf" / "README.md").read_text(encoding="utf-8")
    assert 'datasets: ["bard"]' in card and "| train documents / tokens | 44 / 5,537,071 |" in card
    assert "| dropped by near_dedup | near_duplicate 37 |" in card and "| documents read | 91 |" in card
    assert "license: unknown" in card and "<|assistant|>" in card


# ------------------------------------------------------------------------------------- the run's tokenizer
def test_a_moved_run_still_exports_its_tokenizer(tmp_path):
    run, _, tokenizer = bpe_run(tmp_path / "old")
    moved = tmp_path / "new" / "run"
    shutil.move(str(run), str(moved))
    assert main(["export", str(moved), "--hf", str(tmp_path / "hf")]) == 0
    from tinygrad_llm.export import tokenizer_from_hf_json
    assert tokenizer_from_hf_json(json.load(open(tmp_path / "hf" / "tokenizer.json"))) == tokenizer


def test_state_json_cannot_point_the_export_at_another_file(tmp_path, capsys):
    run, _, tokenizer = bpe_run(tmp_path)
    outside = tmp_path / "elsewhere.json"
    shutil.copyfile(run / "tokenizer.json", outside)
    (run / "tokenizer.json").unlink()
    edit_state(run, lambda state: state["tokenizer"].update(path=str(outside)))
    assert main(["export", str(run), "--hf", str(tmp_path / "hf")]) == 1       # the outside path is never read
    assert f"looked at {run / 'tokenizer.json'})" in one_line_error(capsys, "export")
    assert not (tmp_path / "hf").exists()
    edit_state(run, lambda state: state["tokenizer"].pop("run_file"))
    assert main(["export", str(run), "--hf", str(tmp_path / "hf")]) == 1
    assert "names no file inside the run and no sha256" in one_line_error(capsys, "export")
    edit_state(run, lambda state: state["tokenizer"].update(run_file="../elsewhere.json"))
    assert main(["export", str(run), "--hf", str(tmp_path / "hf")]) == 1
    assert "must be a file name inside the run" in one_line_error(capsys, "export")
    import hashlib
    digest = hashlib.sha256(outside.read_bytes()).hexdigest()
    edit_state(run, lambda state: state["tokenizer"].update(run_file="tokenizer.json", sha256="0" * 64))
    assert main(["export", str(run), "--hf", str(tmp_path / "hf")]) == 1
    assert "does not match the sha256" in one_line_error(capsys, "export")
    edit_state(run, lambda state: state["tokenizer"].update(sha256=digest))     # the recorded, checksummed file
    assert main(["export", str(run), "--hf", str(tmp_path / "hf")]) == 0


def test_a_run_without_a_tokenizer_is_one_line(tmp_path, capsys):
    run, _, _ = bpe_run(tmp_path)
    edit_state(run, lambda state: state.update(tokenizer={}))
    assert main(["export", str(run), "--hf", str(tmp_path / "hf")]) == 1
    assert "field 'tokenizer' has no field 'type'" in one_line_error(capsys, "export")
    assert main(["export", str(run), "--hf", str(tmp_path / "hf"), "--tokenizer", str(run / "tokenizer.json")]) == 0


# ------------------------------------------------------------------------------------- bad input
def test_export_bad_input_is_one_line(tmp_path, capsys):
    run, _, _ = bpe_run(tmp_path / "bpe")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    assert main(["export", str(run), "--hf", str(tmp_path / "full")]) == 1
    assert "pass --force" in one_line_error(capsys, "export")
    assert main(["export", str(run), "--gguf", str(tmp_path / "m.gguf"), "--type", "q5_k"]) == 2
    assert "unknown --type 'q5_k'" in one_line_error(capsys, "export")
    assert main(["export", str(run), "--gguf", str(tmp_path / "m.gguf")]) == 0
    assert (tmp_path / "m.README.md").read_text(encoding="utf-8").startswith("---\nlicense: unknown")
    assert main(["export", str(run), "--gguf", str(tmp_path / "m.gguf")]) == 1
    assert "already exists; pass --force" in one_line_error(capsys, "export")
    assert main(["export", str(run), "--gguf", str(tmp_path / "m.gguf"), "--force", "--type", "q8_0"]) == 0
    (tmp_path / "quantized").mkdir()
    (tmp_path / "quantized" / "quantized.json").write_text("{}")
    assert main(["export", str(tmp_path / "quantized"), "--hf", str(tmp_path / "q")]) == 1
    assert "is a quantized run" in one_line_error(capsys, "export")


def test_a_vocabulary_gguf_cannot_express_writes_nothing(tmp_path, capsys):
    from tinygrad_llm.data.shards import CharVocab
    vocab = CharVocab.from_text(SHAKESPEARE + MULTILINGUAL, special_tokens=())      # a .txt run has no <|endoftext|>
    run = tmp_path / "run"
    model = small_model(vocab.vocab_size)
    save_checkpoint(str(run / "checkpoints"), 1, model, state={"model_config": model.config.to_dict(), "tokenizer": {
        "type": "char", "chars": "".join(vocab.chars)}})
    assert main(["export", str(run), "--hf", str(tmp_path / "hf"), "--gguf", str(tmp_path / "m.gguf")]) == 1
    assert "GGUF cannot express a vocabulary without <|endoftext|>" in one_line_error(capsys, "export")
    assert not (tmp_path / "hf").exists() and not (tmp_path / "m.gguf").exists()


def test_import_bad_input_is_one_line(tmp_path, capsys):
    run, _, _ = bpe_run(tmp_path)
    assert main(["import", str(tmp_path / "nothing"), "--out-dir", str(tmp_path / "out")]) == 1
    assert "is not a directory" in one_line_error(capsys, "import")
    assert main(["export", str(run), "--hf", str(tmp_path / "hf")]) == 0
    capsys.readouterr()
    config = json.load(open(tmp_path / "hf" / "config.json"))
    json.dump({**config, "hidden_act": "gelu"}, open(tmp_path / "hf" / "config.json", "w"))
    assert main(["import", str(tmp_path / "hf"), "--out-dir", str(tmp_path / "out")]) == 1
    assert "hidden_act = 'gelu' is not supported" in one_line_error(capsys, "import")
    json.dump(config, open(tmp_path / "hf" / "config.json", "w"))
    content = json.load(open(tmp_path / "hf" / "tokenizer.json"))
    content["model"]["type"] = "Unigram"
    json.dump(content, open(tmp_path / "hf" / "tokenizer.json", "w"))
    assert main(["import", str(tmp_path / "hf"), "--out-dir", str(tmp_path / "out")]) == 1
    assert "model type 'Unigram' is not supported" in one_line_error(capsys, "import")
    content["model"]["type"] = "BPE"
    json.dump(content, open(tmp_path / "hf" / "tokenizer.json", "w"))
    header = json.dumps({"model.norm.weight": {"dtype": "BF16", "shape": [4], "data_offsets": [0, 8]}}).encode()
    original = (tmp_path / "hf" / "model.safetensors").read_bytes()
    (tmp_path / "hf" / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(8))
    assert main(["import", str(tmp_path / "hf"), "--out-dir", str(tmp_path / "out")]) == 1
    err = one_line_error(capsys, "import")                  # bfloat16 is read where ml_dtypes registered it
    assert "holds bfloat16 weights, which NumPy cannot read" in err or "the weights do not fit the config" in err
    (tmp_path / "hf" / "model.safetensors").write_bytes(original)
    assert main(["import", str(tmp_path / "hf"), "--out-dir", str(run), "--force"]) == 1
    assert "already holds a run" in one_line_error(capsys, "import")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("x")
    assert main(["import", str(tmp_path / "hf"), "--out-dir", str(tmp_path / "full")]) == 1
    assert "pass --force" in one_line_error(capsys, "import")
