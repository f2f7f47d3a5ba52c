"""Pretraining text as units of work: line-aligned pieces of ingest's shards.

Two functions of plain, picklable arguments do the per-piece work, so any process can run them (this one, a
local pool, a Dask worker): `clean_piece` (pass 1: read, clean, filter, key) and `tokenize_piece` (pass 2:
encode the documents the de-dup pass kept). Each writes its results to files in the work folder named after
the piece and returns small statistics. Nothing depends on which process ran a piece or when: the outputs
are the same for any number of workers.
"""

from __future__ import annotations

import itertools
import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from components.data import dedup
from components.data.clean import clean_text

BATCH_DOCS = 1000
BATCH_CHARS = 1 << 21
"""Documents per tokenizer call (at most), and their characters."""
DROP, TRAIN, VAL, TO_TRAIN, TO_VAL = range(5)
"""Assignment of each candidate document: dropped, a split, or moved to the other split's end."""


@dataclass(frozen=True)
class Piece:
    """Bytes [start, end) of a shard: whole lines."""

    index: int
    shard: str
    start: int
    end: int


def pieces(shards: list[Path], piece_bytes: int) -> list[Piece]:
    """Cut each shard into line-aligned pieces of about `piece_bytes` (never splitting a line)."""
    out: list[Piece] = []
    for shard in shards:
        size, start = shard.stat().st_size, 0
        with open(shard, "rb") as f:
            while start < size:
                f.seek(min(start + piece_bytes, size))
                end = min(size, f.tell() + len(f.readline())) if start + piece_bytes < size else size
                out.append(Piece(len(out), str(shard), start, end))
                start = end
    return out


def work_file(work: str | Path, index: int, what: str) -> Path:
    """A piece's work file: work_file(w, 3, "clean.txt") is w/clean-000003.txt."""
    name, _, ext = what.partition(".")
    return Path(work) / f"{name}-{index:06d}.{ext}"


# ---------------------------------------------------------------- pass 1: clean, filter, key
@dataclass(frozen=True)
class CleanJob:
    piece: Piece
    work: str
    normalization: str
    min_chars: int
    max_chars: int
    near_bands: int = 0
    near_rows: int = 0
    seed: int = 0


def _rows(data: bytes) -> tuple[list[str], tuple[int, str] | None]:
    """The texts of a piece's JSON lines, or the first problem as (line in the piece, message)."""
    texts = []
    for n, line in enumerate(data.split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            try:
                row = orjson.loads(line)
            except orjson.JSONDecodeError:  # json's own message, and its extensions (NaN, big ints)
                row = json.loads(line)
        except json.JSONDecodeError as e:
            return texts, (n, f"not valid JSON ({e.msg})")
        except (RecursionError, UnicodeDecodeError) as e:
            return texts, (n, f"not valid JSON ({type(e).__name__})")
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            return texts, (n, 'expected {"text": str}')
        texts.append(row["text"])
    return texts, None


def _reason(n_chars: int, job: CleanJob) -> str | None:
    if not n_chars:
        return "empty"
    if n_chars < job.min_chars:
        return "too_short"
    return "too_long" if n_chars > job.max_chars else None


def clean_piece(job: CleanJob) -> dict[str, Any]:
    """Pass 1 of one piece: clean every document, drop empty/too short/too long ones, and write the rest
    (the candidates) with their keys: clean-<i>.txt (UTF-8 texts back to back) and clean-<i>.npz (byte
    offsets, 64-bit digests, character counts, LSH band keys). Returns the counts, or {"error": (line, msg)}."""
    p = job.piece
    with open(p.shard, "rb") as f:
        f.seek(p.start)
        texts, error = _rows(f.read(p.end - p.start))
    if error:
        return {"index": p.index, "error": error}
    dropped: Counter[str] = Counter()
    kept, encoded = [], []
    for text in texts:
        text = clean_text(text, job.normalization)
        reason = _reason(len(text), job)
        if reason:
            dropped[reason] += 1
            continue
        kept.append(text)
        encoded.append(text.encode("utf-8"))
    digests = np.fromiter((dedup.digest_bytes(b) for b in encoded), np.uint64, len(encoded))
    keys = np.zeros((len(encoded), job.near_bands), np.uint64)
    if job.near_bands:
        perms = dedup.perms(job.seed)
        sigs = np.array([dedup.minhash(t, perms) for t in kept], np.uint64).reshape(len(kept), -1)
        keys = dedup.band_keys(sigs, job.near_bands, job.near_rows)
    chars = [len(t) for t in kept]
    work_file(job.work, p.index, "clean.txt").write_bytes(b"".join(encoded))
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in encoded], dtype=np.int64)])
    with open(work_file(job.work, p.index, "clean.npz"), "wb") as f:
        np.savez(f, offsets=offsets, digests=digests, chars=np.asarray(chars, np.int64), keys=keys)
    return {"index": p.index, "docs": len(texts), "dropped": dict(dropped), "candidates": len(encoded)}


