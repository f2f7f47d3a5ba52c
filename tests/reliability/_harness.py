"""Helpers of the reliability suite (not a test module): a micro seedlm repo (git + DVC), running stages
as `python -m components.<stage>` (subprocess or in-process), and reading what MLflow and the disk hold."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import repos
from repos import BIN, ROOT, commit  # noqa: F401 (the suite uses them as h.<name>)

from components.core.stages import STAGES, TABLE  # noqa: E402,F401 (the suite uses STAGES as h.STAGES)

OUTPUTS = {s.name: s.default_path for s in TABLE}

MICRO = {  # seconds per stage on 2 cores, most of it interpreter start-up
    "ingest.synthetic.entities": 6,
    "ingest.synthetic.paraphrases": 2,
    "preprocess.vocab_size": 300,
    "model.n_layer": 1,
    "model.n_embd": 32,
    "model.n_head": 2,
    "model.context_length": 32,
    "pretrain.max_steps": 24,
    "pretrain.warmup_steps": 2,
    "pretrain.eval_every": 8,
    "pretrain.checkpoint_every": 4,
    "pretrain.batch_size": 4,
    "pretrain.eval_batches": 2,
    "pretrain.precision": "fp32",
    "sft.max_steps": 16,
    "sft.warmup_steps": 1,
    "sft.eval_every": 8,
    "sft.checkpoint_every": 4,
    "sft.batch_size": 4,
    "sft.eval_batches": 2,
    "sft.precision": "fp32",
    "evaluate.bootstrap": 20,
    "evaluate.max_new_tokens": 4,
    "evaluate.max_examples": 8,
    "evaluate.ppl_batches": 2,
    "evaluate.batch_size": 8,
    "evaluate.num_samples": 4,
    "register.gate.min": {"exact_match": 0.0},
    "register.max_new_tokens": 4,
}


def make_repo(dest: Path, overrides: dict[str, Any] | None = None, git: bool = True) -> Path:
    """repos.make_repo with the MICRO settings under `overrides`."""
    return repos.make_repo(dest, {**MICRO, **(overrides or {})}, git=git)


def env(repo: Path | None = None, **extra: str) -> dict[str, str]:
    out = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "DVC_NO_ANALYTICS": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    for key in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "PYTHONPATH"):
        out.pop(key, None)
    if repo is not None:
        out["MLFLOW_TRACKING_URI"] = f"sqlite:///{repo}/mlflow.db"
    out.update(extra)
    return out


def run(
    repo: Path, *args: str, timeout: float = 300, environ: dict[str, str] | None = None, **kw: Any
) -> subprocess.CompletedProcess:
    return subprocess.run(
        list(args), cwd=repo, env=environ or env(repo), capture_output=True, text=True, timeout=timeout, **kw
    )


def stage_cli(repo: Path, stage: str, *args: str, **kw: Any) -> subprocess.CompletedProcess:
    """`python -m components.<stage>` as a user runs it (the repo's own copy of the code)."""
    return run(repo, str(BIN / "python"), "-m", f"components.{stage}", "--no-progress", *args, **kw)


@contextlib.contextmanager
def in_repo(repo: Path, tracking: Path | None = None) -> Iterator[None]:
    """cwd = repo and MLFLOW_TRACKING_URI = a sqlite store (default: the repo's), for in-process stage runs."""
    old_cwd, old_uri = os.getcwd(), os.environ.get("MLFLOW_TRACKING_URI")
    os.chdir(repo)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tracking or repo / 'mlflow.db'}"
    try:
        yield
    finally:
        os.chdir(old_cwd)
        if old_uri is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old_uri


def cli(capsys: Any, repo: Path, stage: str, *args: str, tracking: Path | None = None) -> tuple[int, str]:
    """`components.core.runner.main(stage)` in this process (same code path as the CLI): (exit code, stderr)."""
    from components.core.runner import main

    capsys.readouterr()
    with in_repo(repo, tracking):
        rc = main(stage, ["--no-progress", *args])
    return rc, capsys.readouterr().err


# ---------------------------------------------------------------- what MLflow holds (read with sqlite directly)
def query(db: Path, sql: str) -> list[tuple]:
    if not db.is_file():
        return []
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return con.execute(sql).fetchall()
    except sqlite3.OperationalError as e:
        if "no such table" in str(e):
            return []
        raise
    finally:
        con.close()


def runs(db: Path) -> list[tuple[str, str]]:
    """(run name, status) of every run."""
    return query(db, "select name, status from runs order by start_time")


def versions(db: Path) -> list[tuple[str, int]]:
    """Live versions (MLflow keeps a deleted version's row, marked Deleted_Internal)."""
    return query(
        db, "select name, version from model_versions where current_stage != 'Deleted_Internal' order by version"
    )


def version_tags(db: Path, key: str) -> dict[int, str]:
    return dict(query(db, f"select version, value from model_version_tags where key = '{key}'"))


def aliases(db: Path) -> dict[str, int]:
    return dict(query(db, "select alias, version from registered_model_aliases"))


def assert_clean_failure(db: Path) -> None:
    """After a failed stage: no run left RUNNING, no registry version."""
    assert [r for r in runs(db) if r[1] == "RUNNING"] == [], runs(db)
    assert versions(db) == []


# ---------------------------------------------------------------- what the disk holds
LEFTOVER_MARKS = (".tmp-", ".old-", ".part")


