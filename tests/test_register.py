"""register stage + serving pyfunc, against a real MLflow (sqlite in tmp) and a tiny GPT-2."""
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
from mlflow import MlflowClient  # noqa: E402

from components import lineage  # noqa: E402
from components import register as reg  # noqa: E402
from components.common import StageContext, StageError, read_json, sha256_dir, write_json, write_meta  # noqa: E402
from components.config import GateConfig, RegisterConfig, parse_params  # noqa: E402

SPECIAL = ["<|endoftext|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
TEMPLATE = ("{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
PROMPTS = ["What is the capital of Zorbia?", "Is Mipo a city?"]


def build_sft_folder(out: Path) -> None:
    """A tiny byte-level BPE tokenizer + GPT-2 saved like the sft stage does (specials never generated)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, min_frequency=1, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["what is the capital of zorbia? the capital of zorbia is mipo."] * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|pad|>", additional_special_tokens=SPECIAL[2:])
    fast.chat_template = TEMPLATE
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(fast), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                     bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id)
    model = GPT2LMHeadModel(cfg)
    with torch.no_grad():  # tied head: zero rows give specials logit 0, so greedy text is never empty
        for t in SPECIAL:
            model.transformer.wte.weight[fast.convert_tokens_to_ids(t)] = 0
    end_id = fast.convert_tokens_to_ids("<|end|>")
    model.generation_config = GenerationConfig(eos_token_id=[end_id, fast.eos_token_id], pad_token_id=fast.pad_token_id)
    model.save_pretrained(out)
    fast.save_pretrained(out)
    write_meta(out, "sft", {"seed": 1, "sft": {"method": "full"}}, {"steps": 1}, {})


def write_eval(path: Path, em: float, ci: float | None = 0.1, **extra: Any) -> Path:
    """An evaluate.json: sft's exact match with a CI of +-ci (None: no CI); `extra` adds top-level sections."""
    sft = {"exact_match": em, "rougeL": 0.5, "bleu": 0.2}
    if ci is not None:
        sft["exact_match_ci"] = [max(0.0, em - ci), em + ci]
    write_json(path, {"sft": sft, "pretrain": {"val_ppl": 12.5, "response_ppl": 30.0}, "n_examples": 100, **extra})
    return path


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True,
                          capture_output=True, text=True).stdout.strip()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One sqlite tracking store + artifact root for the whole file (creating one takes ~5 s)."""
    from mlflow.tracking._tracking_service import utils as tracking_utils

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    with pytest.MonkeyPatch.context() as mp:  # put URI, env and experiment back for other test files
        mp.setattr(tracking_utils, "_tracking_uri", tracking_utils._tracking_uri)
        mp.setattr(mlflow.tracking.fluent, "_active_experiment_id", None)  # not another file's experiment
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        exp = mlflow.create_experiment("test-register", artifact_location=(root / "artifacts").as_uri())
        mp.setenv("MLFLOW_EXPERIMENT_ID", exp)  # runs land here, artifacts under root
        yield root


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sft") / "sft"
    build_sft_folder(out)
    return out


LOCK = """schema: '2.0'
stages:
  ingest:
    cmd: python -m components.ingest
    outs:
    - path: data/raw
      hash: md5
      md5: {raw}.dir
  preprocess:
    cmd: python -m components.preprocess
    deps:
    - path: data/raw
      hash: md5
      md5: {raw}.dir
    outs:
    - path: data/processed
      hash: md5
      md5: {processed}.dir
  sft:
    cmd: python -m components.sft
    deps:
    - path: components/sft.py
      hash: md5
      md5: 0123abcd
      size: 10
    outs:
    - path: models/sft
      hash: md5
      md5: feedbeef.dir
      size: 99
      nfiles: 5
  register:
    cmd: python -m components.register
    outs:
    - path: reports/register
      hash: md5
      md5: 5ca1ab1e.dir
"""
RAW, PROCESSED = "a" * 32, "b" * 32


@pytest.fixture
def repo(tmp_path) -> Path:
    """A git repo with a dvc.lock, standing in for the project root."""
    (tmp_path / "dvc.lock").write_text(LOCK.format(raw=RAW, processed=PROCESSED), encoding="utf-8")
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", "dvc.lock")
    git(tmp_path, "commit", "-qm", "init")
    return tmp_path


def do_register(cfg, sft_dir, metrics, out, repo, **kw):
    """As the runner does: an active run for the stage, then the component."""
    with mlflow.start_run(run_name="register") as run:
        res = reg.register(cfg, sft_dir, metrics, out, repo_root=repo,
                           ctx=StageContext(run_id=run.info.run_id, progress=False, **kw))
    return res, run.info.run_id


def aliases(name: str) -> dict[str, str]:
    return {k: str(v) for k, v in MlflowClient().get_registered_model(name).aliases.items()}


def versions(name: str) -> list[str]:
    return sorted(str(mv.version) for mv in MlflowClient().search_model_versions(f"name='{name}'"))


# ---------------------------------------------------------------- the gate, pure
def test_gate_rules():
    gate = GateConfig(metric="exact_match", min={"exact_match": 0.1, "rougeL": 0.2},
                      max_regression={"exact_match": 0.05})
    ok = {"exact_match": 0.38, "rougeL": 0.3}
    assert reg.evaluate_gate(gate, ok, None)["decision"] == "promoted"
    # no CI: every drop counts
    assert reg.evaluate_gate(gate, ok, {"exact_match": 0.40}, "3")["passed"]          # drop 0.02 <= 0.05
    worse = reg.evaluate_gate(gate, ok, {"exact_match": 0.50}, "3")                    # drop 0.12 > 0.05
    assert not worse["passed"] and "champion v3" in worse["reasons"][0]
    low = reg.evaluate_gate(gate, {"exact_match": 0.9, "rougeL": 0.1}, None)
    assert low["decision"] == "rejected" and any("rougeL" in r for r in low["reasons"])
    # the gate metric is compared even when max_regression does not list it (allowed drop 0)
    strict = GateConfig(metric="exact_match", min={}, max_regression={})
    assert reg.evaluate_gate(strict, {"exact_match": 0.4}, {"exact_match": 0.4}, "1")["passed"]
    assert not reg.evaluate_gate(strict, {"exact_match": 0.39}, {"exact_match": 0.4}, "1")["passed"]
    # with the challenger's CI: the champion's value must lie above it for the drop to count
    wide = {"exact_match": 0.38, "exact_match_ci": [0.30, 0.46], "rougeL": 0.3}
    r = reg.evaluate_gate(gate, wide, {"exact_match": 0.45}, "3")                       # drop 0.07, inside the CI
    assert r["passed"] and not r["rules"][-1]["significant"] and "not significant" in r["rules"][-1]["detail"]
    r = reg.evaluate_gate(gate, wide, {"exact_match": 0.50}, "3")                       # 0.50 above the CI
    assert not r["passed"] and r["rules"][-1]["significant"] and r["rules"][-1]["method"].startswith("unpaired")
    # paired (evaluate scored both on the same items): the CI of the difference decides, not the wide CI
    paired = {"exact_match": {"diff": -0.07, "ci": [-0.10, -0.04], "significant": True}}
    r = reg.evaluate_gate(gate, wide, {"exact_match": 0.45}, "3", paired)
    rule = r["rules"][-1]
    assert not r["passed"] and r["paired"] and rule["method"] == "paired bootstrap"
    assert rule["drop_ci"] == pytest.approx([0.04, 0.10]) and rule["significant"]
    # significant but within the allowed drop: not worse
    assert reg.evaluate_gate(gate, wide, {"exact_match": 0.42}, "3",
                             {"exact_match": {"diff": -0.04, "ci": [-0.06, -0.02], "significant": True}})["passed"]
    # a big drop whose paired CI includes 0: not worse
    noisy = {"exact_match": {"diff": -0.07, "ci": [-0.15, 0.01], "significant": False}}
    assert reg.evaluate_gate(gate, wide, {"exact_match": 0.45}, "3", noisy)["passed"]
    md = reg.gate_markdown("m", "4", r, wide)
    assert "**Decision: rejected** (champion stays v3)" in md and "+0.0400, +0.1000" in md


def test_provenance_helpers(repo, tmp_path_factory, monkeypatch):
    tags = lineage.dvc_hashes(repo)
    assert tags == {"dvc.sft.components/sft.py": "0123abcd", "dvc.sft.models/sft": "feedbeef.dir",
                    "dvc.ingest.data/raw": RAW + ".dir", "dvc.preprocess.data/raw": RAW + ".dir",
                    "dvc.preprocess.data/processed": PROCESSED + ".dir"}
    assert lineage.lock_md5(repo, "data/processed") == PROCESSED + ".dir"
    assert lineage.lock_md5(repo, "./data/raw/") == RAW + ".dir" and lineage.lock_md5(repo, "data/x") is None
    state = lineage.git_state(repo)
    assert state == {"git_commit": git(repo, "rev-parse", "HEAD"), "git_dirty": "false"}
    (repo / "new.txt").write_text("x")
    assert lineage.git_state(repo)["git_dirty"] == "true"
    plain = tmp_path_factory.mktemp("nogit")
    assert lineage.git_state(plain) == {"git_commit": "unknown", "git_dirty": "unknown"}
    assert lineage.dvc_hashes(plain) == {}
    monkeypatch.delenv("PREFECT__FLOW_RUN_ID", raising=False)
    monkeypatch.delenv("PREFECT__RUNTIME__FLOW_RUN__ID", raising=False)
    assert lineage.flow_run_id({}) is None and lineage.flow_run_id({lineage.FLOW_RUN_TAG: ""}) is None
    monkeypatch.setenv("PREFECT__FLOW_RUN_ID", "env-id")
    assert lineage.flow_run_id({lineage.FLOW_RUN_TAG: "ctx-id"}) == "ctx-id" and lineage.flow_run_id({}) == "env-id"


def test_weights_hash_is_the_same_in_serving(sft_dir, tmp_path):
    from components.serving import weights_sha256
    assert lineage.weights_sha256(sft_dir) == weights_sha256(sft_dir)
    copy = tmp_path / "copy"
    shutil.copytree(sft_dir, copy)
    (copy / "tokenizer.json").write_text("{}")  # not part of the weights hash
    assert lineage.weights_sha256(copy) == lineage.weights_sha256(sft_dir)
    with open(copy / "model.safetensors", "r+b") as f:
        f.seek(-1, 2)
        f.write(b"\x01" if f.read(1) != b"\x01" else b"\x02")
    assert lineage.weights_sha256(copy) != lineage.weights_sha256(sft_dir)


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
    with mlflow.start_run(run_name="pipeline") as parent:
        with mlflow.start_run(run_name="register", nested=True) as run:
            res = reg.run(params, StageContext(run_id=run.info.run_id, parent_run_id=parent.info.run_id,
                                               progress=False, extra={lineage.FLOW_RUN_TAG: "flow-123"}))
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
    assert t[lineage.FLOW_RUN_TAG] == "flow-123"  # the flow's id (ctx.extra) wins over the environment
    assert t["sft_method"] == "full" and t["pretrain_enabled"] == "true" and t["model_format"] == "merged"
    assert float(t["model_size_mb"]) > 0
    assert run.info.run_id in mv.description and mv.run_id == run.info.run_id
    assert "# Gate report" in mv.description and "components.lineage models:/seedlm-first/1" in mv.description

    # the data as MLflow dataset inputs of the run, digests = the DVC hashes
    inputs = {d.dataset.name: d for d in client.get_run(run.info.run_id).inputs.dataset_inputs}
    assert {k: v.dataset.digest for k, v in inputs.items()} == {
        "seedlm-raw": RAW + ".dir", "seedlm-processed": PROCESSED + ".dir",
        "seedlm-tokenizer": t["data.tokenizer.sha256"][:32]}
    assert t["datasets"] == "raw,processed,tokenizer"

    out = repo / "reports" / "register"
    record = read_json(out / "registration.json")
    assert record["version"] == 1 and record["promoted"] and record["gate"]["decision"] == "promoted"
    assert set(record["aliases"]) == {"champion", "challenger"}
    assert "promoted" in (out / "gate.md").read_text() and (out / "seedlm.json").is_file()
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "register")}
    assert {"register/registration.json", "register/gate.md", "register/gate.json", "register/params.json",
            "register/params.yaml", "register/dvc.lock"} <= arts
    lock = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="register/dvc.lock")
    assert Path(lock).read_text() == (repo / "dvc.lock").read_text()
    restored = yaml.safe_load(Path(mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="register/params.yaml")).read_text())
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
    code = ("import json, mlflow; m = mlflow.pyfunc.load_model('models:/%s@champion'); "
            "print(json.dumps(m.predict(%r, params={'max_new_tokens': 3})))" % (name, PROMPTS[0]))
    proc = subprocess.run([sys.executable, "-c", code], cwd=store, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == model.predict(PROMPTS[0], params={"max_new_tokens": 3})


def test_worse_model_stays_challenger(store, sft_dir, repo, tmp_path):
    name = "seedlm-gate"
    cfg = RegisterConfig(model_name=name, gate=GateConfig(min={"exact_match": 0.05},
                                                          max_regression={"exact_match": 0.05}))
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
    paired = {"sources": {"champion": f"models:/{name}/3"}, "champion": {"exact_match": 0.36},
              "compare": {"sft_vs_champion": {"exact_match": {"diff": -0.08, "ci": [-0.12, -0.04],
                                                              "significant": True}}}}
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
    real = reg._registered_aliases

    def slow(client, model):  # read the champion, then dawdle before deciding
        out = real(client, model)
        time.sleep(1.0)
        return out
    monkeypatch.setattr(reg, "_registered_aliases", slow)
    one_load = threading.Lock()  # transformers' from_pretrained is not thread-safe (two pipelines = two processes)
    log_model = reg._log_model

    def serial_log_model(*a, **k):
        with one_load:
            return log_model(*a, **k)
    monkeypatch.setattr(reg, "_log_model", serial_log_model)
    results: dict[str, Any] = {}

    def one(tag: str, em: float) -> None:
        try:
            results[tag] = do_register(cfg, sft_dir, write_eval(tmp_path / f"{tag}.json", em, ci=0.01),
                                       tmp_path / tag, repo)[0]
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
def build_lora(root: Path) -> tuple[Path, Path]:
    """A base model folder and an sft folder like the sft stage's LoRA output (merged weights + adapter/)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base, sft = root / "pretrain", root / "sft"
    build_sft_folder(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True,
                                             task_type="CAUSAL_LM"))
    torch.manual_seed(1)
    with torch.no_grad():  # B starts at 0 (no change): make the adapter matter
        for n_, p in model.named_parameters():
            if "lora_B" in n_:
                p.normal_(0, 0.5)
    model.save_pretrained(sft / "adapter")
    merged = model.merge_and_unload()
    merged.save_pretrained(sft)
    for f in base.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name not in ("config.json", "seedlm.json"):
            shutil.copy2(f, sft / f.name)
    write_meta(sft, "sft", {"seed": 1, "sft": {"method": "lora"}}, {"base_pretrained": True},
               {"base": str(base)})
    return base, sft


