"""LoRA and DoRA adapters through peft: which modules they adapt, the new token rows they train, QLoRA.

Targets (`sft.lora.target_modules`): a list of module names, `all-linear`, or null for the architecture's
default: seedlm's for gpt2 and llama (every linear layer of the blocks), peft's per-architecture table for any
other model type (qwen2: q_proj, v_proj; gpt_neox: query_key_value; ...). Tokens a base checkpoint had to gain
for seedlm's chat format (`<|user|>`, `<|end|>`, ...) start untrained: their embedding rows (and output rows,
when untied) train alongside the adapters through peft's trainable tokens, and every other row stays frozen.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from components.core.config import LoraConfig
from components.core.context import StageError

SEEDLM_TARGETS = {
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


def targets(model_type: str, setting: list[str] | str | None) -> list[str] | str:
    """The modules to adapt for `sft.lora.target_modules` on a `model_type` model."""
    if setting:
        return setting
    if model_type in SEEDLM_TARGETS:
        return SEEDLM_TARGETS[model_type]
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TARGETS

    if model_type in PEFT_TARGETS:
        return list(PEFT_TARGETS[model_type])
    raise StageError(
        f"sft.lora.target_modules: no default for model type {model_type!r}; set it to all-linear or list the "
        "module names to adapt"
    )


def is_adapter(name: str) -> bool:
    """A parameter name of peft's (LoRA/DoRA weights, trainable token rows), not of the base model."""
    return any(part.startswith(("lora_", "token_adapter")) for part in name.split("."))


def _module_name(model: Any, module: Any) -> str | None:
    return next((n.rsplit(".", 1)[-1] for n, m in model.named_modules() if m is module and n), None)


def token_rows(model: Any, new_tokens: Sequence[int]) -> dict[str, list[int]] | None:
    """peft's trainable_token_indices for `new_tokens`: the input embedding, and the output layer when untied."""
    if not new_tokens:
        return None
    rows = {_module_name(model, model.get_input_embeddings()): list(new_tokens)}
    out = model.get_output_embeddings()
    if out is not None and not getattr(model.config, "tie_word_embeddings", False):
        rows[_module_name(model, out)] = list(new_tokens)
    return {k: v for k, v in rows.items() if k}


def add_lora(model: Any, cfg: LoraConfig, seed: int, *, new_tokens: Sequence[int] = ()) -> Any:
    """Wrap `model` with seeded LoRA (or DoRA) adapters: only they, and the rows of `new_tokens`, train."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    kind = model.config.model_type
    conf = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets(kind, cfg.target_modules),
        fan_in_fan_out=kind == "gpt2",
        use_dora=cfg.dora,
        trainable_token_indices=token_rows(model, new_tokens),
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return get_peft_model(model, conf)
    except ValueError as e:
        raise StageError(
            f"sft.lora.target_modules: {e}; use module names of this {kind} model, or all-linear"
        ) from None


def prepare_quantized(model: Any, checkpointing: bool) -> Any:
    """peft's preparation of a 4/8-bit base for training (norms in fp32, input grads for checkpointing)."""
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=checkpointing, gradient_checkpointing_kwargs={"use_reentrant": False}
    )
