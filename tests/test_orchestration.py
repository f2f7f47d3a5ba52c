"""The pieces under scheduled runs, on a tiny stand-in DVC pipeline (seconds, no models):
stage keys are DVC's run-cache keys, data moves between clones only through the DVC remote (metrics
too), `dvc exp run` results are reused by another clone, a retry finds the run it continues, a registered
version's links are written once and a run that registered nothing says so, and params overrides /
orchestration settings are checked before anything runs."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml
from servers import BIN, base_env, commit
from stores import current_store

from components.core.config import parse_params
from components.core.context import StageError
from components.core.params import ConfigError
from flows import dvcstage

GEN = """import json, os, pathlib, yaml
n = yaml.safe_load(open("params.yaml"))["n"]
open(os.environ["RUN_LOG"], "a").write("a\\n")
pathlib.Path("out/a").mkdir(parents=True, exist_ok=True)
pathlib.Path("out/a/data.txt").write_text("x" * n)
pathlib.Path("metrics").mkdir(exist_ok=True)
json.dump({"n": n}, open("metrics/a.json", "w"))
"""
USE = """import json, os, pathlib, sys
open(os.environ["RUN_LOG"], "a").write("b\\n")
name = sys.argv[1] if len(sys.argv) > 1 else "b"
src = "out/b/result.txt" if name == "c" else "out/a/data.txt"
text = pathlib.Path(src).read_text() + str(json.load(open("metrics/a.json"))["n"])
pathlib.Path(f"out/{name}").mkdir(parents=True, exist_ok=True)
pathlib.Path(f"out/{name}/result.txt").write_text(text)
"""
DVC_YAML = {
    "stages": {
        "a": {
            "cmd": "python gen.py",
            "deps": ["gen.py"],
            "params": ["n"],
            "outs": ["out/a"],
            "metrics": [{"metrics/a.json": {"cache": False}}],
        },
        "b": {"cmd": "python use.py", "deps": ["use.py", "out/a", "metrics/a.json"], "outs": ["out/b"]},
        "c": {"cmd": "python use.py c", "deps": ["use.py", "out/b"], "outs": [{"out/c": {"cache": False}}]},
    }
}


def run(cwd: Path, *args: str, log: Path) -> str:
    res = subprocess.run(list(args), cwd=cwd, env=base_env(RUN_LOG=str(log)), capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Repo A ran the pipeline and pushed it to a local remote; clones are made per test."""
    tmp = tmp_path_factory.mktemp("dvcworld")
    a, log = tmp / "A", tmp / "runs.log"
    a.mkdir()
    (a / "gen.py").write_text(GEN)
    (a / "use.py").write_text(USE)
    (a / "params.yaml").write_text("n: 3  # length of the output\n")
    (a / ".gitignore").write_text("/metrics/\n/out/c/\n")  # uncached outputs stay out of git, as in seedlm
    (a / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML, sort_keys=False))
    run(a, "git", "init", "-q", log=log)
    run(a, str(BIN / "dvc"), "init", "-q", log=log)
    run(a, str(BIN / "dvc"), "remote", "add", "-d", "shared", str(tmp / "remote"), log=log)
    commit(a, "pipeline")
    run(a, str(BIN / "dvc"), "repro", log=log)
    commit(a, "ran")
    assert dvcstage.push(a, ["a", "b", "c"]) > 0
    return tmp, a, log


def clone(world, name: str) -> Path:
    tmp, a, log = world
    dest = tmp / name
    run(tmp, "git", "clone", "-q", str(a), str(dest), log=log)
    return dest


def test_key_is_dvcs_run_cache_key_and_needs_no_upstream_outputs(world):
    tmp, a, _ = world
    runs = {p.name for p in (a / ".dvc/cache/runs").glob("*/*")}
    keys = {s: dvcstage.stage_key(a, s) for s in ("a", "b", "c")}
    assert {keys["a"], keys["b"]} == runs  # c has an uncached output: DVC never files it
    b = clone(world, "keys")
    assert not any((b / p).exists() for p in ("out/a", "out/b", "out/c", "metrics"))
    assert {s: dvcstage.stage_key(b, s) for s in keys} == keys  # from dvc.lock alone
    (b / "params.yaml").write_text("n: 4\n")
    assert dvcstage.stage_key(b, "a") != keys["a"] and dvcstage.stage_key(b, "b") == keys["b"]


