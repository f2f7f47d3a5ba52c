"""The knowledge-cutoff part of the embedded world: changes after training written as news for the index only,
held-out questions about changed and unchanged facts, and SFT rows answered from passages that never give away
a held-out fact or a held-out change."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from components.core.data_config import SyntheticConfig
from components.data import synthetic as syn
from components.data import updates as up
from components.data.chat import CONTEXT_HEADER, QUESTION_HEADER

CFG = SyntheticConfig()


def test_changes_are_one_per_updated_entity_to_a_new_value():
    w = syn.world(CFG, 3)
    changes = up.updates(CFG, 3)
    assert len(changes) == round(CFG.updates * CFG.entities)
    assert len({c["name"] for c in changes}) == len(changes)
    values = {e["name"]: e for e in w["entities"]}
    for c in changes:
        assert c["attribute"] in up.UPDATED and c["old"] == values[c["name"]][c["attribute"]] != c["new"]
        assert c["new"] in w["values"][c["attribute"]]
    assert Counter(c["split"] for c in changes) == {"test": 30, "train": 15}
    assert up.updates(CFG, 3) == changes and up.updates(CFG, 4) != changes


def test_news_states_each_change_and_stays_out_of_the_pretraining_corpus():
    news = [d["text"] for d in up.news_documents(CFG, 3)]
    corpus = "\n".join(d["text"] for d in syn.pretrain_documents(CFG, 3))
    for c, text in zip(up.updates(CFG, 3), news):
        assert re.search(rf"\b{c['name']}\b", text) and re.search(rf"\b{c['new']}\b", text)
        assert not re.search(rf"\b{c['name']}\b[^.]*\b{c['new']}\b", corpus)  # the new fact is news only
    assert not set(news) & set(corpus.split("\n"))


def test_cutoff_questions_ask_every_test_change_and_the_unchanged_heldout_facts():
    qs = up.cutoff_questions(CFG, 3)
    changes = up.updates(CFG, 3)
    updated = [q for q in qs if q["kind"] == "updated"]
    assert [(q["entity"], q["attribute"], q["value"]) for q in updated] == [
        (c["name"], c["attribute"], c["new"]) for c in changes if c["split"] == "test"
    ]
    for q in updated:
        assert q["stale"] == syn.answer_sentence(q["attribute"], q["entity"], q["old_value"])
        assert q["answer"] == syn.answer_sentence(q["attribute"], q["entity"], q["value"])
    changed = {(c["name"], c["attribute"]) for c in changes}
    unchanged = {(q["entity"], q["attribute"]) for q in qs if q["kind"] == "unchanged"}
    assert unchanged == {tuple(x) for x in syn.world(CFG, 3)["heldout"]} - changed


def test_context_rows_read_like_retrieved_passages_and_never_leak():
    """Passages as in a retrieval prompt; no context row answers a held-out fact (those are for evaluation only),
    and a held-out change (its new value) appears in no row at all."""
    rows = list(syn.instruction_rows(CFG, 3))
    ctx = [r for r in rows if r["task"] == "context"]
    questions = sum(r["task"] in ("qa", "yesno") for r in rows)
    assert len(ctx) == round(CFG.context_share * questions)
    w = syn.world(CFG, 3)
    values = {e["name"]: e for e in w["entities"]}
    held = {syn.answer_sentence(a, n, values[n][a]) for n, a in w["heldout"]}
    secret = [c for c in up.updates(CFG, 3) if c["split"] == "test"]
    kinds = Counter()
    for r in ctx:
        user, answer = r["messages"][0]["content"], r["messages"][1]["content"]
        assert user.startswith(CONTEXT_HEADER + "\n[1] ") and f"\n\n{QUESTION_HEADER} " in user
        assert 2 <= len(re.findall(r"^\[\d\] ", user, re.M)) <= 3
        assert answer not in held
        for c in secret:
            assert not re.search(rf"\b{c['name']}\b[^.]*\b{c['new']}\b", user + " " + answer)
        name = answer.split("'")[0].split(" ")[0]
        kinds["world" if name in values else "invented"] += 1
        assert not any(answer.startswith(c["name"]) and _about(answer, c["attribute"]) for c in secret)
    invented = dict(up.MIX)["read"]  # a share of rows about freshly invented people (off by default, see MIX)
    assert kinds["invented"] == round(invented * len(ctx)) and kinds["world"] == len(ctx) - kinds["invented"]


def _about(answer: str, attribute: str) -> bool:
    """Is `answer` (a canonical answer sentence) about `attribute`?"""
    head, tail = syn.TEMPLATES[attribute][0].split("{v}")
    return head.replace("{e}", "") in answer and answer.endswith(tail)


@pytest.mark.parametrize(
    "cfg", [SyntheticConfig(entities=4, updates=0.25), SyntheticConfig(updates=0, context_share=0)]
)
def test_tiny_and_switched_off_worlds_still_work(cfg):
    rows = list(syn.instruction_rows(cfg, 1))
    assert sum(r["task"] == "context" for r in rows) == round(cfg.context_share * (2 * cfg.entities * 6))
    assert len(list(up.news_documents(cfg, 1))) == round(cfg.updates * cfg.entities)
    assert all(q["kind"] in ("updated", "unchanged") for q in up.cutoff_questions(cfg, 1))
