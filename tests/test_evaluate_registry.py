"""evaluate beside the registry: the champion scored on the same items and gated, registry URIs from the CLI
(a sqlite tracking store in tmp, the runner's experiment; conftest's `tiny`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _evaluate_fixtures import cfg, make_model  # noqa: E402
from stores import current_store  # noqa: E402

from components.core.io import read_json  # noqa: E402


# ---------------------------------------------------------------- the registry: champion, URIs, the gate
@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One sqlite tracking store for this file, with the runner's experiment; artifacts under tmp."""
    import mlflow

    root = tmp_path_factory.mktemp("mlflow")
    with current_store(f"sqlite:///{root}/mlflow.db"):
        mlflow.create_experiment("seedlm", artifact_location=(root / "artifacts").as_uri())  # the runner's
        yield root


def stage_params(tiny, root: Path, sft: Path, name: str):
    from components.core.config import GateConfig, Params, Paths, RegisterConfig

    t = tiny["root"]
    paths = Paths(
        processed=str(tiny["processed"]),
        pretrain=str(t / "pretrain"),
        sft=str(sft),
        evaluate=str(root / "reports" / "evaluate"),
        register=str(root / "reports" / "register"),
        metrics=str(root / "metrics"),
        plots=str(t / "plots"),
        checkpoints=str(root / ".seedlm" / "ckpt"),
    )
    gate = GateConfig(min={"exact_match": 0.0}, max_regression={"exact_match": 0.0})
    return Params(
        paths=paths, evaluate=cfg(bootstrap=300), register=RegisterConfig(model_name=name, max_new_tokens=4, gate=gate)
    )


@pytest.fixture(scope="module")
def registered(tiny, store, tmp_path_factory):
    """The fitted model evaluated and registered through the runner: v1, champion."""
    import shutil

    from components.core.io import write_meta
    from components.core.runner import run_stage

    root = tmp_path_factory.mktemp("pipeline")
    good = root / "good"
    shutil.copytree(tiny["models"]["sft"], good)
    write_meta(good, "sft", {"seed": 1, "sft": {"method": "full"}}, {"base_pretrained": True}, {})
    name = "seedlm-e2e"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)  # the register stage's repo root
        first = run_stage("evaluate", stage_params(tiny, root, good, name), progress=False)
        reg = run_stage("register", stage_params(tiny, root, good, name), progress=False)
    assert "champion" not in first and reg["version"] == 1 and reg["promoted"]
    return {"root": root, "name": name, "first": first}


