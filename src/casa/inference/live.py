"""Live captioning: frame intake that never waits for generation, lag and drops measured.

A reader thread (`LiveReader`) decodes the source continuously and keeps
only the newest frame (`LatestFrame`); the caption loop (`caption_newest`)
takes the newest frame whenever the model is free. A frame that a newer one
replaces before the model took it is dropped and counted, never queued, so
the lag (end of generation - capture) stays bounded by about one caption's
time plus the source's own latency, however slow the model is next to the
stream.

Design decisions:
- One slot, not a queue: the caption loop always wants the newest frame, so
  an older one waiting is useless. Drops are counted where they happen (a
  frame replaced in the slot) and handed to the caption that follows them.
- Capture time is when the reader had the frame decoded (`LiveFrame.captured`,
  `clock()` seconds): the first moment this process could caption it. The
  source's latency before that (network, container framing) is not in it.
- A frame's stream `time` (its SRT cue) comes from the source's timestamps,
  anchored to the arrival of each connection's first frame (never before the
  previous frame), and continued from the previous frame where the
  timestamps jump (backwards, or forwards by more than `RESYNC`): it never
  goes back, stays continuous across reconnections, and follows the wall
  clock of a live stream without taking up the jitter of its arrivals (a
  backlog read at once keeps its own spacing). A paced file (`realtime`)
  keeps its own timestamps.
- `realtime` paces any frame iterator at its timestamps (`speed` times
  faster; the benchmark's accelerated clock): `casa caption --realtime` on a
  file goes through this same path, so files test the live one.
- Reconnection is bounded: after a network source drops (an error, a stall
  past its read timeout, or its end), `reconnects` attempts, waiting
  `backoff`, then twice as long each time (at most `MAX_BACKOFF`); the
  count starts again after a success. Each event is recorded
  (`LiveReader.events`) and reported through `on_event`. Pipes and files
  end at their end.
- Lag percentiles come from a log-spaced histogram (2% buckets), so the
  statistics of a run of any length take constant memory.
- Live sessions default to a bounded history (`LIVE_HISTORY`: an attention
  sink and a sliding window, docs/design.md §5), so an hours-long stream
  runs in constant memory; `caption_live(history=None)` keeps everything.
- `caption_live` writes its SRT / JSONL in place (`writers.py`): readable while
  the stream runs, a kill -9 loses at most the entry being written. They
  open at the first caption, so a source that fails before one leaves
  earlier outputs as they were.
"""

from __future__ import annotations

import bisect
import math
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from casa.core.layout import History
from casa.inference.captioner import Caption, load_captioner
from casa.inference.generate import Sampling
from casa.inference.sources import Frame, LiveVideo, StreamError, is_live, open_frames
from casa.inference.writers import JsonlWriter, SrtWriter, check_caption_outputs

__all__ = ["LIVE_HISTORY", "LagStats", "LatestFrame", "LiveCaption", "LiveFrame", "LiveReader", "LiveRun",
           "caption_live", "caption_newest", "open_live"]

LIVE_HISTORY = History(sink=4, window=1024)  # tokens: about 35 frames of captions with 16-token replies
MAX_BACKOFF = 30.0  # seconds between reconnection attempts, at most
RESYNC = 2.0  # seconds: a jump of the timestamps beyond this is a discontinuity


def _warn(message: str) -> None:
    print(f"casa: warning: {message}", file=sys.stderr, flush=True)


@dataclass
class LiveFrame(Frame):
    captured: float = 0.0  # clock() seconds when the reader had it decoded
    index: int = 0  # frames the reader put in the slot before this one


# -------------------------------------------------------------------- slot
class LatestFrame:
    """The newest frame, shared by one reader and one consumer (thread-safe).

    `put` replaces a frame the consumer has not taken (that one is dropped
    and counted); `take` waits for a frame and returns it with the number
    dropped since the previous take, or None once the reader has closed the
    slot and it is empty.
    """

    def __init__(self):
        self._frame: LiveFrame | None = None
        self._ready = threading.Condition()
        self._closed = False
        self.received = 0  # frames put
        self.dropped = 0  # frames replaced before they were taken
        self._dropped_at_take = 0

    def put(self, frame: LiveFrame) -> None:
        with self._ready:
            if self._frame is not None:
                self.dropped += 1
            self._frame = frame
            self.received += 1
            self._ready.notify()

    def take(self, timeout: float | None = None) -> tuple[LiveFrame, int] | None:
        """`(newest frame, frames dropped since the last take)`; None when closed and empty
        (or after `timeout` seconds without a frame)."""
        with self._ready:
            if not self._ready.wait_for(lambda: self._frame is not None or self._closed, timeout):
                return None
            frame, self._frame = self._frame, None
            if frame is None:
                return None
            dropped = self.dropped - self._dropped_at_take
            self._dropped_at_take = self.dropped
            return frame, dropped

    def restart(self) -> int:
        """Forget the drops so far (frames replaced before the consumer was ready); returns their count."""
        with self._ready:
            dropped, self.dropped, self._dropped_at_take = self.dropped, 0, 0
            return dropped

    def close(self) -> None:
        """No more frames (the frame held, if any, can still be taken)."""
        with self._ready:
            self._closed = True
            self._ready.notify_all()


