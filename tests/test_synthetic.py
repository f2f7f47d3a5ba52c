"""The embedded synthetic world: deterministic, split without leakage, every fact in the corpus."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from collections import Counter, defaultdict

import pytest

from components.core.data_config import SyntheticConfig
from components.data import synthetic as syn

CFG = SyntheticConfig()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rows(cfg=CFG, seed=1337):
    return list(syn.instruction_rows(cfg, seed))


def _docs(cfg=CFG, seed=1337):
    return [d["text"] for d in syn.pretrain_documents(cfg, seed)]


def test_same_seed_identical_other_seed_different():
    assert _docs() == _docs() and _rows() == _rows()
    assert syn.world(CFG, 1337) == syn.world(CFG, 1337)
    a, b = syn.world(CFG, 1337), syn.world(CFG, 1338)
    assert [e["name"] for e in a["entities"]] != [e["name"] for e in b["entities"]]
    assert _docs(seed=1) != _docs(seed=2) and _rows(seed=1) != _rows(seed=2)


def test_deterministic_across_processes():
    """Same output whatever PYTHONHASHSEED (no set/dict-order or hash() dependence)."""
    code = (
        "import hashlib, json; from components.data import synthetic as s; from components.core.data_config import "
        "SyntheticConfig as C; print(hashlib.sha256(json.dumps([list(s.pretrain_documents(C(), 9)), "
        "list(s.instruction_rows(C(), 9))]).encode()).hexdigest())"
    )
    here = [list(syn.pretrain_documents(CFG, 9)), _rows(seed=9)]
    here_hash = hashlib.sha256(json.dumps(here).encode()).hexdigest()
    for hashseed in ("1", "2"):
        out = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
            env={**os.environ, "PYTHONHASHSEED": hashseed},
        )
        assert out.stdout.strip() == here_hash


def test_world_shape_and_names():
    w = syn.world(CFG, 7)
    names = [e["name"] for e in w["entities"]]
    assert len(names) == len(set(names)) == CFG.entities
    assert all(re.fullmatch(r"[A-Z][a-z]{3,8}", n) for n in names)
    assert not set(names) & set(w["values"]["city"])
    assert len(w["attributes"]) >= 6
    for e in w["entities"]:
        assert all(e[a] in w["values"][a] for a in w["attributes"])
    assert all(len(set(syn.TEMPLATES[a])) >= 6 for a in syn.ATTRIBUTES)


def test_rows_are_chat_form():
    for r in _rows():
        assert set(r) == {"messages", "split", "task"}
        turns = len(r["messages"]) // 2
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"] * turns
        assert turns == 1 or (r["task"] == "dialogue" and 2 <= turns <= 3)
        assert all(isinstance(m["content"], str) and m["content"] for m in r["messages"])
        assert r["split"] in ("train", "test") and r["task"] in ("qa", "yesno", "context", "dialogue")
        assert r["task"] != "context" or r["split"] == "train"  # passages: SFT only (tests/test_updates.py)


def test_dialogues_chain_train_turns_and_ask_held_out_facts_a_turn_later():
    rows = _rows()
    pairs = lambda r: [tuple(m["content"] for m in r["messages"][i : i + 2]) for i in range(0, len(r["messages"]), 2)]
    qa = {
        split: {pairs(r)[0] for r in rows if r["task"] == "qa" and r["split"] == split} for split in ("train", "test")
    }
    talks = {split: [pairs(r) for r in rows if r["task"] == "dialogue" and r["split"] == split] for split in qa}
    assert len(talks["train"]) == round(CFG.dialogues * (len(qa["train"]) + len(qa["test"])))
    assert all(set(t) <= qa["train"] and len(set(t)) == len(t) for t in talks["train"])  # distinct train questions
    assert sorted(t[-1] for t in talks["test"]) == sorted(qa["test"])  # every held-out question, once
    assert all(len(t) == 2 and t[0] in qa["train"] for t in talks["test"])
    none = _rows(SyntheticConfig(dialogues=0))
    assert {r["split"] for r in none if r["task"] == "dialogue"} == {"test"}  # evaluation keeps its dialogues


@pytest.mark.parametrize("frac", [0.1, 0.2, 0.5])
def test_heldout_split_has_no_leak_and_is_stratified(frac):
    cfg = SyntheticConfig(entities=60, heldout_fraction=frac)
    w = syn.world(cfg, 3)
    rows = _rows(cfg, 3)
    qa = [r for r in rows if r["task"] == "qa"]
    assert len(qa) == cfg.entities * len(w["attributes"])
    test_q = {r["messages"][-2]["content"] for r in rows if r["split"] == "test"}  # the question asked
    train_q = {m["content"] for r in rows if r["split"] == "train" for m in r["messages"] if m["role"] == "user"}
    assert test_q and not test_q & train_q
    # a held-out fact is never mentioned (entity + its attribute question) in any train row
    by_fact = {}
    for e in w["entities"]:
        for a in w["attributes"]:
            by_fact[syn.answer_sentence(a, e["name"], e[a])] = (e["name"], a)
    held = {tuple(x) for x in w["heldout"]}
    for r in qa:
        assert (by_fact[r["messages"][1]["content"]] in held) == (r["split"] == "test")
    n_test = sum(r["split"] == "test" for r in qa)
    assert abs(n_test / len(qa) - frac) < 0.03
    train_facts = [by_fact[r["messages"][1]["content"]] for r in qa if r["split"] == "train"]
    assert {a for _, a in train_facts} == set(w["attributes"])  # every attribute trains
    assert {a for _, a in held} == set(w["attributes"])  # and every attribute is tested
    per_entity = Counter(n for n, _ in train_facts)
    assert len(per_entity) >= 0.9 * cfg.entities  # most entities keep facts in SFT
    assert max(Counter(n for n, _ in held).values()) - min(Counter(n for n, _ in held).values()) <= 2


def test_yesno_balanced_per_split_and_follows_fact_split():
    w = syn.world(CFG, 5)
    held = {tuple(x) for x in w["heldout"]}
    rows = _rows(seed=5)
    for split in ("train", "test"):
        answers = Counter(r["messages"][1]["content"] for r in rows if r["task"] == "yesno" and r["split"] == split)
        assert set(answers) == {"Yes.", "No."} and abs(answers["Yes."] - answers["No."]) <= 1
    # each yes/no question is about one fact; "Yes." exactly when it names the true value
    lookup = {
        t.format(e=e["name"], v=v): (e["name"], a, v == e[a])
        for e in w["entities"]
        for a in w["attributes"]
        for t in syn.YESNO[a]
        for v in w["values"][a]
    }
    for r in (r for r in rows if r["task"] == "yesno"):
        name, attr, true = lookup[r["messages"][0]["content"]]
        assert ((name, attr) in held) == (r["split"] == "test")
        assert (r["messages"][1]["content"] == "Yes.") == true


def test_corpus_states_every_fact_and_contains_every_answer():
    w = syn.world(CFG, 11)
    docs = _docs(seed=11)
    assert len(docs) == CFG.entities * CFG.paraphrases
    by_entity = defaultdict(list)
    for d in docs:
        names = [e["name"] for e in w["entities"] if re.search(rf"\b{e['name']}\b", d)]
        assert len(names) == 1
        by_entity[names[0]].append(d)
    corpus = "\n".join(docs)
    for e in w["entities"]:
        mine = by_entity[e["name"]]
        assert len(mine) == CFG.paraphrases and len(set(mine)) == CFG.paraphrases
        for a in w["attributes"]:
            assert all(re.search(rf"\b{e[a]}\b", d, re.I) for d in mine), (e["name"], a)
            assert syn.answer_sentence(a, e["name"], e[a]) in corpus
    for r in _rows(seed=11):
        if r["task"] == "qa":  # answering = completing a sentence seen in pretraining
            assert r["messages"][1]["content"] in corpus


def test_paraphrases_vary_wording():
    docs = _docs(SyntheticConfig(entities=4, paraphrases=6), 0)
    first = [d for d in docs[:6]]
    # the same fact is worded differently across an entity's documents
    sentence_sets = [set(re.split(r"(?<=\.) ", d)) for d in first]
    assert len(set.union(*sentence_sets)) > 6 * 4


def test_default_size():
    docs, rows = _docs(), _rows()
    words = sum(len(d.split()) for d in docs)
    assert 20_000 <= words <= 40_000, words
    assert sum(r["task"] in ("qa", "yesno") for r in rows) == 2 * CFG.entities * 6


def test_scales_to_many_entities():
    cfg = SyntheticConfig(entities=3000, paraphrases=1, heldout_fraction=0.3)
    w = syn.world(cfg, 0)
    assert len({e["name"] for e in w["entities"]}) == 3000
    assert sum(1 for _ in syn.pretrain_documents(cfg, 0)) == 3000