def leftovers(root: Path) -> list[str]:
    """Temp files/folders of interrupted writes anywhere under root (not inside .git/.dvc/.venv)."""
    found = []
    for p in root.rglob(".*"):
        rel = p.relative_to(root).as_posix()
        if rel.split("/")[0] in (".git", ".dvc", ".venv", ".seedlm", ".hypothesis"):
            continue
        if any(m in p.name for m in LEFTOVER_MARKS) or (p.name.startswith(".") and p.name.endswith(".tmp")):
            found.append(rel)
    return sorted(found)


def tree(folder: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under folder."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def read(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def unique(prefix: str = "") -> str:
    return prefix + uuid.uuid4().hex[:8]


# ---------------------------------------------------------------- small file systems
@contextlib.contextmanager
def mounted(kind: str, path: Path, size_kb: int = 64) -> Iterator[bool]:
    """A tiny tmpfs (`full`) or a read-only bind mount of itself (`ro`) at path; yields False where mounting
    is not possible (not root, no CAP_SYS_ADMIN): callers fall back to simulating the error."""
    path.mkdir(parents=True, exist_ok=True)
    if kind == "full":
        cmds = [["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(path)]]
    else:
        cmds = [["mount", "--bind", str(path), str(path)], ["mount", "-o", "remount,bind,ro", str(path)]]
    done = 0
    for c in cmds:
        if shutil.which(c[0]) is None or subprocess.run(c, capture_output=True).returncode != 0:
            break
        done += 1
    ok = done == len(cmds)
    try:
        yield ok
    finally:
        for _ in range(done):
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


# ---------------------------------------------------------------- fault injection inside stage processes
KILL_HOOK = r'''
"""Loaded by every Python process whose PYTHONPATH has this folder: inside `python -m components.<stage>`
it counts file-system writes (open for writing, replace/rename, fsync, unlink, rmtree, mkdir) and either
records them (SEEDLM_TRACE_DIR) or SIGKILLs the process just before write number SEEDLM_KILL_AT (or the first
write to a path containing SEEDLM_KILL_MATCH) of the stage SEEDLM_KILL_STAGE."""
import builtins, io, json, os, shutil, signal, sys

argv = list(getattr(sys, "orig_argv", []))
stage = argv[argv.index("-m") + 1].split(".", 1)[1] if "-m" in argv and argv.index("-m") + 1 < len(argv) \
    and argv[argv.index("-m") + 1].startswith("components.") else None
if stage:
    mine = os.environ.get("SEEDLM_KILL_STAGE") == stage
    at = int(os.environ.get("SEEDLM_KILL_AT", "0")) if mine else 0
    match = os.environ.get("SEEDLM_KILL_MATCH") if mine else None
    trace_dir, count, trace = os.environ.get("SEEDLM_TRACE_DIR"), [0], []
    real = {"open": builtins.open, "os_open": os.open, "replace": os.replace, "rename": os.rename,
            "fsync": os.fsync, "unlink": os.unlink, "remove": os.remove, "mkdir": os.mkdir, "rmtree": shutil.rmtree}

    def event(kind, path):
        count[0] += 1
        if trace_dir:
            trace.append([kind, str(path)])
        if (at and count[0] == at) or (match and match in str(path)):
            fd = real["os_open"](os.environ["SEEDLM_KILL_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            os.write(fd, (json.dumps({"stage": stage, "event": at, "kind": kind, "path": str(path)}) + "\n").encode())
            os.close(fd)
            os.kill(os.getpid(), signal.SIGKILL)

    def wrap(name, kind, writes=lambda *a, **k: True):
        def f(*a, **k):
            if writes(*a, **k):
                event(kind, a[0] if a else "")
            return real[name](*a, **k)
        return f

    def writing(file, mode="r", *a, **k):
        return isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in "wax+")

    builtins.open = io.open = wrap("open", "open", writing)
    os.open = wrap("os_open", "open", lambda p, flags, *a, **k: bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)))
    for n in ("replace", "rename", "fsync", "unlink", "remove", "mkdir"):
        setattr(os, n, wrap(n, n))
    shutil.rmtree = wrap("rmtree", "rmtree")
    if trace_dir:
        import atexit

        def dump():
            with real["open"](os.path.join(trace_dir, stage + ".json"), "w") as f:
                json.dump(trace, f)
        atexit.register(dump)
'''


def install_hook(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(KILL_HOOK)
    return folder


class KnownBug(AssertionError):
    """Raised by a test's final check for a bug owned by another issue; its xfail marker names
    `raises=KnownBug`, so any other failure of that test (its preconditions) still fails the suite."""


# ---------------------------------------------------------------- an MLflow server that can go away
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """`mlflow server` (sqlite backend, proxied artifacts) in its own process group, on a fixed port so a
    restart comes back at the same address with the same store."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.port, self.proc = folder, free_port(), None
        folder.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120) -> MlflowServer:
        import time

        import requests

        e = env(
            MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
            MLFLOW_BACKEND_STORE_URI=f"sqlite:///{self.folder}/mlflow.db",
            MLFLOW_ARTIFACTS_DESTINATION=str(self.folder / "artifacts"),
            MLFLOW_HOST="127.0.0.1",
            MLFLOW_PORT=str(self.port),
            MLFLOW_WORKERS="1",
        )
        log = open(self.folder / "server.log", "ab")
        self.proc = subprocess.Popen(
            [str(BIN / "mlflow"), "server"],
            env=e,
            cwd=self.folder,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.folder / 'server.log').read_text()[-3000:]}")
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            time.sleep(0.2)
        raise TimeoutError(f"mlflow server not up after {timeout} s")

    def kill(self) -> None:
        import signal

        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None


def read_path(data: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        data = data[part]
    return data


SHARED: dict[str, Any] = {}
"""Results one test module leaves for a later one in the same session (e.g. a finished micro pipeline)."""