# ------------------------------------------------------------------ reader
class LiveReader:
    """A thread that reads a frame source and keeps its newest frame in `slot`.

    Args:
        open_source: `() -> iterator of Frame` (one connection); called again to reconnect.
        first: the source already opened (the command opens it before the model
            loads, to refuse a bad one at once), else opened by the thread.
        realtime: pace the frames at their timestamps, `speed` times faster.
        reconnects: attempts after the source drops (0: its end ends the run).
        backoff: seconds before the first attempt (doubled for each next one).
        on_event: `event dict -> None`, called from the thread (disconnections, reconnections).
        clock: seconds (`time.monotonic`); captures are on it.
    After the thread ends, `end` says why ("end of stream", "lost: ...", "stopped"), `error`
    holds an error raised by a source that never opened, and `events` every event.
    """

    def __init__(self, open_source: Callable[[], Iterator[Frame]], *, slot: LatestFrame | None = None,
                 first: Iterator[Frame] | None = None, name: str = "<source>", realtime: bool = False,
                 speed: float = 1.0, reconnects: int = 0, backoff: float = 0.5, on_event=None,
                 clock: Callable[[], float] = time.monotonic):
        if reconnects < 0 or not backoff > 0 or not speed > 0:
            raise ValueError(f"LiveReader: reconnects={reconnects} (>= 0), backoff={backoff} and speed={speed} "
                             "(> 0) out of range")
        self.open_source, self._source, self.name = open_source, first, name
        self.slot = slot or LatestFrame()
        self.realtime, self.speed, self.reconnects, self.backoff = realtime, speed, reconnects, backoff
        self.on_event, self.clock = on_event, clock
        self.events: list[dict] = []
        self.end: str | None = None
        self.error: BaseException | None = None
        self.undecodable = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"casa-live-reader {name}", daemon=True)
        self.started = None  # clock() when the thread started

    def start(self) -> LiveReader:
        self.started = self.clock()
        self._thread.start()
        return self

    def stop(self, wait: float = 1.0) -> None:
        """Stop reading (a network read in progress ends at its timeout; the thread is a daemon)."""
        self._stop.set()
        stop = getattr(self._source, "stop", None)
        if stop is not None:
            stop()
        self._thread.join(wait)

    def _event(self, kind: str, **fields) -> None:
        event = {"event": kind, "at_s": round(self.clock() - self.started, 3), **fields}
        self.events.append(event)
        if self.on_event is not None:
            self.on_event(event)

    def _run(self) -> None:
        try:
            self.end = self._read()
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
            self.error, self.end = e, f"error: {e}"
        finally:
            self.slot.close()

    def _read(self) -> str:
        pace = None  # (clock, frame time) of the first paced frame
        index, last = 0, None  # frames put; run time of the last one
        while True:
            source = self._source if self._source is not None else self.open_source()
            self._source = source
            anchor, before, problem = None, None, None  # this connection's offset to run time; its previous time
            try:
                for frame in source:
                    if self._stop.is_set():
                        return "stopped"
                    if self.realtime:
                        pace = pace or (self.clock(), frame.time)
                        wait = pace[0] + (frame.time - pace[1]) / self.speed - self.clock()
                        if wait > 0 and self._stop.wait(wait):
                            return "stopped"
                    captured = self.clock()
                    t = frame.time
                    if not self.realtime:  # see the module docstring
                        if anchor is None:
                            anchor = max(captured - self.started, last + frame.duration if index else 0.0) - t
                        elif t < before or t - before > RESYNC:
                            anchor = last + frame.duration - t
                        before, t = t, t + anchor
                    last = t
                    self.slot.put(LiveFrame(t, frame.image, f"{self.name}@{t:.3f}s", frame.duration, captured, index))
                    index += 1
            except StreamError as e:
                problem = str(e)
            finally:
                self.undecodable += getattr(source, "undecodable", 0)
                getattr(source, "close", lambda: None)()
                self._source = None
            if self._stop.is_set():
                return "stopped"
            if problem and not index:
                raise StreamError(problem)  # never gave a frame: an error, not a lost stream
            if not self.reconnects:
                return f"lost: {problem}" if problem else "end of stream"
            if not self._reconnect(problem or "the stream ended"):
                return f"lost: {problem or 'the stream ended'} ({self.reconnects} reconnection attempts failed)"

    def _reconnect(self, problem: str) -> bool:
        """Open the source again, `reconnects` attempts with backoff; True once it opened."""
        self._event("disconnected", reason=problem)
        lost_at = self.clock()
        delay = self.backoff
        for attempt in range(1, self.reconnects + 1):
            if self._stop.wait(delay):
                return False
            try:
                self._source = self.open_source()
            except StreamError as e:
                self._event("reconnect_failed", attempt=attempt, reason=str(e))
                delay = min(delay * 2, MAX_BACKOFF)
                continue
            self._event("reconnected", attempt=attempt, after_s=round(self.clock() - lost_at, 3))
            return True
        return False


