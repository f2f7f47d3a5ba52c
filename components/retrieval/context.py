"""Retrieved chunks into a prompt, within the model's context budget.

Passages go into the last user turn through `chat.with_context` (the one rendering SFT rows use too), best
first; a passage that would push the grounded turn past `budget` tokens is left out (a shorter one further
down may still fit). The budget counts the system messages and the last turn, rendered with the tokenizer's
chat template: older turns give way to the passages (the engine drops them when the whole conversation does
not fit). Special-token strings inside documents are dropped so a document cannot end a turn.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from components.data.chat import SPECIAL_TOKENS, prompt_text, render, with_context
from components.retrieval.search import Hit

_SPECIAL = re.compile("|".join(map(re.escape, SPECIAL_TOKENS)))


def prompt_tokens(tokenizer: Any, messages: Sequence[dict[str, str]]) -> int:
    """Tokens of the system messages and the last turn, rendered with the tokenizer's chat template (seedlm's
    when it has none) plus the generation prompt."""
    kept = [m for m in messages[:-1] if m.get("role") == "system"] + list(messages[-1:])
    text = prompt_text(tokenizer, kept) if getattr(tokenizer, "chat_template", None) else render(kept, True)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _with(messages: list[dict[str, str]], question: str, hits: Sequence[Hit]) -> list[dict[str, str]]:
    content = with_context(question, [_SPECIAL.sub("", h.text) for h in hits])
    return [*messages[:-1], {**messages[-1], "content": content}]


def augment(
    messages: Sequence[dict[str, str]], hits: Sequence[Hit], tokenizer: Any, budget: int
) -> tuple[list[dict[str, str]], list[Hit]]:
    """`messages` with the best passages of `hits` put into its last (user) turn, the rendered prompt within
    `budget` tokens; and the hits used (the sources to show with the answer)."""
    messages = [dict(m) for m in messages]
    if not messages or messages[-1].get("role") != "user":
        raise ValueError("the last message must be the user's question to retrieve for")
    question, used = messages[-1]["content"], []
    for hit in hits:
        if prompt_tokens(tokenizer, _with(messages, question, [*used, hit])) <= budget:
            used.append(hit)
    return _with(messages, question, used), used


def build_context(question: str, hits: Sequence[Hit], tokenizer: Any, budget: int) -> tuple[str, list[Hit]]:
    """The user turn for one question with as many passages as fit `budget` prompt tokens; and the hits used."""
    messages, used = augment([{"role": "user", "content": question}], hits, tokenizer, budget)
    return messages[-1]["content"], used


def sources(hits: Sequence[Hit]) -> list[dict[str, Any]]:
    """The hits as the JSON sources returned with an answer (number = the [n] of the passage in the prompt)."""
    return [{"n": i, **h.to_dict()} for i, h in enumerate(hits, 1)]
