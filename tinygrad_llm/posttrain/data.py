"""Post-training data: conversation and preference JSONL, the built-in task from the plays, batches.

Formats (the chat format of OpenAI and Hugging Face, and TRL's preference format):
    conversations   {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
    preferences     {"prompt": P, "chosen": C, "rejected": R}   each a string or a message list; a string
                    prompt is one user turn, a string completion one assistant turn

Nothing is dropped silently: every line that cannot be used is counted under a reason in a `ReadReport`
(bad JSON, a missing field, an unknown role, empty content, no assistant turn, chosen equal to rejected,
longer than the context, characters the tokenizer cannot encode), and the first few are kept with their
line numbers for the message the CLI prints. Blank lines are skipped without counting.

The built-in task (`--builtin plays`) needs no download beyond the built-in corpus: from
tinygrad_llm.data.plays, three kinds of question about a speech's first verse line, each with a right
answer and a plausible wrong one (the preference pairs):
    who_says     Who says "LINE"? Choose: A; B; C        -> the speaker (wrong: another speaker of the scene)
    which_play   Which play has "LINE"? Choose: T1; T2   -> the title (wrong: another play of the same split)
    next_line    Continue: "LINE"                        -> the next speech's first line (wrong: a line of
                                                            another play)
The split is by play (data.plays.split_plays), so no held-out speech is seen in training. Choices are
listed in alphabetical order, so their position tells nothing.

Batches: examples are visited in a fresh permutation each epoch, drawn from (seed, epoch), so batch i is
a pure function of (seed, i) and resuming needs only the step. Sequences are right-padded; under the causal
mask no real token attends to a pad, and pad positions carry no target.
"""
from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from ..tokenizer import CHAT_ROLES
from .chat import apply_chat_template

IGNORE = -100
MAX_SHOWN = 5
BUILTIN_TASKS = ("who_says", "which_play", "next_line")
BUILTIN_NAMES = ("plays",) + tuple(f"plays:{task}" for task in BUILTIN_TASKS)


class PostTrainDataError(ValueError):
    """Post-training data that cannot be used at all (a missing file, nothing usable in it)."""


@dataclass
class ReadReport:
    """What a reader kept and what it skipped, by reason (never a silent drop)."""
    source: str = ""
    lines: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: list = field(default_factory=list)          # (line number, reason, detail), first MAX_SHOWN

    def skip(self, line: int, reason: str, detail: str = "") -> None:
        self.skipped[reason] += 1
        if len(self.examples) < MAX_SHOWN:
            self.examples.append((line, reason, detail))

    def format(self) -> str:
        """One line of counts, then the first skipped lines with their reasons."""
        text = f"{self.source}: {self.lines} records, {self.kept} kept"
        if self.skipped:
            text += ", skipped " + ", ".join(f"{reason} {count}" for reason, count in sorted(self.skipped.items()))
            for line, reason, detail in self.examples:
                text += f"\n  line {line}: {reason}" + (f" ({detail})" if detail else "")
        return text

    def as_dict(self) -> dict:
        return {"source": self.source, "lines": self.lines, "kept": self.kept, "skipped": dict(self.skipped)}


# ---------------------------------------------------------------------------------------------- records
def check_messages(messages, need_assistant=True):
    """None when `messages` is a usable conversation, else (reason, detail)."""
    if not isinstance(messages, list) or not messages:
        return "bad_messages", "messages must be a non-empty list"
    for number, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or "content" not in message:
            return "bad_messages", f"message {number} needs 'role' and 'content'"
        if message["role"] not in CHAT_ROLES:
            return "unknown_role", f"message {number} has role {message['role']!r}"
        if not isinstance(message["content"], str) or not message["content"].strip():
            return "empty_content", f"message {number} ({message['role']}) has no text"
    if need_assistant and not any(m["role"] == "assistant" for m in messages):
        return "no_assistant_turn", "nothing to train on"
    return None