def test_worse_model_never_becomes_champion(tiny, registered, monkeypatch):
    """A 1-step model, evaluated beside the registry's champion on the same items, is rejected by the gate."""
    import mlflow
    from mlflow import MlflowClient

    from components.core.io import write_meta
    from components.core.runner import run_stage

    root, name, first = registered["root"], registered["name"], registered["first"]
    bad = root / "bad"
    make_model(bad, tiny["tok"], tiny["items"], steps=1, seed=2)
    write_meta(bad, "sft", {"seed": 1, "sft": {"method": "full", "max_steps": 1}}, {"base_pretrained": True}, {})
    monkeypatch.chdir(root)
    second = run_stage("evaluate", stage_params(tiny, root, bad, name), progress=False)
    assert second["sources"]["champion"] == f"models:/{name}/1"
    for key in ("exact_match", "rougeL", "response_ppl", "val_ppl"):  # the downloaded champion = the same weights
        assert second["champion"][key] == pytest.approx(first["sft"][key], rel=1e-5), key
    em = second["compare"]["sft_vs_champion"]["exact_match"]
    assert em["significant"] and em["ci"][1] < 0 and first["sft"]["exact_match"] > 0.2
    res = run_stage("register", stage_params(tiny, root, bad, name), progress=False)
    assert res["version"] == 2 and not res["promoted"] and res["champion_version"] == 1
    client = MlflowClient()
    assert {k: str(v) for k, v in client.get_registered_model(name).aliases.items()} == {
        "champion": "1",
        "challenger": "2",
    }
    mv = client.get_model_version(name, "2")
    gate = json.loads(mv.tags["gate.report"])
    (rule,) = [r for r in gate["rules"] if r["rule"] == "max_regression"]
    assert gate["paired"] and rule["method"] == "paired bootstrap" and rule["significant"] and not rule["passed"]
    assert rule["drop"] == pytest.approx(first["sft"]["exact_match"] - second["sft"]["exact_match"])
    assert rule["drop_ci"][0] > 0 and "Decision: rejected" in mv.description
    # run without DVC (no dvc.lock): the processed data is identified by its metadata hash, also as a dataset input
    from components.registry.provenance import meta_hash

    assert mv.tags["data.processed.meta_hash"] == meta_hash(tiny["processed"]) and "data.processed.md5" not in mv.tags
    digests = {d.dataset.name: d.dataset.digest for d in client.get_run(mv.run_id).inputs.dataset_inputs}
    assert digests == {
        "seedlm-processed": meta_hash(tiny["processed"]),
        "seedlm-tokenizer": mv.tags["data.tokenizer.sha256"][:32],
    }
    assert "| max_regression | exact_match |" in (root / "reports" / "register" / "gate.md").read_text()
    runs = mlflow.search_runs(
        experiment_names=["seedlm"], filter_string="attributes.run_name = 'evaluate'", output_format="list"
    )
    assert len(runs) == 2
    arts = {a.path for a in client.list_artifacts(runs[0].info.run_id)}
    assert {"report.md", "samples.jsonl", "metrics.png", "samples_table.json"} <= arts  # the table, for the UI
    assert runs[0].data.metrics["compare.sft_vs_champion.exact_match.diff"] == pytest.approx(em["diff"])


@pytest.mark.filterwarnings("ignore:'components.evaluate' found in sys.modules")
def test_cli_evaluates_registry_uris_and_folders(tiny, registered, tmp_path, monkeypatch, capsys):
    import runpy
    import sys

    import yaml

    import components.evaluate as ev

    name, first = registered["name"], registered["first"]
    params = tmp_path / "params.yaml"
    params.write_text(
        yaml.safe_dump(
            {
                "seed": 7,
                "paths": {"processed": str(tiny["processed"])},
                "evaluate": {"bootstrap": 100, "max_new_tokens": 8, "batch_size": 8, "ppl_batches": 2},
            }
        )
    )
    monkeypatch.chdir(tmp_path)

    def cli(*models: str) -> int:
        args = [x for m in models for x in ("--model", m)]
        monkeypatch.setattr(sys, "argv", ["evaluate", "--params", str(params), "--no-progress", *args, "--out", "ext"])
        try:
            with pytest.raises(SystemExit) as done:
                runpy.run_module("components.evaluate", run_name="__main__")
        finally:
            ev.EXTERNAL.clear()
        return done.value.code

    assert cli(f"models:/{name}@champion", f"mine={tiny['models']['pretrain']}") == 0
    m = read_json(tmp_path / "ext" / "metrics.json")
    assert m["sources"] == {f"{name}-champion": f"models:/{name}@champion", "mine": str(tiny["models"]["pretrain"])}
    assert m[f"{name}-champion"]["exact_match"] == pytest.approx(first["sft"]["exact_match"])
    assert m["compare"][f"{name}-champion_vs_mine"]["exact_match"]["significant"]
    assert f"| {name}-champion |" in (tmp_path / "ext" / "report.md").read_text()
    assert not (tmp_path / ".seedlm").exists()  # another model's evaluation joins no control history
    capsys.readouterr()
    assert cli(f"models:/{name}/99") == 2
    err = capsys.readouterr().err
    assert f"models:/{name}/99: not found" in err and len(err.strip().splitlines()) == 1
    assert cli(f"models:/{name}@nosuch") == 2 and f"models:/{name}@nosuch: not found" in capsys.readouterr().err
    assert cli(str(tmp_path / "nowhere")) == 2 and "nowhere" in capsys.readouterr().err
