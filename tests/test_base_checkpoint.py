"""model.init_from's checkpoint: model.* keys checked against it, load dtypes, LoRA/DoRA targets per architecture,
and the settings' validation."""

from __future__ import annotations

import pytest
import torch
from _foreign import FAMILIES, make_config, make_tokenizer

from components.core.config import LoraConfig, ModelConfig, parse_params
from components.core.context import StageError
from components.core.params import ConfigError
from components.training import base, lora

pytestmark = pytest.mark.usefixtures("one_thread")


def configs():
    return {f: make_config(f, make_tokenizer(f)) for f in FAMILIES}


def test_null_or_matching_model_keys_pass_and_contradictions_are_named():
    confs = configs()
    free = ModelConfig(init_from="x", arch=None, n_layer=None, n_embd=None, n_head=None)
    for conf in confs.values():
        base.check_model_keys(free, conf, "x")
    same = ModelConfig(init_from="x", arch="llama", n_layer=2, n_embd=32, n_head=4, n_kv_head=2)
    base.check_model_keys(same, confs["llama"], "x")
    with pytest.raises(StageError) as e:
        base.check_model_keys(ModelConfig(init_from="ck", dropout=0.1), confs["qwen2"], "ck")
    msg = str(e.value)
    for part in (
        "model.init_from: ck defines the architecture",
        "model.arch: gpt2 (the checkpoint has qwen2)",
        "model.n_layer: 4 (the checkpoint has 2)",
        "model.n_embd: 256 (the checkpoint has 32)",
        "model.dropout: 0.1",
        "set them to null",
    ):
        assert part in msg
    assert "n_head" not in msg  # 4 heads, as the default says


def test_settings_validation():
    with pytest.raises(ConfigError, match=r"arch, n_layer: null needs init_from"):
        parse_params({"model": {"arch": None, "n_layer": None}})
    with pytest.raises(ConfigError, match=r"quantization: 4bit .*set method: lora"):
        parse_params({"sft": {"quantization": "4bit"}})
    params = parse_params(
        {
            "model": {"init_from": "hf:org/name@v1", "arch": None, "n_kv_head": 3, "dtype": "bf16"},
            "sft": {"method": "lora", "quantization": "4bit", "lora": {"target_modules": "all-linear", "dora": True}},
        }
    )
    assert params.model.n_kv_head == 3 and params.sft.lora.target_modules == "all-linear"
    with pytest.raises(ConfigError, match="target_modules"):
        parse_params({"sft": {"lora": {"target_modules": "everything"}}})


def test_weight_dtype():
    assert base.weight_dtype("fp32", trains=False, autocast=torch.bfloat16) == torch.float32
    assert base.weight_dtype("bf16", trains=True) == torch.bfloat16
    assert base.weight_dtype("auto", trains=True, autocast=torch.bfloat16) == torch.float32  # fp32 master weights
    assert base.weight_dtype("auto", trains=False, autocast=torch.bfloat16) == torch.bfloat16  # as the math runs
    assert base.weight_dtype("auto", trains=False, autocast=None) == torch.float32
    if not torch.cuda.is_available():
        with pytest.raises(StageError, match="model.dtype: fp16 needs a CUDA GPU"):
            base.weight_dtype("fp16", trains=False)


def test_lora_targets_per_architecture():
    assert lora.targets("gpt2", None) == ["c_attn", "c_proj", "c_fc"]
    assert lora.targets("qwen2", None) == ["q_proj", "v_proj"]  # peft's table
    assert lora.targets("gpt_neox", None) == ["query_key_value"]
    assert lora.targets("anything", "all-linear") == "all-linear"
    with pytest.raises(StageError, match=r"no default for model type 'nova'.*all-linear"):
        lora.targets("nova", None)


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
@pytest.mark.parametrize("family", FAMILIES)
def test_lora_dora_and_new_token_rows_on_each_family(family):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(make_config(family, make_tokenizer(family)))
    vocab = model.get_input_embeddings().weight.shape[0]
    new = [vocab - 2, vocab - 1]
    wrapped = lora.add_lora(model, LoraConfig(r=2, target_modules="all-linear", dora=True), 0, new_tokens=new)
    names = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert any("lora_magnitude_vector" in n for n in names)  # DoRA
    rows = [n for n in names if "token_adapter" in n]
    tied = model.config.tie_word_embeddings
    assert len(rows) == (1 if tied else 2)  # the input rows, and the output rows when untied
    assert all(lora.is_adapter(n) for n in names)  # only peft's parameters train
    x = torch.randint(0, vocab, (2, 8))
    wrapped(input_ids=x).logits.float().mean().backward()
    assert all(p.grad is not None for n, p in wrapped.named_parameters() if p.requires_grad)


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("targets", [None, "all-linear"])
def test_the_memory_plan_counts_what_peft_trains(family, targets):
    """memory.count (meta device, no peft) agrees with the parameters peft really creates and trains."""
    from transformers import AutoModelForCausalLM

    from components.training import memory

    conf = make_config(family, make_tokenizer(family))
    adapters = LoraConfig(r=2, target_modules=targets, dora=targets is None)
    setup = memory.Setup("sft", "lora", 1, 1, 8, torch.float32, None, lora=adapters, new_tokens=2)
    planned = memory.count(conf, setup)
    model = AutoModelForCausalLM.from_config(conf)
    vocab = model.get_input_embeddings().weight.shape[0]
    n_base = sum(p.numel() for p in model.parameters())
    wrapped = lora.add_lora(model, adapters, 0, new_tokens=[vocab - 2, vocab - 1])
    trained = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    assert planned.trainable == trained
    full = memory.count(conf, memory.Setup("sft", "full", 1, 1, 8, torch.float32, None))
    assert full.trainable == full.n_params == n_base and planned.n_params == n_base + trained
