"""Causal-LM pretraining on the packed token stream (train.bin / val.bin) written by preprocess.

From scratch (a model built from the `model.*` keys), or continued from `model.init_from` (a local checkpoint
or `hf:ORG/NAME[@REVISION]`) with its own tokenizer: ULMFiT's target-domain LM fine-tuning. With
`pretrain.enabled: false` the output is the fresh model, or, with init_from, the base unchanged: SFT then starts
straight from it (the control experiment). The memory plan is printed (and checked) before any weight loads."""

from __future__ import annotations

import csv
import io
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from components.core.config import ModelConfig, Params, PretrainConfig
from components.core.context import StageContext, StageError
from components.core.hub import Base, resolve
from components.core.io import atomic_dir, read_meta, write_json, write_meta, write_text
from components.core.params import config_hash
from components.training import distributed as dd
from components.training import memory
from components.training.base import check_model_keys, load_config, weight_dtype
from components.training.checkpoint import run_key
from components.training.loop import Batch, BatchSource, PeakMemory, step_generator, train
from components.training.model import build_model, device_and_precision, load_model, model_config, save_model

PLOT_COLUMNS = ("step", "train_loss", "val_loss", "lr")


def data_fingerprint(data_dir: Path, stage: str = "preprocess") -> str:
    """Hash of the processed data's metadata (config, inputs, result; not its timestamp)."""
    meta = read_meta(data_dir, stage)
    return config_hash({k: meta.get(k) for k in ("stage", "config", "inputs", "result")})


def load_tokenizer(data_dir: Path) -> PreTrainedTokenizerBase:
    """The pipeline's tokenizer (preprocess's: trained, or a base checkpoint's own), as its class loads it."""
    folder = data_dir / "tokenizer"
    if not (folder / "tokenizer.json").is_file():
        raise StageError(f"{folder}: no tokenizer.json; run `dvc repro preprocess` first")
    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def token_file(data_dir: Path, name: str, dtype: str) -> np.ndarray:
    path = data_dir / name
    if not path.is_file():
        raise StageError(f"{path}: missing; run `dvc repro preprocess` first")
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def window_batch(tokens: np.ndarray, offsets: np.ndarray, length: int) -> Batch:
    """Rows tokens[o : o+length+1] -> (inputs = w[:-1], targets = w[1:])."""
    w = np.stack([tokens[o : o + length + 1] for o in offsets]).astype(np.int64)
    t = torch.from_numpy(w)
    return t[:, :-1], t[:, 1:]


def window_source(tokens: np.ndarray, length: int, batch_size: int, seed: int) -> BatchSource:
    """Random windows; the batch of (step, micro) depends only on (seed, step, micro)."""
    high = len(tokens) - length

    def batches(step: int, micro: int) -> Batch:
        offsets = torch.randint(0, high, (batch_size,), generator=step_generator(seed, step, micro)).numpy()
        return window_batch(tokens, offsets, length)

    return batches


def val_batches(tokens: np.ndarray, length: int, batch_size: int, n_batches: int, seed: int) -> list[Batch]:
    """Fixed validation windows (shorter than `length` when val.bin is short)."""
    length = min(length, len(tokens) - 1)
    if length < 1:
        return []
    g = step_generator(seed, 0, 0, stream=1)
    return [
        window_batch(tokens, torch.randint(0, len(tokens) - length, (batch_size,), generator=g).numpy(), length)
        for _ in range(n_batches)
    ]


