"""Multiple-choice evaluation: scores against a brute-force per-choice computation, metrics, task files."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinygrad_llm import manual_seed
from tinygrad_llm.tokenizer import CharVocab
from tinygrad_llm.evals import (Item, Task, TaskFileError, bootstrap_stderr, encode_pair, evaluate_task,
                                item_predictions, mean_stderr, read_task_file, score_groups, token_logprobs,
                                write_task_file)
from tinygrad_llm.evals.scoring import encode
from tinygrad_llm.model import GPT, GPTConfig
from tinygrad_llm.tensor import no_grad

WINDOW = 24
ALPHABET = "abcdefghij ,.\n"


@pytest.fixture(scope="module")
def model():
    manual_seed(3)
    net = GPT(GPTConfig(vocab_size=len(ALPHABET) + 1, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                        ffn_hidden=48, max_seq_len=WINDOW))
    for _, parameter in net.named_parameters():        # larger weights: scores far apart, no near-ties
        parameter.data *= 8
    return net


@pytest.fixture(scope="module")
def model64(model):
    """The same model in float64: batched scoring and the one-request forward then agree to rounding."""
    manual_seed(3)
    net = GPT(model.config)
    net.load_state_dict({name: p.data for name, p in model.named_parameters()})
    return net.to(dtype=np.float64)


@pytest.fixture(scope="module")
def vocab():
    return CharVocab(sorted(ALPHABET), special_tokens=("<|endoftext|>",))


def brute_force_ll(model, context_ids, continuation_ids):
    """Σ log p(continuation) from one unbatched forward of this request alone, in float64."""
    tokens = (list(context_ids) + list(continuation_ids))[-(WINDOW + 1):]
    inputs = np.asarray(tokens[:-1], dtype=np.int64)[None, :]
    with no_grad():
        logits = model(inputs).data[0].astype(np.float64)                        # (T, V)
    log_probs = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) \
        - logits.max(1, keepdims=True)
    start = len(tokens) - 1 - len(continuation_ids)
    return sum(log_probs[start + j, t] for j, t in enumerate(continuation_ids))


def random_groups(seed, count=12, vocab_size=len(ALPHABET) + 1):
    r = np.random.default_rng(seed)
    return [([int(t) for t in r.integers(0, vocab_size, r.integers(1, 2 * WINDOW))],
             [[int(t) for t in r.integers(0, vocab_size, r.integers(1, 8))] for _ in range(r.integers(1, 5))])
            for _ in range(count)]


# ------------------------------------------------------------------------------------------ scoring
@pytest.mark.parametrize("strategy", ["rows", "shared"])
@pytest.mark.parametrize("batch_size", [1, 5, 64])
def test_scores_equal_a_brute_force_per_choice_computation(model64, strategy, batch_size):
    groups = random_groups(0)
    scores = score_groups(model64, groups, batch_size=batch_size, strategy=strategy)
    for (context, continuations), item_scores in zip(groups, scores):
        for continuation, score in zip(continuations, item_scores):
            assert score.ll == pytest.approx(brute_force_ll(model64, context, continuation), abs=1e-9)
            assert score.truncated == (len(context) + len(continuation) > WINDOW + 1)


@pytest.mark.parametrize("strategy", ["rows", "shared"])
def test_scores_on_each_backend_equal_the_cpu_brute_force(model, backend, strategy):
    """The same weights on the backend's device (the GPU for cupy) give the CPU's brute-force scores."""
    manual_seed(3)
    twin = GPT(model.config)
    twin.load_state_dict(model.state_dict())
    twin.to(device=backend.device)
    groups = random_groups(2, count=5)
    for (context, continuations), item_scores in zip(groups, score_groups(twin, groups, 4, strategy)):
        for continuation, score in zip(continuations, item_scores):
            assert score.ll == pytest.approx(brute_force_ll(model, context, continuation), abs=1e-3)


def test_greedy_flag_is_true_exactly_when_every_token_is_the_argmax(model):
    context = [1, 2, 3]
    greedy = []
    with no_grad():
        for _ in range(3):                                           # the model's own greedy continuation
            logits = model(np.asarray([context + greedy])).data[0, -1]
            greedy.append(int(np.argmax(logits)))
    other = (greedy[-1] + 1) % (len(ALPHABET) + 1)
    (best, worse), = score_groups(model, [(context, [greedy, greedy[:-1] + [other]])])
    assert best.greedy and not worse.greedy and best.ll > worse.ll


def test_token_logprobs_is_the_log_softmax(model):
    r = np.random.default_rng(1)
    logits = r.normal(size=(6, 9)).astype(np.float32) * 30
    targets = r.integers(0, 9, 6)
    logprobs, greedy = token_logprobs(logits, targets)
    exact = logits.astype(np.float64)
    exact = exact[np.arange(6), targets] - np.log(np.exp(exact).sum(1))
    np.testing.assert_allclose(logprobs, exact, rtol=1e-10)
    assert (greedy == (targets == logits.argmax(1))).all()


def test_bad_requests_are_refused(model):
    with pytest.raises(ValueError, match="window"):
        score_groups(model, [([1], [[2] * (WINDOW + 1)])])
    with pytest.raises(ValueError, match="context"):
        score_groups(model, [([], [[2]])])
    with pytest.raises(ValueError, match="strategy"):
        score_groups(model, [([1], [[2]])], strategy="fast")


# ------------------------------------------------------------------------------------------ encoding
def test_encode_pair_moves_trailing_whitespace_and_uses_eot_for_an_empty_context(vocab):
    context, continuation = encode_pair(vocab, "ab c ", "de")
    assert context == vocab.encode("ab c") and continuation == vocab.encode(" de")
    context, continuation = encode_pair(vocab, "", "ab", eot_id=vocab.eot_id)
    assert context == [vocab.eot_id] and continuation == vocab.encode("ab")
    with pytest.raises(ValueError, match="end-of-text"):
        encode_pair(vocab, "  ", "ab", eot_id=None)


def test_encode_pair_splits_the_whole_encoding_after_the_context_tokens():
    from tinygrad_llm.tokenizer import Tokenizer
    tokenizer = Tokenizer.train("the cat sat on the mat " * 20, 262)
    context, continuation = encode_pair(tokenizer, "the cat", " sat on")
    whole = tokenizer.encode("the cat sat on")
    assert context + continuation == whole and context == tokenizer.encode("the cat")


def test_encode_turns_special_token_names_into_their_ids_like_the_chat_template():
    from tinygrad_llm.evals.builtin import render_chat
    from tinygrad_llm.tokenizer import CHAT_SPECIAL_TOKENS, Tokenizer, encode_chat
    char_vocab = CharVocab(sorted(set("Who says: \"ab cd\"?\n")), special_tokens=CHAT_SPECIAL_TOKENS)
    bpe = Tokenizer.train("who says ab cd? " * 30, 270, special_tokens=list(CHAT_SPECIAL_TOKENS))
    messages = [{"role": "user", "content": 'Who says: "ab cd"?'}]
    for tokenizer in (char_vocab, bpe):
        expected, _ = encode_chat(messages, tokenizer.encode_ordinary, dict(tokenizer.special_tokens), True)
        assert encode(tokenizer, render_chat([("user", messages[0]["content"])])) == expected


# ------------------------------------------------------------------------------------------ metrics
def test_acc_norm_divides_by_characters_and_acc_bytes_by_utf8_bytes():
    scores = item_predictions([-10.0, -12.0], ["ab", "abcdef"], gold=1)
    assert (scores["pred"], scores["pred_norm"], scores["pred_bytes"]) == (0, 1, 1)
    assert (scores["acc"], scores["acc_norm"]) == (0, 1)
    # "éé": 2 characters, 4 bytes; "ab": 2 and 2. Per character -2 vs -1.5; per byte -1 vs -1.5.
    scores = item_predictions([-4.0, -3.0], ["éé", "ab"], gold=0)
    assert (scores["pred_norm"], scores["pred_bytes"]) == (1, 0)
    assert (scores["acc_norm"], scores["acc_bytes"]) == (0, 1)


def test_ties_go_to_the_first_choice():
    assert item_predictions([-1.0, -1.0, -2.0], ["a", "b", "c"], gold=1)["pred"] == 0


def test_standard_errors():
    assert bootstrap_stderr([1, 1, 1, 1]) == 0.0 and mean_stderr([0, 0, 0]) == 0.0
    values = np.random.default_rng(0).integers(0, 2, 400)
    analytic = mean_stderr(values)
    assert analytic == pytest.approx(math.sqrt(values.mean() * (1 - values.mean()) / 399), rel=1e-9)
    assert bootstrap_stderr(values) == pytest.approx(analytic, rel=0.15)
    assert bootstrap_stderr(values) == bootstrap_stderr(values)            # seeded: reproducible


# ------------------------------------------------------------------------------------------ evaluate_task
def test_evaluate_task_counts_truncation_and_skips_what_cannot_be_scored(model, vocab):
    items = [Item("abc", ("de", "fg"), 0, " "),
             Item("a" * (3 * WINDOW), ("bc", "de"), 1, " "),                   # context cut on the left
             Item("ab", ("c" * (WINDOW + 1), "d"), 0, ""),                     # a choice longer than the window
             Item("ab", ("xyz", "d"), 0, " "),                                 # x, y, z are not in the vocabulary
             Item("", ("ab", "cd"), 1, "")]                                    # empty context: <|endoftext|>
    task = Task("t", items)
    task.skip("gold_out_of_range", 7)
    results = evaluate_task(model, vocab, task, batch_size=3)
    assert results["n_items"] == 3 and results["truncated"] == 1
    assert results["skipped"] == {"continuation_longer_than_window": 1, "gold_out_of_range": 1,
                                  "unencodable_text": 1}
    truncated = results["items"][1]
    context, continuation = encode_pair(vocab, items[1].context, " bc")
    assert truncated["truncated"] and truncated["lls"][0] == pytest.approx(
        brute_force_ll(model, context, continuation), abs=2e-4)
    empty = results["items"][2]
    assert empty["lls"][1] == pytest.approx(brute_force_ll(model, [vocab.eot_id], vocab.encode("cd")), abs=2e-4)
    assert results["chance"] == 0.5
    for metric in ("acc", "acc_norm", "acc_bytes"):
        assert results["metrics"][metric]["value"] == np.mean([i[metric] for i in results["items"]])


@settings(max_examples=15)
@given(st.permutations(range(4)), st.integers(0, 3))
def test_permuting_the_choices_permutes_the_scores(model, vocab, permutation, gold):
    choices = ("ab c", "de", "fghij", "a.b")
    item = Item("ba, cd\nef", choices, gold, " ")
    shuffled = Item(item.context, tuple(choices[i] for i in permutation), permutation.index(gold), " ")
    first, second = (evaluate_task(model, vocab, Task("t", [x]), bootstrap_iters=10)["items"][0]
                     for x in (item, shuffled))
    np.testing.assert_allclose(second["lls"], [first["lls"][i] for i in permutation], atol=2e-4)
    assert (first["acc"], first["acc_norm"]) == (second["acc"], second["acc_norm"])


@settings(max_examples=10)
@given(st.integers(1, 70))
def test_batch_size_and_strategy_do_not_change_the_scores(model, vocab, batch_size):
    items = [Item("ab" * n, ("c d", "e", "fg."), n % 3, " ") for n in range(1, 20, 3)]
    reference = evaluate_task(model, vocab, Task("t", items), batch_size=4, bootstrap_iters=10)["items"]
    for strategy in ("rows", "shared"):
        other = evaluate_task(model, vocab, Task("t", items), batch_size=batch_size, strategy=strategy,
                              bootstrap_iters=10)["items"]
        for a, b in zip(reference, other):
            np.testing.assert_allclose(a["lls"], b["lls"], atol=2e-4)


# ------------------------------------------------------------------------------------------ task files
def test_task_file_counts_every_kind_of_bad_row(tmp_path):
    rows = [json.dumps({"context": "a", "choices": ["b", "c"], "gold": 1}),
            json.dumps({"context": "a", "choices": ["b", "c"], "gold": 2}),
            json.dumps({"context": "a", "choices": ["b", "c"], "gold": -1}),
            json.dumps({"context": "a", "choices": [], "gold": 0}),
            json.dumps({"context": "a", "choices": ["b", ""], "gold": 0}),
            json.dumps({"context": "a", "choices": ["b", 3], "gold": 0}),
            json.dumps({"context": "a", "choices": ["b"], "gold": True}),
            json.dumps({"context": "a", "choices": "b c", "gold": 0}),
            json.dumps({"context": "a", "choices": ["b"]}),
            json.dumps([1, 2]),
            '{"context": "a", "choices": ["b"',
            "",
            json.dumps({"context": "x", "choices": ["y", "z"], "gold": "0", "target_delimiter": "\n", "id": "q7"})]
    path = tmp_path / "task.jsonl"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    task = read_task_file(str(path))
    assert [(i.context, i.choices, i.gold) for i in task.items] == [("a", ("b", "c"), 1), ("x", ("y", "z"), 0)]
    assert task.items[1].target_delimiter == "\n" and task.items[1].id == "q7" and task.items[0].id == 1
    assert dict(task.problems) == {"gold_out_of_range": 2, "empty_choices": 1, "empty_choice": 1,
                                   "choice_not_text": 1, "gold_not_an_integer": 1, "choices_not_a_list": 1,
                                   "missing_fields": 1, "not_an_object": 1, "unreadable_json": 1}
    assert task.examples["gold_out_of_range"] == [2, 3] and task.examples["unreadable_json"] == [11]
    assert len(read_task_file(str(path), limit=1).items) == 1


def test_hellaswag_rows_are_preprocessed_as_the_harness_does(tmp_path):
    row = {"ind": 4, "activity_label": "Making a cake", "ctx_a": "A woman stirs a bowl.",
           "ctx_b": "she", "ctx": "A woman stirs a bowl. she",
           "endings": ["pours it [title] into a tin.", "eats  it.", "sings [header] loudly.", "leaves."],
           "label": "2"}
    unlabeled = dict(row, label="")
    path = tmp_path / "hs.jsonl"
    path.write_text(json.dumps(row) + "\n" + json.dumps(unlabeled) + "\n", encoding="utf-8")
    task = read_task_file(str(path))
    item, = task.items
    assert item.context == "Making a cake: A woman stirs a bowl. She"
    assert item.choices == ("pours it. into a tin.", "eats it.", "sings loudly.", "leaves.")
    assert item.gold == 2 and item.id == 4 and item.target_delimiter == " "
    assert dict(task.problems) == {"gold_missing": 1}


def test_unreadable_task_files_raise_one_line_errors(tmp_path):
    cases = {"missing": tmp_path / "nope.jsonl", "directory": tmp_path}
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b'{"context": "\xff\xfe"}\n')
    empty = tmp_path / "bad.jsonl"
    empty.write_text('{"context": "a", "choices": [], "gold": 0}\nnot json\n', encoding="utf-8")
    cases.update(binary=binary, bad=empty)
    for path in cases.values():
        with pytest.raises(TaskFileError) as error:
            read_task_file(str(path))
        assert "\n" not in str(error.value)
    with pytest.raises(TaskFileError, match="empty_choices 1, unreadable_json 1"):
        read_task_file(str(empty))


def test_write_task_file_round_trips(tmp_path):
    task = Task("t", [Item("a", ("b", "c d"), 1, "\n", "x"), Item("é", ("ü",), 0, " ", 3)])
    write_task_file(task, str(tmp_path / "out.jsonl"))
    assert read_task_file(str(tmp_path / "out.jsonl")).items == task.items
