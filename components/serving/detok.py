"""Streaming text of one generated row: token ids in, text deltas out, cut at stop strings.

A BPE token can end inside a multi-byte character (the decoded text then ends in U+FFFD), and a stop
string can arrive split over several tokens; both are held back until they resolve, so the deltas sent
always add up to the final text, which is stripped of surrounding whitespace like evaluate's answers.
Each step decodes only the newest tokens with one step of context before them (vLLM's incremental
detokenizer: prefix and read offsets), so the cost per token does not grow with the answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class TextStream:
    """The answer so far of one row. `push(token)` returns the text that is safe to send now."""

    tokenizer: Any
    stop: tuple[str, ...] = ()
    ids: list[int] = field(default_factory=list)
    text: str = ""
    """All decoded text so far (left-stripped; not yet cut at a stop string)."""
    sent: int = 0
    """Characters of `text` already returned."""
    stopped: bool = False
    """A stop string was found: the answer ends before it."""
    _raw: str = ""  # decoded text of ids[:_read]
    _prefix: int = 0  # start of the window decoded again for context
    _read: int = 0  # ids up to here are in _raw

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token: int) -> str:
        """Add one generated token; returns the new text that can be sent (maybe '')."""
        self.ids.append(token)
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        if after.endswith("\ufffd") or not after.startswith(before):
            return ""  # an incomplete character: wait for its remaining bytes
        self._raw += after[len(before) :]
        self._prefix, self._read = self._read, len(self.ids)
        self.text = self._raw.lstrip()
        return self._release()

    def _release(self) -> str:
        if (cut := self._find_stop()) is not None:
            self.text, self.stopped = self.text[:cut], True
            return ""
        end = len(self.text.rstrip())  # trailing whitespace may yet be the end of the answer
        end = min(end, len(self.text) - self._partial_stop())
        if end <= self.sent:
            return ""
        delta, self.sent = self.text[self.sent : end], end
        return delta

    def _find_stop(self) -> int | None:
        if not self.stop:
            return None
        start = max(0, self.sent - max(len(s) for s in self.stop))
        hits = [i for s in self.stop if (i := self.text.find(s, start)) >= 0]
        return min(hits) if hits else None

    def _partial_stop(self) -> int:
        """Length of the longest text suffix that begins a stop string (held back: it may become one)."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:k]):
                    best = k
                    break
        return best

    def finish(self) -> str:
        """The rest of the answer once generation ended; afterwards `final` is the whole answer."""
        if self._read < len(self.ids) and not self.stopped:  # held-back bytes: decode them as they are
            before = self._decode(self.ids[self._prefix : self._read])
            self._raw += self._decode(self.ids[self._prefix :])[len(before) :]
            self._read = len(self.ids)
            self.text = self._raw.lstrip()
        if not self.stopped and (cut := self._find_stop()) is not None:
            self.text, self.stopped = self.text[:cut], True
        end = len(self.text.rstrip())
        delta = self.text[self.sent : end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return delta

    @property
    def final(self) -> str:
        return self.text.strip()
