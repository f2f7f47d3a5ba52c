"""register stage + serving pyfunc, against a real MLflow (sqlite in tmp, conftest's `store`) and a tiny GPT-2:
registration and serving, the gate between versions, concurrent registrations, LoRA formats."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402
import pandas as pd  # noqa: E402
from _register_fixtures import (  # noqa: E402
    PROCESSED,
    PROMPTS,
    RAW,
    aliases,
    build_lora,
    do_register,
    git,
    versions,
    write_eval,
)
from mlflow import MlflowClient  # noqa: E402

from components import register as reg  # noqa: E402
from components.core.config import GateConfig, RegisterConfig, parse_params  # noqa: E402
from components.core.context import StageContext, StageError  # noqa: E402
from components.core.io import read_json, sha256_dir  # noqa: E402
from components.registry import models, provenance


# ---------------------------------------------------------------- registry
def test_first_registration_is_champion_and_serves(store, sft_dir, repo, monkeypatch):
    """Through run(): paths from params, repo root = cwd, full params and lineage in the tags."""
    name = "seedlm-first"
    monkeypatch.chdir(repo)
    monkeypatch.setenv("PREFECT__FLOW_RUN_ID", "flow-env")
    shutil.copytree(sft_dir, repo / "models" / "sft")
    tok_dir = repo / "data" / "processed" / "tokenizer"
    shutil.copytree(sft_dir, tok_dir, ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    write_eval(repo / "metrics" / "evaluate.json", 0.4)
    params = parse_params({"register": {"model_name": name, "max_new_tokens": 5}})
    with mlflow.start_run(run_name="pipeline") as parent, mlflow.start_run(run_name="register", nested=True) as run:
        res = reg.run(
            params,
            StageContext(
                run_id=run.info.run_id,
                parent_run_id=parent.info.run_id,
                progress=False,
                extra={provenance.FLOW_RUN_TAG: "flow-123"},
            ),
        )
    assert res["version"] == 1 and res["promoted"] and res["gate_passed"] and res["model_format"] == "merged"
    assert res["model_uri"] == f"models:/{name}/1"
    client = MlflowClient()
    assert aliases(name) == {"champion": "1", "challenger": "1"}

    mv = client.get_model_version(name, "1")
    t = mv.tags
    assert t["git_commit"] == git(repo, "rev-parse", "HEAD") and t["git_dirty"] == "true"  # models/ untracked
    assert t["dvc.sft.models/sft"] == "feedbeef.dir" and t["dvc.sft.components/sft.py"] == "0123abcd"
    assert t["data.raw.md5"] == RAW + ".dir" and t["data.processed.md5"] == PROCESSED + ".dir"
    assert t["data.tokenizer.sha256"] == sha256_dir(tok_dir)
    assert "base_checkpoint.sha256" not in t  # model.init_from unset
    assert json.loads(t["params"]) == params.model_dump(mode="json")
    assert len(t["params_hash"]) == 16
    assert t["gate.decision"] == "promoted" and t["metric.exact_match"] == "0.4"
    gate = json.loads(t["gate.report"])
    assert gate["decision"] == "promoted" and {r["rule"] for r in gate["rules"]} == {"min", "max_regression"}
    assert json.loads(t["metric.exact_match_ci"]) == pytest.approx([0.3, 0.5])
    assert t["metric.pretrain.val_ppl"] == "12.5" and t["eval.n_examples"] == "100"
    assert t["mlflow_run_id"] == run.info.run_id and t["parent_run_id"] == parent.info.run_id
    assert t[provenance.FLOW_RUN_TAG] == "flow-123"  # the flow's id (ctx.extra) wins over the environment
    assert t["sft_method"] == "full" and t["pretrain_enabled"] == "true" and t["model_format"] == "merged"
    assert float(t["model_size_mb"]) > 0
    assert run.info.run_id in mv.description and mv.run_id == run.info.run_id
    assert "# Gate report" in mv.description and "components.registry.lineage models:/seedlm-first/1" in mv.description

    # the data as MLflow dataset inputs of the run, digests = the DVC hashes
    inputs = {d.dataset.name: d for d in client.get_run(run.info.run_id).inputs.dataset_inputs}
    assert {k: v.dataset.digest for k, v in inputs.items()} == {
        "seedlm-raw": RAW + ".dir",
        "seedlm-processed": PROCESSED + ".dir",
        "seedlm-tokenizer": t["data.tokenizer.sha256"][:32],
    }
    assert t["datasets"] == "raw,processed,tokenizer"

    out = repo / "reports" / "register"
    record = read_json(out / "registration.json")
    assert record["version"] == 1 and record["promoted"] and record["gate"]["decision"] == "promoted"
    assert set(record["aliases"]) == {"champion", "challenger"}
    assert "promoted" in (out / "gate.md").read_text() and (out / "seedlm.json").is_file()
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "register")}
    assert {
        "register/registration.json",
        "register/gate.md",
        "register/gate.json",
        "register/params.json",
        "register/params.yaml",
        "register/dvc.lock",
    } <= arts
    lock = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="register/dvc.lock")
    assert Path(lock).read_text() == (repo / "dvc.lock").read_text()
    restored = yaml.safe_load(
        Path(
            mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="register/params.yaml")
        ).read_text()
    )
    assert parse_params(restored) == params  # a params.yaml that reproduces the run

    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    assert "max_new_tokens" in {p.name for p in model.metadata.signature.params.params}
    answers = model.predict(pd.DataFrame({"prompt": PROMPTS}))
    assert len(answers) == 2 and all(isinstance(a, str) and a for a in answers)
    # batched (left-padded) generation equals one prompt at a time
    assert answers == [model.predict([p])[0] for p in PROMPTS]
    assert model.predict(PROMPTS[0]) == answers[:1]
    # max_new_tokens: the registered default (5) vs fewer/more; greedy, so shorter is a prefix
    short = model.predict(PROMPTS, params={"max_new_tokens": 1})
    long = model.predict(PROMPTS, params={"max_new_tokens": 12})
    for s, a, lg in zip(short, answers, long):
        assert a.startswith(s) and lg.startswith(a) and len(s) < len(a) < len(lg)
    # a prompt longer than the context (64 positions) and more new tokens than fit: no crash
    (tail,) = model.predict(["zorbia " * 80], params={"max_new_tokens": 100})
    assert isinstance(tail, str)
    sampled = model.predict(PROMPTS, params={"do_sample": True, "temperature": 0.8, "max_new_tokens": 4})
    assert len(sampled) == 2 and all(isinstance(a, str) for a in sampled)
    py = model.unwrap_python_model()
    assert py.tokenizer.convert_tokens_to_ids("<|end|>") in py.stop_ids

    # nothing refers back to this repo: a fresh interpreter elsewhere loads and generates
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = (
        f"import json, mlflow; m = mlflow.pyfunc.load_model('models:/{name}@champion'); "
        f"print(json.dumps(m.predict({PROMPTS[0]!r}, params={{'max_new_tokens': 3}})))"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=store, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == model.predict(PROMPTS[0], params={"max_new_tokens": 3})


def test_worse_model_stays_challenger(store, sft_dir, repo, tmp_path):
    name = "seedlm-gate"
    cfg = RegisterConfig(
        model_name=name, gate=GateConfig(min={"exact_match": 0.05}, max_regression={"exact_match": 0.05})
    )
    out = tmp_path / "out"
    res, _ = do_register(cfg, sft_dir, write_eval(tmp_path / "e1.json", 0.4), out, repo)
    assert res["promoted"] and res["version"] == 1

    # within the allowed regression: promoted
    res, _ = do_register(cfg, sft_dir, write_eval(tmp_path / "e2.json", 0.37), out, repo)
    assert res["promoted"] and res["previous_champion"] == 1
    client = MlflowClient()
    assert aliases(name) == {"champion": "2", "challenger": "2"}

    # a drop of 0.07, but the challenger's CI [0.2, 0.4] holds the champion's 0.37: not significant, promoted
    res, run3 = do_register(cfg, sft_dir, write_eval(tmp_path / "e3.json", 0.30), out, repo)
    assert res["promoted"] and aliases(name) == {"champion": "3", "challenger": "3"}

    # a significant drop (tight CI, champion v3's 0.30 above it) beyond the limit: rejected, champion stays
    res, _ = do_register(cfg, sft_dir, write_eval(tmp_path / "e4.json", 0.20, ci=0.02), out, repo)
    assert res["version"] == 4 and not res["promoted"] and not res["gate_passed"]
    assert aliases(name) == {"champion": "3", "challenger": "4"}
    t = client.get_model_version(name, "4").tags
    assert t["gate.decision"] == "rejected" and "champion v3" in t["gate.reasons"]
    assert ", significant (unpaired" in t["gate.reasons"]
    record = read_json(out / "registration.json")
    assert record["version"] == 4 and not record["promoted"] and record["champion_version"] == 3
    assert "rejected" in (out / "gate.md").read_text()

    # evaluate scored this very champion on the same items: its paired CI decides (here: worse), although the
    # challenger's own CI is wide
    paired = {
        "sources": {"champion": f"models:/{name}/3"},
        "champion": {"exact_match": 0.36},
        "compare": {"sft_vs_champion": {"exact_match": {"diff": -0.08, "ci": [-0.12, -0.04], "significant": True}}},
    }
    res, _ = do_register(cfg, sft_dir, write_eval(tmp_path / "e5.json", 0.28, ci=0.2, **paired), out, repo)
    gate = read_json(out / "gate.json")
    assert not res["promoted"] and gate["paired"] and gate["rules"][-1]["champion"] == 0.36
    # ... but a comparison with another version is stale: the champion's tags and the challenger's CI decide
    stale = {**paired, "sources": {"champion": f"models:/{name}/1"}}
    res, _ = do_register(cfg, sft_dir, write_eval(tmp_path / "e6.json", 0.28, ci=0.2, **stale), out, repo)
    assert res["promoted"] and not read_json(out / "gate.json")["paired"]

    # below the minimum: rejected too
    lax = cfg.model_copy(update={"gate": GateConfig(min={"exact_match": 0.05}, max_regression={"exact_match": 1.0})})
    res, _ = do_register(lax, sft_dir, write_eval(tmp_path / "e7.json", 0.01), out, repo)
    assert not res["promoted"]
    assert aliases(name) == {"champion": "6", "challenger": "7"}
    assert "minimum" in client.get_model_version(name, "7").tags["gate.reasons"]


def test_concurrent_registrations_get_distinct_versions_and_one_champion(store, sft_dir, repo, tmp_path, monkeypatch):
    """Two registrations at once (threads; the race window widened): the lock makes them take turns."""
    import threading
    import time

    name = "seedlm-race"
    cfg = RegisterConfig(model_name=name, gate=GateConfig(min={}, max_regression={"exact_match": 0.0}))
    do_register(cfg, sft_dir, write_eval(tmp_path / "e0.json", 0.4, ci=0.01), tmp_path / "o0", repo)
    real = reg.registered_aliases

    def slow(client, model):  # read the champion, then dawdle before deciding
        out = real(client, model)
        time.sleep(1.0)
        return out

    monkeypatch.setattr(reg, "registered_aliases", slow)
    one_load = threading.Lock()  # transformers' from_pretrained is not thread-safe (two pipelines = two processes)
    log_model = reg.log_model

    def serial_log_model(*a, **k):
        with one_load:
            return log_model(*a, **k)

    monkeypatch.setattr(reg, "log_model", serial_log_model)
    results: dict[str, Any] = {}

    def one(tag: str, em: float) -> None:
        try:
            results[tag] = do_register(
                cfg, sft_dir, write_eval(tmp_path / f"{tag}.json", em, ci=0.01), tmp_path / tag, repo
            )[0]
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            results[tag] = e

    threads = [threading.Thread(target=one, args=("a", 0.6)), threading.Thread(target=one, args=("b", 0.5))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    a, b = results["a"], results["b"]
    assert isinstance(a, dict) and isinstance(b, dict), results
    assert {a["version"], b["version"]} == {2, 3}
    # whichever went second saw the first one's outcome: a (0.6) always ends up champion
    first, second = sorted((a, b), key=lambda r: r["version"])
    assert second["previous_champion"] == (first["version"] if first["promoted"] else 1)
    assert aliases(name)["champion"] == str(a["version"])
    assert b["promoted"] == (b["version"] < a["version"])
    assert (store / ".seedlm" / "registry-mlflow.db.lock").exists()  # beside the store, git-ignored in a repo


# ---------------------------------------------------------------- LoRA
def test_lora_adapter_only_merges_on_load(store, repo, tmp_path):
    base, sft = build_lora(tmp_path)
    eval_path = write_eval(tmp_path / "e.json", 0.5)
    assert mlflow.active_run() is None
    name = "seedlm-lora"
    merged = reg.register(RegisterConfig(model_name=name), sft, eval_path, tmp_path / "o1", repo_root=repo)
    assert mlflow.active_run() is None and merged["model_format"] == "merged"  # standalone: its own run
    assert MlflowClient().get_run(merged["run_id"]).info.status == "FINISHED"
    adapter = reg.register(
        RegisterConfig(model_name=name, lora_format="adapter"), sft, eval_path, tmp_path / "o2", repo_root=repo
    )
    assert adapter["model_format"] == "adapter" and adapter["model_size_mb"] < merged["model_size_mb"]
    t = MlflowClient().get_model_version(name, "2").tags
    assert t["model_format"] == "adapter" and t["sft_method"] == "lora" and t["pretrain_enabled"] == "true"
    assert t["lora_base.sha256"] == provenance.weights_sha256(base) and t["lora_base.path"] == str(base.resolve())
    shipped = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/2", dst_path=str(tmp_path / "dl")))
    files = {p.name for p in shipped.rglob("*") if p.is_file()}
    assert "adapter_model.safetensors" in files and "model.safetensors" not in files
    merged_files = {
        p.name
        for p in Path(mlflow.artifacts.download_artifacts(f"models:/{name}/1", dst_path=str(tmp_path / "dl1"))).rglob(
            "*"
        )
        if p.is_file()
    }
    assert "model.safetensors" in merged_files and "adapter_model.safetensors" not in merged_files

    # merged on load: the same answers as the merged registration (and not the base's)
    prompts = PROMPTS + ["Tell me about zorbia."]
    want = mlflow.pyfunc.load_model(f"models:/{name}/1").predict(prompts, params={"max_new_tokens": 6})
    got = mlflow.pyfunc.load_model(f"models:/{name}/2").predict(prompts, params={"max_new_tokens": 6})
    assert got == want
    # evaluate resolves the adapter URI to a merged HF folder too
    folder = models.resolve_model(f"models:/{name}/2", tmp_path / "resolved")
    assert (
        provenance.weights_sha256(folder) != provenance.weights_sha256(base) and (folder / "tokenizer.json").is_file()
    )

    # the base changed since registration: refused, with the way back
    with open(base / "model.safetensors", "r+b") as f:
        f.seek(-1, 2)
        f.write(b"\x07")
    with pytest.raises(Exception, match="not the registered base"):
        mlflow.pyfunc.load_model(f"models:/{name}/2")
    shutil.rmtree(base)
    with pytest.raises(Exception, match="not found.*base_path"):
        mlflow.pyfunc.load_model(f"models:/{name}/2")
    # without its base an adapter cannot be registered
    with pytest.raises(StageError, match="LoRA base model .* is missing"):
        reg.register(
            RegisterConfig(model_name=name, lora_format="adapter"), sft, eval_path, tmp_path / "o3", repo_root=repo
        )
    assert versions(name) == ["1", "2"]
