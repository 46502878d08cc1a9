"""Tests for the byte-level BPE tokenizer: hand-computed merges, round trips on arbitrary Unicode, tiktoken
agreement (when tiktoken is installed), special tokens, files, and bad input."""
import base64
import json
import random
import warnings
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tinygrad_llm.tokenizer as tokenizer_module
from tinygrad_llm.tokenizer import (CHAT_SPECIAL_TOKENS, GPT2_PATTERN, GPT4_PATTERN, Tokenizer,
                                    TokenizerFileError)

FEW = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
MANY = settings(max_examples=200, deadline=None)

WORDS = ("the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "It's", "we'll", "DON'T", "naïve",
         "café", "日本語", "の", "テキスト", "中文", "字符", "🙂", "👍🏽", "e\u0301", "Ωμέγα", "привет", "2024",
         "3.14159", "1,000,000", "(x)", "->", "...", "!!", "#tag", "\t", "\n", "\r\n", "  ", "\n\n")


def _make_corpus(n_words, seed):
    rng = random.Random(seed)
    return "".join(rng.choice(WORDS) + rng.choice(" " * 6 + "\n,.") for _ in range(n_words))


CORPUS = _make_corpus(6000, seed=0)


_TRAINED = {}


def _trained(pattern):
    """One tokenizer per pattern for the whole module (hypothesis tests cannot take module fixtures)."""
    if pattern not in _TRAINED:
        _TRAINED[pattern] = Tokenizer.train(CORPUS, vocab_size=600 if pattern == "gpt4" else 500,
                                            pattern=pattern, special_tokens=CHAT_SPECIAL_TOKENS)
    return _TRAINED[pattern]


@pytest.fixture
def tok():
    return _trained("gpt4")


@pytest.fixture
def tok_gpt2():
    return _trained("gpt2")


# Arbitrary Unicode (no lone surrogates), mixed with fragments that stress the split pattern: combining
# marks, emoji with modifiers and joiners, CJK, contractions, digit runs and whitespace runs of all kinds.
FRAGMENTS = ["a", "b", " ", "  ", "   ", "xyz", "'s", "'LL", "\n", "\r\n", "\t", "\n\n ", "0", "12345", ".", ",!?",
             "é", "e\u0301", "\u0301\u0302", "日", "本語", "🙂", "👍🏽", "👩\u200d👩\u200d👧", "\u00a0", "\u3000", "\x1c"]
unicode_text = st.lists(
    st.one_of(st.characters(blacklist_categories=("Cs",)),
              st.characters(whitelist_categories=("Mn", "Mc", "Zs", "Lo", "So")),
              st.sampled_from(FRAGMENTS)),
    max_size=40).map("".join)


# ----------------------------------------------------------------------------------------------------
# merges computed by hand

def test_merges_match_hand_computed_list():
    # Pre-tokens are runs of non-space (pattern \S+|\s+; the single spaces hold no pair). Word counts:
    #   hug x10, pug x5, pun x12, bun x4, hugs x5.   Ids: b=98 g=103 h=104 n=110 p=112 s=115 u=117.
    # Pair counts: ug 10+5+5=20, pu 5+12=17, un 12+4=16, hu 10+5=15, gs 5, bu 4
    #   1. (u,g)=20 -> 256 "ug"   now: h ug, p ug, p u n, b u n, h ug s
    #      counts: (h,ug) 15, (u,n) 16, (p,u) 12, (p,ug) 5, (ug,s) 5, (b,u) 4
    #   2. (u,n)=16 -> 257 "un"   now: h ug, p ug, p un, b un, h ug s
    #   3. (h,ug)=15 -> 258 "hug" now: hug, p ug, p un, b un, hug s
    #   4. (p,un)=12 -> 259 "pun"
    #   5. tie at 5 between (p,ug)=(112,256) and (hug,s)=(258,115): the smaller (left, right) wins -> 260 "pug"
    #   6. (hug,s)=5 -> 261 "hugs"
    #   7. (b,un)=4 -> 262 "bun"; every word is now one token, so an 8th merge is impossible.
    text = "hug " * 10 + "pug " * 5 + "pun " * 12 + "bun " * 4 + "hugs " * 5
    with pytest.warns(UserWarning, match="ran out of pairs after 7 of 8"):
        tok = Tokenizer.train(text, vocab_size=256 + 8, pattern=r"\S+|\s+")
    assert tok.merges == [(117, 103), (117, 110), (104, 256), (112, 257), (112, 256), (258, 115), (98, 257)]
    expected_tokens = [b"ug", b"un", b"hug", b"pun", b"pug", b"hugs", b"bun"]
    ranks = tok.mergeable_ranks()
    assert [data for data, rank in sorted(ranks.items(), key=lambda item: item[1])][256:] == expected_tokens
    assert tok.vocab_size == 256 + 7
    assert tok.encode("hugs pug") == [261, 32, 260]


