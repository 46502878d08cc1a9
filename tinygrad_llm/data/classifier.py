"""A fastText-like linear classifier over hashed word n-grams, trained with tinygrad_llm's autograd.

Features: the lowercased `\\w+` words of a document and their n-grams up to `ngrams`, plus the
character `char_ngrams`-grams of the text (fastText's subwords), each hashed (word hashes and n-gram
mixing from dedup.py, all NumPy) into one of `buckets - 1` rows; row 0 is padding. The model is linear
(Joulin et al. 2016 without the hidden layer):

    logits = mean over the document's features of W[feature] + b        W: (buckets, 2)   b: (2,)

and is trained with softmax cross-entropy over two classes — "keep" (the `keep_label`) and
"other" — so P(keep) is the second softmax output. Training builds each batch as padded ids
(B, L) and a weight mask (B, L, 1) holding 1/len for real features and 0 for padding:

    F.embedding(ids, W) (B, L, 2) · mask → sum over L → (B, 2) + b → F.cross_entropy

and steps Adam (`tinygrad_llm.optim.AdamW` without weight decay; mean pooling leaves each n-gram row a
tiny gradient, which plain SGD would need thousands of epochs to use) with a linearly decaying learning
rate, fastText's schedule, on the gradients the engine computes. Inference needs no graph:
`predict_proba` is the same formula in NumPy.

Saved as `<prefix>.safetensors` (W, b) plus `<prefix>.json` (buckets, ngrams, labels, keep_label),
never pickled. Simplification: documents with more than `max_features` features are trained on a
fixed random subset of them (inference always uses all).
"""
import json
import os

import numpy as np

from .dedup import _NGRAM_MULTIPLIERS, _mix64, _word_units

FORMAT_VERSION = 1
_DEFAULT_KEEP = ("1", "good", "keep", "clean", "ok", "high", "hq", "true")


def hashed_features(text: str, buckets: int, ngrams=2, char_ngrams=3) -> np.ndarray:
    """int64 feature rows in [1, buckets) for every word n-gram (n = 1..ngrams) of the text and, when
    char_ngrams > 0, every character n-gram of the lowercased text (fastText's subword idea: words never
    seen in training, such as gibberish, still share features with the training set)."""
    text = text.lower()
    units = _word_units(text)[0]                      # (W,) uint64 word hashes, as dedup computes them
    parts = []
    if char_ngrams and len(text) >= char_ngrams:
        chars = _mix64(np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32).astype(np.uint64))
        count = len(chars) - char_ngrams + 1
        combined = chars[:count] * _NGRAM_MULTIPLIERS[0]
        for k in range(1, char_ngrams):
            combined += chars[k: k + count] * _NGRAM_MULTIPLIERS[k]
        parts.append(_mix64(combined ^ np.uint64(0xC0FFEE)))
    if not len(units) and not parts:
        return np.zeros(0, dtype=np.int64)
    for n in range(1, ngrams + 1):
        count = len(units) - n + 1
        if count <= 0:
            break
        combined = units[:count] * _NGRAM_MULTIPLIERS[0]
        for k in range(1, n):
            combined += units[k: k + count] * _NGRAM_MULTIPLIERS[k]
        combined ^= np.uint64(n)                        # keeps n-grams of different n apart
        parts.append(_mix64(combined))
    hashes = np.concatenate(parts)
    return (hashes % np.uint64(buckets - 1)).astype(np.int64) + 1


