"""Frame sources for streaming: video files (PyAV), image folders, live streams, any iterable.

Design decisions:
- A frame is a `Frame(time, image, source, duration)`; `duration` is how long
  the frame stands for, so that a caption cue runs from the frame to the next
  sampled one: cues have no gaps and no overlaps.
- `video_frames` samples by timestamp on an even grid: for each multiple of
  `1/fps` after the first frame (before the video's end) it keeps the decoded
  frame nearest to it (the earlier one on a tie). A frame's duration is
  known when the next sampled frame is, so frames are handed out one sampled
  frame late; the last one lasts until the end of the video. An `fps` above
  the video's rate is an error, not a silent duplication.
- A corrupt video is captioned as far as it decodes: packets that fail to
  decode are skipped and counted (`VideoFrames.undecodable`, in source
  frames), a file that ends before its declared frame count adds the missing
  ones, and the first such problem is reported once (`warn`, stderr by
  default) with the file's name. A file that cannot be opened, or has no
  video stream or no frame at all, is an error (`StreamError`).
- `folder_frames` reads an image folder in name order, frame `i` at `i / fps`;
  an unreadable image is an error naming the file.
- A live source (`LiveVideo`: a URL FFmpeg can open, `rtsp://`, `http(s)://`,
  `udp://`, `tcp://`, `srt://`...; a camera `/dev/video*`; a named pipe; `-`
  for stdin; anything with an explicit FFmpeg input format such as `x11grab`)
  hands out each frame as soon as it is decoded: no one-frame-late hand-out,
  its duration is the sampling interval. It opens for low latency: FFmpeg's
  default probing reads about 20 frames to guess the frame rate before the
  first one is returned (2.3 s at 10 fps on a loopback stream), so the probe
  stops once the codec is known (`LIVE_OPTIONS`), and the decoder runs with
  `low_delay` and slice threads (frame threads hold frames back). What is
  left is the container's own framing (an MPEG-TS PES ends when the next one
  starts, the parser waits for the next access unit): two to three source
  frames.
- A live source that cannot be opened, or stays silent past `open_timeout`, is
  a `StreamError` naming it and the timeout; once open, a read that waits
  past `read_timeout` is one too ("no data for N s"). Pipes and stdin are
  read through `select` (FFmpeg's own timeout cannot interrupt a blocking
  read of a pipe). Reconnecting is the caller's business
  (`casa.inference.live.LiveReader`): one `LiveVideo` is one connection.
  Packets that fail to decode (a UDP stream joined between key frames,
  datagrams lost) are skipped and counted (`undecodable`).
"""

from __future__ import annotations

import os
import select
import stat
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from PIL import Image

__all__ = ["IMAGE_SUFFIXES", "LIVE_OPTIONS", "Frame", "LiveVideo", "StreamError", "VideoFrames", "as_frames",
           "folder_frames", "frame_size", "is_live", "open_frames", "video_frames"]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
EPS = 1e-6  # seconds: timestamps are rationals turned into floats
# FFmpeg options a live input opens with (overridable): probe until the codec is known, not the frame rate
LIVE_OPTIONS = {"fpsprobesize": "0", "analyzeduration": "1000000"}


class StreamError(ValueError):
    """Bad stream input; the message names the input (file, frame, time)."""


@dataclass
class Frame:
    time: float  # seconds
    image: object  # uint8 HxWx3 array or PIL image
    source: str = "<frame>"
    duration: float = 1.0  # seconds this frame stands for (the SRT cue length)


