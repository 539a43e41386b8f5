"""What the routes of one server share: the engine, the limits and their
admission counters, the media directory, the worker threads, the counters
`/health` reports.

Design decisions:
- Model work runs on a pool of exactly `max_sessions` threads, never on the
  event loop: the loop keeps answering (health, errors, 429s) while every
  slot generates. A slot holder always finds a free thread.
- A session's slot is released when its worker has *returned* (its KV cache
  is garbage by then), not when its client leaves; when the last one is
  released the freed heap goes back to the system (`memory.py`). A refused
  request does the same once the server is idle: a large refused body (or
  images decoded before a refusal) leaves freed heap too.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from casa.serve.engine import Engine
from casa.serve.http import ApiError
from casa.serve.limits import Admission, Busy, Limits, Places
from casa.serve.media import MediaDir
from casa.serve.memory import peak_rss_bytes, release_freed_memory, rss_bytes

__all__ = ["ClientGone", "ServeState"]


class ClientGone(Exception):
    """Raised on a worker thread to abandon a session whose client has left."""


def _busy(e: Busy) -> ApiError:
    return ApiError(e.status, str(e), code="rate_limit_exceeded" if e.status == 429 else "overloaded",
                    headers={"Retry-After": "1"})


@dataclass
class ServeState:
    engine: Engine
    limits: Limits
    media: MediaDir
    admission: Admission = field(init=False)
    executor: ThreadPoolExecutor = field(init=False)
    upload_dir: Path = field(init=False)
    counts: Counter = field(default_factory=Counter)  # "completed", "cancelled", "refused", "failed", ...
    connections: set = field(default_factory=set)  # open HTTP connections (kept by `connections.py`)

    def __post_init__(self):
        lim = self.limits
        self.admission = Admission(lim)
        self.pending_live = Places(lim.max_pending_live, "live sessions wait for their viewer", "--max-pending-live")
        self.uploads = Places(lim.max_uploads, "uploads are being received", "--max-uploads")
        self.executor = ThreadPoolExecutor(max_workers=lim.max_sessions, thread_name_prefix="casa-session")
        self.upload_dir = Path(tempfile.mkdtemp(prefix="casa-serve-uploads-"))
        self.live = None  # the live-captioning sessions (`live.LiveSessions`), set by the app
        self.loop: asyncio.AbstractEventLoop | None = None  # the server's event loop, once it runs
        self._trim_pending = False

    async def acquire_slot(self, *, queue: bool = True) -> None:
        """Take a session slot (queueing if `queue`), or raise the 429/503 `ApiError`."""
        try:
            if queue:
                await self.admission.acquire()
            else:
                self.admission.try_acquire()
        except Busy as e:
            self.counts["refused"] += 1
            raise _busy(e) from None

    def take(self, places: Places) -> None:
        """Take one of `places` (pending live sessions, uploads), or raise the 429 `ApiError`."""
        try:
            places.take()
        except Busy as e:
            self.counts["refused"] += 1
            raise _busy(e) from None

    def count_outcome(self, future: asyncio.Future, kind: str) -> None:
        """Count a finished session as completed, cancelled (client gone) or failed."""
        error = future.exception() if not future.cancelled() else None
        outcome = "cancelled" if future.cancelled() or isinstance(error, ClientGone) else "failed" if error else "completed"
        self.counts[f"{kind}_{outcome}"] += 1

    def in_slot(self, fn, *args) -> asyncio.Future:
        """Run `fn(*args)` on a worker thread for a slot already held (not released here)."""
        return asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def run_session(self, fn, *args) -> asyncio.Future:
        """Run `fn(*args)` on a worker thread, holding an admission slot (already
        acquired) until it returns; the slot is released then."""
        future = self.in_slot(fn, *args)
        future.add_done_callback(lambda _: self.release())
        return future

    def release(self) -> None:
        self.admission.release()
        self.trim_when_idle()

    def trim_when_idle(self) -> None:
        """Hand freed heap back to the system now if no session runs (else the last one does)."""
        if self.admission.active or self._trim_pending:
            return
        self._trim_pending = True
        try:
            self.executor.submit(self._release_memory)
        except RuntimeError:  # shutting down: the process is about to give it all back
            pass

    def _release_memory(self) -> None:
        self._trim_pending = False
        release_freed_memory()
        self.counts["memory_releases"] += 1  # lets a test wait for it

    def health(self) -> dict:
        live = self.live
        batcher = self.engine.batcher
        return {"status": "ok", "model": self.engine.name, "decode": self.engine.decode,
                "decode_steps": batcher.steps if batcher else None, "decoded_tokens": batcher.rows if batcher else None,
                "sessions": self.admission.active,
                "queued": self.admission.queued, "max_sessions": self.limits.max_sessions,
                "max_queue": self.limits.max_queue, "live_sessions": live.running() if live else 0,
                "live_waiting": self.pending_live.used, "uploads": self.uploads.used,
                "connections": len(self.connections),
                "rss_bytes": rss_bytes(), "peak_rss_bytes": peak_rss_bytes(), "counts": dict(self.counts)}
