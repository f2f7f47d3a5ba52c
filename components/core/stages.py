"""The stage table: the one declaration of the pipeline's stages.

A stage's name is its params.yaml section, its module `components/<name>.py`, its dvc.yaml stage, its
Prefect task and its MLflow run. Everything else that knows the stages derives from `TABLE`: the order
(`STAGES`), each stage's params (dvc.yaml lists the same keys; tests keep them in sync), its output folder
(a `paths:` key, with its default), its default work pool and timeout. Adding a stage is its module, one
entry here, its dvc.yaml entry and its params section.
"""

from __future__ import annotations

from dataclasses import dataclass

HOUR = 3600


@dataclass(frozen=True)
class Stage:
    name: str
    params: tuple[str, ...]
    """params.yaml keys the stage depends on: whole sections or dotted keys (dvc.yaml lists the same)."""
    out: str
    """The `paths:` key of the folder it writes (its DVC out)."""
    default_path: str
    """That key's default value."""
    pool: str = "cpu"
    """Default Prefect work pool: data stages and registration on CPU workers, model-heavy ones on GPU workers."""

    @property
    def timeout_s(self) -> int:
        """Default `orchestration.timeouts` entry: 48 h on GPU pools, 4 h elsewhere."""
        return 48 * HOUR if self.pool == "gpu" else 4 * HOUR


TABLE: tuple[Stage, ...] = (
    Stage("ingest", ("seed", "ingest"), "raw", "data/raw"),
    Stage("preprocess", ("seed", "preprocess", "model.init_from"), "processed", "data/processed"),
    Stage("index", ("seed", "index", "ingest.synthetic"), "index", "data/index"),
    Stage("pretrain", ("seed", "model", "pretrain"), "pretrain", "models/pretrain", pool="gpu"),
    Stage("sft", ("seed", "sft", "model.dtype"), "sft", "models/sft", pool="gpu"),
    Stage("evaluate", ("seed", "evaluate", "register.model_name"), "evaluate", "reports/evaluate", pool="gpu"),
    Stage("register", ("register",), "register", "reports/register"),
)
STAGES: tuple[str, ...] = tuple(s.name for s in TABLE)
BY_NAME: dict[str, Stage] = {s.name: s for s in TABLE}
