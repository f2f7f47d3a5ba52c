"""Clone-like micro copies of the project for the end-to-end, server and reliability tests (not a test module):
the tracked items to copy, params.yaml overrides by dotted key, and their own git history and DVC state."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
GIT = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
TRACKED = (
    "components",
    "flows",
    "dvc.yaml",
    "params.yaml",
    "data/sources",
    ".dvc/config",
    ".dvc/.gitignore",
    ".dvcignore",
    ".gitignore",
    "Makefile",
)
"""What a fresh clone holds that the stages (and `make worker`) need (items missing here are skipped)."""

TINY = {  # seconds per stage on 2 cores; the whole pipeline end to end
    "ingest.synthetic.entities": 10,
    "ingest.synthetic.paraphrases": 3,
    "preprocess.vocab_size": 320,
    "model.n_layer": 2,
    "model.n_embd": 64,
    "model.n_head": 2,
    "model.context_length": 64,
    "pretrain.max_steps": 40,
    "pretrain.warmup_steps": 4,
    "pretrain.eval_every": 20,
    "pretrain.checkpoint_every": 20,
    "pretrain.batch_size": 8,
    "sft.max_steps": 20,
    "sft.warmup_steps": 2,
    "sft.eval_every": 10,
    "sft.checkpoint_every": 10,
    "sft.batch_size": 8,
    "evaluate.bootstrap": 50,
    "evaluate.max_new_tokens": 12,
    "register.gate.min": {"exact_match": 0.0},
}


def set_params(repo: Path, overrides: dict[str, Any]) -> None:
    """Set params.yaml values by dotted key ("pretrain.max_steps"), keeping the file's key order."""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for key, value in overrides.items():
        node = params
        *parents, last = key.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def commit(repo: Path, message: str) -> None:
    subprocess.run(GIT + ["add", "-A"], cwd=repo, check=True)
    subprocess.run(GIT + ["commit", "-qm", message], cwd=repo, check=True)


def make_repo(dest: Path, overrides: dict[str, Any] | None = None, git: bool = True) -> Path:
    """A clone-like copy of the project (tracked sources only) with `overrides` applied to params.yaml and,
    with `git`, its own git history (one commit, a local user identity)."""
    dest.mkdir(parents=True, exist_ok=True)
    for item in TRACKED:
        src = ROOT / item
        if src.is_dir():
            shutil.copytree(src, dest / item, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            (dest / item).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dest / item)
    set_params(dest, overrides or {})
    if git:
        subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
        subprocess.run(["git", "config", "user.email", "t@t"], cwd=dest, check=True)
        subprocess.run(["git", "config", "user.name", "t"], cwd=dest, check=True)
        commit(dest, "init")
    return dest
