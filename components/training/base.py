"""The base checkpoint of `model.init_from`: where it is, what it is, and how its weights load.

`model.init_from` is a local folder (an HF checkpoint saved with `save_pretrained`, safetensors) or
`hf:ORG/NAME[@REVISION]`, a Hugging Face Hub model: downloaded into the HF cache when the network is allowed
(`HF_HUB_OFFLINE=0`), read from the cache offline, and otherwise refused with an error naming the setting.
The resolved commit goes into the stage's metadata and the registered version's lineage.

With `init_from` the checkpoint defines the architecture: the `model.*` architecture keys must be null or agree
with it (`check_model_keys` names each one that contradicts it). Loading for size: `model.dtype` chooses the
weights' dtype (`weight_dtype`), and `sft.quantization` loads them in 4 or 8 bits through bitsandbytes (CUDA
only; `quantization_config` says why not elsewhere).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from components.core.context import StageError

HF_PREFIX = "hf:"
HF_SPEC = re.compile(r"^hf:(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[\w./-]+))?$")
DOWNLOAD = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken"]
"""What a download fetches: config, weights (safetensors only: pickles are never fetched), tokenizer files."""
ARCH_KEYS = {
    "n_layer": "num_hidden_layers",
    "n_embd": "hidden_size",
    "n_head": "num_attention_heads",
    "n_kv_head": "num_key_value_heads",
}
"""model.* key -> the transformers config attribute it must match when model.init_from is set."""
KEY = "model.init_from"


@dataclass(frozen=True)
class Base:
    """A resolved `model.init_from`: the spec as written, the local folder, and the Hub commit (hf: only)."""

    spec: str
    path: Path
    revision: str | None = None

    @property
    def is_hub(self) -> bool:
        return self.spec.startswith(HF_PREFIX)


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in ("1", "true", "yes", "on")


def parse_hub(spec: str) -> tuple[str, str | None]:
    """`hf:ORG/NAME[@REVISION]` -> (repo id, revision or None); StageError on a malformed spec."""
    m = HF_SPEC.match(spec.strip())
    if not m:
        raise StageError(
            f"{KEY}: {spec!r} is not a Hub model; write hf:ORG/NAME or hf:ORG/NAME@REVISION "
            "(a branch, tag or commit), or a local folder"
        )
    return m["repo"], m["rev"]


def resolve(spec: str | None) -> Base | None:
    """The local folder of `model.init_from` (downloading an `hf:` model into the HF cache when allowed)."""
    if not spec:
        return None
    if not spec.startswith(HF_PREFIX):
        return Base(spec, Path(spec))
    repo, revision = parse_hub(spec)
    path = _snapshot(spec, repo, revision)
    return Base(spec, path, path.name)


def _snapshot(spec: str, repo: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    local_only = offline()
    try:
        folder = snapshot_download(
            repo,
            revision=revision,
            allow_patterns=DOWNLOAD,
            local_files_only=local_only,
            cache_dir=os.environ.get("HF_HUB_CACHE") or None,
        )
    except LocalEntryNotFoundError:
        if local_only:
            raise StageError(
                f"{KEY}: {spec} is not in the Hugging Face cache and downloads are off (HF_HUB_OFFLINE=1); "
                "run once with HF_HUB_OFFLINE=0 and network access to download it, or set model.init_from "
                "to a local checkpoint folder"
            ) from None
        raise StageError(
            f"{KEY}: {spec}: cannot reach the Hugging Face Hub to download it; check the network"
        ) from None
    except (GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise StageError(
            f"{KEY}: {spec}: {type(e).__name__} (the model or revision does not exist, or needs a token: "
            "log in with `hf auth login`)"
        ) from None
    except HfHubHTTPError as e:
        raise StageError(f"{KEY}: {spec}: download failed ({str(e).splitlines()[0]})") from None
    return Path(folder)


# ---------------------------------------------------------------- the checkpoint's architecture
def load_config(base: Base) -> Any:
    """The checkpoint's transformers config (StageError naming the setting when there is none)."""
    from transformers import AutoConfig

    if not (base.path / "config.json").is_file():
        raise StageError(
            f"{KEY}: {base.path}: not a model folder (no config.json); "
            "point it at a local HF checkpoint folder saved with save_pretrained"
        )
    try:
        return AutoConfig.from_pretrained(base.path, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise StageError(f"{KEY}: {base.path}: unreadable config.json ({e})") from None


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
def cuda_bf16() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def weight_dtype(setting: str, *, trains: bool) -> torch.dtype:
    """The dtype weights load in for `model.dtype`. auto: bf16 where the device runs it natively for weights that
    stay frozen (a LoRA base), fp32 for weights that train (fp32 master weights; `precision` autocasts to bf16)."""
    from components.training.model import cpu_has_fast_bf16

    if setting == "fp16":
        if not torch.cuda.is_available():
            raise StageError("model.dtype: fp16 needs a CUDA GPU (none found); use auto, bf16 or fp32")
        return torch.float16
    if setting == "bf16":
        return torch.bfloat16
    if setting == "fp32" or trains:
        return torch.float32
    native = cuda_bf16() if torch.cuda.is_available() else cpu_has_fast_bf16()
    return torch.bfloat16 if native else torch.float32


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
