"""Reading ingest's source files: .txt/.md (documents = blocks of lines), .jsonl, .csv, .parquet, optionally .gz.

Lines are read in blocks of several MiB and split in C (str.split, regex), not one readline per line: the
common path has no per-line Python work. The rules stay those of reading line by line: a line loses its "\\n"
and one trailing "\\r", line 1 its BOM; a line longer than max_line_mb is one malformed record (never held in
memory); a byte that is not UTF-8 names its line and file offset.
"""

from __future__ import annotations

import csv
import ctypes
import functools
import gzip
import json
import re
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import orjson

from components.core.context import StageError
from components.data.fetch import file_ext as _ext

SKIP_HINT = "or set ingest.skip_malformed: true to skip such rows"
READ_BYTES = 1 << 18
"""Bytes read per block: small blocks keep the peak memory flat (each block makes a few copies of itself), and
cost nothing in speed."""
Records = Iterator[tuple[Any, Any]]  # (location for messages: str or Loc, raw record: str | dict | _Malformed)
_NONBLANK_BLOCK = re.compile(r"[^\n]*\S[^\n]*(?:\n[^\n]*\S[^\n]*)*")
"""A maximal run of lines that are not blank (blank: only whitespace, as str.strip() sees it)."""


TRIM_BYTES = 1 << 25
"""Every this many bytes read, free heap pages go back to the OS: without it the peak memory creeps with heap
fragmentation (ingest +12% from 16 to 256 MiB of text, Python's own allocations staying flat)."""


@functools.cache
def _malloc_trim() -> Any:
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc
    except (OSError, AttributeError):
        return None


def release_memory() -> None:
    """Return free heap memory to the OS (glibc's malloc_trim; nothing elsewhere)."""
    if (trim := _malloc_trim()) is not None:
        trim(0)


class _Malformed(Exception):
    """A bad row/line: fatal, or skipped and counted with skip_malformed."""


class Loc(tuple):
    """Where a record starts, (path, line of a run, the run's text, offset in it): formatted as `path:line` only
    when a message needs it."""

    __slots__ = ()

    def __str__(self) -> str:
        path, line, text, pos = self
        return f"{path}:{line + text.count(chr(10), 0, pos)}"


def unreadable(path: Path, e: OSError) -> StageError:
    return StageError(
        f"{path}: cannot read it ({e.strerror or type(e).__name__}); fix its permissions "
        "(e.g. `chmod a+r`) or remove it from the ingest sources"
    )


def open_source(path: Path) -> BinaryIO:
    """Open a (possibly gzipped) file for binary streaming, after the file-level checks."""
    (ext, gz), opener = _ext(path), gzip.open if _ext(path)[1] else open
    try:
        with open(path, "rb") as f:
            magic = f.read(2)
    except OSError as e:
        raise unreadable(path, e) from None
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


# ---------------------------------------------------------------- lines, in blocks
def _too_long(size: int, max_bytes: int) -> _Malformed:
    return _Malformed(
        f"line of {size / 2**20:.2f} MiB is above max_line_mb ({max_bytes / 2**20:g}); split it, raise "
        f"ingest.max_line_mb, {SKIP_HINT}"
    )


def _decode(region: bytes, first: bool, eof: bool) -> str:
    """Whole lines (ending in "\\n", or at the end of the file) -> their text joined by "\\n"."""
    text = region.decode("utf-8").replace("\r\n", "\n")
    text = text[:-1] if text.endswith("\n") else text.removesuffix("\r") if eof else text
    return text.removeprefix("\ufeff") if first else text


def _not_utf8(path: Path, region: bytes, e: UnicodeDecodeError, line: int, offset: int) -> StageError:
    line += region.count(b"\n", 0, e.start)
    end = region.find(b"\n", e.start)
    shown = region[e.start : min(e.start + 4, len(region) if end < 0 else end + 1)]
    return StageError(
        f"{path}:{line}: not valid UTF-8 at byte offset {offset + e.start} ({shown!r}); "
        "re-encode it as UTF-8 (`iconv -t utf-8`)"
    )