def candidates(work: str | Path, index: int) -> dict[str, np.ndarray]:
    with np.load(work_file(work, index, "clean.npz")) as z:
        return {k: z[k] for k in z.files}


def texts_of(work: str | Path, index: int, which: np.ndarray, offsets: np.ndarray | None = None) -> list[str]:
    """The cleaned texts of a piece's candidates at positions `which`, in order."""
    offsets = candidates(work, index)["offsets"] if offsets is None else offsets
    with open(work_file(work, index, "clean.txt"), "rb") as f:
        data = f.read()
    return [data[offsets[i] : offsets[i + 1]].decode("utf-8") for i in which]


# ---------------------------------------------------------------- pass 2: tokenize
@dataclass(frozen=True)
class TokenizeJob:
    index: int
    work: str
    tokenizer: str
    eos: int
    dtype: str


_TOKENIZERS: dict[str, Any] = {}


def load_encoder(folder: str) -> Any:
    """A `tokenizers.Tokenizer` that keeps special-token strings inside documents as text (once per process)."""
    if folder not in _TOKENIZERS:
        path = Path(folder) / "tokenizer.json"
        if path.is_file():
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(path))
            tok.encode_special_tokens = True
        else:  # a tokenizer transformers saved without tokenizer.json (not a fast one)
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        _TOKENIZERS[folder] = tok
    return _TOKENIZERS[folder]


def encode(tok: Any, texts: list[str]) -> list[list[int]]:
    """Plain-text ids in batches through the library's parallel batch encode (no special tokens added)."""
    if hasattr(tok, "encode_batch_fast"):
        return [e.ids for e in tok.encode_batch_fast(texts, add_special_tokens=False)]
    return tok(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def _batches(texts: list[str]) -> list[list[str]]:
    out, batch, size = [], [], 0
    for t in texts:
        batch.append(t)
        size += len(t)
        if len(batch) >= BATCH_DOCS or size >= BATCH_CHARS:
            out.append(batch)
            batch, size = [], 0
    return out + ([batch] if batch else [])


def _write_docs(f: Any, ids: list[list[int]], eos: int, dtype: str) -> None:
    """Each document's ids and an eos after it, as one array write."""
    for x in ids:
        x.append(eos)
    np.fromiter(itertools.chain.from_iterable(ids), dtype, sum(map(len, ids))).tofile(f)


def tokenize_piece(job: TokenizeJob) -> dict[str, Any]:
    """Pass 2 of one piece: encode the documents kept for each split into tok-<i>-{train,val,moved}.bin
    (ids + eos per document). Returns token counts and a histogram of document lengths."""
    assign = np.load(work_file(job.work, job.index, "assign.npy"))
    offsets = candidates(job.work, job.index)["offsets"]
    tok, tokens, lengths = load_encoder(job.tokenizer), {}, []
    for name, codes in (("train", [TRAIN]), ("val", [VAL]), ("moved", [TO_TRAIN, TO_VAL])):
        texts = texts_of(job.work, job.index, np.flatnonzero(np.isin(assign, codes)), offsets)
        with open(work_file(job.work, job.index, f"tok.{name}.bin"), "wb") as f:
            for batch in _batches(texts):
                ids = encode(tok, batch)
                lengths.extend(len(x) for x in ids)
                _write_docs(f, ids, job.eos, job.dtype)
        tokens[name] = sum(lengths[-len(texts) :]) + len(texts) if texts else 0
    values, counts = np.unique(np.asarray(lengths, np.int64), return_counts=True)
    return {"index": job.index, "tokens": tokens, "lengths": (values.tolist(), counts.tolist()), "pid": os.getpid()}
