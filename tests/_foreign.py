"""Tiny "open model" checkpoints of four causal-LM families, built in the test (never downloaded; not a test module).

Each family has its own tokenizer class, vocabulary, special tokens and layout, as the real checkpoints do:

- llama: LlamaTokenizer (SentencePiece-style BPE with byte fallback), <unk> <s> </s> <pad>, Llama-2's [INST]
  chat template; grouped-query attention (4 query / 2 key-value heads), untied output layer.
- qwen2: Qwen2Tokenizer (byte-level BPE), <|endoftext|> <|im_start|> <|im_end|>, ChatML template; GQA, tied
  embeddings, a vocabulary padded past the tokenizer's.
- gpt_neox: GPTNeoXTokenizer (byte-level BPE), <|endoftext|> <|padding|>, no chat template; parallel residual,
  partial rotary, padded vocabulary.
- gpt2: GPT2Tokenizer (byte-level BPE), <|endoftext|> only (no pad), no chat template; Conv1D layers, learned
  positions.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

FAMILIES = ("llama", "qwen2", "gpt_neox", "gpt2")
WITH_TEMPLATE = ("llama", "qwen2")

LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
"""meta-llama/Llama-2-7b-chat-hf's template, verbatim."""

CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""Qwen/Qwen2-7B-Instruct's template, verbatim."""

CHATML_GENERATION_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""The same format with `{% generation %}` marks (as TRL ships for training)."""

END_OF_TURN = {"llama": "</s>", "qwen2": "<|im_end|>", "gpt_neox": "<|end|>", "gpt2": "<|end|>"}
"""The token each family's chat format ends an assistant turn with (seedlm's `<|end|>` for bases without one)."""


@functools.cache
def corpus() -> tuple[str, ...]:
    """Text to train the tokenizers on: the embedded world's documents and instructions (as a base model would
    have seen text of its domain)."""
    from components.core.data_config import SyntheticConfig
    from components.data import synthetic

    cfg = SyntheticConfig(entities=12, paraphrases=3)
    docs = [d["text"] for d in synthetic.pretrain_documents(cfg, 1)]
    chats = [m["content"] for r in synthetic.instruction_rows(cfg, 1) for m in r["messages"]]
    return tuple(docs + chats + ["Answer briefly and politely. You are a helpful assistant."] * 3)


def _bpe(pre: Any, specials: list[str], vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre
    alphabet = pre_tokenizers.ByteLevel.alphabet() if isinstance(pre, pre_tokenizers.ByteLevel) else []
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, min_frequency=1, initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(corpus(), trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return model["vocab"], merges


def make_tokenizer(family: str) -> Any:
    import transformers
    from tokenizers import pre_tokenizers

    if family == "llama":
        byte_tokens = [f"<0x{b:02X}>" for b in range(256)]  # SentencePiece's byte fallback, as Llama-2 has
        vocab, merges = _bpe(pre_tokenizers.Metaspace(), ["<unk>", "<s>", "</s>", *byte_tokens], 700)
        tok = transformers.LlamaTokenizer(vocab=vocab, merges=merges)
        tok.add_special_tokens({"pad_token": "<pad>"})
        tok.chat_template = LLAMA2_TEMPLATE
        return tok
    vocab, merges = _bpe(pre_tokenizers.ByteLevel(add_prefix_space=False), ["<|endoftext|>"], 400)
    if family == "qwen2":
        tok = transformers.Qwen2Tokenizer(vocab=vocab, merges=merges)
        tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
        tok.chat_template = CHATML_TEMPLATE
        return tok
    if family == "gpt_neox":
        return transformers.GPTNeoXTokenizer(vocab=vocab, merges=merges)
    return transformers.GPT2Tokenizer(vocab=vocab, merges=merges)


def make_config(family: str, tokenizer: Any, positions: int = 128, **over: Any) -> Any:
    """A tiny config of the family's layout (2 layers, width 32 unless `over` says otherwise)."""
    import transformers

    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    if family == "llama":
        kw = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
        kw |= dict(num_key_value_heads=2, max_position_embeddings=positions, tie_word_embeddings=False)
        return transformers.LlamaConfig(
            vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **ids, **kw | over
        )
    if family == "qwen2":
        kw = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
        kw |= dict(num_key_value_heads=2, max_position_embeddings=positions, tie_word_embeddings=True)
        return transformers.Qwen2Config(vocab_size=len(tokenizer) + 6, **ids, **kw | over)
    if family == "gpt_neox":
        kw = dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
        kw |= dict(max_position_embeddings=positions, rotary_pct=0.25, use_parallel_residual=True)
        return transformers.GPTNeoXConfig(vocab_size=len(tokenizer) + 3, tie_word_embeddings=False, **ids, **kw | over)
    kw = dict(n_embd=32, n_layer=2, n_head=4, n_positions=positions)
    return transformers.GPT2Config(vocab_size=len(tokenizer), **ids, **kw | over)


def make_checkpoint(family: str, folder: Path, *, seed: int = 0, positions: int = 128, **over: Any) -> Path:
    """A randomly initialized tiny checkpoint + its tokenizer, saved as `save_pretrained` does (safetensors)."""
    import torch
    from transformers import AutoModelForCausalLM

    tok = make_tokenizer(family)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(make_config(family, tok, positions, **over))
    folder = Path(folder)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def hub_cache(
    cache: Path, repo_id: str, checkpoint: Path, commit: str = "0123456789abcdef0123456789abcdef01234567"
) -> str:
    """Put `checkpoint` into a Hugging Face cache folder as `repo_id` at `commit` (the layout huggingface_hub
    writes: models--ORG--NAME/snapshots/<commit>/ and refs/main), as if it had been downloaded once."""
    import shutil

    repo = Path(cache) / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(checkpoint, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return commit
