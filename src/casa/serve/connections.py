"""The HTTP connections themselves, below the ASGI app: how many may be open,
how long a client may take over a request's headers, how large they may be.

Design decisions:
- uvicorn's h11 protocol, subclassed for the two bounds it lacks:
  - `max_connections`: a connection beyond it is closed as soon as it is
    accepted, before anything is read: open sockets (file descriptors,
    buffers) are bounded whatever clients do.
  - `header_timeout`: from the moment a connection opens, or its previous
    response ends, the client has this long to complete the next request's
    line and headers; then the connection is closed. uvicorn times out only
    idle keep-alive connections, and any byte restarts that timer: a client
    trickling a header a byte at a time (slowloris) kept its connection for
    ever.
- What uvicorn has is used as is: `timeout_keep_alive` (idle connections
  between requests, `--keep-alive-timeout`), the h11 header size bound
  (`MAX_HEADER_BYTES`; beyond it uvicorn answers 400 and closes) and
  `limit_concurrency`, set one above `max_connections` so that it never
  refuses a request of an admitted connection (uvicorn counts the request's
  own connection) and answers 503 only when more requests are in flight than
  connections may be open: requests whose client has gone still run until
  they notice.
- A request's body has its own deadline where the body is read
  (`http.py`, `--body-timeout`).
- h11 always, never httptools where installed: these bounds are written for
  it; and no WebSocket upgrade (the server has no WebSocket route, and an
  upgraded connection would leave these bounds).
- Refusals are counted (`/health` counts `connections_refused`,
  `header_timeouts`, and reports the connections open) and logged at most
  once a minute each, so a flood of them cannot fill the log.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter

from uvicorn.protocols.http.h11_impl import H11Protocol

from casa.serve.limits import Limits

__all__ = ["MAX_HEADER_BYTES", "bounded_h11", "uvicorn_options"]

MAX_HEADER_BYTES = 16 * 1024  # a request line and headers (an API key and a few cookies fit many times)
LOG_EVERY = 60.0  # seconds between two log lines about the same kind of refusal
log = logging.getLogger("casa.serve")


def uvicorn_options(limits: Limits, counts: Counter, connections: set) -> dict:
    """The keyword arguments of `uvicorn.Config` that bound connections."""
    return {"http": bounded_h11(limits, counts, connections), "ws": "none",
            "limit_concurrency": limits.max_connections + 1, "timeout_keep_alive": limits.keep_alive_timeout,
            "h11_max_incomplete_event_size": MAX_HEADER_BYTES}


def bounded_h11(limits: Limits, counts: Counter, connections: set) -> type[H11Protocol]:
    """uvicorn's h11 protocol with `limits.max_connections` and `limits.header_timeout`
    (see the module doc); refusals are counted in `counts`, admitted connections
    kept in `connections` while open."""
    logged: dict[str, float] = {}

    def note(kind: str, message: str) -> None:
        counts[kind] += 1
        now = asyncio.get_running_loop().time()
        if now >= logged.get(kind, float("-inf")):
            logged[kind] = now + LOG_EVERY
            log.warning("%s (%d so far; logged at most once a minute)", message, counts[kind])

    class BoundedH11(H11Protocol):
        header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > limits.max_connections:
                self.connections.discard(self)  # not counted by uvicorn's limit while it closes
                note("connections_refused", f"connection refused: {limits.max_connections} connections open "
                                            "(--max-connections)")
                transport.close()
                return
            connections.add(self)
            self._arm()

        def _arm(self) -> None:
            self._disarm()
            self.header_timer = self.loop.call_later(limits.header_timeout, self._headers_too_slow)

        def _disarm(self) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
                self.header_timer = None

        def _headers_too_slow(self) -> None:
            self.header_timer = None
            if not self.transport.is_closing():
                note("header_timeouts", f"connection closed: no complete request headers within "
                                        f"{limits.header_timeout:g} s (--header-timeout)")
                self.transport.close()

        def handle_events(self) -> None:
            cycle = self.cycle
            super().handle_events()
            if self.cycle is not cycle:  # a request's headers are complete: its route runs now
                self._disarm()

        def on_response_complete(self) -> None:
            # armed first: a pipelined request, handled inside, disarms it again
            if not self.transport.is_closing():
                self._arm()
            super().on_response_complete()

        def connection_lost(self, exc) -> None:
            connections.discard(self)
            self._disarm()
            super().connection_lost(exc)

    return BoundedH11
