"""Sample -> token ids, loss targets, preprocessed images and insertion points.

Design decisions:
- The built-in chat template (byte tokenizer) is
  `<bos> <|user|> ... <|end|> <|assistant|> answer <|end|> ...`; system
  messages are rendered like user ones. A tokenizer with a jinja chat template
  (`HFTokenizer`) uses its own: each image becomes a sentinel character in the
  rendered string, and an assistant turn's target span is found by rendering
  the conversation up to that turn with and without it (the template must
  render prefixes as prefixes; an error says so otherwise).
- An image sits before the next text token (its insertion point, docs/design.md
  §2). An optional `image_prefix` token goes before it, and an optional gist
  token (`<|gist|>` by default) right after it. Consecutive images (several
  image parts in a row, or a video's frames) share one insertion point, so
  one window, with the prefix before and the gist token after the group.
- Targets (the loss mask) are the assistant's tokens and its closing end
  token only; `turns` records each assistant span so that evaluation can
  prompt with everything before a turn and compare the decoded answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from casa.config import VisionConfig
from casa.data.sample import DataError, Sample, check_sample
from casa.vision.preprocess import preprocess

SENTINEL = "\ue000"  # stands for an image inside a rendered HF chat template


@dataclass
class Encoded:
    ids: list[int]
    targets: list[bool]  # loss mask: True on assistant tokens
    images: list = field(default_factory=list)  # PIL images / paths, in order (pixels made lazily)
    points: list[int] = field(default_factory=list)  # insertion point of each image
    turns: list[tuple[int, int]] = field(default_factory=list)  # [start, end) of each assistant turn
    source: str = "<memory>"
    pixels: torch.Tensor | None = None  # [n, C, H, W], filled by Processor.pixels

    @property
    def n_images(self) -> int:
        return len(self.points)

    def prefix(self, end: int) -> "Encoded":
        """The first `end` tokens and the images inserted before them (an evaluation prompt)."""
        keep = [i for i, p in enumerate(self.points) if p < end]
        pixels = self.pixels[keep] if self.pixels is not None else None
        return Encoded(self.ids[:end], self.targets[:end], [self.images[i] for i in keep],
                       [self.points[i] for i in keep], [], self.source, pixels)


def _images_of(part) -> list:
    if part["type"] == "image":
        return [part.get("image", part.get("path"))]
    return list(part["frames"])


class Processor:
    def __init__(self, tokenizer, vision: VisionConfig, *, gist: bool = True, gist_token: str = "<|gist|>",
                 image_prefix: str | None = None):
        self.tok = tokenizer
        self.vision = vision
        self.gist = gist_token if gist else None
        self.image_prefix = image_prefix
        self.templated = getattr(tokenizer, "chat_template", None) is not None
        for name in filter(None, (self.gist, self.image_prefix)):
            tokenizer.token_id(name)  # fail early on an unknown token
        if self.templated:
            special = getattr(tokenizer.tok, "all_special_ids", [])
            self.stop_ids = {tokenizer.eos_id, *map(int, special)}
        else:
            self.stop_ids = {tokenizer.token_id("<|end|>"), tokenizer.eos_id}

    @property
    def tokens_per_image(self) -> int:
        return self.vision.tokens_per_image

    # ------------------------------------------------------------- encoding
    def encode(self, sample, *, pixels: bool = True) -> Encoded:
        """Tokenise a `Sample` (or a raw dict); with `pixels`, decode and preprocess its images."""
        if not isinstance(sample, Sample):
            sample = check_sample(sample)
        enc = Encoded([], [], source=sample.source)
        segments = self._render_template(sample) if self.templated else self._render_builtin(sample)
        group = []  # consecutive images share one insertion point (one window)
        for kind, value, target in segments + [("markup", "", False)]:
            if kind == "image":
                group.append(value)
                continue
            if group:
                self._add_images(enc, group)
                group = []
            ids = self.tok.encode(value, specials=kind == "markup") if value else []
            enc.ids.extend(ids)
            enc.targets.extend([target] * len(ids))
        self._find_turns(enc)
        if not enc.turns:
            raise DataError(f"{sample.source}: sample has no assistant tokens to train on")
        if enc.points and enc.points[-1] >= len(enc.ids):
            raise DataError(f"{sample.source}: an image is the last thing in the sample (nothing reads it)")
        if pixels:
            self.pixels(enc)
        return enc

    def pixels(self, enc: Encoded) -> Encoded:
        if enc.pixels is None and enc.images:
            try:
                enc.pixels = preprocess(enc.images, self.vision)
            except ValueError as e:
                raise DataError(f"{enc.source}: {e}") from None
        return enc

    def _add_images(self, enc: Encoded, images: list) -> None:
        if self.image_prefix:
            enc.ids.append(self.tok.token_id(self.image_prefix))
            enc.targets.append(False)
        enc.images.extend(images)
        enc.points.extend([len(enc.ids)] * len(images))
        if self.gist:
            enc.ids.append(self.tok.token_id(self.gist))
            enc.targets.append(False)

    @staticmethod
    def _find_turns(enc: Encoded) -> None:
        t, n = enc.targets, len(enc.targets)
        i = 0
        while i < n:
            if t[i]:
                j = i
                while j < n and t[j]:
                    j += 1
                enc.turns.append((i, j))
                i = j
            else:
                i += 1

    def _render_builtin(self, sample: Sample):
        """Segments `(kind, value, target)` with kind in markup / text / image."""
        out = [("markup", "<bos>", False)]
        for m in sample.messages:
            assistant = m["role"] == "assistant"
            out.append(("markup", "<|assistant|>" if assistant else "<|user|>", False))
            for part in m["content"]:
                if part["type"] == "text":
                    out.append(("text", part["text"], assistant))
                else:
                    out.extend(("image", img, False) for img in _images_of(part))
            out.append(("markup", "<|end|>", assistant))
        return out

    def _render_template(self, sample: Sample):
        msgs, images = [], []
        for m in sample.messages:
            text = ""
            for part in m["content"]:
                if part["type"] == "text":
                    text += part["text"]
                else:
                    new = _images_of(part)
                    images.extend(new)
                    text += SENTINEL * len(new)
            msgs.append({"role": m["role"], "content": text})
        full = self.tok.render_chat(msgs)
        target = [False] * len(full)
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            before = self.tok.render_chat(msgs[:i], add_generation_prompt=True)
            upto = self.tok.render_chat(msgs[: i + 1])
            if not (upto.startswith(before) and full.startswith(upto)):
                raise DataError(f"{sample.source}: the tokenizer's chat template does not render "
                                f"conversation prefixes as prefixes; cannot locate assistant turn {i}")
            target[len(before): len(upto)] = [True] * (len(upto) - len(before))
        out, start, images = [], 0, iter(images)
        for i in range(1, len(full) + 1):
            if i == len(full) or full[i] == SENTINEL or full[i - 1] == SENTINEL or target[i] != target[i - 1]:
                piece = full[start:i]
                if piece == SENTINEL:
                    out.append(("image", next(images), False))
                elif piece:
                    out.append(("markup", piece, target[start]))
                start = i
        return out
