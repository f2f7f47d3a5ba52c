"""Corpus task metrics with seeded bootstrap confidence intervals, on top of the local metric modules.

Every local module returns additive per-item statistics (`compute(..., return_stats=True)`) and
turns summed statistics into its score (`score_from_stats`). A bootstrap resample is then one
matrix product (resample counts x item stats) plus one cheap score call: 1000 resamples of 200
items take milliseconds, for corpus BLEU/chrF too.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from components.metrics import load_metric

METRIC_SPECS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("exact_match", {"ignore_case": True}), ("rouge", {}), ("bleu", {}), ("chrf", {}))
"""The metrics computed over all items, with their options."""
YESNO = ("yesno", ["yes", "no"])
"""Items of this task are also scored by `accuracy` over these labels."""


def bootstrap_ci(stats: np.ndarray, score: Callable[[np.ndarray], dict[str, float]], *, resamples: int,
                 confidence: float, seed: int) -> dict[str, list[float]]:
    """Percentile CIs: resample items (seeded), sum their additive stats, score each resample."""
    n = len(stats)
    if resamples <= 0 or n == 0:
        return {}
    counts = np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=resamples)
    draws = [score(row) for row in counts @ np.asarray(stats, dtype=np.float64)]
    lo, hi = (1 - confidence) / 2, 1 - (1 - confidence) / 2
    return {k: [float(np.quantile(v, lo)), float(np.quantile(v, hi))]
            for k in draws[0] for v in [np.array([d[k] for d in draws])]}


def _scored(name: str, preds: list[str], refs: list[str], boot: dict[str, Any], **kw: Any
            ) -> tuple[dict[str, Any], np.ndarray]:
    metric = load_metric(name, keep_in_memory=True)
    res = metric.compute(predictions=preds, references=refs, return_stats=True, **kw)
    stats = np.asarray(res.pop("stats"), dtype=np.float64)
    res.update({f"{k}_ci": v for k, v in bootstrap_ci(stats, metric.score_from_stats, **boot).items()})
    return res, stats


def task_metrics(predictions: list[str], references: list[str], tasks: list[str], *, resamples: int,
                 confidence: float, seed: int) -> tuple[dict[str, Any], list[bool]]:
    """Corpus metrics (+ `<name>_ci`), accuracy on "yesno" items, exact match per task; per-item correctness."""
    boot = {"resamples": resamples, "confidence": confidence, "seed": seed}
    out: dict[str, Any] = {}
    em_stats = np.zeros((0, 2))
    for name, kw in METRIC_SPECS:
        res, stats = _scored(name, predictions, references, boot, **kw)
        out.update(res)
        em_stats = stats if name == "exact_match" else em_stats
    yes = [i for i, t in enumerate(tasks) if t == YESNO[0]]
    if yes:
        out.update(_scored("accuracy", [predictions[i] for i in yes], [references[i] for i in yes], boot,
                           labels=YESNO[1])[0])
    em = load_metric("exact_match", keep_in_memory=True)
    out["tasks"] = {}
    for task in sorted(set(tasks)):
        sel = em_stats[[i for i, t in enumerate(tasks) if t == task]]
        ci = bootstrap_ci(sel, em.score_from_stats, **boot)
        out["tasks"][task or "none"] = {"n": len(sel), **em.score_from_stats(sel.sum(0)),
                                        **({"exact_match_ci": ci["exact_match"]} if ci else {})}
    return out, [bool(s[0] > 0.5) for s in em_stats]
