"""The knowledge-cutoff part of the embedded world: facts that change after training, and reading practice.

A seeded `updates` fraction of the entities changes one fact after training (moves town, changes trade, gets a
new pet). Each change is a news document that goes only into the retrieval index (`index.sources: synthetic`),
never into the pretraining corpus. A third of the changes ("train") also appear in SFT rows answered from
passages; the others ("test") are the held-out knowledge-cutoff questions, asked together with the held-out facts
that did not change. The SFT set also gets `context_share` rows answered from supplied passages among distractor
passages (`task: context`): half are about invented people the model has never seen, so the answer can only come
from reading; the rest are about the world's people (a train change: follow the news over the old biography; a
train fact: read it, or answer from memory when the passages do not hold it). Held-out facts and test changes
never appear in SFT rows.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from typing import Any

from components.core.config import SyntheticConfig
from components.data import synthetic as syn
from components.data.chat import with_context

UPDATED = ("city", "profession", "pet")
NEWS_INTROS = (
    "News from the valley.",
    "Word has come from the market square.",
    "Here is some recent news.",
    "The latest news, written down this spring.",
)
NEWS: dict[str, tuple[str, ...]] = {
    "city": (
        "{e} has moved from {o} to {v}.",
        "{e} left {o} and now lives in {v}.",
        "After many years in {o}, {e} has made a new home in {v}.",
        "{e} no longer lives in {o}: the new home of {e} is in {v}.",
    ),
    "profession": (
        "{e} has stopped working as a {o} and now works as a {v}.",
        "{e} gave up the trade of {o} and became a {v}.",
        "After years as a {o}, {e} now earns a living as a {v}.",
        "{e} is no longer a {o}; these days {e} works as a {v}.",
    ),
    "pet": (
        "{e} has a new pet, a {v}; the old {o} went to live with a friend.",
        "{e} gave the {o} away and now keeps a {v} as a pet.",
        "A {v} is the new pet of {e}, now that the {o} has gone to a farm.",
        "{e} no longer has a pet {o}; a {v} lives with {e} now.",
    ),
}
PASSAGE_WORDS = 26
"""Words per SFT passage: about the index's default chunk (40 tokens of the pipeline tokenizer), whole sentences."""
OVERLAP_WORDS = 8
MIX = (("novel", 0.5), ("update", 0.2), ("consistent", 0.15), ("memory", 0.15))
"""Kinds of SFT context rows and their shares (see the module docstring)."""


# ---------------------------------------------------------------- changes and news
def updates(cfg: SyntheticConfig, seed: int) -> list[dict[str, Any]]:
    """One change per updated entity: {"name", "attribute", "old", "new", "split": train|test}."""
    w = syn.world(cfg, seed)
    rng = random.Random(f"seedlm-updates-{seed}")
    order = list(range(len(w["entities"])))
    rng.shuffle(order)
    out = []
    for i, idx in enumerate(order[: round(cfg.updates * len(order))]):
        ent = w["entities"][idx]
        a = rng.choice(UPDATED)
        new = rng.choice([v for v in w["values"][a] if v != ent[a]])
        split = "train" if i % 3 == 2 else "test"
        out.append({"name": ent["name"], "attribute": a, "old": ent[a], "new": new, "split": split})
    return out


def news_text(change: dict[str, Any], rng: random.Random) -> str:
    template = rng.choice(NEWS[change["attribute"]])
    sentence = syn._sentence(template.replace("{o}", change["old"]), change["name"], change["new"])
    parts = [rng.choice(NEWS_INTROS), sentence] + ([rng.choice(syn.FILLERS)] if rng.random() < 0.5 else [])
    return " ".join(parts)


def news(cfg: SyntheticConfig, seed: int) -> list[tuple[dict[str, Any], str]]:
    """(change, its news document) for every change, train and test."""
    rng = random.Random(f"seedlm-news-{seed}")
    return [(change, news_text(change, rng)) for change in updates(cfg, seed)]


