"""components.training.model: building, loading (safetensors only), saving, device/precision choice."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerFast

from components.core.config import ModelConfig
from components.core.context import StageError
from components.training.model import (
    build_model,
    cpu_has_fast_bf16,
    device_and_precision,
    llama_intermediate,
    load_model,
    save_model,
)

SPECIAL = ["<|endoftext|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
TEXT = [
    "the red fox lives in the north forest.",
    "the blue owl sleeps in the old tower.",
    "a green frog sings near the quiet lake.",
] * 20


def make_tokenizer(vocab: int = 300, texts: list[str] = TEXT) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=vocab,
            special_tokens=SPECIAL,
            min_frequency=1,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL[0],
        eos_token=SPECIAL[0],
        pad_token=SPECIAL[1],
        additional_special_tokens=SPECIAL[2:],
    )


TINY = dict(n_layer=2, n_embd=64, n_head=2, context_length=32)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return make_tokenizer()


def test_build_gpt2_shapes_params_ids_and_seed(tok):
    m = build_model(ModelConfig(arch="gpt2", **TINY), tok, seed=1)
    V, d, T = len(tok), 64, 32
    assert m.config.vocab_size == V and m.config.n_positions == T
    assert m.config.activation_function == "gelu" and m.config._attn_implementation == "sdpa"
    assert m.lm_head.weight is m.transformer.wte.weight  # tied
    # embeddings + 2 blocks (12 d^2 + 13 d) + final layer norm
    assert sum(p.numel() for p in m.parameters()) == V * d + T * d + 2 * (12 * d * d + 13 * d) + 2 * d
    ids = torch.randint(0, V, (3, 17))
    assert m(input_ids=ids).logits.shape == (3, 17, V)
    assert (m.config.eos_token_id, m.config.bos_token_id) == (tok.convert_tokens_to_ids("<|endoftext|>"),) * 2
    assert m.config.pad_token_id == tok.convert_tokens_to_ids("<|pad|>") != m.config.eos_token_id
    same = build_model(ModelConfig(arch="gpt2", **TINY), tok, seed=1)
    other = build_model(ModelConfig(arch="gpt2", **TINY), tok, seed=2)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), same.state_dict().values()))
    assert not torch.equal(m.transformer.h[0].attn.c_attn.weight, other.transformer.h[0].attn.c_attn.weight)


def test_build_llama_shapes_and_config(tok):
    m = build_model(ModelConfig(arch="llama", n_kv_head=1, **TINY), tok, seed=0)
    c = m.config
    assert c.model_type == "llama" and c.hidden_size == 64 and c.num_hidden_layers == 2
    assert c.num_attention_heads == 2 and c.num_key_value_heads == 1
    assert c.intermediate_size == llama_intermediate(64) == 192 and llama_intermediate(256) == 704
    assert c.max_position_embeddings == 32 and c.vocab_size == len(tok)
    assert m.lm_head.weight is m.model.embed_tokens.weight
    assert m.model.layers[0].self_attn.k_proj.weight.shape == (32, 64)  # one kv head of 32
    assert c.pad_token_id == tok.pad_token_id and c.eos_token_id == tok.eos_token_id
    assert m(input_ids=torch.randint(0, len(tok), (2, 9))).logits.shape == (2, 9, len(tok))


def test_load_model_refuses_bad_folders(tmp_path, tok):
    with pytest.raises(StageError, match=r"model\.init_from.*not a model folder"):
        load_model(tmp_path)
    m = build_model(ModelConfig(**TINY), tok, seed=0)
    pickled = tmp_path / "pickled"
    m.config.save_pretrained(pickled)
    torch.save(m.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(StageError, match=r"model\.init_from.*pickle weights.*safetensors"):
        load_model(pickled)
    good = tmp_path / "good"
    save_model(m, tok, good)
    with pytest.raises(StageError, match=r"model\.context_length: 64 exceeds .*\(32\)"):
        load_model(good, context_length=64)
    broken = tmp_path / "broken"
    save_model(m, tok, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(StageError, match=r"model\.init_from.*cannot load"):
        load_model(broken)
    big = make_tokenizer(vocab=400, texts=TEXT + ["zebras quickly jumped over lazy dwarves"] * 5)
    assert big.vocab_size > len(tok)
    with pytest.raises(StageError, match=r"paths\.pretrain.*smaller than the tokenizer"):
        load_model(good, what="paths.pretrain", tokenizer=big)


def test_load_model_resizes_for_added_tokens(tmp_path, tok):
    save_model(build_model(ModelConfig(**TINY), tok, seed=0), tok, tmp_path / "m")
    grown = make_tokenizer()
    grown.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})
    m = load_model(tmp_path / "m", tokenizer=grown, context_length=32)
    assert m.get_input_embeddings().weight.shape[0] == len(grown) == len(tok) + 1
    assert m.lm_head.weight is m.transformer.wte.weight


def test_save_load_round_trip(tmp_path, tok):
    for arch in ("gpt2", "llama"):
        m = build_model(ModelConfig(arch=arch, **TINY), tok, seed=3).eval()
        out = tmp_path / arch
        save_model(m, tok, out)
        files = {p.name for p in out.iterdir()}
        assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= files
        assert not any(f.endswith(".bin") for f in files)
        gen = GenerationConfig.from_pretrained(out)
        assert gen.eos_token_id == [tok.convert_tokens_to_ids("<|end|>"), tok.convert_tokens_to_ids("<|endoftext|>")]
        assert gen.pad_token_id == tok.pad_token_id and gen.max_new_tokens == 32
        back = load_model(out, tokenizer=PreTrainedTokenizerFast.from_pretrained(out), context_length=32).eval()
        ids = torch.randint(0, len(tok), (2, 12))
        with torch.no_grad():
            assert torch.equal(m(input_ids=ids).logits, back(input_ids=ids).logits)
        assert isinstance(AutoModelForCausalLM.from_pretrained(out, use_safetensors=True), type(m))


def test_device_and_precision():
    assert device_and_precision("fp32") == (torch.device("cpu"), None)
    assert device_and_precision("bf16") == (torch.device("cpu"), torch.bfloat16)
    assert device_and_precision("auto")[1] == (torch.bfloat16 if cpu_has_fast_bf16() else None)
    with pytest.raises(StageError, match=r"sft\.precision: fp16 needs a CUDA GPU"):
        device_and_precision("fp16", key="sft.precision")


def test_cpu_bf16_detection_matches_cpuinfo():
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if "avx512_bf16" in flags or "amx_bf16" in flags:
        assert cpu_has_fast_bf16()
    elif flags:
        assert not cpu_has_fast_bf16()


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # peft
def test_training_attention_picks_eager_for_cpu_bf16_and_restores(tok):
    from peft import LoraConfig, get_peft_model

    from components.training.model import training_attention

    cpu = torch.device("cpu")
    m = build_model(ModelConfig(**TINY), tok, seed=0)
    assert training_attention(m, cpu, None) is None and m.config._attn_implementation == "sdpa"
    before = training_attention(m, cpu, torch.bfloat16)
    assert before == "sdpa" and m.config._attn_implementation == "eager"
    ids = torch.randint(0, len(tok), (2, 16))
    with torch.no_grad():
        eager = m.eval()(input_ids=ids).logits
    training_attention(m, cpu, torch.bfloat16, restore=before)
    assert m.config._attn_implementation == "sdpa"
    with torch.no_grad():
        torch.testing.assert_close(m(input_ids=ids).logits, eager, atol=1e-5, rtol=1e-5)  # same function
    lora = get_peft_model(
        build_model(ModelConfig(**TINY), tok, seed=0),
        LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True, task_type="CAUSAL_LM"),
    )
    assert training_attention(lora, cpu, torch.bfloat16) == "sdpa"
    assert lora.get_base_model().config._attn_implementation == "eager"
    long = build_model(ModelConfig(**{**TINY, "context_length": 2048}), tok, seed=0)
    assert training_attention(long, cpu, torch.bfloat16) is None  # [B, H, T, T] scores would be too big
