"""Quality classifier: learns a separable task with the engine's autograd, saves/loads without pickle."""
import json

import numpy as np
import pytest

from tinygrad_llm.data.classifier import QualityClassifier, hashed_features, load_labelled_jsonl, train_classifier

GOOD_WORDS = "thou art more lovely and more temperate rough winds do shake the darling buds of may".split()
BAD_WORDS = "buy cheap pills now click here free bonus casino deal offer limited subscribe".split()


def _examples(n, seed=0):
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for i in range(n):
        words = GOOD_WORDS if i % 2 == 0 else BAD_WORDS
        texts.append(" ".join(rng.choice(words, int(rng.integers(5, 30)))))
        labels.append("keep" if i % 2 == 0 else "spam")
    return texts, labels


def test_features_are_deterministic_and_in_range():
    f = hashed_features("To be, or not to be: that is the question.", buckets=1024, ngrams=2)
    assert f.min() >= 1 and f.max() < 1024                  # row 0 is padding
    assert len(f) > len(hashed_features("To be, or not to be: that is the question.", 1024, 2, char_ngrams=0))
    assert np.array_equal(hashed_features("a b c", 64, 2, 0), hashed_features("A  B, C!", 64, 2, 0))
    assert len(hashed_features("a b c", 64, 2, 0)) == 3 + 2


def test_training_separates_classes_and_loss_falls():
    texts, labels = _examples(200)
    model, metrics = train_classifier(texts, labels, keep_label="keep", buckets=4096, epochs=3, seed=1)
    assert metrics["train_accuracy"] == 1.0 and metrics["val_accuracy"] == 1.0
    assert metrics["final_loss"] < 0.3
    p = model.predict_proba(["rough winds do shake the darling buds", "click here for cheap pills"])
    assert p[0] > 0.7 and p[1] < 0.3


def test_save_load_round_trip_without_pickle(tmp_path):
    texts, labels = _examples(60)
    model, _ = train_classifier(texts, labels, keep_label="keep", buckets=512, epochs=1)
    paths = model.save(str(tmp_path / "clf"))
    assert sorted(p.rsplit(".", 1)[-1] for p in paths) == ["json", "safetensors"]
    meta = json.loads((tmp_path / "clf.json").read_text())
    assert meta["keep_label"] == "keep" and meta["buckets"] == 512
    raw = (tmp_path / "clf.safetensors").read_bytes()          # safetensors: u64 length, JSON header, raw data
    header = json.loads(raw[8: 8 + int.from_bytes(raw[:8], "little")])
    assert header["weight"]["shape"] == [512, 2] and header["weight"]["dtype"] == "F32"
    again = QualityClassifier.load(str(tmp_path / "clf.json"))
    assert np.allclose(again.predict_proba(texts[:10]), model.predict_proba(texts[:10]))


def test_bad_training_input_is_explained(tmp_path):
    with pytest.raises(ValueError, match="two labels"):
        train_classifier(["a", "b"], ["x", "x"])
    with pytest.raises(ValueError, match="keep-label"):
        train_classifier(["a", "b"], ["x", "y"])
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok", "label": 1}\n{"text": "missing label"}\n')
    with pytest.raises(ValueError, match=":2:"):
        load_labelled_jsonl(path)
