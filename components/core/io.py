"""Files every stage writes: atomic output folders, JSON, content hashes, and the seedlm.json
metadata each output folder carries (resolved config, inputs, result)."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from components.core.context import RUN_ID, StageError
from components.core.redact import redact

META = "seedlm.json"
"""Every output folder carries this file: the stage, its resolved config, inputs and result."""


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


def write_text(path: str | Path, text: str) -> None:
    """Write a small file atomically (temp file, fsync, rename): readers see the old or the new content, never
    a torn file; a full or read-only disk is a clear StageError. The one writer of single files."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{_HOST}-{uuid.uuid4().hex[:8]}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _sweep(path)
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and (msg := disk_error(e, path)):
            raise StageError(msg) from None
        raise


def write_json(path: str | Path, data: Any) -> None:
    """JSON (sorted keys, indented) written atomically by write_text."""
    write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


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
    for d in [*(p for p in root.rglob("*") if p.is_dir()), root]:
        fsync_dir(d)


def fsync_dir(folder: str | Path) -> None:
    """Make creations and renames inside `folder` durable (a no-op where folders cannot be fsynced)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------- atomic outputs
DISK_ERRORS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}


def disk_error(e: OSError, out: str | Path) -> str | None:
    """One line naming `out` for a write that failed on its disk (full, read-only, not writable); else None."""
    out = Path(out)
    if e.errno not in DISK_ERRORS:
        return None
    where = Path(e.filename) if isinstance(e.filename, (str, Path)) and e.filename else out
    if e.errno in (errno.EACCES, errno.EPERM) and not _under(where, out.parent):
        return None  # e.g. an unreadable input: not a problem of the output's disk
    fix = (
        "free space on that disk or point the output elsewhere (params.yaml `paths:`)"
        if e.errno in (errno.ENOSPC, errno.EDQUOT)
        else f"make {out.parent} writable or point the output elsewhere (params.yaml `paths:`)"
    )
    return f"{out}: cannot write the output: {DISK_ERRORS[e.errno]} ({where}); {fix}; the previous output is untouched"


def _under(path: Path, folder: Path) -> bool:
    try:
        return path.resolve().is_relative_to(folder.resolve())
    except (OSError, RuntimeError):
        return False


_HOST = uuid.uuid5(uuid.NAMESPACE_DNS, socket.gethostname()).hex[:8]
_PARTIAL = re.compile(r"\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-(?P<host>[0-9a-f]{8})-[0-9a-f]{8}")
"""Temp siblings of an output: `.<name>.tmp-<pid>-<host>-<id>` (being built), `.<name>.old-…` (being replaced)."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sweep(out: Path) -> None:
    """Remove the temp siblings of `out` (a folder or file) left by killed writers on this machine. A kill
    between the two renames of the fallback swap leaves no `out` but a complete `.old-`: it is put back."""
    stale = []
    for p in out.parent.iterdir():
        m = _PARTIAL.fullmatch(p.name)
        if (
            m
            and m["name"] == out.name
            and m["host"] == _HOST
            and int(m["pid"]) != os.getpid()
            and not _alive(int(m["pid"]))
        ):
            stale.append((m["kind"] != "old", p))
    for _, p in sorted(stale):  # `.old-` first
        if p.name.startswith(f".{out.name}.old-") and not os.path.lexists(out):
            with contextlib.suppress(OSError):
                os.replace(p, out)
                continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                p.unlink()


_RENAMEAT2: list[Any] = []


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    if not _RENAMEAT2:
        try:
            fn = ctypes.CDLL(None, use_errno=True).renameat2
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            _RENAMEAT2.append(fn)
        except (AttributeError, OSError):
            _RENAMEAT2.append(None)
    fn = _RENAMEAT2[0]
    if fn is None:
        return False
    if fn(-100, os.fsencode(a), -100, os.fsencode(b), 2) == 0:  # AT_FDCWD, RENAME_EXCHANGE
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


@contextlib.contextmanager
def atomic_dir(out: str | Path) -> Iterator[Path]:
    """Build an output folder in a temp sibling; replace `out` only if the block succeeds.

    The swap is one atomic rename exchange (two renames where the file system lacks one). A failure
    or a kill leaves the previous `out` untouched and never a half-written one; what a killed writer
    left is swept on the next write. A full or read-only disk is a StageError naming `out`.
    """
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _sweep(out)
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{_HOST}-{uuid.uuid4().hex[:8]}")
        tmp.mkdir()
    except OSError as e:
        if msg := disk_error(e, out):
            raise StageError(msg) from None
        raise
    try:
        yield tmp
        _fsync_tree(tmp)
        if os.path.lexists(out) and _exchange(tmp, out):  # tmp now holds the previous output
            fsync_dir(out.parent)
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            old = out.with_name(f".{out.name}.old-{os.getpid()}-{_HOST}-{uuid.uuid4().hex[:8]}")
            if os.path.lexists(out):
                os.replace(out, old)
            os.replace(tmp, out)
            fsync_dir(out.parent)
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and (msg := disk_error(e, out)):
            raise StageError(msg) from None
        raise


def write_meta(
    out_dir: str | Path,
    stage: str,
    config: dict[str, Any],
    result: dict[str, Any],
    inputs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    meta = {
        "stage": stage,
        "config": redact(config),
        "inputs": redact(inputs or {}),
        "result": result,
        "mlflow_run_id": RUN_ID.get(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_json(Path(out_dir) / META, meta)
    return meta


def read_meta(folder: str | Path, stage: str | None = None) -> dict[str, Any]:
    """Read an upstream output's metadata; a clear error if the stage has not run."""
    path = Path(folder) / META
    if not path.is_file():
        hint = f"run `dvc repro {stage}` (or the pipeline) first" if stage else "run the upstream stage first"
        raise StageError(f"{path}: missing; {hint}")
    return read_json(path)
