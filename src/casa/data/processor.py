"""Conversation -> token ids, loss targets, preprocessed images and insertion points.

The one home of the chat rendering rule: training and evaluation (`encode`)
and live chat / captioning (`encode_continuation`, used by
`inference.generate.Chat`) all render turns here, so a model sees at
inference exactly the markup it was trained on.

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
  token (`<|gist|>` by default) right after it. Consecutive image parts share
  one insertion point, so one window, with the prefix before and the gist
  token after the group.
- A video part is one image group per frame (the LLaVA-Video convention the
  paper follows): `[prefix] frame_1 <gist> [prefix] frame_2 <gist> ...`. The
  gist token is text, so each frame starts a window of its own and its gist
  token is the first text that reads it. Without a gist token nothing would
  separate the frames (they would share one window, or with a prefix only,
  a frame's window would be the next frame's prefix), so a processor with
  `gist=False` refuses video parts (`check_video`), naming the sample. A
  video's frames are separate images everywhere after this: each its own
  `[C, H, W]` item with dynamic resolution (never one `[F, C, H, W]` clip
  whose frames the Qwen2.5-VL tower would merge in temporal pairs).
- Targets (the loss mask) are the assistant's tokens and its closing markup
  only; `turns` records each assistant span so that evaluation can prompt
  with everything before a turn and compare the decoded answer.
- A rendering is a list of segments `(kind, value, target)`, kind one of
  `markup` (a string whose special-token names become their ids), `text`
  (plain user text), `image` (any image object, kept as is; consecutive ones
  form one group), `frame` (a video frame: a group of its own) and `ids`
  (token ids used verbatim: a reply the model generated, so a chat never
  re-tokenises what it fed). Tokenisation of segments (`tokenize`) is shared
  by every path, so the built-in and the HF chat templates place markers alike.
- Live chat feeds a conversation turn by turn (`encode_continuation`): the
  tokens that new messages add are the difference between two renderings of
  a short context (the last exchange), not of the whole history, so the cost
  of a turn does not grow with the stream. This is exact for any template
  whose rendering of a message depends only on the message (and on whether
  it is first); a template that renders a prefix differently once more
  messages follow is refused, as in training.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from casa.config import VisionConfig
from casa.data.inputs import call_processor, chat_inputs, chat_text, decode_ids
from casa.data.sample import DataError, Sample, check_sample
from casa.vision.dynamic import grid_of, preprocess_images

__all__ = ["BUILTIN_CHAT_TEMPLATE", "Encoded", "Processor", "REPLY_SENTINEL", "SENTINEL"]

# The built-in chat template (`Processor._render_builtin`) as jinja, for tokenizers that leave casa
# (`casa export --format transformers`); tests/test_export.py holds the two to the same text.
BUILTIN_CHAT_TEMPLATE = ("{{ '<bos>' }}{% for message in messages %}{% if message['role'] == 'assistant' %}"
                         "{{ '<|assistant|>' }}{% else %}{{ '<|user|>' }}{% endif %}{{ message['content'] }}"
                         "{{ '<|end|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")
SENTINEL = "\ue000"  # stands for an image inside a rendered HF chat template
REPLY_SENTINEL = "\ue001"  # stands for a generated reply (`ids` part) inside a rendered HF chat template


@dataclass
class Encoded:
    ids: list[int]
    targets: list[bool]  # loss mask: True on assistant tokens
    images: list = field(default_factory=list)  # PIL images / paths / tensors, in order (pixels made lazily)
    points: list[int] = field(default_factory=list)  # insertion point of each image
    turns: list[tuple[int, int]] = field(default_factory=list)  # [start, end) of each assistant turn
    source: str = "<memory>"
    # [n, C, H, W], or (dynamic resolution) a list of n [C, H, W] items; filled by Processor.pixels
    pixels: torch.Tensor | list[torch.Tensor] | None = None
    grids: list[tuple[int, int, int]] | None = None  # (gt, gh, gw) per image in LM tokens, with the pixels

    @property
    def n_images(self) -> int:
        return len(self.points)

    def prefix(self, end: int) -> "Encoded":
        """The first `end` tokens and the images inserted before them (an evaluation prompt)."""
        keep = [i for i, p in enumerate(self.points) if p < end]
        pixels = self.pixels
        if isinstance(pixels, list):
            pixels = [pixels[i] for i in keep]
        elif pixels is not None:
            pixels = pixels[keep]
        grids = [self.grids[i] for i in keep] if self.grids is not None else None
        return Encoded(self.ids[:end], self.targets[:end], [self.images[i] for i in keep],
                       [self.points[i] for i in keep], [], self.source, pixels, grids)

    @property
    def image_tokens(self) -> int | None:
        """Image tokens of all its images, when known from their grids (dynamic resolution)."""
        return None if self.grids is None else sum(t * h * w for t, h, w in self.grids)


_VISUAL = ("image", "frame")  # segment kinds that hold an image


def _same_segment(a, b) -> bool:
    """Two segments render the same tokens (images compared by identity)."""
    if a[0] != b[0]:
        return False
    return a[1] is b[1] if a[0] in _VISUAL else a[1] == b[1]


class Processor:
    """Renders conversations with a tokenizer's chat template (or the built-in one).

    Args:
        tokenizer: `ByteTokenizer` or `HFTokenizer`.
        vision: the model's vision config (image preprocessing).
        gist: put `gist_token` after each image group.
        image_prefix: a token to put before each image group (e.g. `<|vision_start|>`).
    """

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
        self._end_of_turn: int | None = None

    @property
    def tokens_per_image(self) -> int:
        return self.vision.tokens_per_image

    @property
    def end_of_turn_id(self) -> int:
        """The token that closes an assistant turn: the first one the template puts after a reply
        (`<|end|>` for the built-in template, e.g. `<|im_end|>` for Qwen's)."""
        if self._end_of_turn is None:
            closing = self.encode_continuation([{"role": "user", "content": [{"type": "text", "text": "?"}]},
                                                {"role": "assistant", "content": [{"type": "ids", "ids": []}]}],
                                               [{"role": "user", "content": [{"type": "text", "text": "?"}]}])
            if not closing.ids:
                raise ValueError("the chat template puts nothing after an assistant reply")
            self._end_of_turn = closing.ids[0]
        return self._end_of_turn

    # ------------------------------------------------- transformers-style calls (data/inputs.py)
    def __call__(self, text=None, images=None, videos=None, *, return_tensors: str | None = "pt", **_):
        """The model's inputs (`data.inputs.ModelInputs`) of a text, or a list of texts (a batch).

        Args:
            text: a string with `<image>` where each image goes and `<video>` where each video
                goes (each expands to the markup the model was trained with: image prefix, the
                image, gist token), e.g. the output of `apply_chat_template(..., tokenize=False)`.
            images: PIL images / uint8 arrays / paths / float pixels, one per `<image>` in order
                (or, for a batch, one list per text).
            videos: one video (a list of frames) or a list of them, one per `<video>`.
        Returns:
            `input_ids [B, T]`, `attention_mask [B, T]`, and with images `pixel_values`,
            `insertion_points [N]`, `image_rows [N]`; a dict, so `model.generate(**inputs)`.
        """
        return call_processor(self, text, images, videos, return_tensors=return_tensors)

    def apply_chat_template(self, messages, *, add_generation_prompt: bool = False, tokenize: bool = False, **_):
        """Render chat messages (`[{"role": "user", "content": [{"type": "image", "image": img},
        {"type": "text", "text": "..."}]}, ...]`, or a list of conversations): a string with
        `<image>` / `<video>` placeholders, or with `tokenize=True` the model's inputs (`ModelInputs`),
        exactly as `encode` and `inference.Chat` render them."""
        if tokenize:
            return chat_inputs(self, messages, add_generation_prompt=add_generation_prompt)
        return chat_text(self, messages, add_generation_prompt=add_generation_prompt)

    def decode(self, ids, *, skip_special_tokens: bool = True, **_) -> str:
        """Token ids (a list or 1-D tensor) as text."""
        return decode_ids(self, ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences, *, skip_special_tokens: bool = True, **_) -> list[str]:
        """Rows of token ids (`[B, T]` tensor or lists) as texts."""
        return [decode_ids(self, row, skip_special_tokens=skip_special_tokens) for row in sequences]

    # ------------------------------------------------------------- encoding
    def encode(self, sample, *, pixels: bool = True, blind: bool = False) -> Encoded:
        """Tokenise a `Sample` (or a raw dict); with `pixels`, decode and preprocess its images.
        `blind` renders it without its image and video parts, so without their markers
        (prefix and gist tokens) too: the text a model that sees nothing is given."""
        if not isinstance(sample, Sample):
            sample = check_sample(sample)
        if blind:
            sample = Sample([{**m, "content": [p for p in m["content"] if p["type"] not in ("image", "video")]}
                             for m in sample.messages], sample.source, sample.meta)
        enc = self.tokenize(self.render(sample.messages, source=sample.source), source=sample.source)
        if not enc.turns:
            raise DataError(f"{sample.source}: sample has no assistant tokens to train on")
        if enc.points and enc.points[-1] >= len(enc.ids):
            raise DataError(f"{sample.source}: an image is the last thing in the sample (nothing reads it)")
        if pixels:
            self.pixels(enc)
        return enc

    def encode_continuation(self, history: list[dict], new: list[dict]) -> Encoded:
        """What `new` messages add to a conversation fed so far, then the
        assistant's opening (the prompt of the next reply).

        Args:
            history: messages already fed: empty, or ending with an assistant
                message whose content is one `{"type": "ids", "ids": [...]}` part,
                fed up to its ids (not its closing markup).
            new: user / system messages (parts: text, image with any image object).
        Returns:
            `Encoded` of the continuation alone: its ids, images and their
            insertion points (relative to the continuation's first token).
        """
        context = history[_last_exchange(history):]
        fed = []
        if context:  # fed up to the last reply's ids: its closing markup belongs to the continuation
            fed = self.render(context)
            replies = [i for i, s in enumerate(fed) if s[0] == "ids"]
            if history[-1]["role"] != "assistant" or not replies:
                raise ValueError("encode_continuation: the history must end with a generated reply (an 'ids' part)")
            fed = fed[: replies[-1] + 1]
        full = self.render(context + new, generation_prompt=True)
        if len(full) < len(fed) or not all(_same_segment(a, b) for a, b in zip(fed, full)):
            raise ValueError(f"the chat template of {self._tokenizer_name()} does not render a conversation "
                             "as a prefix of its continuation; cannot chat turn by turn")
        return self.tokenize(full[len(fed):])

    def pixels(self, enc: Encoded) -> Encoded:
        """Preprocess `enc`'s images (once): fixed-size pixels, or items of their own sizes and
        their grids with dynamic resolution."""
        if enc.pixels is None and enc.images:
            try:
                enc.pixels = preprocess_images(enc.images, self.vision)
            except ValueError as e:
                raise DataError(f"{enc.source}: {e}") from None
            if isinstance(enc.pixels, list):
                enc.grids = [grid_of(x, merge_side=self.vision.patch_size) for x in enc.pixels]
        return enc

    def image_tokens(self, enc: Encoded) -> int:
        """Image tokens of `enc`'s images (their pixels are made to count them with dynamic resolution)."""
        if not self.vision.dynamic:
            return enc.n_images * self.tokens_per_image
        return self.pixels(enc).image_tokens or 0

    def tokenize(self, segments: list[tuple], *, source: str = "<memory>") -> Encoded:
        """Segments -> ids, targets, images and insertion points (markers around image groups)."""
        enc = Encoded([], [], source=source)
        group = []  # consecutive images share one insertion point (one window)
        for kind, value, target in [*segments, ("markup", "", False)]:
            if kind == "image":
                group.append(value)
                continue
            if group:
                self._add_images(enc, group)
                group = []
            if kind == "frame":  # a video frame is a group of its own
                self._add_images(enc, [value])
                continue
            if kind == "ids":
                ids = list(value)
            else:
                ids = self.tok.encode(value, specials=kind == "markup") if value else []
            enc.ids.extend(ids)
            enc.targets.extend([target] * len(ids))
        self._find_turns(enc)
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

    # ------------------------------------------------------------ rendering
    def check_video(self, where: str = "<memory>") -> None:
        """Refuse a video part unless a gist token closes each frame's window (module docstring)."""
        if self.gist is None:
            raise DataError(f"{where}: a video part needs a gist token after each frame to give every frame "
                            "its own window (docs/design.md §2), and this processor has none (gist=False); "
                            "give the frames as image parts of separate turns, or use a processor with a gist token")

    def _visuals(self, part, where: str) -> list[tuple]:
        """The image segments of an image or video part."""
        if part["type"] == "image":
            return [("image", part.get("image", part.get("path")), False)]
        self.check_video(where)
        return [("frame", frame, False) for frame in part["frames"]]

    def render(self, messages: list[dict], *, generation_prompt: bool = False, source: str = "<memory>"):
        """Segments `(kind, value, target)` of a conversation (see the module docstring);
        with `generation_prompt`, followed by the assistant's opening."""
        if self.templated:
            return self._render_template(messages, generation_prompt, source)
        return self._render_builtin(messages, generation_prompt, source)

    def _render_builtin(self, messages, generation_prompt: bool, source: str):
        out = [("markup", "<bos>", False)]
        for i, m in enumerate(messages):
            assistant = m["role"] == "assistant"
            out.append(("markup", "<|assistant|>" if assistant else "<|user|>", False))
            for part in m["content"]:
                if part["type"] == "text":
                    out.append(("text", part["text"], assistant))
                elif part["type"] == "ids":
                    out.append(("ids", part["ids"], assistant))
                else:
                    out.extend(self._visuals(part, f"{source}: message {i}"))
            out.append(("markup", "<|end|>", assistant))
        if generation_prompt:
            out.append(("markup", "<|assistant|>", False))
        return out

    def _render_template(self, messages, generation_prompt: bool, source: str):
        # every image or frame is one SENTINEL; `visuals` keeps their segments (image or frame) in order
        msgs, visuals, replies = [], [], []
        for i, m in enumerate(messages):
            text = ""
            for part in m["content"]:
                if part["type"] == "text":
                    text += part["text"]
                elif part["type"] == "ids":
                    replies.append(part["ids"])
                    text += REPLY_SENTINEL
                else:
                    new = self._visuals(part, f"{source}: message {i}")
                    visuals.extend(new)
                    text += SENTINEL * len(new)
            msgs.append({"role": m["role"], "content": text})
        full = self.tok.render_chat(msgs, add_generation_prompt=generation_prompt)
        target = [False] * (len(full) + 1)
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            before = self.tok.render_chat(msgs[:i], add_generation_prompt=True)
            upto = self.tok.render_chat(msgs[: i + 1])
            if not (upto.startswith(before) and full.startswith(upto)):
                raise DataError(f"{source}: the chat template of {self._tokenizer_name()} does not render "
                                f"conversation prefixes as prefixes; cannot locate assistant turn {i}")
            target[len(before): len(upto)] = [True] * (len(upto) - len(before))
        out, start, visuals, replies = [], 0, iter(visuals), iter(replies)
        for i in range(1, len(full) + 1):
            if (i == len(full) or full[i] in (SENTINEL, REPLY_SENTINEL) or full[i - 1] in (SENTINEL, REPLY_SENTINEL)
                    or target[i] != target[i - 1]):
                piece = full[start:i]
                if piece == SENTINEL:
                    out.append(next(visuals))
                elif piece == REPLY_SENTINEL:
                    out.append(("ids", next(replies), target[start]))
                elif piece:
                    out.append(("markup", piece, target[start]))
                start = i
        return out

    def _tokenizer_name(self) -> str:
        path = getattr(self.tok, "path", None)
        return repr(str(path)) if path is not None else type(self.tok).__name__


def _last_exchange(history: list[dict]) -> int:
    """Index where the last exchange starts: the first message after the
    previous assistant turn, so that the context of a continuation starts
    with a user (or system) message, as templates that check role order require."""
    if not history:
        return 0
    i = len(history) - 1  # the last assistant message
    while i > 0 and history[i - 1]["role"] != "assistant":
        i -= 1
    return i
