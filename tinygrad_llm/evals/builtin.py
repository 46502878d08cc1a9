"""Built-in multiple-choice tasks made from held-out plays of the built-in corpus (no download beyond it).

    task = builtin_task("shakespeare_next_line")                 # plain text, for any model
    task = builtin_task("shakespeare_speaker", chat=True)        # through the chat template

The plays come from `tinygrad_llm.data.plays` and are split with its `split_plays` defaults (the same
split post-training uses), so the items are drawn only from plays that fine-tuning never sees. A
pretrained model's corpus does contain these plays (pretraining splits its validation set by document
hash, not by this split), so for a pretrained model the tasks measure how well it models Shakespearean
dialogue, not generalisation to unseen text.

Tasks (four choices each, so chance is 25 %; the choices' order is shuffled with a fixed seed):
- shakespeare_next_line: the scene so far (at most CONTEXT_SPEECHES speeches, rendered as the corpus
  lays them out: the speaker's name on its own line, then the speech, blank lines between speeches) and the
  true next verse line against three other verse lines of the same play. Delimiter "\\n".
- shakespeare_speaker: who speaks next. Plain form: the scene so far, then each choice is "NAME\nfirst
  line of the speech" for the true speaker and three other speakers (of the same scene first, then the
  most frequent of the play): the line is the same in every choice, so the model must attribute it.
  Chat form (chat=True): the question of the post-training task (tinygrad_llm.posttrain.data, kind
  who_says): an excerpt of the speech and the speeches around it, one "NAME: line" row each (the line cut
  at a word boundary to EXCERPT_CHARS), then 'Who says "LINE"?'; the assistant answers with the name, scored
  against three other speakers (of the excerpt and the scene first). The answer can be read off the
  excerpt, so a model fine-tuned on the training plays' questions should improve on it.
- shakespeare_continue: an instruction, 'Continue: "LINE"' with the first line of a speech, answered by
  the first line of the next speech of the scene, scored against the first lines of three other speeches
  of the play. Chat form through the template; the plain form writes the same instruction as text. The
  post-training task does not train this instruction: it measures whether following the chat format
  carries over to a question of another kind.

Chat rendering follows `tinygrad_llm.tokenizer.CHAT_TEMPLATE` exactly (each turn "<|role|>\\n" + content +
"<|end|>\\n", then "<|assistant|>\\n"); evals.scoring.encode turns the special-token names into their ids.
Lines whose text is shorter than MIN_LINE_CHARS or longer than MAX_LINE_CHARS are not used as targets or
distractors (a bare "Ay." is not a line one can tell apart, and a short window must hold the answer).
"""
from __future__ import annotations

import random
from collections import Counter

from .tasks import Item, Task

TASK_NAMES = ("shakespeare_next_line", "shakespeare_speaker", "shakespeare_continue")
DEFAULT_ITEMS = 500
CONTEXT_SPEECHES = 4
MIN_LINE_CHARS, MAX_LINE_CHARS = 16, 48
CHOICES = 4
CHORUS = ("ALL", "BOTH")       # speeches of several speakers: never a speaker-attribution answer or distractor
SPEAKER_PROMPT = '{excerpt}\nWho says "{line}"?'      # the who_says question of posttrain/data.py's task
EXCERPT_CHARS = 20                                     # as posttrain/data.py cuts an excerpt's lines
CONTINUE_PROMPT = 'Continue: "{line}"'


def render_speeches(speeches) -> str:
    """Speeches (Line objects or (speaker, text) pairs) laid out as the corpus does: NAME\\ntext, blank lines between."""
    return "\n\n".join(f"{speaker}\n{text}" for speaker, text in ((s.speaker, s.text) if hasattr(s, "speaker")
                                                                   else s for s in speeches))


def render_chat(messages, add_generation_prompt: bool = True) -> str:
    """The text of tinygrad_llm.tokenizer.CHAT_TEMPLATE for (role, content) pairs."""
    text = "".join(f"<|{role}|>\n{content}<|end|>\n" for role, content in messages)
    return text + ("<|assistant|>\n" if add_generation_prompt else "")


