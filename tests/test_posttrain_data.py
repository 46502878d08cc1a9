"""Post-training data: JSONL readers count every skip, the built-in task, encoding, batches and padding."""
import json

import numpy as np
import pytest
from hypothesis import given, strategies as st

from tinygrad_llm.data.plays import Line, Play, Scene, split_plays
from tinygrad_llm.data.shards import CharVocab
from tinygrad_llm.posttrain.chat import with_chat_tokens
from tinygrad_llm.posttrain.data import (IGNORE, PostTrainDataError, Sequence, batch_indices, collate,
                                         builtin_split, encode_conversations, encode_preferences, play_tasks,
                                         read_conversations,
                                         read_preferences, sft_targets)

VOCAB = with_chat_tokens(CharVocab(sorted(set("abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ.,?:;'\"!\n"))))


def write_lines(path, lines):
    path.write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n", encoding="utf-8")
    return str(path)


def turn(role, content):
    return {"role": role, "content": content}


def test_read_conversations_counts_every_skip(tmp_path):
    good = {"messages": [turn("user", "Who is there?"), turn("assistant", "Nay, answer me.")]}
    path = write_lines(tmp_path / "c.jsonl", [
        good, "", "{broken", [1, 2], {"text": "no messages"},
        {"messages": [turn("narrator", "x"), turn("assistant", "y")]},
        {"messages": [turn("user", "hi"), turn("assistant", "  ")]},
        {"messages": [turn("user", "hi"), turn("system", "only")]},
        {"messages": "not a list"}, good])
    conversations, report = read_conversations(path)
    assert len(conversations) == 2 and report.kept == 2
    assert report.skipped == {"bad_json": 2, "missing_field": 1, "unknown_role": 1, "empty_content": 1,
                              "no_assistant_turn": 1, "bad_messages": 1}
    assert report.lines == report.kept + sum(report.skipped.values()) == 9     # the blank line is not a record
    text = report.format()
    assert "line 3: bad_json" in text and "unknown_role" in text


def test_read_preferences_accepts_strings_and_message_lists(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [
        {"prompt": "Who says it?", "chosen": "HAMLET", "rejected": "HORATIO"},
        {"prompt": [turn("system", "Be terse."), turn("user", "Who?")], "chosen": [turn("assistant", "A")],
         "rejected": [turn("assistant", "B")]},
        {"prompt": "x", "chosen": "same", "rejected": "same"},
        {"prompt": "x", "chosen": "y"},
        {"prompt": "x", "chosen": "", "rejected": "z"}])
    rows, report = read_preferences(path)
    assert report.kept == 2 and report.skipped == {"chosen_equals_rejected": 1, "missing_field": 1, "empty_content": 1}
    assert rows[0]["prompt"] == [turn("user", "Who says it?")] and rows[0]["chosen"] == [turn("assistant", "HAMLET")]
    with pytest.raises(PostTrainDataError, match="no such file"):
        read_preferences(str(tmp_path / "missing.jsonl"))


def test_encoding_counts_too_long_and_unencodable():
    conversations = [[turn("user", "hi"), turn("assistant", "ok")],
                     [turn("user", "a" * 80), turn("assistant", "ok")],
                     [turn("user", "caf\u00e9"), turn("assistant", "ok")]]
    sequences, report = encode_conversations(conversations, VOCAB, max_len=40)
    assert len(sequences) == 1 and report.skipped == {"longer_than_context": 1, "unencodable": 1}
    assert VOCAB.decode(sequences[0].ids[sequences[0].mask == 1]) == "ok<|end|>"


def test_preference_masks_cover_the_completion_only():
    rows = [{"prompt": [turn("user", "Q"), turn("assistant", "earlier"), turn("user", "again")],
             "chosen": [turn("assistant", "good")], "rejected": [turn("assistant", "bad")]}]
    (pair,), report = encode_preferences(rows, VOCAB, max_len=200)
    assert report.kept == 1
    assert VOCAB.decode(pair[0].ids[pair[0].mask == 1]) == "good<|end|>"
    assert VOCAB.decode(pair[1].ids[pair[1].mask == 1]) == "bad<|end|>"


def test_collate_pads_right_and_masks_pads_and_context():
    a = Sequence(np.array([5, 6, 7, 8]), np.array([0, 0, 1, 1], dtype=np.uint8))
    b = Sequence(np.array([9, 10]), np.array([0, 1], dtype=np.uint8))
    x, y, mask = collate([a, b], pad_id=0)
    assert x.tolist() == [[5, 6, 7], [9, 0, 0]] and y.tolist() == [[6, 7, 8], [10, 0, 0]]
    assert mask.tolist() == [[0, 1, 1], [1, 0, 0]]
    assert sft_targets(y, mask).tolist() == [[IGNORE, 7, 8], [10, IGNORE, IGNORE]]


@given(count=st.integers(1, 30), batch=st.integers(1, 7), seed=st.integers(0, 1000))
def test_batches_visit_each_example_once_per_epoch(count, batch, seed):
    steps = (2 * count + batch - 1) // batch
    flat = [i for step in range(steps) for i in batch_indices(count, batch, step, seed)]
    assert sorted(flat[:count]) == list(range(count)) and sorted(flat[count:2 * count]) == list(range(count))
    assert batch_indices(count, batch, 3, seed) == batch_indices(count, batch, 3, seed)


