"""The knowledge-cutoff table of the evaluation report, and its per-question samples (file + MLflow table)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from components.core.io import write_json
from components.evaluation.report import cell, fmt, fmt_diff

SAMPLES = "cutoff_samples.jsonl"
TABLE = "cutoff_table.json"
ROWS = (
    ("updated", "exact_match", "exact match"),
    ("updated", "stale", "stale answers (the old value)"),
    ("unchanged", "exact_match", "exact match"),
)


def lines(m: dict[str, Any], confidence: float, shown: int = 10, samples: list[dict] = ()) -> list[str]:
    """Markdown: one table (no retrieval, retrieval, difference, oracle passage; recall@k), then sample answers."""
    ix = m.get("index") or {}
    k = ix.get("top_k", "k")
    out = [
        "",
        "## Knowledge cutoff: without and with retrieval",
        "",
        f"The fine-tuned model on held-out questions about facts that changed after training (news in the index "
        f"only) and facts that did not. Retrieval: the index's top {k} chunks ({ix.get('retrieval')}, "
        f"`{ix.get('path')}`, content {str(ix.get('content_sha256'))[:12]}), as many as fit "
        f"{ix.get('prompt_budget')} prompt tokens. Oracle: only the chunk that states the answer (reading alone). "
        f"Intervals: {confidence:.0%} bootstrap; the difference is paired over the same questions, **✱** = "
        "significant.",
        "",
        "| questions | n | metric | no retrieval | retrieval | retrieval − none | oracle passage |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind, key, label in ROWS:
        r = m.get(kind)
        if r:
            diff = fmt_diff(r["rag_vs_none"].get(key))
            out.append(
                f"| {kind} facts | {r['n']} | {label} | {fmt(r['none'], key)} | {fmt(r['rag'], key)} | {diff} | "
                f"{fmt(r['oracle'], key)} |"
            )
    for kind in ("updated", "unchanged"):
        if r := m.get(kind):
            out.append(f"| {kind} facts | {r['n']} | recall@{k} | – | {fmt(r, 'recall_at_k')} | | |")
            out.append(f"| {kind} facts | {r['n']} | answer chunk in the prompt | – | {fmt(r, 'in_context')} | | |")
    if samples and shown:
        out += ["", "| kind | question | reference | no retrieval | retrieval | sources |", "|---" * 6 + "|"]
        picks = [s for s in samples if s["kind"] == "updated"][: shown // 2]
        picks += [s for s in samples if s["kind"] == "unchanged"][: shown - len(picks)]
        out += [_sample_row(s) for s in picks]
    return out


def _answer(s: dict[str, Any], condition: str) -> str:
    got = s["answers"][condition]
    return ("✓ " if " ".join(got.split()).lower() == s["answer"].lower() else "") + cell(got)


def _sample_row(s: dict[str, Any]) -> str:
    src = "; ".join(f"[{x['n']}] {x['source']} {x['location']}" for x in s["sources"])
    cells = [s["kind"], cell(s["question"]), cell(s["answer"]), _answer(s, "none"), _answer(s, "rag"), cell(src, 200)]
    return "| " + " | ".join(cells) + " |"


def write(folder: Path, samples: list[dict[str, Any]]) -> list[str]:
    """cutoff_samples.jsonl and the MLflow table cutoff_table.json in `folder`; returns their names."""
    with open(Path(folder) / SAMPLES, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(s, ensure_ascii=False) + "\n" for s in samples)
    table: dict[str, list[Any]] = {"kind": [], "question": [], "reference": [], "stale": []}
    for c in ("none", "rag", "oracle"):
        table[f"answer_{c}"] = []
    table["sources"] = []
    for s in samples:
        for key, value in (("kind", s["kind"]), ("question", s["question"]), ("reference", s["answer"])):
            table[key].append(value)
        table["stale"].append(s.get("stale") or "")
        for c in ("none", "rag", "oracle"):
            table[f"answer_{c}"].append(s["answers"][c])
        table["sources"].append("; ".join(f"{x['source']} {x['location']}" for x in s["sources"]))
    write_json(Path(folder) / TABLE, table)
    return [SAMPLES, TABLE]
