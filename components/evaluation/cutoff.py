"""The knowledge-cutoff experiment: the fine-tuned model on held-out questions about facts that changed after
training (`updated`) and facts that did not (`unchanged`), asked without retrieval, with the index's top-k chunks
in the prompt, and with only the chunk that states the answer (`oracle`: reading alone, a diagnostic).

Per kind and condition: exact match with a bootstrap CI and, for changed facts, the share of stale answers (the
old value); retrieval - none as a paired bootstrap over the same questions; recall@k (a chunk stating the
answer, entity and value, among the top k) and how often that chunk made it into the prompt's budget.
The questions come from the index folder (`cutoff_questions.jsonl`, written for `index.sources: synthetic`).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from components.evaluation.metrics import load_metric
from components.evaluation.scoring import bootstrap_ci, paired_bootstrap
from components.retrieval.build import QUESTIONS
from components.retrieval.context import augment, sources
from components.retrieval.search import Hit, open_index

KINDS = ("updated", "unchanged")
CONDITIONS = ("none", "rag", "oracle")
Generate = Callable[[list[list[dict[str, str]]]], list[str]]
"""Chat prompts -> greedy answers (evaluate.generate with the model bound)."""


def load_questions(index_dir: Path) -> list[dict[str, Any]]:
    path = Path(index_dir) / QUESTIONS
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _word(text: str, word: str | None) -> bool:
    return bool(word) and re.search(rf"\b{re.escape(word)}\b", text, re.IGNORECASE) is not None


def states_answer(text: str, q: dict[str, Any]) -> bool:
    """Does a chunk state the question's answer: its entity and the answer value?"""
    return _word(text, q["entity"]) and _word(text, q["value"])


def _oracle(q: dict[str, Any], hits: list[Hit], chunks: Callable[[], list[dict]]) -> list[Hit]:
    """The chunk stating the answer: the best retrieved one, else the first in the index."""
    found = [h for h in hits if states_answer(h.text, q)]
    if not found:
        found = [Hit(r["id"], r["text"], "", "", "", 0.0, 0) for r in chunks() if states_answer(r["text"], q)]
    return found[:1]


def prompts(questions: list[dict], index_dir: Path, tokenizer: Any, budget: int, k: int) -> dict[str, Any]:
    """Per condition, the chat prompt of every question; the retrieved hits and those that fit the budget."""
    index = open_index(index_dir)

    @functools.cache
    def chunks() -> list[dict]:  # read only when a question's answer was not retrieved
        return index.table.to_arrow().select(["id", "text"]).to_pylist()

    out: dict[str, Any] = {c: [] for c in CONDITIONS} | {"hits": [], "used": []}
    for q in questions:
        ask = [{"role": "user", "content": q["question"]}]
        hits = index.search(q["question"], k)
        rag, used = augment(ask, hits, tokenizer, budget)
        out["none"].append(ask)
        out["rag"].append(rag)
        out["oracle"].append(augment(ask, _oracle(q, hits, chunks), tokenizer, budget)[0])
        out["hits"].append(hits)
        out["used"].append(used)
    return out


def _rate(flags: list[bool], boot: dict[str, Any]) -> tuple[float, list[float] | None, np.ndarray]:
    stats = np.array([[float(f), 1.0] for f in flags]).reshape(-1, 2)
    ci = bootstrap_ci(stats, _share, **boot).get("share")
    return (float(stats[:, 0].mean()) if len(stats) else 0.0), ci, stats


def _share(sums: np.ndarray) -> dict[str, float]:
    return {"share": float(sums[0] / sums[1]) if sums[1] else 0.0}


def _stale(answer: str, q: dict[str, Any]) -> bool:
    return _word(answer, q.get("old_value")) and not _word(answer, q["value"])


