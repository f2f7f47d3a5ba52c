"""Build an index folder: documents -> chunks (de-duplicated) -> LanceDB table + BM25 (+ vectors).

<out>/store/        LanceDB database, table `chunks` (row i = chunk id i)
<out>/bm25/         bm25s index (bm25 and hybrid retrieval)
<out>/manifest.json one entry per source: documents, chunks, bytes, sha256 of its documents
<out>/cutoff_questions.jsonl   the synthetic world's knowledge-cutoff questions (with `synthetic: true`)
<out>/seedlm.json   config, inputs, result (retrieval mode, counts, encoder hash)
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from components.core.context import StageContext, StageError
from components.core.data_config import IndexConfig, SyntheticConfig
from components.core.io import atomic_dir, read_json, write_json, write_meta
from components.data import updates
from components.retrieval import lexical, store
from components.retrieval.chunking import Chunk, Document, chunk_documents
from components.retrieval.documents import ingested, source_documents

RERUN_PREPROCESS = "run `dvc repro preprocess` (or python -m components.preprocess) first"
QUESTIONS = "cutoff_questions.jsonl"


def load_tokenizer(processed_dir: Path) -> Any:
    """The pipeline tokenizer for measuring chunks: its `tokenizers` core when there is one (no torch import)."""
    folder = Path(processed_dir) / "tokenizer"
    if not folder.is_dir():
        raise StageError(f"{folder}: missing (chunks are measured in the pipeline's tokens); {RERUN_PREPROCESS}")
    if (folder / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(folder / "tokenizer.json"))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def mode(cfg: IndexConfig) -> str:
    return ("hybrid" if cfg.embedding_model else "bm25") if cfg.retrieval == "auto" else cfg.retrieval


class Collector:
    """Chunk columns, de-duplicated by chunk hash, and per-source counts for the manifest."""

    def __init__(self) -> None:
        self.columns: dict[str, list] = {k: [] for k in store.COLUMNS[1:]}
        self.seen: set[str] = set()
        self.sources: dict[str, dict[str, Any]] = {}
        self.duplicates = 0

    def add_docs(self, docs: Iterable[Document]) -> Iterator[Document]:
        for d in docs:
            e = self.sources.setdefault(d.source, {"source": d.source, "docs": 0, "chunks": 0, "bytes": 0})
            e["docs"] += 1
            e["bytes"] += len(d.text.encode("utf-8"))
            e.setdefault("_h", hashlib.sha256()).update(d.text.encode("utf-8") + b"\0")
            yield d

    def chunk(self, docs: Iterable[Document], tokenizer: Any, cfg: IndexConfig) -> None:
        for chunk in chunk_documents(self.add_docs(docs), tokenizer, cfg.chunk_tokens, cfg.overlap_tokens):
            self.add(chunk)

    def add(self, chunk: Chunk) -> None:
        if chunk.hash in self.seen:
            self.duplicates += 1
            return
        self.seen.add(chunk.hash)
        self.sources[chunk.source]["chunks"] += 1
        for k in self.columns:
            self.columns[k].append(getattr(chunk, k))

    def manifest(self) -> list[dict[str, Any]]:
        return [
            {**{k: v for k, v in e.items() if k != "_h"}, "sha256": e["_h"].hexdigest()} for e in self.sources.values()
        ]


def _sources(cfg: IndexConfig, world: SyntheticConfig, seed: int, roots: dict) -> Iterator[Document]:
    for i, src in enumerate(cfg.sources):
        try:
            yield from source_documents(src, cfg, world=world, seed=seed, **roots)
        except StageError as e:
            raise StageError(f"index.sources[{i}]: {e}") from None


def embed(cfg: IndexConfig, texts: list[str], hashes: list[str], cache_dir: Path) -> tuple[np.ndarray, dict]:
    """Vectors of every chunk; only chunks missing from the cache are encoded (then added to it)."""
    from components.retrieval.dense import Encoder, encoder_hash

    encoder = Encoder(cfg.embedding_model)
    digest = encoder_hash(encoder.folder)
    cache = store.EmbeddingCache(cache_dir, digest)
    known = cache.get(hashes)
    todo = [i for i, h in enumerate(hashes) if h not in known]
    fresh = encoder.encode([texts[i] for i in todo], cfg.embed_batch_size) if todo else np.zeros((0, encoder.dim))
    cache.put([hashes[i] for i in todo], fresh)
    out = np.zeros((len(texts), encoder.dim), dtype=np.float32)
    for row, i in enumerate(todo):
        out[i] = fresh[row]
    for i, h in enumerate(hashes):
        if h in known:
            out[i] = known[h]
    return out, {"encoder_sha256": digest, "embedded": len(todo), "embeddings_reused": len(hashes) - len(todo)}


def content_sha256(columns: dict[str, list], encoder: str | None) -> str:
    """What the index holds, independent of LanceDB's file names: chunk hashes, sources and locations in id
    order, and the encoder's hash (its vectors follow from both)."""
    h = hashlib.sha256((encoder or "").encode())
    for row in zip(columns["hash"], columns["source"], columns["location"]):
        h.update("\0".join(row).encode() + b"\n")
    return h.hexdigest()


