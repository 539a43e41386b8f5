"""The ASGI application (Starlette) and running it with uvicorn.

Design decisions:
- Plain Starlette: the OpenAI wire format and the validation are written out
  in `openai_api.py`, where each error can name its field.
- Every request passes `guard.Guard` first (Host, Origin, API key; security
  headers on every response), and every connection the bounds of
  `connections.py` (how many, how long for headers).
- Every error, an unknown route included, is answered with the OpenAI error
  body; a `ValueError` out of casa is the client's input (400), anything else
  a 500 that says only "internal error" and a request id (the guard logs the
  traceback beside it). Neither stops the server. A client that leaves
  before its body has arrived is one log line, not an error.
- The server binds its socket itself, so `--port 0` picks a free port and
  the printed address is the real one; it binds to 127.0.0.1 unless told
  otherwise.
- `ServerThread` runs the same server in a background thread of the calling
  process (tests, notebooks).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import socket
import threading

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from casa.serve import live, openai_api
from casa.serve.connections import uvicorn_options
from casa.serve.engine import Engine
from casa.serve.guard import Access, Guard
from casa.serve.http import ApiError, error_body, error_response
from casa.serve.limits import Limits, shown
from casa.serve.media import MediaDir
from casa.serve.state import ServeState

__all__ = ["ServerThread", "bind", "create_app", "serve"]

log = logging.getLogger("casa.serve")


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    request.app.state.casa.trim_when_idle()  # a refused body (or decoded images) leaves freed heap
    return error_response(exc)


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    path = shown(request.url.path)
    message = {404: f"no route {path} (see GET /v1/models, POST /v1/chat/completions, GET /)",
               405: f"method {request.method} is not allowed on {path}"}.get(exc.status_code, exc.detail)
    return JSONResponse(error_body(exc.status_code, message), status_code=exc.status_code)


async def _value_error(request: Request, exc: ValueError) -> JSONResponse:
    status = getattr(exc, "status", 400)  # a MediaError carries its own
    request.app.state.casa.trim_when_idle()
    return JSONResponse(error_body(status, str(exc), getattr(exc, "what", None)), status_code=status)


async def _client_left(request: Request, exc: ClientDisconnect) -> Response:
    log.info("client left during %s %s before its request body had arrived", request.method, request.url.path)
    return Response(status_code=499)  # "client closed request": nobody reads it


async def _health(request: Request) -> JSONResponse:
    return JSONResponse(request.app.state.casa.health())


def create_app(engine: Engine, *, limits: Limits | None = None, media_dir=None,
               access: Access | None = None) -> Starlette:
    """The server's application: the OpenAI API under /v1, live captioning at /, GET /health;
    `access`: its API key and extra host names (default: no key, local names only)."""
    state = ServeState(engine, limits or Limits(), MediaDir(media_dir))
    state.live = live.LiveSessions(state)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        state.loop = asyncio.get_running_loop()
        try:
            yield
        finally:
            await state.live.shutdown()
            state.executor.shutdown(wait=False, cancel_futures=True)
            shutil.rmtree(state.upload_dir, ignore_errors=True)

    app = Starlette(
        routes=[Route("/health", _health, methods=["GET"]), *openai_api.routes, *live.routes,
                Mount("/static", StaticFiles(directory=live.STATIC), name="static")],
        middleware=[Middleware(Guard, access=access or Access())],
        exception_handlers={ApiError: _api_error, HTTPException: _http_error, ValueError: _value_error,
                            ClientDisconnect: _client_left},
        lifespan=lifespan,
    )
    app.state.casa = state
    return app


def bind(host: str = "127.0.0.1", port: int = 8000) -> socket.socket:
    """A listening TCP socket (port 0: a free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named: asyncio sets TCP_NODELAY only on sockets whose proto says TCP (an accepted socket
    # inherits it); with proto 0, a keep-alive response waited ~40 ms for the client's delayed ACK (Nagle)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ValueError(f"--host {host} --port {port}: cannot listen there ({e.strerror})") from None
    sock.listen(128)
    return sock


def _server(app, log_level: str) -> uvicorn.Server:
    state = app.state.casa
    config = uvicorn.Config(app, log_level=log_level, lifespan="on", timeout_graceful_shutdown=5,
                            **uvicorn_options(state.limits, state.counts, state.connections))
    return uvicorn.Server(config)


def serve(app, sock: socket.socket, *, log_level: str = "info") -> None:
    """Run `app` on `sock` until interrupted (Ctrl-C / SIGTERM); the server's own log
    lines (`casa.serve`) go to stderr beside uvicorn's, at the same level."""
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(log_level.upper())
    _server(app, log_level).run(sockets=[sock])


class ServerThread:
    """`with ServerThread(app) as url:` a real uvicorn server on a free loopback
    port, in a daemon thread; stopped (lifespan shutdown included) on exit."""

    def __init__(self, app, *, host: str = "127.0.0.1", log_level: str = "warning"):
        self.app, self.host, self.log_level = app, host, log_level

    def __enter__(self) -> str:
        self.sock = bind(self.host, 0)
        self.server = _server(self.app, self.log_level)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        for _ in range(600):
            if self.server.started or not self.thread.is_alive():
                break
            threading.Event().wait(0.05)
        if not self.server.started:
            raise RuntimeError("casa serve: the server thread did not start")
        self.url = f"http://{self.host}:{self.sock.getsockname()[1]}"
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()
