"""The book: docs/ in reading order, with figures drawn by code, built into one PDF and one HTML page.

    pip install -e ".[book]"
    python -m tinygrad_llm.book                 # book/tinygrad_llm.pdf and book/tinygrad_llm.html
    python -m tinygrad_llm.book --check         # listings and cross-references only, no PDF

The chapters are the Markdown pages of docs/ (CHAPTERS gives the order). The build

1. draws every figure of `figures.py` into book/figures/ from the code of this checkout (a figure is
   never pasted: change the code and the figure changes);
2. joins the chapters into one document, turning links between pages into links between chapters, and
   fails on a link to a page, anchor or figure that does not exist;
3. runs every Python listing (fenced ```python blocks) of each chapter in order, in one namespace per
   chapter, as doctests run, and fails on the first that raises (a block opened with
   ```{.python .norun} is shown, not run: shapes of a snippet, or code that needs a GPU);
4. converts with pandoc (from the pypandoc-binary wheel) to Typst, compiled to PDF by the typst package,
   and to a self-contained HTML page.

Simplifications: one PDF style (Typst's default through pandoc's template); math is rendered by Typst
in the PDF and by MathML in the HTML.
"""
from __future__ import annotations

from .builder import CHAPTERS, BookError, build, main

__all__ = ["CHAPTERS", "BookError", "build", "main"]
