"""The web chat page in a real browser: headless Chromium (Debian's /usr/bin/chromium, driven by Playwright)
against the real server (create_app + uvicorn on 127.0.0.1) answering with a tiny model registered in a
real MLflow sqlite store. Without Chromium the tests skip (run `make browser`); in CI (CI=true) they fail.

    SEEDLM_SCREENSHOT=docs/chat-page.png   also save a screenshot of the page with two answers
    SEEDLM_WEB_MODEL=models:/seedlm@champion   serve that model instead of the tiny one (make screenshot)
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from _serving_fixtures import QUESTIONS as TINY_QUESTIONS
from _serving_fixtures import register_version, running

CHROMIUM = Path(os.environ.get("SEEDLM_CHROMIUM", "/usr/bin/chromium"))
WEB_MODEL = os.environ.get("SEEDLM_WEB_MODEL")
QUESTIONS = ("Where does Hustum live?", "What is Hustum's favourite food?") if WEB_MODEL else TINY_QUESTIONS[2::-2]
"""The screenshot's model knows the embedded world; the tiny fitted model its tiny world (the first answer is a
sentence, so it streams in several pieces)."""
KEY = "test-key-123"
pytestmark = pytest.mark.usefixtures("one_thread")


def missing(reason: str) -> None:
    """Skip outside CI; in CI (CI=true) the machine set-up is part of the build, so fail."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: the browser test must run; `make browser` installs Chromium)")
    pytest.skip(f"{reason}: run `make browser` (apt-get install chromium) to run the browser tests")


# ---------------------------------------------------------------- browser, model, servers
@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.is_file():
        missing(f"Chromium not found at {CHROMIUM}")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("the playwright package is not installed (pip install -e '.[dev]')")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def model_ref(request, tmp_path_factory) -> str:
    """The served model: SEEDLM_WEB_MODEL, else the fitted tiny model registered as champion of a fresh store."""
    if WEB_MODEL:
        return WEB_MODEL
    request.getfixturevalue("store")  # conftest: a real sqlite store, current while this module runs
    register_version(request.getfixturevalue("chat_dir"), tmp_path_factory.mktemp("web"), "seedlm-web", 0.4)
    return "models:/seedlm-web@champion"


@dataclass
class Server:
    app: Any
    url: str

    @property
    def engine(self) -> Any:
        return self.app.state.follower.current.engine


def serve(model: Any, **app_kw: Any) -> Iterator[Server]:
    """create_app(...) served by uvicorn on a free 127.0.0.1 port in a thread of this process."""
    from components.serving.server import create_app

    app = create_app(model, **app_kw)
    with running(app) as url:
        yield Server(app, url + "/")


@pytest.fixture(scope="module")
def server(model_ref) -> Iterator[Server]:
    yield from serve(model_ref, follow_interval=0)


@pytest.fixture(scope="module")
def keyed_server(server) -> Iterator[Server]:
    """The same loaded model behind an API key."""
    yield from serve(server.engine, api_key=KEY)


@pytest.fixture
def page(browser) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 960, "height": 720})
    pg = context.new_page()
    pg.errors = []
    pg.on("pageerror", lambda e: pg.errors.append(str(e)))
    yield pg
    context.close()
    assert not pg.errors, f"JavaScript errors on the page: {pg.errors}"


# ---------------------------------------------------------------- helpers
def chat_requests(page: Any) -> list[dict]:
    """The JSON bodies the page POSTs to /v1/chat/completions, as they are sent."""
    sent: list[dict] = []
    page.on(
        "request", lambda r: sent.append(json.loads(r.post_data)) if r.url.endswith("/v1/chat/completions") else None
    )
    return sent


def count_updates(page: Any) -> None:
    """Count the changes of answer texts on the page (window.seedlmUpdates): one per streamed piece of text."""
    page.evaluate("""() => { window.seedlmUpdates = 0;
        const changed = (records) => { for (const r of records) window.seedlmUpdates += r.target.matches('.content'); };
        new MutationObserver(changed).observe(document.getElementById('log'), {subtree: true, childList: true}); }""")


def ask(page: Any, question: str) -> str:
    """Type `question`, send it with Enter, wait for the answer to finish; returns the answer's text."""
    from playwright.sync_api import expect

    n = page.locator("#log > li.assistant").count()
    page.fill("#question", question)
    page.press("#question", "Enter")
    last = page.locator("#log > li.assistant").nth(n)
    expect(last.locator(".meta")).to_be_visible(timeout=60_000)  # shown when the stream has ended
    expect(last).not_to_have_class("streaming")
    return last.locator(".content").inner_text()


