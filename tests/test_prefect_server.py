"""Scheduled runs on real Prefect infrastructure: a `prefect server` on 127.0.0.1, process work pools,
workers, deployments made by `python -m flows.deploy`, runs triggered with `prefect deployment run`.

1. One pool: the nightly deployment runs the whole pipeline in one flow run on one worker and
   registers a model; its cron schedule produces scheduled runs; a bad override fails with the reason.
2. Two pools standing in for CPU and GPU machines, each worker in its own clone that shares only git
   and the DVC remote with the others: stages run as flow runs of their deployments on their pools,
   inputs come from the remote, a training run killed mid-way is resubmitted and resumes from its
   checkpoint in the same MLflow run, the registry (an `mlflow server`) links runs and gate report,
   and nothing is redone: not by the second scheduled run, not by `dvc repro`.
Everything started here is stopped here (workers before the server).
"""
from __future__ import annotations

import contextlib
import glob
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import requests
import yaml

from servers import (BIN, TINY, commit, make_repo, prefect, start_mlflow, start_prefect, start_worker,
                     wait_http)

STAGES = ["ingest", "preprocess", "pretrain", "sft", "evaluate", "register"]
FAST = {**TINY, "evaluate.max_examples": 8, "evaluate.ppl_batches": 2, "evaluate.num_samples": 2,
        "evaluate.bootstrap": 20, "orchestration.poll_s": 1.0, "orchestration.retry_delay_s": 1}
LONGER_PRETRAIN = {"pretrain.max_steps": 300, "pretrain.checkpoint_every": 25, "pretrain.eval_every": 150}


# ---------------------------------------------------------------- helpers
def api_post(api: str, path: str, body: dict) -> list | dict:
    res = requests.post(f"{api}/{path}", json=body, timeout=30)
    res.raise_for_status()
    return res.json()


def deployment(api: str, name: str) -> dict:
    res = requests.get(f"{api}/deployments/name/{name}", timeout=30)
    res.raise_for_status()
    return res.json()


def runs_of(api: str, name: str) -> list[dict]:
    """Flow runs of a deployment that have started, oldest first."""
    dep = deployment(api, name)
    runs = api_post(api, "flow_runs/filter", {"deployments": {"id": {"any_": [dep["id"]]}},
                                              "sort": "EXPECTED_START_TIME_ASC", "limit": 200})
    return [r for r in runs if r["state"]["type"] not in ("SCHEDULED", "PENDING")]


