"""The index stage on a tiny world with a real LanceDB store: what it writes, retrieval quality, your own files,
dense and hybrid retrieval with a tiny encoder, incremental re-embedding."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from _retrieval_fixtures import WORLD, answer_in, build, make_encoder

from components.core.config import parse_params
from components.core.io import read_json
from components.core.params import ConfigError
from components.data.updates import cutoff_questions
from components.retrieval import store
from components.retrieval.build import QUESTIONS
from components.retrieval.chunking import sha256_text
from components.retrieval.context import build_context, sources
from components.retrieval.search import Index, open_index, retrieve


def test_the_index_folder_holds_store_bm25_manifest_questions_and_meta(default_index):
    out, result = default_index
    assert {p.name for p in out.iterdir()} == {"store", "bm25", "manifest.json", QUESTIONS, "seedlm.json"}
    meta = read_json(out / "seedlm.json")
    assert meta["stage"] == "index" and meta["result"]["retrieval"] == "bm25"
    rows = store.open_table(out).to_arrow().to_pylist()
    assert len(rows) == result["chunks"] and [r["id"] for r in rows] == list(range(len(rows)))
    for r in rows:
        assert r["hash"] == sha256_text(r["text"]) and r["source"] and r["location"] and r["tokens"] > 0
    assert len({r["hash"] for r in rows}) == len(rows)  # de-duplicated
    sources_ = {e["source"]: e for e in read_json(out / "manifest.json")}
    assert set(sources_) == {"ingest:synthetic", "synthetic:news"}
    news = [r for r in rows if r["source"] == "synthetic:news"]
    assert sources_["synthetic:news"]["docs"] == round(WORLD.updates * WORLD.entities)
    assert len(news) == sources_["synthetic:news"]["chunks"] >= sources_["synthetic:news"]["docs"]
    assert result["corpus_chunks"] == len(rows) - len(news)  # the corpus first, then index.sources
    assert [json.loads(x) for x in (out / QUESTIONS).read_text().splitlines()] == cutoff_questions(WORLD, 5)


def test_retrieval_finds_the_news_and_the_old_facts(default_index):
    """recall@k on the tiny world's knowledge-cutoff questions: the news of each change, and a chunk stating
    each unchanged fact."""
    out, _ = default_index
    questions = cutoff_questions(WORLD, 5)
    assert {q["kind"] for q in questions} == {"updated", "unchanged"}
    for kind in ("updated", "unchanged"):
        items = [q for q in questions if q["kind"] == kind]
        hits = [retrieve(out, q["question"], 5) for q in items]
        recall = sum(any(answer_in(h.text, q) for h in hs) for q, hs in zip(items, hits)) / len(items)
        assert recall >= 0.9, (kind, recall)
    updated = [q for q in questions if q["kind"] == "updated"]
    first = [retrieve(out, q["question"], 1)[0] for q in updated]
    assert all(h.source == "synthetic:news" and answer_in(h.text, q) for h, q in zip(first, updated))


def test_context_fits_the_budget_and_keeps_the_sources(default_index, world):
    from transformers import AutoTokenizer

    from components.retrieval.build import load_tokenizer

    out, _ = default_index
    tok = AutoTokenizer.from_pretrained(str(world["processed"] / "tokenizer"))
    q = next(q for q in cutoff_questions(WORLD, 5) if q["kind"] == "updated")
    hits = retrieve(out, q["question"])
    assert len(hits) == 5 and [h.rank for h in hits] == [1, 2, 3, 4, 5]
    for budget in (40, 90, 400):
        content, used = build_context(q["question"], hits, tok, budget)
        prompt = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        ids = prompt["input_ids"] if hasattr(prompt, "keys") else prompt
        assert len(ids) <= budget or not used
        assert content.endswith(f"Question: {q['question']}") == bool(used)
        assert all(f"[{i}] {h.text}" in content for i, h in enumerate(used, 1))
    assert len(used) == 5  # a large budget takes them all
    shown = sources(used)
    assert shown[0]["n"] == 1 and {"source", "location", "hash", "text", "score"} <= set(shown[0])
    assert load_tokenizer(world["processed"]) is not None


def test_your_own_files_with_locations_and_no_pretraining_corpus(world, tmp_path):
    notes = world["sources"] / "notes"
    notes.mkdir(exist_ok=True)
    (notes / "a.txt").write_text("Quorin moved to Lakeholm last spring.\n\nThe ferry now stops at Lakeholm.\n")
    (notes / "b.jsonl").write_text(json.dumps({"body": "Quorin plays the cello at the inn."}) + "\n")
    (notes / "skip.bin").write_bytes(b"\x00\x01")
    res = build(world, tmp_path / "ix", include_pretrain=False, sources=[{"path": "notes", "text_field": "body"}])
    assert res["chunks"] == 3 and res["corpus_chunks"] == 0
    hits = retrieve(tmp_path / "ix", "Where did Quorin move?", 3)
    assert hits[0].text == "Quorin moved to Lakeholm last spring."
    assert hits[0].source == "notes" and hits[0].location.endswith("a.txt:1, chars 0-37")
    cello = retrieve(tmp_path / "ix", "cello", 1)[0]
    assert cello.location.endswith("b.jsonl:1, chars 0-34")
    assert not (tmp_path / "ix" / QUESTIONS).exists()  # no synthetic source: no cutoff questions


def test_a_rebuild_is_picked_up_by_open_index(world, tmp_path):
    (world["sources"] / "one.txt").write_text("Mirabel keeps bees.\n")
    build(world, tmp_path / "ix", include_pretrain=False, sources=[{"path": "one.txt"}])
    first = open_index(tmp_path / "ix")
    assert open_index(tmp_path / "ix") is first
    (world["sources"] / "one.txt").write_text("Mirabel keeps bees.\n\nMirabel sells honey.\n")
    res = build(world, tmp_path / "ix", include_pretrain=False, sources=[{"path": "one.txt"}])
    assert res["sources_changed"] == 1 and res["chunks"] == 2
    assert open_index(tmp_path / "ix") is not first
    assert retrieve(tmp_path / "ix", "honey")[0].text == "Mirabel sells honey."


@pytest.fixture(scope="module")
def encoder(world, tmp_path_factory):
    from components.retrieval.documents import ingested

    texts = [d.text for d in ingested(world["raw"])] + ["Quorin moved to Lakeholm.", "bees honey cello"]
    return make_encoder(tmp_path_factory.mktemp("enc") / "tiny-encoder", texts)


def test_hybrid_retrieval_with_a_local_encoder_reembeds_only_what_changed(world, encoder, tmp_path):
    cache = tmp_path / "cache"
    (world["sources"] / "hy.txt").write_text("Quorin moved to Lakeholm.\n")
    kw = {"embedding_model": str(encoder), "sources": [{"synthetic": True}, {"path": "hy.txt"}]}
    first = build(world, tmp_path / "a", cache, **kw)
    assert first["retrieval"] == "hybrid" and first["embedded"] == first["chunks"] > 0
    assert len(store.open_table(tmp_path / "a").to_arrow().column("vector")[0]) == 32
    again = build(world, tmp_path / "b", cache, **kw)
    assert again["embedded"] == 0 and again["embeddings_reused"] == first["chunks"]
    (world["sources"] / "hy.txt").write_text("Quorin moved to Lakeholm.\n\nQuorin now sells honey in Lakeholm.\n")
    third = build(world, tmp_path / "c", cache, **kw)
    assert third["embedded"] == 1 and third["chunks"] == first["chunks"] + 1
    index = Index(tmp_path / "c")
    hits = index.search("Who sells honey in Lakeholm?", 3)
    assert hits[0].text == "Quorin now sells honey in Lakeholm."  # BM25 leads; the fused list is well-formed
    assert len({h.id for h in hits}) == 3


def test_dense_only_retrieval(world, encoder, tmp_path):
    res = build(world, tmp_path / "d", tmp_path / "cache", embedding_model=str(encoder), retrieval="dense")
    assert res["retrieval"] == "dense" and not (tmp_path / "d" / "bm25").exists()
    hits = Index(tmp_path / "d").search("Where does anyone live?", 4)
    assert len(hits) == 4 and all(-1.0 <= h.score <= 1.0 for h in hits)


@pytest.mark.parametrize(
    "settings,message",
    [
        ({"overlap_tokens": 40, "chunk_tokens": 40}, "overlap_tokens (40) must be below chunk_tokens (40)"),
        ({"retrieval": "dense"}, "retrieval: dense needs embedding_model"),
        ({"sources": [], "include_pretrain": False}, "nothing to index"),
        ({"chunk_token": 3}, "did you mean 'chunk_tokens'"),
    ],
)
def test_bad_index_settings_name_the_key(settings, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_params({"index": settings})


def test_the_same_documents_give_the_same_index_in_any_process(world, tmp_path):
    """Byte-identical BM25 files, manifest and questions, and equal LanceDB rows, whatever PYTHONHASHSEED (bm25s
    numbers terms in set order; the index numbers them in sorted order). LanceDB's own file names are random."""
    code = (
        "import json, sys; from pathlib import Path; import _retrieval_fixtures as f; "
        "a = json.loads(sys.argv[1]); f.build({k: Path(v) for k, v in a['world'].items()}, Path(a['out']))"
    )
    here = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(here), str(here.parent), str(here.parents[1])])}
    outs = [tmp_path / f"ix-{seed}" for seed in ("1", "2")]
    for out in outs:
        arg = json.dumps({"world": {k: str(v) for k, v in world.items()}, "out": str(out)})
        subprocess.run([sys.executable, "-c", code, arg], check=True, env={**env, "PYTHONHASHSEED": out.name[-1]})
    files = [_files(out) for out in outs]
    assert files[0] == files[1] and "bm25/vocab.index.json" in files[0] and "manifest.json" in files[0]
    assert store.open_table(outs[0]).to_arrow() == store.open_table(outs[1]).to_arrow()
    assert len({read_json(out / "seedlm.json")["result"]["content_sha256"] for out in outs}) == 1


def _files(folder: Path) -> dict[str, str]:
    """sha256 of every file but LanceDB's (random names) and seedlm.json (run times)."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.relative_to(folder).parts[0] != "store" and p.name != "seedlm.json"
    }
