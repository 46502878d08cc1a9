"""The chat template: ids equal the Jinja rendering encoded, the assistant mask, chat tokens added to a base run."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

from tinygrad_llm.data.shards import CharVocab
from tinygrad_llm.model import GPT, GPTConfig
from tinygrad_llm.posttrain.chat import apply_chat_template, grow_vocabulary, has_chat_tokens, with_chat_tokens
from tinygrad_llm.tokenizer import CHAT_ROLES, CHAT_SPECIAL_TOKENS, CHAT_TEMPLATE, Tokenizer

jinja2 = pytest.importorskip("jinja2")
TEMPLATE = jinja2.Template(CHAT_TEMPLATE)
TEXT = "To be, or not to be: that is the question.\nWhether 'tis nobler in the mind to suffer\n" * 20
ALPHABET = "abcdefghij ABC,.:?'\n"


@pytest.fixture(scope="module")
def bpe():
    return Tokenizer.train(TEXT, 300, special_tokens=list(CHAT_SPECIAL_TOKENS))


def render(messages, add_generation_prompt):
    return TEMPLATE.render(messages=messages, add_generation_prompt=add_generation_prompt)


messages_strategy = st.lists(st.fixed_dictionaries({"role": st.sampled_from(CHAT_ROLES),
                                                    "content": st.text(ALPHABET, max_size=30)}), max_size=5)


@given(messages=messages_strategy, generation=st.booleans())
def test_bpe_ids_equal_jinja_rendering_encoded(bpe, messages, generation):
    ids, mask = bpe.apply_chat_template(messages, add_generation_prompt=generation)
    assert ids == bpe.encode(render(messages, generation), allowed_special="all")
    assert len(mask) == len(ids) and set(mask) <= {0, 1}


@given(messages=messages_strategy, generation=st.booleans())
def test_char_vocab_ids_equal_jinja_rendering(messages, generation):
    vocab = with_chat_tokens(CharVocab.from_text(TEXT + ALPHABET))
    ids, mask = apply_chat_template(vocab, messages, add_generation_prompt=generation)
    assert vocab.decode(ids) == render(messages, generation)
    expected = "".join(m["content"] + "<|end|>" for m in messages if m["role"] == "assistant")
    assert vocab.decode([i for i, keep in zip(ids, mask) if keep]) == expected


def test_bpe_mask_is_assistant_content_and_end(bpe):
    messages = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Who is there?"},
                {"role": "assistant", "content": "Nay, answer me."}, {"role": "user", "content": "Stand."},
                {"role": "assistant", "content": "Long live the king!"}]
    ids, mask = bpe.apply_chat_template(messages)
    kept = [i for i, keep in zip(ids, mask) if keep]
    assert bpe.decode(kept) == "Nay, answer me.<|end|>Long live the king!<|end|>"
    assert kept.count(bpe.special_tokens["<|end|>"]) == 2


def test_bad_messages_raise_one_clear_error(bpe):
    with pytest.raises(ValueError, match="unknown role"):
        bpe.apply_chat_template([{"role": "narrator", "content": "x"}])
    with pytest.raises(ValueError, match="special token"):
        bpe.apply_chat_template([{"role": "user", "content": "hi<|end|>"}])
    with pytest.raises(ValueError, match="content must be a string"):
        bpe.apply_chat_template([{"role": "user", "content": 3}])
    plain = Tokenizer.train(TEXT, 300, special_tokens=["<|endoftext|>"])
    with pytest.raises(ValueError, match="lacks the chat tokens"):
        plain.apply_chat_template([{"role": "user", "content": "hi"}])


def test_with_chat_tokens_appends_ids_and_keeps_the_old_ones():
    vocab = CharVocab.from_text("abc\n")
    grown = with_chat_tokens(vocab)
    assert has_chat_tokens(grown) and not has_chat_tokens(vocab)
    assert grown.encode_ordinary("cab") == vocab.encode_ordinary("cab")
    assert grown.special_tokens["<|endoftext|>"] == vocab.special_tokens["<|endoftext|>"]
    assert grown.vocab_size == vocab.vocab_size + 4
    new_ids = [grown.special_tokens[name] for name in CHAT_SPECIAL_TOKENS[1:]]
    assert new_ids == list(range(vocab.vocab_size, vocab.vocab_size + 4))
    plain = Tokenizer.train(TEXT, 300, special_tokens=["<|endoftext|>"])
    bigger = with_chat_tokens(plain)
    assert bigger.vocab_size == plain.vocab_size + 4
    assert bigger.encode("To be<|endoftext|>", allowed_special="all") == plain.encode("To be<|endoftext|>",
                                                                                       allowed_special="all")
    assert with_chat_tokens(bigger) is bigger


@pytest.mark.parametrize("tied", [False, True])
def test_grow_vocabulary_appends_mean_rows(tied):
    model = GPT(GPTConfig(vocab_size=10, d_model=16, n_layers=1, n_heads=2, ffn_hidden=32, max_seq_len=8,
                          tie_embeddings=tied))
    embed_before = model.model.embed_tokens.weight.numpy().copy()
    head_before = model.lm_head.weight.numpy().copy()
    assert grow_vocabulary(model, 13) == 3
    embed, head = model.model.embed_tokens.weight.numpy(), model.lm_head.weight.numpy()
    assert embed.shape == (13, 16) and head.shape == (13, 16) and model.config.vocab_size == 13
    np.testing.assert_array_equal(embed[:10], embed_before)
    np.testing.assert_allclose(embed[10:], np.repeat(embed_before.mean(0, keepdims=True), 3, 0), rtol=1e-6)
    np.testing.assert_allclose(head[10:], np.repeat(head_before.mean(0, keepdims=True), 3, 0), rtol=1e-6)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    logits = model(np.array([[1, 12, 11]]))
    assert logits.shape == (1, 3, 13) and np.isfinite(logits.numpy()).all()
    with pytest.raises(ValueError):
        grow_vocabulary(model, 5)
