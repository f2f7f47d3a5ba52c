"""The chunk store (LanceDB) and the embedding cache that makes re-indexing incremental.

An index keeps its chunks in one LanceDB table, row i = chunk id i: text, source, location, hashes, token count,
and the vector when the index is dense. LanceDB is embedded (a folder of Lance files, no server), searches
vectors exactly or through an IVF-PQ index, and the same code opens `s3://...` folders or LanceDB Cloud
(`db://...`) for indexes that outgrow one machine. Vectors are cached by (encoder hash, chunk hash) in a LanceDB
table outside the DVC output, upserted with `merge_insert`: a rebuild embeds only chunks it has not seen.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("LANCE_LOG", "error")  # "no existing dataset, it will be created" is not news

STORE = "store"
"""Sub-folder of an index: the LanceDB database."""
TABLE = "chunks"
COLUMNS = ("id", "text", "source", "location", "doc_hash", "hash", "tokens")
CACHE_TABLE = "embeddings"


def connect(folder: str | Path) -> Any:
    import lancedb

    return lancedb.connect(str(folder))


def _vectors(vectors: np.ndarray) -> Any:
    import pyarrow as pa

    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])


def write(folder: Path, columns: dict[str, list], vectors: np.ndarray | None, ann_min_rows: int) -> Any:
    """Create the chunks table under `folder`/store (ids 0..n-1 in row order); an ANN index from ann_min_rows."""
    import pyarrow as pa

    data = {"id": pa.array(range(len(columns["text"])), pa.int64())}
    data.update({k: pa.array(columns[k], pa.int32() if k == "tokens" else pa.string()) for k in COLUMNS[1:]})
    if vectors is not None:
        data["vector"] = _vectors(vectors)
    table = connect(Path(folder) / STORE).create_table(TABLE, pa.table(data), mode="create")
    if vectors is not None and len(vectors) >= ann_min_rows:
        dim = vectors.shape[1]
        table.create_index(
            metric="cosine",
            num_partitions=max(1, int(len(vectors) ** 0.5)),
            num_sub_vectors=next(d for d in (16, 8, 4, 2, 1) if dim % d == 0),
        )
    return table


def open_table(folder: Path) -> Any:
    return connect(Path(folder) / STORE).open_table(TABLE)


def rows(table: Any, ids: Sequence[int]) -> dict[int, dict[str, Any]]:
    """Chunk id -> its row (without the vector)."""
    if not ids:
        return {}
    got = table.take_offsets(list(ids)).select(list(COLUMNS)).to_arrow().to_pylist()
    return {int(r["id"]): r for r in got}


def vector_search(table: Any, vector: np.ndarray, k: int, lo: int = 0, hi: int | None = None) -> list:
    """(chunk id, cosine similarity) of the `k` nearest chunks among ids lo..hi-1, best first."""
    res = table.search(vector.astype(np.float32), vector_column_name="vector").metric("cosine").limit(k)
    if lo > 0 or hi is not None:
        res = res.where(f"id >= {int(lo)}" + (f" AND id < {int(hi)}" if hi is not None else ""), prefilter=True)
    got = res.select(["id"]).to_arrow().to_pylist()
    return [(int(r["id"]), 1.0 - float(r["_distance"])) for r in got]


class EmbeddingCache:
    """Vectors by chunk hash for one encoder, in a LanceDB table under `folder`/<encoder hash prefix>."""

    def __init__(self, folder: Path, encoder: str) -> None:
        self.db = connect(Path(folder) / encoder[:16])

    def _table(self) -> Any:
        return self.db.open_table(CACHE_TABLE) if CACHE_TABLE in self.db else None

    def get(self, hashes: Sequence[str]) -> dict[str, np.ndarray]:
        table = self._table()
        if table is None or not hashes:
            return {}
        data = table.to_arrow()
        keys = data.column("hash").to_pylist()
        vecs = data.column("vector").combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(len(keys), -1)
        want = set(hashes)
        return {h: v for h, v in zip(keys, vecs) if h in want}

    def put(self, hashes: Sequence[str], vectors: np.ndarray) -> None:
        import pyarrow as pa

        if not len(hashes):
            return
        data = pa.table({"hash": pa.array(list(hashes), pa.string()), "vector": _vectors(vectors)})
        table = self._table()
        if table is None:
            self.db.create_table(CACHE_TABLE, data, mode="create")
        else:
            table.merge_insert("hash").when_not_matched_insert_all().execute(data)