def _messages_of(value, role):
    """A preference field as a message list: a string is one turn of `role`."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return value


def _read_jsonl(path, report, handle):
    try:
        file = open(path, encoding="utf-8")
    except FileNotFoundError:
        raise PostTrainDataError(f"{path}: no such file") from None
    except OSError as error:
        raise PostTrainDataError(f"{path}: cannot be read ({error.strerror})") from None
    with file:
        try:
            for number, line in enumerate(file, 1):
                if not line.strip():
                    continue
                report.lines += 1
                try:
                    record = json.loads(line)
                except ValueError as error:
                    report.skip(number, "bad_json", str(error)[:80])
                    continue
                if not isinstance(record, dict):
                    report.skip(number, "bad_json", "not a JSON object")
                    continue
                handle(number, record)
        except UnicodeDecodeError:
            raise PostTrainDataError(f"{path}: not UTF-8 text") from None


def read_conversations(path):
    """(conversations, report): the usable `messages` lists of a conversation JSONL file."""
    report, out = ReadReport(source=str(path)), []

    def handle(number, record):
        if "messages" not in record:
            report.skip(number, "missing_field", "no 'messages'")
            return
        problem = check_messages(record["messages"])
        if problem:
            report.skip(number, *problem)
            return
        out.append(record["messages"])
        report.kept += 1

    _read_jsonl(path, report, handle)
    return out, report


def read_preferences(path):
    """(rows, report): {"prompt", "chosen", "rejected"} rows of a preference JSONL file, as message lists."""
    report, out = ReadReport(source=str(path)), []

    def handle(number, record):
        missing = [key for key in ("prompt", "chosen", "rejected") if key not in record]
        if missing:
            report.skip(number, "missing_field", f"no {', '.join(missing)}")
            return
        prompt = _messages_of(record["prompt"], "user")
        chosen, rejected = _messages_of(record["chosen"], "assistant"), _messages_of(record["rejected"], "assistant")
        for part, need in ((prompt, False), (chosen, True), (rejected, True)):
            problem = check_messages(part, need_assistant=need)
            if problem:
                report.skip(number, *problem)
                return
        if chosen == rejected:
            report.skip(number, "chosen_equals_rejected", "nothing to prefer")
            return
        out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        report.kept += 1

    _read_jsonl(path, report, handle)
    return out, report


# ---------------------------------------------------------------------------------------------- the built-in task
@dataclass(frozen=True)
class TaskExample:
    """One question about the plays: the user's prompt, the right answer and a plausible wrong one."""
    task: str
    play: str
    prompt: str
    answer: str
    wrong: str

    def messages(self) -> list:
        return [{"role": "user", "content": self.prompt}, {"role": "assistant", "content": self.answer}]

    def preference(self) -> dict:
        return {"prompt": [{"role": "user", "content": self.prompt}],
                "chosen": [{"role": "assistant", "content": self.answer}],
                "rejected": [{"role": "assistant", "content": self.wrong}]}


def _first_line(text: str) -> str:
    return text.split("\n", 1)[0].strip()


def _usable(line: str, low=12, high=50) -> bool:
    return low <= len(line) <= high and '"' not in line


def play_tasks(plays, tasks=BUILTIN_TASKS, per_task=40, seed=0) -> list:
    """TaskExamples from `plays` (wrong titles and lines come from these plays only): at most `per_task`
    of each task per play, chosen deterministically from (seed, title, task)."""
    plays = list(plays)
    titles = [p.title for p in plays]
    pool = {p.title: [_first_line(line.text) for line in p.lines if _usable(_first_line(line.text))] for p in plays}
    out = []
    for play in plays:
        candidates = {task: [] for task in tasks}
        for scene in play.scenes:
            speakers = sorted({line.speaker for line in scene.lines if line.speaker.upper() not in ("ALL", "BOTH")})
            for i, line in enumerate(scene.lines):
                text = _first_line(line.text)
                if not _usable(text):
                    continue
                if "who_says" in tasks and line.speaker in speakers and len(speakers) >= 2:
                    candidates["who_says"].append((text, line.speaker, speakers))
                if "next_line" in tasks and i + 1 < len(scene.lines):
                    following = _first_line(scene.lines[i + 1].text)
                    if _usable(following, 2):
                        candidates["next_line"].append((text, following))
                if "which_play" in tasks and len(plays) >= 2:
                    candidates["which_play"].append((text,))
        for task in tasks:
            pick = random.Random(f"{seed}:{play.title}:{task}")
            chosen = candidates[task]
            chosen = pick.sample(chosen, min(per_task, len(chosen)))
            for item in chosen:
                text = item[0]
                if task == "who_says":
                    others = [s for s in item[2] if s != item[1]]
                    shown = pick.sample(others, min(2, len(others)))
                    choices = sorted([item[1]] + shown)
                    out.append(TaskExample(task, play.title, f'Who says "{text}"? Choose: {"; ".join(choices)}',
                                           item[1], shown[0]))
                elif task == "which_play":
                    other = pick.choice([t for t in titles if t != play.title])
                    choices = sorted([play.title, other])
                    out.append(TaskExample(task, play.title, f'Which play has "{text}"? Choose: {"; ".join(choices)}',
                                           play.title, other))
                else:
                    other_play = pick.choice([t for t in titles if t != play.title and pool[t]] or [play.title])
                    wrong = pick.choice(pool[other_play])
                    if wrong == item[1]:
                        continue
                    out.append(TaskExample(task, play.title, f'Continue: "{text}"', item[1], wrong))
    return out


