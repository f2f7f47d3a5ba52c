"""Query an index folder: BM25, dense, or both fused by reciprocal rank (hybrid)."""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from components.core.context import StageError
from components.core.io import META, read_json
from components.retrieval import lexical, store

RRF_K = 60
"""Reciprocal-rank fusion constant (Cormack et al. 2009): score = sum over rankers of 1 / (RRF_K + rank)."""
IN_MEMORY_ROWS = 250_000
"""Indexes up to this many chunks keep their rows (not vectors) in memory once opened: a LanceDB fetch per query
costs milliseconds, an in-memory take microseconds. Larger ones fetch the hits' rows from LanceDB."""
RELATIVE_FLOOR = 0.5
"""When collections are fused, a BM25 hit scoring below this share of its collection's best hit is left out: a
weak match in one collection does not take the place of strong matches in the other."""


@dataclass(frozen=True)
class Hit:
    """One retrieved chunk, with what a user needs to check it: its source, location and content hash."""

    id: int
    text: str
    source: str
    location: str
    hash: str
    score: float
    rank: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fuse(rankings: list[list[tuple[int, float]]], k: int) -> list[tuple[int, float]]:
    """Reciprocal-rank fusion of several best-first rankings; the `k` best (id, fused score). Ties go to the
    better rank, then to the earlier ranking."""
    scores: dict[int, float] = {}
    for rank in range(max(map(len, rankings), default=0)):  # rank by rank: dict order = first appearance
        for ranking in rankings:
            if rank < len(ranking):
                cid = ranking[rank][0]
                scores[cid] = scores.get(cid, 0.0) + 1.0 / (RRF_K + rank + 1)
    return sorted(scores.items(), key=lambda x: -x[1])[:k]  # stable: ties keep their first appearance


class Index:
    """An index folder written by the index stage, opened for queries."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        if not (self.folder / META).is_file() or not (self.folder / store.STORE).is_dir():
            raise StageError(
                f"{self.folder}: not an index (seedlm.json, store/); run `dvc repro index` "
                "(or python -m components.index) first"
            )
        meta = read_json(self.folder / META)
        self.result = meta.get("result") or {}
        self.config = (meta.get("config") or {}).get("index") or {}
        self.mode = self.result.get("retrieval", "bm25")
        self.top_k = int(self.config.get("top_k", 5))
        self.table = store.open_table(self.folder)
        n, n_corpus = int(self.result.get("chunks", 0)), int(self.result.get("corpus_chunks", 0))
        fused = self.config.get("fuse_collections", True) and 0 < n_corpus < n
        self.groups = [(n_corpus, n), (0, n_corpus)] if fused else [(0, n)]
        """Chunk id ranges ranked apart and fused: index.sources first (they win ties), then the corpus."""
        self.bm25 = lexical.load(self.folder) if self.mode in ("bm25", "hybrid") else None
        self._encoder: Any = None
        self._rows: Any = None

    @property
    def encoder(self) -> Any:
        if self._encoder is None:
            from components.retrieval.dense import Encoder, encoder_hash

            path = self.config.get("embedding_model")
            if not path or encoder_hash(Path(path)) != self.result.get("encoder_sha256"):
                raise StageError(
                    f"{self.folder}: built with the encoder {path} (sha256 {self.result.get('encoder_sha256')}), "
                    "which is missing or changed; rebuild the index (`dvc repro index`)"
                )
            self._encoder = Encoder(path)
        return self._encoder

    def ranked(self, query: str, k: int) -> list[tuple[int, float]]:
        """(chunk id, score) best first: one ranking per retriever and collection, fused by reciprocal rank."""
        rankings = []
        scores = lexical.scores(self.bm25, query) if self.bm25 is not None else None
        vec = self.encoder.encode([query])[0] if self.mode in ("dense", "hybrid") else None
        for lo, hi in self.groups:
            if self.bm25 is not None:
                hits = lexical.top(scores, k, lo, hi)
                floor = RELATIVE_FLOOR * hits[0][1] if hits and len(self.groups) > 1 else 0.0
                rankings.append([h for h in hits if h[1] >= floor])
            if vec is not None:
                rankings.append(store.vector_search(self.table, vec, k, lo, hi))
        return rankings[0][:k] if len(rankings) == 1 else fuse(rankings, k)

    def rows(self, ids: list[int]) -> dict[int, dict[str, Any]]:
        """Chunk id -> its row (text, source, location, hashes, tokens)."""
        if int(self.result.get("chunks", 0)) > IN_MEMORY_ROWS:
            return store.rows(self.table, ids)
        if self._rows is None:
            self._rows = self.table.to_arrow().select(list(store.COLUMNS))
        return {i: row for i, row in zip(ids, self._rows.take(ids).to_pylist())} if ids else {}

    def search(self, query: str, k: int | None = None) -> list[Hit]:
        """The best `k` chunks for `query` (default: the index's top_k), best first."""
        ranked = self.ranked(query, k or self.top_k)
        found = self.rows([cid for cid, _ in ranked])
        return [
            Hit(cid, r["text"], r["source"], r["location"], r["hash"], score, rank)
            for rank, (cid, score) in enumerate(ranked, 1)
            if (r := found.get(cid))
        ]


@functools.lru_cache(maxsize=4)
def _open(folder: str, stamp: float) -> Index:
    return Index(folder)


def open_index(folder: str | Path) -> Index:
    """An opened index, reused while its seedlm.json is unchanged (a rebuild is picked up)."""
    path = Path(folder).resolve()
    meta = path / META
    return _open(str(path), meta.stat().st_mtime if meta.is_file() else 0.0)


def retrieve(index_dir: str | Path, query: str, k: int | None = None) -> list[Hit]:
    """The top-k chunks of the index in `index_dir` for `query` (the RAG hook for evaluate, serve, chat, pyfunc)."""
    return open_index(index_dir).search(query, k)
