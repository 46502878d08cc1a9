"""Multiple-choice tasks: the Item, task files (generic JSONL and HellaSwag's), bad rows counted.

    task = read_task_file("hellaswag_val.jsonl", limit=500)
    task.items[0]          # Item(context="...", choices=("...", ...), gold=2, target_delimiter=" ")
    task.problems          # Counter({"gold_out_of_range": 3, ...}): rows that were skipped, by reason

File formats (one JSON object per line; blank lines are ignored):
- generic: {"context": str, "choices": [str, ...], "gold": int}, optionally "target_delimiter" (the text
  put between the context and each choice, " " by default, as in lm-evaluation-harness) and "id".
- HellaSwag, as published (Rowan/hellaswag): {"ctx": str, "endings": [str, ...], "label": int or "3"},
  with "activity_label", "ctx_a", "ctx_b" when present. It is preprocessed the way the harness's hellaswag
  task does: context = activity_label + ": " + ctx_a + " " + capitalised ctx_b; bracketed WikiHow artefacts
  ("[title]" becomes ". ", any other "[...]" is removed), double spaces collapsed, ends stripped; the
  choices get the same cleaning.

A row that cannot be used (unreadable JSON, missing or mistyped fields, no choices, an empty choice, a gold
index out of range) is skipped and counted under its reason in `Task.problems`, with the first few line
numbers in `Task.examples`. A file that cannot be read at all raises TaskFileError with one line of text.
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field

EXAMPLE_LINES = 5           # line numbers kept per problem reason


class TaskFileError(ValueError):
    """A task file that cannot be read at all (missing, a directory, not UTF-8, no usable row)."""


@dataclass(frozen=True)
class Item:
    """One multiple-choice question: the model scores context + target_delimiter + choice for each choice."""
    context: str
    choices: tuple
    gold: int
    target_delimiter: str = " "
    id: object = None


@dataclass
class Task:
    """A named list of items, with the rows skipped while reading (problems: reason -> count)."""
    name: str
    items: list
    source: str = ""
    problems: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)

    @property
    def chance(self) -> float:
        """Expected accuracy of a uniform random guess: the mean of 1 / (number of choices)."""
        return sum(1.0 / len(item.choices) for item in self.items) / len(self.items) if self.items else 0.0

    def skip(self, reason: str, where) -> None:
        """Count one unusable row under `reason` (keeping the first few line numbers or ids)."""
        self.problems[reason] += 1
        kept = self.examples.setdefault(reason, [])
        if len(kept) < EXAMPLE_LINES:
            kept.append(where)


class RowError(ValueError):
    """One row that cannot become an Item; args[0] is the reason key counted in Task.problems."""


# ---------------------------------------------------------------------------------------------- rows
def _text(value, reason: str) -> str:
    if not isinstance(value, str):
        raise RowError(reason)
    return value


def _gold(value, count: int) -> int:
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise RowError("gold_not_an_integer")
    if not 0 <= value < count:
        raise RowError("gold_out_of_range")
    return value


def _choices(value) -> tuple:
    if not isinstance(value, list):
        raise RowError("choices_not_a_list")
    if not value:
        raise RowError("empty_choices")
    if not all(isinstance(choice, str) for choice in value):
        raise RowError("choice_not_text")
    if not all(choice for choice in value):
        raise RowError("empty_choice")
    return tuple(value)


def generic_item(row: dict, index=None) -> Item:
    """An Item from {"context", "choices", "gold"[, "target_delimiter", "id"]}; RowError(reason) if unusable."""
    if "context" not in row or "choices" not in row or "gold" not in row:
        raise RowError("missing_fields")
    choices = _choices(row["choices"])
    delimiter = _text(row.get("target_delimiter", " "), "target_delimiter_not_text")
    return Item(_text(row["context"], "context_not_text"), choices, _gold(row["gold"], len(choices)),
                delimiter, row.get("id", index))


def hellaswag_preprocess(text: str) -> str:
    """The harness's HellaSwag cleaning: strip, " [title]" -> ". ", drop [bracketed] text, "  " -> " "."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag_item(row: dict, index=None) -> Item:
    """An Item from a HellaSwag row (ctx, endings, label; activity_label, ctx_a, ctx_b when present)."""
    if "endings" not in row or "label" not in row or "ctx" not in row:
        raise RowError("missing_fields")
    if all(isinstance(row.get(key), str) for key in ("activity_label", "ctx_a", "ctx_b")):
        context = row["activity_label"] + ": " + row["ctx_a"] + " " + row["ctx_b"].capitalize()
    else:
        context = _text(row["ctx"], "context_not_text")
    raw = _choices(row["endings"])
    choices = tuple(hellaswag_preprocess(choice) for choice in raw)
    if not all(choices):
        raise RowError("empty_choice")
    if row["label"] in ("", None):
        raise RowError("gold_missing")              # the test split carries no labels
    return Item(hellaswag_preprocess(context), choices, _gold(row["label"], len(choices)), " ",
                row.get("ind", index))


def item_from_row(row) -> Item:
    """The Item of one decoded JSON row, in whichever of the two formats it is written."""
    if not isinstance(row, dict):
        raise RowError("not_an_object")
    if "endings" in row and "ctx" in row:
        return hellaswag_item(row)
    return generic_item(row)


# ---------------------------------------------------------------------------------------------- files
def read_task_file(path: str, limit: int | None = None, name: str | None = None) -> Task:
    """The usable items of a JSONL task file (the first `limit` of them), bad rows counted (module docstring)."""
    if os.path.isdir(path):
        raise TaskFileError(f"{path} is a directory, not a JSONL task file")
    task = Task(name or os.path.splitext(os.path.basename(path))[0], [], os.path.abspath(path))
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if limit is not None and len(task.items) >= limit:
                    break
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError:
                    task.skip("unreadable_json", number)
                    continue
                try:
                    item = item_from_row(row)
                except RowError as error:
                    task.skip(error.args[0], number)
                    continue
                if item.id is None:
                    item = Item(item.context, item.choices, item.gold, item.target_delimiter, number)
                task.items.append(item)
    except FileNotFoundError:
        raise TaskFileError(f"task file not found: {path}") from None
    except UnicodeDecodeError as error:
        raise TaskFileError(f"{path} is not UTF-8 text (byte {error.start} of a line)") from None
    except OSError as error:
        raise TaskFileError(f"cannot read {path}: {error.strerror or error}") from None
    if not task.items:
        found = ", ".join(f"{reason} {count}" for reason, count in sorted(task.problems.items())) or "no rows"
        raise TaskFileError(f"{path} holds no usable multiple-choice row ({found}); expected JSON lines "
                            f'{{"context": ..., "choices": [...], "gold": i}} or HellaSwag\'s ctx/endings/label')
    return task


def write_task_file(task: Task, path: str) -> None:
    """The items as generic JSONL rows (context, choices, gold, target_delimiter, id), written atomically."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    temporary = path + ".tmp"
    with open(temporary, "w", encoding="utf-8") as f:
        for item in task.items:
            f.write(json.dumps({"context": item.context, "choices": list(item.choices), "gold": item.gold,
                                "target_delimiter": item.target_delimiter, "id": item.id},
                               ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)
