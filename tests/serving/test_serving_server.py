"""`seedlm serve` live on 127.0.0.1, driven by the official openai client: a registered model (real register stage,
sqlite store) served by alias; plain, streaming, multi-turn and concurrent requests; following the alias to a newly
promoted version; every kind of bad request answered 4xx with an error object; the API key."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import mlflow
import openai
import pytest
from _serving_fixtures import QUESTIONS, ask, register_version, running

from components.serving.engine import chat_prompt, generate, text_prompt
from components.serving.sampling import SamplingParams, sampling_params
from components.serving.server import create_app

pytestmark = pytest.mark.usefixtures("one_thread")
NAME = "seedlm-serve"
PARAMS = SamplingParams(max_tokens=12)


@pytest.fixture(scope="module")
def server(store, chat_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    assert register_version(chat_dir, root, NAME, exact_match=0.5) == "1"
    app = create_app(f"models:/{NAME}@champion", follow_interval=0, max_batch=4, max_body_bytes=100_000)
    with running(app) as url:
        yield SimpleNamespace(url=url, root=root, app=app)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def expected(engine, messages, params: SamplingParams = PARAMS) -> str:
    """What the engine answers (the same weights as the registered version)."""
    return generate(engine, [chat_prompt(engine, messages, params)], params)[0].text


def test_plain_chat_answers_and_names_the_version(client, engine):
    r = client.chat.completions.create(model=NAME, messages=ask(QUESTIONS[0]), max_tokens=12)
    assert r.choices[0].message.content == expected(engine, ask(QUESTIONS[0])) != ""
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.role == "assistant"
    assert (r.model, r.system_fingerprint) == (f"{NAME}/1", f"models:/{NAME}/1")
    assert r.usage.completion_tokens >= 2 and r.usage.prompt_tokens > 5 and r.trimmed_messages == 0
    assert [m.id for m in client.models.list().data] == [NAME]
    assert client.models.retrieve(NAME).version == "1"


def test_streaming_chat_sends_openai_chunks(client, engine):
    chunks = list(
        client.chat.completions.create(
            model=NAME, messages=ask(QUESTIONS[2]), max_tokens=12, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected(engine, ask(QUESTIONS[2])) and len([c for c in chunks if c.choices]) > 3  # token by token
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 3
    assert {c.model for c in chunks} == {f"{NAME}/1"}


def test_a_stream_is_written_at_most_every_interval_after_its_first_text():
    """From the decoding thread, a stream's first text and every finish wake the event loop at once; more text
    within the interval of the last wake-up waits for the next one (one write per few tokens, not per token)."""
    import asyncio

    from components.serving.api import _Inbox, _Relay

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        relay = _Relay(loop)
        slow, every = _Inbox(loop, interval=60.0), _Inbox(loop, interval=0.0)

        async def put(inbox, event) -> None:
            await asyncio.to_thread(relay.put, inbox, event)  # as the batcher's thread does

        async def nothing_yet(inbox) -> None:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(inbox.take(), 0.3)

        await put(slow, (0, "The", None))
        assert await asyncio.wait_for(slow.take(), 5) == [(0, "The", None)]  # the first text: at once
        await put(slow, (0, " sky", None))
        await nothing_yet(slow)  # held
        await put(slow, (0, " is", "stop"))
        assert await asyncio.wait_for(slow.take(), 5) == [(0, " sky", None), (0, " is", "stop")]
        for word in ("a", "b"):  # interval 0: every token wakes the loop
            await put(every, (1, word, None))
            assert await asyncio.wait_for(every.take(), 5) == [(1, word, None)]

    asyncio.run(scenario())


def test_multi_turn_conversation(client, engine):
    first = client.chat.completions.create(model=NAME, messages=ask(QUESTIONS[0]), max_tokens=12)
    convo = [
        {"role": "system", "content": "Answer briefly."},
        *ask(QUESTIONS[0]),
        {"role": "assistant", "content": first.choices[0].message.content},
        *ask(QUESTIONS[1]),
    ]
    r = client.chat.completions.create(model=NAME, messages=convo, max_tokens=12)
    assert r.choices[0].message.content == expected(engine, convo)
    assert r.usage.prompt_tokens == len(chat_prompt(engine, convo, PARAMS).ids) > first.usage.prompt_tokens


def test_completions_plain_and_streaming(client, engine):
    prompt = "The color of Zorb is"
    want = generate(engine, [text_prompt(engine, prompt, PARAMS)], sampling_params(PARAMS, max_tokens=5))[0].text
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=5)
    assert r.choices[0].text == want and r.object == "text_completion" and r.model == f"{NAME}/1"
    streamed = client.completions.create(model=NAME, prompt=prompt, max_tokens=5, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == want


def test_n_choices_with_a_seed_are_reproducible(client):
    def sample():
        r = client.chat.completions.create(
            model=NAME, messages=ask(QUESTIONS[2]), max_tokens=8, n=3, temperature=1.8, seed=5
        )
        return [c.message.content for c in r.choices]

    first = sample()
    assert len(first) == 3 and sample() == first and len(set(first)) > 1


def test_concurrent_requests_each_get_their_own_answer(client, engine):
    jobs = [(q, t) for q in QUESTIONS for t in (0.0, 1.2)]

    def one(job):
        q, t = job
        return (
            client.chat.completions.create(
                model=NAME, messages=ask(q), max_tokens=12, temperature=t, seed=3, extra_body={"top_k": 8}
            )
            .choices[0]
            .message.content
        )

    with ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(one, jobs))
    want = [expected(engine, ask(q), sampling_params(PARAMS, temperature=t, seed=3, top_k=8)) for q, t in jobs]
    assert got == want


BAD = [  # (path, body or raw bytes, status, param, code)
    ("chat/completions", {"model": "gpt-4", "messages": ask("hi")}, 404, "model", "model_not_found"),
    ("chat/completions", {"model": NAME, "messages": []}, 400, "messages", None),
    ("chat/completions", {"model": NAME}, 400, "messages", None),
    (
        "chat/completions",
        {"model": NAME, "messages": [{"role": "wizard", "content": "hi"}]},
        400,
        "messages[0].role",
        None,
    ),
    (
        "chat/completions",
        {"model": NAME, "messages": [{"role": "user", "content": 7}]},
        400,
        "messages[0].content",
        None,
    ),
    ("chat/completions", {"model": NAME, "messages": ["hi"]}, 400, "messages[0]", None),
    ("chat/completions", {"model": NAME, "messages": ask("Zorb " * 100)}, 400, "messages", "context_length_exceeded"),
    ("chat/completions", {"model": NAME, "messages": ask("hi"), "temperature": 9}, 400, "temperature", None),
    ("chat/completions", {"model": NAME, "messages": ask("hi"), "top_p": 0}, 400, "top_p", None),
    ("chat/completions", {"model": NAME, "messages": ask("hi"), "max_tokens": 0}, 400, "max_tokens", None),
    ("chat/completions", {"model": NAME, "messages": ask("hi"), "max_tokens": "ten"}, 400, "max_tokens", None),
    ("chat/completions", {"model": NAME, "messages": ask("hi"), "n": 0}, 400, "n", None),
    ("chat/completions", {"model": NAME, "messages": ask("hi"), "stop": ["a"] * 5}, 400, "stop", None),
    ("chat/completions", {"model": NAME, "messages": ask("hi"), "stream": "yes"}, 400, "stream", None),
    ("chat/completions", {"model": NAME, "messages": ask("hi"), "logprobs": True}, 400, "logprobs", None),
    ("chat/completions", {"model": NAME, "messages": ask("x" * 120_000)}, 413, None, "request_too_large"),
    ("chat/completions", b'{"model": "seedlm-serve", "messages": [', 400, None, "invalid_json"),
    ("chat/completions", b"\xff\xfe", 400, None, "invalid_json"),
    ("chat/completions", [1, 2], 400, None, "invalid_json"),
    ("chat/completions", b"[" * 50_000 + b"]" * 50_000, 400, None, "invalid_json"),
    ("chat/completions", b'{"messages": [{"role": "user", "content": "a\\ud800"}]}', 400, "messages[0].content", None),
    ("chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "stop": "\\udfff"}', 400, "stop", None),
    ("completions", {"model": NAME, "prompt": [1, 2, 3]}, 400, "prompt", None),
    ("completions", {"model": NAME, "prompt": ""}, 400, "prompt", None),
    ("completions", {"model": NAME, "prompt": "Zorb " * 100}, 400, "prompt", "context_length_exceeded"),
    ("nowhere", {}, 404, None, "not_found"),
]


@pytest.mark.parametrize(("path", "body", "status", "param", "code"), BAD)
def test_bad_requests_get_4xx_with_an_error_object(server, client, path, body, status, param, code):
    raw = body if isinstance(body, bytes) else None
    r = httpx.post(
        f"{server.url}/v1/{path}",
        content=raw,
        json=None if raw else body,
        timeout=30,
        headers={"content-type": "application/json"},
    )
    err = r.json()["error"]
    assert r.status_code == status and set(err) == {"message", "type", "param", "code"} and err["message"]
    assert (err["param"], err["code"]) == (param, code or err["code"])
    if param:
        assert param.split("[")[0] in err["message"]
    ok = client.chat.completions.create(model=NAME, messages=ask("hi"), max_tokens=1)  # still serving
    assert ok.choices[0].finish_reason in ("stop", "length")


def test_wrong_method_and_the_web_page(server):
    r = httpx.get(f"{server.url}/v1/chat/completions")
    assert r.status_code == 405 and r.json()["error"]["message"]
    page = httpx.get(f"{server.url}/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"] and "<html" in page.text
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "ok" and health["model"] == f"{NAME}/1"


def test_api_key_is_checked_as_bearer_token(engine):
    with running(create_app(engine, api_key="s3cret")) as url:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = httpx.get(f"{url}/v1/models", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        keyed = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0)
        r = keyed.chat.completions.create(model=engine.name, messages=ask(QUESTIONS[0]), max_tokens=4)
        assert r.choices[0].message.content
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0).models.list()
        assert httpx.get(f"{url}/health").status_code == 200  # health and the page stay open


def test_a_failing_model_is_a_500_and_the_server_recovers(engine):
    """A fault of the server (not the client) is a 500 with an error object; the next request is served."""
    from dataclasses import replace

    class Flaky:
        """The model, failing its first forward pass."""

        def __init__(self, model):
            self.model, self.calls, self.device, self.config = model, 0, model.device, model.config

        def __call__(self, **kw):
            self.calls += 1
            if self.calls == 1:
                raise RuntimeError("simulated fault")
            return self.model(**kw)

    with running(create_app(replace(engine, model=Flaky(engine.model)))) as url:
        body = {"model": engine.name, "messages": ask(QUESTIONS[0]), "max_tokens": 4}
        r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]


def test_an_absent_model_fails_at_start_with_the_fix(store):
    from components.serving import deps

    with pytest.raises(deps.StageError, match="no version of 'absent' has alias 'champion'"):
        create_app("models:/absent@champion")


def test_a_public_host_needs_an_api_key(engine, monkeypatch):
    from components.serving import deps
    from components.serving.server import is_loopback, serve

    monkeypatch.delenv("SEEDLM_API_KEY", raising=False)
    with pytest.raises(deps.StageError, match="SEEDLM_API_KEY"):
        serve(engine, host="0.0.0.0")
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4") and not is_loopback("example.org")


def test_chat_cli_through_a_pipe_answers_from_the_registry(server, engine):
    """`echo ... | seedlm chat models:/NAME@champion`: one answer per input line, the conversation kept."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri()}
    run = subprocess.run(
        [sys.executable, "-m", "components.serving.terminal", f"models:/{NAME}@champion"],
        input=f"{QUESTIONS[0]}\n\n{QUESTIONS[2]}\n",
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    first = expected(engine, ask(QUESTIONS[0]), SamplingParams())
    history = [*ask(QUESTIONS[0]), {"role": "assistant", "content": first}, *ask(QUESTIONS[2])]
    assert run.stdout.splitlines() == [first, expected(engine, history, SamplingParams())] and first


def test_follows_the_alias_to_a_newly_promoted_version(server, client, sft_dir):
    """Runs last in this file: it moves the alias (and back)."""
    from mlflow import MlflowClient

    assert register_version(sft_dir, server.root, NAME, exact_match=0.9) == "2"  # a better model: promoted
    assert str(MlflowClient().get_model_version_by_alias(NAME, "champion").version) == "2"
    r = client.chat.completions.create(model=NAME, messages=ask(QUESTIONS[0]), max_tokens=4)
    assert (r.model, r.system_fingerprint) == (f"{NAME}/2", f"models:/{NAME}/2")
    assert client.models.retrieve(NAME).version == "2"
    MlflowClient().set_registered_model_alias(NAME, "champion", "1")  # rolled back by hand
    r = client.chat.completions.create(model=NAME, messages=ask(QUESTIONS[0]), max_tokens=4, stream=True)
    assert {c.model for c in r} == {f"{NAME}/1"}
