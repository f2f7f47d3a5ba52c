"""Ingest: validate every source and stream it, one line/row at a time, into JSONL shards + a manifest."""

from __future__ import annotations

import csv
import gzip
import hashlib
import itertools
import json
import logging
import tempfile
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from tqdm import tqdm

from components.core.config import IngestConfig, Params, Source
from components.core.context import StageContext, StageError
from components.core.io import atomic_dir, sha256_file, write_json, write_meta
from components.core.redact import redact
from components.data import synthetic
from components.data.chat import ROLES
from components.data.fetch import download, hf_records
from components.data.fetch import file_ext as _ext

log = logging.getLogger(__name__)
EXTS = {"pretrain": (".txt", ".md", ".jsonl", ".csv", ".parquet"), "sft": (".jsonl", ".csv", ".parquet")}
SPLITS = ("train", "val", "test", None)
SKIP_HINT = "or set ingest.skip_malformed: true to skip such rows"
_LINE_BREAKS = {c: f"\\u{c:04x}" for c in (0x85, 0x2028, 0x2029)}  # escaped: str.splitlines() splits on them
Records = Iterator[tuple[str, Any]]  # (location for messages, raw record: str | dict | _Malformed)


class _Malformed(Exception):
    """A bad row/line: fatal, or skipped and counted with skip_malformed."""


# ---------------------------------------------------------------- files
def _unreadable(path: Path, e: OSError) -> StageError:
    return StageError(
        f"{path}: cannot read it ({e.strerror or type(e).__name__}); fix its permissions "
        "(e.g. `chmod a+r`) or remove it from the ingest sources"
    )


def _hash(path: Path) -> str:
    try:
        return sha256_file(path)
    except OSError as e:
        raise _unreadable(path, e) from None


def _open(path: Path) -> BinaryIO:
    """Open a (possibly gzipped) file for binary streaming, after the file-level checks."""
    (ext, gz), opener = _ext(path), gzip.open if _ext(path)[1] else open
    try:
        with open(path, "rb") as f:
            magic = f.read(2)
    except OSError as e:
        raise _unreadable(path, e) from None
    if magic and gz and magic != b"\x1f\x8b":
        raise StageError(f"{path}: named .gz but not gzip data; compress it with `gzip` or drop the .gz suffix")
    try:
        with opener(path, "rb") as f:
            head = f.read(8192)
    except (OSError, EOFError, zlib.error) as e:
        raise StageError(f"{path}: corrupt gzip data ({e}); re-create the .gz file") from None
    if not head:
        raise StageError(f"{path}: the file is empty; add data or remove it from the sources")
    if ext != ".parquet" and b"\x00" in head:
        raise StageError(f"{path}: looks binary (NUL bytes in the first 8 KiB); sources must be UTF-8 text or parquet")
    return opener(path, "rb")  # type: ignore[return-value]


def _lines(path: Path, fh: BinaryIO, max_bytes: int) -> Iterator[tuple[int, str | _Malformed]]:
    """(line number, text without its newline | _Malformed for a line above max_line_mb)."""
    lineno = offset = 0
    try:
        while raw := fh.readline(max_bytes + 1):
            lineno += 1
            if len(raw) > max_bytes and not raw.endswith(b"\n"):
                size = len(raw)
                while raw and not raw.endswith(b"\n"):
                    raw = fh.readline(1 << 20)
                    size += len(raw)
                offset += size
                yield (
                    lineno,
                    _Malformed(
                        f"line of {size / 2**20:.2f} MiB is above max_line_mb "
                        f"({max_bytes / 2**20:g}); split it, raise ingest.max_line_mb, {SKIP_HINT}"
                    ),
                )
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise StageError(
                    f"{path}:{lineno}: not valid UTF-8 at byte offset {offset + e.start} "
                    f"({raw[e.start : e.start + 4]!r}); re-encode it as UTF-8 (`iconv -t utf-8`)"
                ) from None
            offset += len(raw)
            text = text.removeprefix("\ufeff") if lineno == 1 else text
            yield lineno, text.removesuffix("\n").removesuffix("\r")
    except (OSError, EOFError, zlib.error) as e:
        raise StageError(f"{path}: corrupt gzip data after line {lineno} ({e}); re-create the .gz file") from None


