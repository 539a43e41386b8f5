"""What the server accepts, how many of each thing it holds at once, and for
how long.

Design decisions:
- One `Limits` object holds every bound the operator can set: each field is
  one `casa serve --max-...`/`--...-timeout` flag, with its default and its
  help text here (`casa.cli.serve` builds the flags from the fields), and is
  checked once, at start-up, with the flag's name in the error.
- A *session* is anything that runs the model: one chat completion while it
  prepares (images decoded, text tokenized) and generates, or one
  live-captioning stream while its viewer is connected. At most
  `max_sessions` run at once, each on its own worker thread (the model's
  weights are shared and read-only; each session has its own KV cache).
- Chat requests beyond that wait in a FIFO queue of at most `max_queue`
  requests, each for at most `queue_timeout` seconds; a request that finds the
  queue full is refused at once with 429, one that waits too long with 503.
  A live-captioning viewer is never queued (a page cannot usefully wait): it
  gets 429 when every slot is taken.
- A freed slot is handed to the oldest waiter directly, so a burst of new
  requests cannot overtake the queue.
- What holds memory or disk but no slot is bounded by its own count
  (`Places`): live sessions created and waiting for their viewer
  (`max_pending_live`), uploads being received (`max_uploads`). A request
  takes its place before its body is read or its work starts.
- A prompt's text is bounded in characters before it is tokenized
  (`max_prompt_chars`): `MAX_CHARS_PER_TOKEN` characters per allowed token,
  a factor no tokenizer casa loads reaches on real text (bytes: 1, BPE on
  English: about 4), so a text it refuses would have been refused after
  tokenizing; tokenizing is what a 15 MiB text made expensive.
- A refused value is echoed back shortened (`shown`): an error message never
  repeats a large input.
"""

from __future__ import annotations

import asyncio
import reprlib
from collections import deque
from dataclasses import dataclass, field, fields

__all__ = ["MAX_CHARS_PER_TOKEN", "Admission", "Busy", "Limits", "Places", "flag_name", "shown"]

MAX_CHARS_PER_TOKEN = 16
_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = 200  # a path fits
_repr.maxlevel, _repr.maxlist, _repr.maxdict = 2, 4, 4


def shown(value) -> str:
    """`repr(value)`, shortened for an error message."""
    return _repr.repr(value)


def _bound(default, help: str):
    return field(default=default, metadata={"help": help})


def flag_name(name: str) -> str:
    """The command-line flag of a `Limits` field: max_queue -> --max-queue."""
    return "--" + name.replace("_", "-")


@dataclass(frozen=True)
class Limits:
    # sessions: what runs the model
    max_sessions: int = _bound(2, "chat generations + live-captioning viewers running at once")
    max_queue: int = _bound(8, "chat requests waiting for a slot (beyond: 429)")
    queue_timeout: float = _bound(60.0, "seconds a queued chat request waits at most (beyond: 503)")
    # a chat request
    max_request_mb: float = _bound(16.0, "a chat request's JSON body, data URLs included, or a posted camera "
                                         "frame (MiB)")
    max_tokens: int = _bound(512, "tokens generated per chat completion (also the default)")
    max_prompt_tokens: int = _bound(8192, "text + image tokens of a chat request's conversation (its text is "
                                          f"also refused beyond {MAX_CHARS_PER_TOKEN} characters a token, "
                                          "before tokenizing)")
    max_images: int = _bound(8, "images per chat request")
    max_image_pixels: int = _bound(4096 * 4096, "width x height of one image (or camera frame), read from its "
                                                "header")
    max_request_pixels: int = _bound(2 * 4096 * 4096, "pixels of all the images of one chat request together, "
                                                      "read from their headers before any is decoded")
    # live captioning
    max_pending_live: int = _bound(4, "live sessions created and waiting for their viewer (beyond: 429)")
    connect_timeout: float = _bound(30.0, "seconds a created live session waits for its viewer")
    max_uploads: int = _bound(2, "video uploads being received at once (beyond: 429)")
    max_upload_mb: float = _bound(64.0, "an uploaded video (MiB)")
    max_video_seconds: float = _bound(600.0, "a video's duration (declared, then as decoded)")
    max_fps: float = _bound(10.0, "live-captioning frame rate")
    max_caption_tokens: int = _bound(64, "tokens per live caption")
    # connections
    max_connections: int = _bound(64, "open HTTP connections (a further one is closed at once)")
    header_timeout: float = _bound(10.0, "seconds a connection has to send a request's line and headers")
    body_timeout: float = _bound(60.0, "seconds a request has to send its whole body (beyond: 408)")
    keep_alive_timeout: float = _bound(5.0, "seconds an idle keep-alive connection stays open")

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{flag_name(f.name)} {value!r}: must be > 0")
            if f.type == "int" and not isinstance(value, int):
                raise ValueError(f"{flag_name(f.name)} {value!r}: must be a whole number")

    @property
    def max_request_bytes(self) -> int:
        return int(self.max_request_mb * 2**20)

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)

    @property
    def max_prompt_chars(self) -> int:
        """Characters of a conversation's text, checked before tokenizing (see the module doc)."""
        return self.max_prompt_tokens * MAX_CHARS_PER_TOKEN


class Busy(Exception):
    """No room: `status` 429 (queue or places full, or a viewer) or 503 (waited too long)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Places:
    """A bounded count of things in progress that hold no session slot; used from
    the event loop only."""

    def __init__(self, limit: int, what: str, flag: str):
        self.limit, self.what, self.flag = limit, what, flag
        self.used = 0

    def take(self) -> None:
        """Take a place or raise `Busy` (429)."""
        if self.used >= self.limit:
            raise Busy(429, f"server busy: {self.used} {self.what} ({self.flag} {self.limit}); retry later")
        self.used += 1

    def give_back(self) -> None:
        self.used -= 1


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