def test_merges_stay_inside_pre_tokens():
    # GPT-4 pattern cuts "1234 " into "123", "4", " " (numbers go in runs of at most 3). Inside pre-tokens
    # the pairs are (1,2) and (2,3), 50 each; (3,4), (4,' ') and (' ',1) cross boundaries and must never
    # be merged. 1. (49,50) -> 256 "12" (tie with (50,51) broken by the smaller pair); 2. (256,51) -> 257
    # "123"; then nothing is left to merge.
    with pytest.warns(UserWarning, match="ran out of pairs after 2 of 5"):
        tok = Tokenizer.train("1234 " * 50, vocab_size=256 + 5)
    assert tok.merges == [(49, 50), (256, 51)]


def _naive_bpe_merges(words, n_merges):
    """Reference trainer: recount every pair of every word before each merge (slow, obviously right).
    words: dict pre-token -> frequency. Same tie-break: highest count, then smallest (left, right)."""
    segmented = {tuple(word.encode("utf-8")): frequency for word, frequency in words.items()}
    merges = []
    for new_id in range(256, 256 + n_merges):
        pair_counts = {}
        for word, frequency in segmented.items():
            for pair in zip(word, word[1:]):
                pair_counts[pair] = pair_counts.get(pair, 0) + frequency
        if not pair_counts:
            break
        best = min(pair_counts, key=lambda pair: (-pair_counts[pair], pair))
        merges.append(best)
        rewritten = {}
        for word, frequency in segmented.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(new_id)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            rewritten[tuple(out)] = rewritten.get(tuple(out), 0) + frequency
        segmented = rewritten
    return merges


@settings(max_examples=80, deadline=None)
@given(words=st.dictionaries(st.text(alphabet="abcé ", min_size=1, max_size=9), st.integers(1, 6),
                             min_size=1, max_size=12),
       n_merges=st.integers(1, 30))
def test_incremental_training_equals_naive_recount(words, n_merges):
    # Pre-tokens are the dictionary keys, joined with "|" and split back by the pattern [^|]+|\|.
    text = "|".join(word for word, frequency in words.items() for _ in range(frequency))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                       # running out of pairs is fine here
        tok = Tokenizer.train(text, vocab_size=256 + n_merges, pattern=r"[^|]+|\|")
    assert tok.merges == _naive_bpe_merges(Counter(word for word in text.split("|")), n_merges)


def test_a_piece_that_is_a_token_is_emitted_whole():
    # Tokens: 256 "bc", 257 "ab", 258 "cd", 259 "abcd" = ab + cd. The merge rule on "abcd" joins the
    # lowest rank first (b,c -> "bc") and then gets stuck at a|bc|d, since "abc" and "bcd" are not tokens;
    # but the piece "abcd" is itself a token, so, as in tiktoken, it is emitted whole.
    tok = Tokenizer([(98, 99), (97, 98), (99, 100), (257, 258)], pattern=r"\S+|\s+")
    assert tok.encode("abcd") == [259]
    assert tok.encode("xabcd") == [120, 97, 256, 100]
    tiktoken = pytest.importorskip("tiktoken")
    encoding = tiktoken.Encoding(name="t", pat_str=tok.pattern, mergeable_ranks=tok.mergeable_ranks(),
                                 special_tokens={})
    assert encoding.encode("abcd xabcd") == tok.encode("abcd xabcd")


