"""Ingest: validate every source and stream it, row by row (read in blocks: components/data/formats.py), into
JSONL shards + a manifest."""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
from tqdm import tqdm

from components.core.config import Params
from components.core.context import StageContext, StageError
from components.core.data_config import IngestConfig, Source
from components.core.io import atomic_dir, sha256_file, write_json, write_meta
from components.core.redact import redact
from components.data import conversations, synthetic
from components.data.chat import attach_context, with_context
from components.data.fetch import download, hf_records
from components.data.fetch import file_ext as _ext
from components.data.formats import SKIP_HINT, Records, _Malformed, file_records, unreadable

log = logging.getLogger(__name__)
EXTS = {"pretrain": (".txt", ".md", ".jsonl", ".csv", ".parquet"), "sft": (".jsonl", ".csv", ".parquet")}
SPLITS = ("train", "val", "test", None)
_LINE_BREAKS = {c: f"\\u{c:04x}" for c in (0x85, 0x2028, 0x2029)}  # escaped: str.splitlines() splits on them
_LINE_BREAK_BYTES = tuple((chr(c).encode(), f"\\u{c:04x}".encode()) for c in _LINE_BREAKS)
PROGRESS_ROWS = 4096
"""Rows between progress-bar updates."""
__all__ = ["ingest", "run", "_Malformed"]


# ---------------------------------------------------------------- sources
def _hash(path: Path) -> str:
    try:
        return sha256_file(path)
    except OSError as e:
        raise unreadable(path, e) from None


