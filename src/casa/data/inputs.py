"""The processor's transformers-style face: text (with image and video
placeholders) or chat messages in, the model's inputs out; ids back to text.

`Processor.__call__`, `Processor.apply_chat_template` and
`Processor.batch_decode` are thin methods over this module.

Design decisions:
- Images take no text position in casa: a text says where they go with
  placeholders, `<image>` for one image and `<video>` for one video's frames.
  As a transformers processor expands its image token, the processor expands
  each placeholder into the markup the model was trained with: the image
  prefix token (if any), the image, the gist token. Placeholders with nothing
  between them are one group, one window; a video is one group per frame
  (docs/design.md §2). The expansion is `Processor.tokenize`, the one home of
  the marker rule, so training, chat and these inputs place markers alike.
- `apply_chat_template(messages, tokenize=False)` renders a conversation as
  such a string (markers implicit); `tokenize=True` gives the inputs of
  exactly the ids, images and insertion points that `Processor.encode` and
  `inference.Chat` feed. The string given back to the processor is read as one
  text with its special tokens parsed: the same ids with the byte tokenizer;
  a BPE tokenizer may merge differently across a markup boundary, as it would
  in transformers.
- `ModelInputs` is a dict, so `model(**inputs)` and `model.generate(**inputs)`
  work as with transformers, with attribute access and `.to()`. Rows of a
  batch are right-padded with the pad id and `attention_mask` says where;
  `batch()` gives the core `Batch`, the padding a document of its own.
- Errors name the argument and say what to pass instead.
"""

from __future__ import annotations

import re

import torch

from casa.core.batch import Batch
from casa.data.sample import DataError, check_messages
from casa.vision.dynamic import preprocess_images

__all__ = ["IMAGE_PLACEHOLDER", "VIDEO_PLACEHOLDER", "ModelInputs", "call_processor", "chat_inputs", "chat_text",
           "decode_ids", "inputs_from_encoded"]

IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"
_PLACEHOLDERS = re.compile(f"({re.escape(IMAGE_PLACEHOLDER)}|{re.escape(VIDEO_PLACEHOLDER)})")


class ModelInputs(dict):
    """The model's inputs as a dict (see the module docstring).

    Keys: `input_ids [B, T]` long, `attention_mask [B, T]` long (1 on tokens, 0 on
    padding); with images, `pixel_values` (`[N, C, S, S]` float, or with dynamic
    resolution a list of `[C, H, W]` items), `insertion_points [N]` long (the text index
    before which each image sits) and `image_rows [N]` long, images ordered by row then point.
    """

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"ModelInputs has no {name!r}; it holds {sorted(self)}") from None

    def to(self, device=None, dtype: torch.dtype | None = None) -> "ModelInputs":
        """Tensors moved to `device`; floating ones (pixels) also cast to `dtype` if given."""
        def move(x):
            if not torch.is_tensor(x):
                return [move(t) for t in x] if isinstance(x, list) else x
            return x.to(device, dtype=dtype if dtype is not None and x.is_floating_point() else None)

        return ModelInputs({k: move(v) for k, v in self.items()})

    def batch(self) -> Batch:
        """The core `Batch` of these inputs (padding a document of its own per row)."""
        ids = self["input_ids"]
        mask = self.get("attention_mask")
        lengths = mask.sum(-1).tolist() if mask is not None else [ids.shape[1]] * len(ids)
        doc_lens = [[n] if n == ids.shape[1] else [n, ids.shape[1] - n] for n in map(int, lengths)]
        return Batch(ids, images=self.get("pixel_values"), image_rows=self.get("image_rows"),
                     insertion_points=self.get("insertion_points"), doc_lens=doc_lens)


# ------------------------------------------------------------------------ in
def _pixels(processor, images: list):
    """Images as the model takes them: preprocessed now unless already tensors (pixels)."""
    todo = [x for x in images if not torch.is_tensor(x)]
    made = iter(preprocess_images(todo, processor.vision) if todo else ())
    items = [x if torch.is_tensor(x) else next(made) for x in images]
    return items if processor.vision.dynamic else torch.stack(items)


def inputs_from_encoded(processor, encs: list) -> ModelInputs:
    """`ModelInputs` of rendered rows (`data.processor.Encoded`), right-padded with the pad id."""
    T = max(len(e.ids) for e in encs)
    pad = processor.tok.pad_id
    ids = torch.full((len(encs), T), pad, dtype=torch.long)
    mask = torch.zeros(len(encs), T, dtype=torch.long)
    images, points, rows = [], [], []
    for b, e in enumerate(encs):
        ids[b, : len(e.ids)] = torch.tensor(e.ids, dtype=torch.long)
        mask[b, : len(e.ids)] = 1
        if e.points and e.points[-1] >= len(e.ids):
            raise ValueError(f"Processor: row {b}: an image is the last thing in the text (nothing reads it); end the "
                             "text after it (apply_chat_template(..., add_generation_prompt=True) does)")
        images += e.images
        points += e.points
        rows += [b] * len(e.points)
    out = ModelInputs(input_ids=ids, attention_mask=mask)
    if images:
        out.update(pixel_values=_pixels(processor, images), insertion_points=torch.tensor(points, dtype=torch.long),
                   image_rows=torch.tensor(rows, dtype=torch.long))
    return out


def _is_video(x) -> bool:
    """One video: a list of frames, or a `[F, C, H, W]` tensor."""
    return (isinstance(x, (list, tuple)) and bool(x) and not isinstance(x[0], (list, tuple))) or \
        (torch.is_tensor(x) and x.dim() == 4)


