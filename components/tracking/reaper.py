"""Which runs' processes are gone: runs carry host, pid and process start time, so a new run of a
stage can mark the runs its killed predecessors left RUNNING as KILLED."""

from __future__ import annotations

import os
import socket


# ---------------------------------------------------------------- process identity (reaping)
def _start_time(pid: int) -> str | None:
    import psutil

    try:
        return f"{psutil.Process(pid).create_time():.2f}"
    except (psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError):
        return None


def identity() -> dict[str, str]:
    return {
        "seedlm.host": socket.gethostname(),
        "seedlm.pid": str(os.getpid()),
        "seedlm.pid_start": _start_time(os.getpid()) or "",
    }


def gone(tags: dict[str, str]) -> bool:
    """The process that owns a run tagged by `identity()` on this host no longer exists."""
    if tags.get("seedlm.host") != socket.gethostname() or not tags.get("seedlm.pid", "").isdigit():
        return False
    started = _start_time(int(tags["seedlm.pid"]))
    return started is None or (bool(tags.get("seedlm.pid_start")) and started != tags["seedlm.pid_start"])
