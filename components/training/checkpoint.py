"""Resumable training state: atomic, asynchronous checkpoints of the trainable weights, optimizer,
scheduler, RNG states (one per rank) and the data position.

Layout under a run's checkpoint folder: `step-NNNNNN/` (model.safetensors + state.pt) and a `latest`
pointer file. A checkpoint is built in a `.tmp-*` folder, fsynced, then renamed into place, and only then
does `latest` move (itself written to a temp file and renamed): a kill at any moment leaves either the
previous checkpoint or the new one, never a torn folder that looks valid. Leftover `.tmp-*` folders are
ignored and removed. Model and optimizer states go through torch.distributed.checkpoint's state-dict API,
so the same files serve one process, DDP and FSDP (full, unsharded tensors keyed by parameter name).
"""

from __future__ import annotations

import os
import random
import shutil
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from components.core.context import StageError
from components.core.io import write_text

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def rng_state() -> dict[str, Any]:
    """This process's python, numpy, torch (and CUDA) generator states."""
    np_state = np.random.get_state(legacy=False)
    return {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
    }


def set_rng_state(s: dict[str, Any]) -> None:
    random.setstate((s["python"][0], tuple(s["python"][1]), s["python"][2]))
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    n = s["numpy"]
    np.random.set_state(
        {
            "bit_generator": "MT19937",
            "has_gauss": n["has_gauss"],
            "gauss": n["gauss"],
            "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
        }
    )


def _copy(tree: Any) -> Any:
    """Detached CPU copies of every tensor (the live ones keep changing while a write runs)."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().to("cpu", copy=True)
    if isinstance(tree, dict):
        return {k: _copy(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_copy(v) for v in tree)
    return tree


def snapshot(
    model: torch.nn.Module, opt: torch.optim.Optimizer, trainable: set[str], *, collective: bool, main: bool
) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """Full (unsharded) CPU copies of the trainable weights and the optimizer state, on the main rank.

    `collective`: every rank must take part (FSDP gathers the shards); otherwise only the main rank works."""
    if not (collective or main):
        return None
    weights, optim = get_state_dict(model, opt, options=FULL)
    if not main:
        return None
    on_cpu = next(model.parameters()).device.type == "cpu"  # cpu_offload already copied device tensors
    weights = {n: t for n, t in weights.items() if n in trainable}
    return (_copy(weights), _copy(optim)) if on_cpu else (weights, optim)


def restore(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    trainable: set[str],
    weights: dict[str, torch.Tensor],
    optim: dict[str, Any],
) -> None:
    if set(weights) != trainable:
        raise StageError(
            "checkpoint weights do not match the model's trainable parameters; delete the checkpoint folder and rerun"
        )
    set_state_dict(
        model,
        opt,
        model_state_dict=weights,
        optim_state_dict=optim,
        options=StateDictOptions(full_state_dict=True, strict=False),
    )


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def step_dirs(ckpt_dir: Path) -> list[Path]:
    return sorted((d for d in ckpt_dir.glob("step-*") if d.is_dir()), key=lambda d: d.name)


def save_checkpoint(
    ckpt_dir: Path, step: int, weights: dict[str, torch.Tensor], state: dict[str, Any], keep: int = 2
) -> Path:
    """Atomically write step-NNNNNN/ (weights + state.pt), point `latest` at it, keep the last `keep`."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:06d}"
    tmp = ckpt_dir / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        save_file({k: v.contiguous() for k, v in weights.items()}, tmp / "model.safetensors")
        torch.save(state, tmp / "state.pt")
        for f in tmp.iterdir():
            _fsync(f)
        _fsync(tmp)
        final = ckpt_dir / name
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_text(ckpt_dir / "latest", name + "\n")
    for old in step_dirs(ckpt_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def clean_partial(ckpt_dir: Path) -> None:
    """Remove what killed writes left behind (temp folders, temp pointers)."""
    for p in list(ckpt_dir.glob(".tmp-*")) + list(ckpt_dir.glob(".latest-*")):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def find_checkpoint(
    ckpt_dir: Path, chash: str, say: Callable[[str], None], only: str | None = None
) -> tuple[str, dict, dict] | None:
    """(folder name, state, weights) of the newest readable checkpoint made with config hash `chash`.

    `only`: read exactly this folder (the one the main rank chose). A checkpoint of other settings means
    a fresh start (None)."""
    if not ckpt_dir.is_dir():
        return None
    if only is not None:
        candidates = [ckpt_dir / only]
    else:
        candidates = []
        if (ckpt_dir / "latest").is_file():
            candidates.append(ckpt_dir / (ckpt_dir / "latest").read_text(encoding="utf-8").strip())
        candidates += [d for d in reversed(step_dirs(ckpt_dir)) if d not in candidates]
    for d in candidates:
        try:
            state = torch.load(d / "state.pt", map_location="cpu", weights_only=True)
            weights = load_file(d / "model.safetensors")
        except Exception as e:  # noqa: BLE001 - a torn or foreign folder: try the next one
            say(f"ignoring unreadable checkpoint {d} ({type(e).__name__}: {e})")
            continue
        if state.get("config_hash") != chash:
            say(
                f"ignoring checkpoint {d}: it was made with different settings "
                f"(config hash {state.get('config_hash')} != {chash}); starting from step 0"
            )
            return None
        return d.name, state, weights
    return None


class AsyncWriter:
    """Writes checkpoints on a background thread, one at a time, so training goes on while they are saved.

    The state is snapshotted (copied) before `submit`, so what is written is exactly that step's state."""

    def __init__(self, ckpt_dir: Path, keep: int = 2) -> None:
        self.ckpt_dir, self.keep = ckpt_dir, keep
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def _write(self, step: int, weights: dict, state: dict) -> None:
        try:
            save_checkpoint(self.ckpt_dir, step, weights, state, self.keep)
        except BaseException as e:  # noqa: BLE001 - re-raised in the training thread by wait()
            self._error = e

    def submit(self, step: int, weights: dict, state: dict) -> None:
        self.wait()
        self._thread = threading.Thread(
            target=self._write, args=(step, weights, state), daemon=True, name=f"checkpoint-{step}"
        )
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise StageError(
                f"{self.ckpt_dir}: writing a checkpoint failed ({type(err).__name__}: {err}); "
                "check free disk space and permissions of paths.checkpoints"
            ) from err


def full_weights(model: torch.nn.Module, main: bool) -> dict[str, torch.Tensor] | None:
    """The whole model's state dict, unsharded, on the main rank's CPU (a collective under FSDP)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    weights = get_model_state_dict(model, options=FULL)
    return weights if main else None


def run_key(folder: Callable[[], Path]) -> str | None:
    """`<stage>:<hash>` of a stage's checkpoint folder: names the MLflow run that a rerun after a crash continues
    (components.core.runner.resumable_run). None while the stage's inputs are missing: the stage then fails with its
    own message."""
    try:
        path = folder()
    except (StageError, OSError, ValueError):
        return None
    return f"{path.parent.name}:{path.name}"
