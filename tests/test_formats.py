"""components/data/formats.py: reading in blocks gives exactly the lines, documents and errors of reading
line by line (the reference implementation below), for any bytes, block size and line limit."""

from __future__ import annotations

import io
import itertools
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from components.core.context import StageError
from components.data import formats

PATH = Path("src.txt")


# ---------------------------------------------------------------- the line-by-line reference
def ref_lines(fh, max_bytes: int):
    lineno = offset = 0
    while raw := fh.readline(max_bytes + 1):
        lineno += 1
        if len(raw) > max_bytes and not raw.endswith(b"\n"):
            size = len(raw)
            while raw and not raw.endswith(b"\n"):
                raw = fh.readline(1 << 20)
                size += len(raw)
            offset += size
            yield lineno, ("too long", size)
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield lineno, ("bad utf-8", offset + e.start)
            return
        offset += len(raw)
        text = text.removeprefix("\ufeff") if lineno == 1 else text
        yield lineno, text.removesuffix("\n").removesuffix("\r")


def ref_docs(fh, max_bytes: int):
    start, block = 0, []
    for lineno, line in itertools.chain(ref_lines(fh, max_bytes), [(0, "")]):
        if isinstance(line, tuple):
            yield lineno, line
        elif line.strip():
            start = start if block else lineno
            block.append(line)
        elif block:
            yield start, "\n".join(block).strip()
            block = []


# ---------------------------------------------------------------- the block reader, in the same terms
def got_lines(data: bytes, max_bytes: int):
    out = []
    try:
        for lineno, line in formats.lines(PATH, io.BytesIO(data), max_bytes):
            out.append((lineno, "too long") if isinstance(line, formats._Malformed) else (lineno, line))
    except StageError as e:
        msg = str(e)
        out.append((int(msg.split(":")[1]), ("bad utf-8", int(msg.split("byte offset ")[1].split()[0]))))
    return out


def got_docs(data: bytes, max_bytes: int):
    out = []
    try:
        for loc, rec in formats.text_docs(PATH, io.BytesIO(data), max_bytes):
            line = int(str(loc).rsplit(":", 1)[1])
            out.append((line, "too long") if isinstance(rec, formats._Malformed) else (line, rec))
    except StageError:
        out.append("bad utf-8")
    return out


def expect_lines(data: bytes, max_bytes: int):
    out = list(ref_lines(io.BytesIO(data), max_bytes))
    return [(n, "too long") if isinstance(x, tuple) and x[0] == "too long" else (n, x) for n, x in out]


def expect_docs(data: bytes, max_bytes: int):
    out = []
    for n, x in ref_docs(io.BytesIO(data), max_bytes):
        if isinstance(x, tuple) and x[0] == "bad utf-8":
            out.append("bad utf-8")
            break
        out.append((n, "too long") if isinstance(x, tuple) else (n, x))
    return out


pieces = st.sampled_from(
    [
        b"a",
        b"b c",
        b"\n",
        b"\r\n",
        b"\r",
        b" ",
        b"\t",
        b"\x0c",
        b"\n\n",
        b"  \n",
        b"\xef\xbb\xbf",
        b"\xc3\xa9",
        b"\xe2\x80\xa8",
        b"\xff",
        b"word " * 7,
        b"\x1c",
        b"\xc2\x85",
    ]
)
texts = st.lists(pieces, max_size=40).map(b"".join)


@settings(max_examples=400, deadline=None)
@given(texts, st.integers(1, 40), st.integers(1, 64))
def test_lines_equal_reading_line_by_line(data, max_bytes, block):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(formats, "READ_BYTES", block)
        assert got_lines(data, max_bytes) == expect_lines(data, max_bytes)


@settings(max_examples=400, deadline=None)
@given(texts, st.integers(1, 40), st.integers(1, 64))
def test_documents_equal_blocks_of_lines(data, max_bytes, block):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(formats, "READ_BYTES", block)
        assert got_docs(data, max_bytes) == expect_docs(data, max_bytes)


def test_errors_name_line_offset_and_fix():
    data = b"fine\nline two\ncaf\xe9 au lait\nnever read\n"
    with pytest.raises(StageError, match=r"src.txt:3: not valid UTF-8 at byte offset 17 \(b'\\xe9 au'\).*iconv"):
        list(formats.lines(PATH, io.BytesIO(data), 100))
    for block in (1 << 22, 4096):  # the long line read at once, or over many blocks
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(formats, "READ_BYTES", block)
            long = b"x" * (3 * 2**19 - 1) + b"\n"  # 1.50 MiB with its newline
            got = list(formats.lines(PATH, io.BytesIO(b"ok\n" + long + b"end"), 2**20))
        assert got[0] == (1, "ok") and got[2] == (3, "end") and got[1][0] == 2
        assert "line of 1.50 MiB is above max_line_mb (1); split it" in str(got[1][1])
