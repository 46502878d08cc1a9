"""Build the book: figures, chapters joined with checked links, executed listings, pandoc → Typst → PDF."""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from .errors import BookError


@dataclass(frozen=True)
class Chapter:
    slug: str            # the chapter's anchor, "data"
    source: str          # path from the repository root, "docs/data.md"
    title: str           # used only when the page does not exist yet
    stage: str           # one line for a stage that is not built yet


CHAPTERS = (
    Chapter("introduction", "docs/introduction.md", "Why and what", ""),
    Chapter("data", "docs/data.md", "Data", ""),
    Chapter("tokenizer", "docs/tokenizer.md", "Tokenization", ""),
    Chapter("architecture", "docs/architecture.md", "The architecture", ""),
    Chapter("backprop", "docs/backprop.md", "The engine and every backward pass", ""),
    Chapter("training", "docs/training.md", "Training", ""),
    Chapter("gpu", "docs/gpu.md", "GPU kernels", ""),
    Chapter("gpu_attention", "docs/gpu_attention.md", "Flash attention on the GPU", ""),
    Chapter("evaluation", "docs/evaluation.md", "Evaluation",
            "Multiple-choice benchmarks scored as lm-evaluation-harness scores them: not built yet."),
    Chapter("posttraining", "docs/posttraining.md", "Post-training: SFT and DPO",
            "Supervised fine-tuning with the chat template and DPO: not built yet."),
    Chapter("quantization", "docs/quantization.md", "Quantization",
            "Q8_0, Q4_0 and INT8 weights with batched decoding: not built yet."),
    Chapter("export", "docs/export.md", "Export",
            "Hugging Face tokenizer files, GGUF for llama.cpp and the model card: not built yet."),
    Chapter("serving", "docs/serving.md", "Serving and safety",
            "An OpenAI-compatible server with continuous batching, metrics and a safety filter: not built yet."),
    Chapter("distributed", "docs/distributed.md", "Distributed training",
            "Data-parallel training over MPI and NCCL: not built yet."),
    Chapter("changelog", "CHANGELOG.md", "Release notes", ""),
)

# Typst settings for the PDF, on top of pandoc's template: listings of up to 110 characters fit a line at
# a readable size (with the margins below); tables are a little smaller than the text and their cells
# aligned left unless a column asks otherwise (see _left_align_tables).
TYPST_STYLE = """\
#show raw.where(block: true): set text(size: 7.4pt)
#show table: set text(size: 0.88em)
"""
TYPST_METADATA = """\
margin:
  x: 2cm
  y: 2.4cm
"""

_FENCE = re.compile(r"^(\s*)(```+|~~~+)\s*(\{[^}]*\}|[\w+-]*)\s*$")
_HEADER = re.compile(r"^(#{1,6})\s+(.*?)\s*(\{#([^}\s]+)[^}]*\})?\s*$")
_LINK = re.compile(r"(!?)\[((?:[^\[\]]|\[[^\]]*\])*)\]\(([^)\s]+)(\s+\"[^\"]*\")?\)")


def _left_align_tables(typst_source: str) -> str:
    """Pandoc writes a table's column alignments as `align: (auto,right,...)` inside a centred figure, so
    an `auto` column would be centred; make those columns left-aligned (explicit ones stay)."""
    return re.sub(r"(?m)^(\s*align: \()([^)]*)(\),)$",
                  lambda m: m.group(1) + re.sub(r"\bauto\b", "left", m.group(2)) + m.group(3), typst_source)


