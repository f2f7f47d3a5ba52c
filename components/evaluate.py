"""Evaluate stage: perplexities, greedy generations and task metrics (with bootstrap CIs) per model.

Models: pretrain-only, sft, the registry's current champion (`evaluate.champion`) and any in
`evaluate.models`, all on the same held-out sets. For each: perplexity on `val.bin`, response
perplexity on `sft_test` (loss on the labels only), batched greedy generation on the `sft_test`
prompts and the local `evaluate` metrics of `components/evaluation/metrics`. sft is compared with every other
model by a paired bootstrap (significant = the CI of the difference excludes 0). Writes a report
with figures, every sample (also as an MLflow table), and the control-experiment table. Another
model, outside the pipeline (into `--out`, not a DVC output):
    python -m components.evaluate --model models:/seedlm@champion --model mine=/path/to/hf_folder
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from components.core.config import EvaluateConfig, Params
from components.core.context import StageContext, StageError
from components.core.io import atomic_dir, read_json, sha256_dir, write_json, write_meta
from components.data.chat import encode_chat
from components.evaluation import control, cutoff, cutoff_report
from components.evaluation import sets as evalsets
from components.evaluation.control import ppl_score
from components.evaluation.perplexity import (
    cpu_threads,
    load_val_tokens,
    response_perplexity,
    val_perplexity,
)
from components.evaluation.report import COMPARED, SCORE_METRICS, samples_table, write_figures, write_report
from components.evaluation.scoring import bootstrap_ci, compare_models, task_metrics
from components.registry.models import alias_version, is_uri, parse_model_args, resolve_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def tokenizer_model(tok: Any) -> Any:
    return json.loads(tok.backend_tokenizer.to_str())["model"] if hasattr(tok, "backend_tokenizer") else None


def encode_items(tok: Any, prompts: list[list[dict]], references: list[str]) -> tuple[list, list]:
    """(input_ids, labels) of prompt + reference in a model's own tokenizer and chat template (labels: the answer
    and the template's end-of-turn marker, as SFT trains them: chat.encode_chat)."""
    ids, labels = [], []
    for prompt, ref in zip(prompts, references):
        i, lab = encode_chat(tok, [*prompt, {"role": "assistant", "content": ref}])
        ids.append(i)
        labels.append(lab)
    return ids, labels


# ---------------------------------------------------------------- models
def check_model_dir(name: str, path: Path) -> str:
    """StageError naming `path` unless it looks like an HF model folder; returns the fix hint for errors."""
    hint = (
        f"run `dvc repro {name}` (or the pipeline) first"
        if name in ("pretrain", "sft")
        else "point it to a model folder written by save_pretrained"
    )
    if not path.is_dir():
        raise StageError(f"{path}: model folder of {name!r} is missing; {hint}")
    if not (path / "config.json").is_file() or not any(path.glob("*.safetensors*")):
        raise StageError(
            f"{path}: model folder of {name!r} is not a model (needs config.json and *.safetensors); {hint}"
        )
    return hint


