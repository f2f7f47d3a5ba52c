"""Tracking that survives a flaky, busy or restarting tracking store.

Every MLflow call the runner makes goes through `Tracking`: transient failures (refused or reset
connections, timeouts, 5xx/429 answers, "database is locked") are retried with exponential backoff and
jitter for up to SEEDLM_TRACKING_RETRY_S seconds (default 300), each retry reported on the `seedlm.tracking`
logger. Metrics are buffered: training never waits on the server. What still cannot be delivered when the
stage ends (metrics, params, tags, artifacts, the final status) is saved to `.seedlm/tracking-backlog/<run
id>.jsonl`, reported, and sent later by `python -m components.tracking.backlog replay` (to MLFLOW_TRACKING_URI if set).
Runs carry their host and process: a new run of a stage marks those its killed predecessors left RUNNING as KILLED."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import time
from collections.abc import Callable, Iterator
from typing import Any

from components.core.context import StageError
from components.core.redact import redact

log = logging.getLogger("seedlm.tracking")

BUDGET_ENV = "SEEDLM_TRACKING_RETRY_S"
DEFAULT_BUDGET_S = 300.0
MAX_DELAY_S = 30.0
TRANSIENT_CODES = {
    "INTERNAL_ERROR",
    "TEMPORARILY_UNAVAILABLE",
    "REQUEST_LIMIT_EXCEEDED",
    "DEADLINE_EXCEEDED",
    "ABORTED",
    "UNAVAILABLE",
}
TRANSIENT_TEXT = (
    "database is locked",
    "connection",
    "max retries exceeded",
    "timed out",
    "timeout",
    "temporarily",
    "error code 5",
    "error code 429",
    "broken pipe",
    "reset by peer",
    "remote end closed",
    "unable to open",
)


class TrackingUnavailable(StageError):
    """The tracking store kept failing for the whole retry budget (a StageError: one clear line, exit 2)."""


def budget() -> float:
    value = os.environ.get(BUDGET_ENV, "")
    return max(0.0, float(value)) if value.replace(".", "", 1).isdigit() else DEFAULT_BUDGET_S


def is_transient(e: BaseException, also: tuple[str, ...] = ()) -> bool:
    """Worth retrying: the store was unreachable, overloaded or locked (not: the request was wrong)."""
    if isinstance(e, (ConnectionError, TimeoutError)):
        return True
    with contextlib.suppress(ImportError):
        import requests

        if isinstance(e, (requests.ConnectionError, requests.Timeout)):
            return True
    text, code = str(e).lower(), getattr(e, "error_code", None)
    if code in also:
        return True
    if "database is locked" in text or (type(e).__name__ == "OperationalError" and "already exists" in text):
        return True  # sqlite busy, or a concurrent first run creating the same store tables
    return (
        (code is None or code in TRANSIENT_CODES)
        and any(t in text for t in TRANSIENT_TEXT)
        and type(e).__name__ in ("MlflowException", "RestException", "OperationalError", "OSError")
    )


def delay(attempt: int) -> float:
    """Exponential backoff with ±25% jitter: about 1, 2, 4, 8, 16, 30, 30 ... seconds."""
    return min(MAX_DELAY_S, 2.0 ** (attempt - 1)) * random.uniform(0.75, 1.25)


def _uri() -> str:
    import mlflow

    return redact(mlflow.get_tracking_uri())


def _short(e: BaseException) -> str:
    return redact(f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")


@contextlib.contextmanager
def fail_fast() -> Iterator[None]:
    """One HTTP attempt per call (our loop does the retrying), unless the user configured MLflow's own."""
    keys = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
    set_here = {k: v for k, v in keys.items() if k not in os.environ}
    os.environ.update(set_here)
    try:
        yield
    finally:
        for k in set_here:
            os.environ.pop(k, None)


def call(
    fn: Callable[..., Any],
    *args: Any,
    what: str,
    budget_s: float | None = None,
    on_retry: Callable[[], None] | None = None,
    also: tuple[str, ...] = (),
    **kwargs: Any,
) -> Any:
    """fn(*args, **kwargs), retried with backoff on transient errors for up to `budget_s` seconds."""
    deadline = time.monotonic() + (budget() if budget_s is None else budget_s)
    attempt = 0
    while True:
        try:
            with fail_fast():
                out = fn(*args, **kwargs)
            if attempt:
                log.warning("tracking: %s went through after %d retr%s", what, attempt, "y" if attempt == 1 else "ies")
            return out
        except Exception as e:  # noqa: BLE001 - classified just below
            if not is_transient(e, also):
                raise
            attempt += 1
            if on_retry:
                on_retry()
            wait = delay(attempt)
            if time.monotonic() + wait > deadline:
                raise TrackingUnavailable(
                    f"tracking store {_uri()}: {what} failed {attempt} time(s) "
                    f"({_short(e)}); start the tracking server (or unset "
                    f"MLFLOW_TRACKING_URI), or raise {BUDGET_ENV}"
                ) from e
            log.warning("tracking: %s failed (%s); retry %d in %.1f s", what, _short(e), attempt, wait)
            time.sleep(wait)