def is_chat_tokenizer(tokenizer) -> bool:
    """True when the tokenizer has the chat template's special tokens (a post-trained model's)."""
    special = getattr(tokenizer, "special_tokens", None) or {}
    return all(name in special for name in ("<|user|>", "<|assistant|>", "<|end|>"))


def _usable(text: str) -> bool:
    return MIN_LINE_CHARS <= len(text) <= MAX_LINE_CHARS


def _verse_positions(play):
    """(scene index, speech index, verse index, verse line) for every verse line of the play."""
    for s, scene in enumerate(play.scenes):
        for p, speech in enumerate(scene.lines):
            for v, verse in enumerate(speech.text.split("\n")):
                yield s, p, v, verse


def _previous_speeches(scene, speech_index: int) -> str:
    """The last CONTEXT_SPEECHES − 1 speeches of the scene before speech `speech_index`, rendered."""
    return render_speeches(scene.lines[max(0, speech_index - CONTEXT_SPEECHES + 1):speech_index])


def _context(scene, speech_index: int, verse_index: int) -> str:
    """The scene up to verse `verse_index` of speech `speech_index` (excluded): the speeches before it,
    then the speaker's name and the verses of the speech so far."""
    current = scene.lines[speech_index]
    head = "\n".join([current.speaker, *current.text.split("\n")[:verse_index]])
    before = _previous_speeches(scene, speech_index)
    return before + "\n\n" + head if before else head


def _shuffled(true_choice: str, others, rng) -> tuple:
    choices = [true_choice, *others]
    rng.shuffle(choices)
    return tuple(choices), choices.index(true_choice)


def _distractor_lines(pool, exclude, rng, count=CHOICES - 1):
    picked = []
    while len(picked) < count:
        line = pool[rng.randrange(len(pool))]
        if line not in exclude and line not in picked:
            picked.append(line)
    return picked


def next_line_items(plays, rng):
    """Items of shakespeare_next_line (module docstring)."""
    items = []
    for play in plays:
        pool = sorted({verse for *_, verse in _verse_positions(play) if _usable(verse)})
        if len(pool) < CHOICES * 2:
            continue
        for s, p, v, verse in _verse_positions(play):
            if _usable(verse) and (p or v):                    # something of the scene comes before it
                scene = play.scenes[s]
                choices, gold = _shuffled(verse, _distractor_lines(pool, {verse}, rng), rng)
                items.append(Item(_context(scene, p, v), choices, gold, "\n", f"{play.title}|{scene.name}|{p}|{v}"))
    return items


def continue_items(plays, rng, chat: bool = False):
    """Items of shakespeare_continue (module docstring)."""
    items = []
    for play in plays:
        firsts = [speech.text.split("\n")[0] for speech in play.lines]
        pool = sorted({line for line in firsts if _usable(line)})
        if len(pool) < CHOICES * 2:
            continue
        for scene in play.scenes:
            for p in range(len(scene.lines) - 1):
                line, following = scene.lines[p].text.split("\n")[0], scene.lines[p + 1].text.split("\n")[0]
                if not (_usable(line) and _usable(following)) or '"' in line:
                    continue
                choices, gold = _shuffled(following, _distractor_lines(pool, {following}, rng), rng)
                prompt = CONTINUE_PROMPT.format(line=line)
                context = render_chat([("user", prompt)]) if chat else prompt + "\n"
                items.append(Item(context, choices, gold, "", f"{play.title}|{scene.name}|{p + 1}"))
    return items


def _cut(line: str) -> str:
    """A verse line cut at a word boundary to at most EXCERPT_CHARS characters, as an excerpt shows it."""
    if len(line) > EXCERPT_CHARS:
        line = line[:EXCERPT_CHARS + 1].rsplit(" ", 1)[0].rstrip(" ,;:-")
    return line


