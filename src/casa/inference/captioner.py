"""Streaming captioning: frames in, timestamped captions out, constant state.

Design decisions:
- Each frame is one chat turn, rendered by the model's own processor
  (`Chat`, `data.Processor`): the frame (with its image markers), the
  instruction with the first frame only, then the assistant's caption, as the
  `video` training task renders a clip. The frame opens a new window, so the
  fusion state is one frame's image K/V, whatever the length of the stream.
  That is the processor's rule for a video part too (one window per frame,
  the gist token after each; docs/design.md §2), here with a caption turn
  between frames.
- TTFT is measured from the frame's arrival (preprocessing, vision encoder,
  image K/V and prompt included) to the first sampled token.
- Frames of a size different from the first one are an error unless
  `allow_size_change` (every frame is resized to the model's input anyway, but
  a change of size mid-stream usually means mixed-up sources).
- `caption_file` checks its inputs and outputs before the model loads, writes
  the SRT / JSONL progressively beside their destinations (`writers.py`) and
  replaces the destinations only when the run ends: successfully, or by
  Ctrl-C (then it returns with `interrupted=True`, the outputs valid). After
  an error the destinations are left as they were and the error names the
  partial files holding the captions made so far.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

from casa.core.layout import History
from casa.inference.generate import Chat, Sampling
from casa.inference.session import Session, cache_dtype_named
from casa.inference.sources import (
    Frame,
    StreamError,
    as_frames,
    frame_size,
    open_frames,
)
from casa.inference.writers import JsonlWriter, SrtWriter, check_caption_outputs

if TYPE_CHECKING:
    import torch

__all__ = ["Caption", "CaptionRun", "Captioner", "SharedModel", "caption_file", "load_captioner"]


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
    """One `Session` that captions each incoming frame (see the module docstring).

    Args:
        model: a `CasaModel`.
        processor: the model's `data.Processor` (or a bare tokenizer: built-in markup).
        interval: seconds between frames given as bare images.
        cache_dtype: None (the model's dtype) or `torch.int8` (`Session`).
        decode: the decode path, "auto", "kernels" or "torch" (`Session`).
        batcher: a `batching.DecodeBatcher` whose steps the stream's tokens join (`Session`).
    """

    def __init__(self, model, processor, *, sampling: Sampling | None = None, processors=(),
                 history: History | None = None, instruction: str = "Caption each frame.",
                 allow_size_change: bool = False, interval: float = 1.0, backend: str = "auto", generator=None,
                 cache_dtype: torch.dtype | None = None, decode: str = "auto", batcher=None):
        self.session = Session(model, history=history, backend=backend, cache_dtype=cache_dtype, decode=decode,
                               batcher=batcher)
        self.chat = Chat(self.session, processor, sampling=sampling or Sampling(max_new_tokens=32),
                         processors=tuple(processors), generator=generator)
        self.instruction = instruction
        self.allow_size_change = allow_size_change
        self.interval = interval
        self.frames = 0
        self._size: tuple[int, int] | None = None

    def caption(self, frame: Frame) -> Caption:
        size = frame_size(frame.image)
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
        for frame in as_frames(frames, self.interval):
            yield self.caption(frame)


@dataclass
class CaptionRun:
    """What `caption_file` did."""

    frames: int  # frames captioned
    undecodable: int  # source frames that could not be decoded (skipped)
    interrupted: bool  # stopped by Ctrl-C (the outputs hold the frames before it)
    outputs: list[Path] = field(default_factory=list)  # files written


@dataclass
class SharedModel:
    """A model loaded once for several captioning streams (`casa caption SRC SRC ...`): each
    stream's `Captioner` has its own session over it, and on the kernel path their decoded tokens
    are batched (`batching.DecodeBatcher`: the weights read once per step for all of them, each
    stream's captions those it gets alone). Pass it where a checkpoint is asked for."""

    model: object
    processor: object
    batcher: object | None

    @classmethod
    def load(cls, checkpoint) -> "SharedModel":
        from casa.core.decode import resolve_decode
        from casa.inference.batching import DecodeBatcher
        from casa.pretrained.directory import load

        model, _, processor = load(checkpoint)  # a model directory or a run's latest checkpoint
        batched = resolve_decode("auto", model.embed.weight) == "kernels"
        return cls(model, processor, DecodeBatcher(model) if batched else None)


def load_captioner(checkpoint, *, sampling: Sampling | None = None, processors_fn=None,
                   history: History | None = None, instruction: str = "Caption each frame.",
                   allow_size_change: bool = False, interval: float = 1.0, seed: int = 0,
                   cache_dtype: str = "model") -> Captioner:
    """A `Captioner` over a casa model directory or training run (its latest checkpoint), or over
    a `SharedModel` (loaded once for several streams).

    Args:
        processors_fn: `processor -> [logits processors]`, given the model's processor.
        cache_dtype: "model" (the model's dtype) or "int8" (quantized keys/values, `Session`).
    """
    import torch

    from casa.pretrained.directory import load

    dtype = cache_dtype_named(cache_dtype)  # a bad name is refused before the model loads
    if isinstance(checkpoint, SharedModel):
        model, processor, batcher = checkpoint.model, checkpoint.processor, checkpoint.batcher
    else:
        (model, _, processor), batcher = load(checkpoint), None  # load takes a run's latest checkpoint too
    return Captioner(model, processor, sampling=sampling, processors=processors_fn(processor) if processors_fn else (),
                     history=history, instruction=instruction, allow_size_change=allow_size_change,
                     interval=interval, generator=torch.Generator().manual_seed(seed), cache_dtype=dtype,
                     decode="kernels" if batcher is not None else "auto", batcher=batcher)


def caption_file(source, *, checkpoint, fps: float | None, srt=None, jsonl=None, frames=None,
                 sampling: Sampling | None = None, processors_fn=None, history: History | None = None,
                 instruction: str = "Caption each frame.", allow_size_change: bool = False, on_caption=None,
                 seed: int = 0, cache_dtype: str = "model") -> CaptionRun:
    """Caption a video file or an image folder with a casa model directory.

    Args:
        source: a video file (PyAV) or a folder of images.
        checkpoint: a casa model directory or a training run (its latest checkpoint).
        fps: frames per second to caption (video: None = every frame; folder: None = 1).
        srt, jsonl: output files (None: not written).
        frames: the source already opened with `open_frames` (the command does, to
            refuse a bad video before torch is even imported), else opened here.
        processors_fn: `processor -> [logits processors]`, given the model's processor.
        on_caption: called with each `Caption` as it is made.
        cache_dtype: "model" (the model's dtype) or "int8" (quantized keys/values, `Session`).
    Returns:
        a `CaptionRun`; Ctrl-C ends the run early with `interrupted=True`.
    """
    cache_dtype_named(cache_dtype)  # a bad name is refused before the model loads
    srt, jsonl = check_caption_outputs(source, srt, jsonl)
    frames = open_frames(source, fps=fps) if frames is None else frames
    try:
        captioner = load_captioner(checkpoint, sampling=sampling, processors_fn=processors_fn, history=history,
                                   instruction=instruction, allow_size_change=allow_size_change,
                                   interval=1.0 / fps if fps else 1.0, seed=seed, cache_dtype=cache_dtype)
    except BaseException:
        getattr(frames, "close", lambda: None)()
        raise
    writers = [w(p) for w, p in ((SrtWriter, srt), (JsonlWriter, jsonl)) if p]
    interrupted = False
    try:
        try:
            for cap in captioner(frames):
                for w in writers:
                    w.write(cap)
                if on_caption is not None:
                    on_caption(cap)
        except KeyboardInterrupt:
            interrupted = True
    except BaseException as e:
        kept = [p for p in (w.abandon() for w in writers) if p is not None]
        if isinstance(e, ValueError) and kept:
            raise StreamError(f"{e}; the captions made before it are in {', '.join(map(str, kept))} "
                              f"({', '.join(str(w.path) for w in writers)} left as they were)") from None
        raise
    finally:
        getattr(frames, "close", lambda: None)()
    undecodable = getattr(frames, "undecodable", 0)
    for w in writers:
        if isinstance(w, JsonlWriter):
            w.summary(source=str(source), frames=captioner.frames, undecodable_frames=undecodable,
                      interrupted=interrupted)
    return CaptionRun(captioner.frames, undecodable, interrupted, [w.commit() for w in writers])