def test_a_clone_gets_exactly_the_outputs_it_asks_for_through_the_remote(world):
    b = clone(world, "pull")
    dvcstage.materialize(b, ["a"])
    assert (b / "out/a/data.txt").read_text() == "xxx"
    assert json.loads((b / "metrics/a.json").read_text()) == {"n": 3}  # an uncached metric, too
    assert not (b / "out/b").exists()
    assert dvcstage.changes(b, "a") == [] and dvcstage.changes(b, "b") != []
    dvcstage.materialize(b, ["b", "c"])
    assert dvcstage.changes(b, "c") == []


def test_restore_reuses_a_dvc_exp_run_made_in_another_clone(world):
    tmp, _, log = world
    exp = clone(world, "exp")
    run(exp, "git", "config", "user.email", "t@t", log=log)
    run(exp, "git", "config", "user.name", "t", log=log)
    run(exp, str(BIN / "dvc"), "exp", "run", "-S", "n=7", log=log)
    run(exp, str(BIN / "python"), "-m", "flows.dvcstage", "push", "--all-runs", log=log)
    other = clone(world, "scheduled")
    (other / "params.yaml").write_text("n: 7\n")
    before = log.read_text()
    assert dvcstage.restore(other, "a", "") and dvcstage.restore(other, "b", "")
    assert log.read_text() == before  # nothing ran: both came from the experiment's run-cache
    assert (other / "out/b/result.txt").read_text() == "x" * 7 + "7"
    assert dvcstage.changes(other, "a") == dvcstage.changes(other, "b") == []
    (other / "params.yaml").write_text("n: 8\n")
    assert not dvcstage.restore(other, "a", "")  # never run with n: 8


def test_missing_outputs_name_the_stage_and_the_fix(world):
    tmp, a, _ = world
    lonely = clone(world, "lonely")
    run(lonely, str(BIN / "dvc"), "remote", "modify", "shared", "url", str(tmp / "empty-remote"), log=world[2])
    with pytest.raises(StageError, match=r"outputs of a .*push .*--force a"):
        dvcstage.materialize(lonely, ["a"])


