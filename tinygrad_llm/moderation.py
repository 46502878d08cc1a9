"""Content moderation: a normalising blocklist and the project's own classifier, chosen by a policy file.

    from tinygrad_llm.moderation import Moderator
    moderator = Moderator.from_policy("policy.toml")       # or Moderator() for the word list, action "block"
    verdict = moderator.check("some text")
    verdict.action, verdict.reasons, verdict.text           # "allow" | "log" | "redact" | "block"

Two layers, each with its own action (`block`, `redact`, `log` or `off`):

- **blocklist**: the word list that the `better-profanity` package ships (MIT licence; the `[moderation]`
  extra), plus the policy's `extra_words`, less its `allow_words`. Text and list go through the same
  normalisation: lowercase, leetspeak digits and symbols read as letters (`0→o 1→i 3→e 4→a 5→s 7→t @→a
  $→s ...`), letters repeated three or more times squeezed to one (`fuuuck`), and runs of single letters
  separated by spaces or punctuation joined into one word (`f u c k`, `f.u.c.k`). Matching is on whole
  words (multi-word entries too), so `class` never matches `ass`. `redact` replaces each hit by asterisks.
- **classifier**: a model saved by `tinygrad-llm train-classifier` (tinygrad_llm.data.classifier),
  trained on labelled JSONL whose keep label means "clean"; text whose P(keep) is below `threshold` is
  flagged. A classifier judges whole texts, so its actions are `block` and `log` only.

Policy TOML (every key optional):

    [blocklist]
    action = "block"                 # block | redact | log | off
    extra_words = ["frobnicate"]
    allow_words = ["hell"]
    [classifier]
    path = "runs/toxicity/model"     # prefix of the files train-classifier wrote
    action = "log"                   # block | log | off
    threshold = 0.5
    [apply]
    input = true                     # the server checks prompts ...
    output = true                    # ... and what the model writes

The strictest action across the layers wins: block > redact > log > allow. The same Moderator is the
data pipeline's toxicity stage: `moderator.filter_document(text)` returns (keep, reason, text).

Simplifications: English word list only; no context (a quoted slur counts like any other); the
normalisation catches common obfuscations, not all of them (zero-width characters, homoglyphs).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

ACTIONS = ("block", "redact", "log", "off")
_RANK = {"allow": 0, "log": 1, "redact": 2, "block": 3}
_LEET = str.maketrans({"0": "o", "1": "i", "2": "z", "3": "e", "4": "a", "5": "s", "6": "g", "7": "t", "8": "b",
                       "9": "g", "@": "a", "$": "s", "!": "i", "|": "i", "+": "t", "€": "e", "£": "l"})
# a word: letters, digits and the leetspeak symbols (a trailing "!" or "$" of ordinary prose is peeled off below)
_WORD = re.compile(r"[\w@$!|+€£]+")
_SQUEEZE = re.compile(r"(.)\1{2,}")
_MAX_JOIN_GAP = 2          # at most this many separator characters between single letters that are joined


class PolicyError(ValueError):
    """A policy file that cannot be used: a one-line message naming the key."""


def _normalise_word(word: str) -> str:
    return _SQUEEZE.sub(r"\1", word.lower().translate(_LEET))


def _words(text: str):
    """(start, end, normalised) for every word of `text`, with spaced-out single letters joined."""
    raw = []
    for match in _WORD.finditer(text):
        start, end = match.span()
        while end > start + 1 and text[end - 1] in "!$|+":     # "really!" is not "reallyi"
            end -= 1
        raw.append((start, end, _normalise_word(text[start:end])))
    joined, i = [], 0
    while i < len(raw):
        j = i
        while (j + 1 < len(raw) and len(raw[j][2]) == 1 and len(raw[j + 1][2]) == 1
               and raw[j + 1][0] - raw[j][1] <= _MAX_JOIN_GAP):
            j += 1
        if j - i >= 2:                                           # three or more single letters in a row
            joined.append((raw[i][0], raw[j][1], _SQUEEZE.sub(r"\1", "".join(w[2] for w in raw[i:j + 1]))))
            i = j + 1
        else:
            joined.append(raw[i])
            i += 1
    return joined


class Blocklist:
    """Whole-word (and whole-phrase) matching of normalised text against a normalised word list."""

    def __init__(self, terms):
        self.terms = set()
        self.longest = 1
        for term in terms:
            words = tuple(w for _, _, w in _words(term))
            if words:
                self.terms.add(words)
                self.longest = max(self.longest, len(words))

    @classmethod
    def maintained(cls, extra_words=(), allow_words=()) -> "Blocklist":
        """The better-profanity word list, plus `extra_words`, less `allow_words`."""
        allow = {tuple(w for _, _, w in _words(term)) for term in allow_words}
        blocklist = cls(list(maintained_words()) + list(extra_words))
        blocklist.terms -= allow
        return blocklist

    def find(self, text: str):
        """Spans (start, end) of `text` that are blocklisted words or phrases, left to right."""
        words = _words(text)
        hits, i = [], 0
        while i < len(words):
            for n in range(min(self.longest, len(words) - i), 0, -1):
                if tuple(w for _, _, w in words[i:i + n]) in self.terms:
                    hits.append((words[i][0], words[i + n - 1][1]))
                    i += n
                    break
            else:
                i += 1
        return hits

    def redact(self, text: str, spans=None) -> str:
        spans = self.find(text) if spans is None else spans
        for start, end in reversed(spans):
            text = text[:start] + "*" * (end - start) + text[end:]
        return text


def maintained_words():
    """The word list shipped by the better-profanity package (MIT licence), one entry per line."""
    try:
        from importlib import resources
        text = resources.files("better_profanity").joinpath("profanity_wordlist.txt").read_text(encoding="utf-8")
    except (ImportError, FileNotFoundError, OSError):
        raise PolicyError("the blocklist needs the better-profanity word list: pip install better-profanity "
                          "(or pip install -e .[moderation])") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


@dataclass
class Verdict:
    """What moderation decided about one text: the action, why, and the text to use (redacted if so)."""
    action: str = "allow"
    reasons: list = field(default_factory=list)
    text: str = ""
    score: float | None = None           # the classifier's P(clean), when it ran
    layer: str | None = None             # the layer whose action decided the verdict

    @property
    def blocked(self) -> bool:
        return self.action == "block"

    def to_dict(self) -> dict:
        out = {"action": self.action, "reasons": list(self.reasons)}
        if self.score is not None:
            out["p_clean"] = round(self.score, 4)
        return out


class Moderator:
    """The policy's layers applied to a text. Stateless after construction; safe to share across threads."""

    def __init__(self, blocklist: Blocklist | None = None, blocklist_action: str = "block", classifier=None,
                 classifier_action: str = "log", threshold: float = 0.5, check_input: bool = True,
                 check_output: bool = True):
        if blocklist_action not in ACTIONS:
            raise PolicyError(f"blocklist action must be one of {', '.join(ACTIONS)}, got {blocklist_action!r}")
        if classifier_action not in ("block", "log", "off"):
            raise PolicyError(f"classifier action must be block, log or off, got {classifier_action!r}")
        if not 0.0 <= float(threshold) <= 1.0:
            raise PolicyError(f"classifier threshold must be in [0, 1], got {threshold!r}")
        self.blocklist = blocklist if blocklist is not None or blocklist_action == "off" else Blocklist.maintained()
        self.blocklist_action = blocklist_action if self.blocklist is not None else "off"
        self.classifier = classifier
        self.classifier_action = classifier_action if classifier is not None else "off"
        self.threshold = float(threshold)
        self.check_input, self.check_output = bool(check_input), bool(check_output)

    @classmethod
    def from_policy(cls, path: str) -> "Moderator":
        """Build from a policy TOML file (see the module docstring)."""
        try:
            import tomllib
        except ImportError:                                    # Python < 3.11
            import tomli as tomllib
        if not os.path.isfile(path):
            raise PolicyError(f"policy file not found: {path}")
        try:
            with open(path, "rb") as f:
                policy = tomllib.load(f)
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
            raise PolicyError(f"{path}: not valid TOML: {error}") from None
        return cls.from_dict(policy, base_dir=os.path.dirname(os.path.abspath(path)))

    @classmethod
    def from_dict(cls, policy: dict, base_dir: str = ".") -> "Moderator":
        unknown = sorted(set(policy) - {"blocklist", "classifier", "apply"})
        if unknown:
            raise PolicyError(f"unknown policy sections: {', '.join(unknown)} (known: blocklist, classifier, apply)")
        sections = {}
        for name, keys in (("blocklist", {"action", "extra_words", "allow_words"}),
                           ("classifier", {"path", "action", "threshold"}), ("apply", {"input", "output"})):
            section = policy.get(name, {})
            if not isinstance(section, dict):
                raise PolicyError(f"[{name}] must be a table")
            extra = sorted(set(section) - keys)
            if extra:
                raise PolicyError(f"unknown keys in [{name}]: {', '.join(extra)} (known: {', '.join(sorted(keys))})")
            sections[name] = section
        words = sections["blocklist"]
        for key in ("extra_words", "allow_words"):
            if not isinstance(words.get(key, []), list) or not all(isinstance(w, str) for w in words.get(key, [])):
                raise PolicyError(f"[blocklist] {key} must be a list of strings")
        action = words.get("action", "block")
        blocklist = None
        if action != "off":
            blocklist = Blocklist.maintained(words.get("extra_words", ()), words.get("allow_words", ()))
        classifier_section = sections["classifier"]
        classifier = None
        if classifier_section.get("path") and classifier_section.get("action", "log") != "off":
            from .data.classifier import QualityClassifier
            prefix = str(classifier_section["path"])
            prefix = prefix[:-5] if prefix.endswith(".json") else prefix
            prefix = prefix if os.path.isabs(prefix) else os.path.join(base_dir, prefix)
            if not os.path.isfile(prefix + ".json"):
                raise PolicyError(f"[classifier] path: {prefix}.json not found (train one with train-classifier)")
            classifier = QualityClassifier.load(prefix)
        threshold = classifier_section.get("threshold", 0.5)
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
            raise PolicyError(f"[classifier] threshold must be a number, got {threshold!r}")
        apply = sections["apply"]
        for key in ("input", "output"):
            if not isinstance(apply.get(key, True), bool):
                raise PolicyError(f"[apply] {key} must be true or false")
        return cls(blocklist, action, classifier, classifier_section.get("action", "log"), threshold,
                   apply.get("input", True), apply.get("output", True))

    @property
    def active(self) -> bool:
        return self.blocklist_action != "off" or self.classifier_action != "off"

    def check(self, text: str) -> Verdict:
        """Run every layer on `text`; the strictest action wins."""
        verdict = Verdict(text=text)
        if self.blocklist_action != "off":
            spans = self.blocklist.find(text)
            if spans:
                verdict.reasons.append(f"blocklist:{len(spans)}")
                verdict = _stricter(verdict, self.blocklist_action, "blocklist")
                if self.blocklist_action == "redact":
                    verdict.text = self.blocklist.redact(text, spans)
        if self.classifier_action != "off" and text.strip():
            verdict.score = float(self.classifier.predict_proba([text])[0])
            if verdict.score < self.threshold:
                verdict.reasons.append("classifier")
                verdict = _stricter(verdict, self.classifier_action, "classifier")
        return verdict

    def filter_document(self, text: str):
        """The data pipeline's toxicity stage: (keep, reason or None, text to keep, possibly redacted)."""
        verdict = self.check(text)
        if verdict.blocked:
            return False, "toxicity_" + verdict.layer, text
        return True, ("toxicity_flagged" if verdict.reasons else None), verdict.text


def _stricter(verdict: Verdict, action: str, layer: str) -> Verdict:
    if _RANK[action] > _RANK[verdict.action]:
        verdict.action, verdict.layer = action, layer
    return verdict
