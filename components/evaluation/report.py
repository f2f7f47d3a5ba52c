"""The evaluation report: one markdown table for every model, paired significance, samples, PNG figures.

DVC's plot HTML loads its chart scripts from the internet, so the figures are rendered here with
matplotlib (PNG) and embedded in the markdown report; the runner logs both to MLflow.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np

SCORE_METRICS = ("exact_match", "rougeL", "bleu", "chrf", "accuracy")
"""Task metrics shown in the report, the figure and the plots file (all in [0, 1], higher is better)."""
COMPARED = (*SCORE_METRICS, "response_ppl")
"""Metrics with a paired significance test between models (response_ppl: lower is better)."""


def cell(text: Any, limit: int = 160) -> str:
    text = " ".join(str(text).split())
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    return text.replace("|", "\\|") or " "


def fmt(m: dict[str, Any], key: str, digits: int = 3) -> str:
    if key not in m:
        return "–"
    ci = m.get(f"{key}_ci")
    return f"{m[key]:.{digits}f} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else f"{m[key]:.{digits}f}"


def fmt_diff(d: dict[str, Any] | None) -> str:
    if not d:
        return "–"
    ci = d.get("ci")
    mark = " **✱**" if d.get("significant") else ""
    return f"{d['diff']:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}]{mark}" if ci else f"{d['diff']:+.3f}"


def comparison_lines(compare: dict[str, dict[str, Any]], confidence: float) -> list[str]:
    """The significance table: one row per pair (challenger − other), one column per metric."""
    if not compare:
        return []
    lines = [
        "",
        "## Differences and significance",
        "",
        f"Paired bootstrap over the same held-out items: difference (first − second) with its "
        f"{confidence:.0%} interval; **✱** = significant (the interval excludes 0). For response_ppl "
        "lower is better; it is compared only between models sharing the pipeline's tokenizer.",
        "",
        "| comparison | " + " | ".join(COMPARED) + " | significant |",
        "|---" * (len(COMPARED) + 2) + "|",
    ]
    for pair, diffs in compare.items():
        sig = [k for k in COMPARED if (diffs.get(k) or {}).get("significant")]
        lines.append(
            f"| {pair.replace('_vs_', ' − ')} | "
            + " | ".join(fmt_diff(diffs.get(k)) for k in COMPARED)
            + f" | {', '.join(sig) or 'none'} |"
        )
    return lines


def write_report(
    path: Path,
    metrics: dict[str, Any],
    samples: list[dict[str, Any]],
    names: list[str],
    cfg: Any,
    notes: list[str],
    figures: list[Path] = (),
    extra: list[str] = (),
) -> None:
    n = metrics["n_examples"]
    lines = [
        "# seedlm evaluation",
        "",
        f"{n} held-out instructions (sft_test); {metrics.get('val_tokens', 0)} validation tokens. "
        f"Intervals: {cfg.confidence:.0%} percentile bootstrap over items ({cfg.bootstrap} resamples). "
        "exact_match: case-insensitive, whitespace-normalized; accuracy: yes/no items; "
        "bleu, chrf: sacrebleu corpus scores / 100.",
        "",
    ]
    lines += [f"> {note}" for note in notes] + ([""] if notes else [])
    cols = ["val_ppl", "response_ppl", *SCORE_METRICS, "gen_tokens_per_s"]
    lines += ["| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name in names:
        m = metrics[name]
        cells = [f"{m['val_ppl']:.2f}" if "val_ppl" in m else "–", fmt(m, "response_ppl", 2)]
        cells += [fmt(m, c) for c in SCORE_METRICS]
        cells.append(f"{m['gen_tokens_per_s']:.0f}" if "gen_tokens_per_s" in m else "–")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += comparison_lines(metrics.get("compare") or {}, cfg.confidence)
    lines += list(extra)  # sections of other experiments (the knowledge-cutoff table)
    sources = metrics.get("sources") or {}
    if sources:
        lines += ["", "## Models", ""] + [f"- **{k}**: `{v}`" for k, v in sources.items()]
    tasks = sorted({t for name in names for t in metrics[name].get("tasks", {})})
    if tasks:
        lines += [
            "",
            "## Exact match by task",
            "",
            "| task | n | " + " | ".join(names) + " |",
            "|---" * (len(names) + 2) + "|",
        ]
        for t in tasks:
            per = [metrics[name].get("tasks", {}).get(t, {}) for name in names]
            n_t = next((p["n"] for p in per if "n" in p), 0)
            lines.append(f"| {t} | {n_t} | " + " | ".join(fmt(p, "exact_match") for p in per) + " |")
    if figures:
        lines += ["", "## Figures", ""] + [f"![{p.stem}]({p.name})" for p in figures]
    if samples and cfg.num_samples:
        lines += [
            "",
            "## Sample generations",
            "",
            "| # | task | prompt | reference | " + " | ".join(names) + " |",
            "|---" * (len(names) + 4) + "|",
        ]
        for s in samples[: cfg.num_samples]:
            user = next((m["content"] for m in reversed(s["prompt"]) if m.get("role") == "user"), "")
            answers = [("✓ " if s["correct"].get(n_) else "") + cell(s["predictions"].get(n_, "")) for n_ in names]
            lines.append(
                f"| {s['id']} | {cell(s['task'])} | {cell(user)} | {cell(s['reference'])} | "
                + " | ".join(answers)
                + " |"
            )
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def samples_table(samples: list[dict[str, Any]], names: list[str]) -> dict[str, list[Any]]:
    """Columns for mlflow.log_table: prompt, reference, task, then each model's answer and correctness."""
    table: dict[str, list[Any]] = {"id": [], "task": [], "prompt": [], "reference": []}
    for name in names:
        table[f"answer_{name}"], table[f"correct_{name}"] = [], []
    for s in samples:
        table["id"].append(s["id"])
        table["task"].append(s["task"])
        table["prompt"].append(next((m["content"] for m in reversed(s["prompt"]) if m.get("role") == "user"), ""))
        table["reference"].append(s["reference"])
        for name in names:
            table[f"answer_{name}"].append(s["predictions"].get(name, ""))
            table[f"correct_{name}"].append(bool(s["correct"].get(name, False)))
    return table


