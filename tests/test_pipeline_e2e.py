"""The whole flow on a tiny config, in a temporary git + DVC repo with a temporary MLflow store.

Checks the three promises of the foundation: the registered champion loads and generates, the
Prefect run and `dvc repro` share one stage graph (neither redoes the other's work), and the
metrics DVC tracks hold sane values. And that the run's Prefect log reads well: training progress, no
library noise; a rerun that changes nothing says so and leaves the registry as it was.
"""

from __future__ import annotations

import json
import os
import re

import pytest
import yaml
from repos import TINY, make_repo
from stores import current_store

from components.core.stages import STAGES


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory, harness):
    repo = make_repo(tmp_path_factory.mktemp("repo"), TINY)
    cwd = os.getcwd()
    from flows.pipeline import pipeline

    # the store, and everything MLflow puts in os.environ (MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_ID), are this
    # module's only: later modules' servers and workers inherit os.environ
    with current_store(f"sqlite:///{repo}/mlflow.db"):
        try:
            results = pipeline(root=str(repo))
            yield repo, results
        finally:
            os.chdir(cwd)


def _pipeline_runs(repo):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{repo}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["seedlm"], output_format="list", order_by=["start_time ASC"])
    return [r for r in runs if r.info.run_name == "pipeline"]


def _flow_run_logs(flow_run_id: str) -> list:
    """Every log line the Prefect API holds for the flow run and its task runs, oldest first."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()  # lines still queued in this process
    logs: list = []
    with get_client(sync_client=True) as client:
        while page := client.read_logs(
            LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=200, offset=len(logs)
        ):
            logs += page
    return logs


def test_flow_registers_a_champion_that_generates(pipeline_run):
    import mlflow

    repo, results = pipeline_run
    assert [*results] == list(STAGES)
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
    assert children == set(STAGES)
    assert all(r.info.status == "FINISHED" for r in runs)


def test_dvc_sees_the_flow_run_as_its_own(pipeline_run):
    from dvc.repo import Repo

    repo, _ = pipeline_run
    with Repo(str(repo)) as dvc:
        assert dvc.status() == {}
        assert dvc.reproduce() == []  # nothing to redo
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert set(lock["stages"]) == set(STAGES)


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
    for folder in ("data/raw", "data/processed", "data/index", "models/pretrain", "models/sft", "reports/evaluate"):
        assert (repo / folder / "seedlm.json").is_file(), folder


BYTECODE = re.compile(
    r"^\s*(\d+\s+)?\d+\s+(RESUME|LOAD_GLOBAL|LOAD_ATTR|LOAD_FAST|LOAD_METHOD|PRECALL|CALL|"
    r"RETURN_VALUE|KW_NAMES|PUSH_NULL)\b"
)


def test_the_run_log_shows_training_progress_and_no_library_noise(pipeline_run):
    repo, _ = pipeline_run
    flow_run_id = _pipeline_runs(repo)[0].data.tags["prefect_flow_run_id"]
    logs = _flow_run_logs(flow_run_id)
    assert logs, "the flow run has no log lines"
    noise = [x.message for x in logs if any(BYTECODE.match(line) for line in x.message.splitlines())]
    assert not noise, f"{len(noise)} log lines of bytecode (dis output), e.g. {noise[:3]}"
    progress = [x for x in logs if x.name == "seedlm.train"]
    pattern = r"(pretrain|sft): step (\d+)/(\d+), loss \d+\.\d{4}, [\d,]+ tokens/s, ETA \d+m\d\ds"
    steps = {(m[1], int(m[2]), int(m[3])) for x in progress if (m := re.fullmatch(pattern, x.message))}
    assert {("pretrain", 10, 40), ("pretrain", 40, 40), ("sft", 20, 20)} <= steps, [x.message for x in progress]
    assert all(x.task_run_id for x in progress)  # in the stage's task log, not only the flow's


def test_second_flow_run_redoes_nothing(pipeline_run):
    import mlflow

    from flows.pipeline import pipeline

    repo, first = pipeline_run
    second = pipeline(root=str(repo))
    assert second["register"]["version"] == first["register"]["version"]
    mlflow.set_tracking_uri(f"sqlite:///{repo}/mlflow.db")
    client = mlflow.MlflowClient()
    versions = client.search_model_versions("name='seedlm'")
    assert len(versions) == 1
    # it says so: outcome "unchanged" (not "promoted"), and the version's description keeps its one links block
    runs = _pipeline_runs(repo)
    assert [r.data.tags["seedlm.outcome"] for r in runs] == ["promoted", "unchanged"]
    assert runs[1].data.tags["seedlm.reason"].startswith("seedlm v1 unchanged: register was up to date")
    desc = client.get_model_version("seedlm", "1").description
    assert desc.count("**Links**") == 1, desc
    assert runs[0].data.tags["prefect_flow_run_id"] in desc  # the run that registered it, not the latest
