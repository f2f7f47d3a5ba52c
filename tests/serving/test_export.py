"""`seedlm export MODEL DIR`: registered versions (merged, and a LoRA adapter-only one) written as plain HF folders
that transformers loads offline and that answer as the registered model does; DIR rules and bad MODELs."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
from _register_fixtures import build_lora, do_register, write_eval
from _serving_fixtures import QUESTIONS, ask, make_repo, register_version

from components.core.config import RegisterConfig
from components.serving import export as ex

NAME = "seedlm-export"
pytestmark = pytest.mark.usefixtures("one_thread")


def load_and_answer(folder: Path, question: str, max_new: int = 8) -> str:
    """Greedy answer of the folder loaded the way vLLM/TGI users' code would: Auto* classes, nothing else."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    lm = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    gen = GenerationConfig.from_pretrained(folder, local_files_only=True)  # stops at <|end|> on its own
    text = tok.apply_chat_template(ask(question), add_generation_prompt=True, tokenize=False)
    x = tok(text, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        out = lm.generate(**x, generation_config=gen, max_new_tokens=max_new, do_sample=False)
    return tok.decode(out[0, x["input_ids"].shape[1] :], skip_special_tokens=True).strip()


@pytest.fixture(scope="module")
def champion(store, chat_dir, tmp_path_factory) -> str:
    register_version(chat_dir, tmp_path_factory.mktemp("export-reg"), NAME, 0.4)
    return f"models:/{NAME}@champion"


def test_export_writes_a_plain_hf_folder_that_answers_like_the_registered_model(champion, tmp_path, capsys):
    out = tmp_path / "exported"
    assert ex.main([champion, str(out)]) == 0
    assert "vllm serve" in capsys.readouterr().out
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pkl")) or "adapter" in name for name in files)
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"]  # for tools reading the config
    record = json.loads((out / ex.RECORD).read_text())
    assert record["model"] == champion and record["resolved"] == f"models:/{NAME}/1"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    stops = json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    assert tok.convert_tokens_to_ids("<|end|>") in stops
    pyfunc = mlflow.pyfunc.load_model(champion)
    for q in QUESTIONS[:3]:
        assert load_and_answer(out, q) == pyfunc.predict([q], params={"max_tokens": 8})[0]


def test_an_adapter_only_version_is_exported_merged(store, tmp_path):
    base, sft = build_lora(tmp_path)
    repo = make_repo(tmp_path / "repo")
    cfg = RegisterConfig(model_name=f"{NAME}-lora", lora_format="adapter", max_new_tokens=4)
    res, _ = do_register(cfg, sft, write_eval(tmp_path / "e.json", 0.5), tmp_path / "o", repo)
    assert res["model_format"] == "adapter"
    out = tmp_path / "merged"
    assert ex.main([res["model_uri"], str(out)]) == 0
    assert not any("adapter" in p.name for p in out.iterdir())
    # the merged weights are the sft stage's merged model's: the same greedy answers
    assert load_and_answer(out, "What is the capital of Zorbia?") == load_and_answer(
        sft, "What is the capital of Zorbia?"
    )


def test_dir_rules_force_and_atomic_replace(chat_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert ex.main([str(chat_dir), str(out)]) == 2
    assert "not empty; pass --force" in capsys.readouterr().err and (out / "keep.txt").exists()

    def broken(*a, **k):
        raise OSError("disk on fire")

    monkeypatch.setattr(ex.deps, "save_model", broken)
    with pytest.raises(OSError, match="disk on fire"):
        ex.export(str(chat_dir), out, force=True)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]  # a failed export leaves DIR as it was
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # and no temp folder
    monkeypatch.undo()
    assert ex.main([str(chat_dir), str(out), "--force"]) == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    file_dir = tmp_path / "a-file"
    file_dir.write_text("x")
    assert ex.main([str(chat_dir), str(file_dir)]) == 2 and "is not a folder" in capsys.readouterr().err
    assert ex.main([str(chat_dir), str(chat_dir), "--force"]) == 2 and "is MODEL" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (f"models:/{NAME}-missing/1", f"models:/{NAME}-missing/1: not found"),
        (f"models:/{NAME}@nobody", f"models:/{NAME}@nobody: no version of"),
        ("models:/bad uri", "expected models:/NAME/VERSION or models:/NAME@ALIAS"),
        ("/no/such/folder", "MODEL /no/such/folder: no such folder"),
    ],
)
def test_a_bad_model_is_named_in_the_error(champion, tmp_path, capsys, model, message):
    assert ex.main([model, str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_a_folder_that_is_not_a_model(tmp_path, capsys):
    (tmp_path / "notes").mkdir()
    assert ex.main([str(tmp_path / "notes"), str(tmp_path / "out")]) == 2
    assert "is not a model folder (no config.json)" in capsys.readouterr().err


def test_an_mlflow_model_folder_exports_too(champion, chat_dir, tmp_path):
    local = mlflow.artifacts.download_artifacts(champion, dst_path=str(tmp_path / "dl"))
    assert ex.main([local, str(tmp_path / "out")]) == 0
    assert load_and_answer(tmp_path / "out", QUESTIONS[1]) == load_and_answer(chat_dir, QUESTIONS[1])