# ----------------------------------------------------------------------------------------------------
# round trips and agreement

@MANY
@given(text=unicode_text)
def test_decode_encode_round_trip_gpt4(text):
    tok = _trained("gpt4")
    ids = tok.encode_ordinary(text)
    assert tok.decode(ids) == text
    assert tok.decode_bytes(ids) == text.encode("utf-8")
    assert all(0 <= i < tok.vocab_size for i in ids)


@MANY
@given(text=unicode_text)
def test_decode_encode_round_trip_gpt2(text):
    tok = _trained("gpt2")
    assert tok.decode(tok.encode(text)) == text


def test_round_trip_of_specific_hard_cases(tok):
    cases = ["", " ", "\n", "   \n\n  \t", "🙂🙂🙂", "👩‍👩‍👧‍👦", "e\u0301\u0302", "日本語のテキスト",
             "a" * 5000, "ab" * 3000, " " * 3000, "1234567890" * 10, "It's we'll DON'T", "\x00\x7f\x1c"]
    for text in cases:
        assert tok.decode(tok.encode(text)) == text


def test_long_piece_merge_rule_matches_short_one(tok):
    # pieces above _SHORT_PIECE bytes use the heap version; both must follow the same rule exactly
    ranks = tok.mergeable_ranks()
    rng = random.Random(1)
    for _ in range(200):
        text = "".join(rng.choice(["the", "fox", "日本", "🙂", "é", "e", "o", "x", "ick", "qu"])
                       for _ in range(rng.randint(1, 40)))
        data = text.encode("utf-8")
        assert tokenizer_module._bpe_long(data, ranks) == tokenizer_module._bpe_short(data, ranks)


def test_id_pair_merge_rule_matches_the_bytes_one(tok):
    # the encoder merges ids through a (left id, right id) -> id table; the bytes version is the reference
    ranks = tok.mergeable_ranks()
    pair_ranks = tokenizer_module._pair_ranks(ranks)
    rng = random.Random(2)
    for _ in range(300):
        text = "".join(rng.choice(WORDS + ("qu", "ick", "x", "e", "o", " ")) for _ in range(rng.randint(1, 12)))
        for data in (text.encode("utf-8"), bytes(rng.randrange(256) for _ in range(rng.randint(1, 30)))):
            expected = tuple(tokenizer_module._bpe_short(data, ranks))
            assert tokenizer_module._bpe_ids(data, pair_ranks) == expected


def test_pairs_are_joined_whatever_merge_built_their_token():
    # Tokens: 256 "bc", 257 "ab", 258 "abc" = ab + c. On "abcx" the rule joins b,c first (rank 256), which
    # leaves a|bc|x; "a" + "bc" is the token "abc" although no merge says (a, bc), so tiktoken joins them.
    tok = Tokenizer([(98, 99), (97, 98), (257, 99)], pattern=r"\S+|\s+")
    assert (97, 256) in tokenizer_module._pair_ranks(tok.mergeable_ranks())
    assert tok.encode("abcx") == [258, 120]
    assert tokenizer_module._bpe_short(b"abcx", tok.mergeable_ranks()) == [258, 120]
    tiktoken = pytest.importorskip("tiktoken")
    encoding = tiktoken.Encoding(name="t", pat_str=tok.pattern, mergeable_ranks=tok.mergeable_ranks(),
                                 special_tokens={})
    assert encoding.encode("abcx") == [258, 120]


# mostly-ASCII text with a few non-ASCII characters and the whitespace around newlines that decides
# where it may be cut
MIXED_FRAGMENTS = ["word", " word", "It's", "\n", "\n\n", "  \n", "\n  ", " \r\n", ".\n", "!!", "12345", " ",
                   "\t", "é", "æ", "\u00a0", "\u3000", "日本", "🙂", "\x1c", "\x85", "\u2028"]
