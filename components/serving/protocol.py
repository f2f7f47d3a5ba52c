"""The OpenAI wire format of `seedlm serve`: request fields read and checked, response objects built.

Requests are plain JSON objects read field by field (so every error names its field); unknown fields
are ignored as OpenAI's own clients send optional ones (`user`, ...), except features seedlm does not
have, which are refused rather than silently dropped. Extra request field of a chat: `rag` (serving/rag.py).
Extra response fields: `trimmed_messages` (oldest messages dropped to fit the context) and whatever the
caller passes as `extra` (retrieval `sources`).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from components.serving.engine import Completion
from components.serving.sampling import ParamError, SamplingParams, sampling_params

MAX_N = 8
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "repetition_penalty", "seed", "stop")
UNSUPPORTED = (
    "logprobs",
    "top_logprobs",
    "tools",
    "functions",
    "tool_choice",
    "logit_bias",
    "echo",
    "best_of",
    "suffix",
    "presence_penalty",
    "frequency_penalty",
)
"""Accepted only when absent, null, false, 0 or empty."""
ROLE_ALIASES = {"developer": "system"}


class ApiError(Exception):
    """An error answered as OpenAI's error object with `status`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class ApiRequest:
    """A checked chat or completions request: prompts (messages lists or strings) and settings."""

    model: str | None
    params: SamplingParams
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    messages: list[dict[str, str]] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    rag: Any = None
    """The chat request's `rag` field as sent (serving/rag.py `rag_option` reads it against the served index)."""


def _flag(body: dict[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ParamError(name, f"{name} must be true or false, got {value!r}")
    return value


def _common(body: dict[str, Any], defaults: SamplingParams) -> dict[str, Any]:
    for name in UNSUPPORTED:
        if body.get(name) not in (None, False, 0, [], {}, ""):
            raise ParamError(
                name,
                f"{name} is not supported by seedlm serve"
                + ("; use repetition_penalty" if name.endswith("_penalty") else ""),
            )
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ParamError("model", f"model must be a string, got {model!r}")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    params = sampling_params(defaults, max_tokens=max_tokens, **{k: body.get(k) for k in SAMPLING_FIELDS})
    n = body.get("n", 1) if body.get("n") is not None else 1
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_N:
        raise ParamError("n", f"n must be an integer from 1 to {MAX_N}, got {n!r}")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ParamError("stream_options", "stream_options must be an object")
    return {
        "model": model or None,
        "params": params,
        "n": n,
        "stream": _flag(body, "stream"),
        "include_usage": _flag(options, "include_usage"),
    }


def _content(i: int, m: dict[str, Any]) -> str:
    """A message's text: a string, a list of text parts, or null (an assistant turn without text)."""
    content = m.get("content")
    if content is None and m.get("role") == "assistant":
        return ""
    if isinstance(content, list):
        if all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            return "".join(p["text"] for p in content)
        raise ParamError(f"messages[{i}].content", f"messages[{i}]: only text content parts are supported")
    if not isinstance(content, str):
        raise ParamError(f"messages[{i}].content", f"messages[{i}]: content must be a string or text parts")
    return content


def chat_request(body: dict[str, Any], defaults: SamplingParams) -> ApiRequest:
    """Read a /v1/chat/completions body (roles and sampling values are checked again by the engine)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ParamError("messages", "messages must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ParamError(f"messages[{i}]", f"messages[{i}] must be an object with role and content")
        role = ROLE_ALIASES.get(m.get("role"), m.get("role"))
        out.append({"role": role, "content": _content(i, m)})
    return ApiRequest(messages=out, rag=body.get("rag"), **_common(body, defaults))


def completion_request(body: dict[str, Any], defaults: SamplingParams) -> ApiRequest:
    """Read a /v1/completions body: `prompt` is a string or a list of strings (one choice set each)."""
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise ParamError(
            "prompt", "prompt must be a non-empty string or a list of them (token arrays are not supported)"
        )
    req = ApiRequest(prompts=prompts, **_common(body, defaults))
    if len(prompts) * req.n > MAX_N:
        raise ParamError("prompt", f"at most {MAX_N} answers per request (prompts x n), got {len(prompts) * req.n}")
    return req


# ---------------------------------------------------------------- responses
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(done: list[Completion]) -> dict[str, int]:
    prompt = sum(c.prompt_tokens for c in done)
    generated = sum(c.completion_tokens for c in done)
    return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}


def envelope(rid: str, kind: str, label: str, fingerprint: str, **fields: Any) -> dict[str, Any]:
    """The fields every response and chunk shares; `model` and `system_fingerprint` name the version."""
    return {
        "id": rid,
        "object": kind,
        "created": int(time.time()),
        "model": label,
        "system_fingerprint": fingerprint,
        **fields,
    }


def chat_response(
    rid: str, label: str, fingerprint: str, done: list[Completion], extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    choices = [
        {
            "index": i,
            "message": {"role": "assistant", "content": c.text},
            "finish_reason": c.finish_reason,
            "logprobs": None,
        }
        for i, c in enumerate(done)
    ]
    return envelope(
        rid,
        "chat.completion",
        label,
        fingerprint,
        choices=choices,
        usage=usage(done),
        trimmed_messages=done[0].trimmed,
        **(extra or {}),
    )


def text_response(rid: str, label: str, fingerprint: str, done: list[Completion]) -> dict[str, Any]:
    choices = [
        {"index": i, "text": c.text, "finish_reason": c.finish_reason, "logprobs": None} for i, c in enumerate(done)
    ]
    return envelope(rid, "text_completion", label, fingerprint, choices=choices, usage=usage(done))


def chat_chunk(
    rid: str, label: str, fingerprint: str, index: int, delta: dict[str, str], finish: str | None = None, **extra: Any
) -> dict[str, Any]:
    choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}
    return envelope(rid, "chat.completion.chunk", label, fingerprint, choices=[choice], **extra)


def text_chunk(
    rid: str, label: str, fingerprint: str, index: int, text: str, finish: str | None = None
) -> dict[str, Any]:
    choice = {"index": index, "text": text, "finish_reason": finish, "logprobs": None}
    return envelope(rid, "text_completion", label, fingerprint, choices=[choice])
