"""The documents an index holds: the ingested pretraining corpus and `index.sources`.

`index.sources` take ingest's source forms and are read by ingest's own readers (components/data/formats.py,
fetch.py and ingest's folder listing: .txt .md .jsonl .csv .parquet, optionally .gz; urls with sha256; hf
datasets), so both stages accept and refuse the same input with the same messages. `synthetic: true` is the
embedded world's news: facts that changed after training.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from components.core.context import StageError
from components.core.data_config import IndexConfig, Source, SyntheticConfig
from components.core.io import read_json
from components.core.redact import redact
from components.data import updates
from components.data.fetch import download, hf_records
from components.data.formats import SKIP_HINT, _Malformed, file_records
from components.ingest import EXTS, _local_files
from components.retrieval.chunking import Document

log = logging.getLogger(__name__)
RERUN_INGEST = "run `dvc repro ingest` (or python -m components.ingest) first"
NEWS = "synthetic:news"
"""The source name of the embedded world's news documents."""
HINT = "or set index.skip_malformed: true to skip such rows"


def ingested(raw_dir: Path) -> Iterator[Document]:
    """The pretraining documents of an ingest output; source = the ingest source each came from (manifest order)."""
    raw_dir = Path(raw_dir)
    shards = sorted((raw_dir / "pretrain").glob("shard-*.jsonl"))
    if not shards or not (raw_dir / "manifest.json").is_file():
        raise StageError(f"{raw_dir}: no ingest output (pretrain/shard-*.jsonl, manifest.json); {RERUN_INGEST}")
    entries = read_json(raw_dir / "manifest.json").get("pretrain") or []
    bounds, total = [], 0
    for e in entries:
        total += int(e.get("rows") or 0)
        bounds.append((total, str(e.get("origin"))))
    n = 0
    for shard in shards:
        with open(shard, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                text = json.loads(line).get("text") if line.strip() else None
                if not isinstance(text, str):
                    continue
                origin = next((o for end, o in bounds if n < end), str(raw_dir))
                n += 1
                yield Document(text, f"ingest:{origin}", f"{shard.relative_to(raw_dir).as_posix()}:{lineno}")


def _resolve(src: Source, sources_root: Path) -> Path:
    path = Path(src.path)
    if not path.is_absolute() and not path.exists() and (sources_root / path).exists():
        path = sources_root / path
    if not path.exists():
        raise StageError(
            f"{src.path}: no such file or folder (in index.sources); put your files under {sources_root}/ "
            "and fix `path:`"
        )
    if not path.resolve().is_relative_to(sources_root.resolve()):
        log.warning("%s is outside %s: DVC will not rerun index when it changes", src.path, sources_root)
    return path


def _records(src: Source, cfg: IndexConfig, sources_root: Path, cache_dir: Path) -> Iterator[tuple[str, Any]]:
    """(location, raw record) of a path, url or hf source, from ingest's readers."""
    if src.hf:
        yield from hf_records(src)
        return
    if src.url:
        files = [download(src, EXTS["pretrain"], cfg.max_download_mb, cache_dir)]
    else:
        files, _ = _local_files(_resolve(src, sources_root), "pretrain", src.path)
    max_bytes = max(1, int(cfg.max_line_mb * 2**20))
    for f in files:
        yield from file_records(f, "pretrain", max_bytes, src.text_field)


def _text(rec: Any, text_field: str) -> str:
    text = rec if isinstance(rec, str) else rec.get(text_field) if isinstance(rec, dict) else None
    if not isinstance(text, str):
        found = ", ".join(map(str, rec)) if isinstance(rec, dict) else type(rec).__name__
        raise _Malformed(
            f"field {text_field!r} missing or not text (fields found: {found}); set text_field: to the key "
            f"holding the text, {HINT}"
        )
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise _Malformed(f"{e.object[e.start : e.end]!r} is not valid Unicode (a broken \\u escape); {HINT}") from None
    return text


def _texts(src: Source, cfg: IndexConfig, sources_root: Path, cache_dir: Path, skipped: list[int]) -> Iterator:
    for loc, rec in _records(src, cfg, sources_root, cache_dir):
        try:
            if isinstance(rec, _Malformed):
                raise rec
            yield str(loc), _text(rec, src.text_field)
        except _Malformed as e:
            if not cfg.skip_malformed:
                message = str(e).replace(SKIP_HINT, HINT).replace("ingest.max_line_mb", "index.max_line_mb")
                raise StageError(f"{loc}: {message}") from None
            skipped[0] += 1


def source_documents(
    src: Source, cfg: IndexConfig, *, world: SyntheticConfig, seed: int, sources_root: Path, cache_dir: Path
) -> Iterator[Document]:
    """The documents of one `index.sources` entry; StageError naming the source when it is bad or empty."""
    if src.synthetic:
        for i, doc in enumerate(updates.news_documents(world, seed), 1):
            yield Document(doc["text"], NEWS, f"news {i}")
        return
    origin = redact(src.url) if src.url else src.hf if src.hf else src.path
    skipped, n = [0], 0
    for loc, text in _texts(src, cfg, Path(sources_root), Path(cache_dir), skipped):
        if text.strip():
            n += 1
            yield Document(text, origin, loc)
    if n == 0:
        raise StageError(
            f"{origin}: yielded no documents to index ({skipped[0]} malformed skipped); check this entry of "
            "index.sources"
        )
