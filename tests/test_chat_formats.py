"""Instruction data in each chat form (Alpaca, multi-turn `messages`, ShareGPT `conversations`, tool turns):
normalized by ingest, rendered by the chat format, and trained on every assistant turn and only there, checked
token by token against the rendering's own segments."""

from __future__ import annotations

import pytest

from components.data import chat, conversations
from components.ingest import _Malformed, _sft_row
from components.preprocess import train_tokenizer

CORPUS = [
    "What is the capital of Kelmar? The capital is Brask.",
    "Be brief. Tell me a story about the ferry and the bridge.",
    "Thanks! And the colour of the sea is blue, the colour of the sky grey.",
] * 8

ALPACA = {"instruction": "What is the capital of Kelmar?", "output": "Brask."}
CHAT = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the capital of Kelmar?"},
        {"role": "assistant", "content": "Brask."},
        {"role": "user", "content": "And the colour of the sea?"},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "content": "The sky is grey."},
    ]
}
SHAREGPT = {
    "conversations": [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "Tell me a story."},
        {"from": "gpt", "value": "The ferry crossed."},
        {"from": "human", "value": "And then?"},
        {"from": "gpt", "value": "The bridge."},
    ]
}


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(iter(CORPUS), vocab_size=400, min_frequency=1)


def expected(tok, msgs):
    """Ids and labels built segment by segment from the rendering: role header, content, end, newline; only an
    assistant's content and its end token are trained."""
    ids, labels = [], []
    for m in msgs:
        trained = m["role"] == "assistant"
        for text, learn in (
            (chat.ROLE_TOKENS[m["role"]], False),
            ("\n" + m["content"] if not trained else "\n", False),
            (m["content"] if trained else "", True),
            (chat.END_TOKEN, trained),
            ("\n", False),
        ):
            seg = tok(text, add_special_tokens=False)["input_ids"] if text else []
            ids += seg
            labels += seg if learn else [chat.IGNORE_INDEX] * len(seg)
    return ids, labels


@pytest.mark.parametrize(
    "row, turns",
    [(ALPACA, 1), (CHAT, 3), (SHAREGPT, 2)],
    ids=["alpaca", "messages-multi-turn", "sharegpt-multi-turn"],
)
def test_each_form_renders_and_masks_every_assistant_turn_token_by_token(tok, row, turns):
    msgs = _sft_row(row)["messages"]
    assert sum(m["role"] == "assistant" for m in msgs) == turns
    ids, labels = chat.encode_chat(tok, msgs)
    assert ids == chat.chat_ids(tok, msgs)  # the template's own tokens
    want_ids, want_labels = expected(tok, msgs)
    assert ids == want_ids
    for i, (got, want) in enumerate(zip(labels, want_labels)):
        assert got == want, (i, tok.convert_ids_to_tokens(ids[i]), got, want)
    trained = tok.decode([t for t, lab in zip(ids, labels) if lab != chat.IGNORE_INDEX])
    assert trained == "".join(m["content"] + chat.END_TOKEN for m in msgs if m["role"] == "assistant")


def test_sharegpt_roles_map_to_the_chat_roles():
    msgs = _sft_row(SHAREGPT)["messages"]
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant"]
    assert msgs[2] == {"role": "assistant", "content": "The ferry crossed."}
    with pytest.raises(_Malformed, match=r"conversations\[1\]: need \{from, value\}"):
        _sft_row({"conversations": [{"from": "human", "value": "x"}, {"role": "gpt"}]})
    with pytest.raises(_Malformed, match=r"messages\[0\]: role 'robot' is not one of"):
        _sft_row({"conversations": [{"from": "robot", "value": "x"}, {"from": "gpt", "value": "y"}]})


def test_tool_turns_are_kept_by_ingest_and_dropped_unless_the_template_renders_them(tmp_path):
    row = {
        "conversations": [
            {"from": "human", "value": "Weather in Brask?"},
            {"from": "function_call", "value": '{"name": "weather", "arguments": {"city": "Brask"}}'},
            {"from": "observation", "value": '{"sky": "grey"}'},
            {"from": "gpt", "value": "Grey."},
        ]
    }
    msgs = _sft_row(row)["messages"]
    assert [m["role"] for m in msgs] == ["user", "assistant", "tool", "assistant"]
    openai = {
        "messages": [
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "weather"}}]},
            {"role": "function", "content": "grey"},
            {"role": "assistant", "content": "Grey."},
        ]
    }
    assert _sft_row(openai)["messages"][1]["content"] == '[{"function": {"name": "weather"}}]'
    assert not conversations.template_renders(chat.CHAT_TEMPLATE, "tool")
    permissive = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
    assert conversations.template_renders(permissive, "tool")

    from test_preprocess import qa_rows, run, write_raw  # a preprocess run: the tool row is dropped, counted

    raw = write_raw(
        tmp_path,
        [f"Document {i} about the ferry and the bridge." for i in range(40)],
        qa_rows(20) + [{"messages": msgs, "split": None, "task": None}],
    )
    _, res = run(tmp_path, raw, vocab_size=300)
    assert res["report"]["sft"]["dropped"] == {"tool_messages": 1}
