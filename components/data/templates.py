"""A base checkpoint's own chat template: SFT label masks, end-of-turn tokens and control tokens derived from it.

seedlm's format (components/data/chat.py) is exact by construction. A base model that ships a chat template
(Llama-2's `[INST]`, Qwen2's ChatML, ...) keeps it: SFT renders every conversation with the tokenizer's own
`apply_chat_template`, and the loss covers what the template writes for each assistant turn: the reply and
its end-of-turn marker (`<|im_end|>`, ` </s>`), never the role headers, the user or system text, or the
whitespace the template puts after a turn. Two ways to find those characters:

- the template marks them with `{% generation %}...{% endgeneration %}`: transformers reports them
  (`return_assistant_tokens_mask`);
- otherwise, by rendering prefixes: an assistant turn starts where the conversation before it, rendered with
  the generation prompt, ends; and ends where the conversation up to and including it ends (trailing
  whitespace left out). A template that renders an earlier turn differently once later turns follow cannot
  be split this way: `TemplateError` says so and how to fix it.

The token ids are always exactly `apply_chat_template(messages, tokenize=True)`'s.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

IGNORE_INDEX = -100
GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
PROBE = "Zq7 probe reply"
"""The assistant text of the conversation that `stop_ids` renders to find a template's end-of-turn marker."""


class TemplateError(ValueError):
    """A conversation or template that cannot be split into prompt and trained reply."""


def template(tokenizer: Any) -> str | None:
    """The tokenizer's chat template source (the default one when it has several), or None."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    try:
        return tokenizer.get_chat_template()
    except ValueError:
        return None


def has_generation_tags(tokenizer: Any) -> bool:
    source = template(tokenizer)
    return bool(source and GENERATION_TAG.search(source))


def render(tokenizer: Any, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False) -> str:
    """The template's text for `messages` (TemplateError naming the template's complaint, e.g. role order)."""
    try:
        return tokenizer.apply_chat_template(
            list(messages), add_generation_prompt=add_generation_prompt, tokenize=False
        )
    except Exception as e:  # noqa: BLE001 - jinja's TemplateError, raise_exception(), ...: one user-facing error
        raise TemplateError(f"the chat template refuses this conversation: {e}") from None


def assistant_spans(tokenizer: Any, messages: Sequence[dict[str, Any]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and, per assistant turn, the [start, end) characters the loss trains."""
    text = render(tokenizer, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        if i == 0:
            raise TemplateError("the conversation starts with an assistant turn: there is no prompt to answer")
        prompt = render(tokenizer, messages[:i], add_generation_prompt=True)
        upto = render(tokenizer, messages[: i + 1])
        if not (upto.startswith(prompt) and text.startswith(upto)):
            raise TemplateError(
                f"the chat template renders message {i} (an assistant reply) differently once later messages "
                "follow, so the reply cannot "
                "be found by rendering prefixes; mark the assistant text in the template with "
                "{% generation %}...{% endgeneration %}, or train single-turn rows"
            )
        spans.append((len(prompt), max(len(prompt), len(upto.rstrip()))))
    return text, spans


def _labels_from_spans(tokenizer: Any, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    if not getattr(tokenizer, "is_fast", False):
        raise TemplateError("label masks from a chat template need a fast (tokenizers) tokenizer")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, labels = list(enc["input_ids"]), [IGNORE_INDEX] * len(enc["input_ids"])
    k = 0
    for i, (start, stop) in enumerate(enc["offset_mapping"]):
        while k < len(spans) and spans[k][1] <= start:
            k += 1
        if k < len(spans) and stop > spans[k][0] and start < spans[k][1]:
            labels[i] = ids[i]
    return ids, labels


def _labels_from_tags(tokenizer: Any, messages: Sequence[dict[str, Any]]) -> tuple[list[int], list[int]]:
    try:
        out = tokenizer.apply_chat_template(
            list(messages), tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
    except Exception as e:  # noqa: BLE001 - as in render()
        raise TemplateError(f"the chat template refuses this conversation: {e}") from None
    ids = list(out["input_ids"])
    return ids, [t if keep else IGNORE_INDEX for t, keep in zip(ids, out["assistant_masks"])]


def encode(tokenizer: Any, messages: Sequence[dict[str, Any]]) -> tuple[list[int], list[int]]:
    """Token ids of the conversation in the tokenizer's own template, and labels that train only the replies
    (each assistant turn's text and end-of-turn marker); everything else is IGNORE_INDEX."""
    if template(tokenizer) is None:
        raise TemplateError("the tokenizer has no chat template; call chat.ensure_chat_tokens first")
    if has_generation_tags(tokenizer):
        return _labels_from_tags(tokenizer, messages)
    return _labels_from_spans(tokenizer, *assistant_spans(tokenizer, messages))


def special_ids(tokenizer: Any) -> set[int]:
    """Ids of the special tokens and of the added tokens marked special (`<|im_end|>`, `</s>`, ...)."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return set(tokenizer.all_special_ids) | {i for i, t in added.items() if getattr(t, "special", False)}


def control_tokens(tokenizer: Any) -> list[str]:
    """The strings of those tokens: text that would turn into control tokens inside a message."""
    return sorted({tokenizer.convert_ids_to_tokens(i) for i in special_ids(tokenizer)} - {None, ""}, key=len)


def stop_ids(tokenizer: Any) -> list[int]:
    """Token ids that end a reply in this template: the special tokens it writes right after an assistant's text
    (`<|im_end|>`, `</s>`, `<|end|>`), then the eos token."""
    ends: list[int] = []
    try:
        text, spans = assistant_spans(
            tokenizer, [{"role": "user", "content": "ping"}, {"role": "assistant", "content": PROBE}]
        )
    except TemplateError:
        spans = []
    if spans:
        start, end = spans[-1]
        tail = text[start:end]
        tail = tail[tail.find(PROBE) + len(PROBE) :] if PROBE in tail else ""
        specials = special_ids(tokenizer)
        ends = [i for i in tokenizer(tail, add_special_tokens=False)["input_ids"] if i in specials]
    ids = [*ends, tokenizer.eos_token_id]
    return list(dict.fromkeys(i for i in ids if i is not None))
