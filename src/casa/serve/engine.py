"""The model behind the server, and the one place that drives casa's inference
API (`Chat`, `Captioner`, frame sources, the SRT writer) for it.

Design decisions:
- One model and tokenizer per server, loaded once; every session gets its own
  `Session` (its own text-only KV cache, docs/design.md §5) over the shared,
  read-only weights, so sessions run side by side on worker threads.
- The chat API is stateless: each request brings the whole conversation, and
  `Engine.chat` replays it into a fresh session (user turns with their images,
  earlier assistant turns as text) before generating. A system message is
  prepended to the first user turn: the built-in template has no system role.
- Generation reports its text as it grows through `on_text(text) -> bool`;
  returning True stops it (stop strings), raising aborts it (a client gone).
- Live captioning uses the same frame source and captioner as `casa caption`,
  so a page shows exactly the captions the command would write.
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

from casa.inference.generate import Chat, Sampling
from casa.inference.session import Session
from casa.inference.stream import Caption, Captioner, Frame, SrtWriter, video_frames
from casa.pretrained.directory import from_pretrained, processor_settings
from casa.pretrained.runs import resolve_model_dir
from casa.pretrained.tokenizer import load_tokenizer

__all__ = ["Caption", "ChatResult", "Engine", "Frame", "OpenVideo", "Turn"]


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
    """A video being decoded: iterate for its `Frame`s; `close()` releases the file."""

    def __init__(self, first: Frame, rest: Iterator[Frame]):
        self.first, self.rest = first, rest

    def __iter__(self) -> Iterator[Frame]:
        yield self.first
        yield from self.rest

    def close(self) -> None:
        self.rest.close()  # the decoder's generator closes its container


class _StopRequested(Exception):
    """Raised from the token callback to end a generation early (a stop string)."""


class Engine:
    """A casa model directory (or training run), ready to chat and caption."""

    def __init__(self, checkpoint, *, name: str | None = None, device: str = "cpu"):
        path = resolve_model_dir(checkpoint)  # a training run: its latest checkpoint
        self.path = path
        self.model = from_pretrained(path, device=device)
        self.tokenizer = load_tokenizer(path)
        self.gist = bool(processor_settings(path)["gist"])
        self.name = name or Path(checkpoint).resolve().name
        self.created = int((path / "config.json").stat().st_mtime)

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
        turns = _merge_system(turns)
        if not turns or turns[-1].role != "user":
            raise ValueError("the last message must be a user message")
        generator = torch.Generator(self.model.embed.weight.device)
        generator.manual_seed(seed if seed is not None else random.getrandbits(63))
        session = Session(self.model)
        chat = Chat(session, self.tokenizer, gist=self.gist, generator=generator,
                    sampling=Sampling(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p))
        for turn in turns[:-1]:
            if turn.role == "user":
                chat.user(turn.text, turn.images)
            else:
                _add_assistant_turn(chat, turn.text)
        chat.user(turns[-1].text, turns[-1].images)

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
        """Frames of a video at `fps`, the first one decoded now (so a corrupt or
        empty file fails here, with a `ValueError` naming it)."""
        frames = video_frames(path, fps=fps)
        return OpenVideo(next(frames), frames)

    def captioner(self, *, max_tokens: int, instruction: str | None = None, seed: int = 0) -> Captioner:
        """A streaming captioner: `.caption(frame) -> Caption`, one session for the whole stream;
        `instruction`: the user text with the first frame (None: the captioner's default)."""
        extra = {} if instruction is None else {"instruction": instruction}
        return Captioner(self.model, self.tokenizer, sampling=Sampling(max_new_tokens=max_tokens), gist=self.gist,
                         allow_size_change=False, generator=torch.Generator().manual_seed(seed), **extra)

    @staticmethod
    def srt(captions: list[Caption]) -> str:
        """The captions as an SRT file's text, written by the same writer as `casa caption --srt`."""
        with tempfile.TemporaryDirectory(prefix="casa-srt-") as tmp:
            path = Path(tmp) / "captions.srt"
            with SrtWriter(path) as writer:
                for caption in captions:
                    writer.write(caption)
            return path.read_text(encoding="utf-8")


def _merge_system(turns: list[Turn]) -> list[Turn]:
    """System text joins the first user turn (the built-in template has no system role)."""
    system = "\n\n".join(t.text for t in turns if t.role == "system" and t.text)
    rest = [t for t in turns if t.role != "system"]
    if system:
        for i, t in enumerate(rest):
            if t.role == "user":
                rest[i] = Turn("user", f"{system}\n\n{t.text}" if t.text else system, t.images)
                break
    return rest


def _add_assistant_turn(chat: Chat, text: str) -> None:
    """An earlier assistant reply, as the built-in template renders one:
    `<|assistant|> text <|end|>`, buffered like the rest of the chat's text
    (`Chat` has no public way to add a given reply yet)."""
    chat.pending.append(chat.ids["<|assistant|>"])
    chat.pending.extend(chat.tokenizer.encode(text))
    chat.pending.append(chat.ids["<|end|>"])
