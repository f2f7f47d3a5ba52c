"""Property tests (hypothesis) beyond those of test_chat/test_preprocess/test_config: how ingest normalizes
any instruction row, that training and generation see the same chat format, that labels never teach the
format's own tokens, and that preprocess accounts for every document of any small corpus."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from components.core.context import StageError
from components.core.data_config import IngestConfig, PreprocessConfig
from components.data import chat
from components.ingest import _Malformed, _sft_row, ingest
from components.preprocess import clean_text, preprocess, train_tokenizer

CORPUS = [
    "Where does Bram live? Bram lives in Kelmar.",
    "The ferry crosses the lake twice a day.",
    "Is blue the colour of the sea? Yes.",
    "Lanterns are lit along the bridge at dusk. Ünïcödé ✓ 漢字",
] * 5
ROLES = st.sampled_from(["system", "user", "assistant"])
texts = st.text(st.characters(blacklist_categories=["Cs"]), max_size=30)
plain = texts.map(clean_text).filter(lambda t: not any(s in t for s in chat.SPECIAL_TOKENS))


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(iter(CORPUS), vocab_size=400, min_frequency=1)


# ---------------------------------------------------------------- ingest's normalization of instruction rows
anything = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
    max_leaves=6,
)
alpaca = st.fixed_dictionaries(
    {},
    optional={
        "instruction": st.one_of(texts, anything),
        "input": st.one_of(texts, anything),
        "output": st.one_of(texts, anything),
        "split": anything,
        "task": anything,
    },
)
chatrow = st.fixed_dictionaries(
    {
        "messages": st.one_of(
            anything,
            st.lists(
                st.one_of(
                    anything,
                    st.fixed_dictionaries({"role": st.one_of(ROLES, texts), "content": st.one_of(texts, anything)}),
                ),
                max_size=4,
            ),
        )
    },
    optional={"split": st.sampled_from(["train", "val", "test", None, "dev"]), "task": st.one_of(texts, anything)},
)


@settings(max_examples=400, deadline=None)
@given(row=st.one_of(alpaca, chatrow))
def test_an_instruction_row_is_normalized_exactly_or_refused(row):
    """Any row: either refused as malformed (never another error), or the documented chat form."""
    try:
        out = _sft_row(row)
    except _Malformed:
        return
    msgs = out["messages"]
    assert msgs and all(
        m["role"] in (*chat.ROLES, "tool") and isinstance(m["content"], str) and m["content"].strip() for m in msgs
    )
    assert any(m["role"] == "assistant" for m in msgs) and out["split"] in ("train", "val", "test", None)
    assert out["task"] is None or isinstance(out["task"], str)
    if "messages" not in row:  # Alpaca: user = instruction (with `input` as its context passage), assistant = output
        extra = row.get("input") or ""
        assert msgs == [
            {"role": "user", "content": chat.with_context(row["instruction"], [extra])},
            {"role": "assistant", "content": row["output"]},
        ]
    if all(m["role"] in chat.ROLES for m in msgs):  # tool messages: preprocess keeps them if the template can
        chat.render(msgs)  # what preprocess will do with it


# ---------------------------------------------------------------- the chat format: training == generation
conversations = st.lists(st.tuples(ROLES, plain), min_size=1, max_size=5)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(convo=conversations)
def test_every_reply_is_trained_in_the_context_generation_gives_it(tok, convo):
    """For each assistant turn, the training ids up to and including its `<|end|>` are exactly the ids of the
    generation prompt (`prompt_text` of the turns before it) followed by the reply and `<|end|>`."""
    msgs = [{"role": r, "content": c} for r, c in convo]
    ids, labels = chat.encode_chat(tok, msgs)
    for k, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        served = tok(chat.prompt_text(tok, msgs[:k]) + m["content"] + chat.END_TOKEN, add_special_tokens=False)
        assert ids[: len(served["input_ids"])] == served["input_ids"], k


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(convo=conversations)
def test_labels_never_teach_the_format(tok, convo):
    """Role tokens, eos and pad are never labels; every assistant turn ends in exactly one labelled <|end|>;
    every labelled id equals its input id; a conversation without a reply has no label at all."""
    msgs = [{"role": r, "content": c} for r, c in convo]
    ids, labels = chat.encode_chat(tok, msgs)
    assert len(ids) == len(labels)
    forbidden = {tok.convert_tokens_to_ids(t) for t in (*chat.ROLE_TOKENS.values(), chat.EOS_TOKEN, chat.PAD_TOKEN)}
    kept = [(i, x) for i, x in zip(ids, labels) if x != chat.IGNORE_INDEX]
    assert all(i == x for i, x in kept) and not forbidden & {x for _, x in kept}
    end = tok.convert_tokens_to_ids(chat.END_TOKEN)
    assert sum(x == end for _, x in kept) == sum(m["role"] == "assistant" for m in msgs)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(convo=st.lists(st.tuples(ROLES, texts), min_size=1, max_size=4), gen=st.booleans())
def test_python_rendering_equals_the_stored_template(tok, convo, gen):
    """Any content (special-token text included): chat.render is the tokenizer's Jinja template."""
    msgs = [{"role": r, "content": c} for r, c in convo]
    assert chat.render(msgs, gen) == tok.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(role=texts.filter(lambda r: r not in chat.ROLES))
