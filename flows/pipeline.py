"""The seedlm pipeline as a Prefect flow: ingest -> preprocess -> pretrain -> sft -> evaluate -> register.

Run it with `python -m flows.pipeline` (no server needed: Prefect's ephemeral mode). Each stage is a
Prefect task keyed by the stage's DVC run-cache key (cmd + deps + params): a key Prefect has a record
for is reused, a stage DVC reports up to date (or finds in its run-cache) is skipped, anything else
runs and is recorded in dvc.lock, so this flow, `dvc repro` and `dvc exp run` share one stage graph.
With `orchestration.mode: deployments` each stage runs as a flow run of its own deployment on its
work pool (see flows/deploy.py); data moves between workers through the DVC remote.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.logging.handlers import APILogHandler
from prefect.runtime import deployment, flow_run
from prefect.states import Completed

import flows  # quiet defaults for prefect/dvc/mlflow; stage_logs
from components.core.config import load_params
from components.core.context import StageError
from components.core.params import ConfigError, parse_overrides
from components.core.stages import STAGES
from components.tracking.store import setup_tracking, tracking_uri
from flows import dvcstage
from flows.orchestration import StageFailed, annotate_version, apply_overrides, outcome, prefect_run_url, submit
from flows.stages import execute, record_storage


def _git_rev(root: Path) -> str | None:
    res = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True)
    return res.stdout.strip() if res.returncode == 0 else None


def _check_deployable(root: Path, remote: tuple[str, str] | None) -> None:
    if remote is None:
        raise ConfigError(
            "orchestration.mode: deployments needs a DVC remote that every worker reaches: "
            "`dvc remote add -d seedlm /shared/path` (committed in .dvc/config) or set "
            "orchestration.dvc_remote"
        )
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        raise ConfigError(
            "orchestration.mode: deployments needs MLFLOW_TRACKING_URI set to a tracking server "
            "(or a store every worker shares), e.g. http://127.0.0.1:5000"
        )


def _check_force(force: list[str] | None) -> None:
    if unknown := set(force or ()) - set(STAGES):
        raise ConfigError(f"force: unknown stage(s) {sorted(unknown)}; stages are {', '.join(STAGES)}")


def _stage(name: str, root: Path, ctx: dict[str, Any]) -> dict:
    """Bring one stage up to date (in-process or on its pool); return its record."""
    log = get_run_logger()
    key = dvcstage.stage_key(root, name)
    forced = name in ctx["force"]
    refresh = forced or key is None or not dvcstage.cacheable(root, name)
    opts = dict(result_storage=ctx["storage"], refresh_cache=refresh, task_run_name=name)
    if ctx["mode"] == "local":
        state = execute.with_options(**opts)(
            name, str(root), key, ctx["remote"], ctx["parent_run_id"], forced, ctx["extra"], return_state=True
        )
    else:
        if key is None:
            raise StageError(
                f"{name}: cannot compute its DVC key (an input is missing from this workspace); "
                f"`dvc status {name}` shows which"
            )
        params = {
            "stage": name,
            "rev": ctx["rev"],
            "params_yaml": (root / "params.yaml").read_text(encoding="utf-8"),
            "lock": {s: e for s, e in dvcstage.lock_entries(root).items() if s in STAGES[: STAGES.index(name)]},
            "force": forced,
            "parent_run_id": ctx["parent_run_id"],
            "tracking_uri": tracking_uri(root),
            "remote": ctx["remote"] or "",
            "extra": ctx["extra"],
        }
        state = submit.with_options(**opts)(name, key, params, ctx["orch"], ctx["storage"], return_state=True)
    record = state.result()
    cached = state.name == "Cached"
    if cached:
        log.info("%s: cached (key %s, %s); nothing to run", name, key, record.get("how"))
    if ctx["mode"] != "local" or cached:
        dvcstage.set_lock_entries(root, {name: record["lock"]})
        if ctx["mode"] == "local" or ctx["orch"].pull_outputs:
            try:
                dvcstage.materialize(root, [name], ctx["remote"])
            except StageError as e:
                if not cached or ctx["mode"] != "local":
                    raise
                log.warning("%s: cached record unusable here (%s); running it", name, e)
                return execute.with_options(**{**opts, "refresh_cache": True})(
                    name, str(root), key, ctx["remote"], ctx["parent_run_id"], forced, ctx["extra"]
                )
    return record


# log_prints off (also against PREFECT_LOGGING_LOG_PRINTS): Prefect's print patch sends print(file=None) to the
# run log even while a library has swapped sys.stdout to capture it. dill.detect.nestedglobals does that around
# dis.dis() when `datasets` fingerprints an in-memory Arrow table (evaluate): 50-110 lines of bytecode in the
# task log, and dill saw no globals. Stages report through `logging` (flows/__init__.py: stage_logs).
@flow(name="seedlm", log_prints=False)
def pipeline(
    root: str = ".", force: list[str] | None = None, overrides: dict[str, Any] | None = None, mode: str | None = None
) -> dict:
    """Run the six stages in order from the repo at `root`; `force` reruns the named stages; `overrides`
    changes params.yaml settings (dotted keys) first (a deployment's run starts from the committed
    params.yaml); `mode` overrides orchestration.mode."""
    flows.stage_logs()
    root_path = Path(root).resolve()
    os.chdir(root_path)
    if deployment.id:  # a deployment runs the committed settings + its overrides, never last run's leftovers
        subprocess.run(["git", "checkout", "-q", "HEAD", "--", "params.yaml"], cwd=root_path, capture_output=True)
    apply_overrides(root_path, overrides)
    params = load_params(root_path / "params.yaml")  # validate once, fail before any work
    _check_force(force)
    orch = params.orchestration
    mode = mode or orch.mode
    if mode not in ("local", "deployments"):
        raise ConfigError(f"mode: {mode!r}; use local or deployments")
    remote = dvcstage.remote_info(root_path, orch.dvc_remote)
    if mode == "deployments":
        _check_deployable(root_path, remote)
    mlflow = setup_tracking(root_path)
    run_id = str(flow_run.get_id() or "")
    extra = {"prefect_flow_run_id": run_id, "prefect_flow_run_url": prefect_run_url(run_id) or ""}
    tags = {"seedlm.pipeline": "prefect", "seedlm.mode": mode, "prefect_flow_run_id": run_id}
    records: dict[str, dict] = {}
    with mlflow.start_run(run_name="pipeline", tags=tags) as parent:
        ctx = {
            "mode": mode,
            "force": set(force or ()),
            "orch": orch,
            "remote": remote[0] if remote else None,
            "storage": record_storage(root_path, remote[1] if remote else None),
            "extra": extra,
            "parent_run_id": parent.info.run_id,
            "rev": _git_rev(root_path),
        }
        name = STAGES[0]
        try:
            for name in STAGES:
                records[name] = _stage(name, root_path, ctx)
        except Exception as e:
            mlflow.set_tags({"seedlm.outcome": "failed", "seedlm.reason": f"{name}: {e}"[:5000]})
            if isinstance(e, (StageError, ConfigError)) and not str(e).startswith(f"{name}:"):
                raise type(e)(f"{name}: {e}") from e
            raise
        reg = records["register"]["result"]
        status, why = outcome(mlflow, reg, records["register"]["how"])
        mlflow.set_tags({"seedlm.outcome": status, "seedlm.reason": why[:5000]})
        mlflow.log_params({"model_name": params.register.model_name})
        annotate_version(mlflow, reg, run_id)
    get_run_logger().info("seedlm: %s", why)
    APILogHandler().flush()  # that line reaches the server before the final state: `deployment run --watch` shows it
    return Completed(message=why, data={n: r["result"] for n, r in records.items()})


def main(argv: list[str] | None = None, *, prog: str = "python -m flows.pipeline", example: str = "") -> int:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__.splitlines()[0], epilog=f"example: {example}" if example else None
    )
    parser.add_argument("--root", default=".", help="repo root holding params.yaml and dvc.yaml")
    parser.add_argument("--force", action="append", default=[], metavar="STAGE", help="rerun this stage")
    parser.add_argument(
        "-S",
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="change a params.yaml setting first (YAML value), like `dvc exp run -S`",
    )
    parser.add_argument("--mode", choices=("local", "deployments"), help="override orchestration.mode")
    args = parser.parse_args(argv)
    try:
        overrides = parse_overrides(args.set)
        load_params(Path(args.root) / "params.yaml", overrides)  # a bad setting fails before Prefect starts
        _check_force(args.force)
        state = pipeline(
            root=args.root, force=args.force, overrides=overrides or None, mode=args.mode, return_state=True
        )
        results = state.result()
    except (ConfigError, StageError, StageFailed) as e:
        print(f"seedlm: error: {e}", file=sys.stderr)
        return 2
    ev = results.get("evaluate", {}).get("sft", {})
    reg = results.get("register", {})
    print("seedlm: held-out " + ", ".join(f"{k}={v:.3f}" for k, v in ev.items() if isinstance(v, float)))
    print(f"seedlm: {state.message} ({reg.get('model_uri')})")  # promoted / gated out / unchanged, and why
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
