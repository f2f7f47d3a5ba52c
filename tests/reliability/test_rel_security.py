"""Security: only safetensors weights, torch.load only with weights_only=True, no unsafe deserialization
anywhere in the code; ingestion writes nowhere but its folders and downloads only http(s), within size
limits; credentials (in urls, or secret environment variables) never reach MLflow, outputs or logs."""

from __future__ import annotations

import ast
import http.server
import json
import os
import threading
from pathlib import Path

import _harness as h
import pytest

from components.core.redact import REDACTED, redact

SOURCES = sorted([*h.ROOT.glob("components/**/*.py"), *h.ROOT.glob("flows/*.py"), *h.ROOT.glob("bench/**/*.py")])


def _calls(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func), {k.arg: k.value for k in node.keywords if k.arg}


def _true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def test_torch_load_is_always_weights_only():
    found, bad = 0, []
    for path in SOURCES:
        for node, name, kw in _calls(path):
            if name in ("torch.load", "load") and (name == "torch.load" or "weights_only" in kw):
                found += 1
                if not _true(kw.get("weights_only")):
                    bad.append(f"{path.relative_to(h.ROOT)}:{node.lineno}")
    assert bad == [] and found >= 1, bad  # there is at least the checkpoint loader


UNSAFE = {
    "pickle.load",
    "pickle.loads",
    "cloudpickle.load",
    "cloudpickle.loads",
    "dill.load",
    "dill.loads",
    "joblib.load",
    "pd.read_pickle",
    "pandas.read_pickle",
    "marshal.loads",
    "shelve.open",
    "eval",
    "exec",
    "yaml.unsafe_load",
    "yaml.full_load",
}


def test_no_unsafe_deserialization_or_remote_code():
    bad = []
    for path in SOURCES:
        where = lambda n, path=path: f"{path.relative_to(h.ROOT)}:{n.lineno} {ast.unparse(n)[:80]}"
        for node, name, kw in _calls(path):
            if name in UNSAFE:
                bad.append(where(node))
            if (
                _true(kw.get("trust_remote_code"))
                or _true(kw.get("allow_pickle"))
                or (isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is False)
                or (isinstance(kw.get("use_safetensors"), ast.Constant) and kw["use_safetensors"].value is False)
            ):
                bad.append(where(node))
            if name == "yaml.load" and not ast.unparse(kw.get("Loader", ast.Constant(""))).endswith(
                ("SafeLoader", "CSafeLoader", "_StrictLoader")
            ):
                bad.append(where(node))
    assert bad == [], bad
    import yaml

    from components.core.params import _StrictLoader

    assert issubclass(_StrictLoader, yaml.SafeLoader)


def test_model_loading_paths_report():
    """Where a model folder is loaded without use_safetensors=True (report; transformers then loads .bin files
    through torch.load(weights_only=True), so no pickle code runs — the pickle tests of test_rel_models prove
    the stages refuse such folders before that)."""
    loose = [
        f"{p.relative_to(h.ROOT)}:{n.lineno}"
        for p in SOURCES
        for n, name, kw in _calls(p)
        if name.endswith("from_pretrained")
        and "Tokenizer" not in name
        and "Config" not in name
        and not _true(kw.get("use_safetensors"))
    ]
    print("\nfrom_pretrained without use_safetensors=True: " + (", ".join(loose) or "none"))
    import inspect

    from transformers import modeling_utils

    assert inspect.signature(modeling_utils.load_state_dict).parameters["weights_only"].default is True


# ---------------------------------------------------------------- ingestion stays in its folders
class _Tricky(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        if self.path.startswith("/redirect-file"):
            self.send_response(302)
            self.send_header("Location", "file:///etc/passwd")
            self.end_headers()
        elif self.path.startswith("/loop"):
            self.send_response(302)
            self.send_header("Location", self.path)
            self.end_headers()
        elif self.path.startswith("/chunked"):  # no Content-Length: the limit must hold while streaming
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for _ in range(3):
                block = b"z" * (1 << 20)
                self.wfile.write(f"{len(block):x}\r\n".encode() + block + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
        else:
            body = b"doc one\n\ndoc two\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Tricky)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def _everything(root: Path) -> set[str]:
    return {str(p) for p in root.rglob("*")}


def test_ingestion_writes_only_into_its_folders(tmp_path, server, monkeypatch):
    import hashlib
    import io
    import tarfile
    import zipfile

    from components.core.context import StageError
    from components.core.data_config import IngestConfig
    from components.ingest import ingest

    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    src = tmp_path / "sources"
    src.mkdir()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("../../evil.txt")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"evil"))
    (src / "corpus.tar").write_bytes(buf.getvalue())
    with zipfile.ZipFile(src / "corpus.zip", "w") as z:
        z.writestr("/tmp/evil-abs.txt", "evil")
    body = b"doc one\n\ndoc two\n"
    sha = hashlib.sha256(body).hexdigest()
    repo = tmp_path / "repo"
    repo.mkdir()
    before = _everything(tmp_path)
    cases = [
        ([{"path": str(src / "corpus.tar")}], "unsupported file type"),
        ([{"path": str(src / "corpus.zip")}], "unsupported file type"),
        ([{"url": f"{server}/a/..", "sha256": sha}], "cannot tell the file type"),
        ([{"url": f"{server}/redirect-file/c.txt", "sha256": sha}], "could not download"),
        ([{"url": f"{server}/loop/c.txt", "sha256": sha}], "could not download"),
        ([{"url": f"{server}/chunked/c.txt", "sha256": sha}], "larger than max_download_mb (2)"),
    ]
    for sources, expect in cases:
        cfg = IngestConfig(pretrain_sources=sources, sft_sources=[{"synthetic": True}], max_download_mb=2)
        with pytest.raises(StageError, match=expect.replace("(", r"\(").replace(")", r"\)")):
            ingest(cfg, repo / "data/raw", seed=0, sources_root=src, cache_dir=repo / ".seedlm/downloads")
    for name in ("%2e%2e%2f%2e%2e%2fescaped.txt", "a/../../../up.txt"):
        cfg = IngestConfig(
            pretrain_sources=[{"url": f"{server}/{name}", "sha256": sha}],
            sft_sources=[{"synthetic": True}],
            synthetic={"entities": 4, "paraphrases": 1},
        )
        ingest(cfg, repo / "data/raw", seed=0, sources_root=src, cache_dir=repo / ".seedlm/downloads")
    new = _everything(tmp_path) - before
    outside = sorted(
        p
        for p in new
        if not p.startswith((str(repo / "data/raw"), str(repo / ".seedlm/downloads")))
        and p not in (str(repo / "data"), str(repo / ".seedlm"))
    )
    assert outside == [], outside
    assert not any("evil" in p for p in _everything(tmp_path) - before)
    assert not Path("/tmp/evil-abs.txt").exists()
    downloads = sorted(p.name for p in (repo / ".seedlm/downloads").rglob("*") if p.is_file())
    assert downloads == ["%2e%2e%2f%2e%2e%2fescaped.txt", "up.txt"]


