"""SFT sequence packing (`sft.packing: true`): several examples share one row of `context` tokens.

Rows are filled best-fit-decreasing (each example goes to the fullest row it still fits), once per run; the
epochs then shuffle the rows. Each example's position ids start at 0, and the model keeps attention within
each example: transformers reads the resets of `position_ids` as sequence boundaries (without an
attention_mask) and builds a block-diagonal causal mask, for eager and SDPA attention on CPU as on GPU. The
loss is the same per-token mean over response tokens as without packing; fewer pad tokens are computed.
"""

from __future__ import annotations

import bisect

import numpy as np
import torch

Example = tuple[np.ndarray, np.ndarray]
Packed = tuple[np.ndarray, np.ndarray, np.ndarray]
"""(inputs, shifted targets, position ids) of one packed row."""


def pack(rows: list[Example], context: int) -> list[Packed]:
    """Examples (each at most `context` long) into rows of at most `context` tokens, best fit decreasing."""
    order = sorted(range(len(rows)), key=lambda i: (-len(rows[i][0]), i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin), sorted
    for i in order:
        n = len(rows[i][0])
        k = bisect.bisect_left(free, (n, -1))
        if k == len(free):
            bins.append([i])
            bisect.insort(free, (context - n, len(bins) - 1))
        else:
            room, b = free.pop(k)
            bins[b].append(i)
            bisect.insort(free, (room - n, b))
    return [_row([rows[i] for i in b]) for b in bins]


def _row(examples: list[Example]) -> Packed:
    x = np.concatenate([e[0] for e in examples])
    y = np.concatenate([e[1] for e in examples])
    pos = np.concatenate([np.arange(len(e[0]), dtype=np.int64) for e in examples])
    return x, y, pos


def collate(rows: list[Packed], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad packed rows to the longest: inputs with pad_id, targets -100, positions of a sequence of its own."""
    width = max(len(r[0]) for r in rows)
    x = np.full((len(rows), width), pad_id, dtype=np.int64)
    y = np.full((len(rows), width), -100, dtype=np.int64)
    pos = np.tile(np.arange(width, dtype=np.int64), (len(rows), 1))
    for i, (xi, yi, pi) in enumerate(rows):
        x[i, : len(xi)], y[i, : len(yi)], pos[i, : len(pi)] = xi, yi, pi
        pos[i, len(pi) :] -= len(pi)  # the padding restarts at 0: no example attends to it, it attends to none
    return torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(pos)


def efficiency(rows: list[Packed], context: int) -> float:
    """Share of the row positions that hold example tokens."""
    return sum(len(r[0]) for r in rows) / max(1, context * len(rows))
