"""Perplexities of a causal LM: on held-out pretraining text (seeded windows of the model's context) and on
the answers of held-out instruction items (loss on the label tokens only), per item for bootstrap CIs."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from components.core.context import StageError
from components.core.io import read_json
from components.training.loop import token_loss
from components.training.model import autocast, device_and_precision, max_positions


def amp_dtype(device: torch.device, amp: bool) -> torch.dtype | None:
    """bf16 where the hardware runs it natively (precision `auto`), else None (fp32)."""
    return device_and_precision("auto")[1] if amp else None


@contextmanager
def cpu_threads(device: Any, n: int | None = None) -> Iterator[None]:
    """On CPU, run a block on `n` torch threads (default: the cores other processes leave idle, at least 1).

    Two threads contending with a busy machine run small models several times slower than one.
    """
    before = torch.get_num_threads()
    if device.type == "cpu":
        idle = (os.cpu_count() or 1) - os.getloadavg()[0]
        torch.set_num_threads(max(1, min(before, n or int(idle + 0.5))))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def val_perplexity(
    model: Any, tokens: np.ndarray, *, windows: int, batch_size: int, seed: int, device: Any, amp: bool = True
) -> dict[str, float]:
    """Loss on up to `windows` seeded, non-overlapping windows of the model's context."""
    t = min(max_positions(model), len(tokens) - 1)
    avail = (len(tokens) - 1) // t
    starts = np.sort(np.random.default_rng(seed).choice(avail, size=min(windows, avail), replace=False)) * t
    total, count = 0.0, 0
    with cpu_threads(device), torch.no_grad(), autocast(device, amp_dtype(device, amp)):
        for i in range(0, len(starts), batch_size):
            rows = np.stack([tokens[s : s + t + 1].astype(np.int64) for s in starts[i : i + batch_size]])
            x = torch.from_numpy(rows).to(device)
            total += float(token_loss(model(input_ids=x[:, :-1]).logits, x[:, 1:], reduction="sum"))
            count += x[:, 1:].numel()
    return {"val_loss": total / count, "val_ppl": math.exp(total / count), "val_tokens": count}


def response_perplexity(
    model: Any, input_ids: list[list[int]], labels: list[list[int]], *, batch_size: int, device: Any, amp: bool = True
) -> tuple[dict[str, float], np.ndarray]:
    """Loss on the label tokens only (assistant answers), sequences cut to the context from the left,
    and per-item [loss sum, label tokens] rows (input order): additive, for bootstrap CIs."""
    t = max_positions(model)
    order = sorted(range(len(input_ids)), key=lambda i: len(input_ids[i][-t:]))
    stats = np.zeros((len(input_ids), 2))
    with cpu_threads(device), torch.no_grad(), autocast(device, amp_dtype(device, amp)):
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            width = max(len(input_ids[j][-t:]) for j in idx)
            x = torch.zeros((len(idx), width), dtype=torch.long)
            y = torch.full((len(idx), width), -100, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for r, j in enumerate(idx):
                ids, lab = input_ids[j][-t:], labels[j][-t:]
                x[r, : len(ids)], y[r, : len(lab)], mask[r, : len(ids)] = torch.tensor(ids), torch.tensor(lab), 1
            logits = model(input_ids=x.to(device), attention_mask=mask.to(device)).logits[:, :-1]
            target = y[:, 1:].to(device)
            loss = token_loss(logits, target, reduction="none").view_as(target)
            stats[idx, 0] = loss.sum(1).double().cpu().numpy()
            stats[idx, 1] = (target != -100).sum(1).cpu().numpy()
    total, count = stats.sum(0)
    return ({"response_loss": total / count, "response_ppl": math.exp(total / count)} if count else {}), stats


def load_val_tokens(data_dir: Path, vocab: int) -> np.ndarray:
    """val.bin (dtype from preprocess's seedlm.json), checked against the model's vocabulary."""
    from components.pretrain import token_file

    meta = data_dir / "seedlm.json"
    dtype = read_json(meta).get("result", {}).get("dtype") if meta.is_file() else None
    tokens = token_file(data_dir, "val.bin", dtype or ("uint16" if vocab <= 65535 else "uint32"))
    if len(tokens) < 2:
        raise StageError(f"{data_dir / 'val.bin'}: fewer than 2 tokens; raise preprocess.val_fraction or add data")
    if int(tokens.max()) >= vocab:
        raise StageError(
            f"{data_dir / 'val.bin'}: token id {int(tokens.max())} >= the model's vocab_size {vocab}: "
            "model and data were built with different tokenizers; rerun preprocess, pretrain and sft"
        )
    return tokens
