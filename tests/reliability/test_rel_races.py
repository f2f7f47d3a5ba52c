"""Four pipeline runs at once on one repo with different settings: three `dvc exp run --queue` experiments
(two queue workers) and a Prefect flow run in the workspace. No run overwrites another's outputs, every
registration gets its own version (none lost, none duplicated), and the champion ends on a version that
passed the gate. MLFLOW_TRACKING_URI is not set: every run must find the repo's one tracking store.

To stay cheap the shared upstream (ingest, preprocess, pretrain) is committed first (taken from the
pipeline test_rel_kill finished, when it ran in this session); three runs reuse it, and the Prefect run
changes pretrain.max_steps so it retrains from there.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import _harness as h
import pytest
import yaml

RUNS = {  # name: overrides; gate min 2.0 cannot be met: those must never become champion
    "exp-a": {"sft.lr": 0.001},
    "exp-b": {"sft.lr": 0.003, "register.gate.min": {"exact_match": 2.0}},
    "exp-c": {"sft.max_steps": 6},
    "prefect": {"pretrain.max_steps": 16, "register.gate.min": {"exact_match": 2.0}},
}


def _upstream(dest: Path) -> Path:
    """A micro repo whose ingest/preprocess/pretrain are done: a copy of test_rel_kill's finished pipeline
    (its registry and later outputs left behind), else a fresh repo."""
    import shutil

    done = h.SHARED.get("finished_repo")
    if done is None or not (done / "dvc.lock").is_file():
        return h.make_repo(dest)
    top = {"mlflow.db", "mlruns", ".seedlm", "models", "reports", "metrics", "plots", "data"}
    shutil.copytree(done, dest, symlinks=True, ignore=lambda d, names: top & set(names) if Path(d) == done else [])
    shutil.copytree(done / "data/sources", dest / "data/sources")
    lock = yaml.safe_load((dest / "dvc.lock").read_text())
    lock["stages"] = {k: v for k, v in lock["stages"].items() if k in ("ingest", "preprocess", "pretrain")}
    (dest / "dvc.lock").write_text(yaml.safe_dump(lock, sort_keys=False))
    res = h.run(dest, str(h.BIN / "dvc"), "checkout", "ingest", "preprocess", "pretrain", environ=h.env(None))
    assert res.returncode == 0, res.stderr[-2000:]
    return dest


def _value(v) -> str:
    """A value both `dvc exp run -S` (Hydra's grammar) and the flow's -S (YAML) read alike."""
    return "{" + ", ".join(f"{k}: {_value(x)}" for k, x in v.items()) + "}" if isinstance(v, dict) else json.dumps(v)


def _sets(overrides: dict) -> list[str]:
    return [x for k, v in overrides.items() for x in ("-S", f"{k}={_value(v)}")]


@pytest.fixture(scope="module")
def concurrent(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("concurrency")
    repo = _upstream(tmp / "repo")
    e = h.env(None, PREFECT_HOME=str(tmp / "prefect-home"), PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180")
    # (no MLFLOW_TRACKING_URI: every run must find the repo's own store)
    run = lambda *a, **kw: h.run(repo, *a, environ=e, **kw)  # noqa: E731
    res = run(str(h.BIN / "dvc"), "repro", "pretrain", timeout=400)  # a no-op when taken from test_rel_kill
    assert res.returncode == 0, res.stderr[-3000:]
    h.commit(repo, "upstream")
    for name, overrides in RUNS.items():
        if name.startswith("exp-"):
            res = run(str(h.BIN / "dvc"), "exp", "run", "--queue", "-n", name, *_sets(overrides))
            assert res.returncode == 0, res.stderr[-3000:]
    flow = subprocess.Popen(
        [str(h.BIN / "python"), "-m", "flows.pipeline", *_sets(RUNS["prefect"])],
        cwd=repo,
        env=e,
        stdout=open(tmp / "prefect.log", "w"),
        stderr=subprocess.STDOUT,
    )
    res = run(str(h.BIN / "dvc"), "queue", "start", "-j", "2")
    assert res.returncode == 0, res.stderr[-3000:]
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        status = run(str(h.BIN / "dvc"), "queue", "status").stdout
        if "Running" not in status and "Queued" not in status:
            break
        time.sleep(2)
    flow.wait(timeout=max(10, deadline - time.monotonic()))
    logs = {n: _failure(run(str(h.BIN / "dvc"), "queue", "logs", n).stdout) for n in RUNS if n.startswith("exp-")}
    return {
        "repo": repo,
        "status": status,
        "flow_rc": flow.returncode,
        "logs": logs,
        "flow_log": _failure((tmp / "prefect.log").read_text()),
        "env": e,
    }


def _failure(log: str) -> str:
    """The part of a run's log that explains a failure: its first traceback and the end."""
    i = log.find("Traceback")
    return (log[i : i + 3000] + "\n...\n" if i >= 0 else "") + log[-1500:]


def test_all_four_runs_completed(concurrent):
    status = concurrent["status"]
    for name in RUNS:
        if name.startswith("exp-"):
            line = next(x for x in status.splitlines() if f" {name} " in f" {x} ")
            assert "Success" in line, (line, concurrent["logs"][name])
    assert concurrent["flow_rc"] == 0, concurrent["flow_log"]


def _version_params(db: Path) -> dict[int, dict]:
    return {v: json.loads(p) for v, p in h.version_tags(db, "params").items()}


def _own(params: dict, overrides: dict) -> bool:
    node_of = lambda key: h.read_path(params, key)  # noqa: E731
    return all(node_of(k) == v for k, v in overrides.items())


def test_registry_versions_neither_lost_nor_duplicated(concurrent):
    db = concurrent["repo"] / "mlflow.db"
    assert [v for _, v in h.versions(db)] == [1, 2, 3, 4]
    regs = [s for n, s in h.runs(db) if n == "register"]
    assert regs == ["FINISHED"] * 4 and [r for r in h.runs(db) if r[1] == "RUNNING"] == []
    owners = {v: [n for n, o in RUNS.items() if _own(p, o)] for v, p in _version_params(db).items()}
    assert sorted(n for names in owners.values() for n in names) == sorted(RUNS), owners  # one version per run
    assert all(len(names) == 1 for names in owners.values()), owners


def test_champion_is_a_version_that_passed_the_gate(concurrent):
    db = concurrent["repo"] / "mlflow.db"
    decisions = h.version_tags(db, "gate.decision")
    champion = h.aliases(db)["champion"]
    assert decisions[champion] == "promoted", decisions
    params = _version_params(db)
    assert params[champion]["register"]["gate"]["min"]["exact_match"] == 0.0
    rejected = [v for v, p in params.items() if p["register"]["gate"]["min"]["exact_match"] == 2.0]
    assert len(rejected) == 2 and all(decisions[v] == "rejected" for v in rejected)


def test_no_run_overwrote_another_runs_model(concurrent):
    """Each registered model is the one its own run trained: the weights registered hash to the folder the run
    registered (model_sha256), and the training settings inside it are that run's."""
    import mlflow

    from components.core.io import sha256_dir

    repo = concurrent["repo"]
    mlflow.set_tracking_uri(f"sqlite:///{repo}/mlflow.db")
    sums, params = h.version_tags(repo / "mlflow.db", "model_sha256"), _version_params(repo / "mlflow.db")
    with h.in_repo(repo):
        for v in sorted(sums):
            local = Path(mlflow.artifacts.download_artifacts(f"models:/seedlm/{v}"))
            folder = next(p.parent for p in local.rglob("model.safetensors"))
            assert sha256_dir(folder) == sums[v], f"v{v}: registered weights are not the folder its run hashed"
            trained = h.read(folder / "seedlm.json")["config"]["sft"]
            assert trained == params[v]["sft"], f"v{v} holds another run's model"
            assert not [p for p in local.rglob("*") if p.suffix in (".pkl", ".pickle", ".bin", ".pt")]


def test_the_workspace_holds_the_prefect_runs_outputs(concurrent):
    repo = concurrent["repo"]
    assert h.read(repo / "models/pretrain/seedlm.json")["config"]["pretrain"]["max_steps"] == 16
    assert h.read(repo / "reports/register/registration.json")["decision"] == "rejected"
    assert h.leftovers(repo) == []
    res = h.run(repo, str(h.BIN / "dvc"), "status", environ=concurrent["env"])
    assert res.returncode == 0 and "changed" not in res.stdout, res.stdout
