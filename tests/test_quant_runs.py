"""Quantized runs: `tinygrad-llm quantize`, sample / eval on the result (with the perplexity change against
the float run), the stored format, and one-line errors for a quantized source, odd shapes, corrupt files."""
from __future__ import annotations

import json

import numpy as np
import pytest

from text_sample import SHAKESPEARE
from tinygrad_llm.checkpoint import CheckpointError, load_checkpoint, read_safetensors
from tinygrad_llm.cli import main
from tinygrad_llm.generate import Decoder, generate
from tinygrad_llm.quant import QuantFormatError, QuantizedMatrix, cpu_kernels
from tinygrad_llm.quant.runs import load_quantized_run, quantize_weights

SMALL = ["--d-model", "32", "--n-layers", "2", "--n-heads", "4", "--ffn-hidden", "64", "--batch-size", "4",
         "--seq-len", "32", "--max-steps", "4", "--eval-interval", "4", "--eval-iters", "1", "--warmup-steps", "1",
         "--no-progress", "--sample-tokens", "0"]


@pytest.fixture(scope="module")
def float_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    text = root / "text.txt"
    text.write_text(SHAKESPEARE * 2, encoding="utf-8")
    out = root / "run"
    assert main(["train", "--data", str(text), "--out-dir", str(out), *SMALL]) == 0
    return out


