"""register when something fails (a registry error, a kill, bad inputs): no version is left half-made, against a
real MLflow (sqlite in tmp, conftest's `store`) and a tiny GPT-2."""

from __future__ import annotations

import os
import shutil

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402
from _register_fixtures import aliases, do_register, versions, write_eval  # noqa: E402
from mlflow import MlflowClient  # noqa: E402

from components import register as reg  # noqa: E402
from components.core.config import GateConfig, RegisterConfig  # noqa: E402
from components.core.context import StageContext, StageError  # noqa: E402
from components.core.io import read_json, write_meta  # noqa: E402
from components.registry import publish  # noqa: E402


# ---------------------------------------------------------------- failures: rollback, a killed run, bad inputs
def test_failure_after_create_leaves_no_version(store, sft_dir, repo, tmp_path, monkeypatch):
    name = "seedlm-rollback"
    cfg = RegisterConfig(model_name=name)
    out = tmp_path / "out"
    do_register(cfg, sft_dir, write_eval(tmp_path / "e1.json", 0.3), out, repo)
    first = read_json(out / "registration.json")

    # fails while moving champion to the new (better) version, after challenger already moved
    real = MlflowClient.set_registered_model_alias

    def flaky(self, model, alias, version):
        if alias == "champion" and str(version) != "1":
            raise RuntimeError("registry went away")
        return real(self, model, alias, version)

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", flaky)
    with pytest.raises(RuntimeError, match="registry went away"):
        do_register(cfg, sft_dir, write_eval(tmp_path / "e2.json", 0.6), out, repo)
    monkeypatch.undo()
    assert versions(name) == ["1"]
    assert aliases(name) == {"champion": "1", "challenger": "1"}
    assert read_json(out / "registration.json") == first  # out_dir untouched

    # fails right after create (writing the report): no version, and the next one registers fine
    monkeypatch.setattr(publish, "gate_markdown", lambda *a: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        do_register(cfg, sft_dir, write_eval(tmp_path / "e3.json", 0.6), out, repo)
    monkeypatch.undo()
    assert versions(name) == ["1"]
    res, _ = do_register(cfg, sft_dir, write_eval(tmp_path / "e4.json", 0.6), out, repo)
    assert res["promoted"] and versions(name) == ["1", "4"]  # deleted numbers (2, 3) are not reused


def die_after_the_version_is_created(monkeypatch) -> None:
    """Stands in for SIGKILL right after the version was created: no rollback, no report."""

    def killed(*a):
        raise SystemExit(9)

    monkeypatch.setattr(publish, "gate_markdown", killed)
    monkeypatch.setattr(publish, "_rollback", lambda *a: None)  # a killed process rolls nothing back


def test_rerun_in_a_killed_registrations_run_replaces_its_orphan(store, sft_dir, repo, tmp_path, monkeypatch):
    """SIGKILL leaves no chance to roll back: the version exists, the run stays RUNNING. The rerun resumes that
    run (register.resume_key) and deletes the orphan first: one registration, one version."""
    name = "seedlm-orphan"
    cfg = RegisterConfig(model_name=name)
    do_register(cfg, sft_dir, write_eval(tmp_path / "e1.json", 0.3), tmp_path / "out", repo)  # v1, champion
    killed = mlflow.start_run(run_name="register")
    die_after_the_version_is_created(monkeypatch)
    with pytest.raises(SystemExit):
        reg.register(
            cfg,
            sft_dir,
            write_eval(tmp_path / "e2.json", 0.6),
            tmp_path / "out",
            repo_root=repo,
            ctx=StageContext(run_id=killed.info.run_id, progress=False),
        )
    monkeypatch.undo()
    assert versions(name) == ["1", "2"]  # v2: the orphan, without aliases
    res = reg.register(
        cfg,
        sft_dir,
        write_eval(tmp_path / "e2.json", 0.6),
        tmp_path / "out",
        repo_root=repo,
        ctx=StageContext(run_id=killed.info.run_id, progress=False),
    )
    mlflow.end_run()
    assert versions(name) == ["1", "3"] and res["version"] == 3 and res["promoted"]
    assert aliases(name) == {"champion": "3", "challenger": "3"}


def test_a_new_registration_removes_what_a_killed_one_left(store, sft_dir, repo, tmp_path, monkeypatch):
    """A flow killed during register starts a new pipeline run, so the next registration is a new run: it
    deletes the alias-less version of the register run that ended KILLED (as the runner marks a dead
    process's run), and leaves versions of finished runs alone."""
    name = "seedlm-orphan-flow"
    cfg = RegisterConfig(model_name=name)
    do_register(cfg, sft_dir, write_eval(tmp_path / "e1.json", 0.3), tmp_path / "out", repo)  # v1, champion
    do_register(cfg, sft_dir, write_eval(tmp_path / "e2.json", 0.2), tmp_path / "out", repo)  # v2, rejected
    killed = mlflow.start_run(run_name="register", tags={"seedlm.stage": "register"})
    die_after_the_version_is_created(monkeypatch)
    with pytest.raises(SystemExit):
        reg.register(
            cfg,
            sft_dir,
            write_eval(tmp_path / "e3.json", 0.6),
            tmp_path / "out",
            repo_root=repo,
            ctx=StageContext(run_id=killed.info.run_id, progress=False),
        )
    monkeypatch.undo()
    mlflow.end_run("KILLED")
    assert versions(name) == ["1", "2", "3"]
    with mlflow.start_run(run_name="register") as bystander:
        pass
    client = MlflowClient()
    client.set_registered_model_alias(name, "champion", "3")  # killed after it became champion: kept
    reg.drop_orphans(client, name, bystander)
    assert versions(name) == ["1", "2", "3"]
    client.set_registered_model_alias(name, "champion", "1")
    res, _ = do_register(cfg, sft_dir, write_eval(tmp_path / "e4.json", 0.6), tmp_path / "out", repo)
    assert versions(name) == ["1", "2", "4"] and res["version"] == 4  # v2 (a finished run's) stays
    assert aliases(name) == {"champion": "4", "challenger": "4"}


def test_failure_on_new_model_removes_registered_model(store, sft_dir, repo, tmp_path, monkeypatch):
    name = "seedlm-new-fail"
    monkeypatch.setattr(publish, "gate_markdown", lambda *a: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        do_register(
            RegisterConfig(model_name=name), sft_dir, write_eval(tmp_path / "e.json", 0.5), tmp_path / "out", repo
        )
    assert not MlflowClient().search_registered_models(f"name='{name}'")
    assert not (tmp_path / "out").exists()


def test_bad_inputs_fail_before_any_version(store, sft_dir, repo, tmp_path):
    name = "seedlm-missing"
    cfg = RegisterConfig(model_name=name)
    with pytest.raises(StageError, match="evaluate.json: missing; run `dvc repro evaluate`"):
        do_register(cfg, sft_dir, tmp_path / "evaluate.json", tmp_path / "out", repo)
    no_meta = tmp_path / "bare"
    no_meta.mkdir()
    with pytest.raises(StageError, match="seedlm.json: missing"):
        do_register(cfg, no_meta, write_eval(tmp_path / "e.json", 0.5), tmp_path / "out", repo)
    gate = cfg.model_copy(update={"gate": GateConfig(min={"chrf": 0.1})})
    with pytest.raises(StageError, match="sft.chrf missing"):
        do_register(gate, sft_dir, write_eval(tmp_path / "e.json", 0.5), tmp_path / "out", repo)
    lora = tmp_path / "lora"  # lora_format adapter, but the sft folder has no adapter/
    shutil.copytree(sft_dir, lora)
    write_meta(lora, "sft", {"sft": {"method": "lora"}}, {}, {})
    with pytest.raises(StageError, match="adapter: missing, but register.lora_format is adapter"):
        do_register(
            cfg.model_copy(update={"lora_format": "adapter"}),
            lora,
            write_eval(tmp_path / "e.json", 0.5),
            tmp_path / "out",
            repo,
        )
    assert not MlflowClient().search_registered_models(f"name='{name}'")
    assert not (tmp_path / "out").exists()