def write_plot_csv(path: Path, history: list[dict[str, Any]]) -> None:
    """step,train_loss,val_loss,lr (empty cells where a value was not measured), written atomically."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(PLOT_COLUMNS)
    for h in history:
        w.writerow(["" if h.get(c) is None else h[c] for c in PLOT_COLUMNS])
    write_text(path, buf.getvalue())


def metrics_of(result: dict[str, Any]) -> dict[str, Any]:
    keys = (
        "final_train_loss",
        "val_loss",
        "val_ppl",
        "tokens",
        "tokens_per_s",
        "steps",
        "n_params",
        "peak_mem_mb",
        "peak_rss_mb",
        "peak_cuda_mb",
        "seconds",
        "trainable_params",
        "enabled",
        "devices",
    )
    return {k: result[k] for k in keys if k in result}


def _stage_conf(model_cfg: ModelConfig, cfg: PretrainConfig, seed: int) -> dict[str, Any]:
    return {"seed": seed, "model": model_cfg.model_dump(mode="json"), "pretrain": cfg.model_dump(mode="json")}


def checkpoint_dir(model_cfg: ModelConfig, cfg: PretrainConfig, data_dir: Path, ckpt_root: Path, seed: int) -> Path:
    """Where this run's resumable state lives: one folder per (settings, data)."""
    stage_conf = _stage_conf(model_cfg, cfg, seed)
    return Path(ckpt_root) / "pretrain" / config_hash({"stage": stage_conf, "data": data_fingerprint(Path(data_dir))})


def pretrain(
    model_cfg: ModelConfig,
    cfg: PretrainConfig,
    data_dir: Path,
    out_dir: Path,
    metrics_path: Path,
    plots_path: Path,
    ckpt_root: Path,
    *,
    seed: int,
    ctx: StageContext | None = None,
) -> dict:
    """Pretrain (or, with enabled: false, just initialize) the model; write an HF model folder.

    With pretrain.devices > 1 this launches that many data-parallel processes (components.training.distributed);
    rank 0 writes everything."""
    ctx = ctx or StageContext()
    if cfg.enabled and cfg.devices > 1 and not dd.active():
        kwargs = dict(
            model_cfg=model_cfg,
            cfg=cfg,
            data_dir=data_dir,
            out_dir=out_dir,
            metrics_path=metrics_path,
            plots_path=plots_path,
            ckpt_root=ckpt_root,
            seed=seed,
        )
        return dd.launch("components.pretrain:pretrain", kwargs, devices=cfg.devices, ctx=ctx, key="pretrain")
    with PeakMemory() as mem:
        result, history, model, tokenizer, ckpt_dir, stage_conf, inputs = _pretrain(
            model_cfg, cfg, Path(data_dir), Path(ckpt_root), seed, ctx
        )
    result.update(mem.report())  # the whole stage's peak (loading and saving included), max over ranks
    if dd.is_main():
        with atomic_dir(out_dir) as tmp:
            save_model(model, tokenizer, tmp)
            write_meta(tmp, "pretrain", stage_conf, result, inputs)
        write_json(metrics_path, metrics_of(result))
        write_plot_csv(Path(plots_path), history)
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    dd.barrier()
    return {**result, "artifacts": [str(plots_path)]}


def starting_point(model_cfg: ModelConfig, tokenizer: Any) -> tuple[Base | None, Any]:
    """The resolved model.init_from (None: from scratch) and the transformers config of the model to train."""
    base = resolve(model_cfg.init_from)
    if base is None:
        return None, model_config(model_cfg, tokenizer)
    config = load_config(base.path)
    check_model_keys(model_cfg, config, base.spec)
    config.vocab_size = max(config.vocab_size, len(tokenizer))
    return base, config


def memory_plan(cfg: PretrainConfig, config: Any, model_cfg: ModelConfig, ctx: StageContext) -> memory.Plan | None:
    """Print the memory plan of this run; StageError (with settings that fit) when it cannot fit."""
    device, amp = device_and_precision(cfg.precision, key="pretrain.precision")
    setup = memory.Setup(
        key="pretrain",
        method="full",
        batch_size=cfg.batch_size,
        grad_accum=cfg.grad_accum,
        context=model_cfg.context_length,
        weights=weight_dtype(model_cfg.dtype, trains=True),
        autocast=amp,
        device=device.type,
        checkpointing=cfg.gradient_checkpointing,
        snapshots=cfg.checkpoint_every < cfg.max_steps,
    )
    return memory.check(config, setup, cfg.memory_gb, ctx.progress)