def _stderr_warning(message: str) -> None:
    print(f"casa: warning: {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ video
class VideoFrames:
    """RGB frames of a video file sampled at `fps` (None: every frame), as an
    iterator of `Frame`s; see the module docstring for sampling and damage.

    The file is opened and checked on construction; frames are decoded as
    they are consumed. After iteration, `undecodable` counts the source
    frames that could not be decoded.
    """

    def __init__(self, path, *, fps: float | None = None, warn: Callable[[str], None] = _stderr_warning):
        import av

        self.path = str(path)
        if fps is not None and not fps > 0:
            raise StreamError(f"{self.path}: fps={fps}: must be > 0")
        try:
            self.container = av.open(self.path)
        except (av.error.FFmpegError, OSError) as e:
            raise StreamError(f"{self.path}: cannot read video: {e}") from None
        if not self.container.streams.video:
            self.container.close()
            raise StreamError(f"{self.path}: no video stream (empty, zero-length or not a video file)")
        stream = self.container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        self.source_fps = float(rate) if rate else None
        if fps is not None and self.source_fps is not None and fps > self.source_fps * 1.001:
            self.container.close()
            raise StreamError(f"{self.path}: requested fps {fps:g} is above the video's frame rate "
                              f"{self.source_fps:g}")
        self.fps = fps
        self.declared = stream.frames  # 0 when the container does not say
        self.decoded = 0
        self.undecodable = 0
        self._warn, self._warned = warn, False
        self._frames = self._timed_frames()

    def __iter__(self) -> Iterator[Frame]:
        return self

    def __next__(self) -> Frame:
        return next(self._frames)

    def close(self) -> None:
        """Stop decoding and release the file (also done when iteration ends)."""
        self._frames.close()
        self.container.close()

    def _problem(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            self._warn(f"{self.path}: {message}; undecodable frames are skipped and counted")

    def _decoded(self):
        """`(time, av.VideoFrame)` of every frame that decodes, in order."""
        import av

        stream = self.container.streams.video[0]
        packets = self.container.demux(stream)
        last_time = None
        while True:
            try:
                packet = next(packets)
            except StopIteration:
                break
            except (av.error.FFmpegError, OSError) as e:  # the container itself is damaged: nothing more to read
                where = f"after {last_time:.3f}s" if last_time is not None else "at the start"
                self._problem(f"cannot read the video {where} ({e})")
                break
            try:
                frames = packet.decode()
            except (av.error.FFmpegError, OSError) as e:
                self.undecodable += 1
                where = f"after {last_time:.3f}s" if last_time is not None else "at the start"
                self._problem(f"undecodable frame {where} ({type(e).__name__})")
                continue
            for frame in frames:
                t = frame.time if frame.time is not None else self.decoded / (self.source_fps or 1.0)
                self.decoded += 1
                last_time = t
                yield t, frame
        missing = self.declared - self.decoded - self.undecodable
        if self.declared and missing >= 2 and missing > 0.05 * self.declared:  # declared counts may be estimates
            self.undecodable += missing
            self._problem(f"the video ends after {self.decoded} of its {self.declared} frames "
                          f"({last_time or 0:.3f}s): truncated or corrupt file")

    def _sampled(self):
        """`(time, av.VideoFrame)` nearest to each grid time `first + k / fps`
        (every frame without fps), then `(end of video, None)`."""
        step = 1.0 / self.fps if self.fps else None
        frame_duration = 1.0 / self.source_fps if self.source_fps else (step or 1.0)
        first, k, prev, emitted = None, 0, None, None
        for t, frame in self._decoded():
            if step is None:
                yield t, frame
                prev = (t, frame)
                continue
            first = t if first is None else first
            while t >= first + k * step - EPS:
                grid = first + k * step
                pick = prev if prev is not None and grid - prev[0] <= t - grid else (t, frame)
                if pick is not emitted:
                    yield pick
                    emitted = pick
                k += 1
            prev = (t, frame)
        if prev is None:
            return
        end = prev[0] + frame_duration
        if step is not None and prev is not emitted and first + k * step < end - EPS:
            yield prev  # the last grid time falls within the last frame
        yield end, None

    def _timed_frames(self):
        """Sampled frames with their duration (until the next sampled frame), one frame late."""
        try:
            pending = None
            for t, frame in self._sampled():
                if pending is not None:
                    pt, pframe = pending
                    yield Frame(pt, pframe.to_ndarray(format="rgb24"), f"{self.path}@{pt:.3f}s", t - pt)
                pending = None if frame is None else (t, frame)
            if self.decoded == 0:
                raise StreamError(f"{self.path}: no video frame could be decoded (zero-length or corrupt video)")
        finally:
            self.container.close()


def video_frames(path, *, fps: float | None = None, warn: Callable[[str], None] = _stderr_warning) -> VideoFrames:
    """RGB frames of a video file at `fps` (None: every frame); see `VideoFrames`."""
    return VideoFrames(path, fps=fps, warn=warn)


# ----------------------------------------------------------------- folders
def folder_frames(path, *, fps: float | None = None) -> Iterator[Frame]:
    """Image files of a folder in name order, frame `i` at `i / fps` (fps
    default 1). The folder is listed now; images are read as consumed."""
    folder = Path(path)
    fps = fps or 1.0
    if not fps > 0:
        raise StreamError(f"{path}: fps={fps}: must be > 0")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise StreamError(f"{path}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return _read_images(files, fps)


def _read_images(files: list[Path], fps: float) -> Iterator[Frame]:
    for i, file in enumerate(files):
        try:
            with Image.open(file) as img:
                img.load()  # decode now, so that a truncated file fails here
                image = img.copy()  # kept as PIL: 16-bit and float modes are scaled by preprocessing
        except Exception as e:  # noqa: BLE001 - missing, unreadable, corrupt, truncated
            raise StreamError(f"{file}: cannot read image: {e}") from None
        yield Frame(i / fps, image, str(file), 1.0 / fps)


def open_frames(path, *, fps: float | None = None, warn: Callable[[str], None] = _stderr_warning):
    """A video file (`VideoFrames`) or an image folder (`folder_frames`)."""
    p = Path(path)
    if not p.exists():
        raise StreamError(f"{path}: no such file or folder")
    return folder_frames(p, fps=fps) if p.is_dir() else video_frames(p, fps=fps, warn=warn)


# -------------------------------------------------------------------- live
def is_live(source, input_format: str | None = None) -> bool:
    """Whether `source` is read as a live stream: `-` (stdin), a URL (`scheme://`, not
    `file://`), a camera or other device, a named pipe, or any source given an
    explicit FFmpeg input format (`x11grab`, `v4l2`, ...)."""
    source = str(source)
    if input_format or source == "-" or source.startswith("/dev/video"):
        return True
    if "://" in source:
        return not source.startswith("file://")
    try:
        mode = os.stat(source).st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISCHR(mode) or stat.S_ISSOCK(mode)  # not a regular file


def _is_fifo(path: str) -> bool:
    try:
        return stat.S_ISFIFO(os.stat(path).st_mode)
    except OSError:
        return False


class _PipeInput:
    """A pipe (stdin or a named pipe) as a file object PyAV reads, with timeouts:
    `read` waits at most `timeout` seconds for data (TimeoutError), in short
    slices so that `stop()` ends a wait at once."""

    def __init__(self, fd: int, name: str, *, timeout: float, wait_for_writer: bool):
        self.fd, self.name, self.timeout = fd, name, timeout
        self.wait_for_writer = wait_for_writer  # a named pipe opened before its writer reads as empty
        self.seen = False
        self.stopped = False

    def read(self, n: int) -> bytes:
        deadline = time.monotonic() + self.timeout
        while not self.stopped:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.name}: no data for {self.timeout:g} s")
            ready, _, _ = select.select([self.fd], [], [], min(left, 0.1))
            if not ready:
                continue
            data = os.read(self.fd, n)
            if data or self.seen or not self.wait_for_writer:
                self.seen = self.seen or bool(data)
                return data
            time.sleep(0.02)  # no writer yet: the pipe reads as empty
        return b""

    def stop(self) -> None:
        self.stopped = True


class LiveVideo:
    """RGB frames of a live input (one connection), as an iterator of `Frame`s
    handed out as soon as they are decoded; see the module docstring.

    Args:
        source: a URL, a device, a named pipe, or `-` (stdin).
        fps: frames per second to keep, by timestamp (None: every decoded frame).
        input_format: an FFmpeg input format (`x11grab`, `v4l2`, `mpegts`...;
            None: guessed, `video4linux2` for `/dev/video*`).
        options: FFmpeg options over `LIVE_OPTIONS`.
        open_timeout, read_timeout: seconds without data before opening, or a
            read, fails (`StreamError`).
        stdin: the file descriptor `-` reads (default: this process's stdin).
    A frame's `time` counts from this connection's first frame (its timestamps,
    or the arrival times where frames have none); `duration` is the sampling
    interval (or the stream's frame interval).
    """

    def __init__(self, source, *, fps: float | None = None, input_format: str | None = None,
                 options: dict | None = None, open_timeout: float = 10.0, read_timeout: float = 5.0,
                 stdin: int | None = None):
        import av

        self.source = str(source)
        self.name = "stdin" if self.source == "-" else self.source
        if fps is not None and not fps > 0:
            raise StreamError(f"{self.name}: fps={fps}: must be > 0")
        for name, value in (("open_timeout", open_timeout), ("read_timeout", read_timeout)):
            if not value > 0:
                raise StreamError(f"{self.name}: {name}={value}: must be > 0")
        self.fps, self.read_timeout = fps, read_timeout
        self.undecodable = 0
        self._pipe = None
        target, fmt = self.source, input_format
        if self.source == "-":
            fd = sys.stdin.fileno() if stdin is None else stdin
            self._pipe = target = _PipeInput(fd, self.name, timeout=open_timeout, wait_for_writer=False)
        elif not input_format and _is_fifo(self.source):
            fd = os.open(self.source, os.O_RDONLY | os.O_NONBLOCK)  # at once, even before a writer opens it
            self._pipe = target = _PipeInput(fd, self.name, timeout=open_timeout, wait_for_writer=True)
        elif fmt is None and self.source.startswith("/dev/video"):
            fmt = "video4linux2"
        try:
            self.container = av.open(target, format=fmt, options={**LIVE_OPTIONS, **(options or {})},
                                     timeout=(open_timeout, read_timeout))
        except (av.error.ExitError, TimeoutError):
            self._close_pipe()
            raise StreamError(f"{self.name}: no data within {open_timeout:g} s (--open-timeout)") from None
        except (av.error.FFmpegError, OSError, ValueError) as e:
            self._close_pipe()
            raise StreamError(f"{self.name}: cannot open the stream: {e}") from None
        if self._pipe is not None:
            self._pipe.timeout = read_timeout
        if not self.container.streams.video:
            self.close()
            raise StreamError(f"{self.name}: no video stream")
        stream = self.container.streams.video[0]
        stream.codec_context.thread_type = "SLICE"  # frame threads hold frames back, one per thread
        stream.codec_context.flags |= av.codec.context.Flags.low_delay
        rate = stream.average_rate or stream.guessed_rate  # a guess: the probe stopped before measuring it
        self.duration = 1.0 / fps if fps else 1.0 / float(rate) if rate else 0.04  # then measured between frames
        self._frames = self._decoded()

    def __iter__(self) -> Iterator[Frame]:
        return self

    def __next__(self) -> Frame:
        return next(self._frames)

    def _close_pipe(self) -> None:
        if self._pipe is not None and self.source != "-":  # stdin stays open: it is not ours
            os.close(self._pipe.fd)
        self._pipe = None

    def stop(self) -> None:
        """Make a pipe read that waits return at once (any thread); network reads wait their timeout."""
        pipe = self._pipe  # read once: the reading thread may be closing it
        if pipe is not None:
            pipe.stop()

    def close(self) -> None:
        """Release the input (also done when iteration ends); from the thread that reads it."""
        if hasattr(self, "_frames"):
            self._frames.close()
        self.container.close()
        self._close_pipe()

    def _decoded(self):
        import av

        stream = self.container.streams.video[0]
        step = 1.0 / self.fps if self.fps else None
        first, due, previous, opened = None, None, None, time.monotonic()
        try:
            for packet in self.container.demux(stream):
                try:
                    frames = packet.decode()
                except av.error.InvalidDataError:  # joined between key frames, or data lost
                    self.undecodable += 1
                    continue
                for frame in frames:
                    t = frame.time if frame.time is not None else time.monotonic() - opened
                    first = t if first is None else first
                    t -= first
                    if step is None and previous is not None and 0 < t - previous < 10:
                        self.duration = t - previous
                    previous = t
                    if step is not None:
                        if due is not None and t < due - EPS:
                            continue
                        due = t + step if due is None or t - due >= step else due + step
                    yield Frame(t, frame.to_ndarray(format="rgb24"), f"{self.name}@{t:.3f}s", self.duration)
        except (av.error.ExitError, TimeoutError):
            raise StreamError(f"{self.name}: no data for {self.read_timeout:g} s (--read-timeout)") from None
        except (av.error.FFmpegError, OSError) as e:
            raise StreamError(f"{self.name}: the stream broke: {e}") from None
        finally:
            self.container.close()
            self._close_pipe()


# ---------------------------------------------------------------- iterables
def as_frames(frames: Iterable, interval: float) -> Iterator[Frame]:
    """`Frame`s from any iterable of `Frame`s, `(seconds, image)` pairs or bare
    images (frame `i` at `i * interval`)."""
    for i, item in enumerate(frames):
        if isinstance(item, Frame):
            yield item
        elif isinstance(item, tuple) and len(item) == 2:
            yield Frame(float(item[0]), item[1], f"frame {i}", interval)
        else:
            yield Frame(i * interval, item, f"frame {i}", interval)


def frame_size(image) -> tuple[int, int]:
    """`(height, width)` of a frame's image."""
    if isinstance(image, Image.Image):
        return image.height, image.width
    if isinstance(image, np.ndarray) and image.ndim >= 2:
        return image.shape[0], image.shape[1]
    raise StreamError(f"unsupported frame type {type(image).__name__}: expected a uint8 array or a PIL image")
