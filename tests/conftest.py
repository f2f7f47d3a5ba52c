"""Test-wide settings: offline, quiet, deterministic; fixtures shared by several test files."""

import os

import pytest
from stores import current_store

for key, value in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "DVC_NO_ANALYTICS": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(key, value)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and stay fast when other processes share the 2 cores.
    A module opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------- fixtures of the split test files
# Shared by several files, so built once per session; the builders are in _evaluate_fixtures / _register_fixtures.
@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """test_evaluate*: a tiny tokenizer, processed data, an unfitted (pretrain) and a fitted (sft) GPT-2."""
    from _evaluate_fixtures import build_tiny

    return build_tiny(tmp_path_factory.mktemp("eval"))


@pytest.fixture(scope="session")
def sft_dir(tmp_path_factory):
    """test_register*: a tiny model folder as the sft stage writes it."""
    from _register_fixtures import build_sft_folder

    out = tmp_path_factory.mktemp("sft") / "sft"
    build_sft_folder(out)
    return out


@pytest.fixture
def repo(tmp_path):
    """test_register*: a git repo with a dvc.lock, standing in for the project root."""
    from _register_fixtures import LOCK, PROCESSED, RAW, git

    (tmp_path / "dvc.lock").write_text(LOCK.format(raw=RAW, processed=PROCESSED), encoding="utf-8")
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", "dvc.lock")
    git(tmp_path, "commit", "-qm", "init")
    return tmp_path


@pytest.fixture(scope="session")
def register_tracking(tmp_path_factory):
    """test_register*: one sqlite tracking store + artifact root for all of them (creating one takes seconds)."""
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    exp = MlflowClient(uri).create_experiment("test-register", artifact_location=(root / "artifacts").as_uri())
    return root, uri, exp


@pytest.fixture(scope="module")
def store(register_tracking):
    """test_register*: that store, current while one file runs (the root folder)."""
    root, uri, exp = register_tracking
    with current_store(uri, exp):
        yield root