# ---------------------------------------------------------------- captions
@dataclass
class LiveCaption:
    """A caption of the newest frame, with its timing on the reader's clock (seconds)."""

    caption: object  # what the caption function returned (a `Caption` for `Captioner`)
    frame: LiveFrame
    captured: float
    started: float  # generation started
    ended: float  # generation ended
    dropped: int  # frames dropped since the previous caption

    @property
    def lag(self) -> float:
        """Seconds from capture to the end of generation."""
        return self.ended - self.captured


def caption_newest(caption: Callable[[LiveFrame], object], slot: LatestFrame, *,
                   clock: Callable[[], float] = time.monotonic) -> Iterator[LiveCaption]:
    """Caption the newest frame of `slot` whenever `caption` is free, until the slot closes."""
    while (got := slot.take()) is not None:
        frame, dropped = got
        started = clock()
        result = caption(frame)
        yield LiveCaption(result, frame, frame.captured, started, clock(), dropped)


class LagStats:
    """Counts, drop rate and lag percentiles of a live run, in constant memory
    (a histogram with buckets 2% wide from 0.1 ms)."""

    RATIO, LOW = 1.02, 1e-4  # bucket width, lower edge (seconds)

    def __init__(self):
        self.captions = 0
        self.dropped = 0
        self.buckets: dict[int, int] = {}
        self.max = 0.0

    def add(self, lag: float, dropped: int) -> None:
        self.captions += 1
        self.dropped += dropped
        self.max = max(self.max, lag)
        b = 0 if lag <= self.LOW else int(math.log(lag / self.LOW) / math.log(self.RATIO)) + 1
        self.buckets[b] = self.buckets.get(b, 0) + 1

    def percentile(self, q: float) -> float | None:
        """Seconds (the upper edge of the bucket holding the q-th percentile, at most the maximum)."""
        if not self.captions:
            return None
        keys = sorted(self.buckets)
        cum, rank = [], 0
        for k in keys:
            rank += self.buckets[k]
            cum.append(rank)
        k = keys[bisect.bisect_left(cum, q / 100 * self.captions)]
        return min(self.LOW * self.RATIO**k, self.max)

    def summary(self) -> dict:
        offered = self.captions + self.dropped
        lag = {f"p{q}": round(self.percentile(q) * 1e3, 1) for q in (50, 90, 95, 99)} if self.captions else {}
        return {"captioned": self.captions, "dropped": self.dropped,
                "drop_rate": round(self.dropped / offered, 4) if offered else 0.0,
                "lag_ms": {**lag, "max": round(self.max * 1e3, 1)} if self.captions else {}}


# --------------------------------------------------------------------- run
def open_live(source, *, fps: float | None = None, realtime: bool = False, input_format: str | None = None,
              options: dict | None = None, open_timeout: float = 10.0, read_timeout: float = 5.0,
              stdin: int | None = None) -> tuple[Iterator[Frame], Callable[[], Iterator[Frame]] | None]:
    """Open a live source (`LiveVideo`) or, `realtime`, a file or folder (`open_frames`).
    Returns `(the opened source, how to open it again)`; the second is None where
    reopening makes no sense (stdin, pipes, files)."""
    if not is_live(source, input_format):
        if not realtime:
            raise StreamError(f"{source}: a file or folder, not a live stream (--realtime paces it as one)")
        return open_frames(source, fps=fps), None

    def reopen():
        return LiveVideo(source, fps=fps, input_format=input_format, options=options, open_timeout=open_timeout,
                         read_timeout=read_timeout, stdin=stdin)

    reconnectable = "://" in str(source)
    return reopen(), reopen if reconnectable else None


@dataclass
class LiveRun:
    """What `caption_live` did."""

    stats: dict  # `LagStats.summary()`, frames received and undecodable, reconnections, end
    interrupted: bool
    outputs: list[Path] = field(default_factory=list)


