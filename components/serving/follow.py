"""The model a server answers with, following a registry alias.

`models:/NAME@ALIAS` is re-read when a request comes and the last check is `interval` seconds old
(0: on every request). When the alias moved, the new version is loaded (that request waits for it),
new requests go to it, and the old version finishes the requests it already has. A folder or a pinned
`models:/NAME/VERSION` never changes. If the registry cannot be read or the new version cannot be
loaded, the server keeps answering with the version it has and logs why.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from components.serving import deps
from components.serving.batcher import Batcher
from components.serving.engine import Engine, load_engine

log = logging.getLogger(__name__)
ALIAS_URI = re.compile(r"models:/([^/@]+)@([\w-]+)/?")


@dataclass
class Served:
    """One loaded version and the batcher that decodes its requests."""

    engine: Engine
    batcher: Batcher


@dataclass
class Follower:
    """Holds the current version of `ref`; `get()` returns it, first moving to a new alias target if due."""

    ref: str | Path | Engine
    interval: float = 5.0
    max_batch: int = 16
    current: Served | None = None
    _checked: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        engine = self.ref if isinstance(self.ref, Engine) else load_engine(self.ref)
        self.current = self._serve(engine)
        self._checked = time.monotonic()

    @property
    def alias(self) -> tuple[str, str] | None:
        """(name, alias) when following an alias, else None."""
        m = ALIAS_URI.fullmatch(self.ref) if isinstance(self.ref, str) else None
        return (m[1], m[2]) if m else None

    @property
    def names(self) -> set[str]:
        """Model ids a request may ask for: the name, name/version, the version's URI, and the served URI."""
        engine = self.current.engine
        ref = {self.ref} if isinstance(self.ref, str) and deps.is_uri(self.ref) else set()
        return {engine.name, engine.label, engine.fingerprint, *ref}

    def _serve(self, engine: Engine) -> Served:
        return Served(engine, Batcher(engine, max_batch=self.max_batch))

    def due(self) -> bool:
        """Whether `get()` will look at the registry (and may load a version): call it off the event loop then."""
        return self.alias is not None and time.monotonic() - self._checked >= self.interval

    def get(self) -> Served:
        if self.due():
            self._refresh()
        return self.current

    def _refresh(self) -> None:
        with self._lock:
            if time.monotonic() - self._checked < self.interval:
                return  # another request just checked
            name, alias = self.alias
            try:
                version = deps.alias_version(name, alias)
                if version is not None and version != self.current.engine.version:
                    self._swap(load_engine(f"models:/{name}/{version}"))
            except Exception as e:  # noqa: BLE001 - keep serving the version we have
                log.warning(
                    "could not follow models:/%s@%s: %s; still serving %s", name, alias, e, self.current.engine.label
                )
            self._checked = time.monotonic()

    def _swap(self, engine: Engine) -> None:
        old, self.current = self.current, self._serve(engine)
        old.batcher.close()
        log.info("models:/%s@%s moved: now serving %s (was %s)", *self.alias, engine.label, old.engine.label)

    def close(self) -> None:
        self.current.batcher.close()
