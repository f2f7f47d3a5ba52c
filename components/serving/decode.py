"""Batched decoding with a KV cache: rows join and leave between steps (continuous batching).

All rows of a batch are right-aligned: prompts are left-padded, a joining batch is left-padded to the
running batch's cache length (or the other way round), and every step appends one column. Padding is
masked out and position ids count each row's own tokens, so a row's logits are those it would get alone.
Columns that are padding in every row are dropped when rows leave, so the cache stays as long as the
longest live row. One forward per step for the whole batch; `model.generate` cannot take rows mid-way.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from components.serving.detok import TextStream
from components.serving.sampling import SamplingParams, choose, make_generator

Emit = Callable[["Row", str, "str | None"], None]
"""Called with (row, text delta, finish reason or None) from the decoding thread."""


@dataclass
class Row:
    """One sequence being generated: its prompt, settings, and the answer so far."""

    prompt: list[int]
    params: SamplingParams
    max_new: int
    stream: TextStream
    emit: Emit | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    index: int = 0
    """The caller's label (a choice index); decoding ignores it."""
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    generator: torch.Generator = field(init=False)

    def __post_init__(self) -> None:
        self.generator = make_generator(self.params.seed)

    def history(self) -> list[int]:
        return self.prompt + self.tokens


@dataclass
class Batch:
    """Live rows and their cache: mask [rows, T], next position and next input token per row."""

    rows: list[Row]
    cache: DynamicCache
    mask: torch.Tensor
    pos: torch.Tensor
    pending: torch.Tensor


def _forward(model: Any, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache: DynamicCache) -> Any:
    return model(
        input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True, logits_to_keep=1
    ).logits[:, -1]


def prefill(model: Any, rows: list[Row], pad_id: int, stop_ids: set[int]) -> Batch | None:
    """Run the prompts of `rows` (left-padded), pick each row's first token; None when all ended at once."""
    device = model.device
    width = max(len(r.prompt) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r.prompt) :] = torch.tensor(r.prompt, dtype=torch.long)
        mask[i, width - len(r.prompt) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    cache = DynamicCache(config=model.config)
    logits = _forward(model, ids, mask, (mask.cumsum(-1) - 1).clamp(min=0), cache)
    pos = torch.tensor([len(r.prompt) for r in rows], device=device)
    batch = Batch(rows, cache, mask, pos, torch.zeros(len(rows), dtype=torch.long, device=device))
    return advance(batch, logits, stop_ids)


def _pad_left(t: torch.Tensor, dim_from_end: int, n: int) -> torch.Tensor:
    if n == 0:
        return t
    spec = [0, 0] * (dim_from_end - 1) + [n, 0]
    return F.pad(t, spec)


def merge(a: Batch | None, b: Batch | None) -> Batch | None:
    """One batch of the rows of both, right-aligned on the longer cache."""
    if a is None or b is None:
        return a or b
    ta, tb = a.mask.shape[1], b.mask.shape[1]
    width = max(ta, tb)
    for la, lb in zip(a.cache.layers, b.cache.layers, strict=True):
        la.keys = torch.cat([_pad_left(la.keys, 2, width - ta), _pad_left(lb.keys, 2, width - tb)])
        la.values = torch.cat([_pad_left(la.values, 2, width - ta), _pad_left(lb.values, 2, width - tb)])
    mask = torch.cat([_pad_left(a.mask, 1, width - ta), _pad_left(b.mask, 1, width - tb)])
    return Batch(a.rows + b.rows, a.cache, mask, torch.cat([a.pos, b.pos]), torch.cat([a.pending, b.pending]))


def step(model: Any, batch: Batch, stop_ids: set[int]) -> Batch | None:
    """Feed every row its pending token, pick the next; None when no row is left."""
    ones = torch.ones((len(batch.rows), 1), dtype=batch.mask.dtype, device=batch.mask.device)
    batch.mask = torch.cat([batch.mask, ones], dim=1)
    logits = _forward(model, batch.pending[:, None], batch.mask, batch.pos[:, None], batch.cache)
    batch.pos = batch.pos + 1
    return advance(batch, logits, stop_ids)


def _finish(row: Row, reason: str, pending: str = "") -> None:
    row.finish_reason = reason
    delta = pending + row.stream.finish()
    if row.emit is not None:
        row.emit(row, delta, reason)


def _accept(row: Row, token: int, stop_ids: set[int]) -> bool:
    """Record `token` for `row` and send its text; False once the row is done."""
    if row.cancelled.is_set():
        _finish(row, "cancelled")
        return False
    row.tokens.append(token)
    if token in stop_ids:
        _finish(row, "stop")
        return False
    delta = row.stream.push(token)
    if row.stream.stopped:
        _finish(row, "stop")
        return False
    if len(row.tokens) >= row.max_new:
        _finish(row, "length", delta)
        return False
    if delta and row.emit is not None:
        row.emit(row, delta, None)
    return True


def advance(batch: Batch, logits: torch.Tensor, stop_ids: set[int]) -> Batch | None:
    """Choose each row's next token from `logits`, send text, and drop the rows that ended."""
    tokens = choose(logits, batch.rows)
    live = [i for i, (row, token) in enumerate(zip(batch.rows, tokens, strict=True)) if _accept(row, token, stop_ids)]
    if not live:
        return None
    batch.pending = torch.tensor(tokens, dtype=torch.long, device=batch.mask.device)
    if len(live) < len(batch.rows):
        keep = torch.tensor(live, device=batch.mask.device)
        batch.cache.batch_select_indices(keep)
        batch.rows = [batch.rows[i] for i in live]
        batch.mask, batch.pos, batch.pending = batch.mask[keep], batch.pos[keep], batch.pending[keep]
        _trim(batch)
    return batch


def _trim(batch: Batch) -> None:
    """Drop the leading cache columns that are padding in every row."""
    start = int(batch.mask.any(0).int().argmax())
    if start > 0:
        for layer in batch.cache.layers:
            layer.keys, layer.values = layer.keys[..., start:, :], layer.values[..., start:, :]
        batch.mask = batch.mask[:, start:]


def drive(
    model: Any, take: Callable[[int, bool], list[Row]], *, max_batch: int, pad_id: int, stop_ids: set[int]
) -> None:
    """Decode until `take` has no more rows: before each step, rows from `take(room, idle)` join the batch.

    `take(n, idle)` returns up to n new rows; `idle` is True when nothing is running (it may block
    then, and returning [] while idle ends the loop)."""
    batch: Batch | None = None
    with torch.inference_mode():
        while True:
            running = len(batch.rows) if batch else 0
            new = take(max_batch - running, running == 0) if running < max_batch else []
            if not new and batch is None:
                return
            if new:
                batch = merge(batch, prefill(model, new, pad_id, stop_ids))
            if batch is not None:
                batch = step(model, batch, stop_ids)
