"""A tracking store that fails or goes away: calls are retried with backoff and reported, metrics are
buffered so training goes on, and what cannot be delivered is saved and replayed — never dropped.
A real `mlflow server` is SIGKILLed in the middle of a pretraining run (and restarted, or not)."""

from __future__ import annotations

import csv
import logging
import subprocess
import time
from pathlib import Path

import _harness as h
import pytest
import requests

from components.core.context import StageError
from components.tracking import reaper, retries
from components.tracking.client import Tracking


# ---------------------------------------------------------------- the retry loop
class _Flaky:
    def __init__(self, errors: list[BaseException]) -> None:
        self.errors, self.calls = list(errors), 0

    def __call__(self, x: int) -> int:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return x * 2


def _mlflow_error(msg: str, code: str = "INTERNAL_ERROR"):
    from mlflow.exceptions import MlflowException

    return MlflowException(msg, error_code=code)


@pytest.fixture
def fast(monkeypatch):
    monkeypatch.setattr(retries, "delay", lambda attempt: 0.01)


def test_transient_errors_are_retried_and_reported(fast, caplog):
    import sqlalchemy.exc

    errors = [
        requests.ConnectionError("refused"),
        _mlflow_error("API request to http://x/api failed with exception Max retries exceeded"),
        _mlflow_error("API request failed with error code 503 != 200"),
        sqlalchemy.exc.OperationalError("insert", {}, Exception("database is locked")),
        sqlalchemy.exc.OperationalError("create", {}, Exception("table runs already exists")),
    ]
    fn = _Flaky(errors)
    counted = []
    with caplog.at_level(logging.WARNING, logger="seedlm.tracking"):
        assert retries.call(fn, 21, what="log_params", budget_s=30, on_retry=lambda: counted.append(1)) == 42
    assert fn.calls == 6 and len(counted) == 5
    msgs = [r.getMessage() for r in caplog.records]
    assert sum("log_params failed" in m for m in msgs) == 5 and "went through after 5 retries" in msgs[-1]


@pytest.mark.parametrize("error", [ValueError("bad"), KeyError("x")])
def test_errors_that_are_not_transient_are_not_retried(fast, error):
    fn = _Flaky([error])
    with pytest.raises(type(error)):
        retries.call(fn, 1, what="x", budget_s=30)
    assert fn.calls == 1


def test_request_errors_of_mlflow_are_not_retried(fast):
    fn = _Flaky([_mlflow_error("Run 'abc' not found", "RESOURCE_DOES_NOT_EXIST")])
    with pytest.raises(Exception, match="not found"):
        retries.call(fn, 1, what="get_run", budget_s=30)
    assert fn.calls == 1


def test_budget_exhausted_is_a_clear_stage_error(monkeypatch):
    monkeypatch.setattr(retries, "delay", lambda attempt: 0.2)
    fn = _Flaky([requests.ConnectionError("refused")] * 100)
    t = time.monotonic()
    with pytest.raises(StageError) as e:
        retries.call(fn, 1, what="start_run", budget_s=1.0)
    assert time.monotonic() - t < 3 and 3 <= fn.calls <= 7
    assert "start_run failed" in str(e.value) and retries.BUDGET_ENV in str(e.value)


def test_delay_backs_off_exponentially_with_jitter():
    ds = [retries.delay(a) for a in range(1, 9)]
    assert 0.75 <= ds[0] <= 1.25 and 1.5 <= ds[1] <= 2.5 and 3 <= ds[2] <= 5
    assert all(d <= retries.MAX_DELAY_S * 1.25 for d in ds) and ds[-1] >= retries.MAX_DELAY_S * 0.75


# ---------------------------------------------------------------- a new store opened by many at once
OPEN = """
import os, sys, time
from components.tracking.store import setup_tracking
from components.tracking import retries
from components.tracking.client import Tracking
while time.time() < float(sys.argv[1]):
    time.sleep(0.001)
mlflow = Tracking(retries.call(setup_tracking, what="connect", also=("RESOURCE_ALREADY_EXISTS",)), budget_s=60)
with mlflow.start_run(run_name="x", tags={"seedlm.stage": "x"}):
    mlflow.log_params({"pid": os.getpid()})
print("ok")
"""


