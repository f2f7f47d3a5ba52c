"""The index stage in the stage graph, on clone-like tiny repos: `dvc repro index` and the flow's way of running a
stage (run_stage in-process, then dvcstage.commit, as flows/stages.py does) agree: after either, the other has
nothing to do; the stage key is DVC's run-cache key; both build the same chunks (the folders differ only in
LanceDB's random file names and the run metadata)."""

from __future__ import annotations

import contextlib
import subprocess

import pytest
from repos import TINY, make_repo
from servers import BIN, base_env

from components.core.io import read_json
from components.retrieval import store
from flows import dvcstage

UPSTREAM = ("ingest", "preprocess", "index")


@pytest.fixture(scope="module")
def dvc_repo(tmp_path_factory):
    repo = make_repo(tmp_path_factory.mktemp("dvc") / "repo", TINY)
    env = base_env(MLFLOW_TRACKING_URI=f"sqlite:///{repo}/mlflow.db")
    res = subprocess.run([str(BIN / "dvc"), "repro", "index"], cwd=repo, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return repo


@pytest.fixture(scope="module")
def flow_repo(tmp_path_factory):
    import mlflow
    from mlflow.tracking._tracking_service import utils as tracking_utils

    from components.core.config import load_params
    from components.core.runner import run_stage

    repo = make_repo(tmp_path_factory.mktemp("flow") / "repo", TINY)
    with pytest.MonkeyPatch.context() as mp:  # this repo's tracking store until the end, then the previous one
        mp.setattr(tracking_utils, "_tracking_uri", tracking_utils._tracking_uri)
        mp.setattr(mlflow.tracking.fluent, "_active_experiment_id", None)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{repo}/mlflow.db")
        mp.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
        mp.chdir(repo)
        for stage in UPSTREAM:
            run_stage(stage, load_params(repo / "params.yaml"), progress=False)
            dvcstage.commit(repo, stage)
    return repo


def test_after_dvc_repro_the_flow_finds_index_up_to_date_under_its_run_cache_key(dvc_repo):
    assert dvcstage.changes(dvc_repo, "index") == []
    runs = {p.name for p in (dvc_repo / ".dvc/cache/runs").glob("*/*")}
    assert dvcstage.stage_key(dvc_repo, "index") in runs
    assert dvcstage.cacheable(dvc_repo, "index")
    lock = dvcstage.lock_entries(dvc_repo)["index"]
    assert [o["path"] for o in lock["outs"]] == ["data/index", "metrics/index.json"]


def test_after_the_flow_way_dvc_has_nothing_to_redo(flow_repo):
    from dvc.repo import Repo

    with contextlib.chdir(flow_repo), Repo(str(flow_repo)) as repo:
        assert repo.status(targets=["index"]) == {}
        assert repo.reproduce("index") == []


def test_both_ways_build_the_same_index(dvc_repo, flow_repo):
    a, b = dvc_repo / "data/index", flow_repo / "data/index"
    assert read_json(a / "manifest.json") == read_json(b / "manifest.json")
    assert store.open_table(a).to_arrow() == store.open_table(b).to_arrow()
    assert (
        read_json(a / "seedlm.json")["result"]["content_sha256"]
        == read_json(b / "seedlm.json")["result"]["content_sha256"]
    )
