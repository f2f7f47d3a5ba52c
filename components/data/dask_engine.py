"""preprocess.engine: dask — the per-piece functions as tasks on a Dask cluster (dask.distributed).

With `preprocess.dask_address` the tasks go to that scheduler: its workers need this project installed (the
same code) and the data folders at the same paths (a shared filesystem). Without an address a local cluster of
`preprocess.workers` processes runs them. Results come back in the order of the jobs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from components.core.context import StageError


@contextlib.contextmanager
def cluster(workers: int, address: str | None) -> Iterator[str]:
    """The scheduler address to submit to: `address`, or a local cluster's for the `with` block."""
    try:
        from distributed import LocalCluster
    except ImportError:
        raise StageError(
            "preprocess.engine: dask needs dask.distributed; `pip install -c constraints.txt distributed` "
            "or set preprocess.engine: local"
        ) from None
    if address:
        yield address
        return
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as local:
        yield local.scheduler_address


def run(fn: Callable[[Any], Any], jobs: list[Any], address: str, threads: int, name: str) -> list[Any]:
    """fn(job) for every job as one Dask task each on the scheduler at `address`, results in job order.

    Plain dask.distributed, no orchestrator inside the stage: the stage is the same code under `dvc repro`, the
    Prefect flow or a terminal, and the cluster's dashboard shows the tasks (keys `preprocess-<name>-<i>`)."""
    from distributed import Client

    from components.data.engine import call_with_threads

    try:
        with Client(address, timeout="30s") as client:
            keys = [f"preprocess-{name}-{i}" for i in range(len(jobs))]
            futures = client.map(call_with_threads, [fn] * len(jobs), jobs, [threads] * len(jobs), key=keys)
            return client.gather(futures)
    except OSError as e:
        raise StageError(
            f"preprocess.dask_address: cannot reach the Dask scheduler at {address} ({e}); start it "
            "(`dask scheduler`) or set preprocess.dask_address: null for a local cluster"
        ) from None
