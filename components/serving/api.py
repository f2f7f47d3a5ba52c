"""The /v1 routes of `seedlm serve` (see server.py for the API): requests read and checked, rows queued on the
batcher of the version being served, answers collected or streamed as server-sent events.

A request's rows report (index, delta, finish) from the decoding thread to the request's inbox on the event loop,
through one relay per loop: one wake-up of the loop per decode step however many rows advanced, and for a stream's
text at most one per `stream_interval` (20 ms) after its first (its first text and every finish go at once). A
stream writes all the events that arrived since its last write in one write (still one SSE event per token); a
non-streamed request is only told when its rows finish. A client that goes away cancels its rows at the next
decode step.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from components.serving.batcher import Busy
from components.serving.engine import Completion, Engine, chat_prompt, completion, make_row, text_prompt
from components.serving.follow import Follower, Served
from components.serving.protocol import (
    ApiError,
    ApiRequest,
    chat_chunk,
    chat_request,
    chat_response,
    completion_request,
    new_id,
    text_chunk,
    text_response,
    usage,
)
from components.serving.rag import ground, rag_option
from components.serving.sampling import SamplingParams


async def read_body(request: Request, limit: int) -> dict[str, Any]:
    """The JSON object of the request body, refused (413) as soon as it passes `limit` bytes."""
    too_big = ApiError(413, f"request body is larger than {limit} bytes", code="request_too_large")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_big
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_big
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise ApiError(400, f"request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object", code="invalid_json")
    return data


# ---------------------------------------------------------------- running rows from async code
STREAM_INTERVAL = 0.02
"""Default seconds between a stream's writes after its first text: at most 50 writes a second, the rate chat UIs
throttle their updates to and more than a reader notices, so a fast stream costs the server and its client one
write and one wake-up per few tokens instead of per token (measured: 1 client at 0.78x bare generate's tokens/s
with 0, 0.84x with 5 ms, 0.88x with 10 ms, 0.90x with 20 ms)."""
Event = tuple[int, str, "str | None"]
"""(choice index, text delta, finish reason or None) of one row."""


class _Inbox:
    """The events of one request's rows, read on the event loop in batches (all that arrived since the last read).
    `interval`: seconds the relay may hold its text before waking the loop (its first text and finishes never wait)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, interval: float = 0.0) -> None:
        self.loop, self.events, self.waiter = loop, deque(), None
        self.interval, self.started = interval, False

    def add(self, event: Event) -> None:
        self.events.append(event)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def take(self) -> list[Event]:
        """Every event that has arrived, waiting for one if there is none."""
        while not self.events:
            self.waiter = self.loop.create_future()
            await self.waiter
        out = list(self.events)
        self.events.clear()
        return out