def trigger(env: dict, name: str, *params: str, timeout: float = 420) -> dict:
    """`prefect deployment run NAME -p ...`, then wait for the flow run's final state; return the run."""
    out = prefect(env, "deployment", "run", name, *[x for p in params for x in ("--param", p)])
    run_id = re.search(r"UUID:\s*([0-9a-f-]{36})", out).group(1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = requests.get(f"{env['PREFECT_API_URL']}/flow_runs/{run_id}", timeout=30).json()
        if run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return run
        time.sleep(1)
    raise TimeoutError(f"{name}: flow run {run_id} not final after {timeout} s")


def dvc(repo: Path, *args: str) -> str:
    res = subprocess.run([str(BIN / "dvc"), *args], cwd=repo, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return res.stdout


def deploy(env: dict, cwd: Path, *args: str) -> str:
    res = subprocess.run([sys.executable, "-m", "flows.deploy", *args], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    return res.stdout


def logs(*procs) -> str:
    return "\n".join(f"--- {p.log.name}\n{p.tail(3000)}" for p in procs)


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def infra(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("infra")
    server, api, env = start_prefect(tmp / "prefect-home", wait=False)
    workers: list = []
    started = [server]
    try:
        ml, ml_url = start_mlflow(tmp / "mlflow-server", wait=False)
        started.append(ml)
        wait_http(f"{api}/health", server)
        wait_http(f"{ml_url}/health", ml)
        yield SimpleNamespace(tmp=tmp, api=api, env=env, ml_url=ml_url, workers=workers, server=server)
    finally:
        for w in workers:  # workers first, then the servers
            w.stop()
        for p in reversed(started):
            p.stop()


@pytest.fixture(scope="module")
def solo(infra):
    """One pool, mode local: the nightly deployment runs every stage in its own flow run."""
    t0 = time.monotonic()
    solo_params = {**FAST, "orchestration.pipeline_pool": "solo",
                   "orchestration.pools": {s: "solo" for s in STAGES},
                   "orchestration.schedules": {"nightly": {"cron": "0 3 * * *", "timezone": "UTC",
                                                           "overrides": {"evaluate.num_samples": 3}}}}
    repo = make_repo(infra.tmp / "main", solo_params)
    dvc(repo, "remote", "add", "-d", "shared", str(infra.tmp / "dvc-remote"))
    commit(repo, "shared DVC remote")
    prefect(infra.env, "work-pool", "create", "solo", "--type", "process")
    print(f"\n[{time.monotonic() - t0:.0f}] repo + pool")
    out = deploy(infra.env, repo)
    print(f"[{time.monotonic() - t0:.0f}] deployed")
    (infra.tmp / "w-solo").mkdir()
    worker = start_worker(infra.env, "solo", "solo-1", infra.tmp / "w-solo", infra.tmp / "worker-solo.log")
    infra.workers.append(worker)
    bad = trigger(infra.env, "seedlm/nightly", 'overrides={"pretrain.max_step": 5}')
    print(f"[{time.monotonic() - t0:.0f}] bad run")
    run = trigger(infra.env, "seedlm/nightly")
    worker.stop()
    print(f"\none pool: {time.monotonic() - t0:.0f} s")
    return SimpleNamespace(repo=repo, run=run, bad=bad, deploy_out=out, worker=worker)


@pytest.fixture(scope="module")
def two_pools(infra, solo):
    """Pools cpu and gpu, mode deployments, each worker in its own clone; pretrain is killed once."""
    t0 = time.monotonic()
    main = solo.repo
    subprocess.run(["git", "checkout", "-q", "--", "params.yaml"], cwd=main, check=True)
    params = yaml.safe_load((main / "params.yaml").read_text())
    params["orchestration"].update({
        "mode": "deployments", "pipeline_pool": "cpu", "retries": 1,
        "pools": {s: ("gpu" if s in ("pretrain", "sft", "evaluate") else "cpu") for s in STAGES},
        "schedules": {"nightly": {"cron": "30 2 * * *", "timezone": "UTC", "overrides": LONGER_PRETRAIN}}})
    (main / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    commit(main, "two pools")
    cpu, gpu = infra.tmp / "cpu-clone", infra.tmp / "gpu-clone"
    for clone in (cpu, gpu):
        subprocess.run(["git", "clone", "-q", str(main), str(clone)], check=True)
    for pool in ("cpu", "gpu"):
        prefect(infra.env, "work-pool", "create", pool, "--type", "process")
    deploy(infra.env, cpu, "--source", str(cpu), "--pool-source", f"gpu={gpu}",
           "--env", f"MLFLOW_TRACKING_URI={infra.ml_url}", "--automations")
    workers = {}
    for pool in ("cpu", "gpu"):
        (infra.tmp / f"w-{pool}").mkdir()
        workers[pool] = start_worker(infra.env, pool, f"{pool}-1", infra.tmp / f"w-{pool}",
                                     infra.tmp / f"worker-{pool}.log")
        infra.workers.append(workers[pool])
    killed: list[int] = []
    threading.Thread(target=_kill_after_first_checkpoint, args=(workers["gpu"], gpu, killed), daemon=True).start()
    first = trigger(infra.env, "seedlm/nightly")
    t_first = time.monotonic() - t0
    second = trigger(infra.env, "seedlm/nightly")
    print(f"\ntwo pools: first run {t_first:.0f} s, second {time.monotonic() - t0 - t_first:.0f} s")
    return SimpleNamespace(main=main, cpu=cpu, gpu=gpu, first=first, second=second, killed=killed, workers=workers)


def _kill_after_first_checkpoint(worker, clone: Path, killed: list[int], timeout: float = 400) -> None:
    """SIGKILL the gpu worker's flow-run process (pretrain) once its first checkpoint is on disk: a lost machine."""
    deadline = time.monotonic() + timeout
    while not glob.glob(str(clone / ".seedlm/checkpoints/pretrain/*/step-*")):
        if time.monotonic() > deadline:
            return
        time.sleep(0.02)
    for child in psutil.Process(worker.popen.pid).children(recursive=True):
        try:
            if child.cwd() == str(clone):
                child.kill()
                killed.append(child.pid)
        except psutil.NoSuchProcess:
            pass


# ---------------------------------------------------------------- one pool
def test_nightly_deployment_runs_on_a_worker_and_registers_a_model(infra, solo):
    import mlflow

    assert solo.run["state"]["type"] == "COMPLETED", logs(solo.worker, infra.server)
    assert "promoted to champion" in solo.run["state"]["message"]
    mlflow.set_tracking_uri(f"sqlite:///{solo.repo}/mlflow.db")
    client = mlflow.MlflowClient()
    champion = client.get_model_version_by_alias("seedlm", "champion")
    assert str(champion.version) == "1"
    link = f"{infra.api.removesuffix('/api')}/runs/flow-run/{solo.run['id']}"
    assert link in champion.description and client.get_model_version("seedlm", "1").tags["link.prefect_flow_run"] == link
    parent = [r for r in mlflow.search_runs(experiment_names=["seedlm"], output_format="list")
              if r.info.run_name == "pipeline"]
    assert len(parent) == 1 and parent[0].data.tags["seedlm.outcome"] == "promoted"
    assert parent[0].data.tags["prefect_flow_run_id"] == solo.run["id"]
    # the deployment's params override reached params.yaml and DVC's record
    lock = yaml.safe_load((solo.repo / "dvc.lock").read_text())
    assert lock["stages"]["evaluate"]["params"]["params.yaml"]["evaluate.num_samples"] == 3
    assert dvc(solo.repo, "status").strip() == "Data and pipelines are up to date."


def test_cron_schedule_creates_scheduled_runs(infra, solo):
    dep = deployment(infra.api, "seedlm/nightly")
    assert dep["work_pool_name"] in ("solo", "cpu")
    crons = [s["schedule"].get("cron") for s in dep["schedules"]]
    assert crons and crons[0] in ("0 3 * * *", "30 2 * * *")
    deadline = time.monotonic() + 30
    scheduled = []
    while not scheduled and time.monotonic() < deadline:
        scheduled = api_post(infra.api, "flow_runs/filter", {
            "deployments": {"id": {"any_": [dep["id"]]}}, "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}}})
        time.sleep(1)
    assert scheduled, "the scheduler created no runs for the cron schedule"
    hour, minute = {"0 3 * * *": (3, 0), "30 2 * * *": (2, 30)}[crons[0]]
    assert all(f"T{hour:02d}:{minute:02d}:00" in r["expected_start_time"] for r in scheduled)


def test_a_failed_run_says_why_in_its_state(solo):
    assert solo.bad["state"]["type"] == "FAILED"
    assert "pretrain.max_step: unknown key; did you mean 'max_steps'?" in solo.bad["state"]["message"]


# ---------------------------------------------------------------- two pools
def test_stages_run_as_deployments_on_their_pools(infra, two_pools):
    assert two_pools.first["state"]["type"] == "COMPLETED", logs(*two_pools.workers.values(), infra.server)
    expect = {"pretrain": "gpu", "sft": "gpu", "evaluate": "gpu", "register": "cpu"}
    for stage, pool in expect.items():
        runs = runs_of(infra.api, f"seedlm-stage/{stage}")
        assert runs and {r["work_pool_name"] for r in runs} == {pool}, stage
    # ingest and preprocess were made by the one-pool run: reused through the remote, never submitted
    assert runs_of(infra.api, "seedlm-stage/ingest") == runs_of(infra.api, "seedlm-stage/preprocess") == []
    # the gpu clone got only what its stages read (processed data), never the raw data
    assert (two_pools.gpu / "data/processed/train.bin").is_file() and not (two_pools.gpu / "data/raw").exists()
    assert (two_pools.gpu / "models/sft/seedlm.json").is_file()


def test_killed_training_is_resubmitted_and_resumes_the_same_mlflow_run(infra, two_pools):
    import mlflow

    assert two_pools.killed, "the pretrain flow run was never killed"
    runs = runs_of(infra.api, "seedlm-stage/pretrain")
    assert [r["state"]["type"] for r in runs[:2]] == ["CRASHED", "COMPLETED"]
    assert [r["name"] for r in runs[:2]] == ["pretrain", "pretrain-retry1"]
    mlflow.set_tracking_uri(infra.ml_url)
    parent = mlflow.search_runs(experiment_names=["seedlm"], filter_string="tags.`seedlm.mode` = 'deployments'",
                                order_by=["attributes.start_time ASC"], output_format="list")[0]
    pre = mlflow.search_runs(experiment_names=["seedlm"], output_format="list",
                             filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' "
                                           "and tags.`seedlm.stage` = 'pretrain'")
    assert len(pre) == 1 and pre[0].info.status == "FINISHED"
    assert pre[0].data.tags.get("seedlm.resumed") == "true" and pre[0].data.metrics["resumed_from"] >= 25
    assert pre[0].data.metrics["steps"] == LONGER_PRETRAIN["pretrain.max_steps"]


def test_registry_on_the_tracking_server_links_runs_and_gate_report(infra, two_pools):
    ml = infra.ml_url
    model = requests.get(f"{ml}/api/2.0/mlflow/registered-models/get", params={"name": "seedlm"}, timeout=30).json()
    aliases = {a["alias"]: a["version"] for a in model["registered_model"]["aliases"]}
    assert aliases["champion"] == "1"
    mv = requests.get(f"{ml}/api/2.0/mlflow/model-versions/get", params={"name": "seedlm", "version": "1"},
                      timeout=30).json()["model_version"]
    desc = mv["description"]
    prefect_link = f"{infra.api.removesuffix('/api')}/runs/flow-run/{two_pools.first['id']}"
    assert prefect_link in desc and f"{ml}/#/experiments/" in desc and mv["run_id"] in desc
    gate = re.search(r"- Gate report: (\S+)", desc).group(1)
    report = requests.get(gate, timeout=30)
    assert report.status_code == 200 and "# Gate report: seedlm v1" in report.text
    assert requests.get(prefect_link, timeout=30).status_code == 200


def test_nothing_is_redone_by_the_next_scheduled_run_or_by_dvc_repro(infra, two_pools):
    from dvc.repo import Repo

    assert two_pools.second["state"]["type"] == "COMPLETED", logs(*two_pools.workers.values())
    assert "unchanged" in two_pools.second["state"]["message"]
    for stage in ("pretrain", "sft", "evaluate"):  # cached under their DVC keys: not submitted again
        assert len(runs_of(infra.api, f"seedlm-stage/{stage}")) == (2 if stage == "pretrain" else 1), stage
    assert len(runs_of(infra.api, "seedlm-stage/register")) == 2  # register always asks its workspace
    cpu = two_pools.cpu
    with contextlib.chdir(cpu), Repo(str(cpu)) as repo:  # the pipeline's workspace is complete and recorded
        assert repo.status() == {}
        assert repo.reproduce() == []
    # Prefect's cache key of a stage is DVC's run-cache key: the remote files both under the same name
    key = subprocess.run([sys.executable, "-m", "flows.dvcstage", "key", "sft"], cwd=cpu, capture_output=True,
                         text=True).stdout.split()[1]
    remote = infra.tmp / "dvc-remote"
    assert (remote / "runs" / key[:2] / key).is_dir() and (remote / "seedlm-records" / key).is_file()


def test_zombie_run_automation_exists(infra, two_pools):
    autos = api_post(infra.api, "automations/filter", {})
    zombie = [a for a in autos if a["name"] == "seedlm: crash zombie flow runs"]
    assert len(zombie) == 1 and zombie[0]["trigger"]["posture"] == "Proactive"
    assert zombie[0]["actions"][0]["type"] == "change-flow-run-state"

