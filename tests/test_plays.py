"""The built-in corpus as plays: parsing the Gutenberg layout, and the split by play.

A small synthetic play in the corpus's layout stands in for the download; set TINYGRAD_LLM_TEST_DOWNLOAD=1
to also parse the real corpus.
"""
import os

import pytest
from hypothesis import given, strategies as st

from tinygrad_llm.data.plays import Line, Play, Scene, load_plays, parse_play, split_plays

SAMPLE = """THE TRAGEDY OF SAMPLE

by William Shakespeare



PERSONS REPRESENTED.

Ber., a sentinel.
FIRST WITCH.

SCENE: Elsinore.



ACT I.

SCENE I. A platform.

[Enter Bernardo and
Francisco.]

Ber.
Who's there?

Fran.
Nay, answer me: stand,
and unfold yourself.

Ber.
Long live the king! [Aside.]

[Exit Francisco.]

He is gone, and I am cold.

SCENE 2. A heath.

FIRST WITCH.
When shall we three meet again?

HAMLET {Aside.]
Not a mouse stirring.

ACT SECOND

SCENE I

Lady M.
Out, damned spot!
"""


def test_parse_play_structure():
    play = parse_play(SAMPLE, "Sample")
    assert play.title == "Sample"
    assert [s.name for s in play.scenes] == ["Act I, Scene I", "Act I, Scene II", "Act II, Scene I"]
    assert play.scenes[0].lines == (
        Line("Ber", "Who's there?"),
        Line("Fran", "Nay, answer me: stand,\nand unfold yourself."),
        Line("Ber", "Long live the king!\nHe is gone, and I am cold."),   # resumed after a stage direction
    )
    assert play.scenes[1].lines == (Line("FIRST WITCH", "When shall we three meet again?"),
                                    Line("HAMLET", "Not a mouse stirring."))
    assert play.scenes[2].lines == (Line("Lady M", "Out, damned spot!"),)
    assert len(play.lines) == 6


def test_parse_ignores_front_matter_and_poems():
    assert parse_play("SONNET 1\n\nFrom fairest creatures we desire increase,\nThat thereby\n", "Sonnets").scenes == ()
    play = parse_play(SAMPLE, "Sample")
    assert all(line.speaker != "PERSONS REPRESENTED" for line in play.lines)


def _plays(n):
    return [Play(f"Play {i:02d}", (Scene("Scene I", (Line("A", f"line {i}"),)),)) for i in range(n)]


@given(st.integers(2, 40), st.floats(0.05, 0.9), st.integers(0, 2 ** 31 - 1))
def test_split_is_disjoint_complete_and_order_free(n, fraction, seed):
    plays = _plays(n)
    train, held = split_plays(plays, fraction, seed)
    assert {p.title for p in train}.isdisjoint({p.title for p in held})
    assert len(train) + len(held) == n and len(held) >= 1 and len(train) >= 1
    train2, held2 = split_plays(list(reversed(plays)), fraction, seed)
    assert {p.title for p in held2} == {p.title for p in held}


def test_split_depends_on_seed_and_rejects_bad_input():
    plays = _plays(30)
    assert len({tuple(p.title for p in split_plays(plays, 0.2, seed)[1]) for seed in range(5)}) > 1
    with pytest.raises(ValueError):
        split_plays(plays, 1.0)
    with pytest.raises(ValueError):
        split_plays(plays + plays[:1], 0.2)


@pytest.mark.skipif(os.environ.get("TINYGRAD_LLM_TEST_DOWNLOAD") != "1", reason="set TINYGRAD_LLM_TEST_DOWNLOAD=1")
def test_real_corpus_parses_into_plays():
    plays = load_plays()
    titles = [p.title for p in plays]
    assert len(plays) >= 30 and "Hamlet" in titles and "Macbeth" in titles
    hamlet = plays[titles.index("Hamlet")]
    assert len(hamlet.scenes) == 20 and hamlet.scenes[0].lines[0] == Line("Ber", "Who's there?")