def test_side_effect_stages_stay_out_of_the_run_cache(world):
    _, a, _ = world
    assert dvcstage.cacheable(a, "a") and dvcstage.cacheable(a, "b") and not dvcstage.cacheable(a, "c")
    entry = dvcstage.commit(a, "c")
    assert entry["outs"][0]["path"] == "out/c"
    assert not (a / ".dvc/cache/runs" / dvcstage.stage_key(a, "c")[:2] / dvcstage.stage_key(a, "c")).exists()


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory):
    """A sqlite tracking store with the seedlm experiment, current while this module runs."""
    import mlflow

    with current_store(f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"):
        mlflow.set_experiment("seedlm")
        yield


def test_a_retry_finds_the_unfinished_run_it_continues(mlflow_store):
    import mlflow

    from components.core.runner import RESUME_TAG, resumable_run

    client = mlflow.MlflowClient()
    exp = mlflow.get_experiment_by_name("seedlm").experiment_id

    def make(parent: str | None, key: str, status: str) -> str:
        tags = {RESUME_TAG: key, "seedlm.stage": "pretrain", **({"mlflow.parentRunId": parent} if parent else {})}
        r = client.create_run(exp, tags=tags, run_name="pretrain")
        if status != "RUNNING":
            client.set_terminated(r.info.run_id, status)
        return r.info.run_id

    make("p1", "pretrain:k", "FINISHED")
    crashed = make("p1", "pretrain:k", "RUNNING")  # its worker died: never ended
    make("p2", "pretrain:k", "RUNNING")
    make("p1", "pretrain:other", "RUNNING")
    assert resumable_run(mlflow, "pretrain", "pretrain:k", "p1") == crashed
    assert resumable_run(mlflow, "sft", "pretrain:k", "p1") is None
    assert resumable_run(mlflow, "pretrain", "pretrain:new", "p1") is None
    client.set_terminated(crashed, "FINISHED")
    assert resumable_run(mlflow, "pretrain", "pretrain:k", "p1") is None


def test_a_version_gets_one_links_block_and_a_run_that_registered_nothing_says_unchanged(mlflow_store):
    import mlflow

    from flows.orchestration import annotate_version, outcome

    client = mlflow.MlflowClient()
    run = client.create_run(mlflow.get_experiment_by_name("seedlm").experiment_id, run_name="register")
    rid = run.info.run_id
    client.create_registered_model("seedlm")
    mv = client.create_model_version("seedlm", f"runs:/{rid}/model", run_id=rid, tags={"prefect_flow_run_id": "fr-1"})
    client.update_model_version("seedlm", mv.version, description=f"seedlm model from MLflow run runs:/{rid}.")
    client.set_registered_model_alias("seedlm", "champion", mv.version)
    reg = {"model_name": "seedlm", "version": int(mv.version), "run_id": rid, "promoted": True}

    def description() -> str:
        return client.get_model_version("seedlm", mv.version).description

    links = annotate_version(mlflow, reg, "fr-1")  # the run that registered it
    once = description()
    for later in ("fr-2", "fr-3"):  # later runs of the pipeline that found register up to date
        assert annotate_version(mlflow, reg, later) == links
    assert description() == once and once.count("**Links**") == 1
    assert once.startswith(f"seedlm model from MLflow run runs:/{rid}.")  # what register wrote stays
    assert f"- Gate report: runs:/{rid}/register/gate.md" in once and "fr-1" in once and "fr-2" not in once
    client.update_model_version(  # a description that grew a block per run (before this was fixed): one again
        "seedlm", mv.version, description=once + "\n\n**Links**\n- Prefect flow run: fr-2 (ephemeral Prefect, no UI)"
    )
    annotate_version(mlflow, reg, "fr-4")
    assert description() == once

    assert outcome(mlflow, reg, "ran") == ("promoted", "seedlm v1 promoted to champion")
    unchanged = ("unchanged", "seedlm v1 unchanged: register was up to date (v1 is champion)")
    assert outcome(mlflow, reg, "up-to-date") == outcome(mlflow, reg, "restored from DVC run-cache") == unchanged


def test_overrides_are_validated_then_written_keeping_comments(tmp_path):
    from flows.orchestration import apply_overrides

    root = Path(__file__).resolve().parents[1]
    (tmp_path / "params.yaml").write_text((root / "params.yaml").read_text())
    with pytest.raises(ConfigError, match="did you mean 'max_steps'"):
        apply_overrides(tmp_path, {"pretrain.max_step": 5})
    apply_overrides(tmp_path, {"pretrain.max_steps": 1234, "sft.method": "lora"})
    text = (tmp_path / "params.yaml").read_text()
    assert "max_steps: 1234" in text and "# full | lora" in text
    data = yaml.safe_load(text)
    assert data["sft"]["method"] == "lora" and data["pretrain"]["max_steps"] == 1234


def test_orchestration_settings_are_checked(tmp_path):
    from flows.deploy import check_overrides

    with pytest.raises(ConfigError, match="pools must name every stage"):
        parse_params({"orchestration": {"pools": {"ingest": "cpu"}}})
    with pytest.raises(ConfigError, match="cron"):
        parse_params({"orchestration": {"schedules": {"nightly": {"cron": "every night"}}}})
    params = parse_params({})
    with pytest.raises(ConfigError, match="pretrain.nope: no such setting"):
        check_overrides(params, {"pretrain.nope": 1}, "nightly")
    with pytest.raises(ConfigError, match="warmup_steps"):
        check_overrides(params, {"pretrain.max_steps": 5}, "nightly")
    check_overrides(params, {"pretrain.max_steps": 500}, "nightly")
    with pytest.raises(ConfigError, match="orchestration.mode"):
        parse_params({"orchestration": {"mode": "cluster"}})


def test_a_stage_running_past_its_timeout_is_cancelled_and_a_finished_one_returned():
    from types import SimpleNamespace as NS

    from prefect.client.schemas.objects import StateType
    from prefect.states import State

    from flows.orchestration import _wait

    class Client:
        def __init__(self, states: list[StateType]) -> None:
            self.states, self.proposed = states, []

        def read_flow_run(self, run_id):
            kind = self.states.pop(0) if len(self.states) > 1 else self.states[0]
            return NS(id=run_id, state=State(type=kind))

        def set_flow_run_state(self, run_id, state, force=False):
            self.proposed.append(state)
            self.states = [StateType.CANCELLED]

    slow = Client([StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING])
    run = _wait(slow, "r1", timeout_s=0.3, poll_s=0.05)
    assert run.state.type == StateType.CANCELLED
    assert [s.type for s in slow.proposed] == [StateType.CANCELLING]
    assert "timed out after 0 s" in slow.proposed[0].message
    fast = Client([StateType.PENDING, StateType.RUNNING, StateType.COMPLETED])
    assert _wait(fast, "r2", timeout_s=60, poll_s=0.01).state.type == StateType.COMPLETED and not fast.proposed
