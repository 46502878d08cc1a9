"""The prepare and train-classifier commands end to end on small inputs (no network)."""
import json
import os

import numpy as np

from tinygrad_llm.cli_prepare import main
from tinygrad_llm.data.loader import DataLoader
from tinygrad_llm.data.shards import read_shard
from tinygrad_llm.tokenizer import CharVocab

PARAGRAPH = ("The quality of mercy is not strained; it droppeth as the gentle rain from heaven upon the place "
             "beneath. It is twice blest: it blesseth him that gives and him that takes. ")


def _corpus(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    for i in range(12):
        words = PARAGRAPH.split()
        rng = np.random.default_rng(i)
        text = " ".join(w for _ in range(3) for w in rng.permutation(words).tolist())
        (src / f"doc{i:02d}.txt").write_text(text + f" number {i}.\n")
    (src / "copy.txt").write_text((src / "doc00.txt").read_text())          # exact duplicate
    (src / "sub" / "short.md").write_text("too short")                       # fails word_count
    (src / "empty.txt").write_text("")
    (src / "blob.txt").write_bytes(bytes(range(256)) * 4)
    return src


def test_prepare_writes_shards_report_and_vocab(tmp_path, capsys):
    src = _corpus(tmp_path)
    out = tmp_path / "out"
    code = main(["prepare", str(src), "--out", str(out), "--no-progress", "--workers", "2", "--val-fraction", "0.25"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "exact_dedup" in printed and "duplicate_content 1" in printed and "word_count 1" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["sources"]["empty"] == 1 and report["sources"]["binary"] == 1
    stages = {s["stage"]: s for s in report["stages"]}
    assert stages["read"]["docs_in"] == 16 and stages["read"]["docs_out"] == 14
    assert stages["read"]["dropped"] == {"binary": 1, "empty": 1}
    assert stages["filters"]["dropped"] == {"word_count": 1}
    assert report["kept_documents"] == 12
    vocab = CharVocab.load(out / "vocab.json")
    tokens = report["tokens"]
    assert tokens["train"]["documents"] + tokens["val"]["documents"] == 12
    train = np.concatenate([read_shard(out / n) for n in tokens["train"]["shards"]])
    assert len(train) == tokens["train"]["tokens"]
    docs = vocab.decode(train).split("<|endoftext|>")[1:]
    assert len(docs) == tokens["train"]["documents"] and all(d.endswith(".") and "number" in d for d in docs)
    x, y = DataLoader(str(out), batch_size=2, seq_len=8).next_batch()
    assert x.shape == (2, 8)
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]


def test_prepare_tail_split_for_a_single_file(tmp_path):
    text = PARAGRAPH * 40
    (tmp_path / "input.txt").write_text(text)
    out = tmp_path / "out"
    assert main(["prepare", str(tmp_path / "input.txt"), "--out", str(out), "--no-progress", "--split", "tail",
                 "--no-filters", "--no-near-dedup", "--no-clean", "--workers", "1"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["tokens"]["val"]["tokens"] == len(text) - int(len(text) * 0.9) + 1   # + the end-of-text token
    out2 = tmp_path / "out2"
    assert main(["prepare", str(tmp_path / "input.txt"), "--out", str(out2), "--no-progress", "--split", "tail",
                 "--no-filters", "--no-near-dedup", "--no-clean", "--no-eot", "--workers", "1"]) == 0
    report = json.loads((out2 / "report.json").read_text())
    assert report["tokens"]["train"]["tokens"] == int(len(text) * 0.9)             # nanoGPT's split exactly
    assert report["tokens"]["vocab_size"] == len(set(text))


def test_bad_input_gives_clear_errors(tmp_path, capsys):
    assert main(["prepare", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "not found" in capsys.readouterr().err
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.csv").write_text("a,b")
    assert main(["prepare", str(tmp_path / "d"), "--out", str(tmp_path / "o")]) == 2
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "short.txt").write_text("only three words")
    assert main(["prepare", str(tmp_path / "e"), "--out", str(tmp_path / "o2"), "--no-progress"]) == 1
    assert "no document survived" in capsys.readouterr().err
    assert main(["prepare", str(tmp_path / "e"), "--out", str(tmp_path / "o3"), "--disable-filter", "bogus"]) == 2
    assert main(["prepare", str(tmp_path / "e"), "--out", str(tmp_path / "o4"),
                 "--classifier", str(tmp_path / "no")]) == 2
    assert "classifier" in capsys.readouterr().err and not (tmp_path / "o4").exists()


def test_train_classifier_command_and_pipeline_stage(tmp_path, capsys):
    data = tmp_path / "labelled.jsonl"
    rng = np.random.default_rng(0)
    good, bad = PARAGRAPH.split(), "buy cheap now click free deal <div> </div> casino".split()
    with open(data, "w") as f:
        for i in range(80):
            words = good if i % 2 else bad
            f.write(json.dumps({"text": " ".join(rng.choice(words, 30)), "label": int(i % 2)}) + "\n")
    model = tmp_path / "clf"
    assert main(["train-classifier", str(data), "--out", str(model), "--buckets", "4096", "--epochs", "3"]) == 0
    assert "val accuracy 1.000" in capsys.readouterr().out
    src = tmp_path / "src"
    src.mkdir()
    (src / "good.txt").write_text(PARAGRAPH * 5)
    (src / "bad.txt").write_text(" ".join(rng.choice(bad, 300)))
    out = tmp_path / "out"
    assert main(["prepare", str(src), "--out", str(out), "--no-progress", "--classifier", str(model),
                 "--disable-filter", "markup_density", "--disable-filter", "top_2gram_coverage",
                 "--disable-filter", "top_3gram_coverage", "--disable-filter", "top_4gram_coverage",
                 "--disable-filter", "duplicate_lines", "--disable-filter", "duplicate_paragraphs",
                 "--disable-filter", "non_alpha_chars"]) == 0
    stages = {s["stage"]: s for s in json.loads((out / "report.json").read_text())["stages"]}
    assert stages["classifier"]["dropped"] == {"below_threshold": 1} and stages["classifier"]["docs_out"] == 1


def test_interrupted_prepare_leaves_no_report_or_shards(tmp_path, monkeypatch, capsys):
    from tinygrad_llm.data import shards
    src = _corpus(tmp_path)
    out = tmp_path / "out"
    assert main(["prepare", str(src), "--out", str(out), "--no-progress", "--workers", "1"]) == 0
    calls = {"n": 0}
    real = shards._encode_worker

    def interrupt_after_a_few(item):
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt
        return real(item)
    monkeypatch.setattr(shards, "_encode_worker", interrupt_after_a_few)
    assert main(["prepare", str(src), "--out", str(out), "--no-progress", "--workers", "1",
                 "--shard-tokens", "300"]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == ["vocab.json"]       # the old run's shards and report are gone too
