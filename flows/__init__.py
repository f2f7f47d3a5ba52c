"""Prefect flows: wiring only. The work lives in components/."""

import os

for _key, _value in {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}.items():
    os.environ.setdefault(_key, _value)

STAGE_LOGGERS = ("seedlm", "components")
"""The stages' loggers (training progress, tracking retries, warnings): what a stage has to say."""


def _in_a_run(record: object) -> bool:
    from prefect.context import FlowRunContext, TaskRunContext

    return TaskRunContext.get() is not None or FlowRunContext.get() is not None


def stage_logs() -> None:
    """Send the stage loggers' INFO lines to the log of the Prefect flow or task run they are written in (and,
    through the root logger, to the terminal), as PREFECT_LOGGING_EXTRA_LOGGERS would, also where Prefect set
    up logging before this package was imported (a worker's flow-run process). Idempotent."""
    import logging

    from prefect.logging.handlers import APILogHandler

    for name in STAGE_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.INFO)
        if not any(isinstance(h, APILogHandler) for h in logger.handlers):
            handler = APILogHandler()
            handler.addFilter(_in_a_run)  # outside a run (a stage run by hand) there is no run log to write to
            logger.addHandler(handler)
