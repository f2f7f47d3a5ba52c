"""Scheduled runs on real infrastructure: a `prefect server` and an `mlflow server` (configured by
environment only) on 127.0.0.1, process work pools and workers, deployments made by
`python -m flows.deploy`, runs triggered with `prefect deployment run`, the registry read through
MLflow's REST API.

1. One pool: the nightly deployment runs the whole pipeline in one flow run on one worker and
   registers a model (gated out by its schedule's overrides: the run says why); its cron schedule
   produces scheduled runs; a run that fails in a stage says why in its state, on its MLflow run and
   in a notification.
2. Two pools standing in for CPU and GPU machines, each worker in its own clone that shares only git
   and the DVC remote with the others: stages run as flow runs of their deployments on their pools,
   inputs come from the remote (stages the one-pool run made are reused from it), a training run
   killed mid-way is resubmitted and resumes from its checkpoint in the same MLflow run, the
   registry links runs and gate report, and nothing is redone: not by the next scheduled run, not
   by `dvc repro`.
Everything started here is stopped here (workers before the servers).
"""

from __future__ import annotations

import contextlib
import glob
import re
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import requests
import yaml
from repos import ROOT
from servers import (
    BIN,
    TINY,
    Proc,
    base_env,
    commit,
    free_port,
    make_repo,
    prefect,
    start_mlflow,
    start_prefect,
    start_worker,
    wait_http,
)

from components.core.stages import STAGES

FAST = {
    **TINY,
    "evaluate.max_examples": 8,
    "evaluate.ppl_batches": 2,
    "evaluate.num_samples": 2,
    "evaluate.bootstrap": 20,
    "orchestration.poll_s": 1.0,
    "orchestration.retry_delay_s": 1,
}
LONGER_SFT = {"sft.max_steps": 60, "sft.checkpoint_every": 10, "sft.eval_every": 30}


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
    runs = api_post(
        api,
        "flow_runs/filter",
        {"deployments": {"id": {"any_": [dep["id"]]}}, "sort": "EXPECTED_START_TIME_ASC", "limit": 200},
    )
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


def watch(env: dict, name: str, timeout: float = 420) -> tuple[dict, str]:
    """`prefect deployment run NAME --watch`, as a user runs it: (the finished run, what the command printed)."""
    out = prefect({**env, "COLUMNS": "1000"}, "deployment", "run", name, "--watch", timeout=timeout)
    run_id = re.search(r"UUID:\s*([0-9a-f-]{36})", out).group(1)
    return requests.get(f"{env['PREFECT_API_URL']}/flow_runs/{run_id}", timeout=30).json(), out


def make_worker(env: dict, repo: Path, pool: str, log: Path) -> Proc:
    """`make worker POOL=pool` in `repo` (the venv is this one; its set-up is taken as done)."""
    return Proc(
        ["make", "-s", "-o", ".venv/.installed", f"BIN={BIN}", "worker", f"POOL={pool}"], log, env=env, cwd=repo
    )