def test_lora_adapter_only_merges_on_load(store, repo, tmp_path):
    base, sft = build_lora(tmp_path)
    eval_path = write_eval(tmp_path / "e.json", 0.5)
    assert mlflow.active_run() is None
    name = "seedlm-lora"
    merged = reg.register(RegisterConfig(model_name=name), sft, eval_path, tmp_path / "o1", repo_root=repo)
    assert mlflow.active_run() is None and merged["model_format"] == "merged"  # standalone: its own run
    assert MlflowClient().get_run(merged["run_id"]).info.status == "FINISHED"
    adapter = reg.register(RegisterConfig(model_name=name, lora_format="adapter"), sft, eval_path, tmp_path / "o2",
                           repo_root=repo)
    assert adapter["model_format"] == "adapter" and adapter["model_size_mb"] < merged["model_size_mb"]
    t = MlflowClient().get_model_version(name, "2").tags
    assert t["model_format"] == "adapter" and t["sft_method"] == "lora" and t["pretrain_enabled"] == "true"
    assert t["lora_base.sha256"] == lineage.weights_sha256(base) and t["lora_base.path"] == str(base.resolve())
    shipped = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/2", dst_path=str(tmp_path / "dl")))
    files = {p.name for p in shipped.rglob("*") if p.is_file()}
    assert "adapter_model.safetensors" in files and "model.safetensors" not in files
    merged_files = {p.name for p in Path(mlflow.artifacts.download_artifacts(
        f"models:/{name}/1", dst_path=str(tmp_path / "dl1"))).rglob("*") if p.is_file()}
    assert "model.safetensors" in merged_files and "adapter_model.safetensors" not in merged_files

    # merged on load: the same answers as the merged registration (and not the base's)
    prompts = PROMPTS + ["Tell me about zorbia."]
    want = mlflow.pyfunc.load_model(f"models:/{name}/1").predict(prompts, params={"max_new_tokens": 6})
    got = mlflow.pyfunc.load_model(f"models:/{name}/2").predict(prompts, params={"max_new_tokens": 6})
    assert got == want
    # evaluate resolves the adapter URI to a merged HF folder too
    folder = lineage.resolve_model(f"models:/{name}/2", tmp_path / "resolved")
    assert lineage.weights_sha256(folder) != lineage.weights_sha256(base) and (folder / "tokenizer.json").is_file()

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
        reg.register(RegisterConfig(model_name=name, lora_format="adapter"), sft, eval_path, tmp_path / "o3",
                     repo_root=repo)
    assert versions(name) == ["1", "2"]


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
    assert read_json(out / "registration.json") == first                    # out_dir untouched

    # fails right after create (writing the report): no version, and the next one registers fine
    monkeypatch.setattr(reg, "gate_markdown", lambda *a: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        do_register(cfg, sft_dir, write_eval(tmp_path / "e3.json", 0.6), out, repo)
    monkeypatch.undo()
    assert versions(name) == ["1"]
    res, _ = do_register(cfg, sft_dir, write_eval(tmp_path / "e4.json", 0.6), out, repo)
    assert res["promoted"] and versions(name) == ["1", "4"]    # deleted numbers (2, 3) are not reused


def test_rerun_in_a_killed_registrations_run_replaces_its_orphan(store, sft_dir, repo, tmp_path, monkeypatch):
    """SIGKILL leaves no chance to roll back: the version exists, the run stays RUNNING. The rerun resumes that
    run (register.resume_key) and deletes the orphan first: one registration, one version."""
    name = "seedlm-orphan"
    cfg = RegisterConfig(model_name=name)
    do_register(cfg, sft_dir, write_eval(tmp_path / "e1.json", 0.3), tmp_path / "out", repo)  # v1, champion
    killed = mlflow.start_run(run_name="register")
    def killed_here(*a):  # stands in for SIGKILL right after the version was created
        raise SystemExit(9)

    monkeypatch.setattr(reg, "gate_markdown", killed_here)
    monkeypatch.setattr(reg, "_rollback", lambda *a: None)  # a killed process rolls nothing back
    with pytest.raises(SystemExit):
        reg.register(cfg, sft_dir, write_eval(tmp_path / "e2.json", 0.6), tmp_path / "out", repo_root=repo,
                     ctx=StageContext(run_id=killed.info.run_id, progress=False))
    monkeypatch.undo()
    assert versions(name) == ["1", "2"]  # v2: the orphan, without aliases
    res = reg.register(cfg, sft_dir, write_eval(tmp_path / "e2.json", 0.6), tmp_path / "out", repo_root=repo,
                       ctx=StageContext(run_id=killed.info.run_id, progress=False))
    mlflow.end_run()
    assert versions(name) == ["1", "3"] and res["version"] == 3 and res["promoted"]
    assert aliases(name) == {"champion": "3", "challenger": "3"}


def test_failure_on_new_model_removes_registered_model(store, sft_dir, repo, tmp_path, monkeypatch):
    name = "seedlm-new-fail"
    monkeypatch.setattr(reg, "gate_markdown", lambda *a: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        do_register(RegisterConfig(model_name=name), sft_dir, write_eval(tmp_path / "e.json", 0.5),
                    tmp_path / "out", repo)
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
        do_register(cfg.model_copy(update={"lora_format": "adapter"}), lora, write_eval(tmp_path / "e.json", 0.5),
                    tmp_path / "out", repo)
    assert not MlflowClient().search_registered_models(f"name='{name}'")
    assert not (tmp_path / "out").exists()
