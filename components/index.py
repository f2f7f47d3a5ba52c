"""Index stage: chunk the pretraining corpus and `index.sources` into a retrieval index (components/retrieval).

Runs after preprocess (chunks are measured in the pipeline tokenizer's tokens) and before evaluate, which
scores the fine-tuned model with and without retrieval. Documents added to `index.sources` need no retraining:
only this stage and evaluate rerun.
"""

from __future__ import annotations

from pathlib import Path

from components.core.config import Params
from components.core.context import StageContext
from components.core.io import write_json
from components.retrieval.build import build_index


def run(params: Params, ctx: StageContext) -> dict:
    p = params.paths
    result = build_index(
        params.index,
        raw_dir=Path(p.raw),
        processed_dir=Path(p.processed),
        out_dir=Path(p.index),
        world=params.ingest.synthetic,
        seed=params.seed,
        sources_root=Path(p.sources),
        downloads_dir=Path(p.checkpoints).parent / "downloads",
        cache_dir=Path(p.checkpoints).parent / "embeddings",
        ctx=ctx,
    )
    metrics = Path(p.metrics) / "index.json"
    write_json(metrics, result)
    return {**result, "artifacts": [str(metrics), str(Path(p.index) / "manifest.json")]}


if __name__ == "__main__":
    from components.core.runner import main

    raise SystemExit(main("index"))