def _text_docs(path: Path, fh: BinaryIO, max_bytes: int) -> Records:
    """Documents = blocks of non-blank lines separated by blank lines."""
    start, block = 0, []
    for lineno, line in itertools.chain(_lines(path, fh, max_bytes), [(0, "")]):  # "": flush the last block
        if isinstance(line, _Malformed):
            yield f"{path}:{lineno}", line
        elif line.strip():
            start = start if block else lineno
            block.append(line)
        elif block:
            yield f"{path}:{start}", "\n".join(block).strip()
            block = []


def _jsonl_records(path: Path, fh: BinaryIO, max_bytes: int) -> Records:
    for lineno, line in _lines(path, fh, max_bytes):
        if isinstance(line, str) and line.strip():
            try:
                obj = json.loads(line)
                line = (
                    obj
                    if isinstance(obj, dict)
                    else _Malformed(
                        f"expected a JSON object per line, got {type(obj).__name__}; fix the line, {SKIP_HINT}"
                    )
                )
            except json.JSONDecodeError as e:
                line = _Malformed(f"not valid JSON ({e.msg} at column {e.colno}); fix the line, {SKIP_HINT}")
            except RecursionError:
                line = _Malformed(f"JSON nested too deeply to read; flatten the line, {SKIP_HINT}")
        if not isinstance(line, str):
            yield f"{path}:{lineno}", line


def _require(path: Path, found: list[str], kind: str, text_field: str) -> None:
    need = [text_field] if kind == "pretrain" else [] if "messages" in found else ["instruction", "output"]
    if missing := [c for c in need if c not in found]:
        fix = (
            "set text_field: to the column holding the text"
            if kind == "pretrain"
            else "instruction data needs columns instruction, output (input optional) or messages"
        )
        raise StageError(
            f"{path}: no column {', '.join(map(repr, missing))} (columns found: {', '.join(found) or 'none'}); {fix}"
        )


def _csv_records(path: Path, fh: BinaryIO, max_bytes: int, kind: str, text_field: str) -> Records:
    csv.field_size_limit(max(max_bytes, 1 << 17))
    bad: list[int] = []

    def feed() -> Iterator[str]:
        for lineno, line in _lines(path, fh, max_bytes):
            if isinstance(line, _Malformed):
                bad.append(lineno)
            yield ("" if isinstance(line, _Malformed) else line) + "\n"

    reader = csv.reader(feed())
    try:
        header = next(reader, None) or []
        _require(path, header, kind, text_field)
        for row in reader:
            loc = f"{path}:{reader.line_num}"
            if bad and bad[-1] == reader.line_num:
                yield loc, _Malformed(f"line above max_line_mb; split it, raise ingest.max_line_mb, {SKIP_HINT}")
            elif row and len(row) != len(header):
                yield loc, _Malformed(f"{len(row)} fields but the header has {len(header)}; fix the row, {SKIP_HINT}")
            elif row:
                yield loc, dict(zip(header, row))
    except csv.Error as e:
        raise StageError(f"{path}:{reader.line_num}: CSV error ({e}); fix the quoting of that row") from None


def _parquet_records(path: Path, kind: str, text_field: str) -> Records:
    import pyarrow.parquet as pq

    _open(path).close()  # the empty / not-gzip checks
    with tempfile.TemporaryFile() as tmp:  # parquet needs a seekable file: un-gzip to disk
        if _ext(path)[1]:
            with gzip.open(path, "rb") as f:
                while block := f.read(1 << 20):
                    tmp.write(block)
            tmp.seek(0)
        try:
            pf = pq.ParquetFile(tmp if _ext(path)[1] else path)
        except Exception as e:  # noqa: BLE001 - pyarrow raises many types for a bad file
            raise StageError(f"{path}: not a readable parquet file ({e}); re-export it as parquet") from None
        names = pf.schema_arrow.names
        _require(path, names, kind, text_field)
        n = 0
        for batch in pf.iter_batches(batch_size=1024, columns=[text_field] if kind == "pretrain" else None):
            for rec in batch.to_pylist():
                n += 1
                yield f"{path}:row {n}", rec


