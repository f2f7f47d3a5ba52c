"""Corpus task metrics with seeded bootstrap confidence intervals, on top of the local metric modules.

Every local module returns additive per-item statistics (`compute(..., return_stats=True)`) and
turns summed statistics into its score (`score_from_stats`). A bootstrap resample is then one
matrix product (resample counts x item stats) plus one cheap score call: 1000 resamples of 200
items take milliseconds, for corpus BLEU/chrF too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from components.evaluation.metrics import load_metric

METRIC_SPECS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("exact_match", {"ignore_case": True}),
    ("rouge", {}),
    ("bleu", {}),
    ("chrf", {}),
)
"""The metrics computed over all items, with their options."""
YESNO = ("yesno", ["yes", "no"])
"""Items of this task are also scored by `accuracy` over these labels."""


Score = Callable[[np.ndarray], dict[str, float]]
"""Summed item stats -> {metric: value} (a metric module's `score_from_stats`)."""


def resample_counts(n: int, resamples: int, seed: int) -> np.ndarray:
    """(resamples, n) seeded bootstrap counts: how often each item is drawn in each resample."""
    return np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=resamples)


def _interval(values: np.ndarray, confidence: float) -> list[float]:
    lo, hi = (1 - confidence) / 2, 1 - (1 - confidence) / 2
    return [float(np.quantile(values, lo)), float(np.quantile(values, hi))]


def bootstrap_ci(
    stats: np.ndarray, score: Score, *, resamples: int, confidence: float, seed: int
) -> dict[str, list[float]]:
    """Percentile CIs: resample items (seeded), sum their additive stats, score each resample."""
    n = len(stats)
    if resamples <= 0 or n == 0:
        return {}
    draws = [score(row) for row in resample_counts(n, resamples, seed) @ np.asarray(stats, dtype=np.float64)]
    return {k: _interval(np.array([d[k] for d in draws]), confidence) for k in draws[0]}


def paired_bootstrap(
    a: np.ndarray, b: np.ndarray, score: Score, *, resamples: int, confidence: float, seed: int
) -> dict[str, dict[str, Any]]:
    """Per metric: diff = score(a) - score(b) on the same items, its CI over shared item resamples,
    and `significant` (the CI excludes 0; None without resamples). Rows of `a` and `b` are the same items."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"paired bootstrap needs the same items: {a.shape[0]} vs {b.shape[0]} rows")
    pa, pb = score(a.sum(0)), score(b.sum(0))
    out = {k: {"diff": float(pa[k] - pb[k]), "ci": None, "significant": None} for k in pa}
    if resamples <= 0 or len(a) == 0:
        return out
    counts = resample_counts(len(a), resamples, seed)
    da, db = [score(r) for r in counts @ a], [score(r) for r in counts @ b]
    for k, entry in out.items():
        lo, hi = _interval(np.array([x[k] - y[k] for x, y in zip(da, db)]), confidence)
        entry.update(ci=[lo, hi], significant=bool(lo > 0 or hi < 0))
    return out


def _scored(
    name: str, preds: list[str], refs: list[str], boot: dict[str, Any], keep: dict[str, Any] | None, **kw: Any
) -> tuple[dict[str, Any], np.ndarray]:
    metric = load_metric(name, keep_in_memory=True)
    res = metric.compute(predictions=preds, references=refs, return_stats=True, **kw)
    stats = np.asarray(res.pop("stats"), dtype=np.float64)
    res.update({f"{k}_ci": v for k, v in bootstrap_ci(stats, metric.score_from_stats, **boot).items()})
    if keep is not None:
        keep[name] = (stats, metric.score_from_stats)
    return res, stats


def task_metrics(
    predictions: list[str],
    references: list[str],
    tasks: list[str],
    *,
    resamples: int,
    confidence: float,
    seed: int,
    keep_stats: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], list[bool]]:
    """Corpus metrics (+ `<name>_ci`), accuracy on "yesno" items, exact match per task; per-item correctness.

    `keep_stats`, when given, receives metric module name -> (per-item stats, score function), for
    paired comparisons between models scored on the same items.
    """
    boot = {"resamples": resamples, "confidence": confidence, "seed": seed}
    out: dict[str, Any] = {}
    em_stats = np.zeros((0, 2))
    for name, kw in METRIC_SPECS:
        res, stats = _scored(name, predictions, references, boot, keep_stats, **kw)
        out.update(res)
        em_stats = stats if name == "exact_match" else em_stats
    yes = [i for i, t in enumerate(tasks) if t == YESNO[0]]
    if yes:
        out.update(
            _scored(
                "accuracy",
                [predictions[i] for i in yes],
                [references[i] for i in yes],
                boot,
                keep_stats,
                labels=YESNO[1],
            )[0]
        )
    em = load_metric("exact_match", keep_in_memory=True)
    out["tasks"] = {}
    for task in sorted(set(tasks)):
        sel = em_stats[[i for i, t in enumerate(tasks) if t == task]]
        ci = bootstrap_ci(sel, em.score_from_stats, **boot)
        out["tasks"][task or "none"] = {
            "n": len(sel),
            **em.score_from_stats(sel.sum(0)),
            **({"exact_match_ci": ci["exact_match"]} if ci else {}),
        }
    return out, [bool(s[0] > 0.5) for s in em_stats]


def compare_models(
    names: list[str],
    item_stats: dict[str, dict[str, Any]],
    *,
    keys: tuple[str, ...],
    resamples: int,
    confidence: float,
    seed: int,
) -> dict[str, dict[str, Any]]:
    """Paired bootstrap of the challenger ("sft", else the first model) against every other model.

    item_stats: model -> metric module -> (per-item stats, score function), items in the same order
    for every model. Returns {"<challenger>_vs_<other>": {metric: {"diff", "ci", "significant"}}} for `keys`.
    """
    if not names:
        return {}
    first = "sft" if "sft" in names else names[0]
    out: dict[str, dict[str, Any]] = {}
    for other in (n for n in names if n != first):
        diffs: dict[str, Any] = {}
        for module, (stats, score) in item_stats.get(first, {}).items():
            if module in item_stats.get(other, {}):
                res = paired_bootstrap(
                    stats, item_stats[other][module][0], score, resamples=resamples, confidence=confidence, seed=seed
                )
                diffs.update({k: v for k, v in res.items() if k in keys})
        if diffs:
            out[f"{first}_vs_{other}"] = {k: diffs[k] for k in keys if k in diffs}
    return out
