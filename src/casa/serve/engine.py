"""The model behind the server, and the one place that drives casa's inference
API (`Chat`, `Captioner`, the video frame source, the SRT writer) for it.

Design decisions:
- One model, tokenizer and processor per server, loaded once; every session
  gets its own `Session` (its own text-only KV cache and decoding state,
  docs/design.md §5) over the shared, read-only weights, so sessions run
  side by side on worker threads, each giving the reply it gives alone.
- The decode path (`decode="auto" | "kernels" | "torch"`) is resolved once,
  when the model loads, and every session takes it (`Engine.decode` names it;
  `casa serve` prints it and `/health` reports it).
- On the kernel path the sessions' decoded tokens are batched
  (`inference.batching.DecodeBatcher`): the chat replies and live captions
  being generated advance together, one step reading the weights once for
  all of them, each with the tokens it would get alone; prompts and frames
  are prefilled on the sessions' own worker threads, beside the steps.
- The chat API is stateless: each request brings the whole conversation, and
  `Engine.chat` replays it into a fresh session, rendered by the model's own
  processor (`data.Processor`: the built-in template or the tokenizer's chat
  template) exactly as a `Chat` that had lived through it would be. A user
  message's images go before its text, one window, as in training.
- Generation reports its text as it grows through `on_text(text) -> bool`;
  returning True stops it (stop strings), raising aborts it (a client gone).
- Live captioning uses the same frame source and captioner as `casa caption`,
  so a page shows exactly the captions the command would write; the source's
  warnings (undecodable frames skipped) are collected for the viewer. Its
  sessions keep a bounded history by default (`live_history`, the library's
  `LIVE_HISTORY`: an attention sink and a sliding window), so a session's
  state stays flat however long it runs; a session may ask for the full one.
- A camera's frames go through the library's live scheduler
  (`casa.inference.live`): a one-frame slot the newest frame replaces (the
  one it replaces is dropped and counted), captioned whenever the model is
  free, with its lag and the drops since the previous caption.
- Everything the server needs from `casa.inference` is imported here and
  nowhere else in `casa.serve`.
"""

from __future__ import annotations

import random
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from casa.core.decode import resolve_decode
from casa.core.layout import History
from casa.inference.batching import DecodeBatcher
from casa.inference.captioner import Caption, Captioner
from casa.inference.generate import Chat, Sampling
from casa.inference.live import LIVE_HISTORY, LagStats, LatestFrame, LiveFrame, caption_newest
from casa.inference.session import Session
from casa.inference.sources import Frame, video_frames
from casa.inference.writers import SrtWriter
from casa.pretrained.directory import load
from casa.pretrained.runs import resolve_model_dir

__all__ = ["Caption", "ChatResult", "Engine", "Frame", "History", "LagStats", "LatestFrame", "LiveFrame", "OpenVideo",
           "Turn", "caption_newest"]


@dataclass
class Turn:
    role: str  # "system", "user" or "assistant"
    text: str = ""
    images: list = field(default_factory=list)  # PIL images (user turns only)


@dataclass
class ChatResult:
    text: str  # the reply, without its closing end token
    prompt_tokens: int  # text tokens fed before the reply + image tokens
    completion_tokens: int  # tokens sampled (a closing end token included)
    finish_reason: str  # "stop" (end token or stop string) or "length" (max_tokens)


class OpenVideo:
    """A video being decoded: iterate for its `Frame`s; `close()` releases the file.
    `warnings` collects what the decoder reported (undecodable frames are skipped)."""

    def __init__(self, path: Path, *, fps: float):
        self.warnings: list[str] = []
        self.source = video_frames(path, fps=fps, warn=self.warnings.append)
        try:  # decoded now: a file with no decodable frame fails here
            self.first = next(self.source)
        except BaseException:
            self.source.close()
            raise

    def __iter__(self) -> Iterator[Frame]:
        yield self.first
        yield from self.source

    @property
    def undecodable(self) -> int:
        """Source frames that could not be decoded so far."""
        return self.source.undecodable

    def close(self) -> None:
        self.source.close()


class _StopRequested(Exception):
    """Raised from the token callback to end a generation early (a stop string)."""


