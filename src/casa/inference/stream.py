"""Streaming captioning: frames in, timestamped captions out, constant state.

Design decisions:
- Frames come from any iterable: `Frame`s, `(seconds, image)` pairs or bare
  images (then frame `i` is at `i * interval`). `video_frames` decodes a file
  with PyAV and keeps the first frame at or after each multiple of `1/fps`
  (an `fps` above the source's is an error, not a silent duplicate);
  `folder_frames` reads an image folder in name order, one frame per `1/fps`.
- Each frame is one chat turn in the training format of `data/processor.py`:
  `<|user|> [frame] <|gist|> (instruction, first frame only) <|end|>
  <|assistant|> caption <|end|>`; the frame opens a new window, so the
  fusion state is one frame's image K/V, whatever the length of the stream.
- TTFT is measured from the frame's arrival (preprocessing, vision encoder,
  image K/V and prompt included) to the first sampled token.
- Frames of a size different from the first one are an error unless
  `allow_size_change` (every frame is resized to the model's input anyway, but
  a change of size mid-stream usually means mixed-up sources).
- The SRT and JSONL writers write one complete entry per call and flush it,
  so the files on disk are valid after every frame, and after an error: an
  empty caption gets a JSONL line but no SRT entry (SRT has no empty cue).
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from PIL import Image

from casa.inference.cache import History
from casa.inference.generate import Chat, Sampling
from casa.inference.session import Session

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class StreamError(ValueError):
    """Bad stream input; the message names the input (file, frame, time)."""


@dataclass
class Frame:
    time: float  # seconds
    image: object  # uint8 HxWx3 array or PIL image
    source: str = "<frame>"
    duration: float = 1.0  # seconds this frame stands for (the SRT cue length)


# ------------------------------------------------------------------ sources
def video_frames(path, *, fps: float | None = None) -> Iterator[Frame]:
    """RGB frames of a video file at `fps` (None: every frame). The file is
    opened and checked now; frames are decoded as they are consumed."""
    import av

    path = str(path)
    if fps is not None and not fps > 0:
        raise StreamError(f"{path}: fps={fps}: must be > 0")
    try:
        container = av.open(path)
    except (av.error.FFmpegError, OSError) as e:
        raise StreamError(f"{path}: cannot read video: {e}") from None
    if not container.streams.video:
        container.close()
        raise StreamError(f"{path}: no video stream (empty, zero-length or not a video file)")
    rate = container.streams.video[0].average_rate or container.streams.video[0].guessed_rate
    src_fps = float(rate) if rate else None
    if fps is not None and src_fps is not None and fps > src_fps * 1.001:
        container.close()
        raise StreamError(f"{path}: requested fps {fps:g} is above the video's frame rate {src_fps:g}")
    return _decode(container, path, fps, src_fps)


def _decode(container, path: str, fps: float | None, src_fps: float | None) -> Iterator[Frame]:
    import av

    step = 1.0 / fps if fps else None
    duration = step or (1.0 / src_fps if src_fps else 1.0)
    count, decoded, first, target, last_time = 0, 0, None, 0.0, None
    declared = container.streams.video[0].frames  # 0 when the container does not say
    try:
        frames = container.decode(container.streams.video[0])
        while True:
            try:
                frame = next(frames)
            except StopIteration:
                break
            except (av.error.FFmpegError, OSError) as e:
                where = f"after {last_time:.3f}s" if last_time is not None else "at the start"
                raise StreamError(f"{path}: cannot decode video {where}: {e}") from None
            decoded += 1
            t = frame.time if frame.time is not None else count / (src_fps or 1.0)
            last_time = t
            first = t if first is None else first
            if step is not None:
                if t - first < target - 1e-6:
                    continue
                target = (math.floor((t - first) / step + 1e-6) + 1) * step
            count += 1
            yield Frame(t, frame.to_ndarray(format="rgb24"), f"{path}@{t:.3f}s", duration)
        if count == 0:
            raise StreamError(f"{path}: no video frames (zero-length video)")
        if declared and decoded < 0.95 * declared and declared - decoded >= 2:
            raise StreamError(f"{path}: the video ends after {decoded} of its {declared} frames "
                              f"({last_time:.3f}s): truncated or corrupt file")
    finally:
        container.close()


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
                image = np.asarray(img.convert("RGB"))
        except Exception as e:  # noqa: BLE001 - missing, unreadable, corrupt, truncated
            raise StreamError(f"{file}: cannot read image: {e}") from None
        yield Frame(i / fps, image, str(file), 1.0 / fps)


def open_frames(path, *, fps: float | None = None) -> Iterator[Frame]:
    """A video file or an image folder."""
    p = Path(path)
    if not p.exists():
        raise StreamError(f"{path}: no such file or folder")
    return folder_frames(p, fps=fps) if p.is_dir() else video_frames(p, fps=fps)


def _as_frames(frames: Iterable, interval: float) -> Iterator[Frame]:
    for i, item in enumerate(frames):
        if isinstance(item, Frame):
            yield item
        elif isinstance(item, tuple) and len(item) == 2:
            yield Frame(float(item[0]), item[1], f"frame {i}", interval)
        else:
            yield Frame(i * interval, item, f"frame {i}", interval)


def _size(image) -> tuple[int, int]:
    if isinstance(image, Image.Image):
        return image.height, image.width
    if isinstance(image, np.ndarray) and image.ndim >= 2:
        return image.shape[0], image.shape[1]
    raise StreamError(f"unsupported frame type {type(image).__name__}: expected a uint8 array or a PIL image")


# ---------------------------------------------------------------- captions
@dataclass
class Caption:
    frame: int
    time: float
    end: float
    text: str
    tokens: int
    ttft_ms: float
    decode_ms: float
    kv_tokens: int
    cache_bytes: int
    source: str


class Captioner:
    """One `Session` that captions each incoming frame (see the module doc)."""

    def __init__(self, model, tokenizer, *, sampling: Sampling | None = None, processors=(),
                 history: History | None = None, instruction: str = "Caption each frame.", gist: bool = True,
                 allow_size_change: bool = False, interval: float = 1.0, backend: str = "auto", generator=None):
        self.session = Session(model, history=history, backend=backend)
        self.chat = Chat(self.session, tokenizer, sampling=sampling or Sampling(max_new_tokens=16),
                         processors=tuple(processors), gist=gist, generator=generator)
        self.instruction = instruction
        self.allow_size_change = allow_size_change
        self.interval = interval
        self.frames = 0
        self._size: tuple[int, int] | None = None

    def caption(self, frame: Frame) -> Caption:
        size = _size(frame.image)
        if self._size is None:
            self._size = size
        elif size != self._size and not self.allow_size_change:
            raise StreamError(f"{frame.source}: frame size {size[1]}x{size[0]} differs from the stream's "
                              f"{self._size[1]}x{self._size[0]} (allow_size_change / --allow-size-change "
                              "resizes every frame)")
        first: list[float] = []
        t0 = time.perf_counter()
        try:
            self.chat.user(self.instruction if self.frames == 0 else "", images=[frame.image])
        except ValueError as e:
            raise StreamError(f"{frame.source}: {e}") from None
        reply = self.chat.reply(on_token=lambda _: first or first.append(time.perf_counter()))
        self.frames += 1
        return Caption(self.frames - 1, frame.time, frame.time + frame.duration, reply.text.strip(),
                       len(reply.tokens), (first[0] - t0) * 1e3, reply.generation.decode_ms,
                       self.session.kv_tokens(), self.session.cache_bytes(), frame.source)

    def __call__(self, frames: Iterable) -> Iterator[Caption]:
        for frame in _as_frames(frames, self.interval):
            yield self.caption(frame)


# ----------------------------------------------------------------- writers
def srt_time(seconds: float) -> str:
    """`HH:MM:SS,mmm`."""
    ms = max(0, int(round(seconds * 1000)))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d},{ms:03d}"


def _cue_text(text: str) -> str:
    """A cue's text: no blank line inside (it would end the cue)."""
    lines = [line.strip() for line in text.replace("\r", "\n").split("\n")]
    return "\n".join(line for line in lines if line)


