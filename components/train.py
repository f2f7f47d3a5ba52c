"""One lean, resumable training loop shared by pretrain and sft.

Batches are a pure function of (seed, step, micro-step), so a resumed run reproduces the exact data
stream without replay; checkpoints hold the trainable weights (safetensors), the optimizer, scheduler
and RNG states (torch.save, read back with weights_only=True), and the loss history so far.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import psutil
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from components.common import StageContext, StageError
from components.config import TrainConfig, config_hash
from components.model import device_and_precision

log = logging.getLogger("seedlm.train")

Batch = tuple[torch.Tensor, torch.Tensor]
"""(input_ids [B, T], targets [B, T]): targets are already shifted (target t = token t+1), -100 = ignored."""
BatchSource = Callable[[int, int], Batch]
"""(optimizer step, micro-step) -> Batch; must be a pure function of those (and the seed it was built with)."""
TrainResult = dict[str, Any]


def step_generator(seed: int, step: int, micro: int = 0, *, stream: int = 0) -> torch.Generator:
    """A CPU generator seeded from (seed, stream, step, micro): the randomness of one micro-batch.

    stream separates independent uses (0: training batches, 1: validation, 2: epoch orders)."""
    mixed = np.random.SeedSequence([seed, stream, step, micro]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed((int(mixed[0]) << 31) ^ int(mixed[1]))


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio (as a multiple of cfg.lr)."""
    if step < cfg.warmup_steps:
        return (step + 1) / (cfg.warmup_steps + 1)
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    extra = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), **extra)


