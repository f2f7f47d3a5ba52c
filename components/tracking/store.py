"""Opening the tracking store: one creator at a time, and a sqlite store's artifacts beside it."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

EXPERIMENT = "seedlm"
"""The MLflow experiment every seedlm run goes to."""


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


def tracking_uri(root: Path | None = None) -> str:
    """MLFLOW_TRACKING_URI, else a sqlite store at the repo root (DVC_ROOT: `dvc exp` temp workspaces share it)."""
    root = root or Path(os.environ.get("DVC_ROOT") or Path.cwd())
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root.resolve()}/mlflow.db"


def setup_tracking(root: Path | None = None):
    import mlflow

    logging.getLogger("alembic").setLevel(logging.WARNING)
    uri = tracking_uri(root)
    mlflow.set_tracking_uri(uri)
    open_store(mlflow, uri, EXPERIMENT)  # one creator at a time; artifacts beside a sqlite store, not in cwd
    return mlflow
