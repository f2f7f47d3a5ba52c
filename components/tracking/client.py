"""The runner's MLflow client: every call retried (components.tracking.retries), metrics buffered so
training never waits on the server, and what cannot be delivered saved to a backlog for replay."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from components.core.redact import redact
from components.tracking.reaper import gone, identity
from components.tracking.retries import TrackingUnavailable, _short, budget, call, delay, fail_fast, is_transient, log

BACKLOG_DIR = Path(".seedlm") / "tracking-backlog"
MAX_BUFFER = 100_000  # metric values kept in memory while the store is away; beyond, they go to the backlog
RETRIED = {
    "get_experiment_by_name",
    "search_runs",
    "get_run",
    "set_experiment",
    "set_tag",
    "set_tags",
    "log_param",
    "log_params",
    "log_artifact",
    "log_artifacts",
    "log_table",
    "log_dict",
}
DEFERRABLE = {"set_tag", "set_tags", "log_param", "log_params", "log_artifact", "log_table", "log_dict"}  # to backlog


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
    def start_run(self, **kwargs: Any) -> _Run:
        resume = kwargs.get("run_id")
        if not resume:
            kwargs["tags"] = {**(kwargs.get("tags") or {}), **identity()}
        active = call(self._mlflow.start_run, what="start_run", budget_s=self.budget_s, on_retry=self._count, **kwargs)
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
        query = (
            f"attributes.status = 'RUNNING' and tags.`seedlm.stage` = '{stage}' and "
            f"tags.`seedlm.host` = '{socket.gethostname()}'"
        )
        try:
            client = self._mlflow.MlflowClient()
            runs = call(
                client.search_runs,
                [active.info.experiment_id],
                query,
                max_results=200,
                what="search_runs",
                budget_s=min(self.budget_s, 30.0),
            )
            for r in runs:
                if r.info.run_id != active.info.run_id and gone(r.data.tags):
                    client.set_tag(
                        r.info.run_id,
                        "seedlm.reaped",
                        f"process {r.data.tags.get('seedlm.pid')} is "
                        f"gone (killed); marked KILLED by run {active.info.run_id}",
                    )
                    client.set_terminated(r.info.run_id, "KILLED")
                    log.warning(
                        "tracking: run %s of %s was left RUNNING by a killed process; marked KILLED",
                        r.info.run_id,
                        stage,
                    )
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
        send = lambda: [
            client.log_batch(self.run_id, metrics=[Metric(*m) for m in batch[i : i + 1000]])  # noqa: E731
            for i in range(0, len(batch), 1000)
        ]
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
                log.warning(
                    "tracking: metrics not sent (%s); %d value(s) buffered, training goes on; next try in %.1f s",
                    _short(e),
                    len(batch),
                    wait,
                )
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
                call(
                    self._mlflow.MlflowClient().set_tag,
                    self.run_id,
                    "seedlm.tracking.failed_attempts",
                    str(self.failed_attempts),
                    what="set_tag",
                    budget_s=min(self.budget_s, 10.0),
                )
        try:
            call(
                self._mlflow.MlflowClient().set_terminated,
                self.run_id,
                status,
                what=f"end run ({status})",
                budget_s=self.budget_s,
                on_retry=self._count,
            )
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
            print(
                f"seedlm tracking: WARNING: {self.undelivered} tracking item(s) of run {self.run_id} could not be "
                f"delivered ({self.failed_attempts} failed attempts); the stage's outputs are complete. Send them "
                f"with `python -m components.tracking.backlog replay {self.backlog}`",
                file=sys.stderr,
            )
        elif self.failed_attempts:
            print(
                f"seedlm tracking: {self.failed_attempts} failed attempt(s) retried; everything was delivered",
                file=sys.stderr,
            )


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
