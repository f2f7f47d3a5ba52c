"""Credentials never reach a log, a tag or an artifact: redact URLs' user info, secret query
parameters and the values of secret-looking environment variables."""

from __future__ import annotations

import os
import re
from typing import Any

# ---------------------------------------------------------------- secrets
SECRET_ENV = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|API_?KEY|ACCESS_?KEY|PRIVATE_?KEY|CREDENTIAL|AUTH", re.I)
"""Environment variables whose values never reach tracked params, tags, artifacts or logs."""
REDACTED = "***"
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s'\"]+@")
_QUERY_SECRET = re.compile(
    r"(?P<key>[?&;][^=&#\s]*(?:token|secret|password|passwd|signature|sig|key|credential)"
    r"[^=&#\s]*=)[^&#\s'\"]+",
    re.I,
)


def _env_secrets() -> list[str]:
    values = {
        v
        for k, v in os.environ.items()
        if SECRET_ENV.search(k) and len(v) >= 8 and v.lower() not in ("true", "false") and not os.path.isabs(v)
    }
    return sorted(values, key=len, reverse=True)


def redact(value: Any) -> Any:
    """`value` (a str, or dicts/lists of them) without credentials: the user:password@ of URLs, secret-looking
    query parameters (token=, sig=, key= ...) and values of secret environment variables become `***`."""
    if isinstance(value, dict):
        return {k: redact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    if not isinstance(value, str):
        return value
    text = _USERINFO.sub(lambda m: m["scheme"] + REDACTED + "@", value)
    text = _QUERY_SECRET.sub(lambda m: m["key"] + REDACTED, text)
    for secret in _env_secrets():
        text = text.replace(secret, REDACTED)
    return text
