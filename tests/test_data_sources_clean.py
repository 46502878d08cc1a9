"""Sources (files, directories, JSONL, bad input) and cleaning (NFC, whitespace, Gutenberg, idempotence)."""
import json
import unicodedata

import pytest
from hypothesis import given, settings, strategies as st

from tinygrad_llm.data.clean import CleanStats, clean_text, strip_gutenberg
from tinygrad_llm.data.sources import MissingInputError, SourceStats, decode_utf8, expand_paths, iter_documents


def test_directory_is_walked_recursively_in_sorted_order(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "two.md").write_text("second doc")
    (tmp_path / "a.txt").write_text("first doc")
    (tmp_path / "ignored.csv").write_text("x,y")
    stats = SourceStats()
    docs = list(iter_documents([tmp_path], stats))
    assert [d.text for d in docs] == ["first doc", "second doc"]
    assert stats.files == 2 and stats.documents == 2


def test_missing_paths_fail_before_any_work(tmp_path):
    (tmp_path / "ok.txt").write_text("fine")
    with pytest.raises(MissingInputError, match="nope.txt"):
        expand_paths([tmp_path / "ok.txt", tmp_path / "nope.txt"])


def test_empty_binary_and_invalid_utf8_are_counted_not_lost(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"  \n\n")
    (tmp_path / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" * 10)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 ok".encode("latin-1"))
    (tmp_path / "good.txt").write_text("hello world")
    stats = SourceStats()
    docs = {d.id.rsplit("/", 1)[-1]: d for d in iter_documents([tmp_path], stats)}
    assert set(docs) == {"latin1.txt", "good.txt"}
    assert docs["latin1.txt"].text == "caf\ufffd ok"
    assert stats.empty == 1 and stats.binary == 1
    assert stats.invalid_utf8_docs == 1 and stats.invalid_utf8_bytes == 1
    assert {reason for _, reason in stats.skipped} == {"empty", "binary"}


def test_decode_utf8_does_not_count_genuine_replacement_characters():
    assert decode_utf8("a\ufffdb".encode()) == ("a\ufffdb", 0)
    assert decode_utf8(b"a\xffb\xfe") == ("a\ufffdb\ufffd", 2)


def test_jsonl_text_field_and_bad_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join([json.dumps({"body": "one", "id": 1}), "{not json", json.dumps({"other": 2}),
                               json.dumps({"body": "two"})]) + "\n")
    stats = SourceStats()
    docs = list(iter_documents([path], stats, text_field="body"))
    assert [d.text for d in docs] == ["one", "two"]
    assert docs[0].meta == {"id": 1}
    assert stats.bad_json == 1 and stats.missing_field == 1


def test_clean_normalises_unicode_newlines_and_whitespace():
    raw = "\ufeffCafe\u0301\r\nline  two\t\tend   \r\r\n\n\n\n\nlast\x07 para\u2028x"
    stats = CleanStats()
    out = clean_text(raw, stats=stats)
    assert out == "Caf\u00e9\nline two end\n\nlast para\nx"
    assert stats.documents == 1 and stats.chars_out == len(out)


def test_gutenberg_header_and_licence_are_stripped():
    text = ("The Project Gutenberg EBook of Hamlet\nRelease date...\n"
            "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\n\nACT I.\nWho's there?\n\n"
            "*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\nLicence text: redistribution...\n")
    body, cut = strip_gutenberg(text)
    assert cut and "Release date" not in body and "Licence" not in body
    stats = CleanStats()
    assert clean_text(text, stats=stats) == "ACT I.\nWho's there?"
    assert stats.gutenberg_stripped == 1
    assert strip_gutenberg("no markers here") == ("no markers here", False)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200))
def test_clean_is_idempotent_and_nfc(text):
    once = clean_text(text)
    assert clean_text(once) == once
    assert unicodedata.is_normalized("NFC", once)
    assert "\r" not in once and "\n\n\n" not in once and "  " not in once
