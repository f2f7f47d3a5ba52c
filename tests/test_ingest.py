"""Ingest on real files: every type, normalization, manifest, sharding, every bad input, url and hf."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from components.core.config import Params
from components.core.context import StageContext, StageError
from components.core.data_config import IngestConfig, SyntheticConfig
from components.core.io import read_json
from components.data import synthetic
from components.data.chat import with_context
from components.ingest import ingest, run

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

DOCS = ["First document.\nIt has two lines.", "Second document — with ünïcode ✓.", "Third one."]
SMALL = {"synthetic": {"entities": 4, "paraphrases": 1}}


def cfg(pre=None, sft=None, **kw) -> IngestConfig:
    return IngestConfig(
        pretrain_sources=pre or [{"synthetic": True}], sft_sources=sft or [{"synthetic": True}], **{**SMALL, **kw}
    )


def do(root: Path, c: IngestConfig, out: Path | None = None) -> dict:
    return ingest(
        c, out or root / "raw", seed=0, sources_root=root, cache_dir=root / "cache", ctx=StageContext(progress=False)
    )


def rows(out: Path, kind: str) -> list[dict]:
    return [
        json.loads(line)
        for f in sorted((out / kind).glob("shard-*.jsonl"))
        for line in f.read_text(encoding="utf-8").splitlines()
    ]


def texts(out: Path) -> list[str]:
    return [r["text"] for r in rows(out, "pretrain")]


def write(path: Path, data: str | bytes, gz: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def jsonl(objs) -> str:
    return "".join(json.dumps(o, ensure_ascii=False) + "\n" for o in objs)


def csv_text(header: list[str], table: list[list[str]]) -> str:
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(table)
    return buf.getvalue()


def parquet_bytes(columns: dict) -> bytes:
    with tempfile.TemporaryDirectory() as d:
        pq.write_table(pa.table(columns), f"{d}/t.parquet")
        return Path(f"{d}/t.parquet").read_bytes()


# ---------------------------------------------------------------- good inputs
def test_default_synthetic_sources(tmp_path):
    c = cfg()
    res = do(tmp_path, c)
    out = tmp_path / "raw"
    w = synthetic.world(c.synthetic, 0)
    n_sft = len(list(synthetic.instruction_rows(c.synthetic, 0)))  # QA rows + rows answered from a passage
    assert res["pretrain_rows"] == 4 and res["sft_rows"] == n_sft >= 2 * 4 * len(w["attributes"])
    assert res["skipped"] == 0 and res["sources"] == 2 and res["pretrain_bytes"] > 100
    assert rows(out, "pretrain") == list(synthetic.pretrain_documents(c.synthetic, 0))
    assert rows(out, "sft") == list(synthetic.instruction_rows(c.synthetic, 0))
    man = read_json(out / "manifest.json")
    entry = man["sft"][0]
    assert entry["origin"] == "synthetic" and entry["kind"] == "synthetic" and entry["rows"] == res["sft_rows"]
    assert entry["sha256"] == hashlib.sha256((out / "sft/shard-00000.jsonl").read_bytes()).hexdigest()
    meta = read_json(out / "seedlm.json")
    assert meta["stage"] == "ingest" and meta["result"]["sft_rows"] == res["sft_rows"]
    assert meta["config"]["ingest"]["synthetic"]["entities"] == 4
    first = (out / "sft/shard-00000.jsonl").read_bytes()
    do(tmp_path, c)  # rerun: identical output, previous folder replaced
    assert (out / "sft/shard-00000.jsonl").read_bytes() == first
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".raw")] == []


TEXT = "\n\n".join(DOCS) + "\n"


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("ext", ["txt", "md", "jsonl", "csv", "parquet"])
def test_each_file_type(tmp_path, ext, gz):
    content = {
        "txt": TEXT,
        "md": TEXT,
        "jsonl": jsonl({"body": d, "x": 1} for d in DOCS),
        "csv": csv_text(["id", "body"], [[str(i), d] for i, d in enumerate(DOCS)]),
        "parquet": parquet_bytes({"body": DOCS, "n": [1, 2, 3]}),
    }[ext]
    f = write(tmp_path / (f"corpus.{ext}" + (".gz" if gz else "")), content, gz)
    res = do(tmp_path, cfg([{"path": str(f), "text_field": "body"}]))
    assert texts(tmp_path / "raw") == DOCS
    entry = read_json(tmp_path / "raw/manifest.json")["pretrain"][0]
    assert entry == {
        "origin": str(f),
        "kind": "path",
        "sha256": hashlib.sha256(f.read_bytes()).hexdigest(),
        "rows": 3,
        "bytes": f.stat().st_size,
        "skipped": 0,
        "files": 1,
        "skipped_files": 0,
    }
    assert res["pretrain_bytes"] == sum(len(d.encode()) for d in DOCS)


def test_text_blocks_crlf_bom_and_whitespace_lines(tmp_path):
    f = write(tmp_path / "a.txt", "\ufeffOne\r\n  indented two\r\n \t \r\n\r\n\r\nThree\n\n\n")
    do(tmp_path, cfg([{"path": str(f)}]))
    assert texts(tmp_path / "raw") == ["One\n  indented two", "Three"]


def test_folder_recursion_sorted_hidden_and_other_types(tmp_path):
    src = tmp_path / "corpus"
    write(src / "b.txt", "B doc")
    write(src / "a" / "z.jsonl", jsonl([{"text": "AZ doc"}]))
    write(src / "a" / "deep" / "c.md.gz", "C doc\n\nC2 doc", gz=True)
    write(src / "notes.pdf", b"%PDF")
    write(src / "data.txt.dvc", "outs: []")
    write(src / ".hidden.txt", "hidden")
    write(src / ".git" / "x.txt", "hidden")
    do(tmp_path, cfg([{"path": "corpus"}]))  # relative: resolved under sources_root
    assert texts(tmp_path / "raw") == ["C doc", "C2 doc", "AZ doc", "B doc"]
    e1 = read_json(tmp_path / "raw/manifest.json")["pretrain"][0]
    assert e1["files"] == 3 and e1["skipped_files"] == 2 and e1["rows"] == 4
    assert e1["bytes"] == sum((src / p).stat().st_size for p in ("b.txt", "a/z.jsonl", "a/deep/c.md.gz"))
    write(src / "b.txt", "B doc changed")
    do(tmp_path, cfg([{"path": "corpus"}]))
    e2 = read_json(tmp_path / "raw/manifest.json")["pretrain"][0]
    assert e2["sha256"] != e1["sha256"] and len(e2["sha256"]) == 64


def test_alpaca_and_chat_normalization(tmp_path):
    f = write(
        tmp_path / "sft.jsonl",
        jsonl(
            [
                {"instruction": "Add.", "input": "2+2", "output": "4"},
                {"instruction": "Greet.", "input": "", "output": "Hello."},
                {"instruction": "Greet.", "output": "Hi.", "split": "test", "task": "greet"},
                {
                    "messages": [
                        {"role": "system", "content": "Be brief."},
                        {"role": "user", "content": "Hi"},
                        {"role": "assistant", "content": "Hey"},
                        {"role": "user", "content": "Bye"},
                        {"role": "assistant", "content": "Ciao"},
                    ],
                    "split": "val",
                    "task": "chat",
                    "extra": 1,
                },
            ]
        ),
    )
    c = write(
        tmp_path / "sft.csv", csv_text(["instruction", "input", "output"], [["Say x", "", "x"], ["Echo", "y", "y"]])
    )
    p = write(
        tmp_path / "sft.parquet",
        parquet_bytes({"messages": [[{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]]}),
    )
    res = do(tmp_path, cfg(sft=[{"path": str(f)}, {"path": str(c)}, {"path": str(p)}]))
    got = rows(tmp_path / "raw", "sft")
    U = lambda s: {"role": "user", "content": s}  # noqa: E731
    A = lambda s: {"role": "assistant", "content": s}  # noqa: E731
    assert got == [
        {"messages": [U(with_context("Add.", ["2+2"])), A("4")], "split": None, "task": None},
        {"messages": [U("Greet."), A("Hello.")], "split": None, "task": None},
        {"messages": [U("Greet."), A("Hi.")], "split": "test", "task": "greet"},
        {
            "messages": [{"role": "system", "content": "Be brief."}, U("Hi"), A("Hey"), U("Bye"), A("Ciao")],
            "split": "val",
            "task": "chat",
        },
        {"messages": [U("Say x"), A("x")], "split": None, "task": None},
        {"messages": [U(with_context("Echo", ["y"])), A("y")], "split": None, "task": None},
        {"messages": [U("Q"), A("A")], "split": None, "task": None},
    ]
    assert res["sft_rows"] == 7
    assert [e["rows"] for e in read_json(tmp_path / "raw/manifest.json")["sft"]] == [4, 2, 1]


def test_sharding(tmp_path):
    f = write(tmp_path / "c.jsonl", jsonl({"text": f"doc {i}"} for i in range(10)))
    res = do(tmp_path, cfg([{"path": str(f)}, {"path": str(f)}], shard_rows=3))
    names = sorted(p.name for p in (tmp_path / "raw/pretrain").iterdir())
    assert names == [f"shard-{i:05d}.jsonl" for i in range(7)]
    sizes = [len((tmp_path / "raw/pretrain" / n).read_text().splitlines()) for n in names]
    assert sizes == [3, 3, 3, 3, 3, 3, 2] and res["pretrain_rows"] == 20
    assert texts(tmp_path / "raw") == [f"doc {i}" for i in range(10)] * 2
    n_sft = len(list(synthetic.instruction_rows(cfg().synthetic, 0)))
    assert len(list((tmp_path / "raw/sft").iterdir())) == -(-n_sft // 3)  # the synthetic rows, 3 per shard


# ---------------------------------------------------------------- bad inputs
LONG = "x" * 3000
BAD = {  # name: (kind, file name, content, expected substrings besides the file name)
    "empty": ("pretrain", "e.txt", b"", ["empty"]),
    "binary": ("pretrain", "b.txt", b"abc\x00\x01\x02" * 10, ["binary", "NUL"]),
    "latin1": (
        "pretrain",
        "l.txt",
        "ok line\nfine\ncaf\xe9 au lait\n".encode("latin-1"),
        [":3:", "UTF-8", "byte offset 16", "re-encode"],
    ),
    "not_gzip": ("pretrain", "n.txt.gz", b"plain text, not gzip", ["not gzip"]),
    "empty_gzip": ("pretrain", "eg.jsonl.gz", gzip.compress(b""), ["empty"]),
    "truncated_gzip": (
        "pretrain",
        "t.txt.gz",
        gzip.compress("\n".join(map(str, range(9000))).encode())[:9000],
        ["corrupt gzip"],
    ),
    "csv_column": ("pretrain", "c.csv", "id,content\n1,hello\n", ["'text'", "columns found: id, content"]),
    "parquet_column": ("pretrain", "p.parquet", parquet_bytes({"body": ["x"]}), ["'text'", "columns found: body"]),
    "not_parquet": ("pretrain", "np.parquet", b"PAR1 garbage", ["parquet"]),
    "jsonl_field": ("pretrain", "f.jsonl", '{"text": "ok"}\n{"body": "no text"}\n', [":2:", "'text'", "body"]),
    "bad_json": ("pretrain", "j.jsonl", '{"text": "ok"}\n\n{"text": oops}\n', [":3:", "not valid JSON"]),
    "not_object": ("sft", "o.jsonl", "[1, 2]\n", [":1:", "JSON object"]),
    "no_output": (
        "sft",
        "a.jsonl",
        jsonl([{"instruction": "Hi", "output": "Yo"}, {"instruction": "Hi"}]),
        [":2:", "'output'"],
    ),
    "empty_instruction": ("sft", "a.jsonl", jsonl([{"instruction": " ", "output": "x"}]), [":1:", "'instruction'"]),
    "alpaca_csv_empty": ("sft", "a.csv", "instruction,output\nq,\n", [":2:", "'output'"]),
    "sft_csv_columns": ("sft", "q.csv", "question,answer\nq,a\n", ["'instruction', 'output'", "question, answer"]),
    "csv_field_count": ("pretrain", "fc.csv", "id,text\n1,ok\n2,a,b\n", [":3:", "3 fields"]),
    "unknown_role": ("sft", "r.jsonl", jsonl([{"messages": [{"role": "bot", "content": "x"}]}]), [":1:", "'bot'"]),
    "empty_content": (
        "sft",
        "r.jsonl",
        jsonl([{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}]),
        [":1:", "messages[1]", "non-empty string"],
    ),
    "nonstring_content": (
        "sft",
        "r.jsonl",
        jsonl([{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]}]),
        [":1:", "messages[0]"],
    ),
    "no_assistant": (
        "sft",
        "r.jsonl",
        jsonl([{"messages": [{"role": "user", "content": "q"}]}]),
        [":1:", "no assistant"],
    ),
    "sft_no_fields": ("sft", "r.jsonl", jsonl([{"prompt": "q", "completion": "a"}]), [":1:", "prompt, completion"]),
    "long_line": ("pretrain", "big.jsonl", jsonl([{"text": "ok"}, {"text": LONG}]), [":2:", "max_line_mb"]),
    "long_csv_row": ("pretrain", "big.csv", f"text\nok\n{LONG}\n", [":3:", "max_line_mb"]),
    "long_parquet_row": ("pretrain", "big.parquet", parquet_bytes({"text": ["ok", LONG]}), ["row 2", "max_line_mb"]),
    "unknown_ext": ("pretrain", "c.docx", "text", ["unsupported file type"]),
    "txt_for_sft": ("sft", "s.txt", "text", ["unsupported file type"]),
    "no_rows": ("pretrain", "blank.txt", "\n  \n\n", ["no pretrain rows"]),
}


def _bad_cfg(kind: str, f: Path, **kw) -> IngestConfig:
    src = [{"path": str(f)}]
    return cfg(src, None, max_line_mb=0.002, **kw) if kind == "pretrain" else cfg(None, src, max_line_mb=0.002, **kw)


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_input_fails_naming_file_and_line(tmp_path, name):
    kind, fname, content, expect = BAD[name]
    f = write(tmp_path / "src" / fname, content)
    out = tmp_path / "out" / "raw"
    with pytest.raises(StageError) as err:
        do(tmp_path, _bad_cfg(kind, f), out)
    msg = str(err.value)
    assert str(f) in msg, msg
    for part in expect:
        assert part in msg, (part, msg)
    assert not out.exists() and os.listdir(out.parent) == []  # nothing, not even a temp folder


def test_failure_keeps_previous_output(tmp_path):
    do(tmp_path, cfg())
    before = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "raw").rglob("*") if p.is_file()}
    bad = write(tmp_path / "bad.jsonl", '{"text": "ok"}\nnot json\n')
    with pytest.raises(StageError, match="bad.jsonl:2"):
        do(tmp_path, cfg([{"synthetic": True}, {"path": str(bad)}]))
    after = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "raw").rglob("*") if p.is_file()}
    assert after == before


def test_missing_path(tmp_path):
    with pytest.raises(StageError, match=r"nope/corpus\.txt: no such file or folder.*put your files under"):
        do(tmp_path, cfg([{"path": "nope/corpus.txt"}]))
    assert not (tmp_path / "raw").exists()


def test_folder_without_usable_files(tmp_path):
    write(tmp_path / "d" / "x.pdf", b"%PDF")
    with pytest.raises(StageError, match="folder holds no pretrain files"):
        do(tmp_path, cfg([{"path": str(tmp_path / "d")}]))


def test_skip_malformed_counts_per_source(tmp_path):
    good = [{"text": f"doc {i}"} for i in range(5)]
    lines = jsonl(good[:2]) + "not json\n[1]\n" + jsonl([{"body": "x"}, {"text": 3}, {"text": LONG}]) + jsonl(good[2:])
    f = write(tmp_path / "p.jsonl", lines)
    s = write(
        tmp_path / "s.jsonl",
        jsonl(
            [
                {"instruction": "q", "output": "a"},
                {"instruction": "q"},
                {"messages": [{"role": "user", "content": "q"}]},
            ]
        ),
    )
    res = do(
        tmp_path,
        cfg([{"path": str(f)}, {"synthetic": True}], [{"path": str(s)}], skip_malformed=True, max_line_mb=0.002),
    )
    assert texts(tmp_path / "raw")[:5] == [g["text"] for g in good]
    man = read_json(tmp_path / "raw/manifest.json")
    assert [(e["rows"], e["skipped"]) for e in man["pretrain"]] == [(5, 5), (4, 0)]
    assert [(e["rows"], e["skipped"]) for e in man["sft"]] == [(1, 2)]
    assert res["skipped"] == 7 and res["pretrain_rows"] == 9 and res["sft_rows"] == 1


@pytest.mark.parametrize("name", ["empty", "binary", "latin1", "not_gzip", "csv_column"])
def test_skip_malformed_still_fails_on_bad_files(tmp_path, name):
    kind, fname, content, expect = BAD[name]
    f = write(tmp_path / fname, content)
    with pytest.raises(StageError, match=expect[0].replace(":", r"\:")):
        do(tmp_path, _bad_cfg(kind, f, skip_malformed=True))


def test_all_rows_skipped_fails(tmp_path):
    f = write(tmp_path / "p.jsonl", "nope\nnope\n")
    with pytest.raises(StageError, match=r"no pretrain rows \(2 malformed skipped\)"):
        do(tmp_path, cfg([{"path": str(f)}], skip_malformed=True))


# ---------------------------------------------------------------- url and hf
class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server(tmp_path, monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    root = tmp_path / "www"
    root.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_url_source_checksum_ok_and_cached(tmp_path, server):
    www, base = server
    f = write(www / "corpus.txt.gz", TEXT, gz=True)
    sha = hashlib.sha256(f.read_bytes()).hexdigest()
    res = do(tmp_path, cfg([{"url": f"{base}/corpus.txt.gz", "sha256": sha}]))
    assert res["pretrain_rows"] == 3 and texts(tmp_path / "raw") == DOCS
    entry = read_json(tmp_path / "raw/manifest.json")["pretrain"][0]
    assert entry["origin"] == f"{base}/corpus.txt.gz" and entry["kind"] == "url" and entry["sha256"] == sha
    cached = list((tmp_path / "cache").rglob("*"))
    assert [p.name for p in cached if p.is_file()] == ["corpus.txt.gz"]
    f.unlink()  # served from the cache now
    assert do(tmp_path, cfg([{"url": f"{base}/corpus.txt.gz", "sha256": sha}]))["pretrain_rows"] == 3


def test_url_source_checksum_mismatch(tmp_path, server):
    www, base = server
    f = write(www / "c.jsonl", jsonl([{"text": "a"}]))
    wrong = "0" * 64
    with pytest.raises(StageError) as err:
        do(tmp_path, cfg([{"url": f"{base}/c.jsonl", "sha256": wrong}]))
    msg = str(err.value)
    assert f"{base}/c.jsonl" in msg and wrong in msg and hashlib.sha256(f.read_bytes()).hexdigest() in msg
    assert "sha256:" in msg and not (tmp_path / "raw").exists()
    assert [p for p in (tmp_path / "cache").rglob("*") if p.is_file()] == []  # no partial download left


def test_url_source_errors(tmp_path, server):
    www, base = server
    with pytest.raises(StageError, match="HTTP 404"):
        do(tmp_path, cfg([{"url": f"{base}/missing.txt", "sha256": "0" * 64}]))
    write(www / "big.txt", b"a" * (1024 * 1024 + 10))
    with pytest.raises(StageError, match="max_download_mb"):
        do(tmp_path, cfg([{"url": f"{base}/big.txt", "sha256": "0" * 64}], max_download_mb=1))
    with pytest.raises(StageError, match="could not download"):
        do(tmp_path, cfg([{"url": "http://127.0.0.1:9/x.txt", "sha256": "0" * 64}]))


def test_hf_source_offline_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    t = time.perf_counter()
    with pytest.raises(StageError, match="could not load Hugging Face dataset 'seedlm-test/none'.*offline"):
        do(tmp_path, cfg([{"hf": "seedlm-test/none", "hf_config": "x"}]))
    assert time.perf_counter() - t < 45  # a hang guard (no network retries offline), not a speed claim
    assert not (tmp_path / "raw").exists()


def test_hf_source_streams_rows(tmp_path, monkeypatch):
    import datasets

    calls = []

    def fake_load(name, config=None, split=None, streaming=False):
        calls.append((name, config, split, streaming))
        if name == "broken":
            return (r if i < 2 else 1 / 0 for i, r in enumerate([{"text": "a"}] * 5))
        if name == "chat":
            return iter(
                [
                    {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
                    {"instruction": "i", "output": "o", "split": "test"},
                ]
            )
        return iter([{"text": "doc one", "id": 1}, {"text": "doc two", "id": 2}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    res = do(tmp_path, cfg([{"hf": "corpus", "hf_config": "c1", "split": "validation"}], [{"hf": "chat"}]))
    assert calls == [("corpus", "c1", "validation", True), ("chat", None, "train", True)]
    assert texts(tmp_path / "raw") == ["doc one", "doc two"] and res["sft_rows"] == 2
    assert rows(tmp_path / "raw", "sft")[1]["split"] == "test"
    man = read_json(tmp_path / "raw/manifest.json")
    shard = (tmp_path / "raw/pretrain/shard-00000.jsonl").read_bytes()
    assert man["pretrain"][0] == {
        "origin": "corpus",
        "kind": "hf",
        "sha256": hashlib.sha256(shard).hexdigest(),
        "rows": 2,
        "bytes": len(shard),
        "skipped": 0,
    }
    with pytest.raises(StageError, match="could not load Hugging Face dataset 'broken'.*after 2 rows.*Zero"):
        do(tmp_path, cfg([{"hf": "broken"}]))


# ---------------------------------------------------------------- properties and adapter
_chars = st.characters(codec="utf-8", exclude_characters="\x00")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.text(_chars, min_size=1, max_size=40), min_size=1, max_size=5))
def test_jsonl_roundtrip_any_unicode(docs):
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        f = write(root / "x.jsonl", jsonl({"text": t} for t in docs))
        do(root, cfg([{"path": str(f)}]))
        assert texts(root / "raw") == docs


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.text(st.characters(codec="utf-8", exclude_characters="\x00\n\r\ufeff"), max_size=40).filter(
            lambda t: t.strip()
        ),
        min_size=1,
        max_size=5,
    ),
    st.booleans(),
)
def test_txt_roundtrip_any_unicode(docs, gz):
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        f = write(root / ("x.txt.gz" if gz else "x.txt"), "\n\n".join(docs), gz)
        do(root, cfg([{"path": str(f)}]))
        assert texts(root / "raw") == [t.strip() for t in docs]


def test_run_adapter_uses_params_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "data/sources/mine.txt", TEXT)
    params = Params.model_validate({"seed": 3, "ingest": {"pretrain_sources": [{"path": "mine.txt"}], **SMALL}})
    logged = []
    res = run(params, StageContext(log=lambda m, s=None: logged.append(m), progress=False))
    assert res["pretrain_rows"] == 3 and Path("data/raw/manifest.json").is_file()
    assert res["artifacts"] == [str(Path("data/raw/manifest.json"))]
    assert read_json("data/raw/seedlm.json")["config"]["seed"] == 3
    assert logged and "rows_per_s" in logged[0]
    assert rows(Path("data/raw"), "sft") == list(synthetic.instruction_rows(SyntheticConfig(**SMALL["synthetic"]), 3))
