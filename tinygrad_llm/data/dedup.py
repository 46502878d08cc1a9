"""Deduplication: exact (content hash) and near-duplicate (MinHash + LSH banding + union-find).

MinHash (Broder 1997). A document becomes a set of shingles (word n-grams or character n-grams), each
hashed to 64 well-mixed bits, of which MinHash uses the top 32 with the lowest bit forced to 1 (x). For
k = 1..num_perm, h_k(x) = a_k·x mod 2^32 (a_k odd: a bijection on odd numbers, never 0) acts as a random
permutation of the shingle hashes, and the signature keeps min_x h_k(x). For two sets A and B,
P[min h_k(A) = min h_k(B)] = J(A, B) = |A∩B| / |A∪B|, so the share of equal signature slots estimates
the Jaccard similarity with standard error sqrt(J(1-J)/num_perm).

Vectorised: a batch of documents is lowercased, joined and turned into code points; word characters
(exactly `re`'s \\w) are found with a lookup table and every word is hashed at once with NumPy
(random per-character values times per-position multipliers, summed per word by `np.add.reduceat`);
n-gram hashes are combined from word hashes with NumPy integer arithmetic; the (shingles × num_perm)
32-bit products are formed a cache-sized block at a time and reduced per document with
`np.minimum.reduceat`. Nothing loops in Python per shingle, per permutation or (for word shingles) per
document.

LSH (Indyk & Motwani; Leskovec et al. ch. 3). The signature is cut into b bands of r rows; documents
whose rows agree in at least one band become candidate pairs. A pair of similarity s is a candidate with
probability 1 - (1 - s^r)^b. `lsh_params` picks (b, r) with b·r <= num_perm minimising the weighted area
of false positives below the threshold and false negatives above it (as datasketch does, but weighted
0.1 / 0.9 towards recall by default, since verification removes false positives cheaply). Candidates
are then checked against the threshold with their estimated Jaccard (`verify`), joined with
union-find, and each cluster keeps its first document in input order (or its longest): deterministic
for a given input.

Simplifications: bands are grouped by sorting a 64-bit hash of each band's rows (a 2^-64 collision would
only add a candidate, which verification then rejects); very large buckets (> `max_bucket` members,
which only near-identical boilerplate produces) are linked as a star instead of all pairs.
"""
import functools
import hashlib

import numpy as np

_trapezoid = getattr(np, "trapezoid", None) or np.trapz   # NumPy < 2 calls it trapz
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_NGRAM_MULTIPLIERS = np.array([0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9,
                               0xD6E8FEB86659FD93, 0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53,
                               0x27D4EB2F165667C5, 0x85EBCA77C2B2AE63], dtype=np.uint64)


def _mix64(x):
    """splitmix64's finaliser: a bijection on uint64 with good avalanche (array in, array out)."""
    x = x ^ (x >> np.uint64(30))
    x = x * _M1
    x = x ^ (x >> np.uint64(27))
    x = x * _M2
    return x ^ (x >> np.uint64(31))


def shingle_hashes(text: str, kind="word", n=3, lowercase=True) -> np.ndarray:
    """uint64 hashes of a document's shingles (with repeats; MinHash ignores multiplicity).

    kind="word": n-grams of `\\w+` words (always lowercased); kind="char": n-grams of characters
    (lowercased unless lowercase=False). A document shorter than n units gives one shingle of all its
    units (as datasketch's usual recipe does); an empty one, none."""
    if not 1 <= n <= len(_NGRAM_MULTIPLIERS):
        raise ValueError(f"n must be in 1..{len(_NGRAM_MULTIPLIERS)}")
    if kind == "word":                                # always lowercased, as MinHasher does
        return _batch_word_shingles([text], n)[0]
    if lowercase:
        text = text.lower()
    if kind == "char":
        if not text:
            return np.zeros(0, np.uint64)
        units = _mix64(np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32).astype(np.uint64))
    else:
        raise ValueError(f"shingle kind must be 'word' or 'char', not {kind!r}")
    m = min(n, len(units))
    count = len(units) - m + 1
    combined = units[:count] * _NGRAM_MULTIPLIERS[0]
    for k in range(1, m):                             # position-dependent multipliers: "a b" != "b a"
        combined += units[k: k + count] * _NGRAM_MULTIPLIERS[k]
    return _mix64(combined)


