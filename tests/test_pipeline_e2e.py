"""The whole flow on a tiny config, in a temporary git + DVC repo with a temporary MLflow store.

Checks the three promises of the foundation: the registered champion loads and generates, the
Prefect run and `dvc repro` share one stage graph (neither redoes the other's work), and the
metrics DVC tracks hold sane values.
"""

from __future__ import annotations

import json
import os

import pytest
import yaml
from repos import TINY, make_repo


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory, harness):
    repo = make_repo(tmp_path_factory.mktemp("repo"), TINY)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{repo}/mlflow.db"
    cwd = os.getcwd()
    from flows.pipeline import pipeline

    try:
        results = pipeline(root=str(repo))
        yield repo, results
    finally:
        os.chdir(cwd)
        os.environ.pop("MLFLOW_TRACKING_URI", None)


def test_flow_registers_a_champion_that_generates(pipeline_run):
    import mlflow

    repo, results = pipeline_run
    assert [*results] == ["ingest", "preprocess", "pretrain", "sft", "evaluate", "register"]
    mlflow.set_tracking_uri(f"sqlite:///{repo}/mlflow.db")
    client = mlflow.MlflowClient()
    champion = client.get_model_version_by_alias("seedlm", "champion")
    assert str(champion.version) == str(results["register"]["version"])
    model = mlflow.pyfunc.load_model("models:/seedlm@champion")
    out = model.predict(["Where does the first entity live?"], params={"max_new_tokens": 8})
    answers = list(out["response"]) if hasattr(out, "columns") else list(out)
    assert len(answers) == 1 and isinstance(answers[0], str)

    runs = mlflow.search_runs(experiment_names=["seedlm"], output_format="list")
    parent = [r for r in runs if r.info.run_name == "pipeline"]
    assert len(parent) == 1
    children = {r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id}
    assert children == {"ingest", "preprocess", "pretrain", "sft", "evaluate", "register"}
    assert all(r.info.status == "FINISHED" for r in runs)


def test_dvc_sees_the_flow_run_as_its_own(pipeline_run):
    from dvc.repo import Repo

    repo, _ = pipeline_run
    with Repo(str(repo)) as dvc:
        assert dvc.status() == {}
        assert dvc.reproduce() == []  # nothing to redo
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"ingest", "preprocess", "pretrain", "sft", "evaluate", "register"}


def test_metrics_have_sane_values(pipeline_run):
    repo, results = pipeline_run
    metrics = json.loads((repo / "metrics" / "evaluate.json").read_text())
    for model in ("pretrain", "sft"):
        assert metrics[model]["val_ppl"] > 1
    sft = metrics["sft"]
    for key in ("exact_match", "rougeL", "bleu", "response_ppl"):
        assert key in sft
    assert 0 <= sft["exact_match"] <= 1 and 0 <= sft["rougeL"] <= 1
    pre = json.loads((repo / "metrics" / "pretrain.json").read_text())
    assert pre["val_loss"] < 6.0  # below uniform over 320 tokens (ln 320 = 5.77) + slack
    report = json.loads((repo / "metrics" / "preprocess.json").read_text())
    assert report["pretrain"]["kept"] > 0 and report["sft"]["train"] > 0
    for folder in ("data/raw", "data/processed", "models/pretrain", "models/sft", "reports/evaluate"):
        assert (repo / folder / "seedlm.json").is_file(), folder


def test_second_flow_run_redoes_nothing(pipeline_run):
    import mlflow

    from flows.pipeline import pipeline

    repo, first = pipeline_run
    second = pipeline(root=str(repo))
    assert second["register"]["version"] == first["register"]["version"]
    mlflow.set_tracking_uri(f"sqlite:///{repo}/mlflow.db")
    versions = mlflow.MlflowClient().search_model_versions("name='seedlm'")
    assert len(versions) == 1
