"""A thread that decodes the rows of concurrent requests together (continuous batching).

Requests queue up; before every decode step the waiting rows join the running batch (up to
`max_batch`), so a new request waits at most one step plus its own prompt pass, and aggregate
throughput grows with the number of clients. Each row keeps its own sampling state and text, so a
request never sees another's tokens. `emit` callbacks run on this thread and must not block.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass, field

from components.serving.decode import Row, drive
from components.serving.engine import Engine

log = logging.getLogger(__name__)


class Busy(RuntimeError):
    """The queue is full; try again later."""


@dataclass
class Batcher:
    """Owns the decoding thread of one engine. `submit` rows, `close` to finish what was submitted and stop."""

    engine: Engine
    max_batch: int = 16
    max_waiting: int = 256
    _waiting: deque = field(default_factory=deque)
    _active: list = field(default_factory=list)
    _cv: threading.Condition = field(default_factory=threading.Condition)
    _closed: bool = False
    _thread: threading.Thread | None = None

    def __post_init__(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"batcher-{self.engine.label}", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._active)

    def submit(self, rows: list[Row]) -> None:
        """Queue `rows` (one request's choices) to be decoded; Busy when the queue is full."""
        with self._cv:
            if self._closed:
                raise RuntimeError(f"batcher of {self.engine.label} is closed")
            if len(self._waiting) + len(rows) > self.max_waiting:
                raise Busy(f"{len(self._waiting)} rows are waiting (limit {self.max_waiting})")
            self._waiting.extend(rows)
            self._cv.notify()

    def close(self, wait: bool = False) -> None:
        """Stop taking rows; the thread ends once the submitted ones are done."""
        with self._cv:
            self._closed = True
            self._cv.notify()
        if wait and self._thread is not None:
            self._thread.join()

    def _take(self, n: int, idle: bool) -> list[Row]:
        with self._cv:
            self._active = [r for r in self._active if r.finish_reason is None]
            while idle and not self._waiting and not self._closed:
                self._cv.wait()
            rows = []
            while self._waiting and len(rows) < n:
                row = self._waiting.popleft()
                if not row.cancelled.is_set():  # its client left while it waited
                    rows.append(row)
            self._active.extend(rows)
            return rows

    def _run(self) -> None:
        engine = self.engine
        while True:
            try:
                drive(
                    engine.model, self._take, max_batch=self.max_batch, pad_id=engine.pad_id, stop_ids=engine.stop_ids
                )
                return  # closed and drained
            except Exception:  # a failed step must not strand the requests in it, nor stop the server
                log.exception("decoding failed for %d rows of %s", len(self._active), engine.label)
                self._fail_active()

    def _fail_active(self) -> None:
        with self._cv:
            failed, self._active = [r for r in self._active if r.finish_reason is None], []
        for row in failed:
            row.finish_reason = "error"
            if row.emit is not None:
                row.emit(row, "", "error")
