"""Text cleaning for pretraining documents and instruction messages.

Most documents are ASCII: for them NFKC is the identity, the only whitespace left after removing control
characters is " ", and the rules reduce to str.replace and substring checks (C speed); the regular
expressions run only on text that needs them. Both paths give the same result (tests/test_clean.py).
"""

from __future__ import annotations

import re
import unicodedata

_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff\ufeff]")
_SPACES = re.compile(r"[^\S\n\t]+")
_TRAILING = re.compile(r"[ \t]+\n")
_BLANKS = re.compile(r"\n{3,}")


def _layout(text: str) -> str:
    if " \n" in text or "\t\n" in text:
        text = _TRAILING.sub("\n", text)
    if "\n\n\n" in text:
        text = _BLANKS.sub("\n\n", text)
    return text.strip()


def clean_text(text: str, normalization: str = "NFKC") -> str:
    """Unify line breaks, drop control characters (not \\n, \\t), normalize unicode, collapse
    runs of spaces and of blank lines, strip. Idempotent."""
    text = _CONTROL.sub("", "\n".join(text.splitlines()))
    if text.isascii():
        while "  " in text:
            text = text.replace("  ", " ")
        return _layout(text)
    if normalization != "none":
        text = unicodedata.normalize(normalization, text)
    return _layout(_SPACES.sub(" ", text))


def clean_text_regex(text: str, normalization: str = "NFKC") -> str:
    """The rules as regular expressions only (the reference the fast path is tested against)."""
    text = _CONTROL.sub("", "\n".join(text.splitlines()))
    if normalization != "none":
        text = unicodedata.normalize(normalization, text)
    text = _BLANKS.sub("\n\n", _TRAILING.sub("\n", _SPACES.sub(" ", text)))
    return text.strip()
