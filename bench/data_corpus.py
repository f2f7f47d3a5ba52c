"""The data bench's corpus: real text assembled locally, nothing downloaded.

The Python sources of this interpreter's standard library and installed packages (hundreds of MB of code,
docstrings and comments: the kind of text issue 13 measured), in a seeded shuffled order, written as .txt
files (ingest splits them into documents at blank lines). A smaller corpus is a prefix of a larger one: the
same kind of text at every size.
"""

from __future__ import annotations

import random
import sysconfig
from pathlib import Path

FILE_MB = 32
"""Size of each corpus file."""


def _sources() -> list[Path]:
    roots = sorted({sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"]})
    files = sorted(p for r in roots for p in Path(r).rglob("*.py") if p.is_file() and "__pycache__" not in p.parts)
    random.Random(0).shuffle(files)
    return files


def _text(path: Path) -> bytes | None:
    try:
        data = path.read_bytes()
        data.decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    return None if b"\x00" in data else data


def build(folder: Path, mb: float) -> int:
    """Write about `mb` MiB of text into folder/part-NNNN.txt (kept if already there); returns the bytes."""
    target = int(mb * 2**20)
    done = folder / ".done"
    if done.is_file() and int(done.read_text()) >= target:
        return int(done.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    size, part, out = 0, 0, None
    for path in _sources():
        data = _text(path)
        if data is None:
            continue
        if out is None or out.tell() >= FILE_MB * 2**20:
            if out is not None:
                out.close()
            out = open(folder / f"part-{part:04d}.txt", "wb")  # rotated by hand
            part += 1
        out.write(data + b"\n\n")
        size += len(data) + 2
        if size >= target:
            break
    if out:
        out.close()
    if size < target:
        raise SystemExit(f"only {size / 2**20:.0f} MiB of Python sources here; pass smaller --sizes")
    done.write_text(str(size))
    return size
