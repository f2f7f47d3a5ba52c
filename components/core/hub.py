"""Where `model.init_from` lives: a local folder, or `hf:ORG/NAME[@REVISION]` from the Hugging Face Hub.

A Hub model is downloaded into the HF cache (config, safetensors weights and tokenizer files only: pickled
weights are never fetched) when the network is allowed (`HF_HUB_OFFLINE=0`), read from the cache offline, and
otherwise refused with an error naming the setting. The resolved commit is the folder's name in the cache
(`snapshots/<commit>`); pretrain records it, and registration puts it into the version's lineage.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from components.core.context import StageError

HF_PREFIX = "hf:"
HF_SPEC = re.compile(r"^hf:(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[\w./-]+))?$")
KEY = "model.init_from"
DOWNLOAD = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken"]
"""What a download fetches: config, weights (safetensors only: pickles are never fetched), tokenizer files."""


@dataclass(frozen=True)
class Base:
    """A resolved `model.init_from`: the spec as written, the local folder, and the Hub commit (hf: only)."""

    spec: str
    path: Path
    revision: str | None = None

    @property
    def is_hub(self) -> bool:
        return self.spec.startswith(HF_PREFIX)


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in ("1", "true", "yes", "on")


def parse_hub(spec: str) -> tuple[str, str | None]:
    """`hf:ORG/NAME[@REVISION]` -> (repo id, revision or None); StageError on a malformed spec."""
    m = HF_SPEC.match(spec.strip())
    if not m:
        raise StageError(
            f"{KEY}: {spec!r} is not a Hub model; write hf:ORG/NAME or hf:ORG/NAME@REVISION "
            "(a branch, tag or commit), or a local folder"
        )
    return m["repo"], m["rev"]


def resolve(spec: str | None) -> Base | None:
    """The local folder of `model.init_from` (downloading an `hf:` model into the HF cache when allowed)."""
    if not spec:
        return None
    if not spec.startswith(HF_PREFIX):
        return Base(spec, Path(spec))
    repo, revision = parse_hub(spec)
    path = _snapshot(spec, repo, revision)
    return Base(spec, path, path.name)


def _snapshot(spec: str, repo: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    local_only = offline()
    try:
        folder = snapshot_download(
            repo,
            revision=revision,
            allow_patterns=DOWNLOAD,
            local_files_only=local_only,
            cache_dir=os.environ.get("HF_HUB_CACHE") or None,
        )
    except LocalEntryNotFoundError:
        if local_only:
            raise StageError(
                f"{KEY}: {spec} is not in the Hugging Face cache and downloads are off (HF_HUB_OFFLINE=1); "
                "run once with HF_HUB_OFFLINE=0 and network access to download it, or set model.init_from "
                "to a local checkpoint folder"
            ) from None
        raise StageError(
            f"{KEY}: {spec}: cannot reach the Hugging Face Hub to download it; check the network"
        ) from None
    except (GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise StageError(
            f"{KEY}: {spec}: {type(e).__name__} (the model or revision does not exist, or needs a token: "
            "log in with `hf auth login`)"
        ) from None
    except HfHubHTTPError as e:
        raise StageError(f"{KEY}: {spec}: download failed ({str(e).splitlines()[0]})") from None
    return Path(folder)
