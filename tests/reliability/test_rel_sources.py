"""Bad sources through `python -m components.ingest` (its runner, in process): one clear error naming the
file (and line) and the fix, exit 2, no partial output, the MLflow run FAILED (not RUNNING), no registry
version. Then urls, unreadable files, multi-MB lines, a corpus too small to train on, and a fuzz of
ingest with arbitrary bytes (hypothesis): it either succeeds or raises StageError, nothing else."""

from __future__ import annotations

import base64
import gzip
import http.server
import io
import json
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import _harness as h
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from components.core.context import StageError
from components.core.data_config import IngestConfig
from components.ingest import ingest

SECRET = "s3cretpw-R3L"


def jsonl(objs) -> bytes:
    return "".join(json.dumps(o) + "\n" for o in objs).encode()


def parquet(columns: dict) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.table(columns), buf)
    return buf.getvalue()


def msgs(*pairs) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in pairs]}


BAD = {  # name: (kind, file name, content, expected parts of the message besides the file name)
    "empty": ("pretrain", "e.txt", b"", ["the file is empty"]),
    "binary": ("pretrain", "b.txt", bytes(range(256)) * 4, ["looks binary", "UTF-8 text or parquet"]),
    "non_utf8": ("pretrain", "l.txt", "fine\ncaf\xe9\n".encode("latin-1"), [":2:", "not valid UTF-8", "iconv"]),
    "gz_not_gzip": ("pretrain", "n.txt.gz", b"plain text", ["named .gz but not gzip data"]),
    "gz_truncated": (
        "pretrain",
        "t.jsonl.gz",
        gzip.compress(jsonl([{"text": str(i) * 50} for i in range(400)]))[:700],
        ["corrupt gzip"],
    ),
    "csv_no_column": (
        "pretrain",
        "c.csv",
        b"id,body\n1,hello\n",
        ["no column 'text'", "columns found: id, body", "text_field"],
    ),
    "parquet_no_column": ("pretrain", "p.parquet", parquet({"body": ["x"]}), ["no column 'text'", "body"]),
    "parquet_garbage": ("pretrain", "g.parquet", b"PAR1" + os.urandom(64), ["not a readable parquet file"]),
    "jsonl_malformed": (
        "pretrain",
        "j.jsonl",
        b'{"text": "ok"}\n{"text": "no end\n',
        [":2:", "not valid JSON", "skip_malformed"],
    ),
    "jsonl_not_object": ("sft", "o.jsonl", b"[1, 2]\n", [":1:", "expected a JSON object"]),
    "jsonl_deep": ("pretrain", "d.jsonl", b"[" * 100_000 + b"\n", [":1:", "nested too deeply"]),
    "jsonl_lone_surrogate": ("pretrain", "s.jsonl", b'{"text": "abc \\ud800 def"}\n', [":1:", "lone surrogate"]),
    "jsonl_text_not_string": ("pretrain", "n.jsonl", b'{"text": NaN}\n', [":1:", "'text' missing or not text"]),
    "alpaca_no_output": (
        "sft",
        "a.jsonl",
        jsonl([{"instruction": "q", "output": "a"}, {"instruction": "q"}]),
        [":2:", "missing or empty 'output'"],
    ),
    "alpaca_output_not_text": ("sft", "a.jsonl", jsonl([{"instruction": "q", "output": 3}]), [":1:", "'output'"]),
    "chat_unknown_role": (
        "sft",
        "r.jsonl",
        jsonl([msgs(("user", "q"), ("bot", "a"))]),
        [":1:", "messages[1]: role 'bot' is not one of system, user, assistant"],
    ),
    "chat_empty_content": (
        "sft",
        "r.jsonl",
        jsonl([msgs(("user", "q"), ("assistant", "  "))]),
        [":1:", "messages[1]: content must be a non-empty string"],
    ),
    "chat_no_assistant": (
        "sft",
        "r.jsonl",
        jsonl([msgs(("system", "s"), ("user", "q"))]),
        [":1:", "no assistant turn"],
    ),
    "chat_bad_split": (
        "sft",
        "r.jsonl",
        jsonl([{**msgs(("user", "q"), ("assistant", "a")), "split": "dev"}]),
        [":1:", "split must be train/val/test/null"],
    ),
    "sft_csv_columns": ("sft", "q.csv", b"question,answer\nq,a\n", ["no column 'instruction', 'output'"]),
    "txt_as_sft": ("sft", "s.txt", b"some text\n", ["unsupported file type for sft sources"]),
    "pickle": ("pretrain", "model.pkl", b"\x80\x04\x95", ["unsupported file type"]),
    "tar_archive": ("pretrain", "corpus.tar", b"x", ["unsupported file type"]),
    "only_blank_lines": ("pretrain", "blank.txt", b"\n \n\t\n", ["yielded no pretrain rows"]),
}


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return h.make_repo(tmp_path_factory.mktemp("sources") / "repo", git=False)


