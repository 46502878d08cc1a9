"""Post-training data: conversation and preference JSONL, the built-in task from the plays, batches.

Formats (the chat format of OpenAI and Hugging Face, and TRL's preference format):
    conversations   {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
    preferences     {"prompt": P, "chosen": C, "rejected": R}   each a string or a message list; a string
                    prompt is one user turn, a string completion one assistant turn

Nothing is dropped silently: every line that cannot be used is counted under a reason in a `ReadReport`
(bad JSON, a missing field, an unknown role, empty content, no assistant turn, chosen equal to rejected,
longer than the context, characters the tokenizer cannot encode), and the first few are kept with their
line numbers for the message the CLI prints. Blank lines are skipped without counting.

The built-in task (`--builtin plays`) needs no download beyond the built-in corpus. From
tinygrad_llm.data.plays, each question shows an excerpt of EXCERPT_SPEECHES consecutive speeches of a
scene, one row each, "NAME: line" (the speech's first verse line cut at a word boundary to EXCERPT_CHARS),
then asks about it; the answer is always a name shown in the excerpt, so it can be read off the prompt:
    who_says       ...\nWho says "LINE"?          -> the name on LINE's row
    next_speaker   ...\nWho speaks after NAME?    -> the name on the row after NAME's (NAME once among the
                                                   rows before the last)
The preference pairs reject another name of the same excerpt. The split is by play
(data.plays.split_plays), so no held-out speech is seen in training. The training questions rename the
excerpt's speakers, one to one, with invented names ("BRALIOS", "TEMUN"): an answer can then only be read
off the excerpt, never recalled (a small model otherwise learns the training plays' names, or a list of
names it was shown, instead of reading). The held-out questions keep the real names.
Simplifications: excerpts with a chorus ("ALL", "BOTH", "X and Y"), a speaker name over 16 characters, a
quote mark or a line under 8 characters are not used; one question per excerpt.

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
EXCERPT_SPEECHES = 3            # speeches shown in a built-in question
EXCERPT_CHARS = 20              # longest verse line shown of each speech
CHORUS = ("ALL", "BOTH")        # speeches of several speakers (and "X and Y"): never in an excerpt
BUILTIN_TASKS = ("who_says", "next_speaker")
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


def _shown(text: str, limit=EXCERPT_CHARS) -> str:
    """A speech's first verse line cut at a word boundary to at most `limit` characters ("" if unusable)."""
    line = text.split("\n", 1)[0].strip()
    if '"' in line:
        return ""
    if len(line) > limit:
        line = line[:limit + 1].rsplit(" ", 1)[0].rstrip(" ,;:-")
    return line if len(line) >= 8 else ""


def _excerpts(scene):
    """Windows of EXCERPT_SPEECHES consecutive speeches of a scene as (speaker, shown line) pairs, where every
    line is usable, no speaker is a chorus and at least two speakers differ."""
    for start in range(len(scene.lines) - EXCERPT_SPEECHES + 1):
        window = [(line.speaker, _shown(line.text)) for line in scene.lines[start:start + EXCERPT_SPEECHES]]
        if all(text and speaker.upper() not in CHORUS and " and " not in speaker.lower() and len(speaker) <= 16
               for speaker, text in window) \
                and len({speaker for speaker, _ in window}) >= 2:
            yield window


def _render(window) -> str:
    return "\n".join(f"{speaker}: {text}" for speaker, text in window)


def _questions(window, task, pick):
    """(prompt, answer, wrong) questions of one kind about an excerpt; every answer is a name of the excerpt."""
    speakers = sorted({speaker for speaker, _ in window})
    out = []
    if task == "who_says":
        texts = [text for _, text in window]
        for speaker, text in window:
            if texts.count(text) == 1:
                wrong = pick.choice([s for s in speakers if s != speaker])
                out.append((f'{_render(window)}\nWho says "{text}"?', speaker, wrong))
    elif task == "next_speaker":
        before = [speaker for speaker, _ in window[:-1]]
        for i, (speaker, _) in enumerate(window[:-1]):
            answer = window[i + 1][0]
            if before.count(speaker) == 1 and answer != speaker:
                wrong = pick.choice([s for s in speakers if s != answer])
                out.append((f"{_render(window)}\nWho speaks after {speaker}?", answer, wrong))
    return out


_ONSETS = ("B", "C", "D", "F", "G", "H", "L", "M", "N", "P", "R", "S", "T", "V", "BR", "CL", "GR", "ST", "TH")
_VOWELS = ("A", "E", "I", "O", "U", "IA", "EO")
_CODAS = ("", "", "", "N", "S", "R", "L", "M")


def invented_name(rng) -> str:
    """A pronounceable made-up speaker name of two or three syllables ("BRALIOS", "TEMUN")."""
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
                   for _ in range(rng.choice((2, 2, 3))))


def play_tasks(plays, tasks=BUILTIN_TASKS, per_task=40, seed=0, rename=False) -> list:
    """TaskExamples from `plays` (module docstring): at most `per_task` of each kind per play, picked
    deterministically from (seed, title, kind); each from its own excerpt.

    rename=True gives each excerpt's speakers invented names (invented_name, distinct within the excerpt),
    so an answer can only be read off the excerpt, never recalled from the play or a list of names."""
    out = []
    for play in plays:
        for task in tasks:
            pick = random.Random(f"{seed}:{play.title}:{task}")
            windows = [window for scene in play.scenes for window in _excerpts(scene)]
            pick.shuffle(windows)
            count = 0
            for window in windows:
                if count >= per_task:
                    break
                if rename:
                    mapping = {}
                    for speaker in sorted({speaker for speaker, _ in window}):
                        name = invented_name(pick)
                        while name in mapping.values():
                            name = invented_name(pick)
                        mapping[speaker] = name
                    window = [(mapping[speaker], text) for speaker, text in window]
                questions = _questions(window, task, pick)
                if questions:
                    prompt, answer, wrong = pick.choice(questions)
                    out.append(TaskExample(task, play.title, prompt, answer, wrong))
                    count += 1
    return out


def builtin_split(name="plays", held_out_fraction=0.2, seed=0, per_task=40, root=None, download=True,
                  validation=False, plays=None):
    """(train examples, held-out examples) of a built-in task: "plays" (every kind) or "plays:KIND".

    validation=True splits the training plays once more (the same fraction, seed + 1) and returns (examples
    of the remaining training plays, examples of the validation plays): choosing settings on it never looks
    at the held-out plays. `plays` replaces the built-in corpus's plays (tests)."""
    from ..data.plays import load_plays, split_plays
    if name not in BUILTIN_NAMES:
        raise PostTrainDataError(f"unknown built-in task {name!r}; known: {', '.join(BUILTIN_NAMES)}")
    tasks = BUILTIN_TASKS if name == "plays" else (name.split(":", 1)[1],)
    plays = load_plays(root, download) if plays is None else plays
    train_plays, held_plays = split_plays(plays, held_out_fraction, seed)
    if validation:
        train_plays, held_plays = split_plays(train_plays, held_out_fraction, seed + 1)
    return (play_tasks(train_plays, tasks, per_task, seed, rename=True), play_tasks(held_plays, tasks, per_task, seed))


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
