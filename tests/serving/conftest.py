"""Fixtures of the serving tests: the fitted tiny chat model of the evaluate tests (it answers colour questions
about its tiny world and ends its answers with <|end|>) as a folder and as an engine. Helpers (a live server,
registering a version) are in _serving_fixtures.py."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def chat_dir(tiny) -> Path:
    """The fitted tiny model's folder (model + tokenizer with a chat template)."""
    return tiny["models"]["sft"]


@pytest.fixture(scope="module")
def engine(chat_dir):
    import torch

    from components.serving.engine import load_folder

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models decode fastest on one thread, also on a busy machine
    yield load_folder(chat_dir)
    torch.set_num_threads(before)
