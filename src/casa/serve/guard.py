"""Who may talk to the server, what every response tells the browser, and what
a client sees of an internal error: one ASGI middleware around every route.

Checked for every request, in this order, before any route runs:

1. `Host` (421): one of the names the server answers to. By default the
   address the connection reached, `localhost`, `127.0.0.1` and `[::1]`, with
   the server's port; `--allowed-hosts` adds names ('name': any port,
   'name:port'; '*' turns the check off). This defeats DNS rebinding: a page
   on `evil.example` whose name is made to point at 127.0.0.1 reaches the
   server with `Host: evil.example`, and is refused.
2. `Origin` (403): a request that carries one (browsers send it with every
   POST and every cross-origin fetch) must come from this server's own page
   (same host and port, http or https). Without one (curl, the OpenAI
   client) it passes: this is cross-site request forgery protection, not
   authentication. Checked on every method: opening a live session's event
   stream (GET) starts work too.
3. The API key (401), when the server has one (`--api-key` or
   `$CASA_API_KEY`): `Authorization: Bearer <key>`, compared in constant
   time (`hmac.compare_digest`). Every route needs it but `GET /health`
   (for probes) and the page's own files (`GET /`, `GET /static/...`), which
   hold no data: the page asks for the key and sends it on each of its
   fetches. Its event stream is read with `fetch()`, not `EventSource`,
   which cannot set headers: the key never goes into a URL, where access
   logs and browser history would keep it.

Every response carries a strict Content-Security-Policy (only this server's
own scripts, styles and connections; `data:`/`blob:` images; no framing, no
forms, no base URL) and `X-Frame-Options: DENY`,
`X-Content-Type-Options: nosniff`, `Referrer-Policy: no-referrer`: the page
has no inline script or style, so nothing on it needs an exception.

Design decisions:
- Errors use the OpenAI error body, `param` naming the header refused.
- An exception no route handled is a 500 whose body says only "internal
  error" and a request id; the traceback is logged once, beside that id
  (Starlette's own 500 handler would log it a second time through uvicorn).
- A response that leaves part of the request body unread (a refusal before
  the body was read) closes the connection: the rest of an upload is not
  received and discarded.
- No TLS and no rate limiting per client: for remote users, put a reverse
  proxy in front (it must pass the `Host` header through).
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import uuid
from dataclasses import dataclass
from urllib.parse import urlsplit

from casa.serve.http import error_body

__all__ = ["SECURITY_HEADERS", "Access", "Guard"]

log = logging.getLogger("casa.serve")

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = [(b"content-security-policy", CSP.encode()), (b"x-frame-options", b"DENY"),
                    (b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"),
                    (b"cross-origin-opener-policy", b"same-origin"),
                    (b"cross-origin-resource-policy", b"same-origin")]
LOCAL_NAMES = ("localhost", "127.0.0.1", "[::1]")


_HOST = re.compile(r"(\[[0-9a-f:.]+\]|[a-z0-9_.-]+?)\.?(?::(\d{1,5}))?")


def _split_host(value: str) -> tuple[str, int | None] | None:
    """'Name.:8000' -> ('name', 8000); '[::1]' -> ('[::1]', None); None if it is no host."""
    m = _HOST.fullmatch(value.strip().lower())
    return None if m is None else (m[1], int(m[2]) if m[2] else None)


@dataclass(frozen=True)
class Access:
    """Who may use the server: its API key (None: none needed) and the extra host
    names (`--allowed-hosts`) it answers to."""

    api_key: str | None = None
    allowed_hosts: tuple[str, ...] = ()

    @classmethod
    def from_options(cls, api_key: str | None, allowed_hosts: str = "", *,
                     key_from: str = "--api-key") -> Access:
        """From the command line's values; a bad one is a ValueError naming `key_from` or the flag."""
        if api_key is not None and (not api_key or not all(0x21 <= ord(c) <= 0x7E for c in api_key)):
            raise ValueError(f"{key_from}: the API key must be non-empty printable ASCII without spaces "
                             "(it travels in an HTTP header)")
        hosts = tuple(h.strip() for h in allowed_hosts.split(",") if h.strip())
        for host in hosts:
            if host != "*" and _split_host(host) is None:
                raise ValueError(f"--allowed-hosts {host!r}: expected a host name, 'name:port' or '*'")
        return cls(api_key, hosts)

    def host_allowed(self, host: str, server: tuple | None) -> bool:
        """Whether `Host: host` names this server, reached at local address `server` (host, port)."""
        if "*" in self.allowed_hosts:
            return True
        parsed = _split_host(host)
        if parsed is None:
            return False
        name, port = parsed
        local, local_port = server if server else (None, None)
        local = f"[{local}]" if local and ":" in local else local
        if name in (*LOCAL_NAMES, local):
            return local_port is None or port == local_port or (port is None and local_port == 80)
        for entry in self.allowed_hosts:
            entry_name, entry_port = _split_host(entry)
            if name == entry_name and (entry_port is None or entry_port == port):
                return True
        return False

    def needs_key(self, method: str, path: str) -> bool:
        if self.api_key is None:
            return False
        return not (method in ("GET", "HEAD") and (path in ("/", "/health") or path.startswith("/static/")))

    def key_matches(self, authorization: str | None) -> bool:
        scheme, _, token = (authorization or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())