mixed_text = st.lists(st.one_of(st.sampled_from(MIXED_FRAGMENTS), st.characters(blacklist_categories=("Cs",))),
                      max_size=80).map("".join)


@MANY
@given(text=mixed_text)
def test_mixed_ascii_split_equals_regex(text):
    # text that is not pure ASCII is cut at safe places; the ASCII stretches use the stdlib fast path
    for pattern in (GPT4_PATTERN, GPT2_PATTERN):
        splitter = tokenizer_module._Splitter(pattern)
        expected = splitter.compiled.findall(text)
        for margin in (0, 3, 4096):
            original, tokenizer_module._MIXED_MARGIN = tokenizer_module._MIXED_MARGIN, margin
            try:
                assert splitter.findall(text) == expected
            finally:
                tokenizer_module._MIXED_MARGIN = original


def test_mixed_ascii_split_uses_the_fast_path_away_from_non_ascii(monkeypatch):
    splitter = tokenizer_module._Splitter(GPT4_PATTERN)
    calls = []
    monkeypatch.setattr(splitter, "compiled", _Recorder(splitter.compiled, calls))
    monkeypatch.setattr(tokenizer_module, "_MIXED_MARGIN", 20)
    text = "the cat sat\n" * 50 + "naïve\n" + "on the mat\n" * 50
    assert splitter.findall(text) == splitter.compiled.findall(text)
    assert 0 < sum(map(len, calls[:-1])) < 60                  # only the line with "ï" and a margin
    assert "".join(splitter.safe_chunks(text)) == text


class _Recorder:
    def __init__(self, compiled, calls):
        self.compiled, self.calls = compiled, calls

    def findall(self, text):
        self.calls.append(text)
        return self.compiled.findall(text)


def test_regex_whitespace_is_str_whitespace():
    # the safe-cut rules (_SAFE_CUTS) use stdlib re's \S, which is "not str.isspace()"; they are only
    # safe if every character that `regex` counts as \s is also str.isspace()
    import regex
    text = "".join(chr(c) for c in range(0x110000) if not 0xD800 <= c < 0xE000)
    assert all(c.isspace() for c in regex.findall(r"\s", text))


@MANY
@given(text=st.text(alphabet=st.sampled_from(list("aZ09 '\t\n\r\x0b\x0c\x1c\x1f.,!-_sdmtlvreSDMTLVRE")),
                    max_size=60))
def test_ascii_fast_path_splits_like_regex(text):
    for pattern in (GPT4_PATTERN, GPT2_PATTERN):
        splitter = tokenizer_module._Splitter(pattern)
        assert splitter.ascii_compiled.findall(text) == splitter.compiled.findall(text)


@FEW
@given(text=unicode_text)
def test_safe_chunks_do_not_change_pre_tokens(text, monkeypatch):
    # "a  \nb" and "x\n\ny" must not be cut after their last newline: GPT2_PATTERN splits "  \n" + "b"
    # as "  ", "\n", "b" but "  \n" at the end of a text as one piece
    monkeypatch.setattr(tokenizer_module, "_SAFE_CHUNK_CHARS", 4)
    long_text = text * 5 + "\nword\n  x\n\ny" * 3 + "a  \nb c\t\nd" * 3
    for pattern in (GPT4_PATTERN, GPT2_PATTERN):
        splitter = tokenizer_module._Splitter(pattern)
        chunks = list(splitter.safe_chunks(long_text))
        assert "".join(chunks) == long_text
        assert [piece for chunk in chunks for piece in splitter.findall(chunk)] == splitter.compiled.findall(long_text)


