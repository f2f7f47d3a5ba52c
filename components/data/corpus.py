"""The pretraining corpus at scale: pass 1 over pieces of ingest's shards, de-dup and split, the tokenizer's
sample, pass 2, and the merge into train.bin / val.bin.

Memory stays flat as the corpus grows: pieces are bounded (`preprocess.chunk_mb`), de-dup keys go into
fixed-size filters (`preprocess.dedup_mb`), token files are written piece by piece and concatenated by
streaming, and document lengths are kept as a histogram. The only step in order is the de-dup decision (in
this process, vectorized per piece); the rest runs on the Runner's workers.
"""

from __future__ import annotations

import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from components.core.context import StageError
from components.core.data_config import PreprocessConfig
from components.data import dedup
from components.data import shards as sh
from components.data.engine import Runner

RERUN = "run `dvc repro ingest` (or python -m components.ingest) first"


def _line_of(piece: sh.Piece, line_in_piece: int) -> int:
    """The 1-based line number in its shard of a piece's line (counted only for a message)."""
    with open(piece.shard, "rb") as f:
        before = f.read(piece.start).count(b"\n")
    return before + line_in_piece


class _Splitter:
    """The de-dup and split decisions, piece by piece in corpus order (exactly as one document at a time)."""

    def __init__(self, cfg: PreprocessConfig, work: Path) -> None:
        self.cfg, self.work = cfg, work
        self.exact = dedup.SeenFilter(cfg.dedup_mb) if cfg.dedup != "none" else None
        self.near = dedup.SeenFilter(cfg.dedup_mb) if cfg.dedup == "near" else None
        self.dropped: Counter[str] = Counter()
        self.count = {"train": 0, "val": 0}
        self.docs_in = self.chars = 0
        self.edge: dict[str, tuple[float, int, int] | None] = {"train": None, "val": None}  # nearest the line

    def add(self, res: dict[str, Any]) -> None:
        i = res["index"]
        self.docs_in += res["docs"]
        self.dropped.update(res["dropped"])
        z = sh.candidates(self.work, i)
        keep = self.exact.add_new(z["digests"]) if self.exact else np.ones(len(z["digests"]), bool)
        self.dropped["duplicate"] += int((~keep).sum())
        if self.near is not None:
            idx = np.flatnonzero(keep)
            unmatched = self.near.add_unmatched(z["keys"][idx])
            keep[idx[~unmatched]] = False
            self.dropped["near_duplicate"] += int((~unmatched).sum())
        u = z["digests"].astype(np.float64) / 2.0**64  # dedup.unit of each digest
        val = u < self.cfg.val_fraction
        assign = np.where(keep, np.where(val, sh.VAL, sh.TRAIN), sh.DROP).astype(np.uint8)
        np.save(sh.work_file(self.work, i, "assign.npy"), assign)
        self.chars += int(z["chars"][keep].sum())
        for split, mask, pick in (("train", keep & ~val, np.argmin), ("val", keep & val, np.argmax)):
            self.count[split] += int(mask.sum())
            if mask.any():
                pos = np.flatnonzero(mask)[pick(u[mask])]
                e = self.edge[split]
                if e is None or (u[pos] < e[0] if split == "train" else u[pos] > e[0]):
                    self.edge[split] = (float(u[pos]), i, int(pos))

    def move_into_empty_split(self) -> str | None:
        """val_fraction too small (or too large) for this corpus: the document nearest the line moves to the
        empty split (to its end). Returns that split."""
        for src, dst in (("train", "val"), ("val", "train")):
            if self.count[dst] == 0:
                _, i, pos = self.edge[src]
                path = sh.work_file(self.work, i, "assign.npy")
                assign = np.load(path)
                assign[pos] = sh.TO_VAL if dst == "val" else sh.TO_TRAIN
                np.save(path, assign)
                self.count[src], self.count[dst] = self.count[src] - 1, 1
                return dst
        return None

    def filter_rates(self) -> dict[str, float]:
        rates = {"exact": self.exact, "near": self.near}
        return {f"{k}_false_positive_rate": f.false_positive_rate() for k, f in rates.items() if f is not None}


def clean_and_split(
    cfg: PreprocessConfig, shards: list[Path], work: Path, seed: int, runner: Runner, progress: bool
) -> dict[str, Any]:
    """Pass 1 on every piece, then the de-dup and split decisions (work/assign-<i>.npy). Returns the counts
    and the pieces."""
    pieces = sh.pieces(shards, max(1, int(cfg.chunk_mb * 2**20)))
    bands, rows = dedup.lsh_params(cfg.near_threshold) if cfg.dedup == "near" else (0, 0)
    jobs = [
        sh.CleanJob(p, str(work), cfg.normalization, cfg.min_chars, cfg.max_chars, bands, rows, seed) for p in pieces
    ]
    splitter = _Splitter(cfg, work)
    for res in tqdm(runner.map(sh.clean_piece, jobs, "clean"), "clean", len(jobs), disable=not progress):
        if "error" in res:
            piece = pieces[res["index"]]
            line, msg = res["error"]
            raise StageError(f"{piece.shard}:{_line_of(piece, line)}: {msg}; {RERUN}")
        splitter.add(res)
    kept = splitter.count["train"] + splitter.count["val"]
    if kept < 2:
        raise StageError(
            f"{shards[0].parent}: {kept} pretraining document(s) left after cleaning and de-dup "
            f"(of {splitter.docs_in}; dropped {dict(splitter.dropped)}); need at least 2 for a train/val split: "
            "add text to ingest.pretrain_sources or relax preprocess.min_chars/max_chars/dedup"
        )
    moved_to = splitter.move_into_empty_split()
    return {
        "docs_in": splitter.docs_in,
        "kept": kept,
        "dropped": {k: v for k, v in splitter.dropped.items() if v},
        "train_docs": splitter.count["train"],
        "val_docs": splitter.count["val"],
        "chars_mean": splitter.chars / kept,
        "dedup": {"filter_mb": cfg.dedup_mb, **splitter.filter_rates()},
        "pieces": pieces,
        "moved_to": moved_to,
    }


