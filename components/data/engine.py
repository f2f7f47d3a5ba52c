"""Where preprocess's per-piece work runs (`preprocess.engine`, `preprocess.workers`).

local, 1 worker: in this process, one piece at a time (the tokenizer still encodes on every core).
local, N workers: a pool of N processes (spawned), each encoding on cores/N threads.
dask: tasks on a Dask cluster (dask.distributed): the scheduler at `preprocess.dask_address`, or a local
cluster of N worker processes when that is empty. No orchestrator runs inside the stage.

Results always come back in the order of the jobs, so the outputs do not depend on the engine.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any

THREADS_ENV = "RAYON_NUM_THREADS"
"""Threads of the tokenizers library's thread pool (read once, at its first parallel call in a process)."""


def _threads(workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // workers)


def _init_worker(threads: int) -> None:
    os.environ.setdefault(THREADS_ENV, str(threads))


def call_with_threads(fn: Callable[[Any], Any], job: Any, threads: int) -> Any:
    """Run fn(job) in a worker process whose tokenizer thread pool gets `threads` threads (0: its default)."""
    if threads:
        _init_worker(threads)
    return fn(job)


class Runner:
    """Maps a per-piece function over jobs on the configured engine; a pool or cluster lives as long as the
    `with` block, shared by both passes."""

    def __init__(self, workers: int = 1, engine: str = "local", address: str | None = None) -> None:
        self.workers, self.engine, self.address = workers, engine, address
        self._stack = contextlib.ExitStack()
        self._pool: ProcessPoolExecutor | None = None
        self._dask: Any = None

    def __enter__(self) -> Runner:
        if self.engine == "dask":
            from components.data import dask_engine

            self._dask = self._stack.enter_context(dask_engine.cluster(self.workers, self.address))
        elif self.workers > 1:
            self._pool = self._stack.enter_context(
                ProcessPoolExecutor(
                    self.workers,
                    mp_context=get_context("spawn"),
                    initializer=_init_worker,
                    initargs=(_threads(self.workers),),
                )
            )
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.close()

    def map(self, fn: Callable[[Any], Any], jobs: Iterable[Any], name: str = "pieces") -> Iterator[Any]:
        """fn(job) for every job, in order (lazily in this process; as they finish elsewhere)."""
        jobs = list(jobs)
        if self._dask is not None:
            from components.data import dask_engine

            threads = 0 if self.address else _threads(self.workers)  # a remote worker knows its own cores
            return iter(dask_engine.run(fn, jobs, self._dask, threads, name))
        if self._pool is not None:
            return self._pool.map(fn, jobs)
        return map(fn, jobs)
