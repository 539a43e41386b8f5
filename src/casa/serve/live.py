"""Live captioning: the page at `/`, and one streaming session per viewer.

A viewer creates a session from a video in the media directory
(`POST /live/sessions`) or from an upload (`POST /live/uploads`, the file's
bytes as the body), with its options (`fps`, `realtime`, `max_tokens`,
`instruction`: the user text with the first frame, `history`: "bounded" or
"full"), then opens its event stream (`GET /live/sessions/{id}/events`):
`start` (with the session's history), then per frame a `frame` event (the
frame as a JPEG data URL) and a `caption` event (text, time, TTFT, state and
process memory, lag), a `warning` when the decoder skips undecodable frames,
then `end` (with the count of undecodable source frames) or `failure`.
`POST /live/sessions/{id}/stop` ends it; `GET /live/sessions/{id}/captions.srt`
downloads its captions, during and after the session.

A camera (or screen) session is created with `"source": "camera"` (or
`"screen"`) in place of a video, and its frames come from the viewer: the
page captures them at the chosen rate and posts each one as a JPEG
(`POST /live/sessions/{id}/frames`, `Content-Type: image/jpeg`), answered at
once (202) with the frame's index and the counts so far. Its `caption` events
name the frame captioned (`index`), with its lag and the frames dropped
since the previous caption; its `end` gives the frames received, captioned
and dropped, the drop rate and the lag percentiles.

Design decisions:
- A session is checked completely before it exists: the path (inside the
  media directory), the container (a video, within the duration limit) and
  its first frame (decodable) - a bad file is an HTTP error, not a failed
  stream.
- Admission before work: a new session first takes a place among the
  sessions waiting for their viewer (`--max-pending-live`, else 429); an
  upload then takes one among the uploads being received (`--max-uploads`,
  else 429) before a byte of its body is read, and is written to disk within
  `--max-upload-mb` and `--body-timeout`. Only then is the video probed and
  opened. A session that waits holds its open file and first frame, never a
  session slot.
- The slot is taken when the viewer connects (its event stream opens; 429
  when none is free, and the session keeps waiting, so the viewer may try
  again) and held while it is connected; a session nobody connects to
  within `connect_timeout` is closed. One viewer per session.
- Frames are decoded at the chosen rate and, with `realtime` (the default),
  captioned at their moment in the video (never waiting when captioning
  falls behind, never skipping a frame); a caption's lag is from that moment
  (or, not in real time, from when the frame was decoded) to its end.
- A camera's frames never wait for the model: the library's live scheduler
  (`casa.inference.live`) keeps the newest posted frame in a one-frame slot
  (a frame replaced there before the model took it is dropped and counted,
  never queued) and the worker captions the newest frame whenever it is
  free. The lag is from the frame's arrival to the end of its caption. A
  posted frame is checked and stored, nothing more, on the event loop: its
  type (415), its size (`--max-request-mb`, 413; within `--body-timeout`,
  408) and its JPEG header (400; its pixels within `--max-image-pixels`,
  413); it is decoded only if it is captioned. Frames are taken only while
  the viewer is connected (409 before and after). A camera session also ends
  after `--max-video-seconds`.
- The viewer leaving (its event stream closing), the stop button and server
  shutdown all set the same stop flag (and close a camera's slot), checked
  before every frame; the worker then releases the captioner (the model
  state), the decoder and the uploaded file, and the slot is freed.
- A session keeps a bounded history by default (`Engine.live_history`: an
  attention sink and a sliding window, the library's `LIVE_HISTORY`), so its
  model state stops growing once the window is full, however long it runs;
  `history: "full"` keeps every token (the state then grows with the
  stream, and is bounded only by the session's length). The `start` event
  and the session's summary say which.
- Finished sessions keep only their captions (for the SRT download); the
  `keep` most recent are remembered.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from casa.serve.engine import Caption, History, LagStats, LatestFrame, LiveFrame, OpenVideo, caption_newest
from casa.serve.http import ApiError, EventStream, read_jpeg, read_json, receive_upload, sse
from casa.serve.limits import shown
from casa.serve.media import MediaError, check_jpeg, decode_jpeg, probe_video
from casa.serve.memory import rss_bytes
from casa.serve.state import ServeState

__all__ = ["LiveSession", "LiveSessions", "frame_jpeg", "routes"]

STATIC = Path(__file__).parent / "static"
MAX_INSTRUCTION = 1000  # characters
HISTORIES = ("bounded", "full")
SOURCES = ("video", "camera", "screen")  # camera and screen: frames posted by the viewer
log = logging.getLogger("casa.serve")


@dataclass
class LiveSession:
    id: str
    video: str  # what the viewer chose: a media-directory path, the uploaded file's name, "camera" or "screen"
    path: Path | None  # the file read (None: frames posted by the viewer)
    fps: float
    realtime: bool
    max_tokens: int
    instruction: str | None  # the user text with the first frame (None: the captioner's default)
    history: History | None  # the captioner's bounded history (None: the full one)
    frames: OpenVideo | None  # None once released, or for posted frames
    upload: Path | None  # an uploaded file, deleted when the session ends
    source: str = "video"  # one of SOURCES
    slot: LatestFrame | None = None  # the newest posted frame (camera and screen)
    lag: LagStats = field(default_factory=LagStats)
    undecodable: int = 0  # posted frames that could not be decoded
    started: float = 0.0  # time.monotonic() when the viewer connected
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    stop: threading.Event = field(default_factory=threading.Event)
    state: str = "waiting"  # waiting -> running -> finished | stopped | failed | expired
    captions: list[Caption] = field(default_factory=list)
    done: asyncio.Future | None = None  # the worker, once started
    viewer_gone: bool = False  # its event stream has closed: nobody reads `events` any more
    message: str = ""  # why it failed

    @property
    def posted(self) -> bool:
        """Whether the viewer posts the frames (a camera or a screen)."""
        return self.slot is not None

    def halt(self) -> None:
        """Set the stop flag; a worker waiting for a posted frame wakes up."""
        self.stop.set()
        if self.slot is not None:
            self.slot.close()

    def history_shown(self) -> dict | str:
        """The history as the `start` event and the summary state it: `{"sink", "window"}` (tokens) or "full"."""
        return "full" if self.history is None else {"sink": self.history.sink, "window": self.history.window}

    def counts(self) -> dict:
        """Posted frames received, captioned and dropped so far, the drop rate, the lag percentiles (ms)."""
        lag = self.lag.summary()
        return {"received": self.slot.received, "captioned": lag["captioned"], "dropped": lag["dropped"],
                "drop_rate": lag["drop_rate"], "lag_ms": lag["lag_ms"]}

    def summary(self) -> dict:
        return {"id": self.id, "video": self.video, "source": self.source, "fps": self.fps,
                "history": self.history_shown(), "state": self.state, "frames": len(self.captions),
                "message": self.message, **({"counts": self.counts()} if self.posted else {})}


def _drain(queue: asyncio.Queue) -> None:
    while not queue.empty():
        queue.get_nowait()


def frame_jpeg(image, *, max_side: int = 360) -> str:
    """A frame (uint8 `[H, W, 3]` array or PIL image) as a JPEG data URL, at most `max_side` pixels wide/high."""
    img = image if isinstance(image, Image.Image) else Image.fromarray(image)
    img = img.convert("RGB")
    img.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _caption_data(cap: Caption) -> dict:
    return {"time": cap.time, "end": cap.end, "text": cap.text, "tokens": cap.tokens, "ttft_ms": cap.ttft_ms,
            "decode_ms": cap.decode_ms, "kv_tokens": cap.kv_tokens, "cache_bytes": cap.cache_bytes,
            "rss_bytes": rss_bytes()}


class _Undecodable:
    """A posted frame whose JPEG data could not be decoded (its header could)."""

    def __init__(self, message: str):
        self.message = message


class LiveSessions:
    """The live-captioning sessions of one server (see the module doc)."""

    def __init__(self, state: ServeState, *, keep: int = 64):
        self.state = state
        self.keep = keep
        self.sessions: dict[str, LiveSession] = {}

    def running(self) -> int:
        return sum(s.state in ("waiting", "running") for s in self.sessions.values())

    def get(self, ident: str) -> LiveSession:
        if ident not in self.sessions:
            raise ApiError(404, f"live session {shown(ident)} does not exist (or has been forgotten)", param="id")
        return self.sessions[ident]

    async def create(self, video: str, options: dict, *, path: Path | None = None,
                     upload: Request | None = None, suffix: str = "", source: str = "video") -> LiveSession:
        """A session waiting for its viewer, from the media directory's file `path`, from the
        body of `upload` (saved with `suffix`), or (`source` "camera" or "screen") from frames
        the viewer will post: places first, then the body, then the checks (see the module
        doc). Holds no slot."""
        state = self.state
        state.take(state.pending_live)
        saved, frames = None, None
        try:
            if upload is not None:
                state.take(state.uploads)
                try:
                    saved = path = state.upload_dir / f"{uuid.uuid4().hex}{suffix}"
                    await receive_upload(upload, path, limit=state.limits.max_upload_bytes,
                                         timeout=state.limits.body_timeout)
                finally:
                    state.uploads.give_back()
            if source == "video":
                frames = await asyncio.to_thread(self._check_and_open, path, video, options["fps"])
        except BaseException:
            state.pending_live.give_back()
            if saved is not None:
                saved.unlink(missing_ok=True)
            raise
        history = state.engine.live_history if options.pop("history") == "bounded" else None
        session = LiveSession(uuid.uuid4().hex[:16], video, path, frames=frames, upload=saved, history=history,
                              source=source, slot=None if source == "video" else LatestFrame(), **options)
        self.sessions[session.id] = session
        asyncio.get_running_loop().call_later(state.limits.connect_timeout, self._expire, session)
        self._forget_old()
        return session

    def _check_and_open(self, path: Path, video: str, fps: float) -> OpenVideo:
        try:
            probe_video(path, max_seconds=self.state.limits.max_video_seconds, what=video)
            return self.state.engine.open_video(path, fps=fps)
        except (MediaError, ValueError) as e:
            status = e.status if isinstance(e, MediaError) else 400
            message = str(e).replace(str(path), video)  # name the file as the viewer knows it
            raise ApiError(status, message, param="video") from None

    def _forget_old(self) -> None:
        ended = [k for k, s in self.sessions.items() if s.state not in ("waiting", "running")]
        for k in ended[: max(0, len(ended) - self.keep)]:
            del self.sessions[k]

    def _close_unstarted(self, session: LiveSession, state: str) -> None:
        session.state = state
        session.halt()
        if session.frames is not None:
            session.frames.close()
            session.frames = None
        if session.upload is not None:
            session.upload.unlink(missing_ok=True)
        self.state.pending_live.give_back()

    def _expire(self, session: LiveSession) -> None:
        if session.state == "waiting":
            self._close_unstarted(session, "expired")

    async def start(self, session: LiveSession) -> None:
        """Take a slot (429 if none: the session keeps waiting) and start captioning
        on a worker thread (the viewer is connected)."""
        await self.state.acquire_slot(queue=False)
        self.state.pending_live.give_back()
        session.state, session.started = "running", time.monotonic()
        loop = asyncio.get_running_loop()
        session.done = self.state.run_session(self._run, session, loop)
        session.done.add_done_callback(lambda f: self._ended(session, f))

    def _ended(self, session: LiveSession, future: asyncio.Future) -> None:
        if not future.cancelled() and future.exception() is not None:  # _run reports its own errors: a bug
            ident = uuid.uuid4().hex[:12]
            log.error("internal error %s in live session %s", ident, session.id, exc_info=future.exception())
            session.state, session.message = "failed", f"internal error (request id {ident}; see the server's log)"
        self.state.counts[f"live_{session.state}"] += 1
        if session.viewer_gone:
            _drain(session.events)

    def viewer_left(self, session: LiveSession) -> None:
        """The viewer's event stream closed (read to its end, or dropped): stop, and
        drop the events nobody will read (frames are kept as JPEGs in them)."""
        session.halt()
        session.viewer_gone = True
        _drain(session.events)

    @staticmethod
    def taking_frames(session: LiveSession) -> None:
        """Raise the 409 unless `session` takes posted frames now (a camera or screen whose viewer is connected)."""
        if not session.posted:
            raise ApiError(409, f"live session {session.id} captions {shown(session.video)}; frames are posted to a "
                                "camera or screen session only", param="id")
        if session.state != "running":
            when = "before its viewer has connected" if session.state == "waiting" else session.state
            raise ApiError(409, f"live session {session.id}: {when}; frames are taken while its viewer is connected",
                           param="id")

    def put_frame(self, session: LiveSession, jpeg: bytes) -> dict:
        """Put a posted frame (its header checked) in the session's slot, replacing (dropping)
        one the model has not taken; its index and the counts so far."""
        self.taking_frames(session)  # again: the session may have ended while the body arrived
        now = time.monotonic()
        index = session.slot.received
        session.slot.put(LiveFrame(now - session.started, jpeg, f"{session.video}@{now - session.started:.3f}s",
                                   1.0 / session.fps, now, index))
        return {"index": index, "received": session.slot.received, "dropped": session.slot.dropped}

    def _run(self, session: LiveSession, loop: asyncio.AbstractEventLoop) -> None:
        """The worker: caption frame after frame until the end, a stop or an error."""

        def emit(kind: str, data: dict) -> None:
            loop.call_soon_threadsafe(session.events.put_nowait, (kind, data))

        name = str(session.path) if session.path else None
        try:
            captioner = self.state.engine.captioner(max_tokens=session.max_tokens, instruction=session.instruction,
                                                    history=session.history, allow_size_change=session.posted)
            end = (self._caption_posted if session.posted else self._caption_video)(session, captioner, emit)
            session.state = "stopped" if session.stop.is_set() else "finished"
            emit("end", {"reason": session.state, "frames": len(session.captions), **end})
        except ValueError as e:  # a frame that cannot be decoded or used: the captions so far stay
            message = str(e)
            session.state, session.message = "failed", message.replace(name, session.video) if name else message
            emit("failure", {"message": session.message, "frames": len(session.captions)})
        except Exception:
            ident = uuid.uuid4().hex[:12]
            log.exception("internal error %s in live session %s", ident, session.id)
            session.state, session.message = "failed", f"internal error (request id {ident}; see the server's log)"
            emit("failure", {"message": session.message, "frames": len(session.captions)})
        finally:
            captioner = None  # the session's model state goes with it
            if session.slot is not None:
                session.slot.close()
            if session.frames is not None:
                session.frames.close()
                session.frames = None
            if session.upload is not None:
                session.upload.unlink(missing_ok=True)

    def _caption_video(self, session: LiveSession, captioner, emit) -> dict:
        """Caption the video's frames in order (at their moment, `realtime`); the `end` event's fields."""
        limit = self.state.limits.max_video_seconds
        started, first, warned = time.monotonic(), None, 0

        def warn_new() -> None:
            nonlocal warned
            for message in session.frames.warnings[warned:]:  # e.g. undecodable frames skipped
                emit("warning", {"message": message.replace(str(session.path), session.video)})
            warned = len(session.frames.warnings)

        for frame in session.frames:
            if session.stop.is_set():
                break
            if frame.time > limit:
                raise ValueError(f"{session.video}: longer than {limit:g} s (--max-video-seconds); "
                                 f"stopped at {frame.time:.1f} s")
            first = frame.time if first is None else first
            due = started + frame.time - first if session.realtime else time.monotonic()
            if session.realtime and session.stop.wait(max(0.0, due - time.monotonic())):
                break
            index = len(session.captions)
            warn_new()
            emit("frame", {"index": index, "time": frame.time, "image": frame_jpeg(frame.image)})
            cap = captioner.caption(frame)
            lag = time.monotonic() - due
            session.lag.add(lag, 0)
            session.captions.append(cap)
            emit("caption", {"index": index, **_caption_data(cap), "lag_ms": round(lag * 1e3, 1), "dropped": 0})
        warn_new()
        return {"undecodable": session.frames.undecodable}

    def _caption_posted(self, session: LiveSession, captioner, emit) -> dict:
        """Caption the newest posted frame whenever the model is free (`caption_newest`), until
        the slot closes (the viewer gone, a stop) or the session's time is up; the `end` event's fields."""
        limit = self.state.limits.max_video_seconds

        def caption(frame: LiveFrame):
            if session.stop.is_set():
                return None  # stopping: a frame still in the slot is not captioned
            try:
                frame.image = decode_jpeg(frame.image, what=f"{session.video} frame {frame.index}")
            except MediaError as e:
                return _Undecodable(str(e))
            return captioner.caption(frame)

        carried = 0  # drops before an undecodable frame, counted with the next caption
        for live in caption_newest(caption, session.slot):
            if live.caption is None:
                break
            if isinstance(live.caption, _Undecodable):
                session.undecodable += 1
                carried += live.dropped
                emit("warning", {"message": f"{live.caption.message}; skipped"})
                continue
            cap, dropped = live.caption, live.dropped + carried
            carried = 0
            cap.frame = live.frame.index  # the frame's number among those received (not among those captioned)
            cap.end = max(cap.end, cap.time + live.lag)  # shown until the model was free for the next frame
            session.lag.add(live.lag, dropped)
            session.captions.append(cap)
            emit("caption", {"index": live.frame.index, **_caption_data(cap), "lag_ms": round(live.lag * 1e3, 1),
                             "dropped": dropped, "received": session.slot.received,
                             "dropped_total": session.lag.dropped})
            if live.frame.time > limit:
                emit("warning", {"message": f"{session.video}: the session reached {limit:g} s "
                                            "(--max-video-seconds); ended"})
                break
        counts = session.counts()
        return {"undecodable": session.undecodable, "received": counts["received"], "dropped": counts["dropped"],
                "drop_rate": counts["drop_rate"], "lag_ms": counts["lag_ms"]}

    async def stop(self, session: LiveSession) -> None:
        """Stop a session and wait (up to 30 s) until its state is released."""
        session.halt()
        if session.state == "waiting":
            self._close_unstarted(session, "stopped")
        elif session.done is not None:
            await asyncio.wait([session.done], timeout=30)

    async def shutdown(self) -> None:
        for session in list(self.sessions.values()):
            session.halt()
            if session.state == "waiting":
                self._close_unstarted(session, "stopped")
        running = [s.done for s in self.sessions.values() if s.done is not None and not s.done.done()]
        if running:
            await asyncio.wait(running, timeout=30)


# ----------------------------------------------------------------- routes
def _live(request: Request) -> LiveSessions:
    return request.app.state.casa.live


def _options(values, limits) -> dict:
    """fps, realtime, max_tokens, instruction, history from a JSON body or query parameters."""
    fps = values.get("fps", 1.0)
    try:
        fps = float(fps)
    except (TypeError, ValueError):
        raise ApiError(400, f"fps={shown(fps)}: expected a number", param="fps") from None
    if not 0 < fps <= limits.max_fps:
        raise ApiError(400, f"fps={fps:g}: must be in (0, {limits.max_fps:g}] (--max-fps)", param="fps")
    realtime = values.get("realtime", True)
    if isinstance(realtime, str):
        realtime = realtime.lower() not in ("0", "false", "no", "off")
    default_tokens = min(16, limits.max_caption_tokens)
    tokens = values.get("max_tokens", default_tokens)
    try:
        tokens = int(tokens)
    except (TypeError, ValueError, OverflowError):
        raise ApiError(400, f"max_tokens={shown(tokens)}: expected an integer", param="max_tokens") from None
    if not 1 <= tokens <= limits.max_caption_tokens:
        raise ApiError(400, f"max_tokens={tokens}: must be in [1, {limits.max_caption_tokens}] "
                            "(--max-caption-tokens)", param="max_tokens")
    instruction = values.get("instruction")
    if instruction is not None and (not isinstance(instruction, str) or len(instruction) > MAX_INSTRUCTION):
        raise ApiError(400, f"instruction: expected a string of at most {MAX_INSTRUCTION} characters",
                       param="instruction")
    history = values.get("history", "bounded")
    if history not in HISTORIES:
        raise ApiError(400, f"history={shown(history)}: expected one of {', '.join(HISTORIES)} (bounded: an "
                            "attention sink and a sliding window, the model state stays flat)", param="history")
    return {"fps": fps, "realtime": bool(realtime), "max_tokens": tokens, "instruction": instruction,
            "history": history}


async def page(request: Request) -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html")


async def config(request: Request) -> JSONResponse:
    state: ServeState = request.app.state.casa
    lim = state.limits
    return JSONResponse({"model": state.engine.name, "videos": await asyncio.to_thread(state.media.videos),
                         "media_dir": state.media.root is not None, "max_fps": lim.max_fps,
                         "max_upload_bytes": lim.max_upload_bytes, "max_video_seconds": lim.max_video_seconds,
                         "max_caption_tokens": lim.max_caption_tokens})


async def create_session(request: Request) -> JSONResponse:
    state: ServeState = request.app.state.casa
    body = await read_json(request, limit=64 * 1024, timeout=state.limits.body_timeout,
                           flag="a live session's options")
    options = _options(body, state.limits)
    source = body.get("source", "video")
    if source not in SOURCES:
        raise ApiError(400, f"source={shown(source)}: expected one of {', '.join(SOURCES)} (camera and screen: "
                            "the viewer posts the frames)", param="source")
    if source != "video":
        if "video" in body:
            raise ApiError(400, f"video: not with source={source!r} (its frames are posted by the viewer)",
                           param="video")
        options["realtime"] = True  # frames are captioned as they arrive
        session = await _live(request).create(source, options, source=source)
        return JSONResponse(session.summary(), status_code=201)
    video = body.get("video")
    if not isinstance(video, str):
        raise ApiError(400, "video: required, a file name in the media directory", param="video")
    try:
        path = state.media.resolve(video, "video")
    except MediaError as e:
        raise ApiError(e.status, str(e), param="video") from None
    session = await _live(request).create(video, options, path=path)
    return JSONResponse(session.summary(), status_code=201)


async def upload_session(request: Request) -> JSONResponse:
    state: ServeState = request.app.state.casa
    options = _options(request.query_params, state.limits)
    name = request.query_params.get("filename", "upload")[:200]
    suffix = Path(name).suffix.lower()
    suffix = suffix if re.fullmatch(r"\.[a-z0-9]{1,5}", suffix) else ""  # a hint for the demuxer only
    session = await _live(request).create(name, options, upload=request, suffix=suffix)
    return JSONResponse(session.summary(), status_code=201)


async def session_events(request: Request) -> EventStream:
    live = _live(request)
    session = live.get(request.path_params["id"])
    if session.state != "waiting":
        raise ApiError(409, f"live session {session.id}: already {session.state} (one viewer per session)",
                       param="id")
    await live.start(session)

    async def events():
        yield sse({"id": session.id, "video": session.video, "source": session.source, "fps": session.fps,
                   "history": session.history_shown()}, "start")
        while True:
            try:
                kind, data = await asyncio.wait_for(session.events.get(), 15)
            except asyncio.TimeoutError:
                yield ": keep-alive\n\n"
                continue
            yield sse(data, kind)
            if kind in ("end", "failure"):
                return

    return EventStream(events(), on_close=lambda: live.viewer_left(session))


async def post_frame(request: Request) -> JSONResponse:
    """A frame of a camera or screen session, the JPEG as the body (see the module doc)."""
    state: ServeState = request.app.state.casa
    live = _live(request)
    session = live.get(request.path_params["id"])
    live.taking_frames(session)  # before the body is read
    lim = state.limits
    jpeg = await read_jpeg(request, limit=lim.max_request_bytes, timeout=lim.body_timeout, flag="--max-request-mb")
    try:
        check_jpeg(jpeg, max_pixels=lim.max_image_pixels, what="frame")
    except MediaError as e:
        raise ApiError(e.status, str(e), param="body") from None
    return JSONResponse(live.put_frame(session, jpeg), status_code=202)


async def session_info(request: Request) -> JSONResponse:
    return JSONResponse(_live(request).get(request.path_params["id"]).summary())


async def stop_session(request: Request) -> JSONResponse:
    live = _live(request)
    session = live.get(request.path_params["id"])
    await live.stop(session)
    return JSONResponse(session.summary())


async def session_srt(request: Request) -> Response:
    state: ServeState = request.app.state.casa
    session = _live(request).get(request.path_params["id"])
    text = await asyncio.to_thread(state.engine.srt, list(session.captions))
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(session.video).stem) or "captions"
    return Response(text, media_type="application/x-subrip",
                    headers={"Content-Disposition": f'attachment; filename="{stem}.srt"'})


routes = [
    Route("/", page, methods=["GET"]),
    Route("/live/config", config, methods=["GET"]),
    Route("/live/sessions", create_session, methods=["POST"]),
    Route("/live/uploads", upload_session, methods=["POST"]),
    Route("/live/sessions/{id}", session_info, methods=["GET"]),
    Route("/live/sessions/{id}/events", session_events, methods=["GET"]),
    Route("/live/sessions/{id}/frames", post_frame, methods=["POST"]),
    Route("/live/sessions/{id}/stop", stop_session, methods=["POST"]),
    Route("/live/sessions/{id}/captions.srt", session_srt, methods=["GET"]),
]