def _pretrain(
    model_cfg: ModelConfig, cfg: PretrainConfig, data_dir: Path, ckpt_root: Path, seed: int, ctx: StageContext
) -> tuple:
    meta = read_meta(data_dir, "preprocess")["result"]
    dtype = meta.get("dtype", "uint16")
    tokenizer = load_tokenizer(data_dir)
    T = model_cfg.context_length
    base, config = starting_point(model_cfg, tokenizer)
    plan = memory_plan(cfg, config, model_cfg, ctx) if cfg.enabled else None
    if plan is not None:
        ctx.log(plan.metrics(), None)
    weights = weight_dtype(model_cfg.dtype, trains=True) if cfg.enabled else "auto"  # not trained: kept as stored

    def fresh():
        if base is not None:
            return load_model(base.path, what="model.init_from", tokenizer=tokenizer, context_length=T, dtype=weights)
        model = build_model(model_cfg, tokenizer, seed)
        return model if weights in ("auto", torch.float32) else model.to(weights)

    model = fresh()
    n_params = sum(p.numel() for p in model.parameters())
    stage_conf = _stage_conf(model_cfg, cfg, seed)
    data_hash = data_fingerprint(data_dir)
    inputs = {"processed": str(data_dir), "processed_hash": data_hash, "init_from": model_cfg.init_from}
    if base is not None:
        inputs.update(init_from_path=str(base.path.resolve()), init_from_revision=base.revision)
    result: dict[str, Any] = {
        "enabled": cfg.enabled,
        "init_from": model_cfg.init_from,
        **({"memory_plan_gb": plan.peak / memory.GIB} if plan is not None else {}),
        "n_params": n_params,
        "arch": model.config.model_type,
        "context_length": T,
        "vocab_size": len(tokenizer),
    }
    history: list[dict[str, Any]] = []
    ckpt_dir = checkpoint_dir(model_cfg, cfg, data_dir, ckpt_root, seed)
    if cfg.enabled:
        train_tokens = token_file(data_dir, "train.bin", dtype)
        if len(train_tokens) < T + 1:
            raise StageError(
                f"{data_dir / 'train.bin'}: {len(train_tokens)} tokens, fewer than "
                f"model.context_length + 1 ({T + 1}); lower model.context_length or add text "
                "to ingest.pretrain_sources"
            )
        val_tokens = token_file(data_dir, "val.bin", dtype)
        world = dd.info()[1]
        res = train(
            model,
            cfg,
            window_source(train_tokens, T, cfg.batch_size * world, seed),
            eval_batches_fn=lambda: val_batches(val_tokens, T, cfg.batch_size * world, cfg.eval_batches, seed),
            ckpt_dir=ckpt_dir,
            seed=seed,
            ctx=ctx,
            desc="pretrain",
            fingerprint={"data": data_hash, "init_from": model_cfg.init_from, "revision": base and base.revision},
            key="pretrain",
        )
        history = res.pop("history")
        full = res.pop("state_dict", None)
        if full is not None or (cfg.strategy == "fsdp" and world > 1):  # FSDP: rebuild unsharded on rank 0
            model = fresh()
            if full is not None:
                model.load_state_dict(full)
        result.update(res)
    model.to("cpu")
    return result, history, model, tokenizer, ckpt_dir, stage_conf, inputs


def resume_key(params: Params) -> str | None:
    """Names a run of this stage so that a rerun after a crash continues its MLflow run (see runner)."""
    p = params.paths
    return run_key(
        lambda: checkpoint_dir(params.model, params.pretrain, Path(p.processed), Path(p.checkpoints), params.seed)
    )


def run(params: Params, ctx: StageContext) -> dict:
    p = params.paths
    return pretrain(
        params.model,
        params.pretrain,
        Path(p.processed),
        Path(p.pretrain),
        Path(p.metrics) / "pretrain.json",
        Path(p.plots) / "pretrain_loss.csv",
        Path(p.checkpoints),
        seed=params.seed,
        ctx=ctx,
    )


if __name__ == "__main__":
    from components.core.runner import main

    raise SystemExit(main("pretrain"))