def repository_root() -> Path:
    """The checkout this package runs from: the book is built from docs/ beside the package."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "docs").is_dir():
        raise BookError(f"no docs/ beside the package ({root}): the book builds from a source checkout")
    return root


def pandoc_identifier(text: str) -> str:
    """The identifier pandoc gives a header (its auto_identifiers extension): markup removed, lower case,
    letters, digits, '_', '-', '.' kept, spaces to hyphens, everything before the first letter dropped."""
    text = _LINK.sub(lambda m: m.group(2), text)
    text = re.sub(r"[`*]", "", text)
    text = text.lower()
    kept = "".join(c if (c.isalnum() or c in "_-. ") else "" for c in text)
    kept = re.sub(r"\s+", "-", kept.strip())
    match = re.search(r"[^\W\d_]", kept)
    return kept[match.start():] if match else "section"


def _blocks(lines):
    """Yield (index, line, in_code) for every line; in_code is True inside fenced blocks (fences too)."""
    fence = None
    for i, line in enumerate(lines):
        match = _FENCE.match(line)
        if fence is None and match:
            fence = match.group(2)
            yield i, line, True
        elif fence is not None and line.strip().startswith(fence) and line.strip().strip(fence[0]) == "":
            fence = None
            yield i, line, True
        else:
            yield i, line, fence is not None


@dataclass
class Page:
    chapter: Chapter
    lines: list
    anchors: dict        # the page's own header ids -> global ids


def _read_page(root: Path, chapter: Chapter) -> Page:
    path = root / chapter.source
    if path.exists():
        lines = path.read_text(encoding="utf-8").splitlines()
    else:
        lines = [f"# {chapter.title}", "", chapter.stage or "Not written yet."]
    anchors, seen = {}, set()
    out, titled = [], False
    for i, line, in_code in _blocks(lines):
        match = None if in_code else _HEADER.match(line)
        if not match:
            out.append(line)
            continue
        level, text, local = match.group(1), match.group(2), match.group(4) or pandoc_identifier(match.group(2))
        base, n = local, 1
        while local in seen:                          # pandoc numbers repeated headers: x, x-1, x-2
            local, n = f"{base}-{n}", n + 1
        seen.add(local)
        if not titled and len(level) == 1:
            anchors[local] = chapter.slug
            out.append(f"# {text} {{#{chapter.slug}}}")
            titled = True
            continue
        anchors[local] = f"{chapter.slug}--{local}"
        out.append(f"{level} {text} {{#{chapter.slug}--{local}}}")
    if not titled:
        out.insert(0, f"# {chapter.title} {{#{chapter.slug}}}")
    return Page(chapter, out, anchors)


def _rewrite_links(root: Path, page: Page, pages: dict, figures: set, problems: list) -> list:
    """Links between pages become links between chapters; images must be generated figures; links to
    other files of the repository become their path in code type; anything dangling is a problem."""
    source_dir = (root / page.chapter.source).parent
    out = []

    def replace(match):
        bang, text, target, title = match.group(1), match.group(2), match.group(3), match.group(4) or ""
        where = f"{page.chapter.source}: link to {target!r}"
        if re.match(r"^[a-z]+:", target):                      # http:, https:, mailto:
            return match.group(0)
        if bang:
            name = Path(target).name
            if not target.startswith("figures/") or Path(name).stem not in figures:
                problems.append(f"{where}: images must be figures drawn by tinygrad_llm/book/figures.py "
                                f"(figures/NAME.png), known: {', '.join(sorted(figures))}")
            return match.group(0)
        path_part, _, anchor = target.partition("#")
        if not path_part:                                       # an anchor on this page
            if anchor not in page.anchors:
                problems.append(f"{where}: no header with that id on this page")
                return match.group(0)
            return f"[{text}](#{page.anchors[anchor]}{title})"
        resolved = (source_dir / path_part).resolve()
        other = pages.get(resolved)
        if other is not None:
            if anchor and anchor not in other.anchors:
                problems.append(f"{where}: {other.chapter.source} has no header with id {anchor!r}")
                return match.group(0)
            return f"[{text}](#{other.anchors[anchor] if anchor else other.chapter.slug}{title})"
        if resolved.exists() and root in resolved.parents:
            return f"{text} (`{resolved.relative_to(root).as_posix()}`)"
        problems.append(f"{where}: no such file in the repository")
        return match.group(0)

    lines = page.lines
    for i, line, in_code in _blocks(lines):
        if not in_code and line.lstrip().startswith("!["):
            alone = (_LINK.fullmatch(line.strip()) is not None
                     and (i == 0 or not lines[i - 1].strip()) and (i + 1 == len(lines) or not lines[i + 1].strip()))
            if not alone:   # pandoc makes a figure with a caption only of an image that is a paragraph by itself
                problems.append(f"{page.chapter.source}: the figure at line {i + 1} must be a paragraph of its own "
                                f"(blank lines around it), or it is drawn inline without its caption")
        out.append(line if in_code else _LINK.sub(replace, line))
    return out


def listings(page: Page):
    """(line number, code) of each runnable Python listing of a page, in order."""
    code, start, runnable = None, 0, False
    for i, line, in_code in _blocks(page.lines):
        match = _FENCE.match(line) if code is None else None
        if match and in_code:
            info = match.group(3)
            runnable = info == "python" or (info.startswith("{") and ".python" in info and ".norun" not in info)
            code, start = [], i + 1
        elif code is not None and in_code and not _FENCE.match(line):
            code.append(line)
        elif code is not None:
            if runnable:
                yield start, "\n".join(code)
            code = None


def run_listings(root: Path, page: Page, log) -> int:
    """Run a page's Python listings in one namespace, in a scratch directory; BookError on the first that
    raises, with the page, the listing's line and the error."""
    namespace = {"__name__": f"book_{page.chapter.slug}"}
    count = 0
    with tempfile.TemporaryDirectory(prefix="book_listing_") as scratch:
        previous = os.getcwd()
        os.chdir(scratch)
        try:
            for line, code in listings(page):
                count += 1
                started = time.perf_counter()
                try:
                    with contextlib.redirect_stdout(io.StringIO()):
                        exec(compile(code, f"{page.chapter.source}, listing at line {line}", "exec"), namespace)
                except Exception as error:   # a listing is user code: every failure is the book's failure
                    last = traceback.extract_tb(error.__traceback__)[-1]
                    raise BookError(f"{page.chapter.source}: the listing at line {line} raised "
                                    f"{type(error).__name__}: {error} (at {last.filename}:{last.lineno})") from None
                log(f"  ran {page.chapter.source}:{line} in {time.perf_counter() - started:.1f} s")
        finally:
            os.chdir(previous)
    return count


