"""The `tinygrad-llm` command: a small end-to-end run, and clear errors with non-zero exit codes."""
from __future__ import annotations

import json
import os

import pytest

from text_sample import SHAKESPEARE
from tinygrad_llm.cli import main

SMALL = ["--d-model", "32", "--n-layers", "2", "--n-heads", "4", "--ffn-hidden", "64", "--batch-size", "4",
         "--seq-len", "32", "--max-steps", "6", "--eval-interval", "3", "--eval-iters", "2", "--warmup-steps", "1",
         "--no-progress"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    text = root / "text.txt"
    text.write_text(SHAKESPEARE * 2, encoding="utf-8")
    config = root / "run.toml"
    config.write_text(f'[data]\ndata = "{text}"\n[train]\nlr = 0.003\nmax_steps = 4\n', encoding="utf-8")
    out = root / "run"
    assert main(["train", "--config", str(config), "--out-dir", str(out), *SMALL]) == 0
    return out


def test_train_writes_checkpoints_metrics_and_config(run_dir):
    saved = json.load(open(run_dir / "config.json"))
    assert saved["train_config"]["lr"] == 0.003                     # from the TOML file
    assert saved["train_config"]["max_steps"] == 6                  # the flag wins over the file
    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert any("tokens_per_s" in r for r in records) and any("val_bpb" in r for r in records)
    assert os.path.isfile(run_dir / "checkpoints" / "latest.json")


def test_sample_eval_export(run_dir, tmp_path, capsys):
    assert main(["sample", str(run_dir), "--prompt", "ROMEO:", "--max-new-tokens", "20", "--seed", "1",
                 "--top-k", "5"]) == 0
    assert capsys.readouterr().out.startswith("ROMEO:")
    assert main(["eval", str(run_dir), "--eval-iters", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["step"] == 6 and result["val_loss"] > 0 and "val_bpb" in result
    out = tmp_path / "hf"
    assert main(["export", str(run_dir), "--hf", str(out)]) == 0
    config = json.load(open(out / "config.json"))
    assert config["architectures"] == ["LlamaForCausalLM"] and config["hidden_size"] == 32
    assert config["num_key_value_heads"] == 4 and config["intermediate_size"] == 64
    from safetensors.numpy import load_file
    weights = load_file(str(out / "model.safetensors"))
    assert weights["model.layers.1.mlp.down_proj.weight"].shape == (32, 64)
    assert "lm_head.weight" in weights and len(weights) == 2 * 9 + 3


def test_plot_or_clear_message(run_dir, capsys):
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert main(["plot", str(run_dir)]) == 1
        assert "pip install matplotlib" in capsys.readouterr().err
    else:
        assert main(["plot", str(run_dir)]) == 0
        assert os.path.getsize(run_dir / "loss.png") > 0


@pytest.mark.parametrize("argv, message", [
    (["train", "--lr", "-1", "--data", "x.txt"], "lr must be a positive number"),
    (["train", "--data", "/no/such/file.txt"], "no such file or directory"),
    (["train", "--config", "/no/such.toml"], "config file not found"),
    (["train", "--device", "tpu"], "unknown device"),
    (["sample", "/no/such/run"], "the path does not exist"),
    (["eval", "/no/such/run"], "the path does not exist"),
    (["plot", "/no/such/run"], "metrics.jsonl not found"),
])
def test_errors_exit_non_zero_with_a_clear_message(argv, message, capsys):
    assert main(argv) != 0
    err = capsys.readouterr().err
    assert message in err and err.startswith(f"tinygrad-llm {argv[0]}: error:")


@pytest.mark.parametrize("argv", [["train", "--no-such-flag"], ["train", "--max-steps", "ten"],
                                  ["frobnicate"], ["export", "somewhere"]])
def test_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_bad_toml_key(tmp_path, capsys):
    config = tmp_path / "bad.toml"
    config.write_text("[train]\nlearning_rate = 1\n")
    assert main(["train", "--config", str(config)]) == 1
    assert "unknown configuration keys: learning_rate" in capsys.readouterr().err


def test_prepare_bpe_train_sample_export_reload(tmp_path, capsys):
    """The seams end to end: prepare with a BPE tokenizer -> train on its shards -> sample -> export -> reload."""
    import numpy as np
    from safetensors.numpy import load_file

    from tinygrad_llm.checkpoint import load_checkpoint
    from tinygrad_llm.model import GPT, GPTConfig
    from tinygrad_llm.tokenizer import Tokenizer, tokenizer_fingerprint

    tokenizer = Tokenizer.train(SHAKESPEARE, vocab_size=300, special_tokens=["<|endoftext|>"])
    tokenizer.save(str(tmp_path / "bpe.json"))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "plays.txt").write_text(SHAKESPEARE * 4, encoding="utf-8")
    shards = tmp_path / "shards"
    assert main(["prepare", str(corpus), "--out", str(shards), "--tokenizer", str(tmp_path / "bpe.json"),
                 "--split", "tail", "--no-filters", "--no-near-dedup", "--workers", "1", "--no-progress"]) == 0
    run = tmp_path / "run"
    assert main(["train", "--data", str(shards), "--tokenizer", str(tmp_path / "bpe.json"), "--out-dir", str(run),
                 "--tie-embeddings", *SMALL[:SMALL.index("--seq-len")], "--seq-len", "16",
                 *SMALL[SMALL.index("--seq-len") + 2:]]) == 0
    capsys.readouterr()
    assert main(["sample", str(run), "--prompt", "ROMEO:", "--max-new-tokens", "8", "--seed", "0"]) == 0
    assert capsys.readouterr().out.startswith("ROMEO:")
    assert main(["export", str(run), "--hf", str(tmp_path / "hf")]) == 0

    config = json.load(open(tmp_path / "hf" / "config.json"))
    reloaded = GPT(GPTConfig(vocab_size=config["vocab_size"], d_model=config["hidden_size"],
                             n_layers=config["num_hidden_layers"], n_heads=config["num_attention_heads"],
                             n_kv_heads=config["num_key_value_heads"], ffn_hidden=config["intermediate_size"],
                             max_seq_len=config["max_position_embeddings"], rope_theta=config["rope_theta"],
                             norm_eps=config["rms_norm_eps"], tie_embeddings=config["tie_word_embeddings"]))
    reloaded.load_state_dict(load_file(str(tmp_path / "hf" / "model.safetensors")))
    trained, _ = load_checkpoint(str(run))
    trained.eval()
    reloaded.eval()
    ids = np.asarray([tokenizer.encode_ordinary("ROMEO: my lord")])
    a, b = trained(ids), reloaded(ids)                            # (1, T, V) logits
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    from tinygrad_llm.export import tokenizer_from_hf_json                 # the exported tokenizer.json, read back
    exported_tokenizer = tokenizer_from_hf_json(json.load(open(tmp_path / "hf" / "tokenizer.json", encoding="utf-8")))
    assert tokenizer_fingerprint(exported_tokenizer) == tokenizer_fingerprint(tokenizer)
