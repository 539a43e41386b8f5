"""What the routes of one server share: the engine, the limits and their
admission counter, the media directory, the worker threads, the counters
`/health` reports.

Design decisions:
- Model work runs on a pool of exactly `max_sessions` threads, never on the
  event loop: the loop keeps answering (health, errors, 429s) while every
  slot generates.
- A session's slot is released when its worker has *returned* (its KV cache
  is garbage by then), not when its client leaves; when the last one is
  released the freed heap goes back to the system (`memory.py`).
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
from casa.serve.limits import Admission, Busy, Limits
from casa.serve.media import MediaDir
from casa.serve.memory import peak_rss_bytes, release_freed_memory, rss_bytes

__all__ = ["ClientGone", "ServeState"]


class ClientGone(Exception):
    """Raised on a worker thread to abandon a session whose client has left."""


@dataclass
class ServeState:
    engine: Engine
    limits: Limits
    media: MediaDir
    admission: Admission = field(init=False)
    executor: ThreadPoolExecutor = field(init=False)
    upload_dir: Path = field(init=False)
    counts: Counter = field(default_factory=Counter)  # "completed", "cancelled", "refused", "failed", ...

    def __post_init__(self):
        self.admission = Admission(self.limits)
        self.executor = ThreadPoolExecutor(max_workers=self.limits.max_sessions, thread_name_prefix="casa-session")
        self.upload_dir = Path(tempfile.mkdtemp(prefix="casa-serve-uploads-"))
        self.live = None  # the live-captioning sessions (`live.LiveSessions`), set by the app

    async def acquire_slot(self, *, queue: bool = True) -> None:
        """Take a session slot (queueing if `queue`), or raise the 429/503 `ApiError`."""
        try:
            if queue:
                await self.admission.acquire()
            else:
                self.admission.try_acquire()
        except Busy as e:
            self.counts["refused"] += 1
            raise ApiError(e.status, str(e), code="rate_limit_exceeded" if e.status == 429 else "overloaded",
                           headers={"Retry-After": "1"}) from None

    def count_outcome(self, future: asyncio.Future, kind: str) -> None:
        """Count a finished session as completed, cancelled (client gone) or failed."""
        error = future.exception() if not future.cancelled() else None
        outcome = "cancelled" if future.cancelled() or isinstance(error, ClientGone) else "failed" if error else "completed"
        self.counts[f"{kind}_{outcome}"] += 1

    def run_session(self, fn, *args) -> asyncio.Future:
        """Run `fn(*args)` on a worker thread, holding an admission slot (already
        acquired) until it returns; the slot is released then."""
        future = asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)
        future.add_done_callback(lambda _: self.release())
        return future

    def release(self) -> None:
        self.admission.release()
        if self.admission.active == 0:  # idle: hand the sessions' freed memory back
            try:
                self.executor.submit(self._release_memory)
            except RuntimeError:  # shutting down: the process is about to give it all back
                pass

    def _release_memory(self) -> None:
        release_freed_memory()
        self.counts["memory_releases"] += 1  # lets a test wait for it

    def health(self) -> dict:
        return {"status": "ok", "model": self.engine.name, "sessions": self.admission.active,
                "queued": self.admission.queued, "max_sessions": self.limits.max_sessions,
                "max_queue": self.limits.max_queue, "live_sessions": self.live.running() if self.live else 0,
                "rss_bytes": rss_bytes(), "peak_rss_bytes": peak_rss_bytes(), "counts": dict(self.counts)}
