"""Moderation: the blocklist's normalisation (case, leetspeak, spacing, repeats) on whole words only,
redaction, the classifier layer, the policy file (its errors named), and the pipeline's document filter."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tinygrad_llm.moderation import Blocklist, Moderator, PolicyError, maintained_words

LIST = Blocklist(["frobnicate", "wug", "snark hunt"])


@pytest.mark.parametrize("text", ["frobnicate", "FROBNICATE!", "Fr0bn1c4te", "fr@bnicate".replace("@", "0"),
                                  "f r o b n i c a t e", "f.r.o.b.n.i.c.a.t.e", "frrrobnicaaate", "a WUG.",
                                  "the snark   hunt", "w-u-g", "$nark hunt", "why,wug?"])
def test_obfuscations_are_caught(text):
    assert LIST.find(text), text


@pytest.mark.parametrize("text", ["frobnicated", "wugs and wugglers", "the snark", "hunt snark", "a wu g",
                                  "perfectly fine prose", "swug", ""])
def test_only_whole_words_and_phrases_match(text):
    assert LIST.find(text) == [], text


def test_redaction_keeps_everything_else_and_the_length():
    text = "A wug, a FR0BNICATE and the snark hunt."
    redacted = LIST.redact(text)
    assert redacted == "A ***, a ********** and the **********."
    assert len(redacted) == len(text)


@given(st.text(alphabet="abcdefghij .,!\n", max_size=60))
def test_text_without_listed_letters_never_matches_and_redaction_is_identity(text):
    # "frobnicate", "wug", "snark hunt" each need a letter outside a-j (r, o, n, t, w, u, s, k)
    assert LIST.find(text) == [] and LIST.redact(text) == text


@given(st.text(max_size=80))
def test_redaction_never_changes_the_length_and_removes_every_hit(text):
    redacted = LIST.redact(text)
    assert len(redacted) == len(text)
    assert LIST.find(redacted) == []


def test_the_maintained_word_list_is_used_by_default():
    pytest.importorskip("better_profanity")
    words = maintained_words()
    assert len(words) > 100
    moderator = Moderator()
    sample = words[len(words) // 2]
    assert moderator.check(f"you {sample.upper()} there").blocked
    assert moderator.check("a perfectly pleasant sentence about class and grass").action == "allow"


def test_actions_and_the_strictest_wins():
    assert Moderator(LIST, "log").check("wug").action == "log"
    verdict = Moderator(LIST, "redact").check("wug!")
    assert verdict.action == "redact" and verdict.text == "***!" and verdict.reasons == ["blocklist:1"]
    assert Moderator(LIST, "block").check("wug").blocked
    assert Moderator(LIST, "off").check("wug").action == "allow"


def _classifier(tmp_path):
    from tinygrad_llm.data.classifier import train_classifier
    clean = ["the rain in spain falls on the plain", "a fair day for a walk by the river", "we read books at home"]
    toxic = ["you vile rotten scum", "rotten vile scum you are", "scum scum vile rotten"]
    texts, labels = (clean + toxic) * 8, (["clean"] * 3 + ["toxic"] * 3) * 8
    model, _ = train_classifier(texts, labels, keep_label="clean", buckets=512, epochs=20, seed=0, val_fraction=0.0)
    prefix = str(tmp_path / "toxicity")
    model.save(prefix)
    return prefix


def test_classifier_layer_from_a_policy_file(tmp_path):
    prefix = _classifier(tmp_path)
    policy = tmp_path / "policy.toml"
    policy.write_text(f'[blocklist]\naction = "off"\n[classifier]\npath = "{prefix}"\naction = "block"\n'
                      f'threshold = 0.5\n[apply]\noutput = false\n')
    moderator = Moderator.from_policy(str(policy))
    assert moderator.check_input and not moderator.check_output
    bad = moderator.check("vile rotten scum")
    assert bad.blocked and bad.reasons == ["classifier"] and bad.score < 0.5
    good = moderator.check("a walk by the river")
    assert good.action == "allow" and good.score > 0.5
    relative = tmp_path / "relative.toml"
    relative.write_text('[classifier]\npath = "toxicity.json"\naction = "log"\n[blocklist]\naction = "off"\n')
    assert Moderator.from_policy(str(relative)).check("vile rotten scum").action == "log"


@pytest.mark.parametrize("body, message", [
    ("[blocklist]\naction = 'shout'\n", "action must be one of"),
    ("[blocklist]\nextra_words = 'wug'\n", "extra_words must be a list"),
    ("[blocklist]\ncolour = 1\n", "unknown keys in \\[blocklist\\]"),
    ("[output]\n", "unknown policy sections"),
    ("[classifier]\npath = 'missing'\n", "not found"),
    ("[classifier]\naction = 'redact'\n", "classifier action must be"),
    ("[classifier]\nthreshold = 'high'\n", "threshold must be a number"),
    ("[apply]\ninput = 'yes'\n", "must be true or false"),
    ("not = [valid", "not valid TOML"),
])
def test_policy_errors_name_the_problem(tmp_path, body, message):
    pytest.importorskip("better_profanity")
    path = tmp_path / "policy.toml"
    path.write_text(body)
    with pytest.raises(PolicyError, match=message):
        Moderator.from_policy(str(path))


def test_missing_policy_file():
    with pytest.raises(PolicyError, match="not found"):
        Moderator.from_policy("/nonexistent/policy.toml")


def test_extra_and_allowed_words_change_the_maintained_list(tmp_path):
    pytest.importorskip("better_profanity")
    word = maintained_words()[10]
    path = tmp_path / "policy.toml"
    path.write_text(f'[blocklist]\naction = "redact"\nextra_words = ["frobnicate"]\nallow_words = ["{word}"]\n')
    moderator = Moderator.from_policy(str(path))
    assert moderator.check("frobnicate").action == "redact"
    assert moderator.check(word).action == "allow"


def test_filter_document_for_the_data_pipeline():
    block, redact, log = (Moderator(LIST, action) for action in ("block", "redact", "log"))
    assert block.filter_document("a wug here") == (False, "toxicity_blocklist", "a wug here")
    assert redact.filter_document("a wug here") == (True, "toxicity_flagged", "a *** here")
    assert log.filter_document("a wug here") == (True, "toxicity_flagged", "a wug here")
    assert block.filter_document("clean text") == (True, None, "clean text")


def test_prepare_drops_and_counts_documents_by_the_policy(tmp_path):
    from tinygrad_llm.data.pipeline import PipelineConfig, run_pipeline
    from tinygrad_llm.data.sources import Document
    policy = tmp_path / "policy.toml"
    policy.write_text('[blocklist]\naction = "block"\nextra_words = ["zorblax"]\n', encoding="utf-8")
    clean = "The quality of mercy is not strained; it droppeth as the gentle rain from heaven. " * 8
    docs = [Document(f"doc{i}", clean.replace("mercy", f"mercy {i}")) for i in range(5)]
    docs.append(Document("bad", clean.replace("gentle", "zorblax")))
    config = PipelineConfig(filters=None, exact_dedup=False, near_dedup=False, toxicity=str(policy), val_fraction=0.0)
    report = run_pipeline(docs, str(tmp_path / "out"), config=config, progress=False)
    stage = next(s for s in report["stages"] if s["stage"] == "toxicity")
    assert (stage["docs_in"], stage["docs_out"]) == (6, 5)
    assert stage["dropped"] == {"toxicity_blocklist": 1}
    redacting = tmp_path / "redact.toml"
    redacting.write_text('[blocklist]\naction = "redact"\n', encoding="utf-8")
    with pytest.raises(ValueError, match="redact action would rewrite them"):
        run_pipeline(docs, str(tmp_path / "out2"), config=PipelineConfig(toxicity=str(redacting)), progress=False)
