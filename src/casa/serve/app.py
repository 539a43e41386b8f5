"""The ASGI application (Starlette) and running it with uvicorn.

Design decisions:
- Plain Starlette: the OpenAI wire format and the validation are written out
  in `openai_api.py`, where each error can name its field.
- Every error, an unknown route included, is answered with the OpenAI error
  body; a `ValueError` out of casa is the client's input (400), anything else
  a 500 whose message says what happened. Neither stops the server.
- The server binds its socket itself, so `--port 0` picks a free port and
  the printed address is the real one; it binds to 127.0.0.1 unless told
  otherwise.
- `ServerThread` runs the same server in a background thread of the calling
  process (tests, notebooks).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import socket
import threading

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from casa.serve import live, openai_api
from casa.serve.engine import Engine
from casa.serve.http import ApiError, error_body, error_response
from casa.serve.limits import Limits
from casa.serve.media import MediaDir
from casa.serve.state import ServeState

__all__ = ["ServerThread", "bind", "create_app", "serve"]

log = logging.getLogger("casa.serve")


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc)


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    message = {404: f"no route {request.url.path!r} (see GET /v1/models, POST /v1/chat/completions, GET /)",
               405: f"method {request.method} is not allowed on {request.url.path!r}"}.get(exc.status_code, exc.detail)
    return JSONResponse(error_body(exc.status_code, message), status_code=exc.status_code)


async def _value_error(request: Request, exc: ValueError) -> JSONResponse:
    status = getattr(exc, "status", 400)  # a MediaError carries its own
    return JSONResponse(error_body(status, str(exc)), status_code=status)


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("error on %s %s", request.method, request.url.path)
    return JSONResponse(error_body(500, f"internal error: {type(exc).__name__}: {exc}"), status_code=500)


async def _health(request: Request) -> JSONResponse:
    return JSONResponse(request.app.state.casa.health())


def create_app(engine: Engine, *, limits: Limits | None = None, media_dir=None) -> Starlette:
    """The server's application: the OpenAI API under /v1, live captioning at /, GET /health."""
    state = ServeState(engine, limits or Limits(), MediaDir(media_dir))
    state.live = live.LiveSessions(state)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        try:
            yield
        finally:
            await state.live.shutdown()
            state.executor.shutdown(wait=False, cancel_futures=True)
            shutil.rmtree(state.upload_dir, ignore_errors=True)

    app = Starlette(
        routes=[Route("/health", _health, methods=["GET"]), *openai_api.routes, *live.routes,
                Mount("/static", StaticFiles(directory=live.STATIC), name="static")],
        exception_handlers={ApiError: _api_error, HTTPException: _http_error, ValueError: _value_error,
                            Exception: _internal_error},
        lifespan=lifespan,
    )
    app.state.casa = state
    return app


def bind(host: str = "127.0.0.1", port: int = 8000) -> socket.socket:
    """A listening TCP socket (port 0: a free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ValueError(f"--host {host} --port {port}: cannot listen there ({e.strerror})") from None
    sock.listen(128)
    return sock


def _server(app, log_level: str) -> uvicorn.Server:
    config = uvicorn.Config(app, log_level=log_level, lifespan="on", timeout_graceful_shutdown=5)
    return uvicorn.Server(config)


def serve(app, sock: socket.socket, *, log_level: str = "info") -> None:
    """Run `app` on `sock` until interrupted (Ctrl-C / SIGTERM)."""
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