class Engine:
    """A casa model directory (or training run), ready to chat and caption.

    `live_history`: the bounded history of a live session that does not ask for the full one.
    """

    def __init__(self, checkpoint, *, name: str | None = None, device: str = "cpu", decode: str = "auto",
                 live_history: History = LIVE_HISTORY):
        path = resolve_model_dir(checkpoint)  # a training run: its latest checkpoint
        self.path = path
        self.model, self.tokenizer, self.processor = load(path, device=device)
        self.decode = resolve_decode(decode, self.model.embed.weight)  # "kernels" or "torch", for every session
        self.batcher = DecodeBatcher(self.model) if self.decode == "kernels" else None
        self.name = name or Path(checkpoint).resolve().name
        self.created = int((path / "config.json").stat().st_mtime)
        self.live_history = live_history

    @property
    def tokens_per_image(self) -> int:
        return self.model.tokens_per_image

    # -------------------------------------------------------------- chat
    def prompt_tokens(self, turns: list[Turn]) -> int:
        """Text tokens of every turn plus image tokens: a conversation's size before it
        is fed (the template's few markup tokens per turn aside)."""
        return sum(len(self.tokenizer.encode(t.text)) + len(t.images) * self.tokens_per_image for t in turns)

    def chat(self, turns: list[Turn], *, max_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
             seed: int | None = None, on_text: Callable[[str], bool] | None = None) -> ChatResult:
        """Reply to the last (user) turn of `turns`. `on_text(text_so_far)` is called
        after every sampled token; True stops the generation there."""
        if not turns or turns[-1].role != "user":
            raise ValueError("the last message must be a user message")
        generator = torch.Generator(self.model.embed.weight.device)
        generator.manual_seed(seed if seed is not None else random.getrandbits(63))
        session = Session(self.model, decode=self.decode, batcher=self.batcher)
        chat = Chat(session, self.processor, generator=generator,
                    sampling=Sampling(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p))
        for turn in turns:
            if turn.role == "user":
                chat.user(turn.text, turn.images)  # preprocesses the images now
            else:  # earlier replies and system text, rendered with the rest by the processor
                chat.new.append({"role": turn.role, "content": [{"type": "text", "text": turn.text}]})

        stops = chat.sampling.stop_tokens
        sampled: list[int] = []

        def on_token(token: int) -> None:
            sampled.append(token)
            if on_text is not None and on_text(self.tokenizer.decode([t for t in sampled if t not in stops])):
                raise _StopRequested

        try:
            reply = chat.reply(on_token=on_token)
            finish = "stop" if reply.generation.stop_reason == "stop_token" else "length"
        except _StopRequested:
            finish = "stop"
        # every sampled token but the last has been fed back: what remains is the prompt
        prompt_text_tokens = session.text_tokens - (len(sampled) - 1)
        return ChatResult(self.tokenizer.decode([t for t in sampled if t not in stops]),
                          prompt_text_tokens + session.images * self.tokens_per_image, len(sampled), finish)

    # ------------------------------------------------------- captioning
    def open_video(self, path: Path, *, fps: float) -> OpenVideo:
        """Frames of a video at `fps`, the first one decoded now (so a file that
        cannot be read or decoded fails here, with a `ValueError` naming it)."""
        return OpenVideo(path, fps=fps)

    def captioner(self, *, max_tokens: int, instruction: str | None = None, seed: int = 0,
                  history: History | None = None, allow_size_change: bool = False) -> Captioner:
        """A streaming captioner: `.caption(frame) -> Caption`, one session for the whole stream;
        `instruction`: the user text with the first frame (None: the captioner's default);
        `history`: its bounded history (None: the full one); `allow_size_change`: frames of
        another size than the first are captioned (a camera's may change), not refused."""
        extra = {} if instruction is None else {"instruction": instruction}
        return Captioner(self.model, self.processor, sampling=Sampling(max_new_tokens=max_tokens), history=history,
                         allow_size_change=allow_size_change, generator=torch.Generator().manual_seed(seed),
                         decode=self.decode, batcher=self.batcher, **extra)

    @staticmethod
    def srt(captions: list[Caption]) -> str:
        """The captions as an SRT file's text, written by the same writer as `casa caption --srt`."""
        with tempfile.TemporaryDirectory(prefix="casa-srt-") as tmp:
            path = Path(tmp) / "captions.srt"
            with SrtWriter(path) as writer:
                for caption in captions:
                    writer.write(caption)
            return path.read_text(encoding="utf-8")
