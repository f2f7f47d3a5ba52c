"""The lineage command against a real sqlite MLflow: how to reproduce a version, what changed vs the champion."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import mlflow  # noqa: E402
from _register_fixtures import LOCK, build_sft_folder, git, write_eval  # noqa: E402

from components import register as reg  # noqa: E402
from components.core.config import parse_params  # noqa: E402
from components.core.context import StageContext, StageError  # noqa: E402
from components.registry import lineage, models

NAME = "seedlm-lineage"


@pytest.fixture(scope="module")
def history(tmp_path_factory):
    """v1 (champion) and v2 (rejected: worse, other params, other processed data, a later commit)."""
    from mlflow.tracking._tracking_service import utils as tracking_utils

    root = tmp_path_factory.mktemp("lineage")
    uri = f"sqlite:///{root}/mlflow.db"
    repo, sft = root / "repo", root / "sft"
    build_sft_folder(sft)
    repo.mkdir()
    git(repo, "init", "-q")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tracking_utils, "_tracking_uri", tracking_utils._tracking_uri)
        mp.setattr(mlflow.tracking.fluent, "_active_experiment_id", None)  # not another file's experiment
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        mp.setenv("MLFLOW_EXPERIMENT_ID", mlflow.create_experiment("lineage", (root / "artifacts").as_uri()))
        mp.chdir(repo)
        (repo / ".gitignore").write_text("reports/\n")
        out = {}
        for v, (processed, steps, em) in enumerate([("b" * 32, 300, 0.5), ("c" * 32, 1, 0.1)], start=1):
            (repo / "dvc.lock").write_text(LOCK.format(raw="a" * 32, processed=processed))
            (repo / "notes.txt").write_text(f"change {v}\n")
            git(repo, "add", "-A")
            git(repo, "commit", "-qm", f"v{v}")
            params = parse_params(
                {
                    "sft": {"max_steps": steps, "warmup_steps": 0},
                    "paths": {"sft": str(sft), "metrics": str(root / "metrics"), "register": "reports/register"},
                    "register": {"model_name": NAME, "gate": {"min": {}, "max_regression": {"exact_match": 0.0}}},
                }
            )
            write_eval(root / "metrics" / "evaluate.json", em, ci=0.02)
            with mlflow.start_run(run_name="register") as run:
                res = reg.run(params, StageContext(run_id=run.info.run_id, progress=False))
            out[v] = {"commit": git(repo, "rev-parse", "HEAD"), "lock": (repo / "dvc.lock").read_text(), "result": res}
        yield {"root": root, "repo": repo, "uri": uri, **out}


def test_versions_carry_their_lineage(history):
    assert history[1]["result"]["promoted"] and not history[2]["result"]["promoted"]
    info = lineage.lineage(f"models:/{NAME}/2")
    t = info["tags"]
    assert info["model_uri"] == f"models:/{NAME}/2" and info["aliases"] == ["challenger"]
    assert t["git_commit"] == history[2]["commit"] and t["git_dirty"] == "false"
    assert t["data.processed.md5"] == "c" * 32 + ".dir" and info["params"]["sft"]["max_steps"] == 1


def test_lineage_diffs_against_the_champion(history):
    info = lineage.lineage(f"models:/{NAME}@challenger")  # aliases resolve to their version
    ch = info["changes"]
    assert ch["against"] == "1" and ch["against_ref"] == "champion"
    assert ch["params"] == {"sft.max_steps": [300, 1]}
    assert ch["hashes"]["data.processed.md5"] == ["b" * 32 + ".dir", "c" * 32 + ".dir"]
    assert ch["hashes"]["git_commit"] == [history[1]["commit"], history[2]["commit"]]
    assert "data.raw.md5" not in ch["hashes"] and "dvc.ingest.data/raw" not in ch["hashes"]  # unchanged
    assert "notes.txt" in ch["code"] and "dvc.lock" in ch["code"]  # git diff --stat between the commits
    # against an explicit version, and the champion against itself: nothing to diff
    assert lineage.lineage(f"models:/{NAME}/1", against="2")["changes"]["params"] == {"sft.max_steps": [1, 300]}
    assert "changes" not in lineage.lineage(f"models:/{NAME}/1")


def test_reproduce_recipe_works(history):
    """Follow the printed steps for v1 from v2's checkout: the code and dvc.lock of v1 come back."""
    repo = history["repo"]
    steps = lineage.lineage(f"models:/{NAME}/1")["reproduce"]
    assert steps[1] == f"git checkout {history[1]['commit']}"
    assert any(s.startswith("dvc checkout") for s in steps) and any(s.startswith("dvc repro") for s in steps)
    assert "register/params.yaml" in steps[2]  # always: a run's overrides are not in the commit
    env = {**os.environ, "MLFLOW_TRACKING_URI": history["uri"]}
    for step in steps[1:4]:  # git checkout, then restore params.yaml and dvc.lock from the run (the mlflow CLI)
        cmd = step.split("   #")[0].replace("mlflow artifacts", f"{Path(sys.executable).parent}/mlflow artifacts")
        proc = subprocess.run(cmd, shell=True, cwd=repo, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        if step.startswith("git checkout"):
            (repo / "dvc.lock").write_text("not the lock of the registration\n")  # the download must restore it
            (repo / "params.yaml").write_text("seed: 0\n")
    assert git(repo, "rev-parse", "HEAD") == history[1]["commit"]
    assert (repo / "dvc.lock").read_text() == history[1]["lock"]
    assert yaml.safe_load((repo / "params.yaml").read_text()) != {"seed": 0}  # the registration's params
    assert (repo / "notes.txt").read_text() == "change 1\n"
    git(repo, "checkout", "-q", "-f", "master" if "master" in git(repo, "branch") else "main")


def test_command_line(history, capsys):
    assert lineage.main([f"models:/{NAME}/2"]) == 0
    text = capsys.readouterr().out
    assert f"models:/{NAME}/2  aliases: challenger  gate: rejected" in text
    assert "Reproduce:" in text and f"git checkout {history[2]['commit']}" in text
    assert "Changes against champion (v1):" in text and "param sft.max_steps: 300 -> 1" in text
    assert f"data.processed.md5: {'b' * 32}.dir -> {'c' * 32}.dir" in text
    assert lineage.main([f"models:/{NAME}/2", "--json", "--against", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["changes"]["against"] == "1"
    assert lineage.main([f"models:/{NAME}/99"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("seedlm lineage: error:") and len(err.strip().splitlines()) == 1
    assert lineage.main(["seedlm/2"]) == 2 and "expected models:/NAME/VERSION" in capsys.readouterr().err


def test_dirty_tree_and_missing_pieces(history, tmp_path):
    rec = {
        "tags": {
            "git_commit": "abc",
            "git_dirty": "true",
            "lora_base.path": "/x/pretrain",
            "lora_base.sha256": "f" * 64,
        },
        "run_id": "r1",
    }
    steps = lineage.reproduce_steps(rec, "sqlite:///m.db")
    assert any("register/params.yaml" in s and "params.yaml" in s for s in steps)
    assert any("LoRA adapter" in s and "ffffffff" in s for s in steps)
    with pytest.raises(StageError, match="no version of 'nope' has alias 'champion'"):
        models.parse_model_uri("models:/nope@champion")
    assert models.ref_name("models:/seedlm/3", set()) == ("seedlm-v3", "models:/seedlm/3")
    assert models.ref_name("models:/seedlm@champion", {"seedlm-champion"}) == (
        "seedlm-champion_",
        "models:/seedlm@champion",
    )
    assert models.ref_name("mine=/a/b", set()) == ("mine", "/a/b")
    assert models.ref_name("/a/b/", set()) == ("b", "/a/b/")
    empty = tmp_path / "no.db"
    assert models.alias_version("x", uri=f"sqlite:///{empty}") is None and not empty.exists()
    shutil.rmtree(tmp_path, ignore_errors=True)