# ---------------------------------------------------------------- credentials
def test_redact_hides_every_form_of_credential(monkeypatch):
    monkeypatch.setenv("SEEDLM_API_TOKEN", "tok_0123456789abcdef")
    monkeypatch.setenv("SOME_PASSWORD", "hunter2hunter2")
    monkeypatch.setenv("SEEDLM_PLAIN", "not-a-secret-value")
    text = (
        "https://alice:pw0rd@host/x?token=abc&sig=zz&page=2 https://ghp_abc@github.com/r "
        "auth tok_0123456789abcdef and hunter2hunter2; not-a-secret-value"
    )
    out = redact({"a": [text], "n": 3})
    s = out["a"][0]
    for secret in ("pw0rd", "alice", "token=abc", "sig=zz", "ghp_abc", "tok_0123456789abcdef", "hunter2hunter2"):
        assert secret not in s, (secret, s)
    assert "page=2" in s and "not-a-secret-value" in s and out["n"] == 3
    assert s.count(REDACTED) == 6


def test_no_credentials_reach_mlflow_outputs_or_logs(tmp_path, server, capsys, monkeypatch):
    """A url with credentials in params.yaml, and a token from the environment: the stage's MLflow params,
    tags and artifacts, its output and its logs show neither."""
    token = "tok_" + os.urandom(8).hex()
    monkeypatch.setenv("CORPUS_TOKEN", token)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    repo = h.make_repo(tmp_path / "repo", git=False)
    sha = __import__("hashlib").sha256(b"doc one\n\ndoc two\n").hexdigest()
    host = server.split("//")[1]
    sources = [
        {"url": f"http://alice:Pa55word-lit@{host}/a.txt", "sha256": sha},
        {"url": f"http://{host}/b.txt?token={{env:CORPUS_TOKEN}}", "sha256": sha},
    ]
    rc, err = h.cli(capsys, repo, "ingest", "-S", f"ingest.pretrain_sources={json.dumps(sources)}")
    assert rc == 0, err
    for secret in ("Pa55word-lit", token):
        assert secret not in err
        for p in repo.rglob("*"):
            if p.is_file() and p.name != "params.yaml":
                assert secret.encode() not in p.read_bytes(), (secret, p)
    assert h.read(repo / "data/raw/manifest.json")["pretrain"][0]["origin"] == f"http://***@{host}/a.txt"


def _params_with(url: str):
    from components.core.config import parse_params

    return parse_params({"ingest": {"pretrain_sources": [{"url": url, "sha256": "0" * 64}]}})


def test_register_tags_and_artifacts_carry_no_url_credentials():
    from components import register

    params = _params_with("https://alice:Pa55word-lit@example.org/c.txt")
    data = register._params_data(params, {}, params.register)
    tag = register._params_tag(params, data)
    assert "example.org/c.txt" in tag  # the params are in the tag
    if "Pa55word-lit" in tag:
        raise h.KnownBug("register's params tag holds the url password")


def test_register_run_link_carries_no_tracking_credentials(monkeypatch):
    from types import SimpleNamespace

    import mlflow

    from components.registry import publish

    monkeypatch.setattr(mlflow, "get_tracking_uri", lambda: "https://bob:Tr4ck1ng-pw@mlflow.example.org")
    run = SimpleNamespace(info=SimpleNamespace(experiment_id="1", run_id="abc"))
    link = publish.run_link(run)
    assert "mlflow.example.org" in link and "abc" in link
    if "Tr4ck1ng-pw" in link:
        raise h.KnownBug(f"version description link holds the tracking password: {link}")
