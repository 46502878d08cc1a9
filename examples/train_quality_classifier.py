"""Train the data pipeline's quality classifier: literary text (keep) versus generated web junk (drop).

    python examples/train_quality_classifier.py                 # train on examples/data/quality.jsonl
    python examples/train_quality_classifier.py --make-data     # regenerate that file (needs the built-in corpus)

The labelled file holds paragraphs of the built-in corpus (label "keep": Shakespeare's modern editions
and Milton) and synthetic junk (label "junk": HTML/markup soup, keyword spam, navigation and cookie
boilerplate, log lines, gibberish, hashtag chatter) made by `junk_paragraph` below with a fixed seed.
Training uses `tinygrad-llm train-classifier`'s code path: hashed word 1-2-grams, a linear layer and
softmax cross-entropy, gradients from tinygrad_llm's autograd. The model lands in runs/quality.{json,
safetensors}; then the pipeline applies it as a stage:

    tinygrad-llm prepare --corpus shakespeare --classifier runs/quality --out data/shakespeare

Every work of the built-in corpus should pass (P(keep) near 1); a document of markup or spam should not.
"""
import argparse
import json
import os
import re
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))                      # run from a checkout without installing

from tinygrad_llm.data.classifier import QualityClassifier, load_labelled_jsonl, train_classifier  # noqa: E402

DATA = os.path.join(HERE, "data", "quality.jsonl")

_SPAM = ["cheap", "best", "price", "buy", "now", "free", "shipping", "discount", "online", "casino", "bonus", "win",
         "loans", "fast", "deal", "sale", "watches", "pills", "crypto", "click", "offer", "limited", "top", "rated"]
_NAV = ["Home", "About us", "Contact", "Privacy Policy", "Terms of Service", "Cookie settings", "Subscribe",
        "Log in", "Sign up", "Newsletter", "Careers", "Sitemap", "FAQ", "Cart (0)", "Search", "Accept all cookies"]
_TAGS = ["div", "span", "a", "li", "ul", "p", "script", "img", "td", "tr", "section", "nav"]
_CHAT = ["lol", "omg", "follow", "me", "pls", "check", "my", "profile", "link", "in", "bio", "giveaway", "dm",
         "like", "share", "subscribe", "smash", "that", "button", "so", "random", "tbh", "ngl", "vibes"]


def junk_paragraph(rng):
    """One paragraph of synthetic low-quality web text (six styles)."""
    kind = rng.integers(6)
    if kind == 0:                       # markup soup
        parts = []
        for _ in range(rng.integers(4, 12)):
            tag = _TAGS[rng.integers(len(_TAGS))]
            word = _SPAM[rng.integers(len(_SPAM))]
            parts.append(f'<{tag} class="{word}-{rng.integers(100)}">{word.title()}</{tag}>')
        return "".join(parts)
    if kind == 1:                       # keyword spam
        return " ".join(_SPAM[i] for i in rng.integers(len(_SPAM), size=rng.integers(20, 60))) + "!!!"
    if kind == 2:                       # navigation / cookie boilerplate
        links = " | ".join(_NAV[i] for i in rng.integers(len(_NAV), size=rng.integers(6, 14)))
        return links + f" © {rng.integers(1999, 2030)}"
    if kind == 3:                       # log lines
        lines = []
        for _ in range(rng.integers(3, 8)):
            level = ["INFO", "WARN", "ERROR", "DEBUG"][rng.integers(4)]
            lines.append(f"2024-{rng.integers(1, 13):02d}-{rng.integers(1, 29):02d} {rng.integers(24):02d}:"
                         f"{rng.integers(60):02d}:{rng.integers(60):02d} {level} [worker-{rng.integers(16)}] "
                         f"request id={rng.integers(1 << 30):x} status={[200, 404, 500][rng.integers(3)]} "
                         f"latency_ms={rng.integers(1, 900)}")
        return "\n".join(lines)
    if kind == 4:                       # gibberish
        letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
        return " ".join("".join(rng.choice(letters, rng.integers(2, 10))) for _ in range(rng.integers(20, 60)))
    words = [_CHAT[i] for i in rng.integers(len(_CHAT), size=rng.integers(10, 30))]
    return " ".join(words) + " " + " ".join(f"#{_CHAT[i]}{_SPAM[j]}" for i, j in rng.integers(len(_SPAM), size=(3, 2)))


def make_data(path, per_class=250, seed=0):
    """Write the labelled JSONL: `per_class` corpus paragraphs and `per_class` junk paragraphs, shuffled."""
    from tinygrad_llm.data.clean import clean_text
    from tinygrad_llm.data.corpus import iter_shakespeare
    rng = np.random.default_rng(seed)
    paragraphs = []
    for doc in iter_shakespeare():
        if doc.meta.get("edition") == "folio":
            continue
        for p in re.split(r"\n\s*\n", clean_text(doc.text)):
            if 200 <= len(p) <= 600:
                paragraphs.append(p)
    keep = [paragraphs[i] for i in rng.choice(len(paragraphs), per_class, replace=False)]
    junk = [junk_paragraph(rng) for _ in range(per_class)]
    records = [{"text": t, "label": "keep"} for t in keep] + [{"text": t, "label": "junk"} for t in junk]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for i in rng.permutation(len(records)):
            f.write(json.dumps(records[i], ensure_ascii=False) + "\n")
    print(f"wrote {len(records)} examples to {path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--make-data", action="store_true",
                        help="regenerate the labelled JSONL from the built-in corpus")
    parser.add_argument("--data", default=DATA)
    parser.add_argument("--out", default=os.path.join("runs", "quality"))
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    if args.make_data or not os.path.exists(args.data):
        make_data(args.data)
    texts, labels = load_labelled_jsonl(args.data)
    model, metrics = train_classifier(texts, labels, keep_label="keep", epochs=args.epochs, log=print)
    print(f"train accuracy {metrics['train_accuracy']:.3f}, held-out accuracy {metrics['val_accuracy']:.3f} "
          f"on {metrics['val_examples']} examples")
    paths = model.save(args.out)
    print("saved", ", ".join(paths))
    model = QualityClassifier.load(args.out)               # what the pipeline stage does
    probes = ["Now is the winter of our discontent made glorious summer by this sun of York; and all the clouds "
              "that lour'd upon our house in the deep bosom of the ocean buried.",
              "<div class=\"promo\"><a href=\"/deal\">Best price</a></div><span>Buy now free shipping</span>",
              "Home | About us | Privacy Policy | Cookie settings | Subscribe | Log in"]
    for text, p in zip(probes, model.predict_proba(probes)):
        print(f"P(keep) = {p:.3f}  {text[:70]!r}")
    print(f"\nuse it: tinygrad-llm prepare --corpus shakespeare --classifier {args.out} --out data/shakespeare")


if __name__ == "__main__":
    main()