def builtin_split(name="plays", held_out_fraction=0.2, seed=0, per_task=40, root=None, download=True):
    """(train examples, held-out examples) of a built-in task: "plays" (all three questions) or "plays:TASK"."""
    from ..data.plays import load_plays, split_plays
    if name not in BUILTIN_NAMES:
        raise PostTrainDataError(f"unknown built-in task {name!r}; known: {', '.join(BUILTIN_NAMES)}")
    tasks = BUILTIN_TASKS if name == "plays" else (name.split(":", 1)[1],)
    train_plays, held_plays = split_plays(load_plays(root, download), held_out_fraction, seed)
    return (play_tasks(train_plays, tasks, per_task, seed), play_tasks(held_plays, tasks, per_task, seed))


# ---------------------------------------------------------------------------------------------- encoding
@dataclass
class Sequence:
    """A rendered conversation: ids and the 0/1 mask of the tokens that carry loss (assistant tokens)."""
    ids: np.ndarray
    mask: np.ndarray


def _encode(tokenizer, messages, max_len, report, number):
    try:
        ids, mask = apply_chat_template(tokenizer, messages)
    except KeyError as error:            # the character vocabulary: a character it does not know
        report.skip(number, "unencodable", str(error.args[0] if error.args else error)[:80])
        return None
    except ValueError as error:
        report.skip(number, "bad_messages", str(error)[:80])
        return None
    if len(ids) > max_len:
        report.skip(number, "longer_than_context", f"{len(ids)} tokens > {max_len}")
        return None
    return Sequence(np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=np.uint8))


def encode_conversations(conversations, tokenizer, max_len, source="conversations"):
    """(sequences, report): each conversation through the chat template; longer than max_len is skipped."""
    report, out = ReadReport(source=source), []
    for number, messages in enumerate(conversations, 1):
        report.lines += 1
        sequence = _encode(tokenizer, messages, max_len, report, number)
        if sequence is not None:
            out.append(sequence)
            report.kept += 1
    return out, report


def encode_preferences(rows, tokenizer, max_len, source="preferences"):
    """(pairs, report): each row as two Sequences (prompt + chosen, prompt + rejected) whose masks cover
    only the completion's assistant tokens (an assistant turn inside the prompt is context, not scored)."""
    report, out = ReadReport(source=source), []
    for number, row in enumerate(rows, 1):
        report.lines += 1
        pair = []
        for key in ("chosen", "rejected"):
            sequence = _encode(tokenizer, row["prompt"] + row[key], max_len, report, number)
            if sequence is None:
                break
            prompt_len = len(apply_chat_template(tokenizer, row["prompt"])[0])
            sequence.mask[:prompt_len] = 0
            pair.append(sequence)
        if len(pair) == 2:
            out.append(tuple(pair))
            report.kept += 1
    return out, report


# ---------------------------------------------------------------------------------------------- batches
def batch_indices(count: int, batch_size: int, index: int, seed: int) -> list:
    """Example indices of batch `index`: the examples in a permutation per epoch drawn from (seed, epoch)."""
    if count <= 0:
        raise PostTrainDataError("no examples to draw batches from")
    out, orders = [], {}
    for position in range(index * batch_size, (index + 1) * batch_size):
        epoch, offset = divmod(position, count)
        if epoch not in orders:
            orders[epoch] = np.random.default_rng([seed, epoch]).permutation(count)
        out.append(int(orders[epoch][offset]))
    return out


def collate(sequences, pad_id=0):
    """Right-padded inputs, targets and target mask of sequences: x, y (B, T) int64, mask (B, T) float.

    x = ids[:-1], y = ids[1:]; mask[b, t] is 1 where y[b, t] is a token that carries loss (its position in
    the sequence is masked in). Pads: x = pad_id, y = pad_id, mask = 0."""
    time = max(len(s.ids) for s in sequences) - 1
    x = np.full((len(sequences), time), pad_id, dtype=np.int64)
    y = np.full((len(sequences), time), pad_id, dtype=np.int64)
    mask = np.zeros((len(sequences), time), dtype=np.float32)
    for row, sequence in enumerate(sequences):
        n = len(sequence.ids) - 1
        x[row, :n] = sequence.ids[:-1]
        y[row, :n] = sequence.ids[1:]
        mask[row, :n] = sequence.mask[1:]
    return x, y, mask


def sft_targets(y, mask):
    """Targets for cross-entropy: y where the mask keeps the token, IGNORE elsewhere."""
    return np.where(mask > 0, y, IGNORE)
