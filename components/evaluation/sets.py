"""Your own evaluation sets (`evaluate.sets`): named JSONL files scored alongside the held-out split.

Each row is an instruction in any form ingest reads (Alpaca {instruction, input?, output}, chat {messages},
ShareGPT {conversations}); its prompt is every message but the last, its reference the last (an assistant
reply). Every model answers every prompt; the set's exact_match, ROUGE, BLEU and chrF (with bootstrap CIs)
join the model's metrics as `<set>/<metric>` (so the gate can name `mytask/exact_match`), sft is compared
with each other model by a paired bootstrap, and the report says how many items are exact duplicates of SFT
training rows (contamination) or share a training prompt.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from components.core.context import StageError
from components.core.io import read_meta, sha256_file
from components.data.clean import clean_text
from components.evaluation.report import SCORE_METRICS, fmt, fmt_diff
from components.evaluation.scoring import task_metrics


@dataclass
class EvalSet:
    name: str
    path: str
    prompts: list[list[dict]] = field(default_factory=list)
    references: list[str] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)
    sha256: str = ""
    overlap: dict[str, int] = field(default_factory=dict)


def _row(obj: Any, where: str) -> tuple[list[dict], str, str]:
    from components.data.formats import SKIP_HINT
    from components.ingest import _Malformed, _sft_row  # the one normalization of instruction rows

    try:
        if not isinstance(obj, dict):
            raise _Malformed(f"expected a JSON object, got {type(obj).__name__}")
        row = _sft_row(obj)
    except _Malformed as e:
        raise StageError(f"{where}: {str(e).replace(SKIP_HINT, '').rstrip(' ,;')}; fix the row") from None
    msgs = row["messages"]
    if msgs[-1]["role"] != "assistant" or len(msgs) < 2:
        raise StageError(f"{where}: the last message must be the assistant's reply to score, after a prompt")
    return msgs[:-1], msgs[-1]["content"], row["task"] or ""


def load_set(name: str, path: str | Path) -> EvalSet:
    """Read one set (StageError naming the file and line for anything it cannot score)."""
    path = Path(path)
    if not path.is_file():
        raise StageError(f"evaluate.sets.{name}: {path} is not a file; point it at a JSONL file of instructions")
    out = EvalSet(name, str(path), sha256=sha256_file(path))
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise StageError(f"{path}:{n}: not valid JSON ({e.msg}); fix the line") from None
            prompt, reference, task = _row(obj, f"{path}:{n}")
            out.prompts.append(prompt)
            out.references.append(reference)
            out.tasks.append(task or name)
    if not out.references:
        raise StageError(f"evaluate.sets.{name}: {path} holds no rows; add instructions or remove the set")
    return out


# ---------------------------------------------------------------- contamination
def _key(prompt: str, reference: str) -> str:
    return hashlib.blake2b(json.dumps([prompt, reference]).encode(), digest_size=16).hexdigest()


def training_keys(data_dir: Path) -> tuple[set[str], set[str], str]:
    """(prompt+reference keys, prompt keys) of the SFT train split, and preprocess's unicode normalization."""
    import datasets

    folder = Path(data_dir) / "sft_train"
    if not (folder / "dataset_info.json").is_file():
        return set(), set(), "NFKC"
    ds = datasets.load_from_disk(str(folder))
    pairs = {_key(p, r) for p, r in zip(ds["prompt"], ds["reference"])}
    prompts = set(map(_key, ds["prompt"], [""] * len(ds)))
    norm = ((read_meta(Path(data_dir), "preprocess").get("config") or {}).get("preprocess") or {}).get("normalization")
    return pairs, prompts, norm or "NFKC"


def count_overlap(s: EvalSet, pairs: set[str], prompts: set[str], normalization: str) -> dict[str, int]:
    """Items that are exact duplicates of a training row, and items whose prompt a training row has (both
    after the cleaning preprocess applies to training rows)."""
    exact = seen = 0
    for prompt, reference in zip(s.prompts, s.references):
        clean = [{"role": m["role"], "content": clean_text(m["content"], normalization)} for m in prompt]
        p = json.dumps(clean, ensure_ascii=False)
        exact += _key(p, clean_text(reference, normalization)) in pairs
        seen += _key(p, "") in prompts
    return {"exact_duplicates": exact, "prompts_in_training": seen}


