"""Pretraining text at scale (components/data/corpus.py, shards.py, dedup.py): the fixed-size de-dup filters
decide as a set would, pieces and workers never change the outputs, the tokenizer learns from a bounded
sample, and document-length statistics from a histogram equal numpy's."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from test_preprocess import BASE_DOCS, corpus, decode_bin, qa_rows, run, write_raw

from components.core.context import StageError
from components.data import corpus as pretrain_text
from components.data import dedup, shards

OUTPUTS = ("train.bin", "val.bin", "tokenizer/tokenizer.json")


def outputs(out):
    return {f: (out / f).read_bytes() for f in OUTPUTS}


# ---------------------------------------------------------------- the filters
def test_add_new_decides_as_a_set_in_order():
    rng = np.random.default_rng(0)
    f, seen = dedup.SeenFilter(1), set()
    for _ in range(20):
        keys = rng.integers(0, 3000, 400).astype(np.uint64)  # repeats within and across batches
        want = []
        for k in keys.tolist():
            want.append(k not in seen)
            seen.add(k)
        assert f.add_new(keys).tolist() == want


def test_add_unmatched_decides_as_documents_one_by_one():
    rng = np.random.default_rng(1)
    f, taken = dedup.SeenFilter(1), set()
    for _ in range(10):
        keys = rng.integers(0, 2000, (300, 4)).astype(np.uint64)
        want = []
        for row in keys.tolist():
            want.append(taken.isdisjoint(row))
            taken |= set(row) if want[-1] else set()
        assert f.add_unmatched(keys).tolist() == want


def test_false_positive_rate_is_stated_and_memory_fixed():
    rng = np.random.default_rng(2)
    f = dedup.SeenFilter(0.25)  # 32768 words
    assert f.words.nbytes == 2**18
    f.add(rng.integers(0, 2**63, 120_000, dtype=np.uint64))
    fresh = rng.integers(0, 2**63, 200_000, dtype=np.uint64)
    measured, stated = f.contains(fresh).mean(), f.false_positive_rate()
    assert 0.001 < stated < 0.1 and abs(measured - stated) < 0.15 * stated
    assert f.words.nbytes == 2**18


def test_length_stats_equal_numpy():
    rng = np.random.default_rng(3)
    for n in (1, 2, 7, 100, 5001):
        x = rng.integers(0, 50 if n > 50 else 5000, n)
        got = pretrain_text.length_stats(Counter(x.tolist()))
        want = {"mean": x.mean(), "p50": np.percentile(x, 50), "p95": np.percentile(x, 95), "max": x.max()}
        assert got == {k: float(v) if k != "max" else int(v) for k, v in want.items()}, n


# ---------------------------------------------------------------- pieces and samples
def test_pieces_are_whole_lines_covering_each_shard(tmp_path):
    raw = write_raw(tmp_path, corpus(300), qa_rows(5), shards=3)
    files = sorted((raw / "pretrain").glob("*.jsonl"))
    got = shards.pieces(files, 2000)
    assert [p.index for p in got] == list(range(len(got))) and len(got) > 6
    for f in files:
        data, mine = f.read_bytes(), [p for p in got if p.shard == str(f)]
        assert mine[0].start == 0 and mine[-1].end == len(data)
        assert all(a.end == b.start for a, b in zip(mine, mine[1:]))
        assert all(data[p.end - 1 : p.end] == b"\n" for p in mine)


@pytest.fixture(scope="module")
def grown(tmp_path_factory):
    """A corpus with exact duplicates across shards; processed in one piece as the reference."""
    root = tmp_path_factory.mktemp("grown")
    docs = BASE_DOCS + corpus(200, seed=5) + BASE_DOCS[:40]
    raw = write_raw(root, docs, qa_rows(30), shards=3)
    out, res = run(root, raw, "one_piece", vocab_size=300)
    return root, raw, out, res


def test_small_pieces_give_the_same_bytes(grown):
    root, raw, out, res = grown
    small, res2 = run(root, raw, "small_pieces", vocab_size=300, chunk_mb=0.004)
    assert outputs(small) == outputs(out) and res2["report"] == res["report"]
    assert res["report"]["pretrain"]["dropped"] == {"duplicate": 40}


def test_tokenizer_learns_from_a_bounded_sample(grown):
    root, raw, out, res = grown
    _, res2 = run(root, raw, "sampled", vocab_size=300, tokenizer_sample_mb=0.01)
    t, p = res2["report"]["tokenizer"], res2["report"]["pretrain"]
    assert 0 < t["sample_docs"] < p["train_docs"] and t["sample_mb"] < 0.05
    assert res["report"]["tokenizer"]["sample_docs"] == p["train_docs"]  # the default covered everything
    assert sorted(decode_bin(root / "sampled", "train")) == sorted(decode_bin(out, "train"))


def test_a_bad_line_in_a_later_piece_names_its_shard_line(tmp_path):
    raw = write_raw(tmp_path, corpus(200), qa_rows(10), shards=1)
    shard = raw / "pretrain" / "shard-00000.jsonl"
    lines = shard.read_text().splitlines()
    lines[150] = json.dumps({"body": "no text key"})
    shard.write_text("\n".join(lines) + "\n")
    with pytest.raises(StageError, match=r'shard-00000.jsonl:151: expected \{"text": str\}; run `dvc repro ingest`'):
        run(tmp_path, raw, vocab_size=300, chunk_mb=0.002)


# ---------------------------------------------------------------- parallel and distributed
def test_two_worker_processes_give_the_same_bytes(grown):
    root, raw, out, res = grown
    par, res2 = run(root, raw, "two_workers", vocab_size=300, chunk_mb=0.004, workers=2)
    assert outputs(par) == outputs(out) and res2["report"] == res["report"]


def test_near_dedup_in_parallel_decides_as_in_one_process(grown):
    root, raw, _, _ = grown
    one, res1 = run(root, raw, "near_one", vocab_size=300, dedup="near")
    par, res2 = run(root, raw, "near_two", vocab_size=300, dedup="near", chunk_mb=0.004, workers=2)
    assert outputs(par) == outputs(one) and res2["report"] == res1["report"]


def test_dask_cluster_of_two_workers_gives_the_same_bytes(grown):
    """preprocess.engine: dask on a local cluster of 2 workers (dask.distributed, one task per piece)."""
    root, raw, out, res = grown
    dask, res2 = run(root, raw, "dask", vocab_size=300, chunk_mb=0.004, workers=2, engine="dask")
    assert outputs(dask) == outputs(out) and res2["report"] == res["report"]