def _changes(previous: Path, manifest: list[dict[str, Any]]) -> dict[str, int]:
    """Sources added, changed, unchanged and removed since the index last built in `previous` (if any)."""
    try:
        old = {e["source"]: e["sha256"] for e in read_json(previous / "manifest.json")}
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    new = {e["source"]: e["sha256"] for e in manifest}
    return {
        "sources_added": len(new.keys() - old.keys()),
        "sources_changed": sum(1 for s in new.keys() & old.keys() if new[s] != old[s]),
        "sources_unchanged": sum(1 for s in new.keys() & old.keys() if new[s] == old[s]),
        "sources_removed": len(old.keys() - new.keys()),
    }


def build_index(
    cfg: IndexConfig,
    *,
    raw_dir: Path,
    processed_dir: Path,
    out_dir: Path,
    world: SyntheticConfig,
    seed: int,
    sources_root: Path,
    downloads_dir: Path,
    cache_dir: Path,
    ctx: StageContext | None = None,
) -> dict[str, Any]:
    """Index the documents into `out_dir` (atomically: a failure leaves the previous index untouched).
    Url sources download into `downloads_dir` (ingest's too); vectors are cached in `cache_dir`."""
    ctx, t0 = ctx or StageContext(), time.perf_counter()
    tokenizer = load_tokenizer(processed_dir)
    roots = {"sources_root": Path(sources_root), "cache_dir": Path(downloads_dir)}
    col = Collector()
    if cfg.include_pretrain:  # chunk ids: the corpus first, then index.sources
        col.chunk(ingested(Path(raw_dir)), tokenizer, cfg)
    n_corpus = len(col.columns["text"])
    col.chunk(_sources(cfg, world, seed, roots), tokenizer, cfg)
    texts = col.columns["text"]
    if not texts:
        raise StageError("index: the sources hold no text to index; add documents to index.sources")
    retrieval, extra, vectors = mode(cfg), {}, None
    if retrieval != "bm25":
        vectors, extra = embed(cfg, texts, col.columns["hash"], Path(cache_dir))
    manifest = col.manifest()
    n_bytes = sum(e["bytes"] for e in manifest)
    with atomic_dir(out_dir) as tmp:
        store.write(tmp, col.columns, vectors, cfg.ann_min_rows)
        if retrieval in ("bm25", "hybrid"):
            lexical.build(texts, tmp)
        write_json(tmp / "manifest.json", manifest)
        if any(s.synthetic for s in cfg.sources):
            rows = updates.cutoff_questions(world, seed)
            (tmp / QUESTIONS).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        seconds = time.perf_counter() - t0
        result = {
            "retrieval": retrieval,
            "chunks": len(texts),
            "corpus_chunks": n_corpus,
            "documents": sum(e["docs"] for e in manifest),
            "duplicate_chunks": col.duplicates,
            "bytes": n_bytes,
            "tokens": int(sum(col.columns["tokens"])),
            "seconds": seconds,
            "mb_per_s": n_bytes / 2**20 / max(seconds, 1e-9),
            "content_sha256": content_sha256(col.columns, extra.get("encoder_sha256")),
            **extra,
            **_changes(Path(out_dir), manifest),
        }
        config = {"seed": seed, "index": cfg.model_dump(mode="json"), "ingest.synthetic": world.model_dump()}
        inputs = {"raw": str(raw_dir), "tokenizer": str(Path(processed_dir) / "tokenizer"), "sources": manifest}
        write_meta(tmp, "index", config, result, inputs)
    ctx.log({"mb_per_s": result["mb_per_s"], "chunks": float(len(texts))}, None)
    return result
