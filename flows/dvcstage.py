"""The one stage graph: ask DVC whether a stage is up to date, and record what a run produced.

A Prefect run skips a stage that `dvc status` reports unchanged and, after running one, commits it
to dvc.lock (`dvc commit`), so `dvc repro` and scheduled runs never redo each other's work.
"""
from __future__ import annotations

import logging
from pathlib import Path

from dvc.repo import Repo

logging.getLogger("dvc").setLevel(logging.WARNING)


def changes(root: Path, stage: str) -> list:
    """What DVC sees changed for `stage` (empty when its lock entry matches deps, params and outs)."""
    with Repo(str(root)) as repo:
        return repo.status(targets=[stage]).get(stage, [])


def commit(root: Path, stage: str) -> None:
    """Record the stage's current deps, params and outs in dvc.lock (and the DVC cache)."""
    with Repo(str(root)) as repo:
        repo.commit(stage, force=True)
