"""Retrieval index: build throughput and query latency at 10k, 100k and 1M chunks, against a brute-force scan.

    python bench/index_bench.py          (make bench-index)    [--scales 10000,100000 --queries 200 --dense 64]

Each scale runs in a fresh child process, so its peak RSS is that scale's peak memory. Synthetic documents
(sentences of Zipf-distributed pseudo-words) go into one .txt file that the real stage function indexes
(components/retrieval/build.py: ingest's readers, sentence chunks of `index.chunk_tokens` BPE tokens, the LanceDB
table, bm25s). Then `--queries` queries (three words of a random chunk) run through the index as the RAG hook
does (Index.search: BM25 top-k and the LanceDB rows) and through a brute-force scan over the same chunks: every
chunk's term ids in one flat array, scored per query by a full pass (isin + bincount, the same BM25 formula),
no inverted index. The two must agree on the top score. With --dense D: random unit vectors of dimension D,
LanceDB vector search (exact, IVF-PQ from index.ann_min_rows) vs a numpy matmul over all vectors.
Results go to bench/results/index_bench-<time>.json; the last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

RESULTS = ROOT / "bench" / "results"
WORDS_PER_SENTENCE = (6, 14)
SENTENCES_PER_DOC = 12
VOCAB = 30_000


# ---------------------------------------------------------------- synthetic documents
def pseudo_words(n: int, rng: np.random.Generator) -> np.ndarray:
    syllables = np.array([c + v for c in "bdfgklmnprstvz" for v in ("a", "e", "i", "o", "u", "ai", "ou")])
    parts = rng.integers(0, len(syllables), size=(n, 3))
    lengths = rng.integers(1, 4, size=n)
    words = ["".join(syllables[p[:k]]) for p, k in zip(parts, lengths)]
    return np.array(list(dict.fromkeys(words)))


def documents(n_docs: int, seed: int) -> list[str]:
    """Documents of SENTENCES_PER_DOC sentences over a Zipf(1.1) vocabulary (word frequencies like real text)."""
    words = pseudo_words(VOCAB, np.random.default_rng(0))  # one vocabulary for every scale (and the tokenizer)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_docs):
        lengths = rng.integers(*WORDS_PER_SENTENCE, size=SENTENCES_PER_DOC)
        ids = np.minimum(rng.zipf(1.1, size=int(lengths.sum())) - 1, len(words) - 1)
        toks, pos, sents = words[ids], 0, []
        for k in lengths:
            sents.append(" ".join(toks[pos : pos + k]).capitalize() + ".")
            pos += k
        out.append(" ".join(sents))
    return out


def tokenizer_folder(folder: Path, sample: list[str]) -> Path:
    """A byte-level BPE (vocab 4096) trained on `sample`, saved where preprocess leaves the pipeline's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(sample, trainers.BpeTrainer(vocab_size=4096, show_progress=False))
    (folder / "tokenizer").mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer" / "tokenizer.json"))
    return folder


# ---------------------------------------------------------------- brute force
class BruteForce:
    """BM25 by a full scan: chunk term ids in one flat array; per query, every term occurrence is visited."""

    def __init__(self, texts: list[str], k1: float = 1.5, b: float = 0.75) -> None:
        from components.retrieval import lexical

        tokenized = lexical.tokenize(texts, ids=True)
        self.vocab = tokenized.vocab
        lengths = np.array([len(t) for t in tokenized.ids], dtype=np.int64)
        self.flat = np.concatenate([np.asarray(t, dtype=np.int32) for t in tokenized.ids])
        self.owner = np.repeat(np.arange(len(texts), dtype=np.int32), lengths)
        self.norm = k1 * (1 - b + b * lengths / lengths.mean())
        self.n, self.k1, self.texts = len(texts), k1, texts

    def search(self, query: str, k: int) -> list[tuple[int, float]]:
        from components.retrieval import lexical

        terms = [self.vocab[t] for t in lexical.tokenize([query], ids=False)[0] if t in self.vocab]
        scores = np.zeros(self.n)
        for term in terms:  # a repeated query word counts twice, as in bm25s
            tf = np.bincount(self.owner[self.flat == term], minlength=self.n).astype(np.float64)
            df = np.count_nonzero(tf)
            idf = np.log(1 + (self.n - df + 0.5) / (df + 0.5))
            scores += idf * tf / (tf + self.norm)
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.argsort(-scores[top], kind="stable")]
        _ = [self.texts[i] for i in top]  # the rows, as the index returns them
        return [(int(i), float(scores[i])) for i in top if scores[i] > 0]