def _condition(preds: list[str], qs: list[dict], em: Any, boot: dict) -> tuple[dict, dict[str, np.ndarray]]:
    """exact_match (and, for changed facts, stale) of one condition's answers: values, CIs, item stats."""
    flags = {"exact_match": [r[0] > 0.5 for r in em.item_stats(preds, [q["answer"] for q in qs], ignore_case=True)]}
    if qs[0]["kind"] == "updated":
        flags["stale"] = [_stale(a, q) for a, q in zip(preds, qs)]
    res, stats = {}, {}
    for name, fl in flags.items():
        value, ci, stats[name] = _rate(fl, boot)
        res.update({name: value, **({f"{name}_ci": ci} if ci else {})})
    return res, stats


def _found(qs: list[dict], hits: list[list[Hit]], boot: dict) -> dict[str, Any]:
    """recall@k (top-k hits) or in_context (hits that fit the prompt): a chunk stating the answer among them."""
    value, ci, _ = _rate([any(states_answer(h.text, q) for h in hs) for q, hs in zip(qs, hits)], boot)
    return {"value": value, **({"ci": ci} if ci else {})}


def score(questions: list[dict], answers: dict[str, list[str]], p: dict[str, Any], boot: dict) -> dict[str, Any]:
    """The experiment's metrics (see the module docstring) from each condition's answers."""
    em = load_metric("exact_match", keep_in_memory=True)
    out: dict[str, Any] = {}
    for kind in KINDS:
        idx = [i for i, q in enumerate(questions) if q["kind"] == kind]
        if not idx:
            continue
        qs, res, stats = [questions[i] for i in idx], {"n": len(idx)}, {}
        for cond in CONDITIONS:
            res[cond], stats[cond] = _condition([answers[cond][i] for i in idx], qs, em, boot)
        for name, key in (("recall_at_k", "hits"), ("in_context", "used")):
            found = _found(qs, [p[key][i] for i in idx], boot)
            res.update({name: found["value"], **({f"{name}_ci": found["ci"]} if "ci" in found else {})})
        res["rag_vs_none"] = {
            name: paired_bootstrap(stats["rag"][name], stats["none"][name], _share, **boot)["share"]
            for name in stats["rag"]
        }
        out[kind] = res
    return out


def run(
    questions: list[dict],
    index_dir: Path,
    tokenizer: Any,
    generate: Generate,
    *,
    budget: int,
    k: int,
    boot: dict[str, Any],
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Metrics and per-question samples of the experiment."""
    p = prompts(questions, index_dir, tokenizer, budget, k)
    answers = {c: generate(p[c]) for c in CONDITIONS}
    metrics = score(questions, answers, p, boot)
    samples = [
        {
            **q,
            "answers": {c: answers[c][i] for c in CONDITIONS},
            "sources": sources(p["used"][i]),
            "retrieved": [h.id for h in p["hits"][i]],
        }
        for i, q in enumerate(questions)
    ]
    return metrics, samples


def evaluate(
    cfg: Any, model: Any, tok: Any, questions: list[dict], index_dir: Path, *, device: Any, seed: int, generate: Any
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The experiment with one model (`generate` is evaluate.generate); metrics name the index they used."""
    from components.training.model import max_positions

    def answer(chats: list[list[dict[str, str]]]) -> list[str]:
        texts = [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in chats]
        new = cfg.retrieval_max_new_tokens
        return generate(model, tok, texts, max_new_tokens=new, batch_size=cfg.batch_size, device=device)[0]

    index = open_index(index_dir)
    boot = {"resamples": cfg.bootstrap, "confidence": cfg.confidence, "seed": seed}
    budget = max_positions(model) - cfg.retrieval_max_new_tokens
    metrics, samples = run(questions, index_dir, tok, answer, budget=budget, k=index.top_k, boot=boot)
    metrics["index"] = {
        "path": str(index_dir),
        "content_sha256": index.result.get("content_sha256"),
        "retrieval": index.mode,
        "top_k": index.top_k,
        "chunks": index.result.get("chunks"),
        "prompt_budget": budget,
    }
    return metrics, samples
