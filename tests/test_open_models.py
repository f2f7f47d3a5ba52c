"""Start from an open model: four foreign checkpoint families through the whole pipeline.

For each family of tests/_foreign.py (Llama-2 style with GQA, Qwen2, GPT-NeoX, GPT-2; each with its own
tokenizer, special tokens and, for Llama and Qwen2, chat template), in a micro repo: preprocess with the base's
tokenizer, continued pretraining from the checkpoint, LoRA SFT, evaluate, register, then full SFT, evaluate,
register; the registered models answer through the pyfunc and the serving engine in the base's chat format.
Qwen2 comes from a Hugging Face cache as `hf:ORG/NAME` (offline, as after a download); Llama also runs the
control (`pretrain.enabled=false`: SFT straight from the base). Stages run in this process (the runner's main,
as `python -m components.<stage>` does)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from _foreign import END_OF_TURN, FAMILIES, WITH_TEMPLATE, hub_cache, make_checkpoint, make_tokenizer
from repos import make_repo

from components.data import chat

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
HUB_REPO = "seedlm-test/tiny-qwen2"
OPEN = {  # seconds per stage, most of them interpreter work
    "ingest.synthetic.entities": 6,
    "ingest.synthetic.paraphrases": 2,
    "model.arch": None,
    "model.n_layer": None,
    "model.n_embd": None,
    "model.n_head": None,
    "model.context_length": 128,
    "pretrain.max_steps": 8,
    "pretrain.warmup_steps": 1,
    "pretrain.eval_every": 8,
    "pretrain.checkpoint_every": 8,
    "pretrain.batch_size": 4,
    "pretrain.eval_batches": 2,
    "sft.max_steps": 10,
    "sft.warmup_steps": 1,
    "sft.eval_every": 10,
    "sft.checkpoint_every": 10,
    "sft.batch_size": 4,
    "sft.eval_batches": 2,
    "sft.method": "lora",
    "sft.lora.r": 4,
    "sft.lora.alpha": 8,
    "evaluate.bootstrap": 20,
    "evaluate.max_new_tokens": 4,
    "evaluate.max_examples": 6,
    "evaluate.ppl_batches": 2,
    "evaluate.batch_size": 8,
    "evaluate.num_samples": 2,
    "evaluate.champion": False,
    "register.gate.min": {"exact_match": 0.0},
    "register.max_new_tokens": 4,
}
ASK = [{"role": "user", "content": "Where does Gromke live?"}]


@contextlib.contextmanager
def in_repo(repo: Path, db: Path, env: dict[str, str]):
    old_cwd, old_env = os.getcwd(), {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", *env)}
    os.chdir(repo)
    os.environ.update({"MLFLOW_TRACKING_URI": f"sqlite:///{db}", **env})
    try:
        yield
    finally:
        os.chdir(old_cwd)
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def stage(run: dict, name: str, *overrides: str) -> tuple[int, str]:
    """`python -m components.<name> -S ...` in this process: (exit code, stderr)."""
    from components.core.runner import main

    args = [a for o in overrides for a in ("-S", o)]
    err = io.StringIO()
    with in_repo(run["repo"], run["db"], run["env"]), contextlib.redirect_stderr(err):
        rc = main(name, ["--no-progress", *args])
    return rc, err.getvalue()


def ok(run: dict, name: str, *overrides: str) -> None:
    rc, err = stage(run, name, *overrides)
    assert rc == 0, err[-3000:]


def meta(run: dict, folder: str) -> dict:
    return json.loads((run["repo"] / folder / "seedlm.json").read_text())


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    """One ingest for every family (the raw shards do not depend on the tokenizer)."""
    root = tmp_path_factory.mktemp("ingest")
    repo = make_repo(root / "repo", {**OPEN, "model.init_from": "unused-by-ingest"}, git=False)
    run = {"repo": repo, "db": root / "mlflow.db", "env": {}}
    ok(run, "ingest")
    return run["repo"] / "data" / "raw"


@pytest.fixture(scope="module", params=FAMILIES)
def pipeline(request, raw, tmp_path_factory):
    family = request.param
    root = tmp_path_factory.mktemp(family)
    base = make_checkpoint(family, root / "base")
    env: dict[str, str] = {}
    spec = str(base)
    if family == "qwen2":  # from the Hub, as cached by an earlier download
        env = {"HF_HUB_CACHE": str(root / "hf"), "HF_HUB_OFFLINE": "1"}
        commit = hub_cache(root / "hf", HUB_REPO, base)
        spec = f"hf:{HUB_REPO}"
        base = root / "hf" / f"models--{HUB_REPO.replace('/', '--')}" / "snapshots" / commit
    overrides = {**OPEN, "model.init_from": spec, "register.model_name": f"open-{family}"}
    repo = make_repo(root / "repo", overrides, git=False)
    shutil.copytree(raw, repo / "data" / "raw")
    run = {"family": family, "repo": repo, "db": root / "mlflow.db", "env": env, "base": base, "spec": spec}
    for name in ("preprocess", "index", "pretrain", "sft"):
        ok(run, name)
    run["sft_lora"] = meta(run, "models/sft")
    ok(run, "evaluate")
    ok(run, "register")
    ok(run, "sft", "sft.method=full")
    run["sft_full"] = meta(run, "models/sft")
    ok(run, "evaluate", "sft.method=full")
    ok(run, "register", "sft.method=full")
    return run


def registered(run: dict, version: int):
    import mlflow

    with in_repo(run["repo"], run["db"], run["env"]):
        mlflow.set_tracking_uri(f"sqlite:///{run['db']}")
        tags = mlflow.MlflowClient().get_model_version(f"open-{run['family']}", str(version)).tags
        return mlflow.pyfunc.load_model(f"models:/open-{run['family']}/{version}"), tags


def test_preprocess_uses_the_base_tokenizer_and_template(pipeline):
    from transformers import AutoTokenizer

    family = pipeline["family"]
    tok = AutoTokenizer.from_pretrained(pipeline["repo"] / "data/processed/tokenizer")
    base = make_tokenizer(family)
    assert type(tok).__name__ == type(base).__name__
    added = meta(pipeline, "data/processed")["result"]["report"]["tokenizer"]["tokens_added"]
    if family in WITH_TEMPLATE:
        assert added == 0 and tok.get_vocab() == base.get_vocab() and tok.chat_template == base.chat_template
    else:
        assert added == 4 and tok.chat_template == chat.CHAT_TEMPLATE
        assert {t: i for t, i in tok.get_vocab().items() if t in base.get_vocab()} == base.get_vocab()
    from datasets import load_from_disk

    row = load_from_disk(str(pipeline["repo"] / "data/processed/sft_train"))[0]
    msgs = json.loads(row["prompt"]) + [{"role": "assistant", "content": row["reference"]}]
    assert row["input_ids"] == chat.chat_ids(tok, msgs)  # rendered by the base's own template
    kept = [i for i, lab in zip(row["input_ids"], row["labels"]) if lab != -100]
    gap = " " if family == "llama" else ""  # Llama-2 writes ' ' + reply + ' ' + eos
    assert tok.decode(kept).strip() == row["reference"] + gap + END_OF_TURN[family]  # the reply and its end only


def test_continued_pretraining_starts_from_the_checkpoint(pipeline):
    from transformers import AutoModelForCausalLM

    pre = meta(pipeline, "models/pretrain")
    res, inputs = pre["result"], pre["inputs"]
    assert res["enabled"] and res["init_from"] == pipeline["spec"] and res["steps"] == 8
    assert res["arch"] == pipeline["family"] and res["val_loss"] > 0 and res["memory_plan_gb"] > 0
    assert Path(inputs["init_from_path"]) == pipeline["base"].resolve()
    trained = AutoModelForCausalLM.from_pretrained(pipeline["repo"] / "models/pretrain")
    assert trained.config.model_type == pipeline["family"]
    if pipeline["family"] == "qwen2":
        assert inputs["init_from_revision"] == pipeline["base"].name  # the cached commit


def test_lora_and_full_fine_tuning(pipeline):
    lora, full = pipeline["sft_lora"]["result"], pipeline["sft_full"]["result"]
    assert lora["method"] == "lora" and 0 < lora["trainable_params"] < lora["n_params"] / 4
    assert lora["new_tokens_trained"] == (0 if pipeline["family"] in WITH_TEMPLATE else 4)
    assert full["method"] == "full" and full["trainable_params"] == full["n_params"]
    assert (pipeline["repo"] / "models/sft/seedlm.json").is_file()
    ev = json.loads((pipeline["repo"] / "metrics/evaluate.json").read_text())
    assert ev["sft"]["response_ppl"] > 1 and ev["n_examples"] > 0


@pytest.mark.parametrize("version", [1, 2], ids=["lora", "full"])
def test_registered_model_answers_in_the_base_chat_format(pipeline, version):
    from components.registry.provenance import weights_sha256

    family = pipeline["family"]
    model, tags = registered(pipeline, version)
    assert tags["sft_method"] == ("lora" if version == 1 else "full")
    assert tags["base_checkpoint.source"] == pipeline["spec"]
    assert tags["base_checkpoint.sha256"] == weights_sha256(pipeline["base"])
    if family == "qwen2":
        assert tags["base_checkpoint.revision"] == pipeline["base"].name
    py = model.unwrap_python_model()
    base = make_tokenizer(family)
    chat.ensure_chat_tokens(base)
    assert py.tokenizer.chat_template == base.chat_template  # the template it was trained with, carried along
    prompt = py.engine_mod.chat_prompt(py.engine, ASK, py.sampling.sampling_params(max_tokens=4))
    assert prompt.ids == chat.chat_ids(base, ASK, add_generation_prompt=True)  # rendered in the base's format
    stops = py.tokenizer.convert_ids_to_tokens(py.stop_ids)
    assert END_OF_TURN[family] in stops  # and answers end where the base's replies end
    gen = json.loads((pipeline["repo"] / "models/sft/generation_config.json").read_text())
    assert base.convert_tokens_to_ids(END_OF_TURN[family]) in gen["eos_token_id"]
    answer = model.predict({"messages": ASK, "max_tokens": 4})
    choice = answer["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] in ("stop", "length")
    assert not any(t in choice["message"]["content"] for t in (END_OF_TURN[family], "<|im_start|>", "[INST]"))


def test_model_keys_that_contradict_the_checkpoint_are_named(pipeline):
    rc, err = stage(pipeline, "pretrain", "model.n_layer=7", "model.arch=llama")
    line = next(x for x in err.splitlines() if x.startswith("seedlm pretrain: error: "))
    assert rc == 2 and "model.n_layer: 7 (the checkpoint has 2)" in line and "set them to null" in line
    assert ("model.arch: llama" in line) == (pipeline["family"] != "llama")


@pytest.mark.parametrize("pipeline", ["gpt2"], indirect=True)  # one family is enough
def test_a_run_that_cannot_fit_stops_before_loading_weights(pipeline, caplog, monkeypatch):
    import components.sft

    monkeypatch.setattr(components.sft, "load_base", lambda *a, **k: pytest.fail("loaded weights"))
    with caplog.at_level("INFO", logger="seedlm.train"):
        rc, err = stage(pipeline, "sft", "sft.method=full", "sft.memory_gb=0.0001")
    line = next(x for x in err.splitlines() if x.startswith("seedlm sft: error: "))
    assert rc == 2 and "sft: this run needs about" in line and "sft.memory_gb" in line
    assert "memory plan (sft: full" in caplog.text and "DOES NOT FIT" in caplog.text
    rc, err = stage(pipeline, "sft", "sft.method=lora", "sft.quantization=4bit")
    assert rc == 2 and "sft.quantization: 4bit" in err and "needs a CUDA GPU" in err


@pytest.mark.parametrize("pipeline", ["llama"], indirect=True)
def test_control_is_sft_straight_from_the_base(pipeline):
    """pretrain.enabled=false with init_from: the base unchanged, SFT from it, and the report says so."""
    from components.registry.provenance import weights_sha256

    ok(pipeline, "pretrain", "pretrain.enabled=false")
    pre = meta(pipeline, "models/pretrain")["result"]
    assert pre["enabled"] is False and pre["init_from"] == pipeline["spec"]
    assert weights_sha256(pipeline["repo"] / "models/pretrain") == weights_sha256(pipeline["base"])  # untouched
    ok(pipeline, "sft", "pretrain.enabled=false")
    ok(pipeline, "evaluate", "pretrain.enabled=false")
    report = (pipeline["repo"] / "reports/evaluate/control.md").read_text()
    assert "what continued pretraining buys" in report and "SFT straight from the base" in report
    assert "| continued pretraining | SFT straight from the base |" in report  # both settings, side by side


def test_hub_models_offline_without_a_cached_copy_and_without_network(tmp_path):
    from components.core.context import StageError
    from components.core.hub import resolve

    env = {"HF_HUB_CACHE": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1"}
    with in_repo(tmp_path, tmp_path / "db", env), pytest.raises(StageError) as e:
        resolve("hf:seedlm-test/absent@v1")
    assert "model.init_from: hf:seedlm-test/absent@v1 is not in the Hugging Face cache" in str(e.value)
    assert "HF_HUB_OFFLINE=0" in str(e.value)
    code = "from components.core.hub import resolve; resolve('hf:seedlm-test/absent')"
    online = {**os.environ, **env, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}  # nothing listens
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=online, capture_output=True, text=True, timeout=120
    )
    assert res.returncode != 0 and "cannot reach the Hugging Face Hub" in res.stderr
