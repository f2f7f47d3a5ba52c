"""The control experiment: the same SFT with and without pretraining (ULMFiT's argument, measured).

Each evaluate run of the pipeline keeps its sft results in `<control_dir>/<pretrain_enabled>.json`
(`.seedlm/control/true.json`, `false.json`: outside DVC outputs, so an experiment with
`-S pretrain.enabled=false` does not overwrite the other one). When both exist, `control.md`
compares them: held-out response perplexity, exact match and ROUGE-L with their CIs, and, when both
runs scored the same items, a paired bootstrap of the difference. With `model.init_from` the question becomes
what continued pretraining on the corpus buys over SFT straight from the base, and the report says so.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from components.core.io import read_json, write_json
from components.core.params import config_hash
from components.evaluation.metrics import load_metric
from components.evaluation.scoring import paired_bootstrap

METRICS = ("response_ppl", "exact_match", "rougeL")
STATS = {"response_ppl": "response_ppl", "exact_match": "exact_match", "rougeL": "rouge"}
"""Control metric -> the per-item stats it is scored from."""


def ppl_score(stats: np.ndarray) -> dict[str, float]:
    """Response perplexity from summed [loss, tokens] item stats."""
    return {"response_ppl": math.exp(stats[0] / stats[1]) if stats[1] else float("nan")}


def score_fn(metric: str) -> Any:
    return ppl_score if metric == "response_ppl" else load_metric(STATS[metric], keep_in_memory=True).score_from_stats


def data_id(data_dir: Path) -> str:
    """Identity of the processed data (its metadata without timestamps), to pair runs on the same items."""
    meta = read_json(data_dir / "seedlm.json") if (data_dir / "seedlm.json").is_file() else {}
    return config_hash({k: meta.get(k) for k in ("stage", "config", "inputs", "result")})


def base_model(data_dir: Path) -> str | None:
    """The checkpoint the pipeline started from (`model.init_from`, as preprocess read it), or None."""
    meta = read_json(data_dir / "seedlm.json") if (data_dir / "seedlm.json").is_file() else {}
    return (meta.get("config") or {}).get("model.init_from")


def pretrain_enabled(pretrain_dir: Path, sft_dir: Path) -> bool | None:
    """Whether the evaluated sft model started from a pretrained model (None when unknown)."""
    for folder, key in ((sft_dir, "base_pretrained"), (pretrain_dir, "enabled")):
        if (folder / "seedlm.json").is_file():
            value = (read_json(folder / "seedlm.json").get("result") or {}).get(key)
            if isinstance(value, bool):
                return value
    return None


def make_record(
    enabled: bool,
    sft: dict[str, Any],
    stats: dict[str, np.ndarray],
    rows: list[int],
    data_id: str,
    run_id: str | None,
    base: str | None = None,
) -> dict[str, Any]:
    return {
        "pretrain_enabled": enabled,
        "base": base,
        "run_id": run_id,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "data": data_id,
        "rows": list(rows),
        "n_examples": len(rows),
        "metrics": {k: sft[k] for m in METRICS for k in (m, f"{m}_ci") if k in sft},
        "stats": {STATS[m]: np.asarray(stats[STATS[m]]).tolist() for m in METRICS if STATS[m] in stats},
    }


def record_path(control_dir: Path, enabled: bool) -> Path:
    return Path(control_dir) / f"{str(enabled).lower()}.json"


def load_records(control_dir: Path, current: dict[str, Any]) -> dict[bool, dict[str, Any]]:
    """The current record plus the stored one of the other setting (if any)."""
    other = record_path(control_dir, not current["pretrain_enabled"])
    out = {current["pretrain_enabled"]: current}
    if other.is_file():
        out[not current["pretrain_enabled"]] = read_json(other)
    return out


def save_record(control_dir: Path, record: dict[str, Any]) -> None:
    write_json(record_path(control_dir, record["pretrain_enabled"]), record)


def _cell(m: dict[str, Any], key: str) -> str:
    if key not in m:
        return "–"
    ci = m.get(f"{key}_ci")
    d = 2 if key == "response_ppl" else 3
    return f"{m[key]:.{d}f} [{ci[0]:.{d}f}, {ci[1]:.{d}f}]" if ci else f"{m[key]:.{d}f}"


def compare(records: dict[bool, dict[str, Any]], *, resamples: int, confidence: float, seed: int) -> dict[str, Any]:
    """Summary numbers (pretrained vs fresh) and, on the same items, paired differences."""
    on, off = records.get(True), records.get(False)
    if not (on and off):
        return {}
    mo, mf = on["metrics"], off["metrics"]
    out: dict[str, Any] = {}
    if mo.get("response_ppl") and mf.get("response_ppl"):
        out["response_ppl_ratio"] = mf["response_ppl"] / mo["response_ppl"]
    paired = on.get("data") == off.get("data") and on.get("rows") == off.get("rows")
    out["paired"] = paired
    for m in METRICS:
        key = STATS[m]
        if paired and key in on.get("stats", {}) and key in off.get("stats", {}):
            res = paired_bootstrap(
                np.asarray(on["stats"][key]),
                np.asarray(off["stats"][key]),
                score_fn(m),
                resamples=resamples,
                confidence=confidence,
                seed=seed,
            )
            out[m] = res[m]
        elif m in mo and m in mf:
            out[m] = {"diff": mo[m] - mf[m], "ci": None, "significant": None}
    return out


def labels(records: dict[bool, dict[str, Any]]) -> tuple[str, str, str, str, str]:
    """(title, description, label of enabled, of disabled, of the difference): from scratch, or from a base."""
    base = next((r.get("base") for r in records.values() if r.get("base")), None)
    if base is None:
        return (
            "what pretraining buys",
            "The same SFT on the pretrained model (`pretrain.enabled: true`) and on a freshly initialized one "
            "(`dvc exp run -S pretrain.enabled=false`)",
            "pretrained",
            "no pretraining",
            "pretrained − none",
        )
    return (
        "what continued pretraining buys",
        f"The base model is `{base}` (`model.init_from`). The same SFT after continued pretraining on the corpus "
        "(`pretrain.enabled: true`) and straight from the base, without it (`dvc exp run -S pretrain.enabled=false`: "
        "SFT straight from the base)",
        "continued pretraining",
        "SFT straight from the base",
        "continued − straight",
    )


def control_markdown(records: dict[bool, dict[str, Any]], summary: dict[str, Any], confidence: float) -> str:
    title, description, on_label, off_label, diff_label = labels(records)
    lines = [
        f"# Control experiment: {title}",
        "",
        f"{description}, evaluated on the same held-out set. Intervals: {confidence:.0%} bootstrap over items.",
        "",
    ]
    if len(records) < 2:
        (have,) = records
        lines += [
            f"Only the `pretrain.enabled: {str(have).lower()}` run is recorded so far; run "
            f"`dvc exp run -S pretrain.enabled={str(not have).lower()}` to fill in the other column.",
            "",
        ]
    cols = [(True, on_label), (False, off_label)]
    cols = [(k, label) for k, label in cols if k in records]
    diff_col = f" | {diff_label} |" if summary else " |"
    lines += [
        "| metric | " + " | ".join(label for _, label in cols) + diff_col,
        "|---" * (len(cols) + 1 + bool(summary)) + "|",
    ]
    for m in METRICS:
        row = [_cell(records[k]["metrics"], m) for k, _ in cols]
        if summary:
            d = summary.get(m) or {}
            ci = d.get("ci")
            diff = (
                "–"
                if not d
                else (
                    f"{d['diff']:+.3f}"
                    + (f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "")
                    + (" **✱**" if d.get("significant") else "")
                )
            )
            row.append(diff)
        lines.append(f"| {m} (held-out) | " + " | ".join(row) + " |")
    if "response_ppl_ratio" in summary:
        lines += [
            "",
            f"Response perplexity with {off_label.lower()} is **{summary['response_ppl_ratio']:.2f}×** "
            f"that with {on_label}.",
        ]
    if summary and not summary.get("paired"):
        lines += ["", "The two runs scored different held-out items (data changed): differences are unpaired."]
    lines += ["", "| run | pretrain.enabled | MLflow run | evaluated | items |", "|---|---|---|---|---|"]
    for k, label in cols:
        r = records[k]
        lines.append(
            f"| {label} | {str(k).lower()} | {r.get('run_id') or '–'} | {r.get('created', '–')} | "
            f"{r.get('n_examples', '–')} |"
        )
    return "\n".join(lines) + "\n"


def update(
    control_dir: Path,
    enabled: bool,
    sft: dict[str, Any],
    stats: dict[str, np.ndarray],
    rows: list[int],
    data: str,
    run_id: str | None,
    *,
    resamples: int,
    confidence: float,
    seed: int,
    base: str | None = None,
) -> tuple[dict[str, Any], str, dict[str, Any]]:
    """This run's record (saved by the caller once its outputs are written), control.md, the summary.
    `base`: the model.init_from checkpoint both settings start from (None: from scratch)."""
    record = make_record(enabled, sft, stats, rows, data, run_id, base)
    records = load_records(control_dir, record)
    summary = compare(records, resamples=resamples, confidence=confidence, seed=seed)
    return record, control_markdown(records, summary, confidence), summary