# ---------------------------------------------------------------- the tokenizer's sample
def train_sample(work: Path, pieces: list[sh.Piece], cap_bytes: int, stats: dict[str, Any]) -> Iterator[list[str]]:
    """The train split's documents in corpus order (moved ones last) until `cap_bytes` of UTF-8 text, in
    batches; stats gets "bytes" and "docs"."""
    stats.setdefault("bytes", 0)
    stats.setdefault("docs", 0)
    moved: list[str] = []
    for p in pieces:
        assign = np.load(sh.work_file(work, p.index, "assign.npy"))
        offsets = sh.candidates(work, p.index)["offsets"]
        which = np.flatnonzero(assign == sh.TRAIN)
        room = cap_bytes - stats["bytes"]
        take = int(np.searchsorted(np.cumsum(offsets[which + 1] - offsets[which]), room, side="left")) + 1
        texts = sh.texts_of(work, p.index, which[:take])
        stats["bytes"] += int((offsets[which[:take] + 1] - offsets[which[:take]]).sum())
        stats["docs"] += len(texts)
        yield texts
        if stats["bytes"] >= cap_bytes:
            return
        moved += sh.texts_of(work, p.index, np.flatnonzero(assign == sh.TO_TRAIN))
    stats["docs"] += len(moved)
    stats["bytes"] += sum(len(t.encode("utf-8")) for t in moved)
    yield moved


# ---------------------------------------------------------------- pass 2 and the merge
def _percentile(values: np.ndarray, counts: np.ndarray, q: float) -> float:
    """np.percentile(x, q) (linear) of the x whose histogram is (values, counts): the same float arithmetic."""
    n, cum = int(counts.sum()), np.cumsum(counts)
    quantile = q / 100
    virtual = n * quantile + (1 + quantile * (1 - 1 - 1)) - 1
    prev = min(max(int(np.floor(virtual)), 0), n - 1)
    a, b = (int(values[np.searchsorted(cum, k, side="right")]) for k in (prev, min(prev + 1, n - 1)))
    gamma = virtual - np.floor(virtual)
    return float(b - (b - a) * (1 - gamma) if gamma >= 0.5 else a + (b - a) * gamma)


def length_stats(hist: Counter[int]) -> dict[str, float]:
    """mean, p50, p95, max of document lengths from their histogram (as numpy computes them from the list)."""
    if not hist:
        return {"mean": 0.0, "p50": 0.0, "p95": 0.0, "max": 0}
    values = np.array(sorted(hist), np.int64)
    counts = np.array([hist[v] for v in values], np.int64)
    return {
        "mean": float((values * counts).sum() / counts.sum()),
        "p50": _percentile(values, counts, 50),
        "p95": _percentile(values, counts, 95),
        "max": int(values[-1]),
    }


def _append(dst: Any, src: Path) -> None:
    with open(src, "rb") as f:
        shutil.copyfileobj(f, dst, 1 << 22)
    src.unlink()


def tokenize_and_merge(
    work: Path,
    pre: dict[str, Any],
    tokenizer_dir: Path,
    eos: int,
    dtype: Any,
    out: Path,
    runner: Runner,
    *,
    progress: bool = False,
) -> dict[str, Any]:
    """Pass 2 on every piece, and the token files concatenated in corpus order into out/{train,val}.bin."""
    name = np.dtype(dtype).name
    jobs = [sh.TokenizeJob(p.index, str(work), str(tokenizer_dir), eos, name) for p in pre["pieces"]]
    tokens, hist, moved = {"train": 0, "val": 0}, Counter(), []
    with open(out / "train.bin", "wb") as train, open(out / "val.bin", "wb") as val:
        files = {"train": train, "val": val}
        for res in tqdm(runner.map(sh.tokenize_piece, jobs, "tokenize"), "tokenize", len(jobs), disable=not progress):
            i = res["index"]
            for split in files:
                _append(files[split], sh.work_file(work, i, f"tok.{split}.bin"))
                tokens[split] += res["tokens"][split]
            hist.update(dict(zip(*res["lengths"])))
            if res["tokens"]["moved"]:
                moved.append((i, res["tokens"]["moved"]))
            for what in ("clean.txt", "clean.npz"):
                sh.work_file(work, i, what).unlink()
        for i, n in moved:  # the one document moved into an empty split goes to its end
            _append(files[pre["moved_to"]], sh.work_file(work, i, "tok.moved.bin"))
            tokens[pre["moved_to"]] += n
    return {"train_tokens": tokens["train"], "val_tokens": tokens["val"], "tokens_per_doc": length_stats(hist)}
