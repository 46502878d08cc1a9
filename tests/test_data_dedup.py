"""MinHash estimates against exact Jaccard, LSH recall, union-find clustering, exact dedup."""
import re

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from tinygrad_llm.data.dedup import (ExactDeduplicator, MinHasher, UnionFind, _word_units, collision_probability,
                                     exact_jaccard, lsh_candidate_pairs, lsh_params, near_duplicate_clusters,
                                     shingle_hashes)

VOCAB = [f"w{i}" for i in range(5000)]


def _pair_with_jaccard(rng, n_shingles, target):
    """Two word lists whose word-1-gram sets have Jaccard close to `target` (distinct words throughout)."""
    shared = int(round(2 * n_shingles * target / (1 + target)))
    words = rng.choice(len(VOCAB), 2 * n_shingles - shared, replace=False)
    a = [VOCAB[i] for i in words[:n_shingles]]
    b = [VOCAB[i] for i in np.concatenate([words[:shared], words[n_shingles:]])]
    return " ".join(a), " ".join(b)


def test_minhash_estimates_within_expected_error():
    rng = np.random.default_rng(0)
    hasher = MinHasher(num_perm=128, seed=7, kind="word", n=1)
    z = []
    for _ in range(150):
        a, b = _pair_with_jaccard(rng, int(rng.integers(100, 1500)), rng.uniform(0.05, 0.95))
        j = exact_jaccard(shingle_hashes(a, "word", 1), shingle_hashes(b, "word", 1))
        sig = hasher.signatures([a, b])
        est = np.mean(sig[0] == sig[1])
        z.append((est - j) / np.sqrt(j * (1 - j) / 128))   # standard error of the estimator
    z = np.array(z)
    assert abs(z.mean()) < 0.3                                 # unbiased (mean of 150 z-scores: sd 0.08)
    assert 0.75 < z.std() < 1.25                               # spread as theory says
    assert np.mean(np.abs(z) < 3) > 0.97


@settings(max_examples=30, deadline=None)
@given(st.lists(st.sampled_from(VOCAB[:60]), min_size=3, max_size=80),
       st.lists(st.sampled_from(VOCAB[:60]), min_size=3, max_size=80))
def test_minhash_of_word_trigrams_tracks_exact_jaccard(words_a, words_b):
    a, b = " ".join(words_a), " ".join(words_b)
    j = exact_jaccard(shingle_hashes(a), shingle_hashes(b))
    sig = MinHasher(num_perm=256, seed=3).signatures([a, b])
    assert abs(np.mean(sig[0] == sig[1]) - j) <= 5 * np.sqrt(max(j * (1 - j), 0.01) / 256) + 1e-9


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=300))
def test_vectorised_words_match_the_regex(text):
    lowered = text.lower()
    words = re.findall(r"\w+", lowered)
    hashes, starts = _word_units(lowered)
    assert len(hashes) == len(words)
    seen = {}
    for word, h in zip(words, hashes.tolist()):              # equal words, equal hashes
        assert seen.setdefault(word, h) == h
    assert len(set(seen.values())) == len(seen)              # different words, different hashes


def test_identical_and_disjoint_documents():
    hasher = MinHasher(64)
    sig = hasher.signatures(["the cat sat on the mat today", "the cat sat on the mat today", "zz yy xx ww vv uu"])
    assert np.all(sig[0] == sig[1])
    assert np.mean(sig[0] == sig[2]) < 0.1


def test_signatures_are_batch_and_block_independent():
    rng = np.random.default_rng(1)
    texts = [" ".join(rng.choice(VOCAB[:300], int(rng.integers(1, 400)))) for _ in range(40)] + ["", "one"]
    texts[3] = "two words"                                     # shorter than one 3-gram: one shingle
    big = MinHasher(128, seed=5, block=1 << 20).signatures(texts)
    small = MinHasher(128, seed=5, block=16).signatures(texts)
    single = np.stack([MinHasher(128, seed=5).signature(t) for t in texts])
    per_doc = MinHasher(128, seed=5).signatures_from_shingles([shingle_hashes(t) for t in texts])
    batched = MinHasher(128, seed=5, batch_chars=500).signatures(texts)
    assert np.array_equal(big, small) and np.array_equal(big, single)
    assert np.array_equal(big, per_doc) and np.array_equal(big, batched)
    assert np.all(big[-2] == np.iinfo(np.uint32).max)          # empty document: no shingles


def test_char_shingles_and_order_sensitivity():
    assert len(shingle_hashes("abcdef", "char", 3)) == 4
    assert not np.array_equal(shingle_hashes("a b c", "word", 2), shingle_hashes("b a c", "word", 2))
    with pytest.raises(ValueError):
        shingle_hashes("x", "sentence", 3)


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.8])
def test_lsh_finds_95_percent_of_pairs_above_threshold(threshold):
    rng = np.random.default_rng(int(threshold * 100))
    bands, rows = lsh_params(threshold, 128)
    texts, truth = [], []
    for _ in range(150):
        a, b = _pair_with_jaccard(rng, 300, rng.uniform(threshold, 1.0))
        texts += [a, b]
        truth.append(exact_jaccard(shingle_hashes(a, "word", 1), shingle_hashes(b, "word", 1)))
    sig = MinHasher(128, seed=11, kind="word", n=1).signatures(texts)
    found = {tuple(p) for p in lsh_candidate_pairs(sig, bands, rows).tolist()}
    above = [k for k, j in enumerate(truth) if j >= threshold]
    recall = np.mean([(2 * k, 2 * k + 1) in found for k in above])
    assert len(above) > 100 and recall >= 0.95
    expected = collision_probability(np.array(truth)[above], bands, rows).mean()
    assert expected >= 0.95


def test_lsh_params_respect_budget_and_move_with_threshold():
    for t in (0.2, 0.5, 0.9):
        b, r = lsh_params(t, 128)
        assert b * r <= 128
    assert lsh_params(0.9, 128)[1] > lsh_params(0.2, 128)[1]   # stricter threshold, longer bands


def test_clusters_keep_first_member_and_are_deterministic():
    rng = np.random.default_rng(2)
    base = [" ".join(rng.choice(VOCAB, 400)) for _ in range(5)]
    texts = []
    for t in base:
        words = t.split()
        texts.append(t)
        texts.append(" ".join(words[:380] + list(rng.choice(VOCAB, 20))))   # ~90% overlap
    hasher = MinHasher(128, seed=1)
    sig = hasher.signatures(texts)
    keep, clusters = near_duplicate_clusters(sig, 0.7)
    assert clusters == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert keep.tolist() == [True, False] * 5
    longest, _ = near_duplicate_clusters(sig, 0.7, priority=[len(t) for t in texts])
    for c in clusters:                                         # one per cluster, and the longest
        kept = [i for i in c if longest[i]]
        assert len(kept) == 1 and len(texts[kept[0]]) == max(len(texts[i]) for i in c)
    other_keep, other_clusters = near_duplicate_clusters(MinHasher(128, seed=99).signatures(texts), 0.7)
    assert np.array_equal(keep, other_keep) and other_clusters == clusters   # not an accident of one seed


def test_union_find_roots_are_smallest_members():
    uf = UnionFind(6)
    uf.union(4, 2)
    uf.union(5, 4)
    uf.union(1, 3)
    assert [uf.find(i) for i in range(6)] == [0, 1, 2, 1, 2, 2]


def test_exact_dedup_reports_the_first_copy():
    d = ExactDeduplicator()
    assert d.check("same text", "a") is None
    assert d.check("other", "b") is None
    assert d.check("same text", "c") == "a"