def test_long_texts_are_encoded_in_chunks_without_changing_ids(tok, monkeypatch):
    text = _make_corpus(4000, seed=11)
    whole = Tokenizer(tok.merges, tok.pattern).encode_ordinary(text)
    monkeypatch.setattr(tokenizer_module, "_SAFE_CHUNK_CHARS", 50)
    assert len(list(tok._splitter.safe_chunks(text))) > 100                  # really cut
    assert Tokenizer(tok.merges, tok.pattern).encode_ordinary(text) == whole


@FEW
@given(text=unicode_text)
def test_ids_equal_tiktoken_on_our_ranks(text):
    tiktoken = pytest.importorskip("tiktoken")
    tok = _trained("gpt4")
    encoding = _tiktoken_encoding(tiktoken, tok)
    assert tok.encode_ordinary(text) == encoding.encode_ordinary(text)
    with_special = text + "<|user|>" + text + "<|endoftext|>"
    assert tok.encode(with_special, allowed_special="all") == encoding.encode(with_special, allowed_special="all")


def _tiktoken_encoding(tiktoken, tok):
    return tiktoken.Encoding(name="tinygrad_llm_test", pat_str=tok.pattern, mergeable_ranks=tok.mergeable_ranks(),
                             special_tokens=tok.special_tokens)


def test_ids_equal_tiktoken_on_a_larger_text(tok, tok_gpt2):
    tiktoken = pytest.importorskip("tiktoken")
    text = _make_corpus(3000, seed=7) + "a" * 700 + "ab" * 500 + " " * 400
    for t in (tok, tok_gpt2):
        assert t.encode_ordinary(text) == _tiktoken_encoding(tiktoken, t).encode_ordinary(text)


def test_encode_batch_equals_encode(tok):
    texts = [_make_corpus(200, seed=s) for s in range(6)] + ["", "<|user|>hi<|end|>"]
    expected = [tok.encode(text, allowed_special="all") for text in texts]
    assert tok.encode_batch(texts, allowed_special="all") == expected
    assert tok.encode_batch(texts, allowed_special="all", workers=2) == expected


def test_decode_marks_invalid_utf8_and_decode_bytes_is_exact(tok):
    assert tok.decode([0xE6, 0x97]) == "\ufffd"      # a cut-off 3-byte character
    assert tok.decode_bytes([0xE6, 0x97]) == b"\xe6\x97"
    ids = tok.encode("日本")
    assert tok.decode_bytes(ids[:1]) + tok.decode_bytes(ids[1:]) == "日本".encode()
    np = pytest.importorskip("numpy")
    assert tok.decode(np.array(tok.encode("numpy ids"), dtype=np.int64)) == "numpy ids"


def test_mergeable_ranks_are_bytes_first_and_contiguous(tok):
    ranks = tok.mergeable_ranks()
    assert all(ranks[bytes([b])] == b for b in range(256))
    assert sorted(ranks.values()) == list(range(len(ranks)))
    assert len(set(ranks)) == len(ranks)
    assert tok.vocab_size == 600 and len(ranks) == 600 - len(CHAT_SPECIAL_TOKENS)


# ----------------------------------------------------------------------------------------------------
# training behaviour

def test_training_is_deterministic_and_independent_of_document_order():
    documents = [_make_corpus(300, seed=s) for s in range(12)]
    first = Tokenizer.train(documents, vocab_size=400)
    again = Tokenizer.train(list(documents), vocab_size=400)
    shuffled = documents[:]
    random.Random(3).shuffle(shuffled)
    assert first.merges == again.merges == Tokenizer.train(shuffled, vocab_size=400).merges
    assert len(first.merges) == 400 - 256


def test_training_streams_from_a_generator_and_in_worker_processes():
    documents = [_make_corpus(300, seed=s) for s in range(8)]
    from_list = Tokenizer.train(documents, vocab_size=350)
    from_generator = Tokenizer.train((d for d in documents), vocab_size=350)
    with_workers = Tokenizer.train(iter(documents), vocab_size=350, workers=2)
    assert from_list.merges == from_generator.merges == with_workers.merges


# ----------------------------------------------------------------------------------------------------
# special tokens

