"""Built-in evaluation tasks (on small synthetic plays) and the `tinygrad-llm eval --task` command."""
from __future__ import annotations

import json

import pytest

from text_sample import SHAKESPEARE
from tinygrad_llm.cli import main
from tinygrad_llm.data.plays import Line, Play, Scene
from tinygrad_llm.evals.builtin import (CHOICES, TASK_NAMES, builtin_task, is_chat_tokenizer, render_chat,
                                        render_speeches)


def synthetic_plays():
    """Two plays of two scenes, four speakers each, speeches of two verse lines of usable length."""
    plays = []
    for p in range(2):
        scenes = []
        for s in range(2):
            lines = tuple(Line(f"SPEAKER{p}{(s + k) % 5}",
                               f"Play {p} scene {s} speech {k} first line\nPlay {p} scene {s} speech {k} second one")
                          for k in range(6))
            scenes.append(Scene(f"Act I, Scene {s + 1}", lines))
        plays.append(Play(f"Play {p}", tuple(scenes)))
    return plays


def _true_line(item):
    return item.choices[item.gold]


def test_next_line_items_continue_their_context_and_draw_distractors_from_the_same_play():
    task = builtin_task("shakespeare_next_line", plays=synthetic_plays(), limit=1000)
    assert task.items and task.chance == 1 / CHOICES and task.name == "shakespeare_next_line"
    for item in task.items:
        play = item.id.split("|")[0]
        assert len(set(item.choices)) == CHOICES and item.target_delimiter == "\n"
        assert all(choice.startswith(play) for choice in item.choices)       # every choice from the same play
        truth = _true_line(item)
        if truth.endswith("first line"):                  # a speech's first line: its speaker's name ends the context
            assert item.context.split("\n")[-1].startswith(f"SPEAKER{play[-1]}")
        else:
            assert item.context.endswith(truth.replace("second one", "first line"))
        assert truth not in item.context


def test_speaker_items_attribute_one_line_to_four_speakers_in_both_forms():
    plain = builtin_task("shakespeare_speaker", plays=synthetic_plays(), limit=1000)
    distinct = [Play(play.title, tuple(Scene(scene.name, tuple(Line(line.speaker, f"Speech {i} {line.text}")
                                                                   for i, line in enumerate(scene.lines)))
                                       for scene in play.scenes)) for play in synthetic_plays()]
    chat = builtin_task("shakespeare_speaker", chat=True, plays=distinct, limit=1000)
    assert plain.name == "shakespeare_speaker" and chat.name == "shakespeare_speaker_chat"
    for item in plain.items:
        names = [choice.split("\n")[0] for choice in item.choices]
        lines = {choice.split("\n", 1)[1] for choice in item.choices}
        assert len(set(names)) == CHOICES and len(lines) == 1 and item.target_delimiter == "\n\n"
    assert chat.items
    for item in chat.items:
        assert item.context.startswith("<|user|>\n") and item.context.endswith("<|end|>\n<|assistant|>\n")
        *rows, question = item.context[len("<|user|>\n"):-len("<|end|>\n<|assistant|>\n")].split("\n")
        asked = question[len('Who says "'):-len('"?')]
        speakers = [row.split(": ", 1)[0] for row in rows if row.split(": ", 1)[1] == asked]
        assert speakers == [_true_line(item)] and 2 <= len(rows) <= 3           # the answer is in the excerpt
        assert all(choice.startswith("SPEAKER") and "\n" not in choice for choice in item.choices)
        assert len(set(item.choices)) == CHOICES


def test_continue_items_ask_for_the_first_line_of_the_next_speech():
    task = builtin_task("shakespeare_continue", chat=True, plays=synthetic_plays(), limit=1000)
    assert task.items and task.name == "shakespeare_continue_chat"
    for item in task.items:
        truth = _true_line(item)
        speech = int(truth.split("speech ")[1].split()[0])
        asked = truth.replace(f"speech {speech} ", f"speech {speech - 1} ")
        assert item.context == f'<|user|>\nContinue: "{asked}"<|end|>\n<|assistant|>\n'
        assert all(choice.endswith("first line") for choice in item.choices) and len(set(item.choices)) == CHOICES
    plain = builtin_task("shakespeare_continue", plays=synthetic_plays())
    assert plain.items[0].context.startswith('Continue: "') and plain.items[0].context.endswith('"\n')


