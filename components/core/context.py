"""What a stage is handed besides its config (StageContext), and the one error type a user can fix (StageError)."""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

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