def news_documents(cfg: SyntheticConfig, seed: int) -> Iterator[dict[str, str]]:
    """One news document per change: the index's view of the world after training."""
    for _, text in news(cfg, seed):
        yield {"text": text}


def cutoff_questions(cfg: SyntheticConfig, seed: int) -> list[dict[str, Any]]:
    """Held-out questions: one per test change (`updated`: answer = new value, `stale` = the old answer) and one
    per held-out fact that did not change (`unchanged`)."""
    w = syn.world(cfg, seed)
    rng = random.Random(f"seedlm-cutoff-{seed}")
    changes = updates(cfg, seed)
    rows = []
    for c in (c for c in changes if c["split"] == "test"):
        name, a = c["name"], c["attribute"]
        rows.append(_question(rng, "updated", name, a, c["new"], syn.answer_sentence(a, name, c["old"]), c["old"]))
    changed = {(c["name"], c["attribute"]) for c in changes}
    values = {e["name"]: e for e in w["entities"]}
    for name, a in w["heldout"]:
        if (name, a) not in changed:
            rows.append(_question(rng, "unchanged", name, a, values[name][a], None, None))
    return rows


def _question(rng: random.Random, kind: str, name: str, a: str, value: str, stale: str | None, old: str | None):
    return {
        "kind": kind,
        "question": rng.choice(syn.QUESTIONS[a]).format(e=name),
        "answer": syn.answer_sentence(a, name, value),
        "stale": stale,
        "entity": name,
        "attribute": a,
        "value": value,
        "old_value": old,
    }


# ---------------------------------------------------------------- passages
def passages(text: str) -> list[str]:
    """Consecutive sentence windows of about PASSAGE_WORDS words sharing a short sentence (like index chunks)."""
    sents = re.split(r"(?<=[.!?;]) ", text)
    out, i = [], 0
    while i < len(sents):
        j, words = i, 0
        while j < len(sents) and (j == i or words + len(sents[j].split()) <= PASSAGE_WORDS):
            words += len(sents[j].split())
            j += 1
        out.append(" ".join(sents[i:j]))
        if j >= len(sents):
            break
        i = j - 1 if j - 1 > i and len(sents[j - 1].split()) <= OVERLAP_WORDS else j
    return out


def _mentions(text: str, word: str) -> bool:
    return re.search(rf"\b{re.escape(word)}\b", text) is not None


# ---------------------------------------------------------------- SFT rows answered from passages
class _Pool:
    """What context rows are made of: entities, their biography passages, train changes and their news."""

    def __init__(self, cfg: SyntheticConfig, seed: int, rng: random.Random) -> None:
        w = syn.world(cfg, seed)
        docs = list(syn.pretrain_documents(cfg, seed))
        k = cfg.paraphrases
        self.bios = {
            e["name"]: [p for d in docs[i * k : (i + 1) * k] for p in passages(d["text"])]
            for i, e in enumerate(w["entities"])
        }
        self.world = {e["name"]: e for e in w["entities"]}
        held = {tuple(x) for x in w["heldout"]}
        all_news = news(cfg, seed)
        changed = {(c["name"], c["attribute"]) for c, _ in all_news}
        self.train_news = [(c, t) for c, t in all_news if c["split"] == "train"]
        self.facts = sorted((n, a) for n in self.world for a in syn.ATTRIBUTES if (n, a) not in held | changed)
        self.novel = self._novel(w, rng, max(8, cfg.entities))

    def _novel(self, w: dict[str, Any], rng: random.Random, n: int) -> list[dict[str, Any]]:
        taken = set(self.world) | set(w["values"]["city"])
        ents = [
            {"name": name, **{a: rng.choice(w["values"][a]) for a in syn.ATTRIBUTES}}
            for name in syn._names(rng, n, taken)
        ]
        bios = list(syn.biographies(ents, 2, rng))
        for i, e in enumerate(ents):
            self.bios[e["name"]] = [p for d in bios[2 * i : 2 * i + 2] for p in passages(d)]
        self.values = w["values"]
        return ents

    def passage(self, rng: random.Random, name: str, word: str | None, has: bool = True) -> str:
        """A biography passage of `name` that states (or, has=False, lacks) `word`."""
        pick = [p for p in self.bios[name] if word is None or _mentions(p, word) == has]
        return rng.choice(pick or self.bios[name])

    def distractor(self, rng: random.Random, avoid: str) -> str:
        names = [n for n in self.bios if n != avoid]
        if self.train_news and rng.random() < 0.25:
            c, text = rng.choice(self.train_news)
            if c["name"] != avoid:
                return text
        return self.passage(rng, rng.choice(names), None)


