"""Retrieval over your documents: chunking, the LanceDB store, BM25 and dense search, prompt context.

The index stage (components/index.py) builds an index folder; this package queries it. The RAG hook that
evaluate, serving, chat and the registered pyfunc call:

    from components.retrieval import find_index, rag_messages
    index = find_index()                                   # the pipeline's index folder, or None
    messages, sources = rag_messages(index, messages, tokenizer, budget=context_length - max_new_tokens)

`messages` comes back with the top-k chunks put into its last user turn (chat.with_context, the rendering SFT
trained on), as many as fit `budget` prompt tokens; `sources` is what to show with the answer: one dict per
passage used, {"n" (its [n] in the prompt), "id", "text", "source", "location", "hash", "score", "rank"}.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from components.retrieval.context import augment, build_context, sources
from components.retrieval.search import Hit, Index, open_index, retrieve

__all__ = ["Hit", "Index", "augment", "build_context", "find_index", "open_index", "rag_messages", "retrieve"]
__all__ += ["sources"]


def rag_messages(
    index_dir: str | Path,
    messages: list[dict[str, str]],
    tokenizer: Any,
    *,
    budget: int,
    k: int | None = None,
    lock: Any = None,
) -> tuple[list[dict[str, str]], list[dict[str, Any]]]:
    """Retrieve for the last user turn, put the passages that fit `budget` prompt tokens into it; return the new
    messages and the sources used (best first). `k`: chunks retrieved (default: the index's `top_k`); `lock`:
    held while `tokenizer` measures the prompt (a tokenizer shared by threads)."""
    if not messages or messages[-1].get("role") != "user":
        raise ValueError("the last message must be the user's question to retrieve for")
    hits = retrieve(index_dir, messages[-1]["content"], k)
    with lock or contextlib.nullcontext():
        out, used = augment(messages, hits, tokenizer, budget)
    return out, sources(used)


def find_index(root: str | Path = ".") -> Path | None:
    """The pipeline's index folder under `root` (params.yaml `paths.index`) when it has been built, else None:
    retrieval is on by default exactly when an index exists."""
    from components.core.config import Paths, load_params
    from components.core.params import ConfigError

    root = Path(root)
    try:
        folder = Path(load_params(root / "params.yaml").paths.index)
    except ConfigError:  # no or bad params.yaml: the default place
        folder = Path(Paths().index)
    folder = folder if folder.is_absolute() else root / folder
    return folder if (folder / "seedlm.json").is_file() and (folder / "store").is_dir() else None
