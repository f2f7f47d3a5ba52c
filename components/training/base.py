"""The base checkpoint of `model.init_from` (resolved by components/core/hub.py): what it is, how its weights load.

With `init_from` the checkpoint defines the architecture: the `model.*` architecture keys must be null or agree
with it (`check_model_keys` names each one that contradicts it). Loading for size: `model.dtype` chooses the
weights' dtype (`weight_dtype`), and `sft.quantization` loads them in 4 or 8 bits through bitsandbytes (CUDA
only; `quantization_config` says why not elsewhere).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from components.core.context import StageError

ARCH_KEYS = {
    "n_layer": "num_hidden_layers",
    "n_embd": "hidden_size",
    "n_head": "num_attention_heads",
    "n_kv_head": "num_key_value_heads",
}
"""model.* key -> the transformers config attribute it must match when model.init_from is set."""
KEY = "model.init_from"


# ---------------------------------------------------------------- the checkpoint's architecture
def load_config(path: Path, what: str = KEY) -> Any:
    """A checkpoint folder's transformers config (StageError naming the setting when there is none)."""
    from transformers import AutoConfig

    path = Path(path)
    if not (path / "config.json").is_file():
        raise StageError(
            f"{what}: {path}: not a model folder (no config.json); "
            "point it at a local HF checkpoint folder saved with save_pretrained"
        )
    try:
        return AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise StageError(f"{what}: {path}: unreadable config.json ({str(e).strip().splitlines()[0]})") from None


def checkpoint_value(config: Any, key: str) -> Any:
    """The checkpoint's value for a model.* architecture key (arch: its model_type)."""
    if key == "arch":
        return config.model_type
    value = getattr(config, ARCH_KEYS[key], None)
    if key == "n_kv_head" and value is None:
        value = getattr(config, "num_attention_heads", None)
    return value


def check_model_keys(cfg: Any, config: Any, spec: str) -> None:
    """StageError naming every model.* architecture key that contradicts the checkpoint (null keys: no check)."""
    wrong = []
    for key in ("arch", *ARCH_KEYS):
        want, have = getattr(cfg, key), checkpoint_value(config, key)
        if want is not None and have is not None and want != have:
            wrong.append(f"model.{key}: {want} (the checkpoint has {have})")
    if cfg.dropout:
        wrong.append(f"model.dropout: {cfg.dropout} (only models built from config take it)")
    if wrong:
        raise StageError(
            f"{KEY}: {spec} defines the architecture, and these settings contradict it: {'; '.join(wrong)}; "
            "set them to null (or to the checkpoint's values): with model.init_from only model.context_length "
            "and model.dtype apply"
        )


# ---------------------------------------------------------------- loading for size
def weight_dtype(setting: str, *, trains: bool, autocast: torch.dtype | None = None) -> torch.dtype:
    """The dtype weights load in for `model.dtype`. auto: weights that train in fp32 (master weights; `precision`
    autocasts the math); frozen ones (a LoRA base) in the dtype training computes in (`autocast`: bf16 where the
    device runs it natively), which costs nothing in precision and halves their memory."""
    if setting == "fp16":
        if not torch.cuda.is_available():
            raise StageError("model.dtype: fp16 needs a CUDA GPU (none found); use auto, bf16 or fp32")
        return torch.float16
    if setting == "bf16":
        return torch.bfloat16
    if setting == "fp32" or trains or autocast is None:
        return torch.float32
    return autocast


def quantization_config(bits: str | None, compute: torch.dtype) -> Any:
    """A BitsAndBytesConfig for `sft.quantization` (None: no quantization); StageError where it cannot run."""
    if bits is None:
        return None
    if not torch.cuda.is_available():
        raise StageError(
            f"sft.quantization: {bits} loads weights through bitsandbytes, which needs a CUDA GPU (none found); "
            "set sft.quantization: null here (LoRA on bf16 weights: model.dtype: auto or bf16)"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise StageError(
            f"sft.quantization: {bits} needs bitsandbytes; install it with "
            "`.venv/bin/pip install -c constraints.txt bitsandbytes==0.50.2` (or `pip install -e .[gpu]`)"
        ) from None
    from transformers import BitsAndBytesConfig

    if bits == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute if compute != torch.float32 else torch.bfloat16,
    )


def is_quantized(model: Any) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return bool(getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False))
