"""Helpers of the serving tests (not a test module): questions of the tiny world, a live uvicorn server in a thread,
registering a model folder through the real register stage. The fixtures are in conftest.py."""

from __future__ import annotations

import contextlib
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

QUESTIONS = ["What color is Zorb?", "What color is Quill?", "Tell me about Mavo.", "What color is Tessa?"]
"""Questions of the tiny world (tests/_evaluate_fixtures.py); the fitted model answers them."""


def ask(content: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": content}]


@contextlib.contextmanager
def running(app) -> Iterator[str]:
    """Serve `app` with uvicorn on a free 127.0.0.1 port in a thread; yields the base URL, then stops it."""
    import uvicorn
    from servers import free_port

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def make_repo(root: Path) -> Path:
    """A git repo with a dvc.lock, as conftest's `repo` fixture (module-scoped here)."""
    from _register_fixtures import LOCK, PROCESSED, RAW, git

    root.mkdir(parents=True, exist_ok=True)
    (root / "dvc.lock").write_text(LOCK.format(raw=RAW, processed=PROCESSED), encoding="utf-8")
    git(root, "init", "-q")
    git(root, "add", "dvc.lock")
    git(root, "commit", "-qm", "init")
    return root


def register_version(model_dir: Path, root: Path, name: str, exact_match: float) -> str:
    """Register `model_dir` as a new version of `name` through the real register stage; returns the version."""
    from _register_fixtures import do_register, write_eval

    from components.core.config import RegisterConfig
    from components.core.io import write_meta

    n = len(list(root.glob("sft-*")))
    sft = root / f"sft-{n}"
    shutil.copytree(model_dir, sft)
    write_meta(sft, "sft", {"seed": 1, "sft": {"method": "full"}}, {"steps": 1}, {})
    repo = root / "repo" if (root / "repo").is_dir() else make_repo(root / "repo")
    metrics = write_eval(root / f"evaluate-{n}.json", exact_match)
    res, _ = do_register(RegisterConfig(model_name=name, max_new_tokens=4), sft, metrics, root / f"out-{n}", repo)
    return str(res["version"])
