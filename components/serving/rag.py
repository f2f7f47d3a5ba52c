"""Grounded answers for `seedlm serve`, `seedlm chat --rag` and the registered pyfunc: the index's top-k chunks for
the user's last question go into that turn (retrieval/context.py: the rendering the SFT rows trained on), as many
as fit beside the room kept for the answer; the sources used come back with the answer.

Which index answers: the one given (`--index DIR`; the pyfunc's model_config `index_path`), else the one the
registered version carries (its artifact `index`: the index evaluate scored it with), else the pipeline's in the
working directory (params.yaml `paths.index`) when it has been built. Retrieval is on by default when there is one.

    messages, sources = ground(engine, index_dir, messages, params, top_k=None)
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from components.retrieval import find_index, rag_messages
from components.serving.engine import Engine, check_messages
from components.serving.sampling import ParamError, SamplingParams

MAX_TOP_K = 50
"""At most this many chunks retrieved per question (`rag: {"top_k": N}`)."""


def budget(engine: Engine, params: SamplingParams) -> int:
    """Prompt tokens the grounded turn may take: the context less the room chat_prompt keeps for the answer."""
    return engine.context - min(params.max_tokens, engine.context // 2)


def ground(
    engine: Engine, index_dir: str | Path, messages: Any, params: SamplingParams, top_k: int | None = None
) -> tuple[list[dict[str, str]], list[dict[str, Any]]]:
    """`messages` with the passages retrieved for its last (user) turn put into that turn, and the sources used
    ({"n": its [n] in the prompt, "id", "text", "source", "location", "hash", "score", "rank"}), best first."""
    msgs = check_messages(messages)
    if msgs[-1]["role"] != "user":
        raise ParamError("messages", "retrieval needs the last message to be the user's question (or rag: false)")
    return rag_messages(index_dir, msgs, engine.tokenizer, budget=budget(engine, params), k=top_k, lock=engine.lock)


def rag_option(value: Any, has_index: bool, param: str = "rag") -> tuple[bool, int | None]:
    """A request's `rag` field: null (on when there is an index), true/false, or {"top_k": N}; returns (use
    retrieval, top_k or None for the index's own). ParamError naming the field for anything else."""
    top_k = None
    if isinstance(value, dict):
        unknown = sorted(set(value) - {"top_k"})
        if unknown:
            raise ParamError(param, f"{param}: unknown field {unknown[0]!r}; rag takes true, false or {{'top_k': N}}")
        top_k = value.get("top_k")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= MAX_TOP_K):
            raise ParamError(f"{param}.top_k", f"{param}.top_k must be an integer from 1 to {MAX_TOP_K}, got {top_k!r}")
        value = True
    if value is None:
        return has_index, None
    if not isinstance(value, bool):
        raise ParamError(param, f"{param} must be true, false or {{'top_k': N}}, got {value!r}")
    if value and not has_index:
        raise ParamError(param, f"{param}: no retrieval index here; serve with --index DIR, or send rag: false")
    return value, top_k


def rag_arguments(p: argparse.ArgumentParser) -> None:
    """`--index DIR` and `--no-rag`, as `seedlm serve` and `seedlm chat` take them."""
    p.add_argument(
        "--index",
        default=None,
        help="retrieval index folder (default: the one the registered version carries, else the pipeline's "
        "index in this directory when built)",
    )
    p.add_argument("--no-rag", action="store_true", help="answer without retrieval")


def cli_index(args: argparse.Namespace) -> tuple[Path | None, Path | None]:
    """(the index `--index` names, the pipeline's index in the working directory when built): the first wins over
    the index a registered version carries, the second stands in when it carries none. --no-rag: neither."""
    if args.no_rag:
        return None, None
    return (Path(args.index), None) if args.index else (None, find_index())
