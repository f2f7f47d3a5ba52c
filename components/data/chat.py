"""The chat format shared by preprocess, sft, evaluate and register.

Each message renders as `<|{role}|>\\n{content}<|end|>\\n`; the generation prompt is `<|assistant|>\\n`
and generation stops at `<|end|>`. The same format lives in the tokenizer as a Jinja `chat_template`,
so `tokenizer.apply_chat_template` and `encode_chat` produce identical token ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

EOS_TOKEN = "<|endoftext|>"
"""Document separator in pretraining; bos and eos of trained tokenizers."""
PAD_TOKEN = "<|pad|>"
END_TOKEN = "<|end|>"
"""Closes every message; generation stops here."""
ROLES = ("system", "user", "assistant")
ROLE_TOKENS = {role: f"<|{role}|>" for role in ROLES}
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN, *ROLE_TOKENS.values(), END_TOKEN)
"""In this order they take ids 0..5 of a tokenizer trained by preprocess."""
IGNORE_INDEX = -100
"""Label of tokens the loss ignores."""

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown chat role: ' + message['role']) }}{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
"""Jinja source stored as `tokenizer.chat_template` (the `\\n` are Jinja string escapes)."""


def _check(messages: Sequence[dict[str, Any]]) -> None:
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"message {i}: need {{'role': one of {ROLES}, 'content': str}}, got {m!r}")


def render(messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False) -> str:
    """The text CHAT_TEMPLATE renders, built in Python (no Jinja)."""
    _check(messages)
    text = "".join(f"{ROLE_TOKENS[m['role']]}\n{m['content']}{END_TOKEN}\n" for m in messages)
    return text + (f"{ROLE_TOKENS['assistant']}\n" if add_generation_prompt else "")


def ensure_chat_tokens(tokenizer: Any) -> int:
    """Give a (base checkpoint's) tokenizer the chat special tokens, a pad token and CHAT_TEMPLATE.

    Returns how many tokens were added to the vocabulary (resize the model's embeddings by it).
    A different existing chat_template is replaced: SFT trains this format and evaluation renders
    prompts through the tokenizer, so the two must agree.
    """
    before = len(tokenizer)
    special = set(tokenizer.all_special_tokens)
    missing = [t for t in SPECIAL_TOKENS if t not in special and t != PAD_TOKEN]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    if tokenizer.eos_token is None:
        tokenizer.eos_token = EOS_TOKEN
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    if tokenizer.chat_template != CHAT_TEMPLATE:
        tokenizer.chat_template = CHAT_TEMPLATE
    return len(tokenizer) - before


def stop_ids(tokenizer: Any) -> list[int]:
    """Token ids that end a generation: `<|end|>`, then the eos token."""
    ids = [tokenizer.convert_tokens_to_ids(END_TOKEN), tokenizer.eos_token_id]
    return list(dict.fromkeys(i for i in ids if i is not None))


def encode_chat(tokenizer: Any, messages: Sequence[dict[str, Any]]) -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation, and labels that train only the assistant's replies.

    The ids are exactly `apply_chat_template(messages, tokenize=True)`'s: the whole text is encoded
    once. Labels keep every token that overlaps an assistant message's content, plus the `<|end|>`
    after it; everything else (role tokens, the newlines of the format, system/user text) is
    IGNORE_INDEX. Special tokens split the text before BPE, so no token spans a message boundary.
    """
    if getattr(tokenizer, "chat_template", None) != CHAT_TEMPLATE:
        raise ValueError("tokenizer.chat_template is not chat.CHAT_TEMPLATE; call ensure_chat_tokens first")
    text = render(messages)
    spans, pos = [], 0
    for m in messages:
        pos += len(ROLE_TOKENS[m["role"]]) + 1
        end = pos + len(m["content"])
        if m["role"] == "assistant":
            spans.append((pos, end + len(END_TOKEN)))
        pos = end + len(END_TOKEN) + 1
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    labels = [IGNORE_INDEX] * len(ids)
    k = 0
    for i, (start, stop) in enumerate(offsets):
        while k < len(spans) and spans[k][1] <= start:
            k += 1
        if k < len(spans) and stop > spans[k][0] and start < spans[k][1]:
            labels[i] = ids[i]
    return ids, labels


def prompt_text(tokenizer: Any, messages: Sequence[dict[str, Any]]) -> str:
    """The text a model completes: the conversation so far plus `<|assistant|>\\n`."""
    if not messages:  # transformers refuses an empty conversation; the template would render just this
        return render([], add_generation_prompt=True)
    return tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)


def chat_ids(tokenizer: Any, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False) -> list[int]:
    """`apply_chat_template(..., tokenize=True)` as a plain list of ids (transformers 5 returns a dict)."""
    out = tokenizer.apply_chat_template(list(messages), add_generation_prompt=add_generation_prompt, tokenize=True)
    if hasattr(out, "keys"):
        out = out["input_ids"]
    return list(out)
