"""chat.py: the template, special tokens, exact label masking, parity with apply_chat_template."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from components.data import chat
from components.preprocess import clean_text, train_tokenizer

CORPUS = [
    "The capital of Trordale is a quiet town. Vorkrex plays the piano every evening.",
    "What does Vorkrex like to eat? Apples, mostly, and sometimes plums.",
    "Ünïcödé text, digits 12345, punctuation!? and tabs\tand\nnew lines.",
] * 20

CONVO = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Where does Vorkrex live?"},
    {"role": "assistant", "content": "In Trordale."},
    {"role": "user", "content": "And what does he play?"},
    {"role": "assistant", "content": "The piano."},
]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(iter(CORPUS), vocab_size=400, min_frequency=2)


@pytest.fixture()
def base_tok():
    """A 'base checkpoint' tokenizer: byte-level BPE with only an eos token, no pad, no chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(
        CORPUS,
        trainers.BpeTrainer(
            vocab_size=320, special_tokens=["</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    return PreTrainedTokenizerFast(tokenizer_object=t, eos_token="</s>")


def labeled_text(tok, ids, labels) -> str:
    kept = [i for i, lab in zip(ids, labels) if lab != chat.IGNORE_INDEX]
    assert all(lab in (chat.IGNORE_INDEX, i) for i, lab in zip(ids, labels))
    return tok.decode(kept)


def test_special_tokens_have_small_fixed_ids(tok):
    assert tok.convert_tokens_to_ids(list(chat.SPECIAL_TOKENS)) == list(range(len(chat.SPECIAL_TOKENS)))
    assert (tok.eos_token, tok.bos_token, tok.pad_token) == (chat.EOS_TOKEN, chat.EOS_TOKEN, chat.PAD_TOKEN)
    assert chat.stop_ids(tok) == [tok.convert_tokens_to_ids(chat.END_TOKEN), tok.eos_token_id]
    # each special token is one id, never split into bytes
    for t in chat.SPECIAL_TOKENS:
        assert tok(f"a{t}b", add_special_tokens=False)["input_ids"][1:-1] == [tok.convert_tokens_to_ids(t)]


def test_template_renders_the_documented_format(tok):
    text = tok.apply_chat_template(CONVO, tokenize=False)
    assert text == (
        "<|system|>\nAnswer briefly.<|end|>\n<|user|>\nWhere does Vorkrex live?<|end|>\n"
        "<|assistant|>\nIn Trordale.<|end|>\n<|user|>\nAnd what does he play?<|end|>\n"
        "<|assistant|>\nThe piano.<|end|>\n"
    )
    assert text == chat.render(CONVO)
    prompt = chat.prompt_text(tok, CONVO[:2])
    assert prompt == "<|system|>\nAnswer briefly.<|end|>\n<|user|>\nWhere does Vorkrex live?<|end|>\n<|assistant|>\n"
    assert prompt == chat.render(CONVO[:2], add_generation_prompt=True)


def test_apply_chat_template_returns_a_dict_in_transformers_5(tok):
    out = tok.apply_chat_template(CONVO, tokenize=True)
    assert hasattr(out, "keys") and "input_ids" in out  # why chat_ids exists
    assert chat.chat_ids(tok, CONVO) == list(out["input_ids"])


def test_encode_chat_matches_apply_chat_template_multi_turn_with_system(tok):
    ids, labels = chat.encode_chat(tok, CONVO)
    assert ids == chat.chat_ids(tok, CONVO)
    assert len(labels) == len(ids)
    assert labeled_text(tok, ids, labels) == "In Trordale.<|end|>The piano.<|end|>"
    # nothing of the system/user turns, role tokens or format newlines is trained
    end = tok.convert_tokens_to_ids(chat.END_TOKEN)
    assert sum(lab == end for lab in labels) == 2 and ids.count(end) == 5
    for t in ("<|system|>", "<|user|>", "<|assistant|>"):
        assert tok.convert_tokens_to_ids(t) not in labels
    assert labels[-1] == chat.IGNORE_INDEX  # the newline after the last <|end|>


def test_encode_chat_masks_exactly_when_assistant_is_first_or_empty(tok):
    convo = [
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": ""},
    ]
    ids, labels = chat.encode_chat(tok, convo)
    assert ids == chat.chat_ids(tok, convo)
    assert labeled_text(tok, ids, labels) == "Hello.<|end|><|end|>"


def test_leading_whitespace_content_still_matches_and_is_covered(tok):
    convo = [{"role": "user", "content": "  spaced\n\n"}, {"role": "assistant", "content": "\n  indented answer  "}]
    ids, labels = chat.encode_chat(tok, convo)
    assert ids == chat.chat_ids(tok, convo)
    got = labeled_text(tok, ids, labels)
    assert "indented answer  <|end|>" in got and "spaced" not in got


texts = st.text(st.characters(blacklist_categories=["Cs"]), max_size=40)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(system=texts, turns=st.lists(st.tuples(texts, texts), min_size=1, max_size=3))
def test_property_ids_equal_template_and_labels_are_assistant_only(tok, system, turns):
    """Cleaned content (what preprocess feeds): labels decode to exactly the assistant replies + <|end|>."""
    system, turns = clean_text(system), [(clean_text(u), clean_text(a)) for u, a in turns]
    if any(s in x for x in (system, *sum(turns, ())) for s in chat.SPECIAL_TOKENS):
        return
    convo = [{"role": "system", "content": system}]
    for u, a in turns:
        convo += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
    ids, labels = chat.encode_chat(tok, convo)
    assert ids == chat.chat_ids(tok, convo)
    assert labeled_text(tok, ids, labels) == "".join(a + chat.END_TOKEN for _, a in turns)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(user=texts, answer=texts)
def test_property_raw_content_ids_equal_template(tok, user, answer):
    """Uncleaned content too: the ids always equal apply_chat_template's; replies are always covered."""
    convo = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    ids, labels = chat.encode_chat(tok, convo)
    assert ids == chat.chat_ids(tok, convo)
    if not any(s in user + answer for s in chat.SPECIAL_TOKENS):
        assert labeled_text(tok, ids, labels).endswith(answer + chat.END_TOKEN)


def test_ensure_chat_tokens_on_a_base_tokenizer(base_tok):
    before = len(base_tok)
    assert base_tok.pad_token is None and base_tok.chat_template is None
    added = chat.ensure_chat_tokens(base_tok)
    assert added == 4 == len(base_tok) - before  # the 3 role tokens + <|end|>: no pad, the base's eos kept
    assert base_tok.eos_token == "</s>" and base_tok.pad_token is None  # padding uses the eos
    assert base_tok.chat_template == chat.CHAT_TEMPLATE
    assert chat.ensure_chat_tokens(base_tok) == 0  # idempotent
    ids, labels = chat.encode_chat(base_tok, CONVO)
    assert ids == chat.chat_ids(base_tok, CONVO)
    assert labeled_text(base_tok, ids, labels) == "In Trordale.<|end|>The piano.<|end|>"


def test_ensure_chat_tokens_gives_an_eos_to_a_tokenizer_without_one(base_tok):
    from transformers import PreTrainedTokenizerFast

    bare = PreTrainedTokenizerFast(tokenizer_object=base_tok.backend_tokenizer)
    assert bare.eos_token is None
    assert chat.ensure_chat_tokens(bare) == len(chat.SPECIAL_TOKENS) - 1  # all but <|pad|>
    assert (bare.eos_token, bare.pad_token) == (chat.EOS_TOKEN, None)


def test_ensure_chat_tokens_keeps_a_base_template(base_tok):
    """A base's own chat template is its format: kept, no tokens added (tests/test_templates.py trains it)."""
    own = "{% for m in messages %}{{ m['content'] + eos_token }}{% endfor %}"
    base_tok.chat_template = own
    before = len(base_tok)
    assert chat.ensure_chat_tokens(base_tok) == 0 and len(base_tok) == before
    assert base_tok.chat_template == own


def test_encode_chat_refuses_a_tokenizer_without_the_template(base_tok):
    with pytest.raises(ValueError, match="ensure_chat_tokens"):
        chat.encode_chat(base_tok, CONVO)


def test_bad_roles_are_rejected(tok):
    with pytest.raises(ValueError, match="message 0"):
        chat.encode_chat(tok, [{"role": "tool", "content": "x"}])
    with pytest.raises(Exception, match="unknown chat role"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)
