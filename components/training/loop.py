"""One lean, resumable, data-parallel training loop shared by pretrain and sft.

Batches are a pure function of (seed, step, micro-step), so a resumed run reproduces the exact data stream
without replay. A batch source yields the *global* micro-batch; with N processes rank r trains on rows
[r*B, (r+1)*B), so the global batch, and hence the run, does not depend on how many processes share it.
Checkpoints (components/training/checkpoint.py) hold the trainable weights, optimizer, scheduler, per-rank RNG
states and the loss history; they are written on a background thread. Batches are built one step ahead
on a background thread too, so data loading, logging and checkpointing stay off the critical path.
"""

from __future__ import annotations

import contextlib
import logging
import math
import queue
import random
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from components.core.config import TrainConfig
from components.core.context import StageContext, StageError
from components.core.params import config_hash
from components.training import checkpoint as ck
from components.training import distributed as dd
from components.training.base import is_quantized
from components.training.model import autocast, device_and_precision, training_attention

log = logging.getLogger("seedlm.train")
# Batches are right-padded and attention is causal: no position attends to a pad after it, and pad targets
# are -100, so no attention_mask is needed (passing one would cost a mask per step). Transformers cannot know
# that and warns once per process.
logging.getLogger("transformers.modeling_utils").addFilter(lambda r: "`attention_mask`" not in r.getMessage())

Batch = tuple[torch.Tensor, ...]
"""(input_ids [B, T], targets [B, T][, position_ids [B, T]]): targets are already shifted (target t = token t+1),
-100 = ignored; position ids only for packed rows (they restart at each example: components/training/packing.py)."""
BatchSource = Callable[[int, int], Batch]
"""(optimizer step, micro-step) -> the global micro-batch; a pure function of those (and its seed)."""
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
    """AdamW, decay on matrices only; the fused kernel (one pass over all tensors) on CUDA and on CPU."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    sharded = any(type(p).__name__ == "DTensor" for p in params)
    extra = {"foreach": True} if sharded and device.type == "cpu" else {"fused": True}
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), **extra)


def token_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy over the non-ignored targets (fp32)."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction=reduction)


def _shard(x: torch.Tensor, y: torch.Tensor, rank: int, world: int, pos: torch.Tensor | None = None) -> Batch:
    """This rank's rows of a global batch (an all-ignored stand-in row when there are too few rows), and of the
    position ids when given: (x, y, pos or None)."""
    b = -(-x.shape[0] // world)
    xs, ys = x[rank * b : (rank + 1) * b], y[rank * b : (rank + 1) * b]
    ps = None if pos is None else pos[rank * b : (rank + 1) * b]
    if xs.shape[0] == 0:  # every rank must run the same forwards (FSDP); this one scores nothing
        xs, ys, ps = x[:1], torch.full_like(y[:1], -100), None if pos is None else pos[:1]
    return xs, ys, ps


def _positions(pos: torch.Tensor | None, device: torch.device) -> dict[str, torch.Tensor]:
    """The forward's position_ids argument of a packed batch (none otherwise)."""
    return {} if pos is None else {"position_ids": pos.to(device, non_blocking=True)}


def evaluate_loss(model, batches: Iterable[Batch], device: torch.device, dtype: torch.dtype | None) -> float | None:
    """Token-weighted mean loss over fixed batches (eval mode, no grad); None when there is nothing to score.

    In a process group each rank scores its share of every batch and the sums are combined."""
    rank, world = dd.info()
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.int64, device=device)
    with torch.no_grad():
        for x, y, *pos in batches:
            x, y, p = _shard(x, y, rank, world, *pos)
            x, y = x.to(device), y.to(device)
            with autocast(device, dtype):
                logits = model(input_ids=x, use_cache=False, **_positions(p, device)).logits
            total += token_loss(logits, y, "sum").double()
            count += (y != -100).sum()
    model.train(was_training)
    both = dd.all_reduce(torch.stack([total, count.double()]))
    n = int(both[1].item())
    return float(both[0].item() / n) if n else None


def _ppl(loss: float | None) -> float | None:
    if loss is None:
        return None
    return math.exp(loss) if loss < 700 else float("inf")


