"""The chat format shared by preprocess, sft, evaluate and register.

Each message renders as `<|{role}|>\\n{content}<|end|>\\n`; the generation prompt is `<|assistant|>\\n`
and generation stops at `<|end|>`. The same format lives in the tokenizer as a Jinja `chat_template`,
so `tokenizer.apply_chat_template` and `encode_chat` produce identical token ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from components.data import templates

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


CONTEXT_HEADER = "Context:"
QUESTION_HEADER = "Question:"


def with_context(question: str, passages: Sequence[str]) -> str:
    """A user turn carrying context passages: the one rendering of passages, shared by SFT rows (a `context`
    field, Alpaca's `input`), evaluation, serving and chat (retrieved chunks). Without passages: the question.

        Context:
        [1] first passage
        [2] second passage

        Question: the question
    """
    passages = [p.strip() for p in passages if p and p.strip()]
    if not passages:
        return question
    numbered = "\n".join(f"[{i}] {p}" for i, p in enumerate(passages, 1))
    return f"{CONTEXT_HEADER}\n{numbered}\n\n{QUESTION_HEADER} {question}"


def attach_context(messages: Sequence[dict[str, Any]], context: Any) -> list[dict[str, Any]]:
    """`messages` with `context` (a passage or a list of passages, e.g. an SFT row's `context` field) rendered by
    `with_context` into the user turn that the last assistant turn answers. ValueError naming the problem."""
    out = [dict(m) for m in messages]
    if context is None or context == "" or context == []:
        return out
    passages = [context] if isinstance(context, str) else context
    if not isinstance(passages, list) or not all(isinstance(p, str) for p in passages):
        raise ValueError(f"context must be a string or a list of strings, got {type(context).__name__}")
    last = max((i for i, m in enumerate(out) if m.get("role") == "assistant"), default=len(out))
    users = [i for i in range(last) if out[i].get("role") == "user"]
    if not users:
        raise ValueError("context needs a user turn before the assistant's answer")
    out[users[-1]]["content"] = with_context(out[users[-1]]["content"], passages)
    return out


def ensure_chat_tokens(tokenizer: Any) -> int:
    """Make a (base checkpoint's) tokenizer chat-ready; returns how many tokens it added to the vocabulary.

    A tokenizer with its own chat template keeps it, unchanged: SFT renders with it and derives the label mask
    from it (components/data/templates.py). One without gets CHAT_TEMPLATE and only the tokens that format needs
    (the role tokens and `<|end|>`, and an eos when it has none), so the base's embeddings keep every row and
    gain only those (resize the model's embeddings by the count). Padding uses the eos when there is no pad.
    """
    if getattr(tokenizer, "chat_template", None):
        return 0
    before = len(tokenizer)
    special = set(tokenizer.all_special_tokens)
    needed = [t for t in SPECIAL_TOKENS if t != PAD_TOKEN and (t != EOS_TOKEN or tokenizer.eos_token is None)]
    missing = [t for t in needed if t not in special]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    if tokenizer.eos_token is None:
        tokenizer.eos_token = EOS_TOKEN
    tokenizer.chat_template = CHAT_TEMPLATE
    return len(tokenizer) - before


def stop_ids(tokenizer: Any) -> list[int]:
    """Token ids that end a generation: `<|end|>` (a base's own template: its end-of-turn tokens), then eos."""
    if getattr(tokenizer, "chat_template", None) not in (None, CHAT_TEMPLATE):
        return templates.stop_ids(tokenizer)
    ids = [tokenizer.convert_tokens_to_ids(END_TOKEN), tokenizer.eos_token_id]
    return list(dict.fromkeys(i for i in ids if i is not None))


def encode_chat(tokenizer: Any, messages: Sequence[dict[str, Any]]) -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation, and labels that train only the assistant's replies.

    The ids are exactly `apply_chat_template(messages, tokenize=True)`'s: the whole text is encoded
    once. Labels keep every token that overlaps an assistant message's content, plus the `<|end|>`
    after it; everything else (role tokens, the newlines of the format, system/user text) is
    IGNORE_INDEX. Special tokens split the text before BPE, so no token spans a message boundary.
    A base's own chat template: its rendering and the mask derived from it (components/data/templates.py).
    """
    if getattr(tokenizer, "chat_template", None) != CHAT_TEMPLATE:
        _check(messages)
        return templates.encode(tokenizer, messages)
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
