"""What the server accepts, and how many sessions it runs at once.

Design decisions:
- One `Limits` object holds every bound the operator can set (`casa serve
  --max-...`); each is checked once, at start-up, with the flag's name in the
  error.
- A *session* is anything that holds model state: one chat completion while it
  generates, or one live-captioning viewer. At most `max_sessions` run at
  once, each on its own worker thread (the model's weights are shared and
  read-only; each session has its own KV cache).
- Chat requests beyond that wait in a FIFO queue of at most `max_queue`
  requests, each for at most `queue_timeout` seconds; a request that finds the
  queue full is refused at once with 429, one that waits too long with 503.
  A live-captioning viewer is never queued (a page cannot usefully wait): it
  gets 429 when every slot is taken.
- A freed slot is handed to the oldest waiter directly, so a burst of new
  requests cannot overtake the queue.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, fields

__all__ = ["Admission", "Busy", "Limits"]


@dataclass(frozen=True)
class Limits:
    max_sessions: int = 2  # chat generations + live-captioning viewers running at once
    max_queue: int = 8  # chat requests waiting for a slot
    queue_timeout: float = 60.0  # seconds a queued chat request waits at most
    max_request_mb: float = 16.0  # a chat request's JSON body (data URLs included)
    max_upload_mb: float = 64.0  # an uploaded video
    max_video_seconds: float = 600.0  # a video's duration (declared, then as decoded)
    max_tokens: int = 512  # tokens generated per chat completion (also the default)
    max_prompt_tokens: int = 8192  # text + image tokens of a chat request's conversation
    max_images: int = 8  # images per chat request
    max_image_pixels: int = 4096 * 4096  # width x height of one image (decompression bombs)
    max_fps: float = 10.0  # live-captioning frame rate
    max_caption_tokens: int = 64  # tokens per live caption
    connect_timeout: float = 30.0  # seconds a created live session waits for its viewer

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not value > 0:
                flag = "--" + f.name.replace("_", "-")
                raise ValueError(f"{flag} {value!r}: must be > 0")

    @property
    def max_request_bytes(self) -> int:
        return int(self.max_request_mb * 2**20)

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)


class Busy(Exception):
    """No slot for a session: `status` 429 (queue full, or a viewer) or 503 (waited too long)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Admission:
    """Counts running sessions and queues chat requests (see the module doc).

    Used from the event loop only: no locking needed.
    """

    def __init__(self, limits: Limits):
        self.limits = limits
        self.active = 0
        self.waiting: deque[asyncio.Future] = deque()

    @property
    def queued(self) -> int:
        return sum(not f.done() for f in self.waiting)

    def _full_message(self) -> str:
        lim = self.limits
        return (f"server busy: {self.active} sessions running (--max-sessions {lim.max_sessions}) and "
                f"{self.queued} requests queued (--max-queue {lim.max_queue}); retry later")

    def try_acquire(self) -> None:
        """Take a slot now or raise `Busy` (429); never queues."""
        if self.active >= self.limits.max_sessions or self.queued:
            raise Busy(429, self._full_message())
        self.active += 1

    async def acquire(self) -> None:
        """Take a slot, waiting in the queue if needed; raise `Busy` when the queue
        is full (429) or the wait exceeds `queue_timeout` (503)."""
        if self.active < self.limits.max_sessions and not self.queued:
            self.active += 1
            return
        if self.queued >= self.limits.max_queue:
            raise Busy(429, self._full_message())
        slot = asyncio.get_running_loop().create_future()
        self.waiting.append(slot)
        try:
            await asyncio.wait_for(slot, self.limits.queue_timeout)
        except asyncio.TimeoutError:
            raise Busy(503, f"server busy: no session slot freed within {self.limits.queue_timeout:g} s "
                            "(--queue-timeout); retry later") from None
        except BaseException:  # the client left while queued: give back a slot handed over meanwhile
            if slot.done() and not slot.cancelled():
                self.release()
            raise
        finally:
            if slot in self.waiting:
                self.waiting.remove(slot)

    def release(self) -> None:
        """Free a slot: hand it to the oldest waiter, else count it free."""
        while self.waiting:
            slot = self.waiting.popleft()
            if not slot.done():
                slot.set_result(None)
                return
        self.active -= 1
