"""Evaluate stage: perplexities, greedy generations and task metrics (with bootstrap CIs) per model.

For each model folder: held-out perplexity on `val.bin`, response perplexity on `sft_test` (loss on
the labels only), batched greedy generation on the `sft_test` prompts, and the local `evaluate`
metrics of `components/metrics` against the references. Writes a report, every sample, figures.
"""
from __future__ import annotations

import csv
import json
import math
import os
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from components.common import (StageContext, StageError, atomic_dir, read_json, sha256_dir, write_json,
                               write_meta)
from components.config import EvaluateConfig, Params
from components.metrics.scoring import task_metrics

os.environ.setdefault("HF_HUB_OFFLINE", "1")

END = "<|end|>"
SCORE_METRICS = ("exact_match", "rougeL", "bleu", "chrf", "accuracy")
"""Task metrics shown in the report, the figure and the plots file (all in [0, 1])."""


# ---------------------------------------------------------------- models
def autocast(device: Any, enabled: bool = True) -> Any:
    """bf16 autocast where the hardware runs it natively (CUDA with bf16, CPUs with AVX-512 bf16)."""
    import torch
    if not enabled:
        return nullcontext()
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if device.type == "cpu" and getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)():
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return nullcontext()


@contextmanager
def cpu_threads(device: Any, n: int | None = None) -> Iterator[None]:
    """On CPU, run a block on `n` torch threads (default: the cores other processes leave idle, at least 1).

    Two threads contending with a busy machine run small models several times slower than one.
    """
    import torch
    before = torch.get_num_threads()
    if device.type == "cpu":
        idle = (os.cpu_count() or 1) - os.getloadavg()[0]
        torch.set_num_threads(max(1, min(before, n or int(idle + 0.5))))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def check_model_dir(name: str, path: Path) -> str:
    """StageError naming `path` unless it looks like an HF model folder; returns the fix hint for errors."""
    hint = (f"run `dvc repro {name}` (or the pipeline) first" if name in ("pretrain", "sft")
            else "point it to a model folder written by save_pretrained")
    if not path.is_dir():
        raise StageError(f"{path}: model folder of {name!r} is missing; {hint}")
    if not (path / "config.json").is_file() or not any(path.glob("*.safetensors*")):
        raise StageError(f"{path}: model folder of {name!r} is not a model (needs config.json and "
                         f"*.safetensors); {hint}")
    return hint


def load_model(name: str, path: Path, data_dir: Path, device: Any) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer) from a local HF folder; StageError naming a bad folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    hint = check_model_dir(name, path)
    tok_dir = path if any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")) \
        else data_dir / "tokenizer"
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype="float32")
        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    except Exception as e:  # noqa: BLE001 - re-raised as a user-facing error naming the folder
        raise StageError(f"{path}: cannot load model {name!r}: {type(e).__name__}: {e}; {hint}") from e
    if not tokenizer.chat_template:
        raise StageError(f"{tok_dir}: the tokenizer has no chat_template; rerun `dvc repro preprocess` and {name}")
    return model.to(device).eval(), tokenizer


def context_length(model: Any) -> int:
    cfg = model.config
    return int(getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None) or 1024)


# ---------------------------------------------------------------- perplexity
def _ce_sum(logits: Any, targets: Any) -> tuple[float, int]:
    import torch
    mask = targets != -100
    loss = torch.nn.functional.cross_entropy(logits.float()[mask], targets[mask], reduction="sum")
    return float(loss), int(mask.sum())


def val_perplexity(model: Any, tokens: np.ndarray, *, windows: int, batch_size: int, seed: int,
                   device: Any, amp: bool = True) -> dict[str, float]:
    """Loss on up to `windows` seeded, non-overlapping windows of the model's context."""
    import torch
    t = min(context_length(model), len(tokens) - 1)
    avail = (len(tokens) - 1) // t
    starts = np.sort(np.random.default_rng(seed).choice(avail, size=min(windows, avail), replace=False)) * t
    total, count = 0.0, 0
    with cpu_threads(device), torch.no_grad(), autocast(device, amp):
        for i in range(0, len(starts), batch_size):
            rows = np.stack([tokens[s:s + t + 1].astype(np.int64) for s in starts[i:i + batch_size]])
            x = torch.from_numpy(rows).to(device)
            loss, n = _ce_sum(model(input_ids=x[:, :-1]).logits.flatten(0, 1), x[:, 1:].flatten())
            total, count = total + loss, count + n
    return {"val_loss": total / count, "val_ppl": math.exp(total / count), "val_tokens": count}