class MinHasher:
    """Computes `num_perm`-slot MinHash signatures (uint32) for batches of documents.

    Permutation k is h_k(x) = a_k·x mod 2^32 with a_k odd, applied to x = (top 32 bits of the well-mixed
    shingle hash) | 1. 32-bit arithmetic halves the memory traffic of the (shingles × num_perm) product
    against 64-bit; the estimator's error matches sqrt(J(1-J)/num_perm) (tested); forcing x odd keeps
    a shingle from hashing to 0 under every permutation (which would make all its documents look alike)
    at the price of merging hash pairs (collision rate 2^-31 instead of 2^-32).
    Shapes: shingles (N,) uint64 with their document numbers (N,); signatures (D, num_perm) uint32."""

    def __init__(self, num_perm=128, seed=1, kind="word", n=3, block=2048, batch_chars=1 << 21):
        self.num_perm, self.seed, self.kind, self.n = num_perm, seed, kind, n
        self.block, self.batch_chars = block, batch_chars
        rng = np.random.default_rng(seed)
        self.a = rng.integers(0, 2 ** 31, num_perm, dtype=np.uint32) * np.uint32(2) + np.uint32(1)   # odd

    def signature(self, text: str) -> np.ndarray:
        return self.signatures([text])[0]

    def signatures(self, texts) -> np.ndarray:
        """(D, num_perm) uint32 MinHash signatures of D texts; a text without shingles gets all 0xFFFFFFFF."""
        texts = list(texts)
        if self.kind != "word":
            return self.signatures_from_shingles([shingle_hashes(t, self.kind, self.n) for t in texts])
        out = np.empty((len(texts), self.num_perm), dtype=np.uint32)
        lo = 0
        while lo < len(texts):                         # batches of about `batch_chars` characters
            hi, size = lo, 0
            while hi < len(texts) and (hi == lo or size + len(texts[hi]) <= self.batch_chars):
                size += len(texts[hi])
                hi += 1
            x, doc = _batch_word_shingles(texts[lo:hi], self.n)
            out[lo:hi] = self._reduce(x, doc, hi - lo)
            lo = hi
        return out

    def signatures_from_shingles(self, shingle_lists) -> np.ndarray:
        """(D, num_perm) uint32 signatures from per-document shingle-hash arrays."""
        lengths = np.array([len(s) for s in shingle_lists], dtype=np.int64)
        x = np.concatenate(list(shingle_lists)) if len(shingle_lists) else np.zeros(0, np.uint64)
        doc = np.repeat(np.arange(len(shingle_lists)), lengths)
        return self._reduce(x.astype(np.uint64, copy=False), doc, len(shingle_lists))

    def _reduce(self, x, doc, n_docs):
        """Signatures of n_docs documents from shingles x (N,) grouped by document number doc (N,)."""
        mins = np.full((n_docs, self.num_perm), np.iinfo(np.uint32).max, dtype=np.uint32)
        buf = np.empty((self.block, self.num_perm), dtype=np.uint32)
        x = (x >> np.uint64(32)).astype(np.uint32) | np.uint32(1)          # (N,) odd 32-bit keys
        for lo in range(0, len(x), self.block):        # blocks small enough to stay in cache
            xs, ds = x[lo: lo + self.block], doc[lo: lo + self.block]
            h = buf[: len(xs)]
            np.multiply(xs[:, None], self.a[None, :], out=h)              # (n, P) = a_k·x mod 2^32
            starts = np.flatnonzero(np.r_[True, ds[1:] != ds[:-1]])        # one segment per document
            rows = ds[starts]
            mins[rows] = np.minimum(mins[rows], np.minimum.reduceat(h, starts, axis=0))   # (n, P) -> (segments, P)
        return mins


_word_tables_cache = None


