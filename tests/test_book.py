"""The book's build: links between chapters are checked, listings run, figures are known names.

The full build (figures, pandoc, Typst) runs in CI through `.ci/run`; these tests check the pieces, and
`--check` over the real docs (every listing of every chapter runs, every link resolves).
"""
from __future__ import annotations

from pathlib import Path

import pytest

import tinygrad_llm.book.builder as book
from tinygrad_llm.book.figures import FIGURES


def _page(tmp_path, name, text, slug="demo"):
    path = tmp_path / "docs" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    chapter = book.Chapter(slug, f"docs/{name}", "Demo", "")
    return book._read_page(tmp_path, chapter)


@pytest.mark.parametrize("header, expected", [
    ("The training loop (`tinygrad_llm.train`)", "the-training-loop-tinygrad_llm.train"),
    ("1. Data: sources", "data-sources"),
    ("RoPE's R(a)ᵀR(b)", "ropes-raᵀrb"),
    ("Q8_0 and Q4_0 — blocks", "q8_0-and-q4_0-blocks"),
    ("Δ = rowsum(dO ∘ O)", "δ-rowsumdo-o"),
    ("[Linked](x.md) header", "linked-header"),
])
def test_pandoc_identifiers(header, expected):
    assert book.pandoc_identifier(header) == expected


def test_links_between_pages_become_links_between_chapters(tmp_path):
    first = _page(tmp_path, "a.md", "# A\n\n## Part one\n\nSee [b](b.md#the-end) and [here](#part-one).\n", "a")
    second = _page(tmp_path, "b.md", "# B\n\n## The end\n\nBack to [a](a.md).\n", "b")
    pages = {(tmp_path / "docs" / "a.md").resolve(): first, (tmp_path / "docs" / "b.md").resolve(): second}
    problems = []
    text = "\n".join(book._rewrite_links(tmp_path, first, pages, set(), problems)
                     + book._rewrite_links(tmp_path, second, pages, set(), problems))
    assert problems == []
    assert "[b](#b--the-end)" in text and "[here](#a--part-one)" in text and "[a](#a)" in text
    assert "# A {#a}" in text and "## The end {#b--the-end}" in text


def test_dangling_links_and_unknown_images_are_reported(tmp_path):
    page = _page(tmp_path, "a.md", "# A\n\n[x](#nowhere) [y](missing.md) ![z](figures/not_a_figure.png)\n"
                                   "```python\n[ignored](in-code.md)\n```\n")
    problems = []
    book._rewrite_links(tmp_path, page, {(tmp_path / "docs" / "a.md").resolve(): page}, {"known"}, problems)
    assert len(problems) == 3
    assert any("nowhere" in p for p in problems) and any("missing.md" in p for p in problems)
    assert any("not_a_figure" in p for p in problems)


def test_listings_run_in_order_and_a_failure_names_the_line(tmp_path):
    page = _page(tmp_path, "a.md", "# A\n\n```python\nx = 2\n```\n\n```{.python .norun}\nundefined_name\n```\n\n"
                                   "```python\nassert x == 2\ny = 1 / 0\n```\n")
    assert [line for line, _ in book.listings(page)] == [3, 11]
    with pytest.raises(book.BookError, match=r"docs/a.md: the listing at line 11 raised ZeroDivisionError"):
        book.run_listings(tmp_path, page, log=lambda message: None)


def test_every_figure_a_chapter_shows_is_registered_and_every_registered_figure_is_shown():
    root = book.repository_root()
    shown = set()
    for chapter in book.CHAPTERS:
        path = root / chapter.source
        if path.exists():
            page = book._read_page(root, chapter)
            for line in page.lines:
                for match in book._LINK.finditer(line):
                    if match.group(1):
                        shown.add(Path(match.group(3)).stem)
    assert shown <= set(FIGURES)
    assert set(FIGURES) <= shown, f"figures drawn but never shown: {sorted(set(FIGURES) - shown)}"


def test_the_real_book_checks_out():
    """Every link of every chapter resolves and every listing runs (what the full build checks first)."""
    summary = book.build(check_only=True, log=lambda message: None)
    assert summary["chapters"] == len(book.CHAPTERS)
    assert summary["listings"] >= 5


def test_table_columns_without_an_alignment_are_left_aligned_in_the_typst_source():
    source = ("#figure(\n  align(center)[#table(\n    columns: 3,\n    align: (auto,right,auto,),\n"
              "    table.header([a], [b], [c],),\n  )]\n)\n")
    out = book._left_align_tables(source)
    assert "    align: (left,right,left,),\n" in out
    assert out.replace("(left,right,left,)", "(auto,right,auto,)") == source     # nothing else changes


def test_a_figure_inside_a_paragraph_is_reported(tmp_path):
    page = _page(tmp_path, "a.md", "# A\n\nText before\n![cap](figures/known.png)\nand after.\n\n"
                                   "![cap](figures/known.png)\n")
    problems = []
    book._rewrite_links(tmp_path, page, {(tmp_path / "docs" / "a.md").resolve(): page}, {"known"}, problems)
    assert len(problems) == 1 and "line 4" in problems[0] and "paragraph of its own" in problems[0]
