"""The knowledge-cutoff part of the embedded world: facts that change after training, and reading practice.

A seeded `updates` fraction of the entities changes one fact after training (moves town, changes trade, gets a
new pet). Each change is a news document that goes only into the retrieval index (`index.sources: synthetic`),
never into the pretraining corpus. A third of the changes ("train") may appear in SFT rows; the others ("test")
are the held-out knowledge-cutoff questions, asked together with the held-out facts that did not change.

The SFT set also gets `context_share` rows answered from supplied passages among distractors (`task: context`),
in the shape retrieval gives them (chat.with_context, passages of about one index chunk):
- change (60%): a known person's fact changed, as news (a train change, or a made-up one with a random new value,
  so the answer has to be read, not remembered), often next to the biography passage with the old value: the
  answer follows the news;
- memory (20%): a train fact the passages do not state (beside news about another of the person's facts): the
  answer comes from what pretraining taught;
- consistent (20%): a train fact stated in a passage;
- read (off, see MIX): a freshly invented person per row, the fact in a passage.
No row answers a held-out fact or asks about a changed fact of a test change, and no test change's news is in
any row: what evaluation asks stays unseen.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from typing import Any

from components.core.data_config import SyntheticConfig
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
CONTEXT_WORDS = 52
"""Passage words per SFT row beyond two passages: the prompt stays within the default 128-token context."""
MIX = (("change", 0.6), ("read", 0.0), ("memory", 0.2), ("consistent", 0.2))
"""Kinds of SFT context rows and their shares (see the module docstring). `read` (invented people) is off: the
4-layer model of the first runs read changes worse with it (README, "The knowledge-cutoff experiment"); it
stands in when a tiny world has no fact or change to show."""


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
    """What context rows are made of: the world's people and their biography passages, the facts and changes
    SFT may show (never a held-out fact or a test change), and fresh invented people."""

    def __init__(self, cfg: SyntheticConfig, seed: int, rng: random.Random) -> None:
        w = syn.world(cfg, seed)
        docs = list(syn.pretrain_documents(cfg, seed))
        k, self.rng, self.values = cfg.paraphrases, rng, w["values"]
        self.world = {e["name"]: e for e in w["entities"]}
        self.bios = {
            e["name"]: [p for d in docs[i * k : (i + 1) * k] for p in passages(d["text"])]
            for i, e in enumerate(w["entities"])
        }
        held = {tuple(x) for x in w["heldout"]}
        all_news = news(cfg, seed)
        tested = {c["name"] for c, _ in all_news if c["split"] == "test"}
        changed = {(c["name"], c["attribute"]) for c, _ in all_news}
        self.real = {(c["name"], c["attribute"]): (c, t) for c, t in all_news if c["split"] == "train"}
        self.facts = sorted((n, a) for n in self.world for a in syn.ATTRIBUTES if (n, a) not in held | changed)
        self.changeable = sorted((n, a) for n in self.world if n not in tested for a in UPDATED if (n, a) not in held)
        self.taken = set(self.world) | set(w["values"]["city"])

    def passage(self, name: str, word: str | None, has: bool = True) -> str:
        """A biography passage of `name` that states (has=False: lacks) `word`."""
        pick = [p for p in self.bios[name] if word is None or _mentions(p, word) == has]
        return self.rng.choice(pick or self.bios[name])

    def change(self, name: str, a: str) -> tuple[dict[str, Any], str]:
        """The train change of (name, a), or a counterfactual one: a random new value, its news."""
        if (name, a) in self.real:
            return self.real[(name, a)]
        old = self.world[name][a]
        c = {"name": name, "attribute": a, "old": old, "new": self.rng.choice([v for v in self.values[a] if v != old])}
        return c, news_text(c, self.rng)

    def invented(self) -> dict[str, Any]:
        """A fresh person (a new name every time: the answer can only be read, not remembered) and a passage."""
        name = syn._names(self.rng, 1, self.taken)[0]
        ent = {"name": name, **{a: self.rng.choice(self.values[a]) for a in syn.ATTRIBUTES}}
        ent["bio"] = passages(next(syn.biographies([ent], 1, self.rng)))
        return ent

    def distractor(self, avoid: str) -> str:
        return self.passage(self.rng.choice([n for n in self.bios if n != avoid]), None)


def _words(texts: list[str]) -> int:
    return sum(len(t.split()) for t in texts)


def _context_row(rng: random.Random, question: str, gold: list[str], pool: _Pool, avoid: str, answer: str) -> dict:
    """Gold passages plus distractors up to CONTEXT_WORDS, shuffled, rendered by chat.with_context."""
    found = list(gold)
    while len(found) < 3:
        extra = pool.distractor(avoid)
        if len(found) >= 2 and _words([*found, extra]) > CONTEXT_WORDS:
            break
        found.append(extra)
    rng.shuffle(found)
    return {
        "messages": [
            {"role": "user", "content": with_context(question, found)},
            {"role": "assistant", "content": answer},
        ],
        "split": "train",
        "task": "context",
    }


def _ask(rng: random.Random, name: str, a: str) -> str:
    return rng.choice(syn.QUESTIONS[a]).format(e=name)


def _change_row(pool: _Pool, rng: random.Random, i: int) -> dict:
    """A known person's fact changed (a train change, or made up): the news wins over the biography."""
    name, a = pool.changeable[(i * 7919) % len(pool.changeable)]
    c, text = pool.change(name, a)
    gold = [text] + ([pool.passage(name, c["old"])] if rng.random() < 0.6 else [])
    return _context_row(rng, _ask(rng, name, a), gold, pool, name, syn.answer_sentence(a, name, c["new"]))