def test_unknown_roles_are_refused_everywhere(tok, role):
    msgs = [{"role": role, "content": "x"}, {"role": "assistant", "content": "y"}]
    for f in (lambda: chat.render(msgs), lambda: chat.encode_chat(tok, msgs)):
        with pytest.raises(ValueError):
            f()
    with pytest.raises(Exception, match="unknown chat role"):
        tok.apply_chat_template(msgs, tokenize=False)


# ---------------------------------------------------------------- preprocess accounts for every document
docs = st.lists(
    st.one_of(st.sampled_from(CORPUS), texts, st.text(" \n\t\x00\x1b", max_size=5)), min_size=1, max_size=12
)


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(pretrain=docs, qa=st.lists(st.tuples(plain, plain), min_size=1, max_size=6))
def test_preprocess_keeps_or_drops_every_document_with_a_reason(pretrain, qa):
    assume(all("\n\n" not in d and d.strip() == d for d in pretrain if d.strip()))
    d = Path(tempfile.mkdtemp())
    try:
        (d / "p.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in pretrain))
        (d / "s.jsonl").write_text(
            "".join(json.dumps({"instruction": q or "?", "output": a or "!"}) + "\n" for q, a in qa)
        )
        cfg = IngestConfig(
            pretrain_sources=[{"path": str(d / "p.jsonl")}],
            sft_sources=[{"path": str(d / "s.jsonl")}],
            skip_malformed=True,
        )
        try:
            ingest(cfg, d / "raw", seed=0, sources_root=d, cache_dir=d / "cache")
        except StageError:
            return  # nothing usable at all: refused clearly
        try:
            res = preprocess(PreprocessConfig(vocab_size=300, min_chars=1), d / "raw", d / "out", d / "m.json", seed=0)
        except StageError as e:
            assert "left" in str(e) and not (d / "out").exists()
            return
        rep = json.loads((d / "m.json").read_text())
        pre, sft = rep["pretrain"], rep["sft"]
        assert pre["kept"] + sum(pre["dropped"].values()) == pre["docs_in"]
        assert pre["train_docs"] + pre["val_docs"] == pre["kept"] and pre["val_docs"] >= 1
        assert (
            sft["kept"] + sum(sft["dropped"].values())
            == sft["rows_in"]
            == res["sft_train"] + res["sft_val"] + res["sft_test"] + sum(sft["dropped"].values())
        )
    finally:
        shutil.rmtree(d)


def test_a_reply_without_a_prompt_is_dropped_not_passed_on(tmp_path):
    """A row that is only an assistant turn would give evaluate an empty conversation to prompt with
    (transformers refuses it): preprocess drops it with a reason."""
    (tmp_path / "s.jsonl").write_text(
        "".join(
            json.dumps(r) + "\n"
            for r in [
                {"messages": [{"role": "assistant", "content": "Hello, I am here."}]},
                *({"instruction": f"Question {i}?", "output": f"Answer {i}."} for i in range(8)),
            ]
        )
    )
    cfg = IngestConfig(
        pretrain_sources=[{"synthetic": True}],
        sft_sources=[{"path": str(tmp_path / "s.jsonl")}],
        synthetic={"entities": 4, "paraphrases": 1},
    )
    ingest(cfg, tmp_path / "raw", seed=0, sources_root=tmp_path, cache_dir=tmp_path / "cache")
    preprocess(PreprocessConfig(vocab_size=300), tmp_path / "raw", tmp_path / "out", tmp_path / "m.json", seed=0)
    rep = json.loads((tmp_path / "m.json").read_text())["sft"]
    assert rep["dropped"] == {"no_prompt": 1} and rep["kept"] == 8
