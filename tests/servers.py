"""Helpers for the server tests (not a test module): a tiny seedlm repo, and real Prefect / MLflow
servers and Prefect workers on 127.0.0.1, each started in its own process group and stopped by it."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import requests
from repos import BIN, commit, make_repo  # noqa: F401 (commit, make_repo: for the server tests)
from repos import TINY as E2E_TINY

TINY = {**E2E_TINY, "evaluate.champion": False}  # test_pipeline_e2e.py's, without the champion's evaluation


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LEAKY = re.compile(
    r"MLFLOW_(TRACKING_URI|EXPERIMENT_ID|EXPERIMENT_NAME|RUN_ID)|PREFECT_API_URL|PREFECT__.*|SEEDLM_.*|PYTEST_.*"
)
"""Per-run state earlier tests leave in os.environ (mlflow.set_tracking_uri and set_experiment write theirs there;
a stage exports SEEDLM_PARENT_RUN_ID): never handed to the servers, workers and CLIs started here."""


def base_env(**extra: str) -> dict[str, str]:
    """os.environ without per-run state (LEAKY), quiet and offline, plus `extra`."""
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "HF_HUB_OFFLINE": "1",
        "DVC_NO_ANALYTICS": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
    }
    env = {k: v for k, v in env.items() if not LEAKY.fullmatch(k)}
    env.update(extra)
    return env


class Proc:
    """A background process in its own session; `stop()` ends its whole process group."""

    def __init__(self, args: list[str], log: Path, **kw: Any) -> None:
        self.log = log
        self._fh = open(log, "wb")
        self.popen = subprocess.Popen(args, stdout=self._fh, stderr=subprocess.STDOUT, start_new_session=True, **kw)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, grace: float = 10.0) -> None:
        import psutil

        try:  # flow-run processes a worker started may sit in sessions of their own: end them by pid too
            descendants = psutil.Process(self.popen.pid).children(recursive=True) if self.alive() else []
        except psutil.NoSuchProcess:
            descendants = []
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(5)
        with contextlib.suppress(ProcessLookupError):  # children that outlived the leader (same group)
            os.killpg(self.popen.pid, signal.SIGKILL)
        for child in descendants:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        self._fh.close()

    def tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""


def wait_http(url: str, proc: Proc, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.popen.args[:3]} exited early:\n{proc.tail()}")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} not up after {timeout} s:\n{proc.tail()}")


def start_mlflow(tmp: Path, wait: bool = True) -> tuple[Proc, str]:
    """`mlflow server` with a sqlite backend and an artifact root, configured by environment only."""
    port = free_port()
    tmp.mkdir(parents=True, exist_ok=True)
    env = base_env(
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
        MLFLOW_BACKEND_STORE_URI=f"sqlite:///{tmp}/mlflow.db",
        MLFLOW_ARTIFACTS_DESTINATION=str(tmp / "artifacts"),
        MLFLOW_HOST="127.0.0.1",
        MLFLOW_PORT=str(port),
        MLFLOW_WORKERS="1",
    )
    proc = Proc([str(BIN / "mlflow"), "server"], tmp / "mlflow.log", env=env, cwd=tmp)
    url = f"http://127.0.0.1:{port}"
    if wait:
        wait_http(f"{url}/health", proc)
    return proc, url


def start_prefect(home: Path, wait: bool = True) -> tuple[Proc, str, dict[str, str]]:
    """`prefect server start` on a free port with its own PREFECT_HOME; returns (proc, api url, client env)."""
    port = free_port()
    home.mkdir(parents=True, exist_ok=True)
    env = base_env(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="5",
        PREFECT_SERVER_API_HOST="127.0.0.1",
        PREFECT_SERVER_API_PORT=str(port),
        PREFECT_UI_URL=f"http://127.0.0.1:{port}",  # links in notifications
        PREFECT_SERVER_LOGS_STREAM_OUT_ENABLED="true",  # as `make prefect-server`: `--watch` shows the run's log
        PREFECT_SERVER_LOGS_STREAM_PUBLISHING_ENABLED="true",
    )
    env.pop("PREFECT_API_URL", None)
    proc = Proc(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        home / "server.log",
        env=env,
        cwd=home,
    )
    api = f"http://127.0.0.1:{port}/api"
    if wait:
        wait_http(f"{api}/health", proc)
    client_env = base_env(
        PREFECT_HOME=str(home),
        PREFECT_API_URL=api,
        PREFECT_WORKER_QUERY_SECONDS="1",
        PREFECT_WORKER_PREFETCH_SECONDS="1",
    )
    return proc, api, client_env


def prefect(env: dict[str, str], *args: str, cwd: Path | None = None, timeout: float = 300) -> str:
    """Run the prefect CLI; fail loudly with its output."""
    res = subprocess.run(
        [str(BIN / "prefect"), "--no-prompt", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    if res.returncode:
        raise RuntimeError(f"prefect {' '.join(args)} -> {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res.stdout


def start_worker(env: dict[str, str], pool: str, name: str, cwd: Path, log: Path) -> Proc:
    return Proc(
        [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "process", "--name", name],
        log,
        env=env,
        cwd=cwd,
    )