class _Writer:
    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "w", encoding="utf-8")
        self.count = 0

    def _put(self, text: str) -> None:
        self.file.write(text)  # one write per complete entry
        self.file.flush()
        os.fsync(self.file.fileno())
        self.count += 1

    def close(self) -> None:
        self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


class SrtWriter(_Writer):
    def write(self, cap: Caption) -> None:
        text = _cue_text(cap.text)
        if text:
            self._put(f"{self.count + 1}\n{srt_time(cap.time)} --> {srt_time(cap.end)}\n{text}\n\n")


class JsonlWriter(_Writer):
    def write(self, cap: Caption) -> None:
        record = {"timestamp": srt_time(cap.time), **asdict(cap)}
        self._put(json.dumps(record, ensure_ascii=False) + "\n")


SRT_CUE = re.compile(r"(\d+)\n(\d\d:\d\d:\d\d,\d\d\d) --> (\d\d:\d\d:\d\d,\d\d\d)\n((?:[^\n]+\n)+)")


def parse_srt(text: str) -> list[tuple[int, str, str, str]]:
    """Strict SRT reader (for tests and checks): `(index, start, end, text)`
    per cue; ValueError if anything is out of place."""
    cues, pos = [], 0
    while pos < len(text):
        m = SRT_CUE.match(text, pos)
        if m is None or (m.end() < len(text) and text[m.end()] != "\n"):
            raise ValueError(f"invalid SRT at offset {pos}: {text[pos : pos + 60]!r}")
        if int(m.group(1)) != len(cues) + 1:
            raise ValueError(f"SRT cue {m.group(1)} out of sequence (expected {len(cues) + 1})")
        cues.append((int(m.group(1)), m.group(2), m.group(3), m.group(4).rstrip("\n")))
        pos = m.end() + 1
    return cues


# --------------------------------------------------------------------- run
def caption_file(source, *, checkpoint, fps: float | None, srt=None, jsonl=None, sampling: Sampling | None = None,
                 processors_fn=None, history: History | None = None, instruction: str = "Caption each frame.",
                 allow_size_change: bool = False, on_caption=None, seed: int = 0) -> int:
    """Caption a video file or image folder with a casa model directory;
    returns the number of frames captioned. Files are valid at every moment."""
    import torch

    from casa.pretrained.directory import from_pretrained
    from casa.pretrained.runs import resolve_model_dir
    from casa.pretrained.tokenizer import load_tokenizer

    checkpoint = resolve_model_dir(checkpoint)  # a training run: its latest checkpoint
    model = from_pretrained(checkpoint)
    tokenizer = load_tokenizer(checkpoint)
    frames = open_frames(source, fps=fps)
    processors = processors_fn(tokenizer) if processors_fn else ()
    captioner = Captioner(model, tokenizer, sampling=sampling, processors=processors, history=history,
                          instruction=instruction, allow_size_change=allow_size_change,
                          interval=1.0 / fps if fps else 1.0, generator=torch.Generator().manual_seed(seed))
    writers = [w(p) for w, p in ((SrtWriter, srt), (JsonlWriter, jsonl)) if p]
    try:
        for cap in captioner(frames):
            for w in writers:
                w.write(cap)
            if on_caption is not None:
                on_caption(cap)
    finally:
        for w in writers:
            w.close()
    return captioner.frames