def test_builtin_tasks_are_deterministic_and_limited():
    first = builtin_task("shakespeare_next_line", plays=synthetic_plays(), limit=7)
    again = builtin_task("shakespeare_next_line", plays=synthetic_plays(), limit=7)
    assert len(first.items) == 7 and first.items == again.items
    assert builtin_task("shakespeare_next_line", plays=synthetic_plays(), limit=7, seed=1).items != first.items
    with pytest.raises(ValueError, match="unknown built-in task"):
        builtin_task("hellaswag")


def test_rendering_matches_the_corpus_layout_and_the_chat_template():
    assert render_speeches([Line("A", "x\ny"), Line("B", "z")]) == "A\nx\ny\n\nB\nz"
    jinja2 = pytest.importorskip("jinja2")
    from tinygrad_llm.tokenizer import CHAT_TEMPLATE
    messages = [("system", "Be brief."), ("user", "Who?")]
    expected = jinja2.Template(CHAT_TEMPLATE).render(messages=[{"role": r, "content": c} for r, c in messages],
                                                     add_generation_prompt=True)
    assert render_chat(messages) == expected


def test_chat_form_is_chosen_by_the_tokenizer():
    from tinygrad_llm.tokenizer import CharVocab
    from tinygrad_llm.tokenizer import CHAT_SPECIAL_TOKENS
    assert not is_chat_tokenizer(CharVocab(list("ab")))
    assert is_chat_tokenizer(CharVocab(list("ab"), special_tokens=CHAT_SPECIAL_TOKENS))
    assert set(TASK_NAMES) == {"shakespeare_next_line", "shakespeare_speaker", "shakespeare_continue"}


# ------------------------------------------------------------------------------------------ the command
SMALL = ["--d-model", "32", "--n-layers", "1", "--n-heads", "4", "--ffn-hidden", "32", "--batch-size", "2",
         "--seq-len", "32", "--max-steps", "2", "--eval-interval", "2", "--eval-iters", "1", "--warmup-steps", "1",
         "--no-progress"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("evals_cli")
    text = root / "text.txt"
    text.write_text(SHAKESPEARE * 2, encoding="utf-8")
    out = root / "run"
    assert main(["train", "--data", str(text), "--out-dir", str(out), *SMALL]) == 0
    return out


@pytest.fixture
def task_file(tmp_path):
    path = tmp_path / "task.jsonl"
    rows = [{"context": "ROMEO:", "choices": ["What", "Whatever is"], "gold": 0},
            {"context": "JULIET:\nO Romeo, Romeo", "choices": ["!", "?", "."], "gold": 1},
            {"context": "A" * 80, "choices": ["nd", "bc"], "gold": 0},               # longer than the window
            {"context": "x", "choices": ["a"], "gold": 3}]                        # gold out of range
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n", encoding="utf-8")
    return path


def test_eval_task_prints_a_summary_and_writes_per_item_results(run_dir, task_file, tmp_path, capsys):
    out = tmp_path / "results.json"
    assert main(["eval", str(run_dir), "--task", str(task_file), "--output", str(out), "--batch-size", "2"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["n_items"] == 3 and shown["skipped"] == {"gold_out_of_range": 1} and shown["truncated"] == 1
    assert "items" not in shown and 0 <= shown["metrics"]["acc"]["value"] <= 1
    saved = json.loads(out.read_text())
    assert [len(item["lls"]) for item in saved["items"]] == [2, 3, 2] and saved["step"] == 2
    assert main(["eval", str(run_dir), "--task", str(task_file), "--limit", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["n_items"] == 1


def test_eval_against_scores_two_runs_on_the_same_items(run_dir, task_file, capsys):
    assert main(["eval", str(run_dir), "--task", str(task_file), "--against", str(run_dir)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["same_prediction"] == 1.0 and shown["difference"]["acc"] == 0.0
    assert shown["first"]["n_items"] == shown["second"]["n_items"] == 3


@pytest.mark.parametrize("extra, code, message", [
    (["--task", "no_such_task"], 1, "not a built-in task"),
    (["--task", "BAD"], 1, "no usable"),
    (["--task", "missing.jsonl"], 1, "not a built-in task"),
    (["--against", "x"], 2, "give --task"),
    (["--task", "shakespeare_speaker_chat"], 1, "no chat tokens"),
    (["--task", "TASK", "--data", "x.txt"], 2, "do not go with --task"),
])
def test_eval_task_errors_are_one_line(run_dir, task_file, tmp_path, capsys, extra, code, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n", encoding="utf-8")
    extra = [{"TASK": str(task_file), "BAD": str(bad)}.get(a, a) for a in extra]
    assert main(["eval", str(run_dir), *extra]) == code
    err = capsys.readouterr().err.strip()
    assert err.startswith("tinygrad-llm eval: error:") and message in err and "\n" not in err
