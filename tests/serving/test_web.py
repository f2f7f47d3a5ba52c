"""The web chat page in a real browser: headless Chromium (Debian's /usr/bin/chromium, driven by Playwright)
against the real server (create_app + uvicorn on 127.0.0.1) answering with a tiny model registered in a
real MLflow sqlite store. Without Chromium the tests skip (run `make browser`); in CI (CI=true) they fail.

    SEEDLM_SCREENSHOT=docs/chat-page.png   also save a screenshot of the page with two answers
    SEEDLM_WEB_MODEL=models:/seedlm@champion   serve that model instead of the tiny one (make screenshot)
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _register_fixtures import LOCK, PROCESSED, RAW, do_register, git, write_eval
from servers import free_port

CHROMIUM = Path(os.environ.get("SEEDLM_CHROMIUM", "/usr/bin/chromium"))
QUESTIONS = ("Where does Hustum live?", "What is Hustum's favourite colour?")
"""About the embedded world (the tiny model answers nonsense; the screenshot's model knows)."""
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
    """The served model: SEEDLM_WEB_MODEL, else a tiny model registered as champion of a fresh store."""
    if os.environ.get("SEEDLM_WEB_MODEL"):
        return os.environ["SEEDLM_WEB_MODEL"]
    from components.core.config import RegisterConfig

    request.getfixturevalue("store")  # conftest: a real sqlite store, current while this module runs
    sft_dir = request.getfixturevalue("sft_dir")
    repo = tmp_path_factory.mktemp("repo")
    (repo / "dvc.lock").write_text(LOCK.format(raw=RAW, processed=PROCESSED), encoding="utf-8")
    git(repo, "init", "-q")
    git(repo, "add", "dvc.lock")
    git(repo, "commit", "-qm", "init")
    res, _ = do_register(
        RegisterConfig(model_name="seedlm-web"), sft_dir, write_eval(repo / "e.json", 0.4), repo / "out", repo
    )
    assert res["promoted"], res
    return "models:/seedlm-web@champion"


class Server:
    """create_app(...) served by uvicorn on 127.0.0.1:<free port> in a thread of this process."""

    def __init__(self, model: Any, **app_kw: Any) -> None:
        import uvicorn

        from components.serving.server import create_app

        self.app = create_app(model, **app_kw)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.uv = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.uv.run, name="uvicorn", daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        for _ in range(600):
            if self.uv.started or not self.thread.is_alive():
                break
            threading.Event().wait(0.05)
        assert self.uv.started, "the server did not start"
        return self

    def __exit__(self, *exc: Any) -> None:
        self.uv.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def server(model_ref) -> Iterator[Server]:
    with Server(model_ref, follow_interval=0) as s:
        yield s


@pytest.fixture(scope="module")
def keyed_server(server) -> Iterator[Server]:
    """The same loaded model behind an API key."""
    with Server(server.app.state.follower.current.engine, api_key=KEY) as s:
        yield s


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
    """Count the text changes of the answers being shown (window.seedlmUpdates): streaming shows several."""
    page.evaluate("""() => { window.seedlmUpdates = 0;
        new MutationObserver(() => window.seedlmUpdates++).observe(document.getElementById('log'),
                                                                   {subtree: true, characterData: true, childList: true}); }""")


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


def screenshot(page: Any) -> None:
    if target := os.environ.get("SEEDLM_SCREENSHOT"):
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=target)


# ---------------------------------------------------------------- tests
def test_page_streams_answers_keeps_the_conversation_and_starts_a_new_one(page, server):
    from playwright.sync_api import expect

    label = server.app.state.follower.current.engine.label  # "seedlm-web/1": NAME/VERSION
    sent = chat_requests(page)
    page.goto(server.url)
    expect(page.locator("#model-label")).to_have_text(label)
    count_updates(page)

    first = ask(page, QUESTIONS[0])
    assert first.strip(), "the answer stayed empty"
    assert page.evaluate("window.seedlmUpdates") > 3  # question, empty answer, then the text in several steps
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


def test_sources_in_a_response_are_listed(page, server):
    """Retrieval comes later: the real server's stream, with a `sources` list added to its first event."""
    sources = [{"title": "people.md", "text": "Hustum lives in Mipo.", "score": 0.9}, "notes.txt"]

    def add_sources(route: Any) -> None:
        resp = route.fetch()
        head, sep, rest = resp.text().partition("\n\n")
        event = json.loads(head.removeprefix("data: "))
        route.fulfill(response=resp, body=f"data: {json.dumps(event | {'sources': sources})}{sep}{rest}")

    page.route("**/v1/chat/completions", add_sources)
    page.goto(server.url)
    ask(page, QUESTIONS[0])
    items = page.locator("#log > li.assistant .sources li")
    assert items.all_inner_texts() == ["people.md — Hustum lives in Mipo. (score 0.900)", "notes.txt"]


def test_the_api_key_is_asked_for_sent_and_remembered(page, keyed_server):
    from playwright.sync_api import expect

    label = keyed_server.app.state.follower.current.engine.label
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