class _Relay:
    """Carries events from the decoding thread to one event loop: the thread appends to a deque and wakes the loop
    only when no wake-up is pending, so a decode step costs the loop one wake-up, however many rows it advanced.
    Text that comes within its inbox's `interval` of the last wake-up waits for the next one (at the latest the
    wake-up of the row's finish), so a fast stream wakes the loop, and its client, every `interval`, not per token."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop, self.events, self.pending, self.woken = loop, deque(), False, 0.0

    def put(self, inbox: _Inbox, event: Event) -> None:
        """From any thread; RuntimeError once the loop is closed."""
        self.events.append((inbox, event))
        if self.pending:
            return
        now = time.monotonic()
        if inbox.started and event[2] is None and now - self.woken < inbox.interval:
            return  # held: a later event of this row (its finish at the latest) wakes the loop
        inbox.started, self.pending, self.woken = True, True, now
        try:
            self.loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:
            self.pending = False
            raise

    def _deliver(self) -> None:
        self.pending = False  # before draining: an event appended from here on schedules another delivery
        while self.events:
            inbox, event = self.events.popleft()
            inbox.add(event)


_relays: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _submit(served: Served, rows: list, *, deltas: bool = True, interval: float = 0.0) -> _Inbox:
    """Queue `rows` on the batcher; their events arrive in the returned inbox, text at most every `interval` seconds
    after the first (with `deltas` False only each row's finish, carrying no text: a non-streamed answer is read
    from the rows, so the loop is not woken per token)."""
    loop = asyncio.get_running_loop()
    relay = _relays.get(loop) or _relays.setdefault(loop, _Relay(loop))
    inbox = _Inbox(loop, interval)

    def emit(row: Any, delta: str, finish: str | None) -> None:
        if finish is None and not deltas:
            return
        try:
            relay.put(inbox, (row.index, delta, finish))
        except RuntimeError:  # the event loop is gone (server shutting down)
            row.cancelled.set()

    for row in rows:
        row.emit = emit
    try:
        served.batcher.submit(rows)
    except Busy as e:
        raise ApiError(429, f"server busy: {e}; retry shortly", type="server_error", code="server_busy") from None
    return inbox


async def _batches(inbox: _Inbox, rows: list) -> AsyncIterator[tuple[list[Event], bool]]:
    """The rows' events in batches, each with whether it is the last (all rows finished); leaving early (client
    gone) cancels the rows."""
    left = len(rows)
    try:
        while left:
            events = await inbox.take()
            left -= sum(e[2] is not None for e in events)
            yield events, not left
    finally:
        for row in rows:
            row.cancelled.set()


async def _collect(served: Served, rows: list, prompts: list) -> list[Completion]:
    async for _ in _batches(_submit(served, rows, deltas=False), rows):
        pass
    if any(r.finish_reason == "error" for r in rows):
        raise ApiError(500, "generation failed on the server; see its log", type="server_error")
    return [completion(r, p) for r, p in zip(rows, prompts, strict=True)]


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


ERROR_EVENT = {
    "error": {"message": "generation failed on the server", "type": "server_error", "param": None, "code": None}
}


# ---------------------------------------------------------------- the two generation endpoints
def _rows(engine: Engine, req: ApiRequest, prompts: list) -> list:
    """n rows per prompt; choice i of a seeded request samples with seed + i."""
    out = []
    for p, prompt in enumerate(prompts):
        for j in range(req.n):
            params = req.params if req.params.seed is None else replace(req.params, seed=req.params.seed + j)
            out.append(make_row(engine, prompt, params, index=p * req.n + j))
    return out


async def _chat_stream(
    served: Served, req: ApiRequest, rows: list, prompt: Any, rid: str, inbox: _Inbox, extra: dict[str, Any]
) -> AsyncIterator[str]:
    e = served.engine
    head = {"trimmed_messages": prompt.trimmed}
    out = [
        _sse(chat_chunk(rid, e.label, e.fingerprint, r.index, {"role": "assistant", "content": ""}, **head, **extra))
        for r in rows
    ]
    async for events, last in _batches(inbox, rows):
        for index, delta, finish in events:
            if delta:
                out.append(_sse(chat_chunk(rid, e.label, e.fingerprint, index, {"content": delta})))
            if finish == "error":
                out.append(_sse(ERROR_EVENT))
            elif finish:
                out.append(_sse(chat_chunk(rid, e.label, e.fingerprint, index, {}, finish, **head)))
        if not last:
            yield "".join(out)
            out = []
    if req.include_usage:
        done = [completion(r, prompt) for r in rows]
        out.append(_sse(chat_chunk(rid, e.label, e.fingerprint, 0, {}) | {"choices": [], "usage": usage(done)}))
    yield "".join(out) + "data: [DONE]\n\n"


async def _text_stream(
    served: Served, req: ApiRequest, rows: list, prompts: list, rid: str, inbox: _Inbox
) -> AsyncIterator[str]:
    e = served.engine
    out = []
    async for events, last in _batches(inbox, rows):
        for index, delta, finish in events:
            if finish == "error":
                out.append(_sse(ERROR_EVENT))
            elif delta or finish:
                out.append(_sse(text_chunk(rid, e.label, e.fingerprint, index, delta, finish)))
        if not last:
            yield "".join(out)
            out = []
    if req.include_usage:
        done = [completion(r, prompts[r.index // req.n]) for r in rows]
        out.append(_sse(text_chunk(rid, e.label, e.fingerprint, 0, "") | {"choices": [], "usage": usage(done)}))
    yield "".join(out) + "data: [DONE]\n\n"


def _check_model(follower: Follower, model: str | None) -> None:
    if model is not None and model not in follower.names:
        served = sorted(follower.names)
        raise ApiError(
            404, f"model {model!r} is not served here; use one of {served}", param="model", code="model_not_found"
        )


def _model_card(follower: Follower, index: Path | None) -> dict[str, Any]:
    e = follower.current.engine
    return {
        "rag": index is not None,
        "id": e.name,
        "object": "model",
        "created": 0,
        "owned_by": "seedlm",
        "version": e.version,
        "label": e.label,
        "system_fingerprint": e.fingerprint,
        "context_length": e.context,
    }


async def _grounded(served: Served, req: ApiRequest, index: Path | None) -> tuple[list, dict[str, Any]]:
    """The chat's messages, with retrieved passages when its `rag` asks (default: when there is an `index`), and
    the response's extra fields (`sources`, only when retrieval ran)."""
    use, top_k = rag_option(req.rag, index is not None)
    if not use:
        return req.messages, {}
    messages, found = await run_in_threadpool(ground, served.engine, index, req.messages, req.params, top_k)
    return messages, {"sources": found}


