"""Bad input to the index stage: one clear error naming the source (and the fix), and nothing half-written: the
previous index stays as it was, with no temp folders beside it."""

from __future__ import annotations

import gzip
import json

import pytest
from _retrieval_fixtures import build

from components.core.context import StageError
from components.core.io import sha256_dir
from components.retrieval.search import retrieve

BAD = {
    "missing": ({"path": "nope.txt"}, None, ["index.sources[1]", "nope.txt: no such file or folder", "fix `path:`"]),
    "binary": ({"path": "bin.txt"}, b"abc\x00\x01\x02", ["bin.txt: looks binary"]),
    "empty": ({"path": "empty.txt"}, b"", ["empty.txt: the file is empty"]),
    "not gzip": ({"path": "fake.txt.gz"}, b"plain text", ["fake.txt.gz: named .gz but not gzip"]),
    "bad json": ({"path": "rows.jsonl"}, b'{"text": "ok"}\n{"text": oops}\n', ["rows.jsonl:2", "not valid JSON"]),
    "no field": ({"path": "f.jsonl"}, b'{"body": "x"}\n', ["f.jsonl:1", "field 'text' missing", "text_field"]),
    "type": ({"path": "t.pdf"}, b"%PDF", ["t.pdf: unsupported file type"]),
    "not utf8": ({"path": "latin.txt"}, "caf\xe9\n".encode("latin-1"), ["latin.txt:1: not valid UTF-8"]),
    "url offline": (
        {"url": "http://127.0.0.1:9/corpus.txt", "sha256": "0" * 64},
        None,
        ["127.0.0.1:9/corpus.txt: could not download"],
    ),
}


@pytest.fixture(scope="module")
def previous(world, tmp_path_factory):
    """An index built before the bad input arrives (include_pretrain off: seconds)."""
    (world["sources"] / "good.txt").write_text("Ravel grows pears by the mill.\n")
    out = tmp_path_factory.mktemp("prev") / "index"
    build(world, out, include_pretrain=False, sources=[{"path": "good.txt"}])
    return out


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_source_is_named_and_the_previous_index_stays(world, previous, case):
    src, content, needles = BAD[case]
    if content is not None:
        (world["sources"] / src["path"]).write_bytes(content)
    before = sha256_dir(previous)
    with pytest.raises(StageError) as e:
        build(world, previous, include_pretrain=False, sources=[{"path": "good.txt"}, src])
    for needle in needles:
        assert needle in str(e.value)
    assert sha256_dir(previous) == before
    assert [p.name for p in previous.parent.iterdir()] == ["index"]  # no temp siblings left
    assert retrieve(previous, "pears")[0].text == "Ravel grows pears by the mill."


def test_skip_malformed_skips_bad_rows_and_keeps_the_rest(world, tmp_path):
    rows = [{"text": "Ondra sails at dawn."}, "not an object", {"other": 1}, {"text": "Ondra fishes for eels."}]
    with gzip.open(world["sources"] / "mixed.jsonl.gz", "wt") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    sources = [{"path": "mixed.jsonl.gz"}]
    res = build(world, tmp_path / "ix", include_pretrain=False, sources=sources, skip_malformed=True)
    assert res["chunks"] == 2
    with pytest.raises(StageError, match=r"mixed.jsonl.gz:2: .*index.skip_malformed"):
        build(world, tmp_path / "ix2", include_pretrain=False, sources=[{"path": "mixed.jsonl.gz"}])
    assert not (tmp_path / "ix2").exists()


def test_missing_upstream_outputs_say_which_stage_to_run(world, tmp_path):
    no_tok = {**world, "processed": tmp_path / "nothing"}
    with pytest.raises(StageError, match=r"tokenizer: missing .*dvc repro preprocess"):
        build(no_tok, tmp_path / "a")
    no_raw = {**world, "raw": tmp_path / "nothing"}
    with pytest.raises(StageError, match=r"no ingest output .*dvc repro ingest"):
        build(no_raw, tmp_path / "b")
    with pytest.raises(StageError, match=r"index.embedding_model: .* not an encoder folder"):
        build(world, tmp_path / "c", embedding_model=str(tmp_path))
    assert not any(tmp_path.glob("[abc]"))
