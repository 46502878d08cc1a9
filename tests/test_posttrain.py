"""SFT, DPO and LoRA stages: normalisation over the accumulated batch, exact resume, merged LoRA weights,
the reference cache, and the CLI (sft, dpo, chat) with bad input."""
from __future__ import annotations

import io
import json
import math
import os

import numpy as np
import pytest

from tinygrad_llm import rng
from tinygrad_llm.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from tinygrad_llm.cli import main
from tinygrad_llm.data.shards import CharVocab
from tinygrad_llm.model import GPT, GPTConfig
from tinygrad_llm.posttrain import loop as loop_module
from tinygrad_llm.posttrain.chat import apply_chat_template, with_chat_tokens
from tinygrad_llm.posttrain.data import encode_conversations
from tinygrad_llm.posttrain.dpo import REFERENCE_FILE, dpo
from tinygrad_llm.posttrain.loop import PostTrainConfig, Run
from tinygrad_llm.posttrain.sft import SFTStage, sft

CHARS = sorted(set("abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ.,?:;'\"!\n"))
PHRASES = ["Who is there", "Stand and unfold", "Long live the king", "Not a mouse stirring", "Good night",
           "Friends to this ground"]


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write((record if isinstance(record, str) else json.dumps(record)) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny pretrained-looking run (character vocabulary without chat tokens, dropout on) and data files."""
    root = tmp_path_factory.mktemp("base")
    rng.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=len(CHARS) + 1, d_model=16, n_layers=1, n_heads=2, ffn_hidden=32,
                          max_seq_len=64, dropout=0.1))
    save_checkpoint(str(root / "run" / "checkpoints"), 100, model, None, {
        "model_config": model.config.to_dict(),
        "tokenizer": {"type": "char", "chars": "".join(CHARS), "special_tokens": ["<|endoftext|>"]}})
    conversations = [{"messages": [{"role": "user", "content": PHRASES[i % 6]},
                                   {"role": "assistant", "content": PHRASES[(i + 1) % 6] * (1 + i % 2)}]}
                     for i in range(24)]
    preferences = [{"prompt": PHRASES[i % 6], "chosen": PHRASES[(i + 1) % 6], "rejected": PHRASES[(i + 3) % 6]}
                   for i in range(24)]
    return {"run": str(root / "run"), "conversations": write_jsonl(root / "c.jsonl", conversations),
            "preferences": write_jsonl(root / "p.jsonl", preferences), "root": root}


def config(files, out_dir, **overrides):
    values = dict(base=files["run"], out_dir=str(out_dir), data=files["conversations"], val_data=files["conversations"],
                  batch_size=4, grad_accum=2, max_steps=6, warmup_steps=1, lr=3e-3, eval_interval=3,
                  eval_examples=8, log_interval=1, progress=False, seed=0)
    values.update(overrides)
    return PostTrainConfig(**values)


def records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if "loss" in r and "event" not in r]


def quiet(message):
    pass


# ---------------------------------------------------------------------------------------------- SFT
def test_sft_accumulation_equals_one_big_batch():
    """k micro-batches normalised over the step's kept tokens give the gradient of one batch of all of them."""
    vocab = with_chat_tokens(CharVocab(CHARS))
    conversations = [[{"role": "user", "content": PHRASES[i]}, {"role": "assistant", "content": PHRASES[5 - i] * (i + 1)}]
                     for i in range(6)]
    sequences, _ = encode_conversations(conversations, vocab, 200)
    rng.manual_seed(3)
    model = GPT(GPTConfig(vocab_size=vocab.vocab_size, d_model=16, n_layers=1, n_heads=2, ffn_hidden=32,
                          max_seq_len=200), dtype=np.float64)
    run = Run(PostTrainConfig(), model, vocab, None, sequences, [], "cpu")
    stage = SFTStage()

    def gradients(groups):
        model.zero_grad()
        total = stage.weight_total(run, [i for g in groups for i in g])
        sums = {}
        for group in groups:
            for key, value in stage.micro_step(run, group, total).items():
                sums[key] = sums.get(key, 0.0) + value
        return stage.finish(sums)["loss"], {n: p.grad.copy() for n, p in model.named_parameters()}

    loss_one, one = gradients([[0, 1, 2, 3, 4, 5]])
    loss_three, three = gradients([[0, 1], [2, 3], [4, 5]])
    assert loss_one == pytest.approx(loss_three, rel=1e-12)
    for name in one:
        np.testing.assert_allclose(three[name], one[name], rtol=1e-9, atol=1e-14, err_msg=name)
    # the per-micro-batch mean (each micro-batch weighted 1/k) is a different gradient: short answers count more
    model.zero_grad()
    for group in ([0, 1], [2, 3], [4, 5]):
        stage.micro_step(run, group, stage.weight_total(run, group) * 3)
    naive = model.lm_head.weight.grad
    assert not np.allclose(naive, one["lm_head.weight"], rtol=1e-3)


def test_sft_trains_on_assistant_tokens_and_resumes_bit_exactly(base, tmp_path, monkeypatch):
    straight = sft(config(base, tmp_path / "straight"), log=quiet)
    assert straight["steps"] == 6 and math.isfinite(straight["val_loss"])
    curve = [r["loss"] for r in records(tmp_path / "straight")]
    assert curve[-1] < curve[0]

    original = loop_module.lr_schedule

    def killed_at_step_5(step, *args, **kwargs):        # two steps after the step-3 checkpoint
        if step == 5:
            raise KeyboardInterrupt
        return original(step, *args, **kwargs)

    monkeypatch.setattr(loop_module, "lr_schedule", killed_at_step_5)
    assert sft(config(base, tmp_path / "split"), log=quiet)["stopped"] == "interrupted"
    monkeypatch.setattr(loop_module, "lr_schedule", original)
    with pytest.raises(FileExistsError, match="--resume"):
        sft(config(base, tmp_path / "split"), log=quiet)
    with pytest.raises(CheckpointError, match="different"):
        sft(config(base, tmp_path / "split", resume=True, batch_size=2), log=quiet)
    sft(config(base, tmp_path / "split", resume=True), log=quiet)
    a = {r["step"]: r["loss"] for r in records(tmp_path / "straight")}
    b = {r["step"]: r["loss"] for r in records(tmp_path / "split")}
    assert a == b
    model_a, _ = load_checkpoint(str(tmp_path / "straight"))
    model_b, state = load_checkpoint(str(tmp_path / "split"))
    assert state["step"] == 6 and state["stage"] == "sft"
    for (name, x), (_, y) in zip(model_a.state_dict().items(), model_b.state_dict().items()):
        np.testing.assert_array_equal(x, y, err_msg=name)


def test_lora_trains_only_adapters_merges_them_and_resumes_bit_exactly(base, tmp_path, monkeypatch):
    options = dict(lora_rank=2, lora_targets="q,v,down", lr=1e-2)
    summary = sft(config(base, tmp_path / "lora", **options), log=quiet)
    full = sft(config(base, tmp_path / "full", max_steps=1, eval_interval=1), log=quiet)
    assert summary["optimizer_state_bytes"] < full["optimizer_state_bytes"] / 5
    before, _ = load_checkpoint(base["run"])
    after, state = load_checkpoint(str(tmp_path / "lora"))
    assert state["lora"]["rank"] == 2 and state["lora"]["modules"] == 3
    old = before.state_dict()
    changed = {name for name, value in after.state_dict().items()       # vocabulary tables: the old rows
               if not np.array_equal(value[:len(old[name])], old[name])}
    assert changed == {"model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.v_proj.weight",
                       "model.layers.0.mlp.down_proj.weight"}
    with open(os.path.join(state["directory"], "..", "..", "metrics.jsonl")) as f:
        # adapters of q, v (16 -> 16) and down (32 -> 16), and the 4 added chat-token rows of both tables
        assert json.loads(f.readline())["trained_parameters"] == 2 * (2 * 16 + 16 * 2) + (2 * 32 + 16 * 2) + 2 * 4 * 16
    new = after.state_dict()
    for table in ("model.embed_tokens.weight", "lm_head.weight"):                   # the new rows were trained
        mean = np.repeat(old[table].mean(0, keepdims=True), 4, 0)
        assert not np.allclose(new[table][len(old[table]):], mean, atol=1e-6)

    def killed_at_step_5(step, *args, **kwargs):
        if step == 5:
            raise KeyboardInterrupt
        return original(step, *args, **kwargs)

    original = loop_module.lr_schedule
    monkeypatch.setattr(loop_module, "lr_schedule", killed_at_step_5)
    sft(config(base, tmp_path / "split", **options), log=quiet)
    monkeypatch.setattr(loop_module, "lr_schedule", original)
    sft(config(base, tmp_path / "split", resume=True, **options), log=quiet)
    assert {r["step"]: r["loss"] for r in records(tmp_path / "lora")} == \
        {r["step"]: r["loss"] for r in records(tmp_path / "split")}
    resumed, _ = load_checkpoint(str(tmp_path / "split"))
    for (name, x), (_, y) in zip(after.state_dict().items(), resumed.state_dict().items()):
        np.testing.assert_array_equal(x, y, err_msg=name)


# ---------------------------------------------------------------------------------------------- DPO
def test_dpo_starts_at_log_2_caches_the_reference_and_resumes_bit_exactly(base, tmp_path, monkeypatch):
    sft(config(base, tmp_path / "sft", max_steps=3), log=quiet)
    options = dict(base=str(tmp_path / "sft"), data=base["preferences"], val_data=base["preferences"], lr=1e-3,
                   beta=0.5)
    straight = dpo(config(base, tmp_path / "dpo", **options), log=quiet)
    assert 0.0 <= straight["val_reward_accuracy"] <= 1.0 and math.isfinite(straight["val_chosen_nll"])
    first = records(tmp_path / "dpo")[0]
    assert set(first) >= {"loss", "reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward"}
    assert os.path.isfile(tmp_path / "dpo" / REFERENCE_FILE)

    original = loop_module.lr_schedule

    def killed_at_step_5(step, *args, **kwargs):
        if step == 5:
            raise KeyboardInterrupt
        return original(step, *args, **kwargs)

    monkeypatch.setattr(loop_module, "lr_schedule", killed_at_step_5)
    dpo(config(base, tmp_path / "split", **options), log=quiet)
    monkeypatch.setattr(loop_module, "lr_schedule", original)
    cache = tmp_path / "split" / REFERENCE_FILE
    good = cache.read_bytes()
    cache.write_bytes(good[:-8] + b"\x00" * 8)
    with pytest.raises(CheckpointError, match="corrupt"):
        dpo(config(base, tmp_path / "split", resume=True, **options), log=quiet)
    cache.write_bytes(good)
    dpo(config(base, tmp_path / "split", resume=True, **options), log=quiet)
    assert {r["step"]: r["loss"] for r in records(tmp_path / "dpo")} == \
        {r["step"]: r["loss"] for r in records(tmp_path / "split")}
    a, _ = load_checkpoint(str(tmp_path / "dpo"))
    b, _ = load_checkpoint(str(tmp_path / "split"))
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        np.testing.assert_array_equal(x, y, err_msg=name)


def test_dpo_loss_is_log_2_when_policy_equals_reference(base, tmp_path):
    """No dropout and a learning rate of ~0: the policy stays the reference, every step's loss is log 2."""
    rng.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=len(CHARS) + 1, d_model=16, n_layers=1, n_heads=2, ffn_hidden=32, max_seq_len=64))
    save_checkpoint(str(tmp_path / "nodrop" / "checkpoints"), 1, model, None, {
        "model_config": model.config.to_dict(),
        "tokenizer": {"type": "char", "chars": "".join(CHARS), "special_tokens": ["<|endoftext|>"]}})
    dpo(config(base, tmp_path / "dpo", base=str(tmp_path / "nodrop"), data=base["preferences"], val_data="",
               max_steps=2, lr=1e-12, grad_accum=1), log=quiet)
    for record in records(tmp_path / "dpo"):
        assert record["loss"] == pytest.approx(math.log(2.0), abs=1e-5)
        assert record["reward_margin"] == pytest.approx(0.0, abs=1e-4)


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_sft_dpo_chat_and_bad_input(base, tmp_path, capsys):
    sft_dir, dpo_dir = str(tmp_path / "sft"), str(tmp_path / "dpo")
    common = ["--max-steps", "2", "--batch-size", "4", "--eval-interval", "2", "--no-progress"]
    assert main(["sft", base["run"], "--data", base["conversations"], "--out-dir", sft_dir] + common) == 0
    assert main(["dpo", sft_dir, "--data", base["preferences"], "--beta", "0.1", "--out-dir", dpo_dir] + common) == 0
    capsys.readouterr()

    class Args:
        run, system, max_new_tokens, temperature, top_k, top_p, seed, best, device = \
            dpo_dir, None, 5, 0.0, None, None, 0, False, "cpu"

    from tinygrad_llm.cli_posttrain import run_chat
    out = io.StringIO()
    assert run_chat(Args, stdin=io.StringIO("Who is there\n/reset\nGood night\n/quit\nignored\n"), stdout=out) == 0
    assert out.getvalue().count("\n") == 2                                 # one reply line per message

    assert main(["sft", str(tmp_path / "missing"), "--data", base["conversations"], "--out-dir", str(tmp_path / "x")]) == 1
    assert "sft: error: starting run: no checkpoint" in capsys.readouterr().err
    bad = write_jsonl(tmp_path / "bad.jsonl", ["{oops", {"messages": [{"role": "user", "content": "no answer"}]}])
    assert main(["sft", base["run"], "--data", bad, "--out-dir", str(tmp_path / "y"), "--no-progress"]) == 1
    err = capsys.readouterr()
    assert "no usable training examples" in err.err and "bad_json 1" in err.out and "no_assistant_turn 1" in err.out
    assert main(["sft", base["run"], "--builtin", "nope", "--out-dir", str(tmp_path / "z")]) == 1
    assert "unknown built-in task" in capsys.readouterr().err
    assert main(["chat", base["run"]]) == 1
    assert "no chat tokens" in capsys.readouterr().err
    # sample --chat: the prompt as a user turn, the reply stopping at <|end|> (the same as chat's first reply)
    assert main(["sample", dpo_dir, "--chat", "--prompt", "Who is there", "--max-new-tokens", "5",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out == out.getvalue().split("\n")[0] + "\n"
    assert main(["sample", base["run"], "--chat", "--prompt", "Hi"]) == 1
    assert "no chat tokens" in capsys.readouterr().err
    assert main(["dpo", sft_dir, "--data", str(tmp_path / "none.jsonl"), "--out-dir", str(tmp_path / "w")]) == 1
    assert "no such file" in capsys.readouterr().err


def test_chat_template_ids_feed_the_fine_tuned_model(base, tmp_path):
    sft(config(base, tmp_path / "sft", max_steps=1, eval_interval=1), log=quiet)
    model, state = load_checkpoint(str(tmp_path / "sft"))
    vocab = CharVocab(list(state["tokenizer"]["chars"]), tuple(state["tokenizer"]["special_tokens"]))
    ids, _ = apply_chat_template(vocab, [{"role": "user", "content": "Good night"}], add_generation_prompt=True)
    assert model.config.vocab_size == vocab.vocab_size == len(CHARS) + 5
    assert model(np.array([ids])).shape == (1, len(ids), vocab.vocab_size)


def test_long_conversations_need_a_longer_context(base, tmp_path, capsys):
    long = write_jsonl(tmp_path / "long.jsonl", [{"messages": [{"role": "user", "content": "Who is there? " * 5},
                                                               {"role": "assistant", "content": "Nay, answer me."}]}] * 4)
    args = ["sft", base["run"], "--data", long, "--max-steps", "1", "--batch-size", "2", "--eval-interval", "1",
            "--no-progress"]
    assert main(args + ["--out-dir", str(tmp_path / "short")]) == 1
    assert "longer than the context of 64: raise it with --max-seq-len" in capsys.readouterr().err
    assert main(args + ["--out-dir", str(tmp_path / "long"), "--max-seq-len", "128"]) == 0
    model, _ = load_checkpoint(str(tmp_path / "long"))
    assert model.config.max_seq_len == 128


@pytest.mark.parametrize("tied", [False, True])
def test_lora_merged_weights_give_the_adapted_model(tied):
    from tinygrad_llm.posttrain.chat import grow_vocabulary
    from tinygrad_llm.posttrain.lora import LoRA
    rng.manual_seed(1)
    config = GPTConfig(vocab_size=12, d_model=16, n_layers=1, n_heads=2, ffn_hidden=32, max_seq_len=16,
                       tie_embeddings=tied)
    model = GPT(config, dtype=np.float64)
    grow_vocabulary(model, 15)
    lora = LoRA(model, rank=2, alpha=4.0, seed=0, new_rows=3)
    generator = np.random.default_rng(0)
    for p in lora.parameters():
        p.data[...] = generator.standard_normal(p.shape) * 0.1              # non-zero B and new rows
    ids = np.array([[1, 13, 14, 2, 12]])
    with lora.applied():
        adapted = model(ids).numpy()
    merged = GPT(GPTConfig(**dict(config.to_dict(), vocab_size=15)), dtype=np.float64)
    merged.load_state_dict(lora.merged_state_dict())
    np.testing.assert_allclose(merged(ids).numpy(), adapted, rtol=1e-10, atol=1e-12)
    assert not np.allclose(model(ids).numpy(), adapted)                   # outside the block: the frozen base


def test_sft_from_a_bpe_run_adds_the_chat_tokens_to_its_tokenizer_file(base, tmp_path):
    import hashlib
    from tinygrad_llm.cli_posttrain import load_chat_model
    from tinygrad_llm.tokenizer import Tokenizer
    tokenizer = Tokenizer.train(" ".join(PHRASES) * 20, 300, special_tokens=["<|endoftext|>"])
    run = tmp_path / "bpe"
    run.mkdir()
    tokenizer.save(str(run / "tokenizer.json"))
    digest = hashlib.sha256((run / "tokenizer.json").read_bytes()).hexdigest()
    rng.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, d_model=16, n_layers=1, n_heads=2, ffn_hidden=32,
                          max_seq_len=64))
    save_checkpoint(str(run / "checkpoints"), 1, model, None, {
        "model_config": model.config.to_dict(),
        "tokenizer": {"type": "file", "path": str(run / "tokenizer.json"), "run_file": "tokenizer.json",
                      "sha256": digest}})
    sft(config(base, tmp_path / "sft", base=str(run), max_steps=1, eval_interval=1), log=quiet)
    tuned, chat_tokenizer = load_chat_model(str(tmp_path / "sft"))
    assert chat_tokenizer.vocab_size == tokenizer.vocab_size + 4 == tuned.config.vocab_size
    assert chat_tokenizer.encode("Good night") == tokenizer.encode("Good night")
    assert os.path.isfile(tmp_path / "sft" / "tokenizer.json")