def token_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy over the non-ignored targets (fp32)."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction=reduction)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def evaluate_loss(model, batches: Iterable[Batch], device: torch.device, dtype: torch.dtype | None) -> float | None:
    """Token-weighted mean loss over fixed batches (eval mode, no grad); None when there is nothing to score."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.int64, device=device)
    with torch.no_grad():
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            with _autocast(device, dtype):
                logits = model(input_ids=x, use_cache=False).logits
            total += token_loss(logits, y, "sum").double()
            count += (y != -100).sum()
    model.train(was_training)
    n = int(count.item())
    return float(total.item() / n) if n else None


def _ppl(loss: float | None) -> float | None:
    if loss is None:
        return None
    return math.exp(loss) if loss < 700 else float("inf")


# ---------------------------------------------------------------- checkpoints
def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state(legacy=False)
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                      "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                      "gauss": float(np_state["gauss"])}}


def _set_rng_state(s: dict[str, Any]) -> None:
    random.setstate((s["python"][0], tuple(s["python"][1]), s["python"][2]))
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    n = s["numpy"]
    np.random.set_state({"bit_generator": "MT19937", "has_gauss": n["has_gauss"], "gauss": n["gauss"],
                         "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]}})


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _step_dirs(ckpt_dir: Path) -> list[Path]:
    return sorted((d for d in ckpt_dir.glob("step-*") if d.is_dir()), key=lambda d: d.name)


def save_checkpoint(ckpt_dir: Path, step: int, model, state: dict[str, Any], keep: int = 2) -> Path:
    """Atomically write step-NNNNNN/ (trainable weights + state.pt), point `latest` at it, keep the last `keep`."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:06d}"
    tmp = ckpt_dir / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    weights = {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if p.requires_grad}
    save_file(weights, tmp / "model.safetensors")
    torch.save(state, tmp / "state.pt")
    for f in tmp.iterdir():
        _fsync(f)
    final = ckpt_dir / name
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer = ckpt_dir / f".latest-{uuid.uuid4().hex[:8]}"
    with open(pointer, "w", encoding="utf-8") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(pointer, ckpt_dir / "latest")
    _fsync(ckpt_dir)
    for old in _step_dirs(ckpt_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(ckpt_dir: Path, chash: str, say: Callable[[str], None]) -> tuple[dict, dict] | None:
    """(state, trainable weights) of the newest valid checkpoint made with config hash `chash`, else None."""
    if not ckpt_dir.is_dir():
        return None
    candidates = []
    if (ckpt_dir / "latest").is_file():
        candidates.append(ckpt_dir / (ckpt_dir / "latest").read_text(encoding="utf-8").strip())
    candidates += [d for d in reversed(_step_dirs(ckpt_dir)) if d not in candidates]
    for d in candidates:
        try:
            state = torch.load(d / "state.pt", map_location="cpu", weights_only=True)
            weights = load_file(d / "model.safetensors")
        except Exception as e:  # a torn or foreign folder: try the next one
            say(f"ignoring unreadable checkpoint {d} ({type(e).__name__}: {e})")
            continue
        if state.get("config_hash") != chash:
            say(f"ignoring checkpoint {d}: it was made with different settings "
                f"(config hash {state.get('config_hash')} != {chash}); starting from step 0")
            return None
        return state, weights
    return None


def _restore_weights(model, weights: dict[str, torch.Tensor]) -> None:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(weights):
        raise StageError("checkpoint weights do not match the model's trainable parameters; "
                         "delete the checkpoint folder and rerun")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(weights[n])


# ---------------------------------------------------------------- the loop
def train(model, cfg: TrainConfig, batches: BatchSource, *, eval_batches_fn: Callable[[], Iterable[Batch]],
          ckpt_dir: Path, seed: int, ctx: StageContext | None = None, desc: str = "train",
          fingerprint: Any = None, key: str = "pretrain") -> TrainResult:
    """Train `model` in place for cfg.max_steps optimizer steps, resuming from ckpt_dir when possible.

    `key` names the params.yaml section in error messages; `fingerprint` (JSON-able) joins the config hash
    that guards resumption (pass what else determines the run: data and base-model hashes).
    """
    ctx = ctx or StageContext()
    ckpt_dir = Path(ckpt_dir)
    if cfg.devices != 1:
        raise StageError(f"{key}.devices: {cfg.devices} > 1 is not supported by this trainer yet; set it to 1")
    device, amp_dtype = device_and_precision(cfg.precision, key=f"{key}.precision")

    def say(msg: str) -> None:
        log.info(msg)
        if ctx.progress:
            tqdm.write(f"[{desc}] {msg}", file=sys.stderr)

    model.to(device)
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(model, cfg, device)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    fwd = torch.compile(model) if cfg.compile else model
    chash = config_hash({"train": cfg.model_dump(mode="json"), "seed": seed, "fingerprint": fingerprint,
                         "trainable": sum(p.numel() for p in params)})

    start, history, tokens, win_sum, win_n = 0, [], 0, 0.0, 0
    last_train, last_val = None, None
    found = load_checkpoint(ckpt_dir, chash, say)
    if found is None:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        random.seed(seed)  # dropout & co. draw from the global generators: a run is a function of the seed
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
    if found is not None:
        state, weights = found
        _restore_weights(model, weights)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"])
        start, history, tokens = state["step"], list(state["history"]), state["tokens"]
        win_sum, win_n, last_train, last_val = state["win_sum"], state["win_n"], state["last_train"], state["last_val"]
        say(f"resuming from step {start} ({ckpt_dir})")

    eval_cache: list[Batch] | None = None

    def run_eval() -> float | None:
        nonlocal eval_cache
        if eval_cache is None:
            eval_cache = list(eval_batches_fn())
        return evaluate_loss(model, eval_cache, device, amp_dtype)

    proc = psutil.Process()

    def memory_mb() -> float:  # CUDA: peak allocated; CPU: resident set size (sampled at log steps)
        return torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else proc.memory_info().rss / 2**20
    peak_mb = memory_mb()
    win_t = torch.tensor(win_sum, dtype=torch.float32, device=device)
    sess_tokens, log_tokens, t_train, t_excl = 0, 0, 0.0, 0.0
    t_start = time.perf_counter()
    t_mark = t_start  # last log; t_excl = eval/checkpoint seconds since then (not training time)
    step_loss = torch.zeros((), device=device)
    bar = tqdm(total=cfg.max_steps, initial=start, desc=desc, unit="step", disable=not ctx.progress,
               dynamic_ncols=True)
    for step in range(start, cfg.max_steps):
        step_tokens = 0
        for micro in range(cfg.grad_accum):
            x, y = batches(step, micro)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with _autocast(device, amp_dtype):
                logits = fwd(input_ids=x, use_cache=False).logits
            loss = token_loss(logits, y) / cfg.grad_accum
            (scaler.scale(loss) if scaler is not None else loss).backward()
            step_loss = loss.detach() if micro == 0 else step_loss + loss.detach()
            step_tokens += x.numel()
        if scaler is not None:
            scaler.unscale_(opt)
        s = step + 1
        is_log = s % cfg.log_every == 0 or s == cfg.max_steps
        grad_norm = None
        if cfg.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        elif is_log:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, float("inf"))
        lr_now = sched.get_last_lr()[0]
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        win_t += step_loss
        win_n += 1
        sess_tokens += step_tokens
        log_tokens += step_tokens
        tokens += step_tokens
        bar.update(1)
        entry: dict[str, Any] = {}
        if is_log:
            last_train = float((win_t / win_n).item())
            now = time.perf_counter()
            dt = max(now - t_mark - t_excl, 1e-9)
            t_train += dt
            tps = log_tokens / dt
            t_mark, t_excl = now, 0.0
            peak_mb = max(peak_mb, memory_mb())
            ctx.log({"train_loss": last_train, "lr": lr_now, "tokens_per_s": tps,
                     "grad_norm": float(grad_norm.item()) if grad_norm is not None else 0.0}, s)
            bar.set_postfix(loss=f"{last_train:.4f}", tok_s=f"{tps:,.0f}", refresh=False)
            entry = {"step": s, "train_loss": last_train, "val_loss": None, "lr": lr_now}
            win_t.zero_()
            win_n, log_tokens = 0, 0
        t_aside = time.perf_counter()
        if s % cfg.eval_every == 0 or s == cfg.max_steps:
            last_val = run_eval()
            if last_val is not None:
                ctx.log({"val_loss": last_val, "val_ppl": _ppl(last_val)}, s)
            entry = {"step": s, "train_loss": entry.get("train_loss"), "val_loss": last_val, "lr": lr_now}
        if entry:
            history.append(entry)
        if s % cfg.checkpoint_every == 0 and s < cfg.max_steps:
            save_checkpoint(ckpt_dir, s, model, {
                "config_hash": chash, "step": s, "history": history, "tokens": tokens,
                "win_sum": float(win_t.item()), "win_n": win_n, "last_train": last_train, "last_val": last_val,
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None, "rng": _rng_state()})
        t_excl += time.perf_counter() - t_aside
    bar.close()
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_disable()
    model.eval()
    seconds = time.perf_counter() - t_start
    return {"steps": cfg.max_steps, "final_train_loss": last_train, "val_loss": last_val,
            "val_ppl": _ppl(last_val), "tokens": tokens,
            "tokens_per_s": sess_tokens / t_train if t_train > 0 else 0.0, "seconds": seconds,
            "peak_mem_mb": peak_mb, "history": history, "resumed_from": start}