class PeakMemory:
    """Peak resident memory (sampled on a thread) and CUDA max-allocated over a `with` block, in MiB.

    A block nested in another (train() inside a stage) shares the outer sampler: one thread, one reset."""

    _outer: PeakMemory | None = None

    def __init__(self, every: float = 0.1) -> None:
        self.every, self.rss_mb, self.cuda_mb = every, 0.0, 0.0
        self._stop = threading.Event()
        self._proc = psutil.Process()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        self.rss_mb = max(self.rss_mb, self._proc.memory_info().rss / 2**20)
        if torch.cuda.is_available():
            self.cuda_mb = max(self.cuda_mb, torch.cuda.max_memory_allocated() / 2**20)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self._sample()

    def __enter__(self) -> PeakMemory:
        if PeakMemory._outer is None:
            PeakMemory._outer = self
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            self._thread = threading.Thread(target=self._run, daemon=True, name="peak-memory")
            self._thread.start()
        self._sample()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            PeakMemory._outer = None
        self._sample()
        outer = PeakMemory._outer
        if outer is not None:  # nested: the outer sampler saw everything since the outer block began
            outer._sample()
            self.rss_mb, self.cuda_mb = max(self.rss_mb, outer.rss_mb), max(self.cuda_mb, outer.cuda_mb)

    def report(self) -> dict[str, float]:
        """peak_mem_mb (CUDA max allocated on a GPU, else RSS), peak_rss_mb, peak_cuda_mb; max over ranks."""
        rss, cuda = dd.reduce_max(self.rss_mb), dd.reduce_max(self.cuda_mb)
        return {"peak_mem_mb": cuda if torch.cuda.is_available() else rss, "peak_rss_mb": rss, "peak_cuda_mb": cuda}


def _prefetch(
    batches: BatchSource, start: int, stop: int, accum: int, rank: int, world: int, pin: bool
) -> Iterator[tuple[torch.Tensor, torch.Tensor, int, torch.Tensor | None]]:
    """(x, y, global target count, position ids or None) for every micro-step from `start`, built one step ahead
    on a thread."""
    q: queue.Queue = queue.Queue(maxsize=max(2, accum))
    done = threading.Event()

    def produce() -> None:
        try:
            for step in range(start, stop):
                for micro in range(accum):
                    x, y, *pos = batches(step, micro)
                    n = int((y != -100).sum())
                    x, y, p = _shard(x, y, rank, world, *pos)
                    if pin:
                        x, y, p = x.pin_memory(), y.pin_memory(), None if p is None else p.pin_memory()
                    q.put((x, y, n, p))  # blocks: no polling
                    if done.is_set():
                        return
        except BaseException as e:  # noqa: BLE001 - re-raised in the training thread
            q.put(e)

    thread = threading.Thread(target=produce, daemon=True, name="batches")
    thread.start()
    try:
        for _ in range((stop - start) * accum):
            item = q.get()
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        done.set()
        while thread.is_alive():  # free a producer blocked on the full queue; it then sees `done`
            with contextlib.suppress(queue.Empty):
                q.get_nowait()
            thread.join(timeout=0.01)