class QualityClassifier:
    """Linear classifier: P(keep | text) from hashed word n-grams."""

    def __init__(self, buckets=1 << 18, ngrams=2, labels=("other", "keep"), keep_label="keep", weight=None, bias=None,
                 char_ngrams=3):
        self.buckets, self.ngrams, self.char_ngrams = int(buckets), int(ngrams), int(char_ngrams)
        self.labels, self.keep_label = list(labels), str(keep_label)
        self.weight = np.zeros((self.buckets, 2), dtype=np.float32) if weight is None else weight
        self.bias = np.zeros(2, dtype=np.float32) if bias is None else bias

    def features(self, text):
        return hashed_features(text, self.buckets, self.ngrams, self.char_ngrams)

    def predict_proba(self, texts) -> np.ndarray:
        """(N,) probability of the keep label for each text (0.5 for a text without words... or bias)."""
        out = np.empty(len(texts), dtype=np.float64)
        for i, text in enumerate(texts):
            f = self.features(text)
            logits = (self.weight[f].mean(axis=0) if len(f) else np.zeros(2)) + self.bias   # (2,)
            out[i] = 1.0 / (1.0 + np.exp(logits[0] - logits[1]))                            # softmax[1]
        return out

    def save(self, prefix):
        from safetensors.numpy import save_file
        prefix = prefix[:-5] if prefix.endswith(".json") else prefix
        prefix = prefix[:-12] if prefix.endswith(".safetensors") else prefix
        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        save_file({"weight": np.ascontiguousarray(self.weight, dtype=np.float32),
                   "bias": np.ascontiguousarray(self.bias, dtype=np.float32)}, prefix + ".safetensors")
        meta = {"format": "tinygrad_llm.quality_classifier", "version": FORMAT_VERSION, "buckets": self.buckets,
                "ngrams": self.ngrams, "char_ngrams": self.char_ngrams, "labels": self.labels,
                "keep_label": self.keep_label, "weights": os.path.basename(prefix) + ".safetensors"}
        with open(prefix + ".json", "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1)
        return [prefix + ".safetensors", prefix + ".json"]

    @classmethod
    def load(cls, prefix):
        from safetensors.numpy import load_file
        prefix = prefix[:-5] if prefix.endswith(".json") else prefix
        prefix = prefix[:-12] if prefix.endswith(".safetensors") else prefix
        if not os.path.exists(prefix + ".json"):
            raise FileNotFoundError(f"classifier metadata {prefix}.json not found")
        with open(prefix + ".json", encoding="utf-8") as f:
            meta = json.load(f)
        if meta.get("format") != "tinygrad_llm.quality_classifier" or meta.get("version") != FORMAT_VERSION:
            raise ValueError(f"{prefix}.json is not a tinygrad_llm quality classifier (version {FORMAT_VERSION})")
        tensors = load_file(prefix + ".safetensors")
        if tensors["weight"].shape != (meta["buckets"], 2):
            raise ValueError(f"{prefix}.safetensors: weight shape {tensors['weight'].shape} does not match "
                             f"the metadata's {meta['buckets']} buckets")
        return cls(meta["buckets"], meta["ngrams"], meta["labels"], meta["keep_label"], tensors["weight"],
                   tensors["bias"], meta.get("char_ngrams", 0))


def load_labelled_jsonl(path, text_field="text", label_field="label"):
    """(texts, labels as strings) from a JSONL file; raises ValueError naming the first bad line."""
    texts, labels = [], []
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                text, label = record[text_field], record[label_field]
            except (ValueError, KeyError, TypeError):
                raise ValueError(f"{path}:{lineno}: expected a JSON object with {text_field!r} and "
                                 f"{label_field!r}") from None
            if not isinstance(text, str):
                raise ValueError(f"{path}:{lineno}: {text_field!r} is not a string")
            texts.append(text)
            labels.append(str(label).lower() if isinstance(label, bool) else str(label))
    if not texts:
        raise ValueError(f"{path}: no examples")
    return texts, labels


def _padded_batch(features, max_features, rng):
    """ids (B, L) int64 padded with 0 and mask (B, L, 1) float32 of 1/len over real features."""
    feats = [f if len(f) <= max_features else rng.choice(f, max_features, replace=False) for f in features]
    L = max(1, max(len(f) for f in feats))
    ids = np.zeros((len(feats), L), dtype=np.int64)
    mask = np.zeros((len(feats), L, 1), dtype=np.float32)
    for row, f in enumerate(feats):
        ids[row, : len(f)] = f
        mask[row, : len(f), 0] = 1.0 / max(1, len(f))
    return ids, mask


def train_classifier(texts, labels, keep_label=None, buckets=1 << 18, ngrams=2, char_ngrams=3, epochs=5, lr=0.1,
                     batch_size=32, val_fraction=0.2, seed=0, max_features=4096, log=None):
    """Train a QualityClassifier; returns (model, metrics with train/val accuracy and final loss)."""
    import tinygrad_llm.functional as F
    from tinygrad_llm import Tensor
    from tinygrad_llm.optim import AdamW

    distinct = sorted(set(labels))
    if len(distinct) < 2:
        raise ValueError(f"need examples of at least two labels, got {distinct}")
    if keep_label is None:
        keep_label = next((k for k in _DEFAULT_KEEP if k in distinct), None)
        if keep_label is None:
            raise ValueError(f"cannot tell which label to keep among {distinct}; pass --keep-label")
    keep_label = str(keep_label)
    if keep_label not in distinct:
        raise ValueError(f"keep label {keep_label!r} not among the labels {distinct}")
    y = np.array([1 if l == keep_label else 0 for l in labels], dtype=np.int64)
    model = QualityClassifier(buckets, ngrams, ["other", keep_label], keep_label, char_ngrams=char_ngrams)
    feats = [model.features(t) for t in texts]
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(texts))
    n_val = int(round(len(texts) * val_fraction)) if len(texts) > 4 else 0
    val_idx, train_idx = order[:n_val], order[n_val:]

    weight = Tensor(np.zeros((buckets, 2), dtype=np.float32), requires_grad=True)
    bias = Tensor(np.zeros(2, dtype=np.float32), requires_grad=True)
    optimizer = AdamW([weight, bias], lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    steps_total = epochs * -(-len(train_idx) // batch_size)
    step, loss_value = 0, float("nan")
    for epoch in range(epochs):
        perm = rng.permutation(train_idx)
        losses = []
        for lo in range(0, len(perm), batch_size):
            idx = perm[lo: lo + batch_size]
            ids, mask = _padded_batch([feats[i] for i in idx], max_features, rng)
            emb = F.embedding(ids, weight)                              # (B, L) -> (B, L, 2)
            pooled = F.sum(emb * Tensor(mask), axis=1)                  # (B, L, 2) -> (B, 2)
            loss = F.cross_entropy(pooled + bias, y[idx])
            optimizer.zero_grad()
            loss.backward()
            step += 1
            optimizer.step(lr=lr * (1.0 - (step - 1) / max(1, steps_total)))   # linear decay, as fastText
            losses.append(float(loss.item()))
        loss_value = float(np.mean(losses))
        if log:
            log(f"epoch {epoch + 1}/{epochs}: train loss {loss_value:.4f}")
    model.weight, model.bias = weight.numpy().astype(np.float32), bias.numpy().astype(np.float32)

    def accuracy(indices):
        if len(indices) == 0:
            return float("nan")
        p = model.predict_proba([texts[i] for i in indices])
        return float(np.mean((p >= 0.5) == (y[indices] == 1)))

    metrics = {"train_accuracy": accuracy(train_idx), "val_accuracy": accuracy(val_idx),
               "val_examples": int(len(val_idx)), "train_examples": int(len(train_idx)), "final_loss": loss_value,
               "keep_label": keep_label}
    return model, metrics
