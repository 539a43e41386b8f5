"""Frame sources for streaming: video files (PyAV), image folders, any iterable.

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
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from PIL import Image

__all__ = ["IMAGE_SUFFIXES", "Frame", "StreamError", "VideoFrames", "as_frames", "folder_frames", "frame_size",
           "open_frames", "video_frames"]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
EPS = 1e-6  # seconds: timestamps are rationals turned into floats


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
