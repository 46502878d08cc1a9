"""Each rule-based filter on hand-made documents: the clean one passes, the bad one fails that filter."""
import pytest

from tinygrad_llm.data.filters import DEFAULT_BOUNDS, FILTER_NAMES, FilterConfig, check_document, document_stats

PROSE = ("It was a bright cold day in April, and the clocks were striking thirteen. Winston Smith, his chin "
         "nuzzled into his breast in an effort to escape the vile wind, slipped quickly through the glass doors "
         "of Victory Mansions, though not quickly enough to prevent a swirl of gritty dust from entering along "
         "with him. The hallway smelt of boiled cabbage and old rag mats. At one end of it a coloured poster, too "
         "large for indoor display, had been tacked to the wall.")

BAD = {
    "word_count": "Too short to be a document.",
    "mean_word_length": " ".join(["a b c d e f g h i j"] * 10),
    "symbol_word_ratio": " ".join(["#tag #more words here and there..."] * 20),
    "bullet_lines": "\n".join([f"• item number {i} in a list of things to buy at the shop" for i in range(20)]),
    "ellipsis_lines": "\n".join([f"and then the story goes on and on {i}..." for i in range(20)]),
    "non_alpha_words": " ".join(["the value 12 34 56 78 90 is 11 22 33"] * 12),
    "non_alpha_chars": " ".join(["data:[{1,2},{3,4}]=>(5*6)/7;"] * 12 + ["some words appear here too"] * 10),
    "duplicate_lines": "\n".join(["subscribe to our newsletter for more news"] * 10 + [PROSE]),
    "duplicate_paragraphs": "\n\n".join(["Read more about this topic on the blog."] * 6 + [PROSE]),
    "top_2gram_coverage": " ".join(["buy now"] * 40) + " " + PROSE,
    "top_3gram_coverage": " ".join(["the best deal"] * 40) + " " + PROSE,
    "top_4gram_coverage": " ".join(["click here for more"] * 40) + " " + PROSE,
    "markup_density": PROSE + "".join(f'<div class="x{i}"><span>' for i in range(30)),
}


def test_every_filter_has_a_hand_made_failure():
    assert set(BAD) == set(FILTER_NAMES)


def test_clean_prose_passes_everything():
    assert check_document(PROSE) is None


@pytest.mark.parametrize("name", FILTER_NAMES)
def test_filter_drops_its_bad_document(name):
    text = BAD[name]
    low, high = DEFAULT_BOUNDS[name]
    value = document_stats(text, [name])[name]
    assert not (low <= value <= high), f"{name}={value} should be outside [{low}, {high}]"
    only_this = FilterConfig(disabled=set(FILTER_NAMES) - {name})
    assert check_document(text, only_this) == name
    assert check_document(text, FilterConfig(disabled={name} | (set(FILTER_NAMES) - {name}))) is None


def test_bounds_are_configurable_and_unknown_names_rejected():
    short = "just a few words here"
    assert check_document(short) == "word_count"
    assert check_document(short, FilterConfig(bounds={"word_count": (3, 100)})) is None
    with pytest.raises(ValueError, match="unknown filter"):
        FilterConfig(disabled={"no_such_filter"})


def test_speaker_names_do_not_count_as_duplicate_lines():
    play = "\n\n".join(f"Ham.\nLine {i} of a speech that never repeats itself at all" for i in range(30))
    assert document_stats(play, ["duplicate_lines"])["duplicate_lines"] == 0.0
