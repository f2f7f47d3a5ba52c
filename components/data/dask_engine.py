"""preprocess.engine: dask — the per-piece functions as Prefect tasks on a Dask cluster (prefect-dask).

With `preprocess.dask_address` the tasks go to that scheduler: its workers need this project installed (the
same code), the data folders at the same paths (a shared filesystem), and, for Prefect's task states, the
Prefect API this process uses (PREFECT_API_URL). Without an address a local cluster of `preprocess.workers`
processes runs them. Results come back in the order of the jobs.
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
            "preprocess.engine: dask needs prefect-dask (and dask.distributed); `pip install -c constraints.txt "
            "prefect-dask==0.3.7` or set preprocess.engine: local"
        ) from None
    if address:
        yield address
        return
    with contextlib.ExitStack() as stack:
        env = _prefect_env(stack)
        local = stack.enter_context(
            LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None, env=env)
        )
        yield local.scheduler_address


def _prefect_env(stack: contextlib.ExitStack) -> dict[str, str]:
    """Local workers report task states to this process's Prefect API; with none configured, to the temporary
    server this process would start anyway (not one more per worker), stopped at the end if started here."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value():
        return {"PREFECT_API_URL": PREFECT_API_URL.value()}
    if not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return {}
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the one this process's flows use (a singleton)
    if server.server_process is None:
        server.start()
        stack.callback(_stop, server)
    return {"PREFECT_API_URL": server.api_url}


def _stop(server: Any) -> None:
    """Send the logs still queued for the temporary server, then stop it."""
    from prefect.logging.handlers import APILogWorker

    with contextlib.suppress(Exception):  # best effort: logs only
        APILogWorker.drain_all(timeout=5, at_exit=False)
    server.stop()


def run(fn: Callable[[Any], Any], jobs: list[Any], address: str, threads: int, name: str) -> list[Any]:
    """fn(job) for every job as one Prefect task each, in a flow run on the Dask scheduler at `address`."""
    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE
    from prefect_dask import DaskTaskRunner

    from components.data.engine import call_with_threads

    piece = task(call_with_threads, name=f"preprocess-{name}", cache_policy=NO_CACHE, persist_result=False)

    @flow(name=f"seedlm-preprocess-{name}", task_runner=DaskTaskRunner(address=address), persist_result=False)
    def pieces() -> list[Any]:
        futures = [piece.submit(fn, job, threads) for job in jobs]
        return [f.result() for f in futures]

    try:
        return pieces()
    except OSError as e:
        raise StageError(
            f"preprocess.dask_address: cannot reach the Dask scheduler at {address} ({e}); start it "
            "(`dask scheduler`) or set preprocess.dask_address: null for a local cluster"
        ) from None