def _per_text(media, counts: list[int], name: str, what: str) -> list[list]:
    """`media` split over the texts by their placeholder counts: one flat list in placeholder order,
    or (images) one list per text."""
    placeholder = IMAGE_PLACEHOLDER if name == "images" else VIDEO_PLACEHOLDER
    if media is None:
        if sum(counts):
            raise ValueError(f"Processor: the text has {sum(counts)} {placeholder!r} placeholder(s) and no "
                             f"{name}=; pass one {what} per placeholder, in order")
        return [[] for _ in counts]
    if name == "images":
        items = list(media) if isinstance(media, (list, tuple)) or torch.is_tensor(media) and media.dim() == 4 \
            else [media]
        if len(counts) > 1 and len(items) == len(counts) and all(isinstance(x, (list, tuple)) for x in items):
            per = [list(x) for x in items]  # one list per text
            bad = [i for i, (c, x) in enumerate(zip(counts, per)) if c != len(x)]
            if bad:
                i = bad[0]
                raise ValueError(f"Processor: images=: text {i} has {counts[i]} {placeholder!r} placeholder(s) and "
                                 f"{len(per[i])} image(s) were given for it")
            return per
    else:
        items = [media] if _is_video(media) else list(media)
    if len(items) != sum(counts):
        raise ValueError(f"Processor: {name}=: {len(items)} {what}(s) for {sum(counts)} {placeholder!r} "
                         f"placeholder(s) in the text; put {placeholder!r} where each {what} goes, in order")
    out, i = [], 0
    for c in counts:
        out.append(items[i : i + c])
        i += c
    return out


def call_processor(processor, text=None, images=None, videos=None, *, return_tensors="pt") -> ModelInputs:
    """`processor(text=..., images=..., videos=...)`: see `Processor.__call__`."""
    if return_tensors not in ("pt", None):
        raise ValueError(f"return_tensors={return_tensors!r}: casa gives PyTorch tensors ('pt')")
    if text is None:
        raise ValueError("Processor: give text= (a string, or a list of strings for a batch) with an "
                         f"{IMAGE_PLACEHOLDER!r} where each image goes; or render chat messages with "
                         "processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)")
    texts = [text] if isinstance(text, str) else list(text)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError(f"Processor: text= must be a string or a non-empty list of strings, got {text!r:.80}")
    pieces = [_PLACEHOLDERS.split(t) for t in texts]
    per_images = _per_text(images, [p.count(IMAGE_PLACEHOLDER) for p in pieces], "images", "image")
    per_videos = _per_text(videos, [p.count(VIDEO_PLACEHOLDER) for p in pieces], "videos", "video")
    encs = []
    for parts, imgs, vids in zip(pieces, iter(per_images), iter(per_videos)):
        imgs, vids, segments = iter(imgs), iter(vids), []
        for piece in parts:
            if piece == IMAGE_PLACEHOLDER:
                segments.append(("image", next(imgs), False))
            elif piece == VIDEO_PLACEHOLDER:
                processor.check_video("Processor(videos=...)")
                segments += [("frame", frame, False) for frame in next(vids)]
            elif piece:
                segments.append(("markup", piece, False))
        enc = processor.tokenize(segments)
        if not enc.ids:
            raise ValueError("Processor: a text gives no tokens; give some text after the images")
        encs.append(enc)
    return inputs_from_encoded(processor, encs)


# ---------------------------------------------------------------------- chat
class _Video:
    """Stands for a video part while a conversation is rendered as text (one `<video>`)."""

    def __init__(self, frames):
        self.frames = frames


def _conversations(messages) -> tuple[list[list[dict]], bool]:
    """(conversations, whether a batch was given), each checked (`data.sample.check_messages`)."""
    batched = isinstance(messages, (list, tuple)) and bool(messages) and isinstance(messages[0], (list, tuple))
    convs = list(messages) if batched else [messages]
    try:
        return [check_messages(list(c), "apply_chat_template") for c in convs], batched
    except DataError as e:
        raise ValueError(f"{e}; messages look like [{{'role': 'user', 'content': [{{'type': 'image', 'image': "
                         "<PIL image or path>}, {'type': 'text', 'text': 'What is this?'}]}]") from None


def chat_inputs(processor, messages, *, add_generation_prompt: bool) -> ModelInputs:
    """The model's inputs of a conversation (or a list of them: a batch), rendered as `Processor.encode`
    renders it."""
    convs, _ = _conversations(messages)
    encs = [processor.tokenize(processor.render(c, generation_prompt=add_generation_prompt)) for c in convs]
    return inputs_from_encoded(processor, encs)


def chat_text(processor, messages, *, add_generation_prompt: bool) -> str | list[str]:
    """A conversation rendered as text with `<image>` / `<video>` placeholders (a list for a batch)."""
    convs, batched = _conversations(messages)
    out = []
    for conv in convs:
        conv = [{**m, "content": [{"type": "image", "image": _Video(p["frames"])} if p["type"] == "video" else p
                                  for p in m["content"]]} for m in conv]
        text = ""
        for kind, value, _ in processor.render(conv, generation_prompt=add_generation_prompt):
            if kind == "image":
                if isinstance(value, _Video):
                    processor.check_video("apply_chat_template")
                text += VIDEO_PLACEHOLDER if isinstance(value, _Video) else IMAGE_PLACEHOLDER
            elif kind == "ids":
                text += processor.tok.decode(value, skip_special=False)
            else:
                text += value
        out.append(text)
    return out if batched else out[0]


# ----------------------------------------------------------------------- out
def decode_ids(processor, ids, *, skip_special_tokens: bool = True) -> str:
    """One sequence of token ids (list or 1-D tensor) as text."""
    ids = ids.reshape(-1).tolist() if torch.is_tensor(ids) else [int(i) for i in ids]
    return processor.tok.decode(ids, skip_special=skip_special_tokens)