def _excerpt(scene, speech_index: int):
    """(rendered rows, the asked speech's shown line) of the speech and its neighbours, or None when a row
    would be a chorus, hold a quote mark or repeat the asked line."""
    speeches = scene.lines[max(0, speech_index - 1):speech_index + 2]
    rows = [(s.speaker, _cut(s.text.split("\n")[0])) for s in speeches]
    asked = _cut(scene.lines[speech_index].text.split("\n")[0])
    if any(name.upper() in CHORUS or '"' in text or not text for name, text in rows) or \
            [text for _, text in rows].count(asked) != 1:
        return None
    return "\n".join(f"{name}: {text}" for name, text in rows), asked


def speaker_items(plays, rng, chat: bool = False):
    """Items of shakespeare_speaker (module docstring)."""
    items = []
    for play in plays:
        frequent = [name for name, _ in Counter(line.speaker for line in play.lines).most_common()
                    if name.upper() not in CHORUS]
        for s, scene in enumerate(play.scenes):
            in_scene = [name for name in dict.fromkeys(line.speaker for line in scene.lines) if name.upper() not in CHORUS]
            for p, speech in enumerate(scene.lines):
                first_line = speech.text.split("\n")[0]
                if p == 0 or speech.speaker.upper() in CHORUS or not _usable(first_line) or (chat and '"' in first_line):
                    continue
                excerpt = _excerpt(scene, p) if chat else None
                if chat and excerpt is None:
                    continue
                others = [n for n in in_scene if n != speech.speaker]
                rng.shuffle(others)
                if chat:                     # the excerpt's other speakers first: the plausible wrong answers
                    shown = {row.split(": ", 1)[0] for row in excerpt[0].split("\n")}
                    others = [n for n in others if n in shown] + [n for n in others if n not in shown]
                others += [n for n in frequent if n != speech.speaker and n not in others]
                if len(others) < CHOICES - 1:
                    continue
                names, gold = _shuffled(speech.speaker, others[:CHOICES - 1], rng)
                item_id = f"{play.title}|{scene.name}|{p}"
                if chat:
                    prompt = SPEAKER_PROMPT.format(excerpt=excerpt[0], line=excerpt[1])
                    context = render_chat([("user", prompt)])
                    items.append(Item(context, names, gold, "", item_id))
                else:
                    choices = tuple(f"{name}\n{first_line}" for name in names)
                    items.append(Item(_previous_speeches(scene, p), choices, gold, "\n\n", item_id))
    return items


def builtin_task(name: str, chat: bool = False, limit: int | None = None, seed: int = 0, plays=None) -> Task:
    """A built-in task by name (TASK_NAMES): at most `limit` (default DEFAULT_ITEMS) items drawn with `seed`.

    `chat` picks the chat form of shakespeare_speaker and shakespeare_continue (the task's name then ends
    in "_chat"); shakespeare_next_line is plain text either way.
    `plays`: the held-out plays to draw from (default: load the built-in corpus and split it)."""
    if name not in TASK_NAMES:
        raise ValueError(f"unknown built-in task {name!r}; known: {', '.join(TASK_NAMES)} (or give a JSONL file)")
    if plays is None:
        from ..data.plays import load_plays, split_plays
        _, plays = split_plays(load_plays())
    rng = random.Random(f"{name}:{seed}")
    if name == "shakespeare_speaker":
        items = speaker_items(plays, rng, chat)
    elif name == "shakespeare_continue":
        items = continue_items(plays, rng, chat)
    else:
        items = next_line_items(plays, rng)
    count = min(limit or DEFAULT_ITEMS, len(items))
    picked = sorted(random.Random(f"{name}:{seed}:pick").sample(range(len(items)), count))
    suffix = "_chat" if chat and name != "shakespeare_next_line" else ""
    return Task(name + suffix, [items[i] for i in picked], source="built-in corpus, held-out plays")