def _read_loss_csv(path: Path) -> dict[str, list[tuple[float, float]]]:
    series: dict[str, list[tuple[float, float]]] = {"train_loss": [], "val_loss": []}
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            for key, points in series.items():
                if row.get(key) not in (None, "") and row.get("step") not in (None, ""):
                    points.append((float(row["step"]), float(row[key])))
    return series


def write_figures(out: Path, metrics: dict[str, Any], names: list[str], plots_dir: Path | None) -> list[Path]:
    """metrics.png (task metrics with CI error bars, perplexities) and loss.png (training curves, if any)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 1]})
    width = 0.8 / max(1, len(names))
    for k, name in enumerate(names):
        m = metrics[name]
        keys = [c for c in SCORE_METRICS if c in m]
        xs = [SCORE_METRICS.index(c) + k * width for c in keys]
        vals = [m[c] for c in keys]
        err = (
            np.array([[m[c] - m[f"{c}_ci"][0], m[f"{c}_ci"][1] - m[c]] if f"{c}_ci" in m else [0, 0] for c in keys])
            .reshape(-1, 2)
            .T.clip(min=0)
        )
        ax1.bar(xs, vals, width, yerr=err if len(keys) else None, capsize=3, label=name)
        ppl = [m.get(c, float("nan")) for c in ("val_ppl", "response_ppl")]
        ax2.bar([i + k * width for i in range(2)], ppl, width, label=name)
    ax1.set_xticks([i + 0.4 - width / 2 for i in range(len(SCORE_METRICS))], SCORE_METRICS)
    ax1.set(ylim=(0, 1), title=f"task metrics ({len(names)} models, CI error bars)")
    ax1.legend()
    ax2.set_xticks([i + 0.4 - width / 2 for i in range(2)], ["val_ppl", "response_ppl"])
    ax2.set(yscale="log", title="perplexity (lower is better)")
    fig.tight_layout()
    fig.savefig(out / "metrics.png", dpi=100)
    plt.close(fig)
    csvs = [(s, p) for s in ("pretrain", "sft") if plots_dir and (p := plots_dir / f"{s}_loss.csv").is_file()]
    if csvs:
        fig, axes = plt.subplots(1, len(csvs), figsize=(5.5 * len(csvs), 4), squeeze=False)
        for ax, (stage, p) in zip(axes[0], csvs):
            for key, points in _read_loss_csv(p).items():
                if points:
                    ax.plot(*zip(*points), marker="o" if key == "val_loss" else None, label=key)
            ax.set(title=f"{stage} loss", xlabel="step", ylabel="loss")
            ax.legend()
        fig.tight_layout()
        fig.savefig(out / "loss.png", dpi=100)
        plt.close(fig)
    return [out / "metrics.png"] + ([out / "loss.png"] if csvs else [])
