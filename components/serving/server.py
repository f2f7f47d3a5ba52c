"""`seedlm serve`: an OpenAI-compatible HTTP API and the web chat page for a registered model (FastAPI + uvicorn).

Entry points:

    app = create_app("models:/seedlm@champion", api_key=None, follow_interval=5.0, max_batch=16,
                     max_body_bytes=1_000_000, defaults=None, web_dir=WEB_DIR,
                     stream_interval=0.02)   # a FastAPI app; model loaded
    serve("models:/seedlm@champion", host="127.0.0.1", port=8000, api_key=None, threads=1)  # blocks
    main(argv)   # the CLI (`seedlm serve`): python -m components.serving.server [MODEL] [--host H] [--port P] ...

`model` is a `models:/NAME@ALIAS` URI (followed: when the alias moves, new requests get the new version
without a restart), `models:/NAME/VERSION`, a model folder, or an `engine.Engine`.

HTTP API (every response names the version: `model` = "NAME/VERSION", `system_fingerprint` = its URI):
- GET  /health                 {"status": "ok", "model", "version", "system_fingerprint", "waiting", "running",
                               "index" (the retrieval index folder or null)}
- GET  /v1/models, /v1/models/{id}   OpenAI model objects (+ "version", "context_length")
- POST /v1/chat/completions    OpenAI chat; `"stream": true` sends chat.completion.chunk events and
                               `data: [DONE]`; extra response field `trimmed_messages`; extra sampling
                               fields top_k, repetition_penalty; temperature defaults to 0 (greedy),
                               max_tokens to 256 (capped by the context); `n` up to 8; `rag`: true,
                               false or {"top_k": N} (default: on when there is an index): the top-k
                               chunks go into the last user turn and the response (a stream: its first
                               chunk) carries `sources`: [{"n", "text", "source", "location", "hash",
                               "score", "rank", "id"}] (serving/rag.py; --index DIR, --no-rag)
- POST /v1/completions         plain-text completion (no chat template), same settings and streaming
- GET  /                       the web chat page (files of components/serving/web/)
Client mistakes get 4xx with {"error": {"message", "type", "param", "code"}}: 400 bad JSON or values
(`param` names the field; code context_length_exceeded for a prompt that does not fit), 401 missing/wrong
API key, 404 unknown model or path, 405 wrong method, 413 body over max_body_bytes, 429 queue full. Only a
fault of the server is a 500 (type server_error); it keeps serving either way. Concurrent requests are
decoded together (batcher.py). A `stream` sends one event per token; after the first, events are written
together at most every `stream_interval` seconds (--stream-interval, default 0.02; 0: each token as it comes),
which spares the server and the client a write and a wake-up per token.
A /v1 request needs `Authorization: Bearer KEY` when an API key is set; serve() refuses a non-loopback
host without one (`--api-key` or the environment variable SEEDLM_API_KEY).
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from components.retrieval.search import open_index
from components.serving import deps
from components.serving.api import STREAM_INTERVAL, router
from components.serving.engine import Engine
from components.serving.follow import Follower
from components.serving.protocol import ApiError
from components.serving.rag import cli_index, rag_arguments
from components.serving.sampling import ParamError, SamplingParams, sampling_params

DEFAULT_MODEL = "models:/seedlm@champion"
API_KEY_ENV = "SEEDLM_API_KEY"
WEB_DIR = Path(__file__).parent / "web"
log = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ---------------------------------------------------------------- the app
def _errors(app: FastAPI) -> None:
    """Every error as OpenAI's error object; client mistakes are 4xx, only server faults 500."""

    def reply(e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    app.add_exception_handler(ApiError, lambda r, e: reply(e))
    app.add_exception_handler(ParamError, lambda r, e: reply(ApiError(400, str(e), param=e.param, code=e.code)))
    app.add_exception_handler(
        HTTPException,
        lambda r, e: reply(
            ApiError(
                e.status_code,
                f"{r.method} {r.url.path}: {e.detail}",
                code="not_found" if e.status_code == 404 else None,
            )
        ),
    )
    app.add_exception_handler(RequestValidationError, lambda r, e: reply(ApiError(400, str(e.errors()[:1]))))

    def crash(request: Request, e: Exception) -> JSONResponse:
        log.error("%s %s failed", request.method, request.url.path, exc_info=e)
        return reply(ApiError(500, f"internal error ({type(e).__name__}); see the server log", type="server_error"))

    app.add_exception_handler(Exception, crash)


def create_app(
    model: str | Path | Engine = DEFAULT_MODEL,
    *,
    api_key: str | None = None,
    follow_interval: float = 5.0,
    max_batch: int = 16,
    max_body_bytes: int = 1_000_000,
    defaults: SamplingParams | None = None,
    web_dir: Path | None = WEB_DIR,
    stream_interval: float = STREAM_INTERVAL,
    index: str | Path | None = None,
    fallback_index: Path | None = None,
    rag: bool = True,
) -> FastAPI:
    """The FastAPI app serving `model` (loaded now: a missing model fails here, not on the first request). Chats
    retrieve from `index` (checked now: a bad folder fails here), else from the index the served version carries,
    else from `fallback_index`; `rag` False turns retrieval off."""
    if index is not None:
        index = open_index(index).folder
    follower = Follower(model, interval=follow_interval, max_batch=max_batch)
    defaults = defaults or SamplingParams()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        follower.close()

    app = FastAPI(title="seedlm", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.follower = follower
    _errors(app)
    app.include_router(
        router(follower, defaults, max_body_bytes, api_key, stream_interval, (index, fallback_index), rag)
    )

    @app.get("/health")
    async def health() -> dict[str, Any]:
        served = follower.current
        return {
            "status": "ok",
            "model": served.engine.label,
            "version": served.engine.version,
            "system_fingerprint": served.engine.fingerprint,
            "waiting": served.batcher.waiting,
            "running": served.batcher.running,
            "index": str(where) if rag and (where := index or served.engine.index or fallback_index) else None,
        }

    if web_dir is not None and (Path(web_dir) / "index.html").is_file():
        app.mount("/", StaticFiles(directory=web_dir, html=True), name="web")
    return app


def serve(
    model: str | Path | Engine = DEFAULT_MODEL,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    threads: int = 1,
    log_level: str = "info",
    **app_kw: Any,
) -> None:
    """Run the server until interrupted. A non-loopback `host` needs an API key (argument or SEEDLM_API_KEY)."""
    import torch
    import uvicorn

    key = api_key or os.environ.get(API_KEY_ENV) or None
    if not is_loopback(host) and not key:
        raise deps.StageError(
            f"--host {host} exposes the server beyond this machine: set an API key with "
            f"--api-key or the environment variable {API_KEY_ENV} (or bind 127.0.0.1)"
        )
    torch.set_num_threads(threads)  # decoding small models: 1 thread is fastest and leaves a core to HTTP
    uvicorn.run(create_app(model, api_key=key, **app_kw), host=host, port=port, log_level=log_level)


def main(argv: list[str] | None = None, *, prog: str = "python -m components.serving.server", example: str = "") -> int:
    """`seedlm serve` (the seedlm CLI passes its prog and example); returns the exit status."""
    p = argparse.ArgumentParser(
        prog=prog,
        description="An OpenAI-compatible HTTP API and a web chat page for a model (see /v1/... and /).",
        epilog=f"example: {example}" if example else None,
    )
    p.add_argument(
        "model",
        nargs="?",
        default=DEFAULT_MODEL,
        help="models:/NAME@ALIAS (followed), models:/NAME/VERSION or a model folder (default: %(default)s)",
    )
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help=f"require `Authorization: Bearer KEY` (or set {API_KEY_ENV})")
    p.add_argument("--follow-interval", type=float, default=5.0, help="seconds between alias checks (0: each request)")
    p.add_argument("--max-batch", type=int, default=16, help="requests decoded together")
    p.add_argument("--max-tokens", type=int, default=256, help="default max_tokens of a request")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--max-body-bytes", type=int, default=1_000_000)
    p.add_argument(
        "--stream-interval",
        type=float,
        default=STREAM_INTERVAL,
        help="seconds between a stream's writes after its first token (0: every token at once; default: %(default)s)",
    )
    rag_arguments(p)
    args = p.parse_args(argv)
    if args.stream_interval < 0:
        p.error(f"--stream-interval must be >= 0 seconds, got {args.stream_interval}")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    given, fallback = cli_index(args)
    try:
        serve(
            args.model,
            host=args.host,
            port=args.port,
            api_key=args.api_key,
            threads=args.threads,
            follow_interval=args.follow_interval,
            max_batch=args.max_batch,
            max_body_bytes=args.max_body_bytes,
            defaults=sampling_params(max_tokens=args.max_tokens),
            stream_interval=args.stream_interval,
            index=given,
            fallback_index=fallback,
            rag=not args.no_rag,
        )
    except (deps.StageError, ParamError) as e:
        print(f"seedlm serve: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