def sources(kind: str, spec: list[dict]) -> list[str]:
    other = "sft" if kind == "pretrain" else "pretrain"
    return ["-S", f"ingest.{kind}_sources={json.dumps(spec)}", "-S", f"ingest.{other}_sources=[{{synthetic: true}}]"]


def expect_clean_failure(repo: Path, rc: int, err: str, parts: list[str]) -> None:
    assert rc == 2, err
    lines = [x for x in err.splitlines() if x.startswith("seedlm ingest: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for part in parts:
        assert part in lines[0], (part, err)
    assert not (repo / "data/raw").exists() and h.leftovers(repo) == []
    statuses = [s for name, s in h.runs(repo / "mlflow.db") if name == "ingest"]
    assert statuses and statuses[-1] == "FAILED", statuses  # this run was opened, and closed as FAILED
    h.assert_clean_failure(repo / "mlflow.db")


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_source(repo, capsys, tmp_path, name):
    kind, fname, content, parts = BAD[name]
    f = tmp_path / fname
    f.write_bytes(content)
    rc, err = h.cli(capsys, repo, "ingest", *sources(kind, [{"path": str(f)}]), "-S", "ingest.max_line_mb=1")
    expect_clean_failure(repo, rc, err, [str(f), *parts])


def test_missing_path(repo, capsys):
    rc, err = h.cli(capsys, repo, "ingest", *sources("pretrain", [{"path": "corpus/nope.txt"}]))
    expect_clean_failure(repo, rc, err, ["corpus/nope.txt: no such file or folder", "put your files under"])


def test_symlink_out_of_a_source_folder_is_refused(repo, capsys, tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text("a document of text\n")
    secret = tmp_path / "id_rsa"
    secret.write_text("PRIVATE KEY\n")
    (folder / "b.txt").symlink_to(secret)
    rc, err = h.cli(capsys, repo, "ingest", *sources("pretrain", [{"path": str(folder)}]))
    expect_clean_failure(repo, rc, err, ["b.txt: a symlink to", "outside the source folder"])


def _unreadable_msg(err: str, f: Path) -> None:
    assert f"{f}: cannot read it (Permission denied)" in err and "chmod" in err, err


def test_unreadable_file_simulated(repo, capsys, tmp_path, monkeypatch):
    """EACCES on open (what chmod 000 gives a non-root user), injected so it runs as root too."""
    import builtins

    f = tmp_path / "locked.txt"
    f.write_text("text\n")
    real = builtins.open

    def guarded(path, *a, **kw):
        if str(path) == str(f):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *a, **kw)

    monkeypatch.setattr(builtins, "open", guarded)
    rc, err = h.cli(capsys, repo, "ingest", *sources("pretrain", [{"path": str(f)}]))
    monkeypatch.undo()
    expect_clean_failure(repo, rc, err, [])
    _unreadable_msg(err, f)


def test_unreadable_file_for_real(repo, tmp_path):
    """chmod 000 in a real process; as root (which ignores permissions) through setpriv without the
    capabilities that override them."""
    f = tmp_path / "locked.txt"
    f.write_text("text\n")
    f.chmod(0)
    cmd = [str(h.BIN / "python"), "-m", "components.ingest", "--no-progress", *sources("pretrain", [{"path": str(f)}])]
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip(
                "running as root (permissions are not enforced) and setpriv is not available to drop "
                "CAP_DAC_OVERRIDE; test_unreadable_file_simulated covers the code path"
            )
        cmd = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", *cmd]
    res = subprocess.run(cmd, cwd=repo, env=h.env(repo), capture_output=True, text=True, timeout=120)
    if os.geteuid() == 0 and "Operation not permitted" in res.stderr and "setpriv" in res.stderr:
        pytest.skip(f"setpriv cannot drop capabilities here: {res.stderr.strip()[:200]}")
    assert res.returncode == 2, res.stderr[-3000:]
    _unreadable_msg(res.stderr, f)
    assert not (repo / "data/raw").exists()
    h.assert_clean_failure(repo / "mlflow.db")


def test_multi_megabyte_lines(repo, capsys, tmp_path):
    """A 3 MiB line is refused above max_line_mb (naming line and size), skipped with skip_malformed,
    and read whole when the limit allows it."""
    f = tmp_path / "big.jsonl"
    f.write_bytes(jsonl([{"text": "short one"}, {"text": "y" * (3 * 2**20)}, {"text": "after it"}]))
    rc, err = h.cli(capsys, repo, "ingest", *sources("pretrain", [{"path": str(f)}]), "-S", "ingest.max_line_mb=2")
    expect_clean_failure(repo, rc, err, [f"{f}:2:", "3.00 MiB is above max_line_mb (2)"])
    rc, err = h.cli(
        capsys,
        repo,
        "ingest",
        *sources("pretrain", [{"path": str(f)}]),
        "-S",
        "ingest.max_line_mb=2",
        "-S",
        "ingest.skip_malformed=true",
    )
    assert rc == 0, err
    man = h.read(repo / "data/raw/manifest.json")["pretrain"][0]
    assert (man["rows"], man["skipped"]) == (2, 1)
    rc, err = h.cli(capsys, repo, "ingest", *sources("pretrain", [{"path": str(f)}]), "-S", "ingest.max_line_mb=4")
    assert rc == 0, err
    lines = (repo / "data/raw/pretrain/shard-00000.jsonl").read_text().splitlines()
    assert [len(json.loads(x)["text"]) for x in lines] == [9, 3 * 2**20, 8]
    shutil.rmtree(repo / "data/raw")


def test_corpus_too_small_for_the_context(repo, capsys, tmp_path):
    """Two short documents: ingest and preprocess succeed, pretrain refuses with the numbers and the fix."""
    f = tmp_path / "tiny.txt"
    f.write_text("One short document here.\n\nAnother short one.\n")
    args = [*sources("pretrain", [{"path": str(f)}]), "-S", "model.context_length=256", "-S", "model.n_embd=32"]
    for stage in ("ingest", "preprocess"):
        rc, err = h.cli(capsys, repo, stage, *args)
        assert rc == 0, err
    rc, err = h.cli(capsys, repo, "pretrain", *args)
    assert rc == 2 and "Traceback" not in err, err
    assert "train.bin" in err and "fewer than model.context_length + 1 (257)" in err, err
    assert "lower model.context_length or add text" in err
    assert not (repo / "models/pretrain").exists() and not (repo / "metrics/pretrain.json").exists()
    assert [s for n, s in h.runs(repo / "mlflow.db") if n == "pretrain"] == ["FAILED"]
    for p in ("data/raw", "data/processed", "metrics"):
        shutil.rmtree(repo / p)


# ---------------------------------------------------------------- urls
class _Handler(http.server.BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}

    def log_message(self, *a) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        parts = self.path.split("/")
        if parts[1] == "status":
            self.send_response(int(parts[2]))
            self.end_headers()
        elif parts[1] == "huge":  # announces 10 GiB, sends nothing: must be refused from the header alone
            self.send_response(200)
            self.send_header("Content-Length", str(10 * 2**30))
            self.end_headers()
        elif (
            parts[1] == "auth"
            and self.headers.get("Authorization") != "Basic " + base64.b64encode(f"alice:{SECRET}".encode()).decode()
        ):
            self.send_response(401)
            self.end_headers()
        else:
            body = self.files.get(parts[-1])
            self.send_response(200 if body is not None else 404)
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")


@pytest.fixture(scope="module")
def server():
    os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def test_url_failures_are_clear_and_leave_nothing(repo, capsys, server):
    body = b"a document\n\nanother document\n"
    _Handler.files["c.txt"] = body
    good = _sha(body)
    cases = [
        (f"{server}/status/404/c.txt", good, ["HTTP 404", "check the url"]),
        (f"{server}/status/500/c.txt", good, ["HTTP 500"]),
        (f"{server}/huge/c.txt", good, ["10240.0 MiB is larger than max_download_mb (1)"]),
        ("http://127.0.0.1:9/c.txt", good, ["could not download", "use a `path:` source"]),
        (f"{server}/files/c.txt", "0" * 64, ["sha256 mismatch", good, "fix `sha256:`"]),
        (f"{server}/files/c.pdf", good, ["cannot tell the file type from the url"]),
        (f"http://alice:{SECRET}@{server.split('//')[1]}/status/500/c.txt", good, ["http://***@127.0.0.1", "HTTP 500"]),
        (
            f"http://{{env:SEEDLM_NOT_SET}}@{server.split('//')[1]}/files/c.txt",
            good,
            ["environment variable SEEDLM_NOT_SET is not set"],
        ),
    ]
    for url, sha, parts in cases:
        rc, err = h.cli(
            capsys,
            repo,
            "ingest",
            *sources("pretrain", [{"url": url, "sha256": sha}]),
            "-S",
            "ingest.max_download_mb=1",
        )
        expect_clean_failure(repo, rc, err, parts)
        assert SECRET not in err
        downloads = repo / ".seedlm/downloads"
        assert not downloads.exists() or [p for p in downloads.rglob("*") if p.is_file()] == []


def test_url_with_credentials_downloads_and_never_shows_them(repo, capsys, server):
    body = b"a protected document\n\nand a second one\n"
    _Handler.files["p.txt"] = body
    url = f"http://alice:{SECRET}@{server.split('//')[1]}/auth/p.txt"
    rc, err = h.cli(capsys, repo, "ingest", *sources("pretrain", [{"url": url, "sha256": _sha(body)}]))
    assert rc == 0, err
    assert SECRET not in err
    raw = repo / "data/raw"
    for p in raw.rglob("*"):
        if p.is_file():
            assert SECRET.encode() not in p.read_bytes(), p
    assert h.read(raw / "manifest.json")["pretrain"][0]["origin"].startswith("http://***@127.0.0.1")
    assert SECRET.encode() not in (repo / "mlflow.db").read_bytes()  # params and tags of the run
    shutil.rmtree(raw)


# ---------------------------------------------------------------- fuzz
NAMES = ["a.txt", "a.md", "a.jsonl", "a.csv", "a.parquet", "a.txt.gz", "a.jsonl.gz", "a.csv.gz"]
KEYS = ["text", "instruction", "input", "output", "messages", "role", "content", "split", "task"]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.sampled_from(KEYS), c, max_size=4),
    max_leaves=10,
)
contents = st.one_of(
    st.binary(max_size=300),
    st.lists(json_values.map(json.dumps), max_size=5).map(lambda rows: "\n".join(rows).encode()),
    st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.lists(st.lists(st.text(max_size=8), min_size=1, max_size=3), max_size=4).map(
        lambda rows: "\n".join(",".join(r) for r in [["text", "instruction", "output"], *rows]).encode()
    ),
)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    name=st.sampled_from(NAMES),
    kind=st.sampled_from(["pretrain", "sft"]),
    data=contents,
    gz=st.booleans(),
    skip=st.booleans(),
)
def test_fuzz_any_bytes_give_rows_or_a_stage_error(name, kind, data, gz, skip):
    d = Path(tempfile.mkdtemp())
    try:
        (d / name).write_bytes(gzip.compress(data) if name.endswith(".gz") and gz else data)
        src = [{"path": str(d / name)}]
        cfg = IngestConfig(
            pretrain_sources=src if kind == "pretrain" else [{"synthetic": True}],
            sft_sources=src if kind == "sft" else [{"synthetic": True}],
            skip_malformed=skip,
            synthetic={"entities": 4, "paraphrases": 1},
        )
        try:
            res = ingest(cfg, d / "out", seed=1, sources_root=d, cache_dir=d / "cache")
        except StageError as e:
            assert str(d / name) in str(e) or "a." in str(e), str(e)
            assert not (d / "out").exists() and h.leftovers(d) == []
        else:
            shards = sorted((d / "out" / kind).glob("shard-*.jsonl"))
            n = sum(1 for s in shards for _ in s.read_text(encoding="utf-8").splitlines())
            assert n == res[f"{kind}_rows"] and n > 0
    finally:
        shutil.rmtree(d)
