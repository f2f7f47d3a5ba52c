"""The tracking store a test file uses: a context manager importable by any test file (a conftest is not:
each test folder has its own `conftest` module)."""

from __future__ import annotations

import contextlib

import pytest


@contextlib.contextmanager
def current_store(uri: str, experiment_id: str | None = None):
    """Make `uri` the tracking store (and `experiment_id` the experiment) until exit, then put back the URI,
    env and active experiment other test files had."""
    import mlflow
    from mlflow.tracking._tracking_service import utils as tracking_utils

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tracking_utils, "_tracking_uri", tracking_utils._tracking_uri)
        mp.setattr(mlflow.tracking.fluent, "_active_experiment_id", None)  # not another file's experiment
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        if experiment_id is None:
            mp.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
        else:
            mp.setenv("MLFLOW_EXPERIMENT_ID", experiment_id)  # runs land here
        mlflow.set_tracking_uri(uri)
        yield
