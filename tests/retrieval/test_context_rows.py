"""SFT rows may carry context passages (a chat row's `context`, Alpaca's `input`): rendered in one place,
chat.with_context, the same rendering retrieval uses at question time."""

from __future__ import annotations

import json

import pytest

from components.core.context import StageError
from components.core.data_config import IngestConfig, Source
from components.data.chat import attach_context, with_context
from components.ingest import ingest
from components.retrieval.context import augment
from components.retrieval.search import Hit

Q = "Where does Zorb live?"
PASSAGES = ["Zorb moved to Holm.", "Pim lives in Vale."]


def test_one_rendering_of_passages():
    assert with_context(Q, PASSAGES) == (
        "Context:\n[1] Zorb moved to Holm.\n[2] Pim lives in Vale.\n\nQuestion: Where does Zorb live?"
    )
    assert with_context(Q, []) == with_context(Q, ["", "  "]) == Q
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey"}]
    msgs += [{"role": "user", "content": Q}, {"role": "assistant", "content": "Zorb lives in Holm."}]
    out = attach_context(msgs, PASSAGES)
    assert out[2]["content"] == with_context(Q, PASSAGES) and out[0] == msgs[0]  # the turn the answer answers
    assert attach_context(msgs, "Zorb moved to Holm.")[2]["content"] == with_context(Q, PASSAGES[:1])
    hits = [Hit(i, p, "s", "l", "h", 1.0, i + 1) for i, p in enumerate(PASSAGES)]
    tok = _CharTokenizer()
    rag, used = augment(msgs[:3], hits, tok, budget=10_000)
    assert rag[-1]["content"] == with_context(Q, PASSAGES) and used == hits  # retrieval: the same rendering


class _CharTokenizer:
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": list(range(len(text)))}


@pytest.mark.parametrize("bad", [3, [1, 2], {"a": "b"}])
def test_bad_context_is_refused(bad):
    with pytest.raises(ValueError, match="context must be a string or a list of strings"):
        attach_context([{"role": "user", "content": Q}, {"role": "assistant", "content": "A"}], bad)


def test_ingest_renders_context_fields_and_alpaca_input(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": Q}, {"role": "assistant", "content": "Holm."}], "context": PASSAGES},
        {"instruction": Q, "input": PASSAGES[0], "output": "Holm."},
        {"messages": [{"role": "user", "content": Q}, {"role": "assistant", "content": "A"}], "context": 7},
    ]
    (tmp_path / "sources").mkdir()
    f = tmp_path / "sources" / "sft.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = IngestConfig(sft_sources=[Source(path=str(f))], skip_malformed=True)
    res = ingest(cfg, tmp_path / "raw", seed=0, sources_root=tmp_path / "sources", cache_dir=tmp_path / "dl")
    got = [json.loads(x) for x in (tmp_path / "raw/sft/shard-00000.jsonl").read_text().splitlines()]
    assert [g["messages"][0]["content"] for g in got] == [with_context(Q, PASSAGES), with_context(Q, PASSAGES[:1])]
    assert res["skipped"] == 1
    with pytest.raises(StageError, match=r"sft.jsonl:3: context must be a string or a list of strings"):
        ingest(
            IngestConfig(sft_sources=[Source(path=str(f))]),
            tmp_path / "raw2",
            seed=0,
            sources_root=tmp_path / "sources",
            cache_dir=tmp_path / "dl",
        )


def test_the_rag_hook_for_serving_chat_and_pyfunc(default_index, world, tmp_path):
    """rag_messages: retrieve for the last user turn, fill the budget, return the sources shown with the answer."""
    from transformers import AutoTokenizer

    from components.retrieval import find_index, rag_messages

    out, _ = default_index
    tok = AutoTokenizer.from_pretrained(str(world["processed"] / "tokenizer"))
    msgs = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi."}]
    msgs.append({"role": "user", "content": "What is the news?"})
    new, shown = rag_messages(out, msgs, tok, budget=200, k=3)
    assert new[:2] == msgs[:2] and new[-1]["content"].startswith("Context:\n[1] ") and 1 <= len(shown) <= 3
    assert [s["n"] for s in shown] == list(range(1, len(shown) + 1))
    assert all(f"[{s['n']}] {s['text']}" in new[-1]["content"] for s in shown)
    with pytest.raises(ValueError, match="last message must be the user's"):
        rag_messages(out, msgs[:2], tok, budget=200)
    assert find_index(tmp_path) is None  # no index built there: retrieval stays off
