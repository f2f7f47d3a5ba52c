"""Fixtures of the retrieval tests: the tiny world (ingest + preprocess) and its default index, built once."""

import pytest


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    from _retrieval_fixtures import build_world

    return build_world(tmp_path_factory.mktemp("retrieval-world"))


@pytest.fixture(scope="session")
def default_index(world, tmp_path_factory):
    """The tiny world's index with the default settings: (folder, result)."""
    from _retrieval_fixtures import build

    out = tmp_path_factory.mktemp("retrieval-index") / "index"
    return out, build(world, out)