def _read_row(pool: _Pool, rng: random.Random, i: int) -> dict:
    ent = pool.invented()
    a = rng.choice(syn.ATTRIBUTES)
    gold = [rng.choice([p for p in ent["bio"] if _mentions(p, ent[a])] or ent["bio"])]
    return _context_row(rng, _ask(rng, ent["name"], a), gold, pool, "", syn.answer_sentence(a, ent["name"], ent[a]))


def _fact_row(pool: _Pool, rng: random.Random, i: int, stated: bool) -> dict:
    """A train fact: stated in a passage, or not (answer from memory, next to news about another fact)."""
    name, a = pool.facts[(i * 7919) % len(pool.facts)]
    value = pool.world[name][a]
    gold = [pool.passage(name, value, has=stated)]
    others = [(n, b) for n, b in pool.changeable if n == name and b != a]
    if not stated and others:
        gold.append(pool.change(*rng.choice(others))[1])
    return _context_row(rng, _ask(rng, name, a), gold, pool, name, syn.answer_sentence(a, name, value))


def context_rows(cfg: SyntheticConfig, seed: int, n_questions: int) -> list[dict[str, Any]]:
    """`context_share` x `n_questions` SFT rows answered from passages (kinds and shares in MIX)."""
    rng = random.Random(f"seedlm-context-{seed}")
    total = round(cfg.context_share * n_questions)
    if total == 0:
        return []
    pool = _Pool(cfg, seed, rng)
    makers = {
        "change": (lambda i: _change_row(pool, rng, i)) if pool.changeable else None,
        "read": lambda i: _read_row(pool, rng, i),
        "memory": (lambda i: _fact_row(pool, rng, i, False)) if pool.facts else None,
        "consistent": (lambda i: _fact_row(pool, rng, i, True)) if pool.facts else None,
    }
    rows: list[dict[str, Any]] = []
    for k, (kind, share) in enumerate(MIX):
        count = round(share * total) if k < len(MIX) - 1 else total - len(rows)
        make = makers[kind] or makers["read"]
        rows += [make(i) for i in range(count)]
    return rows
