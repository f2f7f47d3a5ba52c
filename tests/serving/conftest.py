"""Fixtures of the serving tests: the fitted tiny chat model of the evaluate tests (it answers colour questions
about its tiny world and ends its answers with <|end|>) as a folder and as an engine. Helpers (a live server,
registering a version) are in _serving_fixtures.py. `index_dir`: a retrieval index of three short documents (DOCS),
chunked with the chat model's tokenizer."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from components.core.data_config import IndexConfig, Source, SyntheticConfig


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


DOCS = {
    "zorb-news.md": "Zorb moved to the coast. Zorb is violet now.",
    "quill.md": "Quill keeps bees and lives by the mill.",
    "tessa.txt": "Tessa sails the grey lake every morning.",
}


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory, chat_dir):
    """An index of DOCS only (no corpus), chunked with the served model's own tokenizer."""
    from components.retrieval.build import build_index

    root = tmp_path_factory.mktemp("rag")
    (root / "docs").mkdir()
    for name, text in DOCS.items():
        (root / "docs" / name).write_text(text, encoding="utf-8")
    shutil.copytree(chat_dir, root / "processed" / "tokenizer")
    cfg = IndexConfig(sources=[Source(path=str(root / "docs"))], include_pretrain=False, chunk_tokens=16, top_k=2)
    build_index(
        cfg,
        raw_dir=root / "raw",
        processed_dir=root / "processed",
        out_dir=root / "index",
        world=SyntheticConfig(),
        seed=1,
        sources_root=root,
        downloads_dir=root / "dl",
        cache_dir=root / "emb",
    )
    return root / "index"