def greedy_answer(engine: Any, question: str) -> str:
    """What the engine answers on its own (greedy, the page's default of 128 max tokens)."""
    from components.serving.engine import chat_prompt, generate
    from components.serving.sampling import SamplingParams

    params = SamplingParams(max_tokens=128)
    [done] = generate(engine, [chat_prompt(engine, [{"role": "user", "content": question}], params)], params)
    return done.text


def screenshot(page: Any) -> None:
    if target := os.environ.get("SEEDLM_SCREENSHOT"):
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        page.set_viewport_size({"width": 900, "height": 580})
        page.screenshot(path=target)


# ---------------------------------------------------------------- tests
def test_page_streams_answers_keeps_the_conversation_and_starts_a_new_one(page, server):
    from playwright.sync_api import expect

    label = server.engine.label  # "seedlm-web/1": NAME/VERSION
    sent = chat_requests(page)
    page.goto(server.url)
    expect(page.locator("#model-label")).to_have_text(label)
    count_updates(page)

    first = ask(page, QUESTIONS[0])
    assert first.strip() and first == greedy_answer(server.engine, QUESTIONS[0])  # the model's own answer, whole
    assert page.evaluate("window.seedlmUpdates") >= 2  # the answer appeared piece by piece, as it streamed
    assert page.locator("#log > li.assistant .meta").first.inner_text().startswith(label)
    assert sent[0]["stream"] is True and sent[0]["messages"] == [{"role": "user", "content": QUESTIONS[0]}]

    second = ask(page, QUESTIONS[1])
    assert second.strip()
    assert [m["role"] for m in sent[1]["messages"]] == ["user", "assistant", "user"]  # the whole conversation
    assert sent[1]["messages"][1]["content"] == first and sent[1]["messages"][2]["content"] == QUESTIONS[1]
    expect(page.locator("#log > li")).to_have_count(4)
    screenshot(page)

    page.click("#new-chat")
    expect(page.locator("#log > li")).to_have_count(0)
    expect(page.locator("#empty")).to_be_visible()
    ask(page, QUESTIONS[1])
    assert sent[2]["messages"] == [{"role": "user", "content": QUESTIONS[1]}]  # history cleared for the model too


def test_a_rejected_request_shows_the_servers_message_and_stays_out_of_the_history(page, server):
    from playwright.sync_api import expect

    sent = chat_requests(page)
    page.goto(server.url)
    page.fill("#question", "far too long for a tiny context " * 400)
    page.press("#question", "Enter")
    expect(page.locator("#error")).to_contain_text("Error 400")
    expect(page.locator("#log > li.assistant.failed")).to_have_count(1)
    ask(page, QUESTIONS[0])
    assert sent[1]["messages"] == [{"role": "user", "content": QUESTIONS[0]}]


def test_sources_of_a_grounded_answer_are_listed(page, server, index_dir):
    """The same model served with a retrieval index: the answer's sources (retrieval/context.py) under it."""
    for grounded in serve(server.engine, index=index_dir):
        sent = chat_requests(page)
        page.goto(grounded.url)
        page.click("#settings > summary")
        page.fill("#max-tokens", "4")  # the tiny model's 64-token context: room for the passage
        ask(page, "What color is Zorb?")
        items = page.locator("#log > li.assistant .sources li").all_inner_texts()
        assert items and items[0].startswith(f"{index_dir.parent / 'docs'} (") and "zorb-news.md" in items[0]
        assert "— Zorb moved to the (score " in items[0]
        page.uncheck("#rag")  # "Answer from documents" off: the next answer has no sources
        ask(page, "What color is Zorb?")
        assert [r["rag"] for r in sent] == [True, False]
        assert page.locator("#log > li.assistant").nth(1).locator(".sources").count() == 0


def test_without_an_index_the_page_offers_no_retrieval(page, server):
    sent = chat_requests(page)
    page.goto(server.url)
    page.click("#settings > summary")
    ask(page, QUESTIONS[0])
    assert page.locator("#rag").is_hidden() and "rag" not in sent[0]


def test_the_api_key_is_asked_for_sent_and_remembered(page, keyed_server):
    from playwright.sync_api import expect

    label = keyed_server.engine.label
    page.goto(keyed_server.url)
    expect(page.locator("#error")).to_contain_text("API key")
    expect(page.locator("#api-key")).to_be_visible()  # Settings opened for it
    page.fill("#api-key", KEY)
    page.dispatch_event("#api-key", "change")
    expect(page.locator("#model-label")).to_have_text(label)
    assert ask(page, QUESTIONS[0]).strip()
    page.reload()
    expect(page.locator("#model-label")).to_have_text(label)  # the key came back from localStorage
    assert page.input_value("#api-key") == KEY