def test_special_tokens_follow_the_merges(tok):
    n_mergeable = 600 - len(CHAT_SPECIAL_TOKENS)
    assert tok.special_tokens == {name: n_mergeable + k for k, name in enumerate(CHAT_SPECIAL_TOKENS)}


def test_disallowed_special_token_raises_and_allowed_one_encodes(tok):
    text = "<|system|>be brief<|end|><|user|>hi<|end|><|assistant|>hello<|end|><|endoftext|>"
    with pytest.raises(ValueError, match="special token .* not allowed"):
        tok.encode(text)
    ids = tok.encode(text, allowed_special="all")
    specials = tok.special_tokens
    assert ids[0] == specials["<|system|>"] and ids[-1] == specials["<|endoftext|>"]
    assert sum(i in specials.values() for i in ids) == 7
    assert tok.decode(ids) == text
    # only the named ones are allowed: <|end|> is still refused
    with pytest.raises(ValueError, match="<\\|end\\|>"):
        tok.encode("<|user|>x<|end|>", allowed_special={"<|user|>"})
    with pytest.raises(ValueError, match="unknown special"):
        tok.encode("x", allowed_special={"<|nope|>"})


def test_ordinary_text_never_produces_special_ids(tok):
    text = "<|endoftext|> <|user|><|end|>"
    ids = tok.encode_ordinary(text)
    assert not set(ids) & set(tok.special_tokens.values())
    assert tok.decode(ids) == text


def test_special_token_strings_in_the_training_text_are_not_learned():
    corpus = "<|endoftext|>".join(_make_corpus(40, seed=s) for s in range(60))
    learned_from_text = Tokenizer.train(corpus, vocab_size=450).mergeable_ranks()
    assert b"<|" in learned_from_text and b"endoftext" in learned_from_text    # the test can see a leak
    cut_out = Tokenizer.train(corpus, vocab_size=450, special_tokens=["<|endoftext|>"]).mergeable_ranks()
    assert not {b"<|", b"|>", b"endoftext", b"<|endoftext|>"} & set(cut_out)


def test_special_tokens_at_user_given_ids():
    tok = Tokenizer.train(CORPUS[:5000], vocab_size=300, special_tokens={"<|endoftext|>": 1000, "<|end|>": 999})
    assert tok.special_tokens == {"<|endoftext|>": 1000, "<|end|>": 999}
    assert tok.vocab_size == 1001
    assert tok.encode("a<|end|>", allowed_special="all")[-1] == 999
    with pytest.raises(ValueError, match="inside the merge range"):
        Tokenizer.train(CORPUS[:5000], vocab_size=300, special_tokens={"<|end|>": 5})
    with pytest.raises(ValueError, match="share id"):
        Tokenizer([], special_tokens={"<|a|>": 300, "<|b|>": 300})


# ----------------------------------------------------------------------------------------------------
# files

def test_save_load_round_trip(tok, tmp_path):
    path = tmp_path / "tok.json"
    tok.save(path)
    loaded = Tokenizer.load(path)
    assert loaded == tok
    assert loaded.merges == tok.merges and loaded.special_tokens == tok.special_tokens
    assert loaded.pattern == tok.pattern
    text = CORPUS[:3000] + "<|endoftext|>"
    assert loaded.encode(text, allowed_special="all") == tok.encode(text, allowed_special="all")
    content = json.loads(path.read_text(encoding="utf-8"))             # plain JSON, readable merges
    assert content["version"] == 1 and content["merges"][0][:2] == list(tok.merges[0])


def _saved_text(tok, tmp_path):
    path = tmp_path / "tok.json"
    tok.save(path)
    return path, path.read_text(encoding="utf-8")