def _good_lines(path: Path, part: bytes, line: int, offset: int, first: bool, eof: bool) -> Iterator[tuple[int, str]]:
    """The run of `part`; on a byte that is not UTF-8, the lines before it, then the error."""
    try:
        yield line, _decode(part, first, eof)
    except UnicodeDecodeError as e:
        good = part.rfind(b"\n", 0, e.start) + 1
        if good:
            yield line, _decode(part[:good], first, False)
        raise _not_utf8(path, part, e, line, offset) from None


def _regions(region: bytes, max_bytes: int, eof: bool) -> Iterator[tuple[int, int, int | None]]:
    """Split whole lines at those above max_bytes: (start, end, None) for runs of good lines,
    (start, end, size) for one overlong line. Offsets are into `region`."""
    if not region:
        return
    if len(region) <= max_bytes:
        yield 0, len(region), None
        return
    ends = np.flatnonzero(np.frombuffer(region, np.uint8) == 10) + 1
    if eof and (not len(ends) or ends[-1] != len(region)):
        ends = np.append(ends, len(region))
    starts = np.concatenate([[0], ends[:-1]])
    content = ends - starts - (np.frombuffer(region, np.uint8)[ends - 1] == 10)
    start = 0
    for i in np.flatnonzero(content > max_bytes):
        if starts[i] > start:
            yield start, int(starts[i]), None
        yield int(starts[i]), int(ends[i]), int(ends[i] - starts[i])
        start = int(ends[i])
    if start < len(region):
        yield start, len(region), None


def line_runs(path: Path, fh: BinaryIO, max_bytes: int) -> Iterator[tuple[int, str | _Malformed]]:
    """(number of the first line, text of one or more whole lines joined by "\\n"), or (line number,
    _Malformed) for a line above max_bytes, which is skipped without holding it."""
    line, offset, tail, first = 1, 0, b"", True
    skipping = 0  # bytes so far of an overlong line whose end is not read yet
    try:
        while True:
            data = fh.read(READ_BYTES)
            eof = not data
            if (offset + len(tail)) // TRIM_BYTES != (offset + len(tail) + len(data)) // TRIM_BYTES:
                release_memory()
            if skipping:
                nl = data.find(b"\n")
                if nl < 0 and not eof:
                    skipping += len(data)
                    continue
                size = skipping + (len(data) if nl < 0 else nl + 1)
                yield line, _too_long(size, max_bytes)
                line, offset, skipping, first = line + 1, offset + size, 0, False
                data = b"" if nl < 0 else data[nl + 1 :]
            buf = tail + data
            cut = len(buf) if eof else buf.rfind(b"\n") + 1
            region, tail = buf[:cut], buf[cut:]
            if len(tail) > max_bytes:  # a line above the limit, still going: count it, don't keep it
                skipping, tail = len(tail), b""
            for start, end, size in _regions(region, max_bytes, eof):
                if size is not None:
                    yield line, _too_long(size, max_bytes)
                    line, first = line + 1, False
                else:
                    part = region[start:end]
                    yield from _good_lines(path, part, line, offset + start, first, eof and end == len(region))
                    line, first = line + part.count(b"\n"), False
            offset += len(region)
            if eof:
                return
    except (OSError, EOFError, zlib.error) as e:
        raise StageError(f"{path}: corrupt gzip data after line {line - 1} ({e}); re-create the .gz file") from None


def lines(path: Path, fh: BinaryIO, max_bytes: int) -> Iterator[tuple[int, str | _Malformed]]:
    """(line number, text without its newline | _Malformed for a line above max_line_mb)."""
    for start, run in line_runs(path, fh, max_bytes):
        if isinstance(run, _Malformed):
            yield start, run
        else:
            yield from enumerate(run.split("\n"), start)


