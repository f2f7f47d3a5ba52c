"""Tracking that survives a flaky, busy or restarting tracking store.

Every MLflow call the runner makes goes through `Tracking`: transient failures (refused or reset
connections, timeouts, 5xx/429 answers, "database is locked") are retried with exponential backoff and
jitter for up to SEEDLM_TRACKING_RETRY_S seconds (default 300), each retry reported on the `seedlm.tracking`
logger. Metrics are buffered: training never waits on the server. What still cannot be delivered when the
stage ends (metrics, params, tags, artifacts, the final status) is saved to `.seedlm/tracking-backlog/<run
id>.jsonl`, reported, and sent later by `python -m components.retry replay` (to MLFLOW_TRACKING_URI if set).
Runs carry their host and process: a new run of a stage marks those its killed predecessors left RUNNING as KILLED.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from components.common import StageError, redact

log = logging.getLogger("seedlm.tracking")

BUDGET_ENV = "SEEDLM_TRACKING_RETRY_S"
DEFAULT_BUDGET_S = 300.0
MAX_DELAY_S = 30.0
BACKLOG_DIR = Path(".seedlm") / "tracking-backlog"
MAX_BUFFER = 100_000  # metric values kept in memory while the store is away; beyond, they go to the backlog
TRANSIENT_CODES = {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED",
                   "ABORTED", "UNAVAILABLE"}
TRANSIENT_TEXT = ("database is locked", "connection", "max retries exceeded", "timed out", "timeout", "temporarily",
                  "error code 5", "error code 429", "broken pipe", "reset by peer", "remote end closed", "unable to open")
RETRIED = {"get_experiment_by_name", "search_runs", "get_run", "set_experiment", "set_tag", "set_tags",
           "log_param", "log_params", "log_artifact", "log_artifacts", "log_table", "log_dict"}
DEFERRABLE = {"set_tag", "set_tags", "log_param", "log_params", "log_artifact", "log_table", "log_dict"}  # to backlog


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
    return (code is None or code in TRANSIENT_CODES) and any(t in text for t in TRANSIENT_TEXT) \
        and type(e).__name__ in ("MlflowException", "RestException", "OperationalError", "OSError")


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


def call(fn: Callable[..., Any], *args: Any, what: str, budget_s: float | None = None,
         on_retry: Callable[[], None] | None = None, also: tuple[str, ...] = (), **kwargs: Any) -> Any:
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
                raise TrackingUnavailable(f"tracking store {_uri()}: {what} failed {attempt} time(s) "
                                          f"({_short(e)}); start the tracking server (or unset "
                                          f"MLFLOW_TRACKING_URI), or raise {BUDGET_ENV}") from e
            log.warning("tracking: %s failed (%s); retry %d in %.1f s", what, _short(e), attempt, wait)
            time.sleep(wait)


@contextlib.contextmanager
def store_lock(uri: str, timeout: float = 600.0) -> Iterator[None]:
    """Hold a file lock beside a sqlite store (`<db folder>/.seedlm/mlflow-init-<db>.lock`) while it is first
    opened: two processes creating or migrating one new store at once corrupt it. No-op for servers."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    from filelock import FileLock

    db = Path(uri.removeprefix("sqlite:///"))
    path = db.parent / ".seedlm" / f"mlflow-init-{db.name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path), timeout=timeout, thread_local=False, is_singleton=False):
        yield


def open_store(mlflow: Any, uri: str, experiment: str) -> None:
    """set_experiment, one process at a time while the store is new. A sqlite store's experiment keeps its
    artifacts beside the database: by default MLflow puts them under the cwd, which for a `dvc exp` run is a
    temp workspace that is deleted afterwards, taking the registered models with it."""
    with store_lock(uri):
        if uri.startswith("sqlite:///") and mlflow.get_experiment_by_name(experiment) is None:
            root = (Path(uri.removeprefix("sqlite:///")).parent / "mlruns").resolve()
            mlflow.create_experiment(experiment, artifact_location=root.as_uri())
        mlflow.set_experiment(experiment)