def _file_records(path: Path, kind: str, max_bytes: int, text_field: str) -> Records:
    ext = _ext(path)[0]
    if ext == ".parquet":
        yield from _parquet_records(path, kind, text_field)
    else:
        with _open(path) as fh:
            yield from (
                _csv_records(path, fh, max_bytes, kind, text_field)
                if ext == ".csv"
                else (_jsonl_records if ext == ".jsonl" else _text_docs)(path, fh, max_bytes)
            )


# ---------------------------------------------------------------- sources
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


def _sft_row(rec: Any) -> dict[str, Any]:
    """Alpaca {instruction, input?, output} or chat {messages} -> {"messages", "split", "task"}."""
    split, task, msgs = rec.get("split") or None, rec.get("task") or None, rec.get("messages")
    if split not in SPLITS or not isinstance(task, (str, type(None))):
        raise _Malformed(f"split must be train/val/test/null, task a string (got {split!r}, {task!r}); {SKIP_HINT}")
    if msgs is None:
        if "instruction" not in rec and "output" not in rec:
            raise _Malformed(
                f"neither 'messages' nor 'instruction'/'output' (fields found: "
                f"{', '.join(map(str, rec)) or 'none'}); use Alpaca or chat form, {SKIP_HINT}"
            )
        for key in ("instruction", "output"):
            if not isinstance(rec.get(key), str) or not rec[key].strip():
                raise _Malformed(f"Alpaca row with missing or empty {key!r}; fill it in, {SKIP_HINT}")
        extra = rec.get("input") or ""
        if not isinstance(extra, str):
            raise _Malformed(f"'input' must be a string, got {type(extra).__name__}; {SKIP_HINT}")
        msgs = [
            {"role": "user", "content": rec["instruction"] + ("\n\n" + extra if extra.strip() else "")},
            {"role": "assistant", "content": rec["output"]},
        ]
    if isinstance(msgs, str):  # a csv column holding JSON
        try:
            msgs = json.loads(msgs)
        except json.JSONDecodeError as e:
            raise _Malformed(f"messages is not valid JSON ({e.msg}); {SKIP_HINT}") from None
    if not isinstance(msgs, list) or not msgs:
        raise _Malformed(f"messages must be a non-empty list of {{role, content}}; {SKIP_HINT}")
    out = []
    for i, m in enumerate(msgs):
        role, content = (m.get("role"), m.get("content")) if isinstance(m, dict) else (None, None)
        if role not in ROLES:
            raise _Malformed(f"messages[{i}]: role {role!r} is not one of {', '.join(ROLES)}; {SKIP_HINT}")
        if not isinstance(content, str) or not content.strip():
            raise _Malformed(f"messages[{i}]: content must be a non-empty string; {SKIP_HINT}")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise _Malformed(f"messages has no assistant turn to learn from; {SKIP_HINT}")
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
        records = (rec for f in files for rec in _file_records(f, kind, max_bytes, src.text_field))
    rows = skipped = text_bytes = out_bytes = 0
    row_hash = hashlib.sha256()
    for loc, rec in tqdm(records, desc=f"{kind} {origin}"[:60], unit=" rows", disable=not progress):
        try:
            if isinstance(rec, _Malformed):
                raise rec
            row = _pretrain_row(rec, src.text_field) if kind == "pretrain" else _sft_row(rec)
            try:
                line = (json.dumps(row, ensure_ascii=False).translate(_LINE_BREAKS) + "\n").encode("utf-8")
            except UnicodeEncodeError as e:  # a JSON "\ud800" escape: not a character
                raise _Malformed(
                    f"lone surrogate {e.object[e.start : e.end]!r} (a broken \\u escape) is not valid "
                    f"Unicode; fix the text, {SKIP_HINT}"
                ) from None
            size = (
                sum(len(m["content"].encode()) for m in row["messages"]) if kind == "sft" else len(row["text"].encode())
            )
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
        row_hash.update(line)
        rows, out_bytes = rows + 1, out_bytes + len(line)
        text_bytes += size if kind == "pretrain" else 0
    if rows == 0:
        raise StageError(f"{origin}: yielded no {kind} rows ({skipped} malformed skipped); check the source")
    # generated rows (synthetic, hf): hash and size of the rows written
    known = known or {"sha256": row_hash.hexdigest(), "bytes": out_bytes}
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