def test_four_first_runs_create_one_sqlite_store_together(tmp_path):
    """Four stage processes of a fresh repo start at the same moment (dvc exp queue workers, a Prefect run):
    one creates and migrates the store while the others wait, and all four log their run."""
    env = h.env(None, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path}/mlflow.db", PYTHONPATH=str(h.ROOT))
    start = f"{time.time() + 4:.3f}"
    procs = [
        subprocess.Popen(
            [str(h.BIN / "python"), "-c", OPEN, start],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    outs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [e[-1500:] for _, e in outs]
    assert h.runs(tmp_path / "mlflow.db") == [("x", "FINISHED")] * 4


def test_a_first_run_in_a_dvc_exp_workspace_keeps_artifacts_beside_the_store(tmp_path, monkeypatch):
    """`dvc exp run` runs stages in a temp workspace that DVC deletes afterwards; the store is the repo's
    (DVC_ROOT), and so must be the experiment's artifact folder, or registered models vanish with the workspace."""
    from components.tracking.store import EXPERIMENT, setup_tracking

    workspace = tmp_path / ".dvc/tmp/exps/tmp1234"
    workspace.mkdir(parents=True)
    monkeypatch.chdir(workspace)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    mlflow = setup_tracking()
    assert mlflow.get_tracking_uri() == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert mlflow.get_experiment_by_name(EXPERIMENT).artifact_location == (tmp_path / "mlruns").resolve().as_uri()


# ---------------------------------------------------------------- runs left RUNNING by killed processes
def test_runs_of_killed_processes_are_marked_killed(tmp_path, monkeypatch):
    import mlflow

    db = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    mlflow.set_tracking_uri(f"sqlite:///{db}")
    mlflow.set_experiment("seedlm")
    dead = subprocess.Popen(["true"])
    dead.wait()
    client = mlflow.MlflowClient()
    exp = mlflow.get_experiment_by_name("seedlm").experiment_id
    orphan = client.create_run(exp, tags={"seedlm.stage": "ingest", **reaper.identity(), "seedlm.pid": str(dead.pid)})
    alive = client.create_run(exp, tags={"seedlm.stage": "ingest", **reaper.identity()})  # this process: alive
    other = client.create_run(
        exp, tags={"seedlm.stage": "preprocess", **reaper.identity(), "seedlm.pid": str(dead.pid)}
    )
    with Tracking(mlflow, budget_s=5).start_run(run_name="ingest", tags={"seedlm.stage": "ingest"}) as run:
        pass
    status = {r: client.get_run(r.info.run_id).info.status for r in (orphan, alive, other)}
    assert status == {orphan: "KILLED", alive: "RUNNING", other: "RUNNING"}
    assert "gone" in client.get_run(orphan.info.run_id).data.tags["seedlm.reaped"]
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    for r in (alive, other):
        client.set_terminated(r.info.run_id)


# ---------------------------------------------------------------- a real server that goes away
@pytest.fixture(scope="module")
def data_repo(tmp_path_factory):
    """A micro repo with ingest and preprocess done (directly, no tracking)."""
    from components.core.config import load_params
    from components.ingest import ingest
    from components.preprocess import preprocess

    repo = h.make_repo(
        tmp_path_factory.mktemp("tracking") / "repo",
        {"pretrain.max_steps": 80, "pretrain.log_every": 1, "pretrain.eval_every": 20, "pretrain.checkpoint_every": 20},
        git=False,
    )
    p = load_params(repo / "params.yaml")
    ingest(p.ingest, repo / "data/raw", seed=p.seed, sources_root=repo / "data/sources", cache_dir=repo / ".cache")
    preprocess(p.preprocess, repo / "data/raw", repo / "data/processed", repo / "metrics/preprocess.json", seed=p.seed)
    return repo


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Not started yet: the first test needs it down."""
    s = h.MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    yield s
    s.kill()


def _pretrain(repo: Path, server: h.MlflowServer, budget_s: float) -> subprocess.Popen:
    import shutil

    for out in ("models/pretrain", "metrics/pretrain.json", "plots/pretrain_loss.csv", ".seedlm"):
        shutil.rmtree(repo / out, ignore_errors=True) if (repo / out).is_dir() else (repo / out).unlink(missing_ok=True)
    e = h.env(None, MLFLOW_TRACKING_URI=server.url, SEEDLM_TRACKING_RETRY_S=str(budget_s), NO_PROXY="127.0.0.1")
    return subprocess.Popen(
        [str(h.BIN / "python"), "-m", "components.pretrain", "--no-progress"],
        cwd=repo,
        env=e,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_metrics(server: h.MlflowServer, proc: subprocess.Popen, timeout: float = 120):
    import mlflow

    client = mlflow.MlflowClient(server.url)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        exp = client.get_experiment_by_name("seedlm")
        runs = client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'") if exp else []
        if runs and "train_loss" in client.get_run(runs[0].info.run_id).data.metrics:
            return runs[0].info.run_id
        time.sleep(0.1)
    raise AssertionError(f"no training metrics arrived: {proc.communicate()[1][-3000:] if proc.poll() else ''}")


def _check_complete(repo: Path, server: h.MlflowServer, run_id: str) -> None:
    """Training output complete; the run FINISHED with every train_loss point the loss curve holds."""
    import mlflow

    assert (repo / "models/pretrain/model.safetensors").is_file() and (repo / "metrics/pretrain.json").is_file()
    rows = list(csv.DictReader(open(repo / "plots/pretrain_loss.csv")))
    want = {int(r["step"]) for r in rows if r["train_loss"]}
    client = mlflow.MlflowClient(server.url)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    got = {m.step for m in client.get_metric_history(run_id, "train_loss")}
    assert want and want <= got, f"missing steps {sorted(want - got)[:20]}"
    assert "final_train_loss" in run.data.metrics and "model.n_layer" in run.data.params


def test_server_down_at_start_fails_clearly_before_any_work(data_repo, server):
    before = h.tree(data_repo / "data/raw")
    assert server.proc is None  # not started yet
    e = h.env(None, MLFLOW_TRACKING_URI=server.url, SEEDLM_TRACKING_RETRY_S="2", NO_PROXY="127.0.0.1")
    res = subprocess.run(
        [str(h.BIN / "python"), "-m", "components.ingest", "--no-progress"],
        cwd=data_repo,
        env=e,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2, res.stderr[-3000:]
    line = [x for x in res.stderr.splitlines() if x.startswith("seedlm ingest: error:")]
    assert line and "tracking store" in line[0] and "start the tracking server" in line[0], res.stderr[-3000:]
    assert "Traceback" not in res.stderr and h.tree(data_repo / "data/raw") == before and h.leftovers(data_repo) == []


def test_server_killed_mid_training_and_restarted(data_repo, server):
    server.start()
    proc = _pretrain(data_repo, server, budget_s=180)
    run_id = _wait_for_metrics(server, proc)
    server.kill()
    time.sleep(3)  # training goes on; its metrics wait in the buffer
    assert proc.poll() is None, "the stage did not survive the tracking server going away"
    server.start()
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-4000:]
    assert "tracking: metrics not sent" in err and "buffered" in err, err[-4000:]
    assert "everything was delivered" in err and "WARNING" not in err.split("seedlm tracking:")[-1]
    _check_complete(data_repo, server, run_id)


def test_server_gone_for_good_saves_a_backlog_that_replays(data_repo, server, tmp_path):
    proc = _pretrain(data_repo, server, budget_s=3)
    run_id = _wait_for_metrics(server, proc)
    server.kill()
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-4000:]  # the training is not lost: outputs complete, DVC may record it
    assert (data_repo / "models/pretrain/model.safetensors").is_file()
    backlog = data_repo / ".seedlm/tracking-backlog" / f"{run_id}.jsonl"
    assert backlog.is_file() and f"python -m components.tracking.backlog replay {backlog}" in err, err[-3000:]
    assert "could not be delivered" in err and "the stage's outputs are complete" in err
    server.start()
    res = subprocess.run(
        [str(h.BIN / "python"), "-m", "components.tracking.backlog", "replay"],
        cwd=data_repo,
        env=h.env(None, MLFLOW_TRACKING_URI=server.url, NO_PROXY="127.0.0.1"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0 and "item(s) sent" in res.stdout, res.stderr[-3000:]
    assert not backlog.exists()
    _check_complete(data_repo, server, run_id)
    import mlflow

    arts = [a.path for a in mlflow.MlflowClient(server.url).list_artifacts(run_id)]
    assert "pretrain_loss.csv" in arts, arts