# ---------------------------------------------------------------- the loop
def train(
    model,
    cfg: TrainConfig,
    batches: BatchSource,
    *,
    eval_batches_fn: Callable[[], Iterable[Batch]],
    ckpt_dir: Path,
    seed: int,
    ctx: StageContext | None = None,
    desc: str = "train",
    fingerprint: Any = None,
    key: str = "pretrain",
) -> TrainResult:
    """Train `model` in place for cfg.max_steps optimizer steps, resuming from ckpt_dir when possible.

    `batches(step, micro)` must return the global micro-batch (cfg.batch_size rows per process). `key`
    names the params.yaml section in error messages; `fingerprint` (JSON-able) joins the config hash that
    guards resumption (pass what else determines the run: data and base-model hashes). In a process group
    (components.training.distributed) every rank calls this; only rank 0 logs and writes checkpoints. With
    strategy fsdp the model stays sharded afterwards; rank 0 gets the full trained weights in
    result["state_dict"].
    """
    ctx = ctx or StageContext()
    ckpt_dir = Path(ckpt_dir)
    rank, world = dd.info()
    main = rank == 0
    if cfg.devices != world:
        raise StageError(
            f"{key}.devices: {cfg.devices}, but this trainer runs in {world} process(es); "
            "start the stage normally (it launches the processes) or match torchrun's size"
        )
    device, amp_dtype = device_and_precision(cfg.precision, key=f"{key}.precision")
    fsdp = cfg.strategy == "fsdp" and world > 1

    def say(msg: str) -> None:
        if main:
            log.info(msg)
            if ctx.progress:
                tqdm.write(f"[{desc}] {msg}", file=sys.stderr)

    if not is_quantized(model):  # bitsandbytes places 4/8-bit weights on the GPU when loading; .to() is refused
        model.to(device)
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
    attn_before = training_attention(model, device, amp_dtype)
    model.train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    wrapped = dd.wrap(model, cfg.strategy, device, key) if world > 1 else model
    params = [p for p in wrapped.parameters() if p.requires_grad]
    opt = make_optimizer(wrapped, cfg, device)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    scaler = None
    if amp_dtype == torch.float16:
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        scaler = ShardedGradScaler("cuda") if fsdp else torch.amp.GradScaler("cuda")
    fwd = torch.compile(wrapped) if cfg.compile else wrapped
    chash = config_hash(
        {"train": cfg.model_dump(mode="json"), "seed": seed, "fingerprint": fingerprint, "trainable": n_trainable}
    )

    # resume: rank 0 picks the checkpoint, every rank reads that one (paths.checkpoints must be shared)
    chosen = ck.find_checkpoint(ckpt_dir, chash, say) if main else None
    name = dd.broadcast(chosen[0] if chosen else None)
    if name is not None and not main:
        chosen = ck.find_checkpoint(ckpt_dir, chash, say, only=name)
        if chosen is None:
            raise StageError(
                f"{ckpt_dir / name}: rank {rank} cannot read the checkpoint rank 0 resumes from; "
                "paths.checkpoints must be on a filesystem every process shares"
            )
    dd.barrier()
    start, history, tokens, win_sum, win_n = 0, [], 0, 0.0, 0
    last_train, last_val = None, None
    if chosen is None:
        if main:
            shutil.rmtree(ckpt_dir, ignore_errors=True)
        random.seed(seed + rank)  # dropout & co. draw from the global generators: a run is a function of the seed
        np.random.seed((seed + rank) % 2**32)
        torch.manual_seed(seed + rank)
    else:
        _, state, weights = chosen
        ck.restore(wrapped, opt, trainable, weights, state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        rngs = state["rng"]
        ck.set_rng_state(rngs[rank] if isinstance(rngs, list) else rngs)
        start, history, tokens = state["step"], list(state["history"]), state["tokens"]
        win_sum, win_n, last_train, last_val = state["win_sum"], state["win_n"], state["last_train"], state["last_val"]
        if main:
            ck.clean_partial(ckpt_dir)
        say(f"resuming from step {start} ({ckpt_dir})")
    writer = ck.AsyncWriter(ckpt_dir)

    eval_cache: list[Batch] | None = None

    def run_eval() -> float | None:
        nonlocal eval_cache
        if eval_cache is None:
            eval_cache = list(eval_batches_fn())
        return evaluate_loss(model, eval_cache, device, amp_dtype)

    win_t = torch.tensor(win_sum if main else 0.0, dtype=torch.float32, device=device)
    sess_tokens, log_tokens, t_train, t_excl = 0, 0, 0.0, 0.0
    t_start = time.perf_counter()
    t_mark = t_start  # last log; t_excl = eval/checkpoint seconds since then (not training time)
    say_every = cfg.log_every * max(1, math.ceil(cfg.max_steps / (20 * cfg.log_every)))  # ~20 progress lines
    step_loss = torch.zeros((), device=device)
    scale = world / cfg.grad_accum  # DDP/FSDP average gradients over ranks; each rank adds its share of the mean
    bar = tqdm(
        total=cfg.max_steps,
        initial=start,
        desc=desc,
        unit="step",
        disable=not (ctx.progress and main),
        dynamic_ncols=True,
    )
    feed = _prefetch(batches, start, cfg.max_steps, cfg.grad_accum, rank, world, device.type == "cuda")
    mem = PeakMemory().__enter__()
    try:
        for step in range(start, cfg.max_steps):
            step_tokens = 0
            for micro in range(cfg.grad_accum):
                x, y, n_tok, pos = next(feed)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                last = micro == cfg.grad_accum - 1
                sync = wrapped.no_sync() if world > 1 and not fsdp and not last else contextlib.nullcontext()
                if fsdp:
                    wrapped.set_requires_gradient_sync(last)
                with sync:
                    with autocast(device, amp_dtype):
                        logits = fwd(input_ids=x, use_cache=False, **_positions(pos, device)).logits
                    share = token_loss(logits, y, "sum") / max(n_tok, 1)  # this rank's part of the global mean
                    loss = share * scale
                    (scaler.scale(loss) if scaler is not None else loss).backward()
                    del logits  # [B, T, V]: not kept alive through the next forward (the memory plan counts one)
                step_loss = (
                    share.detach() / cfg.grad_accum if micro == 0 else step_loss + share.detach() / cfg.grad_accum
                )
                step_tokens += x.shape[0] * x.shape[1] * world
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
                last_train = float((dd.all_reduce(win_t.clone()) / win_n).item())
                gn = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
                now = time.perf_counter()
                dt = max(now - t_mark - t_excl, 1e-9)
                t_train += dt
                tps = log_tokens / dt
                t_mark, t_excl = now, 0.0
                if main:
                    ctx.log(
                        {
                            "train_loss": last_train,
                            "lr": lr_now,
                            "tokens_per_s": tps,
                            "grad_norm": float(gn.item()) if gn is not None else 0.0,
                        },
                        s,
                    )
                bar.set_postfix(loss=f"{last_train:.4f}", tok_s=f"{tps:,.0f}", refresh=False)
                if main and not ctx.progress and (s % say_every == 0 or s == cfg.max_steps):  # no bar: a log line
                    eta = (now - t_start) / (s - start) * (cfg.max_steps - s)
                    log.info(
                        "%s: step %d/%d, loss %.4f, %s tokens/s, ETA %dm%02ds",
                        desc,
                        s,
                        cfg.max_steps,
                        last_train,
                        f"{tps:,.0f}",
                        eta // 60,
                        eta % 60,
                    )
                entry = {"step": s, "train_loss": last_train, "val_loss": None, "lr": lr_now}
                win_t.zero_()
                win_n, log_tokens = 0, 0
            t_aside = time.perf_counter()
            if s % cfg.eval_every == 0 or s == cfg.max_steps:
                last_val = run_eval()
                if last_val is not None and main:
                    ctx.log({"val_loss": last_val, "val_ppl": _ppl(last_val)}, s)
                entry = {"step": s, "train_loss": entry.get("train_loss"), "val_loss": last_val, "lr": lr_now}
            if entry:
                history.append(entry)
            if s % cfg.checkpoint_every == 0 and s < cfg.max_steps:
                snap = ck.snapshot(wrapped, opt, trainable, collective=fsdp, main=main)
                rngs = dd.gather(ck.rng_state())
                win_total = float(dd.all_reduce(win_t.clone()).item())
                if main:
                    writer.submit(
                        s,
                        snap[0],
                        {
                            "config_hash": chash,
                            "step": s,
                            "history": history,
                            "tokens": tokens,
                            "win_sum": win_total,
                            "win_n": win_n,
                            "last_train": last_train,
                            "last_val": last_val,
                            "optimizer": snap[1],
                            "scheduler": sched.state_dict(),
                            "scaler": scaler.state_dict() if scaler is not None else None,
                            "rng": rngs,
                        },
                    )
            t_excl += time.perf_counter() - t_aside
    finally:
        feed.close()
        mem.__exit__()
        writer.wait()  # a checkpoint in flight completes (or its error surfaces) before anything else
        bar.close()
    full_state = ck.full_weights(model, main) if fsdp else None
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_disable()
    training_attention(model, device, amp_dtype, restore=attn_before)
    model.eval()
    seconds = time.perf_counter() - t_start
    out = {
        "steps": cfg.max_steps,
        "final_train_loss": last_train,
        "val_loss": last_val,
        "val_ppl": _ppl(last_val),
        "tokens": tokens,
        "tokens_per_s": sess_tokens / t_train if t_train > 0 else 0.0,
        "seconds": seconds,
        "history": history,
        "resumed_from": start,
        "devices": world,
        **mem.report(),
    }
    if fsdp:
        out["state_dict"] = full_state
    return out