def load_sets(sets: dict[str, str], data_dir: Path) -> list[EvalSet]:
    loaded = [load_set(name, path) for name, path in sets.items()]
    if loaded:
        pairs, prompts, norm = training_keys(data_dir)
        for s in loaded:
            s.overlap = count_overlap(s, pairs, prompts, norm)
    return loaded


# ---------------------------------------------------------------- scoring
def _prefixed(score: Callable, prefix: str) -> Callable:
    return lambda stats: {f"{prefix}/{k}": v for k, v in score(stats).items()}


def score_sets(
    loaded: list[EvalSet], model: Any, tok: Any, generate: Callable, *, cfg: Any, seed: int, device: Any
) -> tuple[dict[str, Any], dict[str, Any], dict[str, list[str]]]:
    """One model on every set: (metrics as `<set>/<metric>`, per-item stats for paired comparisons, answers)."""
    metrics: dict[str, Any] = {}
    stats: dict[str, Any] = {}
    answers: dict[str, list[str]] = {}
    for s in loaded:
        prompts = [tok.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in s.prompts]
        out, _ = generate(
            model, tok, prompts, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, device=device
        )
        keep: dict[str, Any] = {}
        scores, _ = task_metrics(
            out, s.references, s.tasks, resamples=cfg.bootstrap, confidence=cfg.confidence, seed=seed, keep_stats=keep
        )
        metrics.update({f"{s.name}/{k}": v for k, v in scores.items() if k != "tasks"})
        stats.update({f"{s.name}/{m}": (st, _prefixed(fn, s.name)) for m, (st, fn) in keep.items()})
        answers[s.name] = out
    return metrics, stats, answers


def compared_keys(loaded: list[EvalSet]) -> tuple[str, ...]:
    return tuple(f"{s.name}/{k}" for s in loaded for k in SCORE_METRICS)


def summary(loaded: list[EvalSet]) -> dict[str, Any]:
    """metrics.json's `sets` section: each set's file, hash, size and overlap with the training data."""
    return {s.name: {"path": s.path, "sha256": s.sha256, "n": len(s.references), **s.overlap} for s in loaded}


def samples(loaded: list[EvalSet], answers: dict[str, dict[str, list[str]]]) -> list[dict[str, Any]]:
    """Every item of every set with each model's answer (sets_samples.jsonl)."""
    return [
        {
            "set": s.name,
            "id": i,
            "prompt": s.prompts[i],
            "reference": s.references[i],
            "task": s.tasks[i],
            "predictions": {m: a[s.name][i] for m, a in answers.items()},
        }
        for s in loaded
        for i in range(len(s.references))
    ]


def report_lines(loaded: list[EvalSet], metrics: dict[str, Any], names: list[str], confidence: float) -> list[str]:
    """The report's section: per set, its overlap with training, a table of models, and sft's differences."""
    if not loaded:
        return []
    lines = ["", "## Your evaluation sets", ""]
    for s in loaded:
        o = s.overlap
        lines += [f"### {s.name} ({len(s.references)} items, `{s.path}`)", ""]
        if o.get("exact_duplicates") or o.get("prompts_in_training"):
            lines += [
                f"> ⚠ Overlap with the SFT training data: {o['exact_duplicates']} item(s) are exact duplicates of "
                f"training rows and {o['prompts_in_training']} share a training prompt: these scores partly "
                "measure memorization.",
                "",
            ]
        else:
            lines += ["No item is a duplicate of a training row or shares a training prompt.", ""]
        cols = [f"{s.name}/{k}" for k in SCORE_METRICS if any(f"{s.name}/{k}" in metrics[n] for n in names)]
        lines += ["| model | " + " | ".join(c.split("/", 1)[1] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
        lines += [f"| {n} | " + " | ".join(fmt(metrics[n], c) for c in cols) + " |" for n in names]
        for pair, diffs in (metrics.get("compare") or {}).items():
            if any(c in diffs for c in cols):
                row = " | ".join(fmt_diff(diffs.get(c)) for c in cols)
                lines.append(f"| {pair.replace('_vs_', ' − ')} ({confidence:.0%} CI) | {row} |")
        lines.append("")
    return lines