def synthetic_plays(n=5):
    plays = []
    for p in range(n):
        scenes = []
        for s in range(2):
            speakers = [f"SPEAKER {chr(65 + k)}{p}" for k in range(3)]
            lines = tuple(Line(speakers[i % 3], f"P{p}S{s}L{i} speaks here, my good lord")
                          for i in range(8))
            scenes.append(Scene(f"Act I, Scene {s + 1}", lines))
        plays.append(Play(f"Play {p}", tuple(scenes)))
    return plays


def excerpt_rows(prompt):
    """(speaker, text) rows of a built-in question's excerpt and the question line."""
    *rows, question = prompt.split("\n")
    return [tuple(row.split(": ", 1)) for row in rows], question


def answer_from_prompt(example):
    """The answer read off the prompt alone, as the task promises it can be."""
    rows, question = excerpt_rows(example.prompt)
    if example.task == "who_says":
        quoted = question[len('Who says "'):-len('"?')]
        return [speaker for speaker, text in rows if text == quoted][0]
    asked = question[len("Who speaks after "):-1]
    return [rows[i + 1][0] for i in range(len(rows) - 1) if rows[i][0] == asked][0]


def test_play_tasks_are_split_by_play_and_answerable_from_the_prompt():
    plays = synthetic_plays()
    train, held = builtin_split("plays", 0.4, seed=1, per_task=5, plays=plays)
    train_plays, held_plays = split_plays(plays, 0.4, seed=1)
    assert {e.task for e in train} == {e.task for e in held} == {"who_says", "next_speaker"}
    held_titles = {p.title for p in held_plays}
    assert all(e.play not in held_titles for e in train) and all(e.play in held_titles for e in held)
    held_texts = {line.text.split()[0] for p in held_plays for line in p.lines}
    assert not any(text in e.prompt for e in train for text in held_texts)          # no held-out speech in training
    consecutive = {p.title: [(l.speaker, l.text) for l in p.lines] for p in plays}
    for example in train + held:
        rows, _ = excerpt_rows(example.prompt)
        names = {speaker for speaker, _ in rows}
        assert answer_from_prompt(example) == example.answer
        assert example.wrong != example.answer and example.wrong in names
        speeches = consecutive[example.play]
        starts = [i for i in range(len(speeches) - len(rows) + 1)
                  if all(speeches[i + k][1].startswith(text) for k, (_, text) in enumerate(rows))]
        assert len(starts) == 1                                   # consecutive speeches of the example's play
        real = [speeches[starts[0] + k][0] for k in range(len(rows))]
        shown = [speaker for speaker, _ in rows]
        if example in held:
            assert shown == real                                  # held-out questions keep the real names
        else:                                                     # training ones rename them one to one
            assert len(set(zip(real, shown))) == len(set(real)) == len(set(shown))
    assert play_tasks(train_plays, per_task=5, seed=0) == play_tasks(train_plays, per_task=5, seed=0)
    conversation = train[0].messages()
    assert conversation[-1] == turn("assistant", train[0].answer)
    preference = train[0].preference()
    assert preference["chosen"][0]["content"] == train[0].answer and preference["rejected"][0]["content"] == train[0].wrong


def test_validation_split_is_cut_from_the_training_plays_only():
    plays = synthetic_plays(10)
    _, test = builtin_split("plays", 0.2, per_task=3, plays=plays)
    fit, validation = builtin_split("plays", 0.2, per_task=3, plays=plays, validation=True)
    test_titles, validation_titles = {e.play for e in test}, {e.play for e in validation}
    assert validation_titles and not validation_titles & test_titles
    assert not {e.play for e in fit} & (test_titles | validation_titles)


@given(speakers=st.lists(st.sampled_from(["ANNE", "BEN", "CLEO", "ALL"]), min_size=3, max_size=12),
       seed=st.integers(0, 50))
def test_every_question_of_any_scene_is_answerable_from_its_prompt(speakers, seed):
    lines = tuple(Line(name, f"Speech {i} of the scene, good sir") for i, name in enumerate(speakers))
    play = Play("Only", (Scene("Act I, Scene I", lines),))
    for example in play_tasks([play], per_task=50, seed=seed):
        rows, _ = excerpt_rows(example.prompt)
        assert answer_from_prompt(example) == example.answer != example.wrong
        assert "ALL" not in {speaker for speaker, _ in rows} and len({speaker for speaker, _ in rows}) >= 2


def test_exact_match_counts_per_kind(monkeypatch):
    from tinygrad_llm.posttrain import evaluate
    from tinygrad_llm.posttrain.data import TaskExample
    examples = [TaskExample("who_says", "P", "Who says it?", "HAMLET", "HORATIO"),
                TaskExample("who_says", "P", "Who says that?", "OSRIC", "HAMLET"),
                TaskExample("next_speaker", "P", "Who speaks after OSRIC?", "HAMLET", "OSRIC")]
    replies = {"Who says it?": " HAMLET ", "Who says that?": "HAMLET", "Who speaks after OSRIC?": "HAMLET"}

    def fake_reply(model, prompt_ids, end_id, limit):
        text = VOCAB.decode(prompt_ids).split("<|user|>\n")[1].split("<|end|>")[0]
        return VOCAB.encode_ordinary(replies[text])

    monkeypatch.setattr(evaluate, "greedy_reply_ids", fake_reply)
    model = type("M", (), {"config": type("C", (), {"max_seq_len": 200})()})()
    result = evaluate.exact_match(model, VOCAB, examples)
    assert result == {"next_speaker": 1.0, "who_says": 0.5, "all": 2 / 3, "count": 3}
