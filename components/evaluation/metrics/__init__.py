"""seedlm's metrics: local `evaluate` modules in `components/evaluation/metrics/<name>/<name>.py`, loaded by path.

`load_metric(name)` prefers the local module (offline) and only falls back to the Hugging Face hub
(`evaluate.load(name)`, needs the network) when no local module of that name exists.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def local_metrics() -> list[str]:
    """Names of the local metric modules."""
    return sorted(p.name for p in HERE.iterdir() if (p / f"{p.name}.py").is_file())


def local_path(name: str) -> Path | None:
    """The local module folder of `name`, or None."""
    folder = HERE / name
    return folder if (folder / f"{name}.py").is_file() else None


@functools.cache
def load_metric(name: str, **kwargs: Any) -> Any:
    """An `evaluate` metric: the local module when there is one, else the hub's (needs the network).

    kwargs go to `evaluate.load` (e.g. keep_in_memory=True). Loaded metrics are cached per name+kwargs.
    """
    import evaluate as hf_evaluate  # ~4 s: import lazily

    folder = local_path(name)
    return hf_evaluate.load(str(folder) if folder else name, **kwargs)
