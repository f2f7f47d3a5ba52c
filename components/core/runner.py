"""Runs one stage with tracking: the thin `main()` behind `python -m components.<stage>`.

The stage's compute never touches MLflow; this wrapper opens the run named after the stage
(nested under the pipeline's parent run when there is one), hands the stage a `StageContext`
whose `log` reports metrics, logs the stage's settings and result, and turns user errors into one
clear line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from components.core.config import Params, load_params, stage_config
from components.core.context import RUN_ID, StageContext, StageError
from components.core.params import ConfigError, flat, parse_overrides
from components.core.redact import redact
from components.core.stages import STAGES
from components.tracking import client, retries
from components.tracking.store import EXPERIMENT, setup_tracking

PARENT_ENV = "SEEDLM_PARENT_RUN_ID"
"""A pipeline run exports its parent run id here so stages run by `dvc repro` nest under it too."""

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def numeric(result: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in flat(result).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


RESUME_TAG = "seedlm.resume_key"
"""Tag of a stage run that a retry of the same stage (same inputs, same pipeline run) continues."""


def resumable_run(mlflow: Any, stage: str, resume_key: str, parent_run_id: str | None) -> str | None:
    """The newest unfinished run of `stage` tagged `resume_key` (under `parent_run_id`), e.g. one whose
    worker died mid-training; None when there is none."""
    exp = mlflow.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        return None
    key = resume_key.replace("'", "")
    query = f"tags.`{RESUME_TAG}` = '{key}' and tags.`seedlm.stage` = '{stage}'"
    if parent_run_id:
        query += f" and tags.`mlflow.parentRunId` = '{parent_run_id}'"
    runs = mlflow.search_runs(
        [exp.experiment_id], filter_string=query, order_by=["attributes.start_time DESC"], output_format="list"
    )
    return next((r.info.run_id for r in runs if r.info.status != "FINISHED"), None)


def run_stage(
    stage: str,
    params: Params,
    *,
    parent_run_id: str | None = None,
    progress: bool = True,
    extra: dict[str, Any] | None = None,
    resume_key: str | None = None,
) -> dict:
    """Run one stage inside its own MLflow run (nested under `parent_run_id` when given).

    With `resume_key`, an unfinished run of the same stage and key is continued instead of starting a
    new one (a retry after a crash logs into the run it resumes)."""
    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")
    module = importlib.import_module(f"components.{stage}")
    mlflow = client.Tracking(
        retries.call(setup_tracking, what="connect to the tracking store", also=("RESOURCE_ALREADY_EXISTS",))
    )  # retried with backoff, reported
    parent_run_id = parent_run_id or os.environ.get(PARENT_ENV) or None
    tags = {"seedlm.stage": stage}
    nested = mlflow.active_run() is not None
    resume = resumable_run(mlflow, stage, resume_key, parent_run_id) if resume_key else None
    if resume_key:
        tags[RESUME_TAG] = resume_key
    start = (
        dict(run_id=resume, nested=nested)
        if resume
        else dict(run_name=stage, parent_run_id=parent_run_id, nested=nested, tags=tags)
    )
    with mlflow.start_run(**start) as run:
        if resume:
            mlflow.set_tag("seedlm.resumed", "true")
        mlflow.log_params({k: redact(str(v))[:6000] for k, v in flat(stage_config(params, stage)).items()})
        log = mlflow.metric_logger()  # buffered: training never waits on the tracking store

        ctx = StageContext(
            log=log, run_id=run.info.run_id, parent_run_id=parent_run_id, progress=progress, extra=dict(extra or {})
        )
        token = RUN_ID.set(run.info.run_id)
        try:
            result = module.run(params, ctx)
        finally:
            RUN_ID.reset(token)
        metrics = {k: v for k, v in numeric(result).items() if not k.startswith("history")}
        if metrics:
            mlflow.log_metrics(metrics)
        for path in result.get("artifacts", []):
            if Path(path).is_file():
                mlflow.log_artifact(str(path))
        for path in result.get("tables", []):  # JSON {column: [values]} -> an MLflow table (UI: Evaluation)
            if Path(path).is_file():
                mlflow.log_table(data=json.loads(Path(path).read_text(encoding="utf-8")), artifact_file=Path(path).name)
    return result


def stage_resume_key(stage: str, params: Params) -> str | None:
    """The stage's own resume key (`resume_key(params)` in its module: pretrain/sft name their checkpoint
    folder), so rerunning `python -m components.<stage>` after a kill continues the MLflow run it resumes."""
    fn = getattr(importlib.import_module(f"components.{stage}"), "resume_key", None)
    return fn(params) if fn else None


def main(stage: str, argv: list[str] | None = None, *, prog: str | None = None, example: str = "") -> int:
    parser = argparse.ArgumentParser(
        prog=prog or f"python -m components.{stage}",
        description=f"Run the {stage} stage.",
        epilog=f"example: {example}" if example else None,
    )
    parser.add_argument("--params", default="params.yaml", help="settings file (default: params.yaml)")
    parser.add_argument(
        "-S",
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a setting, e.g. -S pretrain.max_steps=50 (YAML value)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        params = load_params(args.params, parse_overrides(args.set))
        result = run_stage(stage, params, progress=not args.no_progress, resume_key=stage_resume_key(stage, params))
    except (ConfigError, StageError) as e:
        print(f"seedlm {stage}: error: {redact(str(e))}", file=sys.stderr)
        return 2
    summary = {k: v for k, v in result.items() if k not in ("history", "artifacts", "tables")}
    print(f"seedlm {stage}: done {json.dumps(summary, default=str)[:2000]}")
    return 0


def cli(argv: list[str], *, prog: str = "seedlm stage", example: str = "") -> int:
    """`seedlm stage NAME [options]`: the stage's own command line (`python -m components.NAME`)."""
    if not argv or argv[0] in ("-h", "--help"):
        print(
            f"usage: {prog} {{{','.join(STAGES)}}} [--params P] [-S KEY=VALUE ...] [--no-progress]\n\n"
            f"Run one stage with tracking, as dvc.yaml does.\n\nexample: {example}"
        )
        return 0 if argv else 2
    stage, rest = argv[0], argv[1:]
    if stage not in STAGES:
        print(f"{prog}: error: unknown stage {stage!r}; stages are {', '.join(STAGES)}", file=sys.stderr)
        return 2
    if stage == "evaluate":
        from components.evaluate import main as evaluate_main

        return evaluate_main(rest, prog=f"{prog} evaluate")
    return main(stage, rest, prog=f"{prog} {stage}")
