"""register stage + serving pyfunc, against a real MLflow (sqlite in tmp) and a tiny GPT-2."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402
import pandas as pd  # noqa: E402
from mlflow import MlflowClient  # noqa: E402

from components import register as reg  # noqa: E402
from components.common import StageContext, StageError, read_json, write_json, write_meta  # noqa: E402
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


def write_eval(path: Path, em: float, **extra: float) -> Path:
    write_json(path, {"sft": {"exact_match": em, "exact_match_ci": [max(0.0, em - 0.1), em + 0.1],
                              "rougeL": 0.5, "bleu": 0.2, **extra},
                      "pretrain": {"val_ppl": 12.5, "response_ppl": 30.0}, "n_examples": 100})
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


@pytest.fixture
def repo(tmp_path) -> Path:
    """A git repo with a dvc.lock, standing in for the project root."""
    (tmp_path / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n  sft:\n    cmd: python -m components.sft\n    deps:\n"
        "    - path: components/sft.py\n      hash: md5\n      md5: 0123abcd\n      size: 10\n"
        "    outs:\n    - path: models/sft\n      hash: md5\n      md5: feedbeef.dir\n      size: 99\n"
        "      nfiles: 5\n  register:\n    cmd: python -m components.register\n    outs:\n"
        "    - path: reports/register\n      hash: md5\n      md5: 5ca1ab1e.dir\n", encoding="utf-8")
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
    assert reg.evaluate_gate(gate, ok, {"exact_match": 0.40}, "3")["passed"]          # drop 0.02 <= 0.05
    worse = reg.evaluate_gate(gate, ok, {"exact_match": 0.50}, "3")                    # drop 0.12 > 0.05
    assert not worse["passed"] and "champion v3" in worse["reasons"][0]
    low = reg.evaluate_gate(gate, {"exact_match": 0.9, "rougeL": 0.1}, None)
    assert low["decision"] == "rejected" and any("rougeL" in r for r in low["reasons"])
    # the gate metric is compared even when max_regression does not list it (allowed drop 0)
    strict = GateConfig(metric="exact_match", min={}, max_regression={})
    assert reg.evaluate_gate(strict, {"exact_match": 0.4}, {"exact_match": 0.4}, "1")["passed"]
    assert not reg.evaluate_gate(strict, {"exact_match": 0.39}, {"exact_match": 0.4}, "1")["passed"]


def test_provenance_helpers(repo, tmp_path_factory):
    tags = reg.dvc_hashes(repo)
    assert tags == {"dvc.sft.components/sft.py": "0123abcd", "dvc.sft.models/sft": "feedbeef.dir"}
    state = reg.git_state(repo)
    assert state == {"git_commit": git(repo, "rev-parse", "HEAD"), "git_dirty": "false"}
    (repo / "new.txt").write_text("x")
    assert reg.git_state(repo)["git_dirty"] == "true"
    plain = tmp_path_factory.mktemp("nogit")
    assert reg.git_state(plain) == {"git_commit": "unknown", "git_dirty": "unknown"}
    assert reg.dvc_hashes(plain) == {}


# ---------------------------------------------------------------- registry
def test_first_registration_is_champion_and_serves(store, sft_dir, repo, monkeypatch):
    """Through run(): paths from params, repo root = cwd, full params in the tags."""
    name = "seedlm-first"
    monkeypatch.chdir(repo)
    monkeypatch.setenv("PREFECT__FLOW_RUN_ID", "flow-123")
    shutil.copytree(sft_dir, repo / "models" / "sft")
    write_eval(repo / "metrics" / "evaluate.json", 0.4)
    params = parse_params({"register": {"model_name": name, "max_new_tokens": 5}})
    with mlflow.start_run(run_name="pipeline") as parent:
        with mlflow.start_run(run_name="register", nested=True) as run:
            res = reg.run(params, StageContext(run_id=run.info.run_id, parent_run_id=parent.info.run_id,
                                               progress=False))
    assert res["version"] == 1 and res["promoted"] and res["gate_passed"]
    assert res["model_uri"] == f"models:/{name}/1"
    client = MlflowClient()
    assert aliases(name) == {"champion": "1", "challenger": "1"}

    mv = client.get_model_version(name, "1")
    t = mv.tags
    assert t["git_commit"] == git(repo, "rev-parse", "HEAD") and t["git_dirty"] == "true"  # models/ untracked
    assert t["dvc.sft.models/sft"] == "feedbeef.dir" and t["dvc.sft.components/sft.py"] == "0123abcd"
    assert json.loads(t["params"]) == params.model_dump(mode="json")
    assert len(t["params_hash"]) == 16
    assert t["gate.decision"] == "promoted" and t["metric.exact_match"] == "0.4"
    assert json.loads(t["metric.exact_match_ci"]) == pytest.approx([0.3, 0.5])
    assert t["metric.pretrain.val_ppl"] == "12.5" and t["eval.n_examples"] == "100"
    assert t["mlflow_run_id"] == run.info.run_id and t["parent_run_id"] == parent.info.run_id
    assert t["prefect_flow_run_id"] == "flow-123"
    assert t["sft_method"] == "full" and t["pretrain_enabled"] == "true"
    assert float(t["model_size_mb"]) > 0
    assert run.info.run_id in mv.description and mv.run_id == run.info.run_id

    out = repo / "reports" / "register"
    record = read_json(out / "registration.json")
    assert record["version"] == 1 and record["promoted"] and record["gate"]["decision"] == "promoted"
    assert set(record["aliases"]) == {"champion", "challenger"}
    assert "promoted" in (out / "gate.md").read_text() and (out / "seedlm.json").is_file()
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "register")}
    assert {"register/registration.json", "register/gate.md", "register/params.json"} <= arts

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
    res, run2 = do_register(cfg, sft_dir, write_eval(tmp_path / "e2.json", 0.37), out, repo)
    assert res["promoted"] and res["previous_champion"] == 1
    client = MlflowClient()
    assert aliases(name) == {"champion": "2", "challenger": "2"}

    # a drop of 0.07 against champion v2 (0.37): rejected, champion stays
    res, _ = do_register(cfg, sft_dir, write_eval(tmp_path / "e3.json", 0.30), out, repo)
    assert res["version"] == 3 and not res["promoted"] and not res["gate_passed"]
    assert aliases(name) == {"champion": "2", "challenger": "3"}
    t = client.get_model_version(name, "3").tags
    assert t["gate.decision"] == "rejected" and "champion v2" in t["gate.reasons"]
    record = read_json(out / "registration.json")
    assert record["version"] == 3 and not record["promoted"] and record["champion_version"] == 2
    assert "rejected" in (out / "gate.md").read_text()

    # below the minimum (no champion regression issue with a laxer gate): rejected too
    lax = cfg.model_copy(update={"gate": GateConfig(min={"exact_match": 0.05}, max_regression={"exact_match": 1.0})})
    res, _ = do_register(lax, sft_dir, write_eval(tmp_path / "e4.json", 0.01), out, repo)
    assert not res["promoted"]
    assert aliases(name) == {"champion": "2", "challenger": "4"}
    assert "minimum" in client.get_model_version(name, "4").tags["gate.reasons"]
    assert mlflow.pyfunc.load_model(f"models:/{name}@champion").metadata.run_id == run2


def test_failure_after_create_leaves_no_version(store, sft_dir, repo, tmp_path, monkeypatch):
    name = "seedlm-rollback"
    cfg = RegisterConfig(model_name=name)
    out = tmp_path / "out"
    do_register(cfg, sft_dir, write_eval(tmp_path / "e1.json", 0.3), out, repo)
    first = read_json(out / "registration.json")
    client = MlflowClient()

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
    assert not MlflowClient().search_registered_models(f"name='{name}'")
    assert not (tmp_path / "out").exists()


def test_standalone_lora_merged_without_active_run(store, sft_dir, repo, tmp_path):
    """Outside the runner: opens its own run; lineage from the sft meta; LoRA adapter/ not shipped."""
    lora = tmp_path / "sft"
    shutil.copytree(sft_dir, lora)
    (lora / "adapter").mkdir()
    (lora / "adapter" / "adapter_config.json").write_text("{}")
    write_meta(lora, "sft", {"seed": 1, "sft": {"method": "lora"}}, {"pretrain_enabled": False}, {})
    assert mlflow.active_run() is None
    eval_path = write_eval(tmp_path / "e.json", 0.5)
    res = reg.register(RegisterConfig(model_name="seedlm-solo"), lora, eval_path, tmp_path / "out", repo_root=repo)
    assert mlflow.active_run() is None and res["version"] == 1
    t = MlflowClient().get_model_version("seedlm-solo", "1").tags
    assert t["sft_method"] == "lora" and t["pretrain_enabled"] == "false"
    assert json.loads(t["params"])["sft"] == {"method": "lora"} and "parent_run_id" not in t
    assert not any(k.startswith("dvc.register.") for k in t)         # its own lock entry is stale
    assert MlflowClient().get_run(res["run_id"]).info.status == "FINISHED"
    shipped = Path(mlflow.artifacts.download_artifacts("models:/seedlm-solo/1", dst_path=str(tmp_path / "dl")))
    (folder,) = (shipped / "artifacts").iterdir()           # the HF folder shipped as `hf_model`
    files = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert "model.safetensors" in files and "chat_template.jinja" in files
    assert not any(f.startswith("adapter") for f in files)

    adapter = RegisterConfig(model_name="seedlm-solo", lora_format="adapter")
    with pytest.raises(StageError, match="lora_format: adapter is not supported"):
        reg.register(adapter, lora, eval_path, tmp_path / "out", repo_root=repo)
    assert versions("seedlm-solo") == ["1"]