@pytest.mark.parametrize("kind, bytes_per_parameter", [("q8_0", 34 / 32), ("q4_0", 18 / 32), ("int8", 1.0)])
def test_quantize_sample_eval(float_run, tmp_path, capsys, kind, bytes_per_parameter):
    out = tmp_path / kind
    assert main(["quantize", str(float_run), "--type", kind, "--out", str(out)]) == 0
    assert "bytes/parameter" in capsys.readouterr().out
    info = json.load(open(out / "quantized.json"))
    assert info["format"] == "tinygrad_llm-quantized" and info["type"] == kind
    assert bytes_per_parameter <= info["bytes_per_parameter"] < bytes_per_parameter + 0.15  # + scales, norm gains
    arrays = read_safetensors(str(out / "model.safetensors"))
    if kind == "int8":
        assert arrays["model.layers.0.mlp.up_proj.weight.values"].dtype == np.int8
    else:
        assert arrays["model.layers.0.mlp.up_proj.weight.blocks"].dtype == np.uint8
    assert arrays["model.norm.weight"].dtype == np.float32

    assert main(["sample", str(out), "--prompt", "ROMEO:", "--max-new-tokens", "10", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("ROMEO:")
    assert main(["eval", str(out), "--eval-iters", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["quantization"] == kind and result["float_val_ppl"] > 0
    assert result["ppl_change_percent"] == pytest.approx(100 * (result["val_ppl"] / result["float_val_ppl"] - 1))


def test_quantized_model_matches_the_dequantised_float_model(float_run, tmp_path, monkeypatch):
    monkeypatch.setattr(cpu_kernels, "ROUNDED_ROWS", 1 << 62)     # x never rounded to 8 bits: the exact products
    out = tmp_path / "q8"
    assert main(["quantize", str(float_run), "--type", "q8_0", "--out", str(out)]) == 0
    quantized, info = load_quantized_run(str(out))
    float_model, _ = load_checkpoint(str(float_run))
    for name, p in float_model.named_parameters():                       # the float model, rounded through Q8_0
        if p.data.ndim == 2:
            p.data[...] = QuantizedMatrix.quantize(p.data, "q8_0").dequantize()
    ids = np.random.default_rng(0).integers(0, quantized.config.vocab_size, (2, 12))
    logits, loss = quantized(ids, ids)
    np.testing.assert_allclose(logits.numpy(), float_model(ids).numpy(), rtol=1e-4, atol=1e-4)
    assert loss.item() > 0
    prompt = [1, 2, 3]
    assert list(generate(quantized, prompt, 15, temperature=0)) == list(generate(float_model, prompt, 15, temperature=0))
    cache = Decoder(quantized).new_cache(2)
    assert cache.k[0].dtype == np.float32


def test_bad_input_gives_one_line_errors(float_run, tmp_path, capsys):
    out = tmp_path / "q4"
    assert main(["quantize", str(float_run), "--type", "q4_0", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["quantize", str(out), "--type", "q8_0", "--out", str(tmp_path / "again")]) == 1
    error = capsys.readouterr().err
    assert "already a quantized run (q4_0)" in error and error.count("\n") == 1
    assert main(["quantize", str(float_run), "--type", "q8_0", "--out", str(out)]) == 1     # never overwrite
    assert "not empty" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        main(["quantize", str(float_run), "--type", "q5_1", "--out", str(tmp_path / "x")])
    assert usage.value.code == 2 and "invalid choice: 'q5_1'" in capsys.readouterr().err

    data = bytearray((out / "model.safetensors").read_bytes())
    data[-100] ^= 0xFF                                                    # one flipped byte
    (out / "model.safetensors").write_bytes(bytes(data))
    assert main(["sample", str(out), "--max-new-tokens", "2"]) == 1
    error = capsys.readouterr().err
    assert "corrupt" in error and error.count("\n") == 1
    (out / "quantized.json").write_text("{not json", encoding="utf-8")
    assert main(["eval", str(out)]) == 1
    assert "not valid JSON" in capsys.readouterr().err


def test_mismatched_arrays_are_reported(float_run, tmp_path):
    out = tmp_path / "i8"
    assert main(["quantize", str(float_run), "--type", "int8", "--out", str(out)]) == 0
    info = json.load(open(out / "quantized.json"))
    info["model_config"]["ffn_hidden"] = 96                               # the arrays no longer fit
    (out / "quantized.json").write_text(json.dumps(info), encoding="utf-8")
    with pytest.raises(CheckpointError, match="corrupt: .*expected int8"):
        load_quantized_run(str(out))


def test_shapes_not_a_multiple_of_32_are_refused_not_padded():
    weights = {"a.weight": np.ones((4, 48), np.float32), "norm.weight": np.ones(48, np.float32)}
    with pytest.raises(QuantFormatError, match=r"multiple of 32 \(no padding\).*a.weight \(4, 48\).*--type int8"):
        quantize_weights(weights, "q4_0")
    quantized = quantize_weights(weights, "int8")
    assert quantized["a.weight"].kind == "int8" and quantized["norm.weight"].dtype == np.float32


def test_a_run_with_a_tokenizer_file_keeps_its_copy(tmp_path):
    """A BPE run names its tokenizer file: the quantized run carries a copy and finds it after a move."""
    from tinygrad_llm.checkpoint import save_checkpoint
    from tinygrad_llm.cli_quant import load_quantized
    from tinygrad_llm.model import GPT, GPTConfig
    from tinygrad_llm.tokenizer import Tokenizer
    tokenizer = Tokenizer.train([SHAKESPEARE], vocab_size=300, special_tokens=("<|endoftext|>",))
    run = tmp_path / "run"
    run.mkdir()
    tokenizer.save(str(run / "tokenizer.json"))
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, d_model=32, n_layers=1, n_heads=2, ffn_hidden=64,
                          max_seq_len=16))
    ref = {"type": "file", "path": str(tmp_path / "gone.json"), "run_file": "tokenizer.json"}
    save_checkpoint(str(run / "checkpoints"), 3, model, state={"model_config": model.config.to_dict(), "tokenizer": ref})
    assert main(["quantize", str(run), "--type", "q8_0", "--out", str(tmp_path / "q")]) == 0
    (tmp_path / "q").rename(tmp_path / "moved")
    loaded, state, loaded_tokenizer = load_quantized(str(tmp_path / "moved"))
    assert state["step"] == 3 and loaded_tokenizer.encode("ROMEO:") == tokenizer.encode("ROMEO:")
    assert main(["sample", str(tmp_path / "moved"), "--prompt", "ROMEO:", "--max-new-tokens", "3"]) == 0


def test_a_replaced_tokenizer_copy_is_refused(tmp_path, capsys):
    from tinygrad_llm.checkpoint import save_checkpoint
    from tinygrad_llm.model import GPT, GPTConfig
    from tinygrad_llm.tokenizer import Tokenizer
    tokenizer = Tokenizer.train([SHAKESPEARE], vocab_size=280)
    run = tmp_path / "run"
    run.mkdir()
    tokenizer.save(str(run / "tokenizer.json"))
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, d_model=32, n_layers=1, n_heads=2, ffn_hidden=64,
                          max_seq_len=16))
    ref = {"type": "file", "run_file": "tokenizer.json"}
    save_checkpoint(str(run / "checkpoints"), 1, model, state={"model_config": model.config.to_dict(), "tokenizer": ref})
    assert main(["quantize", str(run), "--type", "q4_0", "--out", str(tmp_path / "q")]) == 0
    Tokenizer.train([SHAKESPEARE[:2000]], vocab_size=280).save(str(tmp_path / "q" / "tokenizer.json"))
    capsys.readouterr()
    assert main(["sample", str(tmp_path / "q"), "--max-new-tokens", "2"]) == 1
    assert "does not match the sha256" in capsys.readouterr().err