def _word_tables():
    """(is_word (0x110000,) bool: exactly `re`'s \\w, i.e. str.isalnum() or '_'; char_value (0x110000,)
    uint64 random; position_multiplier (64,) odd uint64), built once (about 0.1 s) with a fixed seed."""
    global _word_tables_cache
    if _word_tables_cache is None:
        is_word = np.fromiter((c.isalnum() or c == "_" for c in map(chr, range(0x110000))), dtype=bool, count=0x110000)
        rng = np.random.default_rng(0x5EED)
        char_value = rng.integers(0, 2 ** 64, 0x110000, dtype=np.uint64, endpoint=False)
        position_multiplier = rng.integers(0, 2 ** 63, 64, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        _word_tables_cache = (is_word, char_value, position_multiplier)
    return _word_tables_cache


def _word_units(lowered: str):
    """Hashes (W,) uint64 of the `\\w+` words of an already lowercased string and their first code
    point offsets (W,), without a Python-level loop: a word's hash is mix64(Σ_i value[c_i]·mult[i mod 64])
    over its characters c_i (order-sensitive; words longer than 64 characters reuse multipliers)."""
    is_word, char_value, position_multiplier = _word_tables()
    cp = np.frombuffer(lowered.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)    # (chars,)
    idx = np.flatnonzero(is_word[cp])                                                   # word characters
    if len(idx) == 0:
        return np.zeros(0, np.uint64), np.zeros(0, np.int64)
    first = np.flatnonzero(np.r_[True, idx[1:] != idx[:-1] + 1])       # (W,) word starts, as indices into idx
    word_start = np.zeros(len(idx), dtype=np.int64)
    word_start[first] = first
    position = np.arange(len(idx)) - np.maximum.accumulate(word_start)  # (chars in words,) index in its word
    terms = char_value[cp[idx]] * position_multiplier[position & 63]
    return _mix64(np.add.reduceat(terms, first)), idx[first]


def _batch_word_shingles(texts, n):
    """Word n-gram hashes of several texts at once: (hashes (N,), document numbers (N,)).

    The lowercased texts are joined with NUL (not a word character) and hashed by `_word_units`;
    n-grams that would straddle two documents are masked out. A document with at least one but fewer
    than n words gets one shingle of all its words, appended after the others (its only segment)."""
    lowered = [t.lower() for t in texts]
    units, starts = _word_units("\x00".join(lowered))
    doc_starts = np.cumsum([0] + [len(t) + 1 for t in lowered[:-1]])                   # code point offsets
    doc = np.searchsorted(doc_starts, starts, side="right") - 1                       # (W,) document of each word
    count = len(units) - n + 1
    if count > 0:
        combined = units[:count] * _NGRAM_MULTIPLIERS[0]
        for k in range(1, n):                         # position-dependent multipliers: "a b" != "b a"
            combined += units[k: k + count] * _NGRAM_MULTIPLIERS[k]
        valid = doc[n - 1: n - 1 + count] == doc[:count]                  # the window stays in one document
        hashes, owners = [_mix64(combined[valid])], [doc[:count][valid]]
    else:
        hashes, owners = [], []
    words_per_doc = np.bincount(doc, minlength=len(texts))
    first_word = np.cumsum(words_per_doc) - words_per_doc
    for d in np.flatnonzero((words_per_doc > 0) & (words_per_doc < n)).tolist():
        w = units[first_word[d]: first_word[d] + words_per_doc[d]]
        hashes.append(_mix64(np.array([(w * _NGRAM_MULTIPLIERS[: len(w)]).sum(dtype=np.uint64)])))
        owners.append(np.array([d]))
    if not hashes:
        return np.zeros(0, np.uint64), np.zeros(0, np.int64)
    return np.concatenate(hashes), np.concatenate(owners).astype(np.int64)


def exact_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Jaccard similarity of two shingle-hash arrays taken as sets."""
    a, b = np.unique(a), np.unique(b)
    union = len(np.union1d(a, b))
    return len(np.intersect1d(a, b, assume_unique=True)) / union if union else 1.0


def estimated_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    return float(np.mean(sig_a == sig_b))


def collision_probability(s, bands, rows):
    """P[a pair of Jaccard s shares at least one band] = 1 - (1 - s^r)^b."""
    return 1.0 - (1.0 - np.asarray(s, dtype=np.float64) ** rows) ** bands


@functools.lru_cache(maxsize=64)
def lsh_params(threshold: float, num_perm: int, fp_weight=0.1, fn_weight=0.9):
    """(bands, rows) with bands·rows <= num_perm minimising fp_weight·FP-area + fn_weight·FN-area.

    The default weights favour recall: a false positive costs one signature comparison in `verify`,
    a false negative is a duplicate left in the training data."""
    if not 0.0 < threshold < 1.0:
        raise ValueError("threshold must be in (0, 1)")
    below = np.linspace(0.0, threshold, 201)
    above = np.linspace(threshold, 1.0, 201)
    best, best_cost = None, np.inf
    for bands in range(1, num_perm + 1):
        for rows in range(1, num_perm // bands + 1):
            fp = _trapezoid(collision_probability(below, bands, rows), below)
            fn = _trapezoid(1.0 - collision_probability(above, bands, rows), above)
            cost = fp_weight * fp + fn_weight * fn
            if cost < best_cost - 1e-15:
                best, best_cost = (bands, rows), cost
    return best


class UnionFind:
    """Disjoint sets over 0..n-1; the root of a set is always its smallest member (deterministic)."""

    def __init__(self, n):
        self.parent = list(range(n))

    def find(self, i):
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:                 # path compression
            self.parent[i], i = root, self.parent[i]
        return root

    def union(self, i, j):
        ri, rj = self.find(i), self.find(j)
        if ri != rj:
            lo, hi = min(ri, rj), max(ri, rj)
            self.parent[hi] = lo


def lsh_candidate_pairs(signatures: np.ndarray, bands: int, rows: int, max_bucket=1000) -> np.ndarray:
    """(K, 2) int64 pairs i < j sharing at least one band; rows of all-0xFFFFFFFF (empty docs) skipped."""
    n = len(signatures)
    valid = np.nonzero(~np.all(signatures == np.iinfo(np.uint32).max, axis=1))[0]
    pairs = []
    for band in range(bands):
        cols = signatures[valid, band * rows: (band + 1) * rows].astype(np.uint64)   # (n, r)
        key = np.full(len(valid), np.uint64(band + 1), dtype=np.uint64)
        for c in range(rows):                          # hash the band's rows into one uint64 key
            key = _mix64(key ^ (cols[:, c] * _NGRAM_MULTIPLIERS[c % len(_NGRAM_MULTIPLIERS)]))
        order = np.argsort(key, kind="stable")
        starts = np.r_[0, np.flatnonzero(np.diff(key[order])) + 1]
        sizes = np.diff(np.r_[starts, len(order)])
        two = starts[sizes == 2]                        # the common case, vectorised
        if len(two):
            a, b = valid[order[two]], valid[order[two + 1]]
            pairs.append(np.stack([np.minimum(a, b), np.maximum(a, b)], axis=1))
        for start, size in zip(starts[sizes > 2].tolist(), sizes[sizes > 2].tolist()):
            members = np.sort(valid[order[start: start + size]])
            if len(members) > max_bucket:             # star: link everything to the first member
                pairs.append(np.stack([np.full(len(members) - 1, members[0]), members[1:]], axis=1))
            else:
                i, j = np.triu_indices(len(members), k=1)
                pairs.append(np.stack([members[i], members[j]], axis=1))
    if not pairs:
        return np.zeros((0, 2), dtype=np.int64)
    allpairs = np.concatenate(pairs).astype(np.int64)
    keys = np.unique(allpairs[:, 0] * n + allpairs[:, 1])
    return np.stack([keys // n, keys % n], axis=1)


def near_duplicate_clusters(signatures: np.ndarray, threshold: float, bands=None, rows=None, verify=True,
                            fp_weight=0.1, fn_weight=0.9, priority=None):
    """Cluster documents whose estimated Jaccard reaches `threshold`.

    Returns (keep, clusters): keep is a bool mask (True for one document of each cluster and for every
    singleton), clusters a list of sorted index lists of size >= 2, ordered by first member. The kept
    document is the first of its cluster, or with `priority` (D,) the one with the highest priority
    (say, its length), the first among equals."""
    n, num_perm = signatures.shape
    if bands is None or rows is None:
        bands, rows = lsh_params(threshold, num_perm, fp_weight, fn_weight)
    pairs = lsh_candidate_pairs(signatures, bands, rows)
    if verify and len(pairs):
        est = np.mean(signatures[pairs[:, 0]] == signatures[pairs[:, 1]], axis=1)
        pairs = pairs[est >= threshold]
    uf = UnionFind(n)
    for i, j in pairs.tolist():
        uf.union(i, j)
    roots = np.array([uf.find(i) for i in range(n)], dtype=np.int64)
    keep = roots == np.arange(n)
    groups = {}
    for i, r in enumerate(roots.tolist()):
        groups.setdefault(r, []).append(i)
    clusters = [g for r, g in sorted(groups.items()) if len(g) > 1]
    if priority is not None:
        for g in clusters:
            best = max(g, key=lambda i: (priority[i], -i))
            keep[g] = False
            keep[best] = True
    return keep, clusters


def content_hash(text: str) -> str:
    """Exact-dedup key: blake2b-128 of the UTF-8 text."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


class ExactDeduplicator:
    """Streaming exact dedup: `seen(text)` is True for the second and later copies of a text."""

    def __init__(self):
        self.first = {}

    def check(self, text: str, doc_id: str):
        """None for a new text, else the id of the first document with the same content."""
        key = content_hash(text)
        if key in self.first:
            return self.first[key]
        self.first[key] = doc_id
        return None