def load_model(name: str, path: Path, data_dir: Path, device: Any) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer) from a local HF folder (the tokenizer from preprocess when the folder
    has none); StageError naming a bad folder."""
    from transformers import AutoTokenizer

    from components.training import model as models

    hint = check_model_dir(name, path)
    tok_dir = (
        path
        if any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
        else data_dir / "tokenizer"
    )
    model = models.load_model(path, what=f"model {name!r}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    except (OSError, ValueError) as e:
        raise StageError(f"{tok_dir}: cannot load the tokenizer of model {name!r}: {e}; {hint}") from None
    if not tokenizer.chat_template:
        raise StageError(f"{tok_dir}: the tokenizer has no chat_template; rerun `dvc repro preprocess` and {name}")
    return model.to(device).eval(), tokenizer


# ---------------------------------------------------------------- generation
def generate(
    model: Any, tokenizer: Any, prompts: list[str], *, max_new_tokens: int, batch_size: int, device: Any
) -> tuple[list[str], dict[str, float]]:
    """Greedy, batched answers to rendered prompts through the serving engine (the one generation code path),
    cut at `<|end|>`/eos. fp32 on one CPU thread: decoding a small model is per-step overhead, and bf16 autocast
    only slows it down."""
    import torch

    from components.serving.engine import generate_texts

    with cpu_threads(device, 1), torch.no_grad():
        return generate_texts(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)


# ---------------------------------------------------------------- the stage
def load_sft_test(data_dir: Path, max_examples: int | None, seed: int) -> dict[str, list[Any]]:
    import datasets

    folder = data_dir / "sft_test"
    if not folder.is_dir():
        raise StageError(f"{folder}: missing; run `dvc repro preprocess` first")
    state = folder / "state.json"
    if state.is_file() and not read_json(state).get("_data_files", True):  # 0 rows: load_from_disk fails
        return {c: [] for c in ("input_ids", "labels", "prompt", "reference", "task", "row")}
    ds = datasets.load_from_disk(str(folder))
    missing = {"input_ids", "labels", "prompt", "reference"} - set(ds.column_names)
    if missing:
        raise StageError(f"{folder}: columns {sorted(missing)} missing; rerun `dvc repro preprocess`")
    rows = list(range(len(ds)))
    if max_examples is not None and max_examples < len(ds):
        rows = sorted(np.random.default_rng(seed).choice(len(ds), size=max_examples, replace=False).tolist())
        ds = ds.select(rows)
    cols = {c: list(ds[c]) for c in ("input_ids", "labels", "prompt", "reference")}
    cols["task"] = [t or "" for t in ds["task"]] if "task" in ds.column_names else [""] * len(ds)
    cols["prompt"] = [json.loads(p) if isinstance(p, str) else p for p in cols["prompt"]]
    cols["row"] = rows
    return cols


def evaluate_models(
    cfg: EvaluateConfig,
    data_dir: Path,
    models: dict[str, str | Path],
    out_dir: Path,
    metrics_path: Path,
    plots_path: Path,
    *,
    seed: int,
    ctx: StageContext | None = None,
    plots_dir: Path | None = None,
    amp: bool = True,
    notes: list[str] | None = None,
    control_dir: Path | None = None,
    pretrain_enabled: bool | None = None,
    index_dir: Path | None = None,
) -> dict[str, Any]:
    """Evaluate every model in `models` (name -> HF folder or MLflow model URI) on `data_dir`.
    `plots_dir` holds pretrain_loss.csv / sft_loss.csv for loss.png (default: plots_path's folder).
    With `control_dir` and `pretrain_enabled`, sft's results join the control-experiment history.
    With `index_dir` (holding knowledge-cutoff questions), sft also answers them without and with retrieval."""
    for name, ref in models.items():  # fail fast, before any heavy work (downloads included)
        if not is_uri(ref):
            check_model_dir(name, Path(ref))
    with tempfile.TemporaryDirectory(prefix="seedlm-evaluate-") as tmp_models:
        folders = {name: resolve_model(ref, Path(tmp_models) / name) for name, ref in models.items()}
        return _evaluate(
            cfg,
            Path(data_dir),
            folders,
            {k: str(v) for k, v in models.items()},
            Path(out_dir),
            Path(metrics_path),
            Path(plots_path),
            seed=seed,
            ctx=ctx or StageContext(),
            plots_dir=Path(plots_dir) if plots_dir is not None else Path(plots_path).parent,
            amp=amp,
            notes=list(notes or []),
            control_dir=control_dir,
            pretrain_enabled=pretrain_enabled,
            index_dir=index_dir,
        )


def score_model(
    cfg: EvaluateConfig,
    model: Any,
    tok: Any,
    test: dict[str, list],
    val: np.ndarray | None,
    *,
    seed: int,
    device: Any,
    amp: bool,
    progress: bool,
) -> tuple[dict, list[str], list[bool], dict]:
    """Metrics, answers, exact-match flags, per-item stats (module -> (stats, score)) of one model.
    `val` None: the model has its own tokenizer (no val_ppl; items re-encoded; ppl not paired)."""
    m: dict[str, Any] = {}
    if val is not None:
        m = val_perplexity(
            model,
            val,
            windows=cfg.ppl_batches * cfg.batch_size,
            batch_size=cfg.batch_size,
            seed=seed,
            device=device,
            amp=amp,
        )
    if not test["reference"]:
        return m, [], [], {}
    ids, labels = (
        (test["input_ids"], test["labels"]) if val is not None else encode_items(tok, test["prompt"], test["reference"])
    )
    ppl, ppl_stats = response_perplexity(model, ids, labels, batch_size=cfg.batch_size, device=device, amp=amp)
    boot = {"resamples": cfg.bootstrap, "confidence": cfg.confidence, "seed": seed}
    m.update({**ppl, **{f"{k}_ci": v for k, v in bootstrap_ci(ppl_stats, ppl_score, **boot).items()}})
    prompts = [tok.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in test["prompt"]]
    answers, speed = generate(
        model,
        tok,
        prompts,
        max_new_tokens=cfg.max_new_tokens,
        batch_size=cfg.batch_size,
        device=device,
    )
    m["gen_tokens_per_s"] = speed["gen_tokens_per_s"]
    keep: dict[str, Any] = {"response_ppl": (ppl_stats, ppl_score)} if val is not None else {}
    scores, correct = task_metrics(answers, test["reference"], test["task"], keep_stats=keep, **boot)
    return {**m, **scores}, answers, correct, keep


def _evaluate(
    cfg: EvaluateConfig,
    data_dir: Path,
    models: dict[str, Path],
    sources: dict[str, str],
    out_dir: Path,
    metrics_path: Path,
    plots_path: Path,
    *,
    seed: int,
    ctx: StageContext,
    plots_dir: Path,
    amp: bool,
    notes: list[str],
    control_dir: Path | None,
    pretrain_enabled: bool | None,
    index_dir: Path | None,
) -> dict[str, Any]:
    import torch
    from transformers import AutoTokenizer

    for name, path in models.items():
        check_model_dir(name, Path(path))
    torch.manual_seed(seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    test = load_sft_test(data_dir, cfg.max_examples, seed)
    pipeline_tok = (
        tokenizer_model(AutoTokenizer.from_pretrained(str(data_dir / "tokenizer")))
        if (data_dir / "tokenizer").is_dir()
        else None
    )
    n = len(test["reference"])
    if n == 0:
        notes.append("sft_test is empty: response perplexity, generations and task metrics are omitted.")
    metrics: dict[str, Any] = {"n_examples": n}
    predictions, correct, item_stats = {}, {}, {}  # model -> per-item answers / exact-match flags / stats
    questions, rag_samples = cutoff.load_questions(Path(index_dir)) if index_dir else [], []
    own_sets, set_answers = evalsets.load_sets(cfg.sets, data_dir), {}  # evaluate.sets: your own JSONL files
    for name, path in models.items():
        t0 = time.perf_counter()
        model, tok = load_model(name, Path(path), data_dir, device)
        own = pipeline_tok is not None and tokenizer_model(tok) != pipeline_tok
        if own:
            notes.append(
                f"{name} has its own tokenizer: no val_ppl (val.bin holds the pipeline's tokens); its "
                "response_ppl counts its own tokens and is not compared."
            )
        val = None if own else load_val_tokens(data_dir, model.config.vocab_size)
        m, answers, flags, item_stats[name] = score_model(
            cfg, model, tok, test, val, seed=seed, device=device, amp=amp, progress=ctx.progress
        )
        if own_sets:
            sm, sstats, set_answers[name] = evalsets.score_sets(
                own_sets, model, tok, generate, cfg=cfg, seed=seed, device=device
            )
            m.update(sm)
            item_stats[name].update(sstats)
        metrics["val_tokens"], metrics[name] = m.pop("val_tokens", metrics.get("val_tokens", 0)), m
        if n:
            predictions[name], correct[name] = answers, flags
        if name == "sft" and questions:  # the knowledge-cutoff experiment (components/evaluation/cutoff.py)
            metrics["retrieval"], rag_samples = cutoff.evaluate(
                cfg, model, tok, questions, Path(index_dir), device=device, seed=seed, generate=generate
            )
        ctx.log({f"{name}.eval_seconds": time.perf_counter() - t0}, None)  # the runner logs the result itself
        del model
    names = list(models)
    metrics["compare"] = compare_models(
        names,
        item_stats,
        keys=(*COMPARED, *evalsets.compared_keys(own_sets)),
        resamples=cfg.bootstrap,
        confidence=cfg.confidence,
        seed=seed,
    )
    metrics["sources"] = sources
    metrics.update({"sets": evalsets.summary(own_sets)} if own_sets else {})
    samples = [
        {
            "id": i,
            "row": test["row"][i],
            "prompt": test["prompt"][i],
            "reference": test["reference"][i],
            "task": test["task"][i],
            "predictions": {k: predictions[k][i] for k in predictions},
            "correct": {k: correct[k][i] for k in correct},
        }
        for i in range(n)
    ]
    plot_rows = [
        {"model": k, "metric": c, "value": metrics[k][c]} for k in names for c in SCORE_METRICS if c in metrics[k]
    ]
    record, control_md = None, ""
    if control_dir is not None and pretrain_enabled is not None and "response_ppl" in metrics.get("sft", {}):
        record, control_md, summary = control.update(
            Path(control_dir),
            pretrain_enabled,
            metrics["sft"],
            {k: v[0] for k, v in item_stats["sft"].items()},
            test["row"],
            control.data_id(data_dir),
            ctx.run_id,
            resamples=cfg.bootstrap,
            confidence=cfg.confidence,
            seed=seed,
            base=control.base_model(data_dir),
        )
        metrics.update({"control": summary} if summary else {})
    with atomic_dir(out_dir) as tmp:
        figures = write_figures(tmp, metrics, names, plots_dir)
        rag = []
        if "retrieval" in metrics:  # only with an index holding knowledge-cutoff questions
            rag = cutoff_report.lines(metrics["retrieval"], cfg.confidence, cfg.num_samples // 2, rag_samples)
        extra = rag + evalsets.report_lines(own_sets, metrics, names, cfg.confidence)
        write_report(tmp / "report.md", metrics, samples, names, cfg, notes, figures, extra)
        with open(tmp / "samples.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(s, ensure_ascii=False) + "\n" for s in samples)
        write_json(tmp / "samples_table.json", samples_table(samples, names))
        names_out = ["report.md", "samples.jsonl", *(p.name for p in figures)]
        if own_sets:
            with open(tmp / "sets_samples.jsonl", "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in evalsets.samples(own_sets, set_answers))
            names_out.append("sets_samples.jsonl")
        if record is not None:
            (tmp / "control.md").write_text(control_md, encoding="utf-8")
            names_out.append("control.md")
        tables = ["samples_table.json", *(cutoff_report.write(tmp, rag_samples) if rag_samples else [])]
        result = {
            **metrics,
            "artifacts": [str(out_dir / p) for p in names_out],
            "tables": [str(out_dir / p) for p in tables if p.endswith(".json")],
        }
        inputs = {
            "processed": str(data_dir),
            **({"index": str(index_dir)} if rag_samples else {}),
            "models": {k: {"path": sources[k], "sha256": sha256_dir(p)} for k, p in models.items()},
        }
        write_meta(tmp, "evaluate", {"seed": seed, "evaluate": cfg.model_dump(mode="json")}, result, inputs)
    write_json(metrics_path, metrics)
    write_json(plots_path, plot_rows)
    if record is not None:
        control.save_record(Path(control_dir), record)
    return result


evaluate = evaluate_models  # the stage-named alias of the component convention

EXTERNAL: dict[str, Any] = {}
"""Set from the command line (`--model [NAME=]REF`, `--out DIR`): evaluate only those models, into DIR."""


def run(params: Params, ctx: StageContext) -> dict[str, Any]:
    p, cfg = params.paths, params.evaluate
    if EXTERNAL:  # `python -m components.evaluate --model REF`: not the pipeline's models, outside DVC outs
        out = Path(EXTERNAL["out"])
        return evaluate_models(
            cfg,
            Path(p.processed),
            dict(EXTERNAL["models"]),
            out,
            out / "metrics.json",
            out / "plots.json",
            seed=params.seed,
            ctx=ctx,
        )
    models: dict[str, str | Path] = {"pretrain": Path(p.pretrain), "sft": Path(p.sft)}
    notes = []
    if cfg.champion:
        name = params.register.model_name
        version = alias_version(name, "champion")
        if version:
            models["champion"] = f"models:/{name}/{version}"
        else:
            notes.append(f"No champion of {name!r} in the registry yet: nothing to compare against.")
    models.update(cfg.models)
    return evaluate_models(
        cfg,
        Path(p.processed),
        models,
        Path(p.evaluate),
        Path(p.metrics) / "evaluate.json",
        Path(p.plots) / "evaluate_metrics.json",
        seed=params.seed,
        ctx=ctx,
        plots_dir=Path(p.plots),
        notes=notes,
        control_dir=Path(p.checkpoints).parent / "control",
        pretrain_enabled=control.pretrain_enabled(Path(p.pretrain), Path(p.sft)),
        index_dir=Path(p.index),
    )


def main(argv: list[str] | None = None, *, prog: str = "python -m components.evaluate", example: str = "") -> int:
    """The evaluate stage; with `--model [NAME=]REF ... [--out DIR]`, those models instead (outside DVC)."""
    import components.evaluate as stage  # the module instance the runner imports (not __main__)
    from components.core.runner import main as stage_main

    models, out, rest = parse_model_args(sys.argv[1:] if argv is None else list(argv))
    stage.EXTERNAL.clear()
    stage.EXTERNAL.update({"models": models, "out": out} if models else {})
    return stage_main("evaluate", rest, prog=prog, example=example)


if __name__ == "__main__":
    from components.evaluate import main

    raise SystemExit(main())
