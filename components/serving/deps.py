"""The seedlm modules serving depends on, imported in one place (so a move of those modules is one edit here)."""

from __future__ import annotations

from components.core.context import StageError
from components.core.io import atomic_dir
from components.data.chat import END_TOKEN, ROLES, prompt_text, stop_ids
from components.registry.models import (
    alias_version,
    download_model,
    hf_folder,
    is_uri,
    parse_model_uri,
    resolve_model,
    shipped_index,
    tracking_uri,
)
from components.training.model import load_model, save_model

__all__ = [
    "ROLES",
    "END_TOKEN",
    "StageError",
    "alias_version",
    "atomic_dir",
    "download_model",
    "hf_folder",
    "is_uri",
    "load_model",
    "parse_model_uri",
    "prompt_text",
    "resolve_model",
    "save_model",
    "shipped_index",
    "stop_ids",
    "tracking_uri",
]
