"""One stage, wherever it runs: inside the pipeline's flow run, or as a flow run of its own deployment
`seedlm-stage/<stage>` on a worker of the stage's work pool (`orchestration.pools`).

Either way the stage runs the same steps in the workspace it is given: check its inputs out (from
the local DVC cache or the DVC remote), skip it when dvc.lock says it is up to date or DVC's run-cache
holds a run with the same inputs, else run it and record it in dvc.lock, then push its outputs and
run-cache entry to the remote. What it returns (the stage's record: result, dvc.lock entry, how it
was made) is Prefect's cached result under the stage's key, which is DVC's run-cache key.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.runtime import flow_run

import flows  # quiet defaults for prefect/dvc/mlflow; stage_logs
from components.core.config import load_params, stage_output
from components.core.context import StageError
from components.core.io import read_meta, write_text
from components.core.runner import run_stage
from flows import dvcstage

RECORDS = "seedlm-records"
"""Folder (in the DVC remote, or .seedlm/ without one) holding stage records: Prefect's cache."""


def record_storage(root: Path, remote_url: str | None) -> str:
    """The Prefect storage block (slug) for stage records, beside the data they describe: in the DVC
    remote when there is one (so a record implies its outputs can be pulled), else in this workspace."""
    from prefect.filesystems import LocalFileSystem, RemoteFileSystem

    base = f"{remote_url.rstrip('/')}/{RECORDS}" if remote_url else str(Path(root).resolve() / ".seedlm" / "records")
    block_cls = RemoteFileSystem if "://" in base else LocalFileSystem
    name = f"seedlm-records-{hashlib.sha256(base.encode()).hexdigest()[:12]}"
    slug = f"{block_cls.get_block_type_slug()}/{name}"
    try:
        if block_cls.load(name).basepath == base:
            return slug
    except ValueError:  # no such block yet
        pass
    block_cls(basepath=base).save(name, overwrite=True)
    return slug


def read_record(storage: str, key: str) -> dict:
    """The record a stage run filed under `key` in `storage`."""
    from prefect.blocks.core import Block
    from prefect.results import ResultStore

    store = ResultStore(result_storage=Block.load(storage))
    if not store.exists(key):
        raise StageError(
            f"no stage record under key {key} in {storage}: the stage's flow run finished without "
            "filing one (is the worker's DVC remote the pipeline's?)"
        )
    return store.read(key).result


def stage_cache_key(context: Any, parameters: dict[str, Any]) -> str | None:
    """Prefect's cache key of a stage task: the DVC run-cache key it was handed (None: not cacheable)."""
    return parameters.get("key")


@task(name="stage", cache_key_fn=stage_cache_key, persist_result=True, cache_expiration=None)
def execute(
    stage: str,
    root: str,
    key: str | None,
    remote: str | None = None,
    parent_run_id: str | None = None,
    force: bool = False,
    extra: dict[str, Any] | None = None,
) -> dict:
    """Bring `stage` up to date in the workspace at `root` and share it; return its record.

    `remote`: DVC remote name to pull inputs from and push outputs to ('' = the default; None = none)."""
    log = get_run_logger()
    root_path = Path(root)
    params = load_params(root_path / "params.yaml")
    upstream = sorted(set(dvcstage.producers(root_path, stage).values()))
    if upstream:
        dvcstage.materialize(root_path, upstream, remote)
    how, result = "", None
    if not force:
        changed = dvcstage.changes(root_path, stage)
        if not changed:
            how = "up-to-date"
        elif dvcstage.cacheable(root_path, stage) and dvcstage.restore(root_path, stage, remote):
            how = "restored from DVC run-cache"
        else:
            log.info("%s: running (%s)", stage, changed)
    if not how:
        resume = f"{stage}:{key}" if key else None
        result = run_stage(stage, params, parent_run_id=parent_run_id, progress=False, extra=extra, resume_key=resume)
        dvcstage.commit(root_path, stage)
        how = "forced" if force else "ran"
    else:
        log.info("%s: %s; reusing %s", stage, how, stage_output(params, stage))
    if remote is not None:
        dvcstage.push(root_path, [stage], remote)
    if result is None:
        result = read_meta(stage_output(params, stage), stage)["result"]
    return {
        "stage": stage,
        "key": key,
        "how": how,
        "lock": dvcstage.lock_entries(root_path)[stage],
        "result": {k: v for k, v in result.items() if k not in ("artifacts", "tables")},
    }


# ---------------------------------------------------------------- the per-stage deployment
def sync_workspace(root: Path, rev: str | None, params_yaml: str | None, lock: dict | None) -> None:
    """Make this worker's workspace the pipeline's: its git commit, its params.yaml, its dvc.lock entries."""
    if rev:
        git = lambda *a: subprocess.run(["git", *a], cwd=root, capture_output=True, text=True)  # noqa: E731
        head = git("rev-parse", "HEAD").stdout.strip()
        if head != rev:
            git("fetch", "--quiet", "origin")
            done = git("checkout", "--quiet", "--force", "--detach", rev)
            if done.returncode:
                raise StageError(
                    f"{root}: cannot check out commit {rev} ({done.stderr.strip()}); push it to the "
                    "git remote this worker's clone fetches from"
                )
    if params_yaml is not None and (root / "params.yaml").read_text(encoding="utf-8") != params_yaml:
        write_text(root / "params.yaml", params_yaml)
    dvcstage.set_lock_entries(root, lock or {})


@flow(name="seedlm-stage", persist_result=False, log_prints=False)  # why: see flows/pipeline.py
def stage_flow(
    stage: str,
    key: str | None = None,
    rev: str | None = None,
    params_yaml: str | None = None,
    lock: dict[str, dict] | None = None,
    force: bool = False,
    parent_run_id: str | None = None,
    tracking_uri: str | None = None,
    remote: str = "",
    extra: dict[str, Any] | None = None,
    root: str = ".",
) -> dict:
    """Run one stage in this worker's workspace as the pipeline describes it (commit, params.yaml and the
    dvc.lock entries of the stages before it), then file its record for the pipeline."""
    flows.stage_logs()
    root_path = Path(root).resolve()
    os.chdir(root_path)
    sync_workspace(root_path, rev, params_yaml, lock)
    mine = dvcstage.stage_key(root_path, stage)
    if key and mine != key:
        raise StageError(
            f"{root_path}: the inputs of {stage} here differ from the pipeline's (key {mine} vs {key}); "
            f"commit and push code and data changes so every worker checks out the same commit"
            + (f" ({rev})" if rev else "")
        )
    if tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    info = dvcstage.remote_info(root_path, remote)
    if info is None:
        raise StageError(
            f"{root_path}: no DVC remote; stages on workers share data through one "
            "(`dvc remote add -d seedlm /shared/path`, committed in .dvc/config)"
        )
    storage = record_storage(root_path, info[1])
    extra = {**(extra or {}), "prefect_stage_flow_run_id": str(flow_run.get_id() or "")}
    return execute.with_options(result_storage=storage, refresh_cache=True)(
        stage, str(root_path), mine, info[0], parent_run_id, force, extra
    )
