"""Sampling settings of one request, checked field by field, and the next-token choice for a batch of rows.

Every row of a batch keeps its own settings and its own random generator (seeded from `seed`, else at
random), so a request's samples never depend on which other requests share its batch. The logits
processors are transformers' own (the same ones `model.generate` applies, in the same order); rows with
equal settings go through them together.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, Protocol

import torch
from transformers import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

MAX_STOP = 4
"""At most this many stop strings per request (as OpenAI's API)."""


class ParamError(ValueError):
    """A request value a user can fix; `param` names the field (the server answers 400 with it)."""

    def __init__(self, param: str | None, message: str, code: str = "invalid_value") -> None:
        super().__init__(message)
        self.param, self.code = param, code


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request. temperature 0 is greedy (the default: small models answer facts best
    greedily); top_k 0 and top_p 1 are off; repetition_penalty 1 is off (>1 discourages repeats)."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def key(self) -> tuple:
        """Rows with the same key go through the logits processors together."""
        return (self.temperature, self.top_p, self.top_k, self.repetition_penalty)


FIELDS = tuple(f.name for f in fields(SamplingParams))


def check_text(param: str, value: str) -> str:
    """`value` if it is encodable text (JSON can carry lone surrogates such as "\\ud800", which are not)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ParamError(param, f"{param}: not valid Unicode text ({e.reason} at character {e.start})") from None
    return value


def _number(name: str, value: Any, lo: float, hi: float, *, lo_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ParamError(name, f"{name} must be a number, got {value!r}")
    if value < lo or value > hi or (lo_open and value == lo):
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
        raise ParamError(name, f"{name} must be in {interval}, got {value!r}")
    return float(value)


def _integer(name: str, value: Any, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) and not (isinstance(value, float) and value.is_integer()):
        raise ParamError(name, f"{name} must be an integer, got {value!r}")
    if value < lo:
        raise ParamError(name, f"{name} must be >= {lo}, got {value!r}")
    return int(value)


def _stop(value: Any) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(s, str) and s for s in items):
        raise ParamError("stop", f"stop must be a non-empty string or a list of them, got {value!r}")
    if len(items) > MAX_STOP:
        raise ParamError("stop", f"stop takes at most {MAX_STOP} strings, got {len(items)}")
    return tuple(dict.fromkeys(check_text("stop", s) for s in items))


def sampling_params(base: SamplingParams | None = None, **values: Any) -> SamplingParams:
    """`base` (default: the defaults) with `values` applied; None leaves a field as it is. Each value is checked
    and a bad one raises ParamError naming the field and the allowed range."""
    out = {f: getattr(base or SamplingParams(), f) for f in FIELDS}
    for name, value in values.items():
        if name not in out:
            raise ParamError(name, f"unknown sampling setting {name!r}; known: {', '.join(FIELDS)}")
        if value is not None:
            out[name] = value
    if out["top_k"] == -1:  # vLLM's spelling of "off"
        out["top_k"] = 0
    return SamplingParams(
        max_tokens=_integer("max_tokens", out["max_tokens"], 1),
        temperature=_number("temperature", out["temperature"], 0, 2),
        top_p=_number("top_p", out["top_p"], 0, 1, lo_open=True),
        top_k=_integer("top_k", out["top_k"], 0),
        repetition_penalty=_number("repetition_penalty", out["repetition_penalty"], 0, 10, lo_open=True),
        seed=None if out["seed"] is None else _integer("seed", out["seed"], -(2**63)),
        stop=_stop(out["stop"]) if out["stop"] else (),
    )


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU generator of its own for one request: seeded, or from fresh entropy."""
    g = torch.Generator()
    g.manual_seed(secrets.randbits(63) if seed is None else seed % 2**63)
    return g


class SamplingRow(Protocol):
    params: SamplingParams
    generator: torch.Generator

    def history(self) -> list[int]: ...


def _processors(p: SamplingParams) -> LogitsProcessorList:
    """transformers' processors for `p`, in `generate`'s order."""
    out = LogitsProcessorList()
    if p.repetition_penalty != 1.0:
        out.append(RepetitionPenaltyLogitsProcessor(p.repetition_penalty))
    if not p.greedy:
        out.append(TemperatureLogitsWarper(p.temperature))
        if p.top_k > 0:
            out.append(TopKLogitsWarper(p.top_k))
        if p.top_p < 1.0:
            out.append(TopPLogitsWarper(p.top_p))
    return out


def _histories(rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Each row's prompt + generated ids, right-padded with its own last id (repeats change no penalty)."""
    seqs = [r.history() for r in rows]
    width = max(len(s) for s in seqs)
    return torch.tensor([s + [s[-1]] * (width - len(s)) for s in seqs], dtype=torch.long)


def choose(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> list[int]:
    """The next token of every row from its last-position logits [rows, vocab]."""
    if all(r.params.greedy and r.params.repetition_penalty == 1.0 for r in rows):
        return logits.argmax(-1).tolist()  # the common case: one op for the whole batch
    out = [0] * len(rows)
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(r.params.key(), []).append(i)
    for idx in groups.values():
        params = rows[idx[0]].params
        members = [rows[i] for i in idx]
        scores = _processors(params)(_histories(members).to(logits.device), logits[idx].float())
        if params.greedy:
            picked = scores.argmax(-1).tolist()
        else:
            probs = torch.softmax(scores, dim=-1).cpu()
            picked = [int(torch.multinomial(probs[j], 1, generator=r.generator)) for j, r in enumerate(members)]
        for i, token in zip(idx, picked, strict=True):
            out[i] = token
    return out
