"""Instruction data in the common chat forms, to one list of {role, content} messages.

- chat: {"messages": [{"role", "content"}, ...]}, any number of turns (OpenAI style; "function" is "tool",
  an assistant turn holding only `tool_calls` keeps them as its content, in JSON);
- ShareGPT: {"conversations": [{"from", "value"}, ...]} with from = human/user, gpt/assistant/model,
  system, and tool/function/observation/ipython for tool results, function_call for a call.

SFT trains on every assistant turn and only there (chat.encode_chat). Tool messages survive ingest as role
"tool"; preprocess keeps them only when the chat template renders that role (`template_renders`), and
otherwise drops the row and counts it (`dropped.tool_messages`), rather than rewriting what the tool said.
"""

from __future__ import annotations

import json
from typing import Any

from components.data.chat import ROLES

TOOL = "tool"
"""The role of a tool's (function's) result."""
ALIASES = {
    **{r: r for r in ROLES},
    "human": "user",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "model": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "function_call": "assistant",
    "tool": TOOL,
    "function": TOOL,
    "observation": TOOL,
    "ipython": TOOL,
}
"""Role names of the common formats -> ours."""


def from_sharegpt(turns: Any) -> list[dict[str, Any]]:
    """ShareGPT `conversations` -> chat messages (roles still to be checked by `normalize`)."""
    if not isinstance(turns, list) or not turns:
        raise ValueError("conversations must be a non-empty list of {from, value}")
    out = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or "from" not in t or "value" not in t:
            raise ValueError(f"conversations[{i}]: need {{from, value}}, got {str(t)[:80]!r}")
        out.append({"role": t["from"], "content": t["value"]})
    return out


def _content(m: dict[str, Any], role: str) -> Any:
    content = m.get("content")
    if role == "assistant" and not content and m.get("tool_calls"):
        return json.dumps(m["tool_calls"], ensure_ascii=False)
    return content


def normalize(msgs: Any) -> list[dict[str, str]]:
    """Checked {role, content} messages with our role names; ValueError naming the bad message."""
    if not isinstance(msgs, list) or not msgs:
        raise ValueError("messages must be a non-empty list of {role, content}")
    out = []
    for i, m in enumerate(msgs):
        raw = m.get("role") if isinstance(m, dict) else None
        role = ALIASES.get(raw.lower() if isinstance(raw, str) else raw)
        if role is None:
            raise ValueError(f"messages[{i}]: role {raw!r} is not one of {', '.join(ALIASES)}")
        content = _content(m, role)
        if not isinstance(content, str) or not content.strip():
            raise ValueError(f"messages[{i}]: content must be a non-empty string")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise ValueError("messages has no assistant turn to learn from")
    return out


def template_renders(template: str, role: str) -> bool:
    """Whether a Jinja chat template renders a message of `role` (and shows its content)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def fail(msg: str) -> None:
        raise ValueError(msg)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    probe = [{"role": "user", "content": "q"}, {"role": role, "content": "probe-7f3a"}]
    try:
        text = env.from_string(template).render(messages=probe, add_generation_prompt=False, raise_exception=fail)
    except Exception:  # noqa: BLE001 - any failure to render means: not supported
        return False
    return "probe-7f3a" in text