def _local_files(path: Path, kind: str, shown: str) -> tuple[list[Path], dict[str, Any]]:
    """The files of a path source (sorted) and their manifest fields: sha256, bytes, files, skipped_files."""
    if path.is_file():
        if _ext(path)[0] not in EXTS[kind]:
            raise StageError(
                f"{shown}: unsupported file type for {kind} sources; use one of "
                f"{', '.join(EXTS[kind])} (optionally .gz)"
            )
        return [path], {"sha256": _hash(path), "bytes": path.stat().st_size, "files": 1, "skipped_files": 0}
    found = sorted(
        p
        for p in path.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    files = [p for p in found if _ext(p)[0] in EXTS[kind]]
    if not files:
        raise StageError(f"{shown}: folder holds no {kind} files ({', '.join(EXTS[kind])}, optionally .gz)")
    for f in files:  # a link out of the folder would pull unrelated files (keys, secrets) into the corpus
        if f.is_symlink() and not f.resolve().is_relative_to(path.resolve()):
            raise StageError(
                f"{f}: a symlink to {f.resolve()}, outside the source folder {shown}; copy the file "
                "in, or list it as a `path:` source of its own"
            )
    h = hashlib.sha256()  # sorted relative paths + file hashes
    for f in files:
        h.update(f"{f.relative_to(path).as_posix()}\0{_hash(f)}\n".encode())
    return files, {
        "sha256": h.hexdigest(),
        "bytes": sum(f.stat().st_size for f in files),
        "files": len(files),
        "skipped_files": len(found) - len(files),
    }


# ---------------------------------------------------------------- normalization
def _pretrain_row(rec: Any, text_field: str) -> dict[str, str]:
    text = rec if isinstance(rec, str) else rec.get(text_field)
    if not isinstance(text, str):
        raise _Malformed(
            f"field {text_field!r} missing or not text (fields found: {', '.join(map(str, rec))}); "
            f"set text_field: to the key holding the text, {SKIP_HINT}"
        )
    return {"text": text}


def _surrogate(row: dict[str, Any]) -> _Malformed:
    try:
        json.dumps(row, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:  # a JSON "\ud800" escape: not a character
        return _Malformed(
            f"lone surrogate {e.object[e.start : e.end]!r} (a broken \\u escape) is not valid "
            f"Unicode; fix the text, {SKIP_HINT}"
        )
    raise AssertionError("no lone surrogate in the row")


def _pretrain_line(rec: Any, text_field: str) -> tuple[bytes, int]:
    """The JSONL line of a pretraining row (bytes equal to json.dumps(..., ensure_ascii=False), line breaks
    escaped) and the text's UTF-8 size. orjson: one C call per row."""
    text = rec if isinstance(rec, str) else _pretrain_row(rec, text_field)["text"]
    try:
        body = orjson.dumps(text)
    except orjson.JSONEncodeError:
        raise _surrogate({"text": text}) from None
    if text.isascii():
        return b'{"text": ' + body + b"}\n", len(text)
    for raw, escaped in _LINE_BREAK_BYTES:
        if raw in body:
            body = body.replace(raw, escaped)
    return b'{"text": ' + body + b"}\n", len(text.encode("utf-8"))


def _sft_line(rec: Any) -> tuple[bytes, int]:
    row = _sft_row(rec)
    try:
        line = (json.dumps(row, ensure_ascii=False).translate(_LINE_BREAKS) + "\n").encode("utf-8")
    except UnicodeEncodeError:
        raise _surrogate(row) from None
    return line, sum(len(m["content"].encode()) for m in row["messages"])


def _sft_row(rec: Any) -> dict[str, Any]:
    """Alpaca {instruction, input?, output}, chat {messages} or ShareGPT {conversations} -> {"messages", "split",
    "task"} (components/data/conversations.py)."""
    split, task, msgs = rec.get("split") or None, rec.get("task") or None, rec.get("messages")
    if split not in SPLITS or not isinstance(task, (str, type(None))):
        raise _Malformed(f"split must be train/val/test/null, task a string (got {split!r}, {task!r}); {SKIP_HINT}")
    if msgs is None and "conversations" in rec:
        try:
            msgs = conversations.from_sharegpt(rec["conversations"])
        except ValueError as e:
            raise _Malformed(f"{e}; {SKIP_HINT}") from None
    if msgs is None:
        if "instruction" not in rec and "output" not in rec:
            raise _Malformed(
                f"neither 'messages', 'conversations' nor 'instruction'/'output' (fields found: "
                f"{', '.join(map(str, rec)) or 'none'}); use Alpaca, chat or ShareGPT form, {SKIP_HINT}"
            )
        for key in ("instruction", "output"):
            if not isinstance(rec.get(key), str) or not rec[key].strip():
                raise _Malformed(f"Alpaca row with missing or empty {key!r}; fill it in, {SKIP_HINT}")
        extra = rec.get("input") or ""
        if not isinstance(extra, str):
            raise _Malformed(f"'input' must be a string, got {type(extra).__name__}; {SKIP_HINT}")
        msgs = [
            {"role": "user", "content": with_context(rec["instruction"], [extra])},  # input: a context passage
            {"role": "assistant", "content": rec["output"]},
        ]
    if isinstance(msgs, str):  # a csv column holding JSON
        try:
            msgs = json.loads(msgs)
        except json.JSONDecodeError as e:
            raise _Malformed(f"messages is not valid JSON ({e.msg}); {SKIP_HINT}") from None
    try:
        out = conversations.normalize(msgs)
        out = attach_context(out, rec.get("context"))
    except ValueError as e:
        raise _Malformed(f"{e}; {SKIP_HINT}") from None
    return {"messages": out, "split": split, "task": task}


def _write_shards(folder: Path, lines: Iterator[bytes], shard_rows: int) -> int:
    """Write JSONL lines, `shard_rows` per file; returns the row count."""
    folder.mkdir(parents=True)
    n = 0
    for first in lines:  # one shard per iteration
        with open(folder / f"shard-{n // shard_rows:05d}.jsonl", "wb") as f:
            for line in itertools.chain([first], itertools.islice(lines, shard_rows - 1)):
                f.write(line)
                n += 1
    return n


def _source_lines(
    src: Source,
    kind: str,
    cfg: IngestConfig,
    seed: int,
    sources_root: Path,
    cache_dir: Path,
    manifest: list[dict[str, Any]],
    progress: bool,
) -> Iterator[bytes]:
    """Normalized JSONL lines of one source; appends its manifest entry when done."""
    max_bytes = max(1, int(cfg.max_line_mb * 2**20))
    known: dict[str, Any] | None = None  # manifest fields of file sources, known before reading
    if src.synthetic:
        origin = skind = "synthetic"
        make = synthetic.pretrain_documents if kind == "pretrain" else synthetic.instruction_rows
        records: Records = ((f"synthetic:row {i}", r) for i, r in enumerate(make(cfg.synthetic, seed), 1))
    elif src.hf:
        origin, skind, records = src.hf, "hf", hf_records(src)
    else:
        if src.url:
            files = [download(src, EXTS[kind], cfg.max_download_mb, cache_dir)]
            known = {"sha256": src.sha256, "bytes": files[0].stat().st_size}
        else:
            path = Path(src.path)
            if not path.is_absolute() and not path.exists() and (sources_root / path).exists():
                path = sources_root / path
            if not path.exists():
                raise StageError(
                    f"{src.path}: no such file or folder (in ingest.{kind}_sources); put your files "
                    f"under {sources_root}/ and fix `path:`"
                )
            if not path.resolve().is_relative_to(sources_root.resolve()):
                log.warning("%s is outside %s: DVC will not rerun ingest when it changes", src.path, sources_root)
            files, known = _local_files(path, kind, src.path)
        origin, skind = (redact(src.url), "url") if src.url else (src.path, "path")  # no credentials shown
        records = (rec for f in files for rec in file_records(f, kind, max_bytes, src.text_field))
    rows = skipped = text_bytes = out_bytes = 0
    row_hash = hashlib.sha256() if known is None else None
    encode = (lambda rec: _pretrain_line(rec, src.text_field)) if kind == "pretrain" else _sft_line
    with tqdm(desc=f"{kind} {origin}"[:60], unit=" rows", disable=not progress) as bar:
        for loc, rec in records:
            try:
                if isinstance(rec, _Malformed):
                    raise rec
                line, size = encode(rec)
                if size > max_bytes and skind != "synthetic":
                    raise _Malformed(
                        f"row of {size / 2**20:.2f} MiB is above max_line_mb ({cfg.max_line_mb:g}); "
                        f"split it, raise ingest.max_line_mb, {SKIP_HINT}"
                    )
            except _Malformed as e:
                if not cfg.skip_malformed:
                    raise StageError(f"{loc}: {e}") from None
                skipped += 1
                continue
            yield line
            if row_hash is not None:
                row_hash.update(line)
            rows, out_bytes = rows + 1, out_bytes + len(line)
            text_bytes += size if kind == "pretrain" else 0
            if not rows % PROGRESS_ROWS:
                bar.update(PROGRESS_ROWS)
        bar.update(rows % PROGRESS_ROWS)
    if rows == 0:
        raise StageError(f"{origin}: yielded no {kind} rows ({skipped} malformed skipped); check the source")
    # generated rows (synthetic, hf): hash and size of the rows written
    known = known or {"sha256": row_hash.hexdigest(), "bytes": out_bytes}  # type: ignore[union-attr]
    manifest.append(
        {"origin": origin, "kind": skind, "rows": rows, "skipped": skipped, **known, "text_bytes": text_bytes}
    )


def ingest(
    cfg: IngestConfig, out_dir: Path, *, seed: int, sources_root: Path, cache_dir: Path, ctx: StageContext | None = None
) -> dict:
    """Read all sources into `out_dir` (atomically): pretrain/ and sft/ shards, manifest.json, seedlm.json."""
    t0 = time.perf_counter()
    manifest: dict[str, list[dict[str, Any]]] = {"pretrain": [], "sft": []}
    with atomic_dir(out_dir) as tmp:
        totals = {
            kind: _write_shards(
                tmp / kind,
                (
                    line
                    for src in sources
                    for line in _source_lines(
                        src,
                        kind,
                        cfg,
                        seed,
                        Path(sources_root),
                        Path(cache_dir),
                        manifest[kind],
                        bool(ctx and ctx.progress),
                    )
                ),
                cfg.shard_rows,
            )
            for kind, sources in (("pretrain", cfg.pretrain_sources), ("sft", cfg.sft_sources))
        }
        pretrain_bytes = sum(e.pop("text_bytes") for es in manifest.values() for e in es)
        write_json(tmp / "manifest.json", manifest)
        result = {
            "pretrain_rows": totals["pretrain"],
            "sft_rows": totals["sft"],
            "skipped": sum(e["skipped"] for es in manifest.values() for e in es),
            "pretrain_bytes": pretrain_bytes,
            "sources": len(manifest["pretrain"]) + len(manifest["sft"]),
        }
        inputs = {k: [{"origin": e["origin"], "sha256": e["sha256"]} for e in es] for k, es in manifest.items()}
        write_meta(tmp, "ingest", {"seed": seed, "ingest": cfg.model_dump(mode="json")}, result, inputs)
    if ctx:
        sec = max(time.perf_counter() - t0, 1e-9)
        ctx.log({"rows_per_s": sum(totals.values()) / sec, "mb_per_s": pretrain_bytes / 2**20 / sec}, None)
    return {**result, "artifacts": [str(Path(out_dir) / "manifest.json")]}


def run(params: Params, ctx: StageContext) -> dict:
    p = params.paths
    return ingest(
        params.ingest,
        Path(p.raw),
        seed=params.seed,
        sources_root=Path(p.sources),
        cache_dir=Path(p.checkpoints).parent / "downloads",
        ctx=ctx,
    )


if __name__ == "__main__":
    from components.core.runner import main

    raise SystemExit(main("ingest"))