def test_truncated_or_garbage_file_is_refused(tok, tmp_path):
    path, text = _saved_text(tok, tmp_path)
    path.write_text(text[: len(text) // 2], encoding="utf-8")
    with pytest.raises(TokenizerFileError, match="truncated or corrupted"):
        Tokenizer.load(path)
    path.write_bytes(b"\x80\x81 not text")
    with pytest.raises(TokenizerFileError, match="not UTF-8"):
        Tokenizer.load(path)
    path.write_text('{"hello": 1}', encoding="utf-8")
    with pytest.raises(TokenizerFileError, match="not a tinygrad_llm tokenizer file"):
        Tokenizer.load(path)


def test_wrong_version_is_refused(tok, tmp_path):
    path, text = _saved_text(tok, tmp_path)
    path.write_text(text.replace('"version": 1,', '"version": 2,', 1), encoding="utf-8")
    with pytest.raises(TokenizerFileError, match="version 2 is not supported"):
        Tokenizer.load(path)


def test_corrupted_content_is_refused(tok, tmp_path):
    path, text = _saved_text(tok, tmp_path)
    content = json.loads(text)

    def write_and_expect(changed, message):
        path.write_text(json.dumps(changed), encoding="utf-8")
        with pytest.raises(TokenizerFileError, match=message):
            Tokenizer.load(path)

    changed = json.loads(text)
    changed["merges"][5][1] = 100000                           # id that does not exist
    write_and_expect(changed, "does not exist")
    changed = json.loads(text)
    changed["merges"][3][2] = "zz"                             # text no longer matches its ids
    write_and_expect(changed, "corrupted")
    changed = json.loads(text)
    changed["special_tokens"]["<|end|>"] += 10                  # valid shape, wrong checksum
    write_and_expect(changed, "sha256")
    changed = dict(content)
    del changed["pattern"]
    write_and_expect(changed, "missing")


def test_export_tiktoken_file(tok, tmp_path, monkeypatch):
    path = tmp_path / "tok.tiktoken"
    tok.export_tiktoken(path)
    lines = path.read_text(encoding="ascii").splitlines()
    parsed = {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in lines)}
    assert parsed == tok.mergeable_ranks()
    tiktoken_load = pytest.importorskip("tiktoken.load")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")                # no cache: read our file
    assert tiktoken_load.load_tiktoken_bpe(str(path)) == tok.mergeable_ranks()


# ----------------------------------------------------------------------------------------------------
# bad input

def test_vocab_size_too_small():
    with pytest.raises(ValueError, match="at least 258"):
        Tokenizer.train("some text", vocab_size=257, special_tokens=["<|a|>", "<|b|>"])
    with pytest.raises(ValueError, match="at least 256"):
        Tokenizer.train("some text", vocab_size=100)


@pytest.mark.parametrize("corpus", ["", [], ["", ""], iter([])])
def test_empty_corpus(corpus):
    with pytest.raises(ValueError, match="empty"):
        Tokenizer.train(corpus, vocab_size=300)


def test_lone_surrogates_give_clear_errors(tok):
    with pytest.raises(ValueError, match="lone surrogate"):
        Tokenizer.train("fine text \ud800 more", vocab_size=300)
    with pytest.raises(ValueError, match="lone surrogate"):
        tok.encode("abc \udfff")


def test_other_bad_inputs(tok):
    with pytest.raises(TypeError, match="not bytes"):
        Tokenizer.train(b"bytes corpus", vocab_size=300)
    with pytest.raises(TypeError, match="item 1"):
        Tokenizer.train(["ok", 3], vocab_size=300)
    with pytest.raises(ValueError, match="unknown pattern name"):
        Tokenizer.train("text", vocab_size=300, pattern="gpt3")
    with pytest.raises(ValueError, match="silently dropped"):
        Tokenizer.train("text with spaces", vocab_size=300, pattern=r"\w+")
    with pytest.raises(ValueError, match="unknown token id"):
        tok.decode([10 ** 9])
    with pytest.raises(ValueError, match="unknown token id"):
        tok.decode([-1])
    with pytest.raises(TypeError, match="expects a str"):
        tok.encode(b"bytes")
    with pytest.raises(TypeError, match="not a single str"):
        Tokenizer([], special_tokens="<|endoftext|>")