def stop_by_sigterm(proc: Proc, timeout: float = 120) -> list[str]:
    """SIGTERM to the process alone (as a supervisor stops a service); what is still running after `timeout` s."""
    tree = [proc.popen.pid] + [c.pid for c in psutil.Process(proc.popen.pid).children(recursive=True)]
    proc.popen.send_signal(signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.popen.wait(timeout)
    left = []
    for pid in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            p = psutil.Process(pid)
            if p.status() != psutil.STATUS_ZOMBIE:
                left.append(" ".join(p.cmdline()[:4]))
    return left


def dvc(repo: Path, *args: str) -> str:
    res = subprocess.run([str(BIN / "dvc"), *args], cwd=repo, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return res.stdout


def deploy(env: dict, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    res = subprocess.run(
        [sys.executable, "-m", "flows.deploy", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    return res


def logs(run: dict, *procs) -> str:
    """The run's final state message, then each process log from its last traceback (or its tail)."""
    out = [f"state: {run['state']['type']}: {run['state'].get('message')}"]
    for p in procs:
        text = p.log.read_text(errors="replace")
        at = text.rfind("Traceback")
        out.append(f"--- {p.log.name}\n" + (text[at : at + 6000] if at >= 0 else text[-3000:]))
    return "\n".join(out)


class Webhook:
    """A local HTTP endpoint standing in for Slack & co: records the bodies POSTed to it."""

    def __init__(self) -> None:
        bodies = self.bodies = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                bodies.append(self.rfile.read(int(self.headers.get("Content-Length", 0))).decode())
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, *needles: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            hit = next((b for b in self.bodies if all(n in b for n in needles)), None)
            if hit:
                return hit
            time.sleep(0.5)
        raise AssertionError(f"no notification containing {needles}; got {self.bodies}")


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def infra(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("infra")
    hook = Webhook()
    server, api, env = start_prefect(tmp / "prefect-home", wait=False)
    workers: list = []
    started = [server]
    try:
        ml, ml_url = start_mlflow(tmp / "mlflow-server", wait=False)
        started.append(ml)
        wait_http(f"{api}/health", server)
        wait_http(f"{ml_url}/health", ml)
        yield SimpleNamespace(tmp=tmp, api=api, env=env, ml_url=ml_url, workers=workers, server=server, hook=hook)
    finally:
        for w in workers:  # workers first, then the servers
            w.stop()
        for p in reversed(started):
            p.stop()
        hook.server.shutdown()


@pytest.fixture(scope="module")
def solo(infra):
    """One pool, mode local: a run that fails in ingest, then the nightly run (gated out by its overrides)."""
    t0 = time.monotonic()
    solo_params = {
        **FAST,
        "orchestration.pipeline_pool": "solo",
        "orchestration.pools": {s: "solo" for s in STAGES},
        "orchestration.schedules": {
            "nightly": {
                "cron": "0 3 * * *",
                "timezone": "UTC",
                "overrides": {"register.gate.min": {"exact_match": 1.5}},
            }
        },
    }
    repo = make_repo(infra.tmp / "main", solo_params)
    dvc(repo, "remote", "add", "-d", "shared", str(infra.tmp / "dvc-remote"))
    commit(repo, "shared DVC remote")
    with open(repo / "params.yaml", "a") as f:  # the user's edit in progress: never deployed, never touched
        f.write("# trying something, not committed\n")
    params_before = (repo / "params.yaml").read_text()
    prefect(infra.env, "work-pool", "create", "solo", "--type", "process")
    block = (
        "from prefect.blocks.notifications import CustomWebhookNotificationBlock as B; "
        f"B(name='seedlm', url='{infra.hook.url}', json_data={{'text': '{{{{subject}}}}: {{{{body}}}}'}})"
        ".save('seedlm-alerts', overwrite=True)"
    )
    subprocess.run([sys.executable, "-c", block], env=infra.env, check=True, capture_output=True)
    deployed = deploy(
        infra.env,
        repo,
        "--env",
        f"MLFLOW_TRACKING_URI={infra.ml_url}",
        "--automations",
        "--notify",
        "custom-webhook/seedlm-alerts",
    )
    worker = make_worker(infra.env, repo, "solo", infra.tmp / "worker-solo.log")  # in .seedlm/workers/solo
    infra.workers.append(worker)
    bad = trigger(
        infra.env, "seedlm/nightly", 'overrides={"ingest.pretrain_sources": [{"path": "data/sources/nope.txt"}]}'
    )
    run, watched = watch(infra.env, "seedlm/nightly")
    left = stop_by_sigterm(worker)
    worker.stop()
    print(f"\none pool: {time.monotonic() - t0:.0f} s")
    return SimpleNamespace(
        repo=repo,
        clone=repo / ".seedlm" / "workers" / "solo",
        params_before=params_before,
        run=run,
        bad=bad,
        worker=worker,
        deployed=deployed,
        watched=watched,
        left_after_sigterm=left,
    )


@pytest.fixture(scope="module")
def two_pools(infra, solo):
    """Pools cpu and gpu, mode deployments, each worker in its own clone; sft is killed once."""
    t0 = time.monotonic()
    main = solo.repo
    subprocess.run(["git", "checkout", "-q", "--", "params.yaml"], cwd=main, check=True)
    params = yaml.safe_load((main / "params.yaml").read_text())
    params["orchestration"].update(
        {
            "mode": "deployments",
            "pipeline_pool": "cpu",
            "retries": 1,
            "pools": {s: ("gpu" if s in ("pretrain", "sft", "evaluate") else "cpu") for s in STAGES},
            "schedules": {"nightly": {"cron": "30 2 * * *", "timezone": "UTC", "overrides": LONGER_SFT}},
        }
    )
    (main / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    commit(main, "two pools")
    cpu, gpu = infra.tmp / "cpu-clone", infra.tmp / "gpu-clone"
    for clone in (cpu, gpu):
        subprocess.run(["git", "clone", "-q", str(main), str(clone)], check=True)
    for pool in ("cpu", "gpu"):
        prefect(infra.env, "work-pool", "create", pool, "--type", "process")
    deploy(
        infra.env,
        cpu,
        "--source",
        str(cpu),
        "--pool-source",
        f"gpu={gpu}",
        "--env",
        f"MLFLOW_TRACKING_URI={infra.ml_url}",
        "--automations",
    )
    workers = {}
    for pool in ("cpu", "gpu"):
        (infra.tmp / f"w-{pool}").mkdir()
        workers[pool] = start_worker(
            infra.env, pool, f"{pool}-1", infra.tmp / f"w-{pool}", infra.tmp / f"worker-{pool}.log"
        )
        infra.workers.append(workers[pool])
    killed: list[int] = []
    threading.Thread(target=_kill_after_first_checkpoint, args=(workers["gpu"], gpu, killed), daemon=True).start()
    first = trigger(infra.env, "seedlm/nightly")
    t_first = time.monotonic() - t0
    second = trigger(infra.env, "seedlm/nightly")
    print(f"\ntwo pools: first run {t_first:.0f} s, second {time.monotonic() - t0 - t_first:.0f} s")
    return SimpleNamespace(main=main, cpu=cpu, gpu=gpu, first=first, second=second, killed=killed, workers=workers)


def _kill_after_first_checkpoint(worker, clone: Path, killed: list[int], timeout: float = 400) -> None:
    """SIGKILL the gpu worker's flow-run process (sft) once its first checkpoint is on disk: a lost machine."""
    deadline = time.monotonic() + timeout
    while not glob.glob(str(clone / ".seedlm/checkpoints/sft/*/step-*")):
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


def ml_get(infra, path: str, **params) -> dict:
    res = requests.get(f"{infra.ml_url}/api/2.0/mlflow/{path}", params=params, timeout=30)
    res.raise_for_status()
    return res.json()


def pipeline_runs(infra, query: str = "") -> list[dict]:
    """The pipelines' MLflow runs (REST), newest first, with their tags as a dict under "tags"."""
    exp = ml_get(infra, "experiments/get-by-name", experiment_name="seedlm")["experiment"]["experiment_id"]
    res = requests.post(
        f"{infra.ml_url}/api/2.0/mlflow/runs/search",
        timeout=30,
        json={
            "experiment_ids": [exp],
            "order_by": ["attributes.start_time DESC"],
            "filter": "attributes.run_name = 'pipeline'" + (f" and {query}" if query else ""),
        },
    )
    res.raise_for_status()
    runs = res.json().get("runs", [])
    for r in runs:
        r["tags"] = {t["key"]: t["value"] for t in r["data"].get("tags", [])}
    return runs


# ---------------------------------------------------------------- one pool
def test_nightly_deployment_runs_on_a_worker_and_registers_a_model(infra, solo):
    assert solo.run["state"]["type"] == "COMPLETED", logs(solo.run, solo.worker)
    mv = ml_get(infra, "model-versions/get", name="seedlm", version="1")["model_version"]
    tags = {t["key"]: t["value"] for t in mv["tags"]}
    assert tags["prefect_flow_run_id"] == solo.run["id"]
    assert tags["link.prefect_flow_run"] == f"{infra.api.removesuffix('/api')}/runs/flow-run/{solo.run['id']}"
    # the schedule's override reached params.yaml, DVC's record and the gate, in the worker's clone
    lock = yaml.safe_load((solo.clone / "dvc.lock").read_text())
    assert lock["stages"]["register"]["params"]["params.yaml"]["register"]["gate"]["min"] == {"exact_match": 1.5}
    assert dvc(solo.clone, "status").strip() == "Data and pipelines are up to date."
    for ws in (solo.repo, solo.clone):
        assert not (ws / "mlflow.db").exists() and not (ws / "mlruns").exists()  # all on the server


def test_the_workers_clone_is_the_workspace_and_the_checkout_is_left_alone(infra, solo):
    assert solo.run["state"]["type"] == "COMPLETED", logs(solo.run, solo.worker)
    git = lambda ws, *a: subprocess.run(["git", *a], cwd=ws, capture_output=True, text=True, check=True).stdout
    # the user's checkout: their uncommitted edit is there, byte for byte; the runs wrote nothing
    assert (solo.repo / "params.yaml").read_text() == solo.params_before
    assert git(solo.repo, "status", "--porcelain").splitlines() == [" M params.yaml"]
    assert not any((solo.repo / p).exists() for p in ("dvc.lock", "data/raw", "models", "metrics"))
    assert "uncommitted changes" in solo.deployed.stderr  # ... and not deployed: deploy says so
    # the clone ran the checkout's last commit; the one tracked file that differs there is params.yaml, with the
    # schedule's overrides (untracked: what the pipeline wrote, dvc.lock ...)
    assert git(solo.clone, "rev-parse", "HEAD") == git(solo.repo, "rev-parse", "HEAD")
    status = git(solo.clone, "status", "--porcelain").splitlines()
    assert [x for x in status if not x.startswith("??")] == [" M params.yaml"] and "?? dvc.lock" in status, status
    assert "trying something" not in (solo.clone / "params.yaml").read_text()
    ran = [r for r in runs_of(infra.api, "seedlm/nightly") if r["id"] == solo.run["id"]]
    assert ran and ran[0]["work_pool_name"] == "solo"


def test_make_worker_stops_on_sigterm(solo):
    assert solo.left_after_sigterm == [], f"still running after SIGTERM to make: {solo.left_after_sigterm}"


def test_deploy_prints_one_summary(solo):
    out = solo.deployed.stdout
    assert "Looks like you're deploying" not in out and "Successfully created" not in out, out
    names = ["seedlm/nightly", *(f"seedlm-stage/{s}" for s in STAGES)]
    for name in names:  # one line each
        assert len([line for line in out.splitlines() if line.split()[:1] == [name]]) == 1, out
    assert f"code {solo.clone}" in out


def test_watch_ends_with_the_outcome(solo):
    """`prefect deployment run ... --watch` streams the run's log: its last line from the flow says how it ended."""
    said = " ".join(solo.watched.split())
    assert f"seedlm: {solo.run['state']['message']}"[:60] in said, solo.watched[-3000:]


def test_a_gated_out_run_says_why(infra, solo):
    message = solo.run["state"]["message"]
    assert message.startswith("seedlm v1 gated out, stays challenger") and "minimum" in message, message
    run = pipeline_runs(infra, f"tags.`prefect_flow_run_id` = '{solo.run['id']}'")[0]
    assert run["tags"]["seedlm.outcome"] == "gated_out" and run["tags"]["seedlm.reason"] == message


def test_a_failed_run_says_why_in_its_state_mlflow_and_a_notification(infra, solo):
    state = solo.bad["state"]
    assert state["type"] == "FAILED" and "ingest: " in state["message"] and "nope.txt" in state["message"]
    run = pipeline_runs(infra, f"tags.`prefect_flow_run_id` = '{solo.bad['id']}'")[0]
    assert run["info"]["status"] == "FAILED" and run["tags"]["seedlm.outcome"] == "failed"
    assert run["tags"]["seedlm.reason"].startswith("ingest: ") and "nope.txt" in run["tags"]["seedlm.reason"]
    body = infra.hook.wait_for(solo.bad["name"], "Failed", "nope.txt")  # the automation's notification
    assert f"{infra.api.removesuffix('/api')}/runs/flow-run/{solo.bad['id']}" in body  # links the run


def test_cron_schedule_creates_scheduled_runs(infra, solo):
    dep = deployment(infra.api, "seedlm/nightly")
    crons = [s["schedule"].get("cron") for s in dep["schedules"]]
    assert crons in (["0 3 * * *"], ["30 2 * * *"])
    deadline = time.monotonic() + 30
    scheduled = []
    while not scheduled and time.monotonic() < deadline:
        scheduled = api_post(
            infra.api,
            "flow_runs/filter",
            {"deployments": {"id": {"any_": [dep["id"]]}}, "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}}},
        )
        time.sleep(1)
    assert scheduled, "the scheduler created no runs for the cron schedule"
    hour, minute = {"0 3 * * *": (3, 0), "30 2 * * *": (2, 30)}[crons[0]]
    assert all(f"T{hour:02d}:{minute:02d}:00" in r["expected_start_time"] for r in scheduled)


# ---------------------------------------------------------------- two pools
def test_stages_run_as_deployments_on_their_pools(infra, two_pools):
    assert two_pools.first["state"]["type"] == "COMPLETED", logs(two_pools.first, *two_pools.workers.values())
    for stage, pool in {"sft": "gpu", "evaluate": "gpu", "register": "cpu"}.items():
        runs = runs_of(infra.api, f"seedlm-stage/{stage}")
        assert runs and {r["work_pool_name"] for r in runs} == {pool}, stage
    assert deployment(infra.api, "seedlm-stage/pretrain")["work_pool_name"] == "gpu"
    # ingest, preprocess and pretrain were made by the one-pool run: reused through the remote, never submitted
    for stage in ("ingest", "preprocess", "pretrain"):
        assert runs_of(infra.api, f"seedlm-stage/{stage}") == [], stage
    # the gpu clone got only what its stages read (processed data, pretrained model), never the raw data
    gpu = two_pools.gpu
    assert (gpu / "data/processed/train.bin").is_file() and (gpu / "models/pretrain/seedlm.json").is_file()
    assert not (gpu / "data/raw").exists() and (gpu / "models/sft/seedlm.json").is_file()


def test_killed_training_is_resubmitted_and_resumes_the_same_mlflow_run(infra, two_pools):
    assert two_pools.killed, "the sft flow run was never killed"
    runs = runs_of(infra.api, "seedlm-stage/sft")
    assert [r["state"]["type"] for r in runs[:2]] == ["CRASHED", "COMPLETED"]
    assert [r["name"] for r in runs[:2]] == ["sft", "sft-retry1"]
    parent = pipeline_runs(infra, f"tags.`prefect_flow_run_id` = '{two_pools.first['id']}'")[0]["info"]["run_id"]
    exp = ml_get(infra, "experiments/get-by-name", experiment_name="seedlm")["experiment"]["experiment_id"]
    found = requests.post(
        f"{infra.ml_url}/api/2.0/mlflow/runs/search",
        timeout=30,
        json={
            "experiment_ids": [exp],
            "filter": f"tags.`mlflow.parentRunId` = '{parent}' and tags.`seedlm.stage` = 'sft'",
        },
    ).json()["runs"]
    assert len(found) == 1 and found[0]["info"]["status"] == "FINISHED"
    tags = {t["key"]: t["value"] for t in found[0]["data"]["tags"]}
    metrics = {m["key"]: m["value"] for m in found[0]["data"]["metrics"]}
    assert tags.get("seedlm.resumed") == "true" and metrics["resumed_from"] >= 10
    assert metrics["steps"] == LONGER_SFT["sft.max_steps"]
    infra.hook.wait_for("sft", "Crashed")  # the lost worker was reported too


def test_registry_on_the_tracking_server_links_runs_and_gate_report(infra, two_pools):
    model = ml_get(infra, "registered-models/get", name="seedlm")["registered_model"]
    assert {a["alias"]: a["version"] for a in model["aliases"]} == {"champion": "2", "challenger": "2"}
    old = ml_get(infra, "model-versions/get", name="seedlm", version="1")["model_version"]
    assert {t["key"]: t["value"] for t in old["tags"]}["gate.decision"] == "rejected"
    mv = ml_get(infra, "model-versions/get", name="seedlm", version="2")["model_version"]
    desc = mv["description"]
    prefect_link = f"{infra.api.removesuffix('/api')}/runs/flow-run/{two_pools.first['id']}"
    assert prefect_link in desc and f"{infra.ml_url}/#/experiments/" in desc and mv["run_id"] in desc
    gate = re.search(r"- Gate report: (\S+)", desc).group(1)
    report = requests.get(gate, timeout=30)
    assert report.status_code == 200 and "# Gate report: seedlm v2" in report.text
    page = requests.get(prefect_link, headers={"Accept": "text/html"}, timeout=30)  # the UI's run page
    assert page.status_code == 200 and "<html" in page.text.lower()
    assert any((infra.tmp / "mlflow-server" / "artifacts").rglob("MLmodel"))  # on the server's artifact root
    run = pipeline_runs(infra, f"tags.`prefect_flow_run_id` = '{two_pools.first['id']}'")[0]
    assert run["tags"]["seedlm.outcome"] == "promoted" and run["tags"]["seedlm.mode"] == "deployments"


def test_nothing_is_redone_by_the_next_scheduled_run_or_by_dvc_repro(infra, two_pools):
    from dvc.repo import Repo

    assert two_pools.second["state"]["type"] == "COMPLETED", logs(two_pools.second, *two_pools.workers.values())
    assert two_pools.second["state"]["message"] == "seedlm v2 unchanged: register was up to date (v2 is champion)"
    run = pipeline_runs(infra, f"tags.`prefect_flow_run_id` = '{two_pools.second['id']}'")[0]
    assert run["tags"]["seedlm.outcome"] == "unchanged"
    for stage in ("sft", "evaluate"):  # cached under their DVC keys: not submitted again
        assert len(runs_of(infra.api, f"seedlm-stage/{stage}")) == (2 if stage == "sft" else 1), stage
    assert len(runs_of(infra.api, "seedlm-stage/register")) == 2  # register always asks its workspace
    cpu = two_pools.cpu
    with contextlib.chdir(cpu), Repo(str(cpu)) as repo:  # the pipeline's workspace is complete and recorded
        assert repo.status() == {}
        assert repo.reproduce() == []
    # Prefect's cache key of a stage is DVC's run-cache key: the remote files both under the same name
    key = subprocess.run(
        [sys.executable, "-m", "flows.dvcstage", "key", "sft"], cwd=cpu, capture_output=True, text=True
    ).stdout.split()[1]
    remote = infra.tmp / "dvc-remote"
    assert (remote / "runs" / key[:2] / key).is_dir() and (remote / "seedlm-records" / key).is_file()


def test_zombie_run_automation_exists(infra, two_pools):
    autos = api_post(infra.api, "automations/filter", {})
    zombie = [a for a in autos if a["name"] == "seedlm: crash zombie flow runs"]
    assert len(zombie) == 1 and zombie[0]["trigger"]["posture"] == "Proactive"
    assert zombie[0]["actions"][0]["type"] == "change-flow-run-state"


# ---------------------------------------------------------------- make prefect-server
def test_make_prefect_server_points_its_ui_at_its_own_port(tmp_path):
    """On a port other than 4200, even with a shell still holding a PREFECT_API_URL for 4200, the UI calls the
    server it came with; and SIGTERM to make stops the server."""
    port = free_port()
    env = base_env(PREFECT_HOME=str(tmp_path / "home"), PREFECT_API_URL="http://127.0.0.1:4200/api")
    server = Proc(
        ["make", "-s", "-o", ".venv/.installed", f"BIN={BIN}", "prefect-server", f"PREFECT_PORT={port}"],
        tmp_path / "server.log",
        env=env,
        cwd=ROOT,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/api/health", server)
        ui = requests.get(f"http://127.0.0.1:{port}/ui-settings", timeout=30).json()
        assert ui["api_url"] == f"http://127.0.0.1:{port}/api"
        assert stop_by_sigterm(server) == [], server.tail()
    finally:
        server.stop()