def router(
    follower: Follower,
    defaults: SamplingParams,
    max_body: int,
    api_key: str | None,
    stream_interval: float = STREAM_INTERVAL,
    indexes: tuple[Path | None, Path | None] = (None, None),
    rag: bool = True,
) -> APIRouter:
    """The /v1 routes answering with `follower`'s current version; `defaults` fill the unset sampling fields; a
    stream's text is sent at most every `stream_interval` seconds after its first (0: as each token comes). Chats
    retrieve from `indexes[0]`, else from the index the served version carries, else from `indexes[1]`
    (serving/rag.py); `rag` False: never."""

    async def authorize(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise ApiError(
                401, "missing or wrong API key: send the header `Authorization: Bearer <key>`", code="invalid_api_key"
            )

    api = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])

    def index_of(served: Served) -> Path | None:
        """The index chats with `served` retrieve from (None: no retrieval)."""
        return (indexes[0] or served.engine.index or indexes[1]) if rag else None

    @api.get("/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(follower, index_of(follower.current))]}

    @api.get("/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        _check_model(follower, model_id)
        return _model_card(follower, index_of(follower.current))

    @api.post("/chat/completions")
    async def chat(request: Request) -> Any:
        req = chat_request(await read_body(request, max_body), defaults)
        served = await run_in_threadpool(follower.get) if follower.due() else follower.current
        _check_model(follower, req.model)
        messages, extra = await _grounded(served, req, index_of(served))
        prompt = chat_prompt(served.engine, messages, req.params)
        rows, rid, e = _rows(served.engine, req, [prompt]), new_id("chatcmpl"), served.engine
        if req.stream:
            inbox = _submit(served, rows, interval=stream_interval)  # before the response: a full queue is a 429
            return StreamingResponse(
                _chat_stream(served, req, rows, prompt, rid, inbox, extra), media_type="text/event-stream"
            )
        done = await _collect(served, rows, [prompt] * len(rows))
        return chat_response(rid, e.label, e.fingerprint, done, extra)

    @api.post("/completions")
    async def completions(request: Request) -> Any:
        req = completion_request(await read_body(request, max_body), defaults)
        served = await run_in_threadpool(follower.get) if follower.due() else follower.current
        _check_model(follower, req.model)
        names = ["prompt"] if len(req.prompts) == 1 else [f"prompt[{i}]" for i in range(len(req.prompts))]
        prompts = [text_prompt(served.engine, t, req.params, n) for t, n in zip(req.prompts, names, strict=True)]
        rows, rid, e = _rows(served.engine, req, prompts), new_id("cmpl"), served.engine
        if req.stream:
            inbox = _submit(served, rows, interval=stream_interval)
            return StreamingResponse(
                _text_stream(served, req, rows, prompts, rid, inbox), media_type="text/event-stream"
            )
        done = await _collect(served, rows, [prompts[r.index // req.n] for r in rows])
        return text_response(rid, e.label, e.fingerprint, done)

    known = {route.path for route in api.routes}

    @api.api_route("/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False)
    async def elsewhere(request: Request, rest: str) -> None:
        """Unknown /v1 paths are 404 (405 for a known path and another method), never the web page's."""
        if request.url.path in known:
            raise ApiError(405, f"{request.method} {request.url.path}: method not allowed", code="method_not_allowed")
        raise ApiError(404, f"{request.method} {request.url.path}: no such endpoint", code="not_found")

    return api