def caption_live(source, *, checkpoint, fps: float | None = None, srt=None, jsonl=None, opened=None,
                 realtime: bool = False, input_format: str | None = None, options: dict | None = None,
                 open_timeout: float = 10.0, read_timeout: float = 5.0, reconnects: int = 5, backoff: float = 0.5,
                 sampling: Sampling | None = None, processors_fn=None, history: History | None = LIVE_HISTORY,
                 instruction: str = "Caption each frame.", allow_size_change: bool = False, on_caption=None,
                 on_event=None, seed: int = 0, cache_dtype: str = "model", stdin: int | None = None) -> LiveRun:
    """Caption a live source (or a file at its pace, `realtime`): the newest frame whenever the model is free.

    Args:
        source: a URL, a device, a named pipe, `-` (stdin), or with `realtime` a video file or image folder.
        checkpoint: a casa model directory or a training run.
        fps: frames per second kept from the source (None: every frame; a folder: 1).
        srt, jsonl: output files, written in place as captions come (None: not written).
        opened: `open_live(...)`'s result when the caller opened the source already.
        reconnects, backoff: `LiveReader` (network sources only).
        history: bounded history of the session (default `LIVE_HISTORY`; None keeps everything).
        on_caption: called with each `LiveCaption` (its `.caption` a `Caption`, its `end`
            extended to the end of generation).
        on_event: called with each reader event (disconnected, reconnected, ...).
    Returns:
        a `LiveRun`; Ctrl-C ends the run with `interrupted=True`, the outputs complete.
    """
    srt, jsonl = check_caption_outputs(None if str(source) == "-" or "://" in str(source) else source, srt, jsonl)
    first, reopen = opened or open_live(source, fps=fps, realtime=realtime, input_format=input_format,
                                        options=options, open_timeout=open_timeout, read_timeout=read_timeout,
                                        stdin=stdin)
    name = "stdin" if str(source) == "-" else str(source)
    reader = LiveReader(reopen or (lambda: first), first=first, name=name, realtime=realtime,
                        reconnects=reconnects if reopen else 0, backoff=backoff, on_event=on_event)
    reader.start()  # frames arriving while the model loads are skipped: the newest one waits
    try:
        captioner = load_captioner(checkpoint, sampling=sampling, processors_fn=processors_fn, history=history,
                                   instruction=instruction, allow_size_change=allow_size_change,
                                   interval=1.0 / fps if fps else 1.0, seed=seed, cache_dtype=cache_dtype)
    except BaseException:
        reader.stop()
        raise
    # opened at the first caption (or the end): a source that fails before it leaves earlier outputs alone
    writers: list = []
    stats, interrupted, seen_events = LagStats(), False, 0

    def write_events(jsonl_writer):
        nonlocal seen_events
        for event in reader.events[seen_events:]:
            if jsonl_writer is not None:
                jsonl_writer.event(**event)
            seen_events += 1

    def opened_writers() -> tuple[list, JsonlWriter | None]:
        if not writers:
            writers.extend(w(p, in_place=True) for w, p in ((SrtWriter, srt), (JsonlWriter, jsonl)) if p)
        return writers, next((w for w in writers if isinstance(w, JsonlWriter)), None)

    skipped = reader.slot.restart()  # replaced while the model loaded: not the scheduler's drops
    try:
        for live in caption_newest(captioner.caption, reader.slot, clock=reader.clock):
            cap: Caption = live.caption
            cap.end = max(cap.end, cap.time + live.lag)  # shown until the model was free for the next frame
            stats.add(live.lag, live.dropped)
            outputs, jsonl_writer = opened_writers()
            write_events(jsonl_writer)
            t0 = reader.started
            timing = {"capture_s": round(live.captured - t0, 4), "start_s": round(live.started - t0, 4),
                      "end_s": round(live.ended - t0, 4), "lag_ms": round(live.lag * 1e3, 1),
                      "dropped": live.dropped}
            for w in outputs:
                w.write(cap, **timing) if w is jsonl_writer else w.write(cap)
            if on_caption is not None:
                on_caption(live)
    except KeyboardInterrupt:
        interrupted = True
    except BaseException:
        reader.stop()
        for w in writers:
            w.abandon()  # in place: the captions so far stay where they are
        raise
    reader.stop()
    if reader.error is not None and not interrupted:
        for w in writers:
            w.abandon()
        raise reader.error
    outputs, jsonl_writer = opened_writers()
    write_events(jsonl_writer)
    summary = {**stats.summary(), "received": reader.slot.received, "skipped_at_start": skipped,
               "undecodable_frames": reader.undecodable,
               "reconnects": sum(e["event"] == "reconnected" for e in reader.events),
               "end": "interrupted" if interrupted else reader.end,
               "history": {"sink": history.sink, "window": history.window} if history else "full"}
    if jsonl_writer is not None:
        jsonl_writer.summary(source=name, live=True, frames=captioner.frames, **summary, interrupted=interrupted)
    return LiveRun(summary, interrupted, [w.commit() for w in outputs])
