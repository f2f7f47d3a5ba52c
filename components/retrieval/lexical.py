"""BM25 over the chunks with `bm25s` (sparse, precomputed scores): English stopwords out, Snowball stems."""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

FOLDER = "bm25"
"""Sub-folder of an index holding the bm25s files."""


@functools.cache
def _stemmer() -> Any:
    import Stemmer

    return Stemmer.Stemmer("english")


def _quiet() -> None:
    logging.getLogger("bm25s").setLevel(logging.WARNING)


def tokenize(texts: Sequence[str], ids: bool) -> Any:
    """bm25s tokens of `texts`: a Tokenized (ids + vocab) for indexing, or lists of strings for queries."""
    import bm25s

    return bm25s.tokenize(
        list(texts), stopwords="en", stemmer=_stemmer(), return_ids=ids, show_progress=False, allow_empty=True
    )


def build(texts: Sequence[str], folder: Path) -> None:
    """Index `texts` (row i = chunk id i) and save the index into `folder`/bm25. Term ids follow the sorted
    vocabulary (bm25s's own ids follow set order, which changes with PYTHONHASHSEED): the files are the same for
    the same chunks in every process."""
    import bm25s

    _quiet()
    tokens = tokenize(texts, ids=False)
    vocab = {t: i for i, t in enumerate(sorted({t for doc in tokens for t in doc}))}
    ids = [[vocab[t] for t in doc] for doc in tokens]
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenization.Tokenized(ids=ids, vocab=vocab), show_progress=False)
    retriever.save(str(Path(folder) / FOLDER), show_progress=False)


def load(folder: Path) -> Any:
    import bm25s

    _quiet()
    return bm25s.BM25.load(str(Path(folder) / FOLDER), mmap=True)


def scores(retriever: Any, query: str) -> np.ndarray | None:
    """BM25 score of every chunk for `query`; None when no query term is in the index."""
    terms = [t for t in tokenize([query], ids=False)[0] if t in retriever.vocab_dict]
    if not terms or int(retriever.scores["num_docs"]) == 0:
        return None
    return retriever.get_scores(terms)


def top(values: np.ndarray | None, k: int, lo: int = 0, hi: int | None = None) -> list[tuple[int, float]]:
    """(chunk id, score) of the best `k` positive scores among chunks lo..hi-1, best first (ties by id)."""
    if values is None:
        return []
    part = values[lo:hi]
    k = min(k, len(part))
    if k <= 0:
        return []
    best = np.argpartition(-part, k - 1)[:k]
    best = best[np.lexsort((best, -part[best]))]
    return [(lo + int(i), float(part[i])) for i in best if part[i] > 0]


def search(retriever: Any, query: str, k: int) -> list[tuple[int, float]]:
    """(chunk id, score) of the best `k` chunks sharing a term with `query`, best first."""
    return top(scores(retriever, query), k)
