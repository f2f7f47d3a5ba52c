"""Supervised fine-tuning on the chat examples (loss on assistant tokens only); full, LoRA/DoRA or QLoRA.

Before any weight loads, the memory plan (components/training/memory.py) estimates the run's peak against the
device and stops a run that cannot fit, naming settings that would."""

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
from components.training import lora, memory, packing
from components.training.base import is_quantized, load_config, quantization_config, weight_dtype
from components.training.checkpoint import run_key
from components.training.loop import Batch, BatchSource, PeakMemory, step_generator, train
from components.training.model import device_and_precision, load_model, save_model

LORA_TARGETS = lora.SEEDLM_TARGETS

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


def example_source(
    rows: list[Any], batch_size: int, grad_accum: int, pad_id: int, seed: int, collate_fn: Any = None
) -> BatchSource:
    """Epoch-wise shuffled examples (or packed rows, with packing.collate); the batch of (step, micro) depends
    only on (seed, step, micro)."""
    collate_fn = collate_fn or collate
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
        return collate_fn([rows[i] for i in picks], pad_id)

    return batches


def train_source(cfg: SftConfig, rows: list[Example], context: int, batch_size: int, pad_id: int, seed: int):
    """The training batches: examples, or with sft.packing rows of several examples each (validation stays
    unpacked, so val_loss compares across the setting)."""
    if cfg.packing:
        return example_source(packing.pack(rows, context), batch_size, cfg.grad_accum, pad_id, seed, packing.collate)
    return example_source(rows, batch_size, cfg.grad_accum, pad_id, seed)


def fixed_batches(rows: list[Example], batch_size: int, n_batches: int, pad_id: int) -> list[Batch]:
    rows = rows[: batch_size * n_batches]
    return [collate(rows[i : i + batch_size], pad_id) for i in range(0, len(rows), batch_size)]


def add_lora(model, cfg: LoraConfig, seed: int, new_tokens: list[int] | tuple[int, ...] = ()):
    """Wrap `model` with seeded LoRA/DoRA adapters (only they, and the rows of `new_tokens`, are trainable)."""
    return lora.add_lora(model, cfg, seed, new_tokens=new_tokens)


def new_token_ids(data_dir: Path, tokenizer: Any) -> list[int]:
    """Ids of the tokens preprocess added to a base checkpoint's tokenizer (seedlm's chat tokens, for a base
    without a chat template): their rows start untrained, so LoRA trains them too."""
    report = (read_meta(data_dir, "preprocess").get("result") or {}).get("report") or {}
    tok = report.get("tokenizer") or {}
    n = int(tok.get("tokens_added") or 0) if tok.get("trained") is False else 0
    return list(range(len(tokenizer) - n, len(tokenizer)))


def load_base(cfg: SftConfig, base_dir: Path, tokenizer: Any, model_dtype: str, seed: int, new_tokens: list[int]):
    """The model to fine-tune: the base in `model.dtype` (or 4/8-bit for QLoRA), with adapters for LoRA."""
    amp = device_and_precision(cfg.precision, key="sft.precision")[1]
    dtype = weight_dtype(model_dtype, trains=cfg.method == "full", autocast=amp)
    quant = quantization_config(cfg.quantization, dtype)
    model = load_model(base_dir, what="paths.pretrain", tokenizer=tokenizer, dtype=dtype, quantization=quant)
    if quant is not None:
        model = lora.prepare_quantized(model, cfg.gradient_checkpointing)
    return add_lora(model, cfg.lora, seed, new_tokens) if cfg.method == "lora" else model


def base_context(base_dir: Path, config: Any) -> int:
    """Training context: the pretrain stage's model.context_length, within the base's position limit."""
    meta = read_meta(base_dir, "pretrain")
    limit = int(getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 1024)
    return min(int((meta.get("config", {}).get("model") or {}).get("context_length") or limit), limit)


def memory_plan(
    cfg: SftConfig, config: Any, tokenizer: Any, model_dtype: str, context: int, new_tokens: list[int], ctx
) -> memory.Plan | None:
    """Print the memory plan of this run; StageError (with settings that fit) when it cannot fit."""
    device, amp = device_and_precision(cfg.precision, key="sft.precision")
    config.vocab_size = max(config.vocab_size, len(tokenizer))
    setup = memory.Setup(
        key="sft",
        method=cfg.method,
        batch_size=cfg.batch_size,
        grad_accum=cfg.grad_accum,
        context=context,
        weights=weight_dtype(model_dtype, trains=cfg.method == "full", autocast=amp),
        autocast=amp,
        device=device.type,
        quantization=cfg.quantization,
        checkpointing=cfg.gradient_checkpointing,
        lora=cfg.lora if cfg.method == "lora" else None,
        new_tokens=len(new_tokens),
        snapshots=cfg.checkpoint_every < cfg.max_steps,
    )
    return memory.check(config, setup, cfg.memory_gb, ctx.progress)


