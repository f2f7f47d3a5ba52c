"""Where a model came from: git state, DVC hashes of its data, content hashes of weights and
folders, the orchestrator's run id; recorded as tags and MLflow dataset inputs."""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import subprocess
import warnings
from pathlib import Path
from typing import Any

import yaml

from components.core.context import StageError
from components.core.io import sha256_file

FLOW_RUN_TAG = "prefect_flow_run_id"
"""Version tag (and StageContext.extra key) holding the orchestrator's flow-run id."""
FLOW_RUN_ENV = ("PREFECT__FLOW_RUN_ID", "PREFECT__RUNTIME__FLOW_RUN__ID")
LINEAGE_TAGS = (
    "data.raw.md5",
    "data.processed.md5",
    "data.raw.meta_hash",
    "data.processed.meta_hash",
    "data.tokenizer.sha256",
    "data.index.md5",
    "data.index.meta_hash",
    "data.index.content_sha256",
    "base_checkpoint.sha256",
    "base_checkpoint.revision",
    "lora_base.sha256",
    "model_sha256",
    "params_hash",
)
"""Version tags compared by `lineage` (besides the params)."""


# ---------------------------------------------------------------- git / DVC
def _git(root: Path, *args: str) -> str | None:
    try:
        res = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout if res.returncode == 0 else None


def git_state(root: Path) -> dict[str, str]:
    """{"git_commit": sha or "unknown", "git_dirty": "true"/"false"/"unknown"}: dirty = the code differs from the
    commit. params.yaml and dvc.lock do not count: the pipeline writes them (overrides, its record) and the
    version carries both (params tag, register/params.yaml and register/dvc.lock artifacts)."""
    commit = _git(root, "rev-parse", "HEAD")
    status = (
        _git(root, "status", "--porcelain", "--", ".", ":(exclude)params.yaml", ":(exclude)dvc.lock")
        if commit
        else None
    )
    return {
        "git_commit": commit.strip() if commit else "unknown",
        "git_dirty": "unknown" if status is None else str(bool(status.strip())).lower(),
    }


def read_lock(root: Path) -> dict[str, Any]:
    """dvc.lock as data ({} without one)."""
    lock = Path(root) / "dvc.lock"
    if not lock.is_file():
        return {}
    try:
        return yaml.safe_load(lock.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise StageError(f"{lock}: not valid YAML ({e}); run `dvc repro` to rewrite it") from None


def _tag_key(*parts: str) -> str:
    key = re.sub(r"[^/\w.\- ]", "_", ".".join(parts))
    return posixpath.normpath(key).lstrip("/")[:250]


def dvc_hashes(root: Path) -> dict[str, str]:
    """`dvc.<stage>.<path>` -> md5 of every dep/out in dvc.lock (register's own, stale entry left out)."""
    tags = {}
    for stage, body in (read_lock(root).get("stages") or {}).items():
        if stage == "register":
            continue
        for kind in ("deps", "outs"):
            for entry in (body or {}).get(kind) or []:
                if isinstance(entry, dict) and entry.get("path") and entry.get("md5"):
                    tags[_tag_key("dvc", str(stage), str(entry["path"]))] = str(entry["md5"])
    return tags


def lock_md5(root: Path, path: str | Path) -> str | None:
    """The md5 dvc.lock records for the output `path` (relative to the repo root), or None."""
    path, root = Path(path), Path(root)
    if path.is_absolute() and path.resolve().is_relative_to(root.resolve()):
        path = path.resolve().relative_to(root.resolve())
    want = posixpath.normpath(path.as_posix())
    for body in (read_lock(root).get("stages") or {}).values():
        for entry in (body or {}).get("outs") or []:
            if isinstance(entry, dict) and posixpath.normpath(str(entry.get("path"))) == want:
                return str(entry.get("md5")) if entry.get("md5") else None
    return None


def meta_hash(folder: Path) -> str | None:
    """Hash of an output's seedlm.json (stage, config, inputs, result; not its timestamp), or None."""
    from components.core.params import config_hash

    path = Path(folder) / "seedlm.json"
    if not path.is_file():
        return None
    meta = json.loads(path.read_text(encoding="utf-8"))
    return config_hash({k: meta.get(k) for k in ("stage", "config", "inputs", "result")})


def index_sha256(folder: Path) -> str | None:
    """What a retrieval index holds (its seedlm.json `content_sha256`: chunks, sources, encoder), or None."""
    path = Path(folder) / "seedlm.json"
    if not path.is_file():
        return None
    return (json.loads(path.read_text(encoding="utf-8")).get("result") or {}).get("content_sha256")


def weights_sha256(folder: Path) -> str:
    """Content hash of a model's weights and config (*.safetensors + config.json; serving checks the same)."""
    root = Path(folder)
    h = hashlib.sha256()
    for p in sorted([*root.glob("*.safetensors"), root / "config.json"]):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode() + b"\0" + sha256_file(p).encode())
    return h.hexdigest()


def flow_run_id(extra: dict[str, Any] | None = None) -> str | None:
    """The orchestrator's flow-run id: from the StageContext extras, else the environment."""
    value = (extra or {}).get(FLOW_RUN_TAG) or next((os.environ[k] for k in FLOW_RUN_ENV if os.environ.get(k)), None)
    return str(value) if value else None


def log_datasets(datasets: dict[str, tuple[Path, str | None]], model_id: str | None = None) -> list[str]:
    """mlflow.log_input one MetaDataset per entry: name -> (local path, digest); returns the names logged."""
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import LoggedModelInput

    logged = []
    for name, (path, digest) in datasets.items():
        if not digest:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "can be interpreted in multiple ways": both are local files
            source = resolve_dataset_source(str(Path(path).resolve()))
        ds = MetaDataset(source=source, name=f"seedlm-{name}", digest=digest[:36])
        mlflow.log_input(
            ds, context=name, tags={"path": str(path)}, model=LoggedModelInput(model_id=model_id) if model_id else None
        )
        logged.append(name)
    return logged
