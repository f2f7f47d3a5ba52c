"""Remote ingest sources: http(s) downloads (size-limited, checksummed, atomic) and Hugging Face datasets.

Credentials never go into params.yaml: a url may name environment variables, `{env:NAME}`, expanded only
at download time (e.g. `https://{env:CORPUS_USER}:{env:CORPUS_TOKEN}@host/corpus.txt.gz`), so params,
dvc.lock, MLflow and logs hold the placeholder; every url shown (messages, manifest, progress) is redacted.
(Not `${NAME}`: DVC and `dvc exp run -S` read that as their own interpolation.)
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from components.core.context import StageError
from components.core.data_config import Source
from components.core.io import disk_error, fsync_dir, sha256_file
from components.core.redact import redact

_VAR = re.compile(r"\{env:([A-Za-z_][A-Za-z0-9_]*)\}")
PART = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)\.part")


def file_ext(path: Path | str) -> tuple[str, bool]:
    """('.jsonl', gzipped?) from a file name like corpus.jsonl.gz."""
    name = str(path).lower()
    return os.path.splitext(name.removesuffix(".gz"))[1], name.endswith(".gz")


def expand(url: str) -> str:
    """The url with `{env:NAME}` replaced by environment variables (StageError naming a missing one)."""

    def value(m: re.Match) -> str:
        if m[1] not in os.environ:
            raise StageError(f"{url}: environment variable {m[1]} is not set; export it before running ingest")
        return os.environ[m[1]]

    return _VAR.sub(value, url)


def _sweep_parts(folder: Path) -> None:
    """Remove partial downloads of processes that were killed."""
    for p in folder.glob(".*.part"):
        m = PART.fullmatch(p.name)
        if m and int(m["pid"]) != os.getpid():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(m["pid"]), 0)
                continue
            p.unlink(missing_ok=True)


def download(src: Source, exts: tuple[str, ...], max_mb: int, cache_dir: Path) -> Path:
    """Stream an http(s) url into `cache_dir/<sha256 prefix>/` once (temp file, fsync, rename) and verify
    its size and sha256. The file name comes from the url's path but never leaves that folder."""
    import requests

    url, shown = expand(src.url), redact(src.url)
    if urlparse(url).scheme not in ("http", "https"):
        raise StageError(f"{shown}: only http(s) urls are downloaded; use a `path:` source for local files")
    name = Path(urlparse(url).path).name or "download"
    if file_ext(name)[0] not in exts:
        raise StageError(
            f"{shown}: cannot tell the file type from the url; it must end in one of {', '.join(exts)} (optionally .gz)"
        )
    folder = (cache_dir / src.sha256[:16]).resolve()
    dest = folder / name
    if dest.parent != folder or name.startswith("."):
        raise StageError(f"{shown}: the file name {name!r} would leave the download folder {folder}; rename it")
    if dest.is_file() and sha256_file(dest) == src.sha256:
        return dest
    limit = max_mb * 2**20
    tmp, h, size = dest.with_name(f".{name}.{os.getpid()}.part"), hashlib.sha256(), 0
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _sweep_parts(folder)
        with requests.get(url, stream=True, timeout=30) as r:
            if r.status_code != 200:
                raise StageError(f"{shown}: HTTP {r.status_code}; check the url in ingest sources")
            if int(r.headers.get("Content-Length") or 0) > limit:
                raise StageError(
                    f"{shown}: {int(r.headers['Content-Length']) / 2**20:.1f} MiB is larger than "
                    f"max_download_mb ({max_mb}); raise it or use a smaller file"
                )
            with open(tmp, "wb") as f:
                for chunk in r.iter_content(1 << 20):
                    size += len(chunk)
                    if size > limit:
                        raise StageError(
                            f"{shown}: larger than max_download_mb ({max_mb}); raise it or use a smaller file"
                        )
                    h.update(chunk)
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
        if h.hexdigest() != src.sha256:
            raise StageError(
                f"{shown}: sha256 mismatch: expected {src.sha256}, got {h.hexdigest()}; if the "
                "file changed on purpose, fix `sha256:` of this source in params.yaml"
            )
        os.replace(tmp, dest)
        fsync_dir(folder)
    except requests.RequestException as e:
        raise StageError(
            f"{shown}: could not download (offline? {type(e).__name__}: {redact(str(e))}); "
            f"put the file into {folder}/ by hand or use a `path:` source"
        ) from None
    except OSError as e:
        if msg := disk_error(e, folder):
            raise StageError(msg) from None
        raise
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    return dest


def hf_records(src: Source) -> Iterator[tuple[str, Any]]:
    """(location, row) of a Hugging Face dataset, streamed; StageError when it cannot be loaded."""
    n, t0 = 0, time.perf_counter()
    try:  # an error raised by the consumer closes this generator (GeneratorExit): not caught here
        import datasets

        for n, rec in enumerate(datasets.load_dataset(src.hf, src.hf_config, split=src.split, streaming=True), 1):
            yield f"hf:{src.hf}:row {n}", rec
    except Exception as e:  # noqa: BLE001 - any hub/dataset failure becomes one StageError naming the source
        raise StageError(
            f"could not load Hugging Face dataset {src.hf!r} ({src.hf_config}/{src.split}; offline?) "
            f"after {n} rows in {time.perf_counter() - t0:.0f} s: {type(e).__name__}: {redact(str(e))}; "
            "check the name, or export the data to a file and use a `path:` source"
        ) from None
