"""register's pure parts: the gate's rules and the provenance helpers (no tracking store)."""

from __future__ import annotations

import os
import shutil

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from _register_fixtures import PROCESSED, RAW, git  # noqa: E402

from components import register as reg  # noqa: E402
from components.core.config import GateConfig  # noqa: E402
from components.registry import provenance


# ---------------------------------------------------------------- the gate, pure
def test_gate_rules():
    gate = GateConfig(
        metric="exact_match", min={"exact_match": 0.1, "rougeL": 0.2}, max_regression={"exact_match": 0.05}
    )
    ok = {"exact_match": 0.38, "rougeL": 0.3}
    assert reg.evaluate_gate(gate, ok, None)["decision"] == "promoted"
    # no CI: every drop counts
    assert reg.evaluate_gate(gate, ok, {"exact_match": 0.40}, "3")["passed"]  # drop 0.02 <= 0.05
    worse = reg.evaluate_gate(gate, ok, {"exact_match": 0.50}, "3")  # drop 0.12 > 0.05
    assert not worse["passed"] and "champion v3" in worse["reasons"][0]
    low = reg.evaluate_gate(gate, {"exact_match": 0.9, "rougeL": 0.1}, None)
    assert low["decision"] == "rejected" and any("rougeL" in r for r in low["reasons"])
    # the gate metric is compared even when max_regression does not list it (allowed drop 0)
    strict = GateConfig(metric="exact_match", min={}, max_regression={})
    assert reg.evaluate_gate(strict, {"exact_match": 0.4}, {"exact_match": 0.4}, "1")["passed"]
    assert not reg.evaluate_gate(strict, {"exact_match": 0.39}, {"exact_match": 0.4}, "1")["passed"]
    # with the challenger's CI: the champion's value must lie above it for the drop to count
    wide = {"exact_match": 0.38, "exact_match_ci": [0.30, 0.46], "rougeL": 0.3}
    r = reg.evaluate_gate(gate, wide, {"exact_match": 0.45}, "3")  # drop 0.07, inside the CI
    assert r["passed"] and not r["rules"][-1]["significant"] and "not significant" in r["rules"][-1]["detail"]
    r = reg.evaluate_gate(gate, wide, {"exact_match": 0.50}, "3")  # 0.50 above the CI
    assert not r["passed"] and r["rules"][-1]["significant"] and r["rules"][-1]["method"].startswith("unpaired")
    # paired (evaluate scored both on the same items): the CI of the difference decides, not the wide CI
    paired = {"exact_match": {"diff": -0.07, "ci": [-0.10, -0.04], "significant": True}}
    r = reg.evaluate_gate(gate, wide, {"exact_match": 0.45}, "3", paired)
    rule = r["rules"][-1]
    assert not r["passed"] and r["paired"] and rule["method"] == "paired bootstrap"
    assert rule["drop_ci"] == pytest.approx([0.04, 0.10]) and rule["significant"]
    # significant but within the allowed drop: not worse
    assert reg.evaluate_gate(
        gate,
        wide,
        {"exact_match": 0.42},
        "3",
        {"exact_match": {"diff": -0.04, "ci": [-0.06, -0.02], "significant": True}},
    )["passed"]
    # a big drop whose paired CI includes 0: not worse
    noisy = {"exact_match": {"diff": -0.07, "ci": [-0.15, 0.01], "significant": False}}
    assert reg.evaluate_gate(gate, wide, {"exact_match": 0.45}, "3", noisy)["passed"]
    md = reg.gate_markdown("m", "4", r, wide)
    assert "**Decision: rejected** (champion stays v3)" in md and "+0.0400, +0.1000" in md


def test_provenance_helpers(repo, tmp_path_factory, monkeypatch):
    tags = provenance.dvc_hashes(repo)
    assert tags == {
        "dvc.sft.components/sft.py": "0123abcd",
        "dvc.sft.models/sft": "feedbeef.dir",
        "dvc.ingest.data/raw": RAW + ".dir",
        "dvc.preprocess.data/raw": RAW + ".dir",
        "dvc.preprocess.data/processed": PROCESSED + ".dir",
    }
    assert provenance.lock_md5(repo, "data/processed") == PROCESSED + ".dir"
    assert provenance.lock_md5(repo, "./data/raw/") == RAW + ".dir" and provenance.lock_md5(repo, "data/x") is None
    state = provenance.git_state(repo)
    assert state == {"git_commit": git(repo, "rev-parse", "HEAD"), "git_dirty": "false"}
    (repo / "dvc.lock").write_text((repo / "dvc.lock").read_text() + "# the pipeline's own record\n")
    (repo / "params.yaml").write_text("pretrain:\n  max_steps: 5\n")  # a run's overrides, written by the pipeline
    assert provenance.git_state(repo)["git_dirty"] == "false"  # files the pipeline writes are not code changes
    (repo / "new.txt").write_text("x")
    assert provenance.git_state(repo)["git_dirty"] == "true"
    plain = tmp_path_factory.mktemp("nogit")
    assert provenance.git_state(plain) == {"git_commit": "unknown", "git_dirty": "unknown"}
    assert provenance.dvc_hashes(plain) == {}
    monkeypatch.delenv("PREFECT__FLOW_RUN_ID", raising=False)
    monkeypatch.delenv("PREFECT__RUNTIME__FLOW_RUN__ID", raising=False)
    assert provenance.flow_run_id({}) is None and provenance.flow_run_id({provenance.FLOW_RUN_TAG: ""}) is None
    monkeypatch.setenv("PREFECT__FLOW_RUN_ID", "env-id")
    assert (
        provenance.flow_run_id({provenance.FLOW_RUN_TAG: "ctx-id"}) == "ctx-id"
        and provenance.flow_run_id({}) == "env-id"
    )


def test_weights_hash_is_the_same_in_serving(sft_dir, tmp_path):
    from components.registry.pyfunc import weights_sha256

    assert provenance.weights_sha256(sft_dir) == weights_sha256(sft_dir)
    copy = tmp_path / "copy"
    shutil.copytree(sft_dir, copy)
    (copy / "tokenizer.json").write_text("{}")  # not part of the weights hash
    assert provenance.weights_sha256(copy) == provenance.weights_sha256(sft_dir)
    with open(copy / "model.safetensors", "r+b") as f:
        f.seek(-1, 2)
        f.write(b"\x01" if f.read(1) != b"\x01" else b"\x02")
    assert provenance.weights_sha256(copy) != provenance.weights_sha256(sft_dir)
