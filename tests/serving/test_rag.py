"""Grounded answers (components/serving/rag.py): the passages put into the prompt within the room left for the
answer, `seedlm serve`'s per-request `rag` option and `sources` field (official openai client, plain and
streamed), `seedlm chat`'s --index/--rag/--no-rag and /rag, and the bad-input paths (4xx, exit 2)."""

from __future__ import annotations

import io
import shutil

import httpx
import openai
import pytest
from _serving_fixtures import ask, running

from components.serving.engine import chat_prompt
from components.serving.rag import ground
from components.serving.sampling import ParamError, SamplingParams
from components.serving.server import create_app
from components.serving.terminal import Chat, loop, main

pytestmark = pytest.mark.usefixtures("one_thread")
QUESTION = "What color is Zorb?"
SHORT = SamplingParams(max_tokens=4)


def test_ground_puts_the_best_passage_into_the_last_turn_within_the_budget(engine, index_dir):
    history = [*ask("Hello"), {"role": "assistant", "content": "Hi."}, *ask(QUESTION)]
    messages, sources = ground(engine, index_dir, history, SHORT)
    assert messages[:2] == history[:2], "older turns are left as they were"
    assert "zorb-news.md" in sources[0]["location"] and sources[0]["n"] == 1
    assert messages[-1]["content"].startswith("Context:\n[1] Zorb moved") and QUESTION in messages[-1]["content"]
    assert len(chat_prompt(engine, messages[-1:], SHORT).ids) <= engine.context - SHORT.max_tokens
    # a long answer leaves half the 64-token context: fewer passages fit, none past the budget
    _, fewer = ground(engine, index_dir, ask(QUESTION), SamplingParams(max_tokens=256))
    assert len(fewer) < len(sources) or len(sources) == 1
    with pytest.raises(ParamError, match="last message"):
        ground(engine, index_dir, [*ask(QUESTION), {"role": "assistant", "content": "x"}], SHORT)


@pytest.fixture(scope="module")
def rag_url(engine, index_dir):
    with running(create_app(engine, index=index_dir)) as url:
        yield url


@pytest.fixture(scope="module")
def plain_url(engine):
    with running(create_app(engine)) as url:
        yield url


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)


def test_serve_retrieves_by_default_and_returns_the_sources(engine, index_dir, rag_url, plain_url):
    client = _client(rag_url)
    grounded = client.chat.completions.create(model="sft", messages=ask(QUESTION), max_tokens=4)
    sources = grounded.model_extra["sources"]
    assert sources and "zorb-news.md" in sources[0]["location"] and {"n", "text", "location", "hash"} <= set(sources[0])
    one = client.chat.completions.create(
        model="sft", messages=ask(QUESTION), max_tokens=4, extra_body={"rag": {"top_k": 1}}
    )
    assert len(one.model_extra["sources"]) == 1
    off = client.chat.completions.create(model="sft", messages=ask(QUESTION), max_tokens=4, extra_body={"rag": False})
    assert "sources" not in off.model_extra
    assert one.usage.prompt_tokens > off.usage.prompt_tokens, "the passage is in the prompt"
    expected, found = ground(engine, index_dir, ask(QUESTION), SHORT)
    assert grounded.usage.prompt_tokens == len(chat_prompt(engine, expected, SHORT).ids) and found == sources
    plain = _client(plain_url).chat.completions.create(model="sft", messages=ask(QUESTION), max_tokens=4)
    assert "sources" not in plain.model_extra and plain.usage.prompt_tokens == off.usage.prompt_tokens
    assert httpx.get(f"{rag_url}/health").json()["index"] == str(index_dir)
    assert httpx.get(f"{plain_url}/health").json()["index"] is None


def test_a_stream_carries_the_sources_in_its_first_chunk(rag_url):
    chunks = list(
        _client(rag_url).chat.completions.create(model="sft", messages=ask(QUESTION), max_tokens=4, stream=True)
    )
    assert "zorb-news.md" in chunks[0].model_extra["sources"][0]["location"]
    assert all("sources" not in c.model_extra for c in chunks[1:])


@pytest.mark.parametrize(
    "rag, where, message",
    [
        ("yes", "url", "rag must be true, false"),
        ({"top_k": 0}, "url", "rag.top_k must be an integer from 1 to 50"),
        ({"k": 2}, "url", "unknown field 'k'"),
        (True, "plain", "no retrieval index here"),
        ({"top_k": 2}, "plain", "no retrieval index here"),
    ],
)
def test_bad_rag_options_are_400_naming_the_field(rag_url, plain_url, rag, where, message):
    url = rag_url if where == "url" else plain_url
    r = httpx.post(f"{url}/v1/chat/completions", json={"messages": ask(QUESTION), "max_tokens": 2, "rag": rag})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert message in error["message"] and error["param"].startswith("rag")


