"""The seedlm pipeline as a Prefect flow: ingest -> preprocess -> pretrain -> sft -> evaluate -> register.

Run it with `python -m flows.pipeline` (no server needed: Prefect's ephemeral mode). Each stage is a
Prefect task named after the stage; it runs only when DVC says the stage changed, then records the
result in dvc.lock, so this flow and `dvc repro` share one stage graph.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import flows  # noqa: F401  (quiet defaults for prefect/dvc/mlflow)
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from components.common import StageError, read_meta
from components.config import STAGES, ConfigError, load_params, stage_output
from components.runner import run_stage, setup_tracking
from flows import dvcstage


def _stage(stage: str, root: str, parent_run_id: str | None, force: bool = False) -> dict:
    log = get_run_logger()
    root_path = Path(root)
    params = load_params(root_path / "params.yaml")
    changed = dvcstage.changes(root_path, stage)
    if not changed and not force:
        log.info("%s: up to date in dvc.lock; reusing %s", stage, stage_output(params, stage))
        return read_meta(stage_output(params, stage), stage)["result"]
    log.info("%s: running (%s)", stage, changed or "forced")
    extra = {"prefect_flow_run_id": str(flow_run.get_id() or "")}
    result = run_stage(stage, params, parent_run_id=parent_run_id, progress=False, extra=extra)
    dvcstage.commit(root_path, stage)
    return result


STAGE_TASKS = {name: task(_stage, name=name, task_run_name=name, cache_policy=NO_CACHE) for name in STAGES}


@flow(name="seedlm", log_prints=True)
def pipeline(root: str = ".", force: list[str] | None = None) -> dict:
    """Run the six stages in order from the repo at `root`; `force` reruns the named stages."""
    root = str(Path(root).resolve())
    os.chdir(root)
    params = load_params(Path(root) / "params.yaml")  # validate once, fail before any work
    unknown = set(force or ()) - set(STAGES)
    if unknown:
        raise ConfigError(f"force: unknown stage(s) {sorted(unknown)}; stages are {', '.join(STAGES)}")
    mlflow = setup_tracking(Path(root))
    tags = {"seedlm.pipeline": "prefect", "prefect_flow_run_id": str(flow_run.get_id() or "")}
    results: dict[str, dict] = {}
    with mlflow.start_run(run_name="pipeline", tags=tags) as parent:
        for name in STAGES:
            results[name] = STAGE_TASKS[name](name, root, parent.info.run_id, name in (force or ()))
        mlflow.log_params({"model_name": params.register.model_name})
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=".", help="repo root holding params.yaml and dvc.yaml")
    parser.add_argument("--force", action="append", default=[], metavar="STAGE", help="rerun this stage")
    args = parser.parse_args(argv)
    try:
        results = pipeline(root=args.root, force=args.force)
    except (ConfigError, StageError) as e:
        print(f"seedlm: error: {e}", file=sys.stderr)
        return 2
    ev = results.get("evaluate", {}).get("sft", {})
    reg = results.get("register", {})
    print("seedlm: held-out " + ", ".join(f"{k}={v:.3f}" for k, v in ev.items() if isinstance(v, float)))
    print(f"seedlm: registered {reg.get('model_uri')} (promoted to champion: {reg.get('promoted')})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
