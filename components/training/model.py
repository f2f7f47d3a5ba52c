"""Model construction, loading and saving (HF causal LMs, safetensors only), and device/precision choice."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
)

from components.core.config import ModelConfig
from components.core.context import StageError
from components.data.chat import stop_ids

EOT_TOKEN = "<|endoftext|>"


def _token_ids(tokenizer) -> dict[str, int | None]:
    eos = tokenizer.convert_tokens_to_ids(EOT_TOKEN)
    eos = eos if eos != tokenizer.unk_token_id and eos is not None else tokenizer.eos_token_id
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad}


def llama_intermediate(n_embd: int) -> int:
    """SwiGLU hidden size: 8/3 * n_embd rounded up to a multiple of 64."""
    return 64 * math.ceil(8 * n_embd / 3 / 64)


def model_config(cfg: ModelConfig, tokenizer) -> PretrainedConfig:
    """The transformers config of a model built from `cfg` (arch and shape keys) for `tokenizer`."""
    ids = _token_ids(tokenizer)
    common = dict(vocab_size=len(tokenizer), tie_word_embeddings=True, **ids)
    if cfg.arch == "gpt2":
        return GPT2Config(
            n_positions=cfg.context_length,
            n_embd=cfg.n_embd,
            n_layer=cfg.n_layer,
            n_head=cfg.n_head,
            activation_function="gelu",
            resid_pdrop=cfg.dropout,
            embd_pdrop=cfg.dropout,
            attn_pdrop=cfg.dropout,
            **common,
        )
    return LlamaConfig(
        hidden_size=cfg.n_embd,
        intermediate_size=llama_intermediate(cfg.n_embd),
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_kv_head or cfg.n_head,
        max_position_embeddings=cfg.context_length,
        attention_dropout=cfg.dropout,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        **common,
    )


def build_model(cfg: ModelConfig, tokenizer, seed: int) -> PreTrainedModel:
    """A freshly initialized model from config alone (never downloads); same seed -> same weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(
            model_config(cfg, tokenizer), attn_implementation="sdpa", dtype=torch.float32
        )
    return model


def max_positions(model: PreTrainedModel) -> int:
    conf = model.config
    return int(getattr(conf, "max_position_embeddings", None) or conf.n_positions)


def load_model(
    path: str | Path,
    *,
    what: str = "model.init_from",
    tokenizer=None,
    context_length: int | None = None,
    dtype: torch.dtype | str = torch.float32,
    quantization=None,
) -> PreTrainedModel:
    """Load a local HF checkpoint (safetensors only) in `dtype` ("auto": as stored), or quantized by a
    BitsAndBytesConfig (on the GPU); checks vocab and position limits. Tokens the tokenizer gained beyond the
    checkpoint's embeddings get new rows (initialized from the old rows' mean and covariance), the rest stay."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise StageError(
            f"{what}: {path}: not a model folder (no config.json); "
            "point it at a local HF checkpoint folder saved with save_pretrained"
        )
    if not any(path.glob("*.safetensors")):
        has_bin = any(path.glob("*.bin")) or any(path.glob("*.pt"))
        why = "has only pickle weights (.bin), which are refused" if has_bin else "has no *.safetensors weights"
        raise StageError(
            f"{what}: {path}: {why}; convert once with "
            "`AutoModelForCausalLM.from_pretrained(p).save_pretrained(p)` (writes safetensors)"
        )
    try:
        quantized = {"quantization_config": quantization, "device_map": {"": 0}} if quantization is not None else {}
        model = AutoModelForCausalLM.from_pretrained(
            path, local_files_only=True, use_safetensors=True, dtype=dtype, attn_implementation="sdpa", **quantized
        )
    except (OSError, ValueError, KeyError, SafetensorError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise StageError(
            f"{what}: {path}: cannot load as a causal LM ({first}); use a complete local HF causal-LM checkpoint folder"
        ) from None
    if tokenizer is not None:
        vocab = model.get_input_embeddings().weight.shape[0]
        if tokenizer.vocab_size > vocab:
            raise StageError(
                f"{what}: {path}: the model's vocabulary ({vocab}) is smaller than the tokenizer's "
                f"({tokenizer.vocab_size}): the tokenizer does not belong to this model; rerun "
                "preprocess with model.init_from set to this folder so it reuses its tokenizer"
            )
        if len(tokenizer) > vocab:  # special tokens added on top of the base tokenizer
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
        ids = _token_ids(tokenizer)
        model.config.pad_token_id = ids["pad_token_id"]
    if context_length is not None and context_length > max_positions(model):
        raise StageError(
            f"model.context_length: {context_length} exceeds the position limit "
            f"({max_positions(model)}) of {path}; lower model.context_length"
        )
    return model


def save_model(model: PreTrainedModel, tokenizer, out_dir: str | Path) -> None:
    """save_pretrained (safetensors) + tokenizer + a generation config that stops where a reply ends in the
    tokenizer's chat template (`<|end|>`, or a base's own end-of-turn token such as `<|im_end|>`) and at eos."""
    out_dir = Path(out_dir)
    ids = _token_ids(tokenizer)
    unk = tokenizer.unk_token_id if tokenizer.unk_token_id != ids["eos_token_id"] else None  # gpt2: unk is eos
    eos = list(dict.fromkeys(i for i in (*stop_ids(tokenizer), ids["eos_token_id"]) if i not in (None, unk)))
    model.generation_config = GenerationConfig(
        eos_token_id=eos, pad_token_id=ids["pad_token_id"], bos_token_id=ids["bos_token_id"], max_new_tokens=32
    )
    model.config.pad_token_id = ids["pad_token_id"]
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def device_and_precision(precision: str, *, key: str = "pretrain.precision") -> tuple[torch.device, torch.dtype | None]:
    """The device and the autocast dtype (None = plain fp32) for `precision` (auto|fp32|bf16|fp16)."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if precision == "fp32":
        return device, None
    if precision == "bf16":
        return device, torch.bfloat16
    if precision == "fp16":
        if not cuda:
            raise StageError(f"{key}: fp16 needs a CUDA GPU (none found); use auto, bf16 or fp32")
        return device, torch.float16
    if cuda:
        return device, torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return device, torch.bfloat16 if cpu_has_fast_bf16() else None


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast to `dtype` on `device` (None: plain fp32, no autocast)."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def cpu_has_fast_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls are native (about 2x fp32) rather than emulated."""
    try:
        if torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported():
            return True
    except AttributeError:
        pass
    return torch.backends.cpu.get_cpu_capability() in ("AVX512_BF16", "AMX")


def training_attention(
    model: PreTrainedModel, device: torch.device, dtype: torch.dtype | None, *, restore: str | None = None
) -> str | None:
    """Pick the faster attention kernel for training; returns the one to put back afterwards (None: unchanged).

    On CPU with bf16 autocast, eager attention (plain bf16 matmuls + softmax) beats SDPA, whose CPU
    flash-attention kernel gains nothing from bf16 and whose backward then takes a quarter of a small
    model's step (README, "Speed: make bench"). Kept to contexts up to 1024, where the [B, H, T, T] scores stay small.
    With `restore`, sets that implementation back (saved models keep SDPA)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if restore is not None:
        base.set_attn_implementation(restore)
        return None
    current = base.config._attn_implementation
    if device.type == "cpu" and dtype == torch.bfloat16 and current == "sdpa" and max_positions(base) <= 1024:
        base.set_attn_implementation("eager")
        return current
    return None