def _headers(scope) -> dict[str, str]:
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}


class Guard:
    """The ASGI middleware (see the module doc)."""

    def __init__(self, app, *, access: Access):
        self.app, self.access = app, access

    def _refusal(self, scope, headers: dict[str, str]) -> tuple[int, str, str, dict] | None:
        """(status, message, param, extra headers) of a refused request, or None."""
        host = headers.get("host")
        if host is None:
            return 400, "the Host header is required", "Host", {}
        if not self.access.host_allowed(host, scope.get("server")):
            return 421, (f"Host {host!r} is not a name this server answers to (it answers to its address, "
                         "localhost, 127.0.0.1 and [::1] with its port; start it with --allowed-hosts NAME to add "
                         "one)"), "Host", {}
        origin = headers.get("origin")
        if origin is not None:
            parts = urlsplit(origin)
            if parts.scheme not in ("http", "https") or parts.netloc.lower() != host.strip().lower():
                return 403, (f"Origin {origin!r}: requests from another site's page are refused (this server's "
                             f"page is at http://{host}/)"), "Origin", {}
        if self.access.needs_key(scope["method"], scope["path"]):
            authorization = headers.get("authorization")
            if not self.access.key_matches(authorization):
                what = "missing API key" if authorization is None else "invalid API key"
                return 401, (f"{what}: send 'Authorization: Bearer <key>' (the key this server was started with, "
                             "--api-key or $CASA_API_KEY)"), "Authorization", {"www-authenticate": "Bearer"}
        return None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        has_body = headers.get("content-length", "0") != "0" or "transfer-encoding" in headers
        body_read = not has_body
        started = False

        async def receive_tracked():
            nonlocal body_read
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_read = True
            return message

        async def send_with_headers(message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                extra = SECURITY_HEADERS + ([] if body_read else [(b"connection", b"close")])
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        refused = self._refusal(scope, headers)
        if refused is not None:
            status, message, param, extra = refused
            code = "invalid_api_key" if status == 401 else None
            await _send_json(send_with_headers, status, error_body(status, message, param, code), extra)
            return
        try:
            await self.app(scope, receive_tracked, send_with_headers)
        except Exception:
            ident = uuid.uuid4().hex[:12]
            log.exception("internal error %s on %s %s", ident, scope["method"], scope["path"])
            if not started:  # else the response is cut short: uvicorn closes the connection
                body = error_body(500, f"internal error (request id {ident}; the server's log has the details)",
                                  code="internal_error")
                await _send_json(send_with_headers, 500, body, {})


async def _send_json(send, status: int, body: dict, headers: dict) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            *((k.encode(), v.encode()) for k, v in headers.items())]})
    await send({"type": "http.response.body", "body": payload})
