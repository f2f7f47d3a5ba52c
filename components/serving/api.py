"""The /v1 routes of `seedlm serve` (see server.py for the API): requests read and checked, rows queued on the
batcher of the version being served, answers collected or streamed as server-sent events.

A request's rows report (index, delta, finish) from the decoding thread through an asyncio queue of
the request's own; a client that goes away cancels its rows at the next decode step.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import AsyncIterator
from dataclasses import replace
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
def _submit(served: Served, rows: list) -> asyncio.Queue:
    """Queue `rows` on the batcher; their (index, delta, finish) events arrive on the returned queue."""
    loop, queue = asyncio.get_running_loop(), asyncio.Queue()

    def emit(row: Any, delta: str, finish: str | None) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (row.index, delta, finish))
        except RuntimeError:  # the event loop is gone (server shutting down)
            row.cancelled.set()

    for row in rows:
        row.emit = emit
    try:
        served.batcher.submit(rows)
    except Busy as e:
        raise ApiError(429, f"server busy: {e}; retry shortly", type="server_error", code="server_busy") from None
    return queue


async def _events(queue: asyncio.Queue, rows: list) -> AsyncIterator[tuple[int, str, str | None]]:
    """The rows' events until all finished; leaving early (client gone) cancels the rows."""
    left = len(rows)
    try:
        while left:
            event = await queue.get()
            left -= event[2] is not None
            yield event
    finally:
        for row in rows:
            row.cancelled.set()


async def _collect(served: Served, rows: list, prompts: list) -> list[Completion]:
    async for _ in _events(_submit(served, rows), rows):
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
    served: Served, req: ApiRequest, rows: list, prompt: Any, rid: str, queue: asyncio.Queue
) -> AsyncIterator[str]:
    e = served.engine
    head = {"trimmed_messages": prompt.trimmed}
    for row in rows:
        yield _sse(chat_chunk(rid, e.label, e.fingerprint, row.index, {"role": "assistant", "content": ""}, **head))
    async for index, delta, finish in _events(queue, rows):
        if delta:
            yield _sse(chat_chunk(rid, e.label, e.fingerprint, index, {"content": delta}))
        if finish == "error":
            yield _sse(ERROR_EVENT)
        elif finish:
            yield _sse(chat_chunk(rid, e.label, e.fingerprint, index, {}, finish, **head))
    if req.include_usage:
        done = [completion(r, prompt) for r in rows]
        yield _sse(chat_chunk(rid, e.label, e.fingerprint, 0, {}) | {"choices": [], "usage": usage(done)})
    yield "data: [DONE]\n\n"


async def _text_stream(
    served: Served, req: ApiRequest, rows: list, prompts: list, rid: str, queue: asyncio.Queue
) -> AsyncIterator[str]:
    e = served.engine
    async for index, delta, finish in _events(queue, rows):
        if finish == "error":
            yield _sse(ERROR_EVENT)
        elif delta or finish:
            yield _sse(text_chunk(rid, e.label, e.fingerprint, index, delta, finish))
    if req.include_usage:
        done = [completion(r, prompts[r.index // req.n]) for r in rows]
        yield _sse(text_chunk(rid, e.label, e.fingerprint, 0, "") | {"choices": [], "usage": usage(done)})
    yield "data: [DONE]\n\n"


def _check_model(follower: Follower, model: str | None) -> None:
    if model is not None and model not in follower.names:
        served = sorted(follower.names)
        raise ApiError(
            404, f"model {model!r} is not served here; use one of {served}", param="model", code="model_not_found"
        )


def _model_card(follower: Follower) -> dict[str, Any]:
    e = follower.current.engine
    return {
        "id": e.name,
        "object": "model",
        "created": 0,
        "owned_by": "seedlm",
        "version": e.version,
        "label": e.label,
        "system_fingerprint": e.fingerprint,
        "context_length": e.context,
    }


def router(follower: Follower, defaults: SamplingParams, max_body: int, api_key: str | None) -> APIRouter:
    """The /v1 routes answering with `follower`'s current version; `defaults` fill the unset sampling fields."""

    async def authorize(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise ApiError(
                401, "missing or wrong API key: send the header `Authorization: Bearer <key>`", code="invalid_api_key"
            )

    api = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])

    @api.get("/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(follower)]}

    @api.get("/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        _check_model(follower, model_id)
        return _model_card(follower)

    @api.post("/chat/completions")
    async def chat(request: Request) -> Any:
        req = chat_request(await read_body(request, max_body), defaults)
        served = await run_in_threadpool(follower.get) if follower.due() else follower.current
        _check_model(follower, req.model)
        prompt = chat_prompt(served.engine, req.messages, req.params)
        rows, rid, e = _rows(served.engine, req, [prompt]), new_id("chatcmpl"), served.engine
        if req.stream:
            queue = _submit(served, rows)  # before the response starts: a full queue is still a 429
            return StreamingResponse(
                _chat_stream(served, req, rows, prompt, rid, queue), media_type="text/event-stream"
            )
        done = await _collect(served, rows, [prompt] * len(rows))
        return chat_response(rid, e.label, e.fingerprint, done)

    @api.post("/completions")
    async def completions(request: Request) -> Any:
        req = completion_request(await read_body(request, max_body), defaults)
        served = await run_in_threadpool(follower.get) if follower.due() else follower.current
        _check_model(follower, req.model)
        names = ["prompt"] if len(req.prompts) == 1 else [f"prompt[{i}]" for i in range(len(req.prompts))]
        prompts = [text_prompt(served.engine, t, req.params, n) for t, n in zip(req.prompts, names, strict=True)]
        rows, rid, e = _rows(served.engine, req, prompts), new_id("cmpl"), served.engine
        if req.stream:
            queue = _submit(served, rows)
            return StreamingResponse(
                _text_stream(served, req, rows, prompts, rid, queue), media_type="text/event-stream"
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