# ---------------------------------------------------------------- one scale (child process)
def _percentiles(seconds: list[float]) -> dict[str, float]:
    ms = sorted(s * 1000 for s in seconds)
    return {"p50_ms": statistics.median(ms), "p95_ms": ms[min(len(ms) - 1, int(0.95 * len(ms)))]}


def _queries(texts: list[str], n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    out = []
    for i in rng.integers(0, len(texts), size=n):
        words = texts[i].rstrip(".").split()
        out.append(" ".join(rng.choice(words, size=min(3, len(words)), replace=False)))
    return out


def _lexical(folder: Path, texts: list[str], queries: list[str], k: int) -> dict[str, Any]:
    from components.retrieval.search import Index

    index = Index(folder)
    index.search(queries[0], k)  # warm: memory maps, LanceDB handles
    t0 = time.perf_counter()
    brute = BruteForce(texts)
    brute_build = time.perf_counter() - t0
    timed: dict[str, list[float]] = {"index": [], "brute": []}
    agree = 0
    for q in queries:
        t = time.perf_counter()
        hits = index.search(q, k)
        timed["index"].append(time.perf_counter() - t)
        t = time.perf_counter()
        scan = brute.search(q, k)
        timed["brute"].append(time.perf_counter() - t)
        agree += bool(hits and scan and abs(hits[0].score - scan[0][1]) <= 1e-3 * max(1.0, scan[0][1]))
    return {
        "query_bm25": _percentiles(timed["index"]),
        "query_brute_force": _percentiles(timed["brute"]),
        "brute_force_build_s": brute_build,
        "top_score_agreement": agree / len(queries),
    }


def _dense(folder: Path, n: int, dim: int, queries: int, k: int, ann_min_rows: int) -> dict[str, Any]:
    from components.retrieval import store

    rng = np.random.default_rng(1)
    vecs = rng.standard_normal((n, dim), dtype=np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    cols = {c: [""] * n for c in ("text", "source", "location", "doc_hash", "hash")} | {"tokens": [0] * n}
    t0 = time.perf_counter()
    table = store.write(folder, cols, vecs, ann_min_rows)
    build = time.perf_counter() - t0
    qs = rng.standard_normal((queries, dim), dtype=np.float32)
    qs /= np.linalg.norm(qs, axis=1, keepdims=True)
    timed: dict[str, list[float]] = {"lancedb": [], "numpy": []}
    recall = 0.0
    for q in qs:
        t = time.perf_counter()
        got = {i for i, _ in store.vector_search(table, q, k)}
        timed["lancedb"].append(time.perf_counter() - t)
        t = time.perf_counter()
        exact = set(np.argpartition(-(vecs @ q), k - 1)[:k].tolist())
        timed["numpy"].append(time.perf_counter() - t)
        recall += len(got & exact) / k
    return {
        "dim": dim,
        "ann": n >= ann_min_rows,
        "build_s": build,
        "query_lancedb": _percentiles(timed["lancedb"]),
        "query_numpy_brute_force": _percentiles(timed["numpy"]),
        "recall_at_k_vs_exact": recall / len(qs),
    }


def one_scale(chunks: int, args: dict[str, Any]) -> dict[str, Any]:
    """Build and query an index of about `chunks` chunks (runs in its own process)."""
    import bm25s  # noqa: F401 - imported before the build is timed
    import lancedb  # noqa: F401
    import Stemmer  # noqa: F401

    from components.core.data_config import IndexConfig, SyntheticConfig
    from components.retrieval.build import build_index, load_tokenizer
    from components.retrieval.chunking import Document, chunk_documents
    from components.retrieval.store import open_table

    tmp = Path(tempfile.mkdtemp(prefix="seedlm-index-bench-"))
    cfg = IndexConfig(sources=[{"path": "docs.txt"}], include_pretrain=False, ann_min_rows=args["ann_min_rows"])
    sample = documents(200, seed=0)
    tokenizer_folder(tmp / "processed", sample)
    per_doc = len(
        list(
            chunk_documents(
                [Document(d, "", "") for d in sample],
                load_tokenizer(tmp / "processed"),
                cfg.chunk_tokens,
                cfg.overlap_tokens,
            )
        )
    ) / len(sample)
    (tmp / "sources").mkdir()
    docs = documents(max(1, round(chunks / per_doc)), seed=chunks)
    (tmp / "sources" / "docs.txt").write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    del docs
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    res = build_index(
        cfg,
        raw_dir=tmp / "raw",
        processed_dir=tmp / "processed",
        out_dir=tmp / "index",
        world=SyntheticConfig(),
        seed=0,
        sources_root=tmp / "sources",
        downloads_dir=tmp / "dl",
        cache_dir=tmp / "c",
    )
    texts = open_table(tmp / "index").to_arrow().column("text").to_pylist()
    out = {
        "chunks": res["chunks"],
        "text_mb": res["bytes"] / 2**20,
        "build_s": res["seconds"],
        "build_mb_per_s": res["mb_per_s"],
        **_lexical(tmp / "index", texts, _queries(texts, args["queries"], chunks), cfg.top_k),
    }
    if args["dense"]:
        out["dense"] = _dense(tmp / "dense", len(texts), args["dense"], args["queries"], 10, cfg.ann_min_rows)
    out["rss_before_build_mb"] = rss_before
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def _child(chunks: int, args: dict[str, Any], queue: Any) -> None:
    try:
        queue.put(one_scale(chunks, args))
    except BaseException as e:  # noqa: BLE001 - reported by the parent
        queue.put({"error": f"{type(e).__name__}: {e}"})


def run_scale(chunks: int, args: dict[str, Any]) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(chunks, args, queue))
    t0 = time.perf_counter()
    proc.start()
    out = queue.get()
    proc.join()
    return {**out, "wall_s": time.perf_counter() - t0}


# ---------------------------------------------------------------- report
def line(n: int, r: dict[str, Any]) -> str:
    if "error" in r:
        return f"{n:>9,} chunks: failed: {r['error']}"
    q, b = r["query_bm25"], r["query_brute_force"]
    speedup = b["p50_ms"] / max(q["p50_ms"], 1e-9)
    return (
        f"{r['chunks']:>9,} chunks {r['text_mb']:7.1f} MB: build {r['build_mb_per_s']:5.2f} MB/s "
        f"({r['build_s']:6.1f} s), query p50/p95 {q['p50_ms']:6.2f}/{q['p95_ms']:6.2f} ms vs brute force "
        f"{b['p50_ms']:7.1f}/{b['p95_ms']:7.1f} ms ({speedup:5.0f}x), peak RSS {r['peak_rss_mb']:6.0f} MB, "
        f"top-score agreement {r['top_score_agreement']:.2f}"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scales", default="10000,100000,1000000", help="chunk counts, comma-separated")
    ap.add_argument("--queries", type=int, default=200, help="queries per scale")
    ap.add_argument("--dense", type=int, default=0, metavar="DIM", help="also time dense search with DIM-d vectors")
    ap.add_argument("--ann-min-rows", type=int, default=100_000, help="IVF-PQ from this many vectors on")
    ap.add_argument("--results", type=Path, default=RESULTS, help="folder of saved runs")
    args = ap.parse_args(argv)
    opts = {"queries": args.queries, "dense": args.dense, "ann_min_rows": args.ann_min_rows}
    scales = [int(s) for s in args.scales.split(",") if s.strip()]
    print(f"seedlm index bench: scales {scales}, {args.queries} queries each, {os.cpu_count()} CPUs", file=sys.stderr)
    results = {}
    for n in scales:
        results[str(n)] = run_scale(n, opts)
        print(line(n, results[str(n)]), file=sys.stderr)
    summary = {
        "bench": "index",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "cpus": os.cpu_count(),
        "load_avg": os.getloadavg()[0],
        "scales": results,
    }
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"index_bench-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