def response_perplexity(model: Any, input_ids: list[list[int]], labels: list[list[int]], *,
                        batch_size: int, device: Any, amp: bool = True) -> dict[str, float]:
    """Loss on the label tokens only (assistant answers), sequences cut to the context from the left."""
    import torch
    t = context_length(model)
    pairs = sorted(((ids[-t:], lab[-t:]) for ids, lab in zip(input_ids, labels)), key=lambda p: len(p[0]))
    total, count = 0.0, 0
    with cpu_threads(device), torch.no_grad(), autocast(device, amp):
        for i in range(0, len(pairs), batch_size):
            chunk = pairs[i:i + batch_size]
            width = max(len(ids) for ids, _ in chunk)
            x = torch.zeros((len(chunk), width), dtype=torch.long)
            y = torch.full((len(chunk), width), -100, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for j, (ids, lab) in enumerate(chunk):
                x[j, :len(ids)], y[j, :len(lab)], mask[j, :len(ids)] = torch.tensor(ids), torch.tensor(lab), 1
            logits = model(input_ids=x.to(device), attention_mask=mask.to(device)).logits
            loss, n = _ce_sum(logits[:, :-1].flatten(0, 1), y[:, 1:].flatten().to(device))
            total, count = total + loss, count + n
    return {"response_loss": total / count, "response_ppl": math.exp(total / count)} if count else {}


# ---------------------------------------------------------------- generation
def stop_ids(tokenizer: Any) -> list[int]:
    vocab = tokenizer.get_vocab()
    ids = [vocab[END]] if END in vocab else []
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(int(tokenizer.eos_token_id))
    return ids


def generate(model: Any, tokenizer: Any, prompts: list[str], *, max_new_tokens: int, batch_size: int,
             device: Any, amp: bool = True, progress: bool = False) -> tuple[list[str], dict[str, float]]:
    """Greedy, batched (left padding, KV cache) answers to rendered prompts, cut at `<|end|>`/eos."""
    import torch
    from tqdm import tqdm
    from transformers import GenerationConfig
    stops = stop_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[-1]
    room = max(1, context_length(model) - max_new_tokens)
    gen_cfg = GenerationConfig(max_new_tokens=min(max_new_tokens, context_length(model) - 1), do_sample=False,
                               num_beams=1, use_cache=True, eos_token_id=stops, pad_token_id=pad)
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"][-room:] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))  # similar lengths share a batch
    out: list[str] = [""] * len(prompts)
    n_new, start = 0, time.perf_counter()
    # decoding small models is per-step overhead: 1 CPU thread is as fast, and far faster on a busy machine
    with cpu_threads(device, 1), torch.no_grad(), autocast(device, amp):
        for i in tqdm(range(0, len(order), batch_size), desc="generate", disable=not progress):
            idx = order[i:i + batch_size]
            width = max(len(encoded[j]) for j in idx)
            x = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for r, j in enumerate(idx):
                x[r, width - len(encoded[j]):], mask[r, width - len(encoded[j]):] = torch.tensor(encoded[j]), 1
            gen = model.generate(input_ids=x.to(device), attention_mask=mask.to(device), generation_config=gen_cfg)
            for r, j in enumerate(idx):
                new = gen[r, width:].tolist()
                cut = next((k for k, tid in enumerate(new) if tid in stops), None)
                n_new += len(new) if cut is None else cut + 1
                out[j] = tokenizer.decode(new[:cut], skip_special_tokens=True).strip()
    return out, {"gen_tokens": n_new, "gen_tokens_per_s": n_new / max(time.perf_counter() - start, 1e-9)}


# ---------------------------------------------------------------- outputs
def _cell(text: Any, limit: int = 160) -> str:
    text = " ".join(str(text).split())
    text = text if len(text) <= limit else text[:limit - 1] + "…"
    return text.replace("|", "\\|") or " "


def _fmt(m: dict[str, Any], key: str) -> str:
    if key not in m:
        return "–"
    ci = m.get(f"{key}_ci")
    return f"{m[key]:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{m[key]:.3f}"


def write_report(path: Path, metrics: dict[str, Any], samples: list[dict[str, Any]], names: list[str],
                 cfg: EvaluateConfig, notes: list[str]) -> None:
    n = metrics["n_examples"]
    lines = ["# seedlm evaluation", "",
             f"{n} held-out instructions (sft_test); {metrics.get('val_tokens', 0)} validation tokens. "
             f"Intervals: {cfg.confidence:.0%} percentile bootstrap over items ({cfg.bootstrap} resamples). "
             "exact_match: case-insensitive, whitespace-normalized; accuracy: yes/no items; "
             "bleu, chrf: sacrebleu corpus scores / 100.", ""]
    lines += [f"> {note}" for note in notes] + ([""] if notes else [])
    cols = ["val_ppl", "response_ppl", *SCORE_METRICS, "gen_tokens_per_s"]
    lines += ["| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name in names:
        m = metrics[name]
        cells = [f"{m[c]:.2f}" if c in m else "–" for c in cols[:2]] + [_fmt(m, c) for c in SCORE_METRICS]
        cells.append(f"{m['gen_tokens_per_s']:.0f}" if "gen_tokens_per_s" in m else "–")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    tasks = sorted({t for name in names for t in metrics[name].get("tasks", {})})
    if tasks:
        lines += ["", "## Exact match by task", "", "| task | n | " + " | ".join(names) + " |",
                  "|---" * (len(names) + 2) + "|"]
        for t in tasks:
            per = [metrics[name]["tasks"].get(t, {}) for name in names]
            lines.append(f"| {t} | {per[0].get('n', 0)} | " + " | ".join(_fmt(p, "exact_match") for p in per) + " |")
    if samples and cfg.num_samples:
        lines += ["", "## Sample generations", "", "| # | task | prompt | reference | " + " | ".join(names) + " |",
                  "|---" * (len(names) + 4) + "|"]
        for s in samples[:cfg.num_samples]:
            user = next((m["content"] for m in reversed(s["prompt"]) if m.get("role") == "user"), "")
            answers = [("✓ " if s["correct"][n_] else "") + _cell(s["predictions"][n_]) for n_ in names]
            lines.append(f"| {s['id']} | {_cell(s['task'])} | {_cell(user)} | {_cell(s['reference'])} | "
                         + " | ".join(answers) + " |")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


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
        err = np.array([[m[c] - m[f"{c}_ci"][0], m[f"{c}_ci"][1] - m[c]] if f"{c}_ci" in m else [0, 0]
                        for c in keys]).reshape(-1, 2).T.clip(min=0)
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


def load_val_tokens(data_dir: Path, vocab: int) -> np.ndarray:
    """val.bin as a memmap (dtype from preprocess's seedlm.json), checked against the model's vocabulary."""
    path, meta = data_dir / "val.bin", data_dir / "seedlm.json"
    if not path.is_file():
        raise StageError(f"{path}: missing; run `dvc repro preprocess` first")
    dtype = read_json(meta).get("result", {}).get("dtype") if meta.is_file() else None
    tokens = np.memmap(path, dtype=np.dtype(dtype or ("uint16" if vocab <= 65535 else "uint32")), mode="r")
    if len(tokens) < 2:
        raise StageError(f"{path}: fewer than 2 tokens; raise preprocess.val_fraction or add data")
    if int(tokens.max()) >= vocab:
        raise StageError(f"{path}: token id {int(tokens.max())} >= the model's vocab_size {vocab}: model and "
                         "data were built with different tokenizers; rerun preprocess, pretrain and sft")
    return tokens


def evaluate_models(cfg: EvaluateConfig, data_dir: Path, models: dict[str, Path], out_dir: Path,
                    metrics_path: Path, plots_path: Path, *, seed: int, ctx: StageContext | None = None,
                    plots_dir: Path | None = None, amp: bool = True) -> dict[str, Any]:
    """Evaluate every model in `models` (name -> HF folder) on `data_dir`; see the module docstring.

    `plots_dir` holds pretrain_loss.csv / sft_loss.csv for loss.png (default: plots_path's folder).
    """
    import torch
    ctx = ctx or StageContext()
    data_dir, out_dir, plots_path = Path(data_dir), Path(out_dir), Path(plots_path)
    plots_dir = Path(plots_dir) if plots_dir is not None else plots_path.parent
    for name, path in models.items():  # fail fast, before any heavy work
        check_model_dir(name, Path(path))
    torch.manual_seed(seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    test = load_sft_test(data_dir, cfg.max_examples, seed)
    n, notes = len(test["reference"]), []
    if n == 0:
        notes.append("sft_test is empty: response perplexity, generations and task metrics are omitted.")
    metrics: dict[str, Any] = {"n_examples": n}
    predictions, correct = {}, {}  # model -> per-item answers / exact-match flags
    for name, path in models.items():
        t0 = time.perf_counter()
        model, tok = load_model(name, Path(path), data_dir, device)
        m = val_perplexity(model, load_val_tokens(data_dir, model.config.vocab_size),
                           windows=cfg.ppl_batches * cfg.batch_size, batch_size=cfg.batch_size, seed=seed,
                           device=device, amp=amp)
        metrics["val_tokens"] = m.pop("val_tokens")
        if n:
            m.update(response_perplexity(model, test["input_ids"], test["labels"], batch_size=cfg.batch_size,
                                         device=device, amp=amp))
            prompts = [tok.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in test["prompt"]]
            predictions[name], speed = generate(model, tok, prompts, max_new_tokens=cfg.max_new_tokens,
                                                batch_size=cfg.batch_size, device=device, amp=amp,
                                                progress=ctx.progress)
            m["gen_tokens_per_s"] = speed["gen_tokens_per_s"]
            scores, correct[name] = task_metrics(predictions[name], test["reference"], test["task"],
                                                 resamples=cfg.bootstrap, confidence=cfg.confidence, seed=seed)
            m.update(scores)
        metrics[name] = m
        ctx.log({f"{name}.eval_seconds": time.perf_counter() - t0}, None)  # the runner logs the result itself
        del model
    samples = [{"id": i, "row": test["row"][i], "prompt": test["prompt"][i], "reference": test["reference"][i],
                "task": test["task"][i], "predictions": {k: predictions[k][i] for k in predictions},
                "correct": {k: correct[k][i] for k in correct}} for i in range(n)]
    names = list(models)
    plot_rows = [{"model": k, "metric": c, "value": metrics[k][c]} for k in names for c in SCORE_METRICS
                 if c in metrics[k]]
    with atomic_dir(out_dir) as tmp:
        write_report(tmp / "report.md", metrics, samples, names, cfg, notes)
        with open(tmp / "samples.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(s, ensure_ascii=False) + "\n" for s in samples)
        figures = write_figures(tmp, metrics, names, plots_dir)
        names_out = ["report.md", "samples.jsonl", *(p.name for p in figures)]
        result = {**metrics, "artifacts": [str(out_dir / p) for p in names_out]}
        inputs = {"processed": str(data_dir),
                  "models": {k: {"path": str(p), "sha256": sha256_dir(p)} for k, p in models.items()}}
        write_meta(tmp, "evaluate", {"seed": seed, "evaluate": cfg.model_dump(mode="json")}, result, inputs)
    write_json(metrics_path, metrics)
    write_json(plots_path, plot_rows)
    return result


evaluate = evaluate_models  # the stage-named alias of the component convention


def run(params: Params, ctx: StageContext) -> dict[str, Any]:
    p = params.paths
    return evaluate_models(params.evaluate, Path(p.processed), {"pretrain": Path(p.pretrain), "sft": Path(p.sft)},
                           Path(p.evaluate), Path(p.metrics) / "evaluate.json",
                           Path(p.plots) / "evaluate_metrics.json", seed=params.seed, ctx=ctx,
                           plots_dir=Path(p.plots))


if __name__ == "__main__":
    from components.runner import main
    raise SystemExit(main("evaluate"))
