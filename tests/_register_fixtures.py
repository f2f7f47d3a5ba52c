"""Builders shared by the test_register* files and test_lineage: a tiny sft model folder, evaluate.json files, a
git repo's dvc.lock, registry shorthands. conftest.py builds the fixtures (store, sft_dir, repo) from them."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402
from mlflow import MlflowClient  # noqa: E402

from components import register as reg  # noqa: E402
from components.core.context import StageContext  # noqa: E402
from components.core.io import write_json, write_meta  # noqa: E402

SPECIAL = ["<|endoftext|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
PROMPTS = ["What is the capital of Zorbia?", "Is Mipo a city?"]


def build_sft_folder(out: Path) -> None:
    """A tiny byte-level BPE tokenizer + GPT-2 saved like the sft stage does (specials never generated)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, min_frequency=1, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(["what is the capital of zorbia? the capital of zorbia is mipo."] * 20, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
        additional_special_tokens=SPECIAL[2:],
    )
    fast.chat_template = TEMPLATE
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=len(fast),
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
    )
    model = GPT2LMHeadModel(cfg)
    with torch.no_grad():  # tied head: zero rows give specials logit 0, so greedy text is never empty
        for t in SPECIAL:
            model.transformer.wte.weight[fast.convert_tokens_to_ids(t)] = 0
    end_id = fast.convert_tokens_to_ids("<|end|>")
    model.generation_config = GenerationConfig(eos_token_id=[end_id, fast.eos_token_id], pad_token_id=fast.pad_token_id)
    model.save_pretrained(out)
    fast.save_pretrained(out)
    write_meta(out, "sft", {"seed": 1, "sft": {"method": "full"}}, {"steps": 1}, {})


def build_lora(root: Path) -> tuple[Path, Path]:
    """A base model folder and an sft folder like the sft stage's LoRA output (merged weights + adapter/)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base, sft = root / "pretrain", root / "sft"
    build_sft_folder(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, task_type="CAUSAL_LM")
    )
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
    write_meta(sft, "sft", {"seed": 1, "sft": {"method": "lora"}}, {"base_pretrained": True}, {"base": str(base)})
    return base, sft


def write_eval(path: Path, em: float, ci: float | None = 0.1, **extra: Any) -> Path:
    """An evaluate.json: sft's exact match with a CI of +-ci (None: no CI); `extra` adds top-level sections."""
    sft = {"exact_match": em, "rougeL": 0.5, "bleu": 0.2}
    if ci is not None:
        sft["exact_match_ci"] = [max(0.0, em - ci), em + ci]
    write_json(path, {"sft": sft, "pretrain": {"val_ppl": 12.5, "response_ppl": 30.0}, "n_examples": 100, **extra})
    return path


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True, capture_output=True, text=True
    ).stdout.strip()


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


def do_register(cfg, sft_dir, metrics, out, repo, **kw):
    """As the runner does: an active run for the stage, then the component."""
    with mlflow.start_run(run_name="register") as run:
        res = reg.register(
            cfg, sft_dir, metrics, out, repo_root=repo, ctx=StageContext(run_id=run.info.run_id, progress=False, **kw)
        )
    return res, run.info.run_id


def aliases(name: str) -> dict[str, str]:
    return {k: str(v) for k, v in MlflowClient().get_registered_model(name).aliases.items()}


def versions(name: str) -> list[str]:
    return sorted(str(mv.version) for mv in MlflowClient().search_model_versions(f"name='{name}'"))