def _tool(name):
    try:
        return __import__(name)
    except ImportError:
        raise BookError(f"the book needs {name}: pip install -e .[book]") from None


def build(out_dir: str | os.PathLike = "book", check_only: bool = False, log=print) -> dict:
    """Build the book into out_dir (figures/, tinygrad_llm.md, .typ, .pdf, .html); returns a summary."""
    from . import figures as figure_module

    root = repository_root()
    out = Path(out_dir).resolve()
    (out / "figures").mkdir(parents=True, exist_ok=True)
    pages = {(root / c.source).resolve(): _read_page(root, c) for c in CHAPTERS}
    problems = []
    text = []
    for page in pages.values():
        text.extend(_rewrite_links(root, page, pages, set(figure_module.FIGURES), problems))
        text.append("")
    if problems:
        raise BookError("broken references:\n  " + "\n  ".join(problems))

    ran = 0
    for page in pages.values():
        ran += run_listings(root, page, log)
    summary = {"chapters": len(pages), "listings": ran, "out": str(out)}
    if check_only:
        return summary

    drawn = figure_module.draw_all(out / "figures", log=log)
    summary["figures"] = len(drawn)
    markdown = out / "tinygrad_llm.md"
    markdown.write_text("\n".join(text) + "\n", encoding="utf-8")

    pypandoc, typst = _tool("pypandoc"), _tool("typst")
    from .. import __version__
    metadata = ["--metadata", "title=tinygrad_llm: a language model from scratch",
                "--metadata", f"subtitle=version {__version__}", "--metadata", "lang=en"]
    typ = out / "tinygrad_llm.typ"
    style, page = out / "style.typ", out / "page.yaml"
    style.write_text(TYPST_STYLE, encoding="utf-8")
    page.write_text(TYPST_METADATA, encoding="utf-8")
    # --columns: pipe tables narrower than this get widths from their content, not from their dashes
    pypandoc.convert_file(str(markdown), "typst", outputfile=str(typ),
                          extra_args=["--standalone", "--toc", "--number-sections", "--resource-path", str(out),
                                      "--columns", "1000", "--include-in-header", str(style), "--metadata-file", str(page),
                                      *metadata])
    typ.write_text(_left_align_tables(typ.read_text(encoding="utf-8")), encoding="utf-8")
    pdf = out / "tinygrad_llm.pdf"
    try:
        typst.compile(str(typ), output=str(pdf), root=str(out))
    except Exception as error:    # typst raises its own error types with the compiler's message
        raise BookError(f"typst could not compile {typ}: {error}") from None
    html = out / "tinygrad_llm.html"
    pypandoc.convert_file(str(markdown), "html", outputfile=str(html),
                          extra_args=["--standalone", "--toc", "--number-sections", "--mathml", "--embed-resources",
                                      "--resource-path", str(out), *metadata])
    summary.update(pdf=str(pdf), html=str(html), pdf_bytes=pdf.stat().st_size)
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tinygrad_llm.book", description=__doc__)
    parser.add_argument("--out-dir", default="book", help="where the book is written (default: book/)")
    parser.add_argument("--check", action="store_true", help="check references and run the listings only")
    args = parser.parse_args(argv)
    try:
        summary = build(args.out_dir, check_only=args.check)
    except BookError as error:
        print(f"book: error: {error}", file=sys.stderr)
        return 1
    print(f"book: {summary['chapters']} chapters, {summary['listings']} listings run"
          + (f", {summary['figures']} figures; wrote {summary['pdf']} and {summary['html']}"
             if "pdf" in summary else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
