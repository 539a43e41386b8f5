"""HTTP plumbing shared by the OpenAI API and the live page: errors in the
OpenAI format, bounded request bodies, server-sent events that notice a
viewer leaving, and waiting for a result unless the client disconnects.

Design decisions:
- Every refused request is answered with the OpenAI error body
  `{"error": {"message", "type", "param", "code"}}` and its HTTP status, so
  the official client raises its matching exception with our message; the
  live page shows the same message.
- Request bodies are read chunk by chunk and refused (413) as soon as they
  pass their limit, whatever `Content-Length` claims: memory and disk use are
  bounded by the limit, not by the client.
- A streamed response runs a close hook however it ends (finished, client
  gone, server shutting down): that is where a session is told to stop, so a
  dropped viewer frees its session.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path

from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse

__all__ = ["ApiError", "EventStream", "error_response", "read_json", "receive_upload", "sse", "until_disconnect"]

ERROR_TYPES = {400: "invalid_request_error", 403: "permission_error", 404: "not_found_error",
               405: "invalid_request_error", 409: "invalid_request_error", 413: "invalid_request_error",
               415: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}


class ApiError(Exception):
    """A refused request: HTTP `status`, a message naming the input, the offending `param`."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error_body(error.status, error.message, error.param, error.code), status_code=error.status,
                        headers=error.headers)


def _too_large(what: str, limit: int, flag: str, size: int | None = None) -> ApiError:
    size_text = f" of {size} bytes" if size is not None else ""
    return ApiError(413, f"{what}{size_text} is above the limit of {limit} bytes ({flag})")


def _declared_length(request: Request, limit: int, what: str, flag: str) -> None:
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise ApiError(400, f"{what}: invalid Content-Length {length!r}")
        if int(length) > limit:
            raise _too_large(what, limit, flag, int(length))


async def read_json(request: Request, *, limit: int, flag: str = "--max-request-mb") -> dict:
    """The request's JSON object; 413 past `limit` bytes, 400 if not a JSON object."""
    _declared_length(request, limit, "request body", flag)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _too_large("request body", limit, flag)
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"request body must be a JSON object, got {type(data).__name__}")
    return data


async def receive_upload(request: Request, path: Path, *, limit: int, flag: str = "--max-upload-mb") -> int:
    """Write the raw request body to `path` (removed again on any error); its size in bytes."""
    _declared_length(request, limit, "upload", flag)
    size = 0
    try:
        with open(path, "wb") as f:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise _too_large("upload", limit, flag)
                f.write(chunk)
        if size == 0:
            raise ApiError(400, "upload: empty body (send the video file's bytes as the request body)")
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return size


def sse(data, event: str | None = None) -> str:
    """One server-sent event: `data` as JSON (a str is sent as is)."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return (f"event: {event}\n" if event else "") + f"data: {payload}\n\n"


class EventStream(StreamingResponse):
    """`text/event-stream` whose `on_close()` runs however the stream ends."""

    def __init__(self, events, *, on_close: Callable[[], None]):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


async def until_disconnect(request: Request, work: Awaitable):
    """Await `work`; if the client disconnects first, raise `ConnectionAbortedError`
    (`work` goes on: its owner cancels it, or tells its worker thread to stop)."""
    work = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if work in done:
        return work.result()
    raise ConnectionAbortedError("client disconnected")
