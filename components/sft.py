"""Supervised fine-tuning on the chat examples (loss on assistant tokens only); full or LoRA."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import load_from_disk

from components.core.config import LoraConfig, Params, SftConfig
from components.core.context import StageContext, StageError
from components.core.io import atomic_dir, read_meta, sha256_file, write_json, write_meta
from components.core.params import config_hash
from components.pretrain import data_fingerprint, load_tokenizer, metrics_of, write_plot_csv
from components.training import distributed as dd
from components.training.checkpoint import run_key
from components.training.loop import Batch, BatchSource, PeakMemory, step_generator, train
from components.training.model import load_model, max_positions, save_model

LORA_TARGETS = {
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}

Example = tuple[np.ndarray, np.ndarray]


def load_examples(folder: Path, context: int) -> tuple[list[Example], int]:
    """(inputs, shifted targets) per example, truncated to `context`; drops (and counts) those left without labels."""
    if not (folder / "dataset_info.json").is_file():
        raise StageError(f"{folder}: not a saved dataset; run `dvc repro preprocess` first")
    ds = load_from_disk(str(folder))
    missing = {"input_ids", "labels"} - set(ds.column_names)
    if missing:
        raise StageError(f"{folder}: missing columns {sorted(missing)}; rerun `dvc repro preprocess`")
    rows, dropped = [], 0
    for i, (ids, labels) in enumerate(zip(list(ds["input_ids"]), list(ds["labels"]))):
        if len(ids) != len(labels):
            raise StageError(f"{folder}: row {i}: input_ids and labels differ in length; rerun preprocess")
        ids = np.asarray(ids[: context + 1], dtype=np.int64)
        labels = np.asarray(labels[: context + 1], dtype=np.int64)
        x, y = ids[:-1], labels[1:]
        if len(x) == 0 or not (y != -100).any():
            dropped += 1
            continue
        rows.append((x, y))
    return rows, dropped


def collate(rows: list[Example], pad_id: int) -> Batch:
    """Right-pad to the longest row: inputs with pad_id, targets with -100 (causal attention needs no mask)."""
    width = max(len(x) for x, _ in rows)
    x = np.full((len(rows), width), pad_id, dtype=np.int64)
    y = np.full((len(rows), width), -100, dtype=np.int64)
    for i, (xi, yi) in enumerate(rows):
        x[i, : len(xi)] = xi
        y[i, : len(yi)] = yi
    return torch.from_numpy(x), torch.from_numpy(y)


def example_source(rows: list[Example], batch_size: int, grad_accum: int, pad_id: int, seed: int) -> BatchSource:
    """Epoch-wise shuffled examples; the batch of (step, micro) depends only on (seed, step, micro)."""
    n = len(rows)
    perms: dict[int, np.ndarray] = {}

    def order(epoch: int) -> np.ndarray:
        if epoch not in perms:
            if len(perms) > 2:
                perms.clear()
            perms[epoch] = torch.randperm(n, generator=step_generator(seed, epoch, 0, stream=2)).numpy()
        return perms[epoch]

    def batches(step: int, micro: int) -> Batch:
        first = (step * grad_accum + micro) * batch_size
        picks = [order(p // n)[p % n] for p in range(first, first + batch_size)]
        return collate([rows[i] for i in picks], pad_id)

    return batches


def fixed_batches(rows: list[Example], batch_size: int, n_batches: int, pad_id: int) -> list[Batch]:
    rows = rows[: batch_size * n_batches]
    return [collate(rows[i : i + batch_size], pad_id) for i in range(0, len(rows), batch_size)]


def add_lora(model, cfg: LoraConfig, seed: int):
    """Wrap `model` with seeded LoRA adapters (only they are trainable)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    kind = model.config.model_type
    targets = cfg.target_modules or LORA_TARGETS.get(kind)
    if not targets:
        raise StageError(f"sft.lora.target_modules: no default for model type {kind!r}; list the module names")
    conf = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        fan_in_fan_out=kind == "gpt2",
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return get_peft_model(model, conf)
    except ValueError as e:
        raise StageError(f"sft.lora.target_modules: {e}; use module names of this {kind} model") from None


def _fingerprints(cfg: SftConfig, data_dir: Path, base_dir: Path, seed: int) -> tuple[dict, str, str]:
    stage_conf = {"seed": seed, "sft": cfg.model_dump(mode="json")}
    base_hash = config_hash([sha256_file(p) for p in sorted(Path(base_dir).glob("*.safetensors"))])
    return stage_conf, data_fingerprint(Path(data_dir)), base_hash


def checkpoint_dir(cfg: SftConfig, data_dir: Path, base_dir: Path, ckpt_root: Path, seed: int) -> Path:
    """Where this run's resumable state lives: one folder per (settings, data, base weights)."""
    stage_conf, data_hash, base_hash = _fingerprints(cfg, data_dir, base_dir, seed)
    return Path(ckpt_root) / "sft" / config_hash({"stage": stage_conf, "data": data_hash, "base": base_hash})