# ---------------------------------------------------------------- process identity (reaping)
def _start_time(pid: int) -> str | None:
    import psutil
    try:
        return f"{psutil.Process(pid).create_time():.2f}"
    except (psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError):
        return None


def identity() -> dict[str, str]:
    return {"seedlm.host": socket.gethostname(), "seedlm.pid": str(os.getpid()),
            "seedlm.pid_start": _start_time(os.getpid()) or ""}


def gone(tags: dict[str, str]) -> bool:
    """The process that owns a run tagged by `identity()` on this host no longer exists."""
    if tags.get("seedlm.host") != socket.gethostname() or not tags.get("seedlm.pid", "").isdigit():
        return False
    started = _start_time(int(tags["seedlm.pid"]))
    return started is None or (bool(tags.get("seedlm.pid_start")) and started != tags["seedlm.pid_start"])


# ---------------------------------------------------------------- the runner's tracking
class Tracking:
    """The `mlflow` module as the runner uses it, with retries, a metric buffer and a backlog."""

    def __init__(self, mlflow: Any, budget_s: float | None = None) -> None:
        self._mlflow, self.budget_s = mlflow, budget() if budget_s is None else budget_s
        self.failed_attempts = self.undelivered = self._streak = 0
        self.backlog: Path | None = None
        self.run_id: str | None = None
        self._buffer: list[tuple[str, float, int, int]] = []
        self._next_try = 0.0

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._mlflow, name)
        if name in RETRIED and callable(attr):
            return lambda *a, **kw: self._call(name, attr, *a, **kw)
        return attr

    def _count(self) -> None:
        self.failed_attempts += 1

    def _call(self, name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return call(fn, *args, what=name, budget_s=self.budget_s, on_retry=self._count, **kwargs)
        except TrackingUnavailable as e:
            if name not in DEFERRABLE or self.run_id is None:
                raise
            if name == "log_artifact" and args:  # keep a copy (its name is the artifact's): the file may change
                dest = BACKLOG_DIR.resolve() / f"{self.run_id}.files" / os.urandom(4).hex() / Path(args[0]).name
                dest.parent.mkdir(parents=True)
                args = (shutil.copy2(args[0], dest), *args[1:])
            self._save({"op": name, "args": _jsonable(args), "kwargs": _jsonable(kwargs)}, str(e))

    # -- runs
    def start_run(self, **kwargs: Any) -> "_Run":
        resume = kwargs.get("run_id")
        if not resume:
            kwargs["tags"] = {**(kwargs.get("tags") or {}), **identity()}
        active = call(self._mlflow.start_run, what="start_run", budget_s=self.budget_s, on_retry=self._count,
                      **kwargs)
        self.run_id = active.info.run_id
        if resume:
            self.set_tags(identity())
        else:
            self._reap(active, (kwargs.get("tags") or {}).get("seedlm.stage"))
        return _Run(self, active)

    def _reap(self, active: Any, stage: str | None) -> None:
        """Mark RUNNING runs of `stage` whose process on this host is gone as KILLED."""
        if not stage:
            return
        query = (f"attributes.status = 'RUNNING' and tags.`seedlm.stage` = '{stage}' and "
                 f"tags.`seedlm.host` = '{socket.gethostname()}'")
        try:
            client = self._mlflow.MlflowClient()
            runs = call(client.search_runs, [active.info.experiment_id], query, max_results=200, what="search_runs",
                        budget_s=min(self.budget_s, 30.0))
            for r in runs:
                if r.info.run_id != active.info.run_id and gone(r.data.tags):
                    client.set_tag(r.info.run_id, "seedlm.reaped", f"process {r.data.tags.get('seedlm.pid')} is "
                                   f"gone (killed); marked KILLED by run {active.info.run_id}")
                    client.set_terminated(r.info.run_id, "KILLED")
                    log.warning("tracking: run %s of %s was left RUNNING by a killed process; marked KILLED",
                                r.info.run_id, stage)
        except Exception as e:  # noqa: BLE001 - housekeeping must never fail a stage
            log.warning("tracking: could not check for runs left RUNNING by killed processes (%s)", _short(e))

    # -- metrics: buffered, never blocking the stage on an unreachable store
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        now = int(time.time() * 1000)
        self._buffer += [(str(k), float(v), now, int(step or 0)) for k, v in metrics.items()]
        if len(self._buffer) > MAX_BUFFER:
            self._save({"op": "metrics", "metrics": self._buffer}, "metric buffer full while the store is away")
            self._buffer = []
        if time.monotonic() >= self._next_try:
            self.flush()

    def metric_logger(self) -> Callable[[dict[str, float], int | None], None]:
        """A StageContext.log that buffers and sends metrics whenever the store answers."""
        return lambda metrics, step=None: self.log_metrics(metrics, step)

    def flush(self, final: bool = False) -> bool:
        """Send buffered metrics: one attempt (final: retried for the whole budget). True when all went."""
        if not self._buffer or self.run_id is None:
            return True
        from mlflow.entities import Metric

        client, batch = self._mlflow.MlflowClient(), self._buffer
        send = lambda: [client.log_batch(self.run_id, metrics=[Metric(*m) for m in batch[i:i + 1000]])  # noqa: E731
                        for i in range(0, len(batch), 1000)]
        try:
            if final:
                call(send, what=f"log {len(batch)} metric value(s)", budget_s=self.budget_s, on_retry=self._count)
            else:
                with fail_fast():
                    send()
        except Exception as e:  # noqa: BLE001
            if not final and is_transient(e):
                self._streak, wait = self._streak + 1, delay(self._streak + 1)
                self._next_try = time.monotonic() + wait
                self._count()
                log.warning("tracking: metrics not sent (%s); %d value(s) buffered, training goes on; next try in "
                            "%.1f s", _short(e), len(batch), wait)
                return False
            if isinstance(e, TrackingUnavailable) or is_transient(e):
                self._save({"op": "metrics", "metrics": batch}, _short(e))
                self._buffer = []
                return False
            raise
        if self._streak:
            log.warning("tracking: the store answers again; %d buffered metric value(s) sent", len(batch))
        self._buffer, self._streak, self._next_try = [], 0, 0.0
        return True

    def end(self, status: str) -> None:
        """Final flush and the run's end status (both saved to the backlog if the store stays away)."""
        self.flush(final=True)
        with contextlib.suppress(Exception):  # the retries, recorded on the run itself when it can be
            if self.failed_attempts:
                call(self._mlflow.MlflowClient().set_tag, self.run_id, "seedlm.tracking.failed_attempts",
                     str(self.failed_attempts), what="set_tag", budget_s=min(self.budget_s, 10.0))
        try:
            call(self._mlflow.MlflowClient().set_terminated, self.run_id, status, what=f"end run ({status})",
                 budget_s=self.budget_s, on_retry=self._count)
        except TrackingUnavailable as e:
            self._save({"op": "terminate", "status": status}, str(e))
        self.report()

    # -- backlog
    def _save(self, entry: dict[str, Any], why: str) -> None:
        BACKLOG_DIR.mkdir(parents=True, exist_ok=True)
        self.backlog = BACKLOG_DIR.resolve() / f"{self.run_id}.jsonl"
        with open(self.backlog, "a", encoding="utf-8") as f:
            f.write(json.dumps({"run_id": self.run_id, "uri": redact(self._mlflow.get_tracking_uri()), **entry}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.undelivered += len(entry.get("metrics", ())) or 1
        log.error("tracking: %s not delivered (%s); saved to %s", entry["op"], why, self.backlog)

    def report(self) -> None:
        """One line on stderr when anything needed a retry (and the replay command when something is saved)."""
        if self.undelivered:
            print(f"seedlm tracking: WARNING: {self.undelivered} tracking item(s) of run {self.run_id} could not be "
                  f"delivered ({self.failed_attempts} failed attempts); the stage's outputs are complete. Send them "
                  f"with `python -m components.retry replay {self.backlog}`", file=sys.stderr)
        elif self.failed_attempts:
            print(f"seedlm tracking: {self.failed_attempts} failed attempt(s) retried; everything was delivered",
                  file=sys.stderr)


class _Run:
    """`with tracking.start_run(...) as run:` — ends the run through the retrying `Tracking.end`."""

    def __init__(self, tracking: Tracking, active: Any) -> None:
        self.tracking, self.active = tracking, active

    def __enter__(self) -> Any:  # the ActiveRun, as `with mlflow.start_run() as run` gives
        return self.active

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        status = "FINISHED" if exc_type is None else "KILLED" if exc_type is KeyboardInterrupt else "FAILED"
        mlflow = self.tracking._mlflow
        stack = mlflow.tracking.fluent._active_run_stack.get()
        if stack and stack[-1].info.run_id == self.active.info.run_id:
            stack.pop()  # leave the fluent state as mlflow.end_run would; the status goes through our retries
            mlflow.environment_variables.MLFLOW_RUN_ID.unset()
            mlflow.tracking.fluent._last_active_run_id.set(self.active.info.run_id)
        try:
            self.tracking.end(status)
        except Exception:  # noqa: BLE001 - never mask the stage's own error
            if exc_type is None:
                raise
            log.exception("tracking: could not end run %s", self.active.info.run_id)
        return False


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


# ---------------------------------------------------------------- replay
def replay(path: Path) -> int:
    """Send one backlog file to its run(s); the file is removed when everything went through."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag

    lines = path.read_text(encoding="utf-8").splitlines()
    if lines and not lines[-1].rstrip().endswith("}"):  # a kill while the last line was being written
        log.warning("%s: skipping its torn last line", path)
        lines = lines[:-1]
    entries = [json.loads(line) for line in lines if line.strip()]
    for e in entries:
        client, run_id, op = MlflowClient(os.environ.get("MLFLOW_TRACKING_URI") or e["uri"]), e["run_id"], e["op"]
        args, kwargs = e.get("args", []), e.get("kwargs", {})
        if op == "metrics":
            ms = [Metric(*m) for m in e["metrics"]]
            for i in range(0, len(ms), 1000):
                call(client.log_batch, run_id, metrics=ms[i:i + 1000], what="log_batch")
        elif op == "terminate":
            call(client.set_terminated, run_id, e["status"], what="set_terminated")
        elif op in ("log_params", "set_tags"):
            data = {**(args[0] if args else {}), **kwargs.get("params", {}), **kwargs.get("tags", {})}
            items = [(Param if op == "log_params" else RunTag)(k, str(v)) for k, v in data.items()]
            call(client.log_batch, run_id, **{"params" if op == "log_params" else "tags": items}, what=op)
        else:  # log_param, set_tag, log_artifact, log_table, log_dict: the client's form takes the run id first
            call(getattr(client, op), run_id, *args, what=op, **kwargs)
    shutil.rmtree(path.with_suffix(".files"), ignore_errors=True)
    path.unlink()
    return len(entries)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m components.retry", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    rp = sub.add_parser("replay", help="send saved tracking backlogs")
    rp.add_argument("files", nargs="*", type=Path, help=f"backlog files (default: {BACKLOG_DIR}/*.jsonl)")
    args = parser.parse_args(argv)
    files = args.files or sorted(BACKLOG_DIR.glob("*.jsonl"))
    failed = 0
    for f in files:
        try:
            print(f"{f}: {replay(f)} item(s) sent")
        except Exception as e:  # noqa: BLE001 - report each file, keep going
            failed += 1
            print(f"{f}: not sent ({_short(e)}); try again later", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