def _context_row(rng: random.Random, question: str, gold: list[str], others: list[str], answer: str) -> dict:
    found = gold + others
    rng.shuffle(found)
    return {
        "messages": [
            {"role": "user", "content": with_context(question, found)},
            {"role": "assistant", "content": answer},
        ],
        "split": "train",
        "task": "context",
    }


def _novel_row(pool: _Pool, rng: random.Random, i: int) -> dict:
    ent = pool.novel[i % len(pool.novel)]
    name, a = ent["name"], rng.choice(syn.ATTRIBUTES)
    q = rng.choice(syn.QUESTIONS[a]).format(e=name)
    if a in UPDATED and rng.random() < 0.5:  # a change: the news wins over the older biography
        new = rng.choice([v for v in pool.values[a] if v != ent[a]])
        change = {"name": name, "attribute": a, "old": ent[a], "new": new}
        gold = [news_text(change, rng), pool.passage(rng, name, ent[a])]
        return _context_row(rng, q, gold, [], syn.answer_sentence(a, name, new))
    others = [pool.distractor(rng, name) for _ in range(rng.randint(1, 2))]
    return _context_row(rng, q, [pool.passage(rng, name, ent[a])], others, syn.answer_sentence(a, name, ent[a]))


def _update_row(pool: _Pool, rng: random.Random, i: int) -> dict:
    change, text = pool.train_news[i % len(pool.train_news)]
    name, a = change["name"], change["attribute"]
    q = rng.choice(syn.QUESTIONS[a]).format(e=name)
    old = [pool.passage(rng, name, change["old"])] if rng.random() < 0.5 else []
    return _context_row(rng, q, [text, *old], [pool.distractor(rng, name)], syn.answer_sentence(a, name, change["new"]))


def _fact_row(pool: _Pool, rng: random.Random, i: int, stated: bool) -> dict:
    name, a = pool.facts[(i * 7919) % len(pool.facts)]
    value = pool.world[name][a]
    q = rng.choice(syn.QUESTIONS[a]).format(e=name)
    own = [pool.passage(rng, name, value, has=stated)]
    return _context_row(rng, q, own, [pool.distractor(rng, name)], syn.answer_sentence(a, name, value))


def context_rows(cfg: SyntheticConfig, seed: int, n_questions: int) -> list[dict[str, Any]]:
    """`context_share` x `n_questions` SFT rows answered from passages (kinds and shares in MIX)."""
    rng = random.Random(f"seedlm-context-{seed}")
    total = round(cfg.context_share * n_questions)
    if total == 0:
        return []
    pool = _Pool(cfg, seed, rng)
    makers = {
        "novel": lambda i: _novel_row(pool, rng, i),
        "update": (lambda i: _update_row(pool, rng, i)) if pool.train_news else None,
        "consistent": (lambda i: _fact_row(pool, rng, i, True)) if pool.facts else None,
        "memory": (lambda i: _fact_row(pool, rng, i, False)) if pool.facts else None,
    }
    rows: list[dict[str, Any]] = []
    for k, (kind, share) in enumerate(MIX):
        count = round(share * total) if k < len(MIX) - 1 else total - len(rows)
        make = makers[kind] or makers["novel"]
        rows += [make(i) for i in range(count)]
    return rows
