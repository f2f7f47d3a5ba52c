# The registered pyfunc as of commit 4c88ca8 (components/registry/pyfunc.py), before chat: kept verbatim so that
# tests/serving/test_pyfunc_chat.py can register a version the way those commits did and load it with today's code.
"""The registered seedlm model: an MLflow pyfunc, logged as "models from code".

MLflow copies this file into the model artifact and executes it at load time, so it must stay
self-contained (imports only torch/transformers/pandas/mlflow, never `components.*`). The HF model
folder (safetensors + tokenizer with its chat template) is shipped as the artifact `hf_model`.

    model = mlflow.pyfunc.load_model("models:/seedlm@champion")
    model.predict(pd.DataFrame({"prompt": ["What is the capital of Zorbia?"]}),
                  params={"max_new_tokens": 16})          # -> ["..."]

LoRA runs registered with `register.lora_format: adapter` ship only the adapter (artifact
`hf_adapter`, with the tokenizer); the base model is referenced by path and content hash in the
model config (`base_path`, `base_sha256`) and merged on load. A base that is missing or whose
weights hash differs is refused; point to a restored copy with
`mlflow.pyfunc.load_model(uri, model_config={"base_path": "/path/to/base"})`.

Input: a DataFrame with a `prompt` column, a list of strings or one string. Each prompt becomes one
user message, rendered with the tokenizer's chat template plus the generation prompt. Output: one
response string per prompt (special tokens removed), generation stopping at `<|end|>`. Params:
max_new_tokens (capped so prompt + answer fit the context; long prompts keep their tail),
do_sample, temperature (used only when sampling; 0 means greedy). Runs on CUDA when available.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

ARTIFACT = "hf_model"
ADAPTER = "hf_adapter"
END_TOKEN = "<|end|>"
DEFAULT_PARAMS: dict[str, Any] = {"max_new_tokens": 32, "temperature": 1.0, "do_sample": False}
"""Predict-time params (also the signature's param schema; register overrides max_new_tokens)."""


def _prompts(model_input: Any) -> list[str]:
    """Accept a DataFrame (`prompt` column, else the only column), a list/Series of str, or a str."""
    if isinstance(model_input, str):
        return [model_input]
    if isinstance(model_input, pd.DataFrame):
        if "prompt" in model_input.columns:
            col = model_input["prompt"]
        elif len(model_input.columns) == 1:
            col = model_input.iloc[:, 0]
        else:
            raise ValueError(f"input needs a 'prompt' column; got columns {list(model_input.columns)}")
        return [str(x) for x in col.tolist()]
    if isinstance(model_input, dict) and "prompt" in model_input:
        value = model_input["prompt"]
        return [value] if isinstance(value, str) else [str(x) for x in value]
    if isinstance(model_input, (list, tuple, pd.Series)):
        return [str(x) for x in model_input]
    raise TypeError(
        f"unsupported input type {type(model_input).__name__}; pass a DataFrame with "
        "a 'prompt' column, a list of strings or a string"
    )


def weights_sha256(folder: str | Path) -> str:
    """Content hash of a model's *.safetensors + config.json (as components.registry.provenance.weights_sha256)."""
    root = Path(folder)
    h = hashlib.sha256()
    for p in sorted([*root.glob("*.safetensors"), root / "config.json"]):
        if p.is_file():
            f = hashlib.sha256()
            with open(p, "rb") as fh:
                while block := fh.read(1 << 20):
                    f.update(block)
            h.update(p.relative_to(root).as_posix().encode() + b"\0" + f.hexdigest().encode())
    return h.hexdigest()


def load_merged(adapter_dir: str, config: dict[str, Any]) -> Any:
    """The base model named in `config` (checked against its registered hash) with the LoRA adapter merged."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, want = config.get("base_path"), config.get("base_sha256")
    hint = config.get("base_hint") or "restore the base model folder"
    if not base or not Path(base).is_dir():
        raise FileNotFoundError(
            f"LoRA base model {base!r} not found; {hint}, or load with model_config={{'base_path': '/path/to/base'}}"
        )
    got = weights_sha256(base)
    if want and got != want:
        raise ValueError(
            f"{base}: weights hash {got[:16]}… is not the registered base {want[:16]}…: the base "
            f"changed since registration; {hint}"
        )
    model = AutoModelForCausalLM.from_pretrained(base, local_files_only=True, dtype=torch.float32)
    return PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()


class SeedLMChatModel(PythonModel):
    """Greedy (or sampled) chat generation with a local HF causal LM."""

    def load_context(self, context) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        config = dict(getattr(context, "model_config", None) or {})
        adapter = ADAPTER in context.artifacts
        path = context.artifacts[ADAPTER if adapter else ARTIFACT]
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if not self.tokenizer.chat_template:
            raise ValueError(f"{path}: tokenizer has no chat_template; re-run preprocess/sft")
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = (
            load_merged(path, config)
            if adapter
            else AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
        ).to(self.device)
        self.model.eval()
        self.defaults = {**DEFAULT_PARAMS, **{k: config[k] for k in DEFAULT_PARAMS if k in config}}
        self.batch_size = int(config.get("batch_size", 8))
        end_id = self.tokenizer.convert_tokens_to_ids(END_TOKEN)
        stops = [end_id] if isinstance(end_id, int) and end_id != self.tokenizer.unk_token_id else []
        if self.tokenizer.eos_token_id is not None:
            stops.append(self.tokenizer.eos_token_id)
        self.stop_ids = stops
        self.context_length = int(getattr(self.model.config, "max_position_embeddings", 0) or 1024)

    def _settings(self, params: dict[str, Any] | None) -> dict[str, Any]:
        merged = {**self.defaults, **{k: v for k, v in (params or {}).items() if v is not None}}
        max_new = int(merged["max_new_tokens"])
        if max_new < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new}")
        max_new = min(max_new, self.context_length - 1)  # prompt + new tokens must fit the positions
        temperature = float(merged["temperature"])
        gen = {
            "max_new_tokens": max_new,
            "eos_token_id": self.stop_ids,
            "pad_token_id": self.tokenizer.pad_token_id,
            "do_sample": bool(merged["do_sample"]) and temperature > 0,
        }  # temperature 0 = greedy
        if gen["do_sample"]:
            gen["temperature"] = temperature
        return gen

    # The hint is pd.DataFrame (what pyfunc passes after schema enforcement; direct calls may also pass
    # a list or str): MLflow infers no schema from it, so the logged signature with params stays.
    def predict(self, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> list[str]:
        import torch

        prompts = _prompts(model_input)
        gen = self._settings(params)
        budget = self.context_length - gen["max_new_tokens"]  # prompt tokens kept (its tail)
        out: list[str] = []
        for start in range(0, len(prompts), self.batch_size):
            texts = [
                self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False
                )
                for p in prompts[start : start + self.batch_size]
            ]
            ids = [self.tokenizer(t, add_special_tokens=False)["input_ids"][-budget:] for t in texts]
            batch = self.tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt").to(self.device)
            with torch.inference_mode():
                seqs = self.model.generate(**batch, **gen)
            new = seqs[:, batch["input_ids"].shape[1] :]
            out.extend(t.strip() for t in self.tokenizer.batch_decode(new, skip_special_tokens=True))
        return out


mlflow.models.set_model(SeedLMChatModel())