# ---------------------------------------------------------------- records of each format
def text_docs(path: Path, fh: BinaryIO, max_bytes: int) -> Records:
    """Documents = blocks of non-blank lines separated by blank lines (a skipped overlong line does not
    end a block)."""
    carry: tuple[Loc, str] | None = None  # a block reaching the end of the last run: it may go on
    for start, run in line_runs(path, fh, max_bytes):
        if isinstance(run, _Malformed):
            yield f"{path}:{start}", run
            continue
        blocks = list(_NONBLANK_BLOCK.finditer(run))
        for i, m in enumerate(blocks):
            loc, text = Loc((path, start, run, m.start())), m.group()
            if i == 0 and carry is not None:
                if m.start() == 0:
                    loc, text = carry[0], carry[1] + "\n" + text
                else:
                    yield carry[0], carry[1].strip()
                carry = None
            if m.end() == len(run):
                carry = (loc, text)
            else:
                yield loc, text.strip()
        if carry is not None and not blocks:  # a run of blank lines ends the carried block
            yield carry[0], carry[1].strip()
            carry = None
    if carry is not None:
        yield carry[0], carry[1].strip()


def _json_object(line: str) -> dict | _Malformed:
    try:
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError:  # json's own errors and its extensions (NaN, lone surrogates, big ints)
            obj = json.loads(line)
    except json.JSONDecodeError as e:
        return _Malformed(f"not valid JSON ({e.msg} at column {e.colno}); fix the line, {SKIP_HINT}")
    except RecursionError:
        return _Malformed(f"JSON nested too deeply to read; flatten the line, {SKIP_HINT}")
    if isinstance(obj, dict):
        return obj
    return _Malformed(f"expected a JSON object per line, got {type(obj).__name__}; fix the line, {SKIP_HINT}")


def jsonl_records(path: Path, fh: BinaryIO, max_bytes: int) -> Records:
    for start, run in line_runs(path, fh, max_bytes):
        if isinstance(run, _Malformed):
            yield f"{path}:{start}", run
            continue
        for i, line in enumerate(run.split("\n")):
            if line.strip():
                yield Loc((path, start + i, "", 0)), _json_object(line)


def require(path: Path, found: list[str], kind: str, text_field: str) -> None:
    need = [text_field] if kind == "pretrain" else [] if {"messages", "conversations"} & set(found) else None
    need = ["instruction", "output"] if need is None else need
    if missing := [c for c in need if c not in found]:
        fix = (
            "set text_field: to the column holding the text"
            if kind == "pretrain"
            else "instruction data needs columns instruction, output (input optional), messages or conversations"
        )
        raise StageError(
            f"{path}: no column {', '.join(map(repr, missing))} (columns found: {', '.join(found) or 'none'}); {fix}"
        )


def csv_records(path: Path, fh: BinaryIO, max_bytes: int, kind: str, text_field: str) -> Records:
    csv.field_size_limit(max(max_bytes, 1 << 17))
    bad: list[int] = []

    def feed() -> Iterator[str]:
        for lineno, line in lines(path, fh, max_bytes):
            if isinstance(line, _Malformed):
                bad.append(lineno)
            yield ("" if isinstance(line, _Malformed) else line) + "\n"

    reader = csv.reader(feed())
    try:
        header = next(reader, None) or []
        require(path, header, kind, text_field)
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


def parquet_records(path: Path, kind: str, text_field: str) -> Records:
    import pyarrow.parquet as pq

    open_source(path).close()  # the empty / not-gzip checks
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
        require(path, names, kind, text_field)
        n = 0
        for batch in pf.iter_batches(batch_size=1024, columns=[text_field] if kind == "pretrain" else None):
            for rec in batch.to_pylist():
                n += 1
                yield f"{path}:row {n}", rec


def file_records(path: Path, kind: str, max_bytes: int, text_field: str) -> Records:
    ext = _ext(path)[0]
    if ext == ".parquet":
        yield from parquet_records(path, kind, text_field)
    else:
        with open_source(path) as fh:
            if ext == ".csv":
                yield from csv_records(path, fh, max_bytes, kind, text_field)
            else:
                yield from (jsonl_records if ext == ".jsonl" else text_docs)(path, fh, max_bytes)