def test_chat_lists_the_sources_after_each_grounded_answer(engine, index_dir):
    out, err = io.StringIO(), io.StringIO()
    chat = Chat(engine, SHORT, index=index_dir)
    loop(chat, io.StringIO(f"{QUESTION}\n/rag off\n{QUESTION}\n/rag\n"), out, err)
    lines = err.getvalue().splitlines()
    assert lines[0].startswith("  [1] ") and lines[0].endswith("): Zorb moved to the") and "zorb-news.md" in lines[0]
    assert "(retrieval off)" in lines and sum(line.startswith("  [1] ") for line in lines) == 1
    assert lines[-1].startswith("(retrieval: off,")
    assert chat.history[0] == {"role": "user", "content": QUESTION}, "the history keeps the question, not passages"
    assert len(out.getvalue().splitlines()) == 2


def test_chat_cli_index_errors_and_the_pipeline_index(chat_dir, index_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no pipeline index here
    assert main([str(chat_dir), "--rag"]) == 2
    assert "--rag: no retrieval index" in capsys.readouterr().err
    assert main([str(chat_dir), "--index", str(tmp_path)]) == 2
    assert "not an index" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{QUESTION}\n"))
    assert main([str(chat_dir), "--index", str(index_dir), "--rag", "-p", "max_tokens=4"]) == 0
    assert "zorb-news.md" in capsys.readouterr().err
    shutil.copytree(index_dir, tmp_path / "data" / "index")  # the pipeline's index (params.yaml default paths.index)
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{QUESTION}\n"))
    assert main([str(chat_dir), "-p", "max_tokens=4"]) == 0
    assert "zorb-news.md" in capsys.readouterr().err


# ---------------------------------------------------------------- a registered version carries its index
@pytest.fixture(scope="module")
def registered(store, chat_dir, index_dir, tmp_path_factory) -> str:
    """The tiny chat model registered by the register stage from a repo whose pipeline index is `index_dir`."""
    from _serving_fixtures import make_repo, register_version

    root = tmp_path_factory.mktemp("rag-registered")
    shutil.copytree(index_dir, make_repo(root / "repo") / "data" / "index")
    return f"models:/seedlm-rag/{register_version(chat_dir, root, 'seedlm-rag', 0.4)}"


def test_the_pyfunc_answers_from_the_index_it_was_registered_with(registered, index_dir):
    import mlflow

    from components.core.io import read_json

    version = mlflow.MlflowClient().get_model_version("seedlm-rag", registered.rsplit("/", 1)[1])
    assert version.tags["data.index.content_sha256"] == read_json(index_dir / "seedlm.json")["result"]["content_sha256"]
    model = mlflow.pyfunc.load_model(registered)
    chat = {"messages": ask(QUESTION), "max_tokens": 4}
    sources = model.predict(chat)["custom_outputs"]["sources"]
    assert "zorb-news.md" in sources[0]["location"] and sources[0]["text"].startswith("Zorb")
    assert len(model.predict({**chat, "rag": {"top_k": 1}})["custom_outputs"]["sources"]) == 1
    off = model.predict({**chat, "rag": False})
    assert (
        "sources" not in off["custom_outputs"]
        and model.predict(chat)["usage"]["prompt_tokens"] > off["usage"]["prompt_tokens"]
    )
    streamed = list(model.predict_stream(chat))
    assert "zorb-news.md" in streamed[-1]["custom_outputs"]["sources"][0]["location"]
    with pytest.raises(mlflow.exceptions.MlflowException, match="rag.top_k"):
        model.predict({**chat, "rag": {"top_k": "all"}})


def test_serve_and_chat_use_the_index_the_version_carries(registered, tmp_path, monkeypatch, capsys):
    from components.serving.engine import load_engine

    engine = load_engine(registered)
    assert (engine.index / "seedlm.json").is_file() and (engine.index / "store").is_dir()
    with running(create_app(registered)) as url:
        r = _client(url).chat.completions.create(model="seedlm-rag", messages=ask(QUESTION), max_tokens=4)
        assert "zorb-news.md" in r.model_extra["sources"][0]["location"]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{QUESTION}\n"))
    assert main([registered, "--rag", "-p", "max_tokens=4"]) == 0
    assert "zorb-news.md" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{QUESTION}\n"))
    assert main([registered, "--no-rag", "-p", "max_tokens=4"]) == 0
    assert "zorb-news.md" not in capsys.readouterr().err
