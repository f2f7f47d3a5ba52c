"""Small shared pieces: atomic outputs, stage metadata, hashing, the stage context."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import uuid
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

META = "seedlm.json"
"""Every output folder carries this file: the stage, its resolved config, inputs and result."""


RUN_ID: ContextVar[str | None] = ContextVar("seedlm_run_id", default=None)
"""The tracking run of the stage in progress (set by the runner); recorded in every seedlm.json."""


class StageError(RuntimeError):
    """Bad input or state a user can fix; the message names the file/key and the fix."""


def _no_log(metrics: dict[str, float], step: int | None = None) -> None:
    pass


@dataclass
class StageContext:
    """What a runner hands a stage besides its config: where to report metrics, and run ids."""

    log: Callable[[dict[str, float], int | None], None] = _no_log
    run_id: str | None = None
    parent_run_id: str | None = None
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_dir(path: str | Path) -> str:
    """Content hash of a folder: relative paths and file contents, in sorted order."""
    root = Path(path)
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        h.update(p.relative_to(root).as_posix().encode() + b"\0" + sha256_file(p).encode())
    return h.hexdigest()


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON atomically (temp file, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


@contextlib.contextmanager
def atomic_dir(out: str | Path) -> Iterator[Path]:
    """Build an output folder in a temp sibling; replace `out` only if the block succeeds.

    A failure (or a kill) leaves the previous `out` untouched and never a half-written one.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_meta(out_dir: str | Path, stage: str, config: dict[str, Any], result: dict[str, Any],
               inputs: dict[str, Any] | None = None) -> dict[str, Any]:
    meta = {"stage": stage, "config": config, "inputs": inputs or {}, "result": result,
            "mlflow_run_id": RUN_ID.get(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_json(Path(out_dir) / META, meta)
    return meta


def read_meta(folder: str | Path, stage: str | None = None) -> dict[str, Any]:
    """Read an upstream output's metadata; a clear error if the stage has not run."""
    path = Path(folder) / META
    if not path.is_file():
        hint = f"run `dvc repro {stage}` (or the pipeline) first" if stage else "run the upstream stage first"
        raise StageError(f"{path}: missing; {hint}")
    return read_json(path)
