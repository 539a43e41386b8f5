"""HTTP plumbing shared by the OpenAI API and the live page: errors in the
OpenAI format, bounded request bodies, server-sent events that notice a
viewer leaving, and waiting for a result unless the client disconnects.

Design decisions:
- Every refused request is answered with the OpenAI error body
  `{"error": {"message", "type", "param", "code"}}` and its HTTP status, so
  the official client raises its matching exception with our message; the
  live page shows the same message. `param` names the field (or the header)
  refused, where there is one.
- Request bodies are read chunk by chunk and refused (413) as soon as they
  pass their limit, whatever `Content-Length` claims, and within a deadline
  (408, `--body-timeout`) however slowly they trickle in: memory, disk and
  the time a request holds are bounded by the limits, not by the client.
- A JSON body must say so (`Content-Type: application/json`, else 415): a
  page on another origin can POST `text/plain` without asking first (no CORS
  preflight), never `application/json`. An upload is raw bytes
  (`application/octet-stream`, `video/*` or no type) for the same reason,
  and a camera frame `image/jpeg` only.
- A parsed JSON body is checked once for what would fail far from here: more
  than `MAX_JSON_DEPTH` levels of nesting (recursion in whatever walks it)
  and strings with a lone UTF-16 surrogate (`"\\ud800"`: valid JSON, but no
  text; encoding it for the tokenizer, a path or the reply fails). Each is a
  400 naming the field.
- Large bodies are parsed off the event loop, so a 16 MiB request does not
  stall every other connection while it is decoded.
- A streamed response runs a close hook however it ends (finished, client
  gone, server shutting down): that is where a session is told to stop, so a
  dropped viewer frees its session.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable
from pathlib import Path

from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse

__all__ = ["MAX_JSON_DEPTH", "ApiError", "EventStream", "error_body", "error_response", "read_jpeg", "read_json",
           "receive_upload", "sse", "until_disconnect"]

ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 408: "invalid_request_error",
               409: "invalid_request_error", 413: "invalid_request_error", 415: "invalid_request_error",
               421: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}
MAX_JSON_DEPTH = 64  # an OpenAI request nests 5 deep (messages[0].content[1].image_url.url)
_PARSE_OFF_LOOP = 256 * 1024  # bytes of JSON above which parsing moves to a thread
_SURROGATE = re.compile("[\ud800-\udfff]")
# where a lone surrogate can come from: a \uD800-\uDFFF escape, or its bytes (json.loads lets them pass)
_MAYBE_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")


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
            raise ApiError(400, f"{what}: invalid Content-Length {length!r}", param="Content-Length")
        if int(length) > limit:
            raise _too_large(what, limit, flag, int(length))


def _media_type(request: Request) -> str | None:
    value = request.headers.get("content-type")
    return None if value is None else value.split(";", 1)[0].strip().lower()


async def _receive(request: Request, sink: Callable[[bytes], None], *, what: str, limit: int, flag: str,
                   timeout: float) -> int:
    """Feed the body to `sink` chunk by chunk: 413 past `limit` bytes, 408 past `timeout` seconds."""
    size = 0

    async def read() -> None:
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _too_large(what, limit, flag)
            sink(chunk)

    try:
        await asyncio.wait_for(read(), timeout)
    except asyncio.TimeoutError:
        raise ApiError(408, f"{what}: not received within {timeout:g} s ({size} bytes arrived; "
                            "--body-timeout)") from None
    return size


def _where(path: tuple) -> str:
    return "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in path).lstrip(".") or "request body"


def _check_tree(data, *, surrogates: bool) -> None:
    """Depth and (if `surrogates` may occur) lone surrogates of a parsed JSON value; iterative."""
    stack = [(data, 1, ())]
    while stack:
        value, depth, path = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise ApiError(400, f"request body: JSON nested more than {MAX_JSON_DEPTH} levels deep (under "
                                f"{_where(path[:1])})", param=_where(path[:1]))
        pairs = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in pairs:
            if surrogates and any(isinstance(t, str) and _SURROGATE.search(t) for t in (key, item)):
                where = _where((*path, key))
                raise ApiError(400, f"{where}: a lone UTF-16 surrogate (\\ud800-\\udfff) is not text; send valid "
                                    "UTF-8 (or escaped surrogate pairs)", param=where)
            if isinstance(item, (dict, list)):
                stack.append((item, depth + 1, (*path, key)))


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON (numbers must be finite)")


def _parse_json(body: bytes | bytearray):
    try:
        data = json.loads(body, parse_constant=_no_constant)
    except RecursionError:
        raise ApiError(400, f"request body: JSON nested too deeply (at most {MAX_JSON_DEPTH} levels)") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"request body must be a JSON object, got {type(data).__name__}")
    _check_tree(data, surrogates=_MAYBE_SURROGATE.search(body) is not None)
    return data


async def read_json(request: Request, *, limit: int, timeout: float, flag: str = "--max-request-mb") -> dict:
    """The request's JSON object (see the module doc): 415 unless declared JSON,
    413 past `limit` bytes, 408 past `timeout` seconds, 400 if not a usable JSON object."""
    if _media_type(request) != "application/json":
        raise ApiError(415, f"Content-Type {request.headers.get('content-type')!r}: this endpoint takes JSON "
                            "(send 'Content-Type: application/json')", param="Content-Type")
    _declared_length(request, limit, "request body", flag)
    body = bytearray()
    await _receive(request, body.extend, what="request body", limit=limit, flag=flag, timeout=timeout)
    if len(body) > _PARSE_OFF_LOOP:
        return await asyncio.to_thread(_parse_json, body)  # nothing else holds `body`: no copy
    return _parse_json(body)


async def receive_upload(request: Request, path: Path, *, limit: int, timeout: float,
                         flag: str = "--max-upload-mb") -> int:
    """Write the raw request body to `path` (removed again on any error); its size in bytes.
    415 unless raw bytes, 413 past `limit` bytes, 408 past `timeout` seconds."""
    kind = _media_type(request)
    if kind not in (None, "application/octet-stream") and not (kind or "").startswith("video/"):
        raise ApiError(415, f"Content-Type {request.headers.get('content-type')!r}: send the video file's bytes "
                            "as the body, with 'Content-Type: application/octet-stream' (or video/*)",
                       param="Content-Type")
    _declared_length(request, limit, "upload", flag)
    try:
        with open(path, "wb") as f:
            size = await _receive(request, f.write, what="upload", limit=limit, flag=flag, timeout=timeout)
        if size == 0:
            raise ApiError(400, "upload: empty body (send the video file's bytes as the request body)",
                           param="body")
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return size


async def read_jpeg(request: Request, *, limit: int, timeout: float, flag: str) -> bytes:
    """The raw request body, a JPEG image: 415 unless declared `image/jpeg`, 413 past `limit`
    bytes, 408 past `timeout` seconds, 400 if empty."""
    if _media_type(request) != "image/jpeg":
        raise ApiError(415, f"Content-Type {request.headers.get('content-type')!r}: send the frame as a JPEG "
                            "image, with 'Content-Type: image/jpeg'", param="Content-Type")
    _declared_length(request, limit, "frame", flag)
    body = bytearray()
    await _receive(request, body.extend, what="frame", limit=limit, flag=flag, timeout=timeout)
    if not body:
        raise ApiError(400, "frame: empty body (send the JPEG's bytes as the request body)", param="body")
    return bytes(body)


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