def sft(
    cfg: SftConfig,
    data_dir: Path,
    base_dir: Path,
    out_dir: Path,
    metrics_path: Path,
    plots_path: Path,
    ckpt_root: Path,
    *,
    seed: int,
    ctx: StageContext | None = None,
) -> dict:
    """Fine-tune the pretrain output on sft_train (validated on sft_val); write an HF model folder.

    With sft.devices > 1 this launches that many data-parallel processes (components.training.distributed);
    rank 0 writes everything."""
    ctx = ctx or StageContext()
    if cfg.devices > 1 and not dd.active():
        kwargs = dict(
            cfg=cfg,
            data_dir=data_dir,
            base_dir=base_dir,
            out_dir=out_dir,
            metrics_path=metrics_path,
            plots_path=plots_path,
            ckpt_root=ckpt_root,
            seed=seed,
        )
        return dd.launch("components.sft:sft", kwargs, devices=cfg.devices, ctx=ctx, key="sft")
    data_dir, base_dir, out_dir, ckpt_root = Path(data_dir), Path(base_dir), Path(out_dir), Path(ckpt_root)
    with PeakMemory() as mem:
        result, history, model, tokenizer, ckpt_dir, stage_conf, inputs = _sft(
            cfg, data_dir, base_dir, ckpt_root, seed, ctx
        )
    result.update(mem.report())  # the whole stage's peak (loading and saving included), max over ranks
    if dd.is_main():
        with atomic_dir(out_dir) as tmp:
            if cfg.method == "lora":
                model.save_pretrained(tmp / "adapter")
                model = model.merge_and_unload()
            save_model(model, tokenizer, tmp)
            write_meta(tmp, "sft", stage_conf, result, inputs)
        write_json(metrics_path, {**metrics_of(result), "method": cfg.method, "dropped_train": result["dropped_train"]})
        write_plot_csv(Path(plots_path), history)
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    dd.barrier()
    return {**result, "artifacts": [str(plots_path)]}


def _sft(cfg: SftConfig, data_dir: Path, base_dir: Path, ckpt_root: Path, seed: int, ctx: StageContext) -> tuple:
    base_meta = read_meta(base_dir, "pretrain")
    tokenizer = load_tokenizer(data_dir)

    def fresh():
        m = load_model(base_dir, what="paths.pretrain", tokenizer=tokenizer)
        return add_lora(m, cfg.lora, seed) if cfg.method == "lora" else m

    model = load_model(base_dir, what="paths.pretrain", tokenizer=tokenizer)
    context = int((base_meta.get("config", {}).get("model") or {}).get("context_length") or max_positions(model))
    context = min(context, max_positions(model))
    train_rows, dropped_train = load_examples(data_dir / "sft_train", context)
    val_rows, dropped_val = load_examples(data_dir / "sft_val", context)
    if not train_rows:
        raise StageError(
            f"{data_dir / 'sft_train'}: no example keeps a response token within the model's "
            f"context ({context}); raise model.context_length or shorten the prompts"
        )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    n_params = sum(p.numel() for p in model.parameters())
    if cfg.method == "lora":
        model = add_lora(model, cfg.lora, seed)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    stage_conf, data_hash, base_hash = _fingerprints(cfg, data_dir, base_dir, seed)
    ckpt_dir = ckpt_root / "sft" / config_hash({"stage": stage_conf, "data": data_hash, "base": base_hash})
    world = dd.info()[1]
    gb = cfg.batch_size * world  # the global micro-batch; each rank trains on its share
    res = train(
        model,
        cfg,
        example_source(train_rows, gb, cfg.grad_accum, pad_id, seed),
        eval_batches_fn=lambda: fixed_batches(val_rows, gb, cfg.eval_batches, pad_id),
        ckpt_dir=ckpt_dir,
        seed=seed,
        ctx=ctx,
        desc="sft",
        fingerprint={"data": data_hash, "base": base_hash},
        key="sft",
    )
    history = res.pop("history")
    full = res.pop("state_dict", None)
    if full is not None or (cfg.strategy == "fsdp" and world > 1):  # FSDP: rebuild unsharded on rank 0
        model = fresh()
        if full is not None:
            model.load_state_dict(full)
    result: dict[str, Any] = {
        **res,
        "method": cfg.method,
        "n_params": n_params,
        "trainable_params": trainable,
        "context_length": context,
        "train_examples": len(train_rows),
        "val_examples": len(val_rows),
        "dropped_train": dropped_train,
        "dropped_val": dropped_val,
        "base_pretrained": bool(base_meta.get("result", {}).get("enabled", True)),
    }
    inputs = {"processed": str(data_dir), "processed_hash": data_hash, "base": str(base_dir), "base_hash": base_hash}
    model.to("cpu")
    return result, history, model, tokenizer, ckpt_dir, stage_conf, inputs


def resume_key(params: Params) -> str | None:
    """Names a run of this stage so that a rerun after a crash continues its MLflow run (see runner)."""
    p = params.paths
    return run_key(
        lambda: checkpoint_dir(params.sft, Path(p.processed), Path(p.pretrain), Path(p.checkpoints), params.seed)
    )


def run(params: Params, ctx: StageContext) -> dict:
    p = params.paths
    return sft(
        params.sft,
        Path(p.processed),
        Path(p.pretrain),
        Path(p.sft),
        Path(p.metrics) / "sft.json",
        Path(p.plots) / "sft_loss.csv",
        Path(p.checkpoints),
        seed=params.seed,
        ctx=ctx,
    )


if __name__ == "__main__":
    from components.core.runner import main

    raise SystemExit(main("sft"))