def merged(model: Any, base_dir: Path, tokenizer: Any, adapter_dir: Path) -> Any:
    """The fine-tuned model: the saved adapters merged into the base as stored (its own dtype, unquantized), so the
    result is exact whatever dtype or quantization training loaded the base in."""
    from peft import PeftModel

    if not is_quantized(model) and next(model.parameters()).dtype == torch.float32:
        return model.merge_and_unload()
    base = load_model(base_dir, what="paths.pretrain", tokenizer=tokenizer, dtype="auto")
    return PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()


def _fingerprints(
    cfg: SftConfig, data_dir: Path, base_dir: Path, seed: int, model_dtype: str = "auto"
) -> tuple[dict, str, str]:
    stage_conf = {"seed": seed, "sft": cfg.model_dump(mode="json"), "model.dtype": model_dtype}
    base_hash = config_hash([sha256_file(p) for p in sorted(Path(base_dir).glob("*.safetensors"))])
    return stage_conf, data_fingerprint(Path(data_dir)), base_hash


def checkpoint_dir(
    cfg: SftConfig, data_dir: Path, base_dir: Path, ckpt_root: Path, seed: int, model_dtype: str = "auto"
) -> Path:
    """Where this run's resumable state lives: one folder per (settings, data, base weights)."""
    stage_conf, data_hash, base_hash = _fingerprints(cfg, data_dir, base_dir, seed, model_dtype)
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
    model_dtype: str = "auto",
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
            model_dtype=model_dtype,
        )
        return dd.launch("components.sft:sft", kwargs, devices=cfg.devices, ctx=ctx, key="sft")
    data_dir, base_dir, out_dir, ckpt_root = Path(data_dir), Path(base_dir), Path(out_dir), Path(ckpt_root)
    with PeakMemory() as mem:
        result, history, model, tokenizer, ckpt_dir, stage_conf, inputs = _sft(
            cfg, data_dir, base_dir, ckpt_root, seed, ctx, model_dtype
        )
    result.update(mem.report())  # the whole stage's peak (loading and saving included), max over ranks
    if dd.is_main():
        with atomic_dir(out_dir) as tmp:
            if cfg.method == "lora":
                model.save_pretrained(tmp / "adapter")
                model = merged(model, base_dir, tokenizer, tmp / "adapter")
            save_model(model, tokenizer, tmp)
            write_meta(tmp, "sft", stage_conf, result, inputs)
        write_json(metrics_path, {**metrics_of(result), "method": cfg.method, "dropped_train": result["dropped_train"]})
        write_plot_csv(Path(plots_path), history)
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    dd.barrier()
    return {**result, "artifacts": [str(plots_path)]}


def _sft(
    cfg: SftConfig, data_dir: Path, base_dir: Path, ckpt_root: Path, seed: int, ctx: StageContext, model_dtype: str
) -> tuple:
    base_meta = read_meta(base_dir, "pretrain")
    quantization_config(cfg.quantization, torch.bfloat16)  # CUDA and bitsandbytes, or a clear error, at once
    tokenizer = load_tokenizer(data_dir)
    new_tokens = new_token_ids(data_dir, tokenizer)
    config = load_config(base_dir, what="paths.pretrain")
    context = base_context(base_dir, config)
    plan = memory_plan(cfg, config, tokenizer, model_dtype, context, new_tokens, ctx)
    if plan is not None:
        ctx.log(plan.metrics(), None)

    def fresh():
        return load_base(cfg, base_dir, tokenizer, model_dtype, seed, new_tokens)

    train_rows, dropped_train = load_examples(data_dir / "sft_train", context)
    val_rows, dropped_val = load_examples(data_dir / "sft_val", context)
    if not train_rows:
        raise StageError(
            f"{data_dir / 'sft_train'}: no example keeps a response token within the model's "
            f"context ({context}); raise model.context_length or shorten the prompts"
        )
    model = fresh()
    n_params = sum(p.numel() for n, p in model.named_parameters() if not lora.is_adapter(n))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    stage_conf, data_hash, base_hash = _fingerprints(cfg, data_dir, base_dir, seed, model_dtype)
    ckpt_dir = ckpt_root / "sft" / config_hash({"stage": stage_conf, "data": data_hash, "base": base_hash})
    world = dd.info()[1]
    gb = cfg.batch_size * world  # the global micro-batch; each rank trains on its share
    res = train(
        model,
        cfg,
        train_source(cfg, train_rows, context, gb, pad_id, seed),
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
        "quantization": cfg.quantization,
        "new_tokens_trained": len(new_tokens) if cfg.method == "lora" else 0,
        "memory_plan_gb": plan.peak / memory.GIB if plan is not None else None,
    }
    inputs = {"processed": str(data_dir), "processed_hash": data_hash, "base": str(base_dir), "base_hash": base_hash}
    if not is_quantized(model):
        model.to("cpu")
    return result, history, model, tokenizer, ckpt_dir, stage_conf, inputs


def resume_key(params: Params) -> str | None:
    """Names a run of this stage so that a rerun after a crash continues its MLflow run (see runner)."""
    p = params.paths
    return run_key(
        lambda: checkpoint_dir(
            params.sft, Path(p.processed), Path(p.pretrain), Path(p.checkpoints), params.seed, params.model.dtype
        )
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
        model_dtype=params.model.dtype,
    )


if __name__ == "__main__":
    from components.core.runner import main

    raise SystemExit(main("sft"))
