"""The processor of a casa model exported for transformers: `AutoProcessor.from_pretrained(dir,
trust_remote_code=True)`.

This file is copied verbatim into the exported directory; it needs torch,
numpy, Pillow and transformers only (no casa). It renders what casa's
`data.Processor` renders, so that the exported model sees the inputs it was
trained on:

- `apply_chat_template(messages)` flattens each message to a string with
  `<image>` for an image part and `<video>` for a video part, and applies the
  tokenizer's chat template (casa's own chat markup for a byte-level
  tokenizer);
- `processor(text=..., images=..., videos=...)` expands each `<image>` into
  the image prefix token (if any), the image (at an insertion point: no
  token), the gist token; placeholders with nothing between them share one
  window; `<video>` is one such group per frame. Pieces of text between
  placeholders are tokenized apart, as casa tokenizes them.
- Images are converted to RGB (or L), resized bicubic to the model's square
  size without keeping the aspect ratio, scaled to [0, 1] and normalised with
  the model's mean and std (casa's `vision.preprocess`, without its
  high-bit-depth handling: give 8-bit images).
"""

import json
import os
import re

import numpy as np
import torch
from PIL import Image
from transformers import AutoTokenizer, BatchFeature

__all__ = ["CasaProcessor"]

IMAGE, VIDEO = "<image>", "<video>"
_SPLIT = re.compile("(<image>|<video>)")


class CasaProcessor:
    """Tokenizer + image preprocessing + casa's image markers (see the module docstring)."""

    def __init__(self, tokenizer, *, image_size, channels=3, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5),
                 gist_token="<|gist|>", image_prefix=None):
        self.tokenizer = tokenizer
        self.image_size, self.channels = int(image_size), int(channels)
        self.image_mean, self.image_std = np.asarray(image_mean, np.float32), np.asarray(image_std, np.float32)
        self.gist_token, self.image_prefix = gist_token, image_prefix

    # --------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, path, **kwargs):
        with open(os.path.join(path, "processor_config.json"), encoding="utf-8") as f:
            settings = json.load(f)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=kwargs.get("trust_remote_code"))
        keys = ("image_size", "channels", "image_mean", "image_std", "gist_token", "image_prefix")
        return cls(tokenizer, **{k: settings[k] for k in keys if k in settings})

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoProcessor"):
        """Nothing to register: the exported directory's `auto_map` names this class."""

    # --------------------------------------------------------------- images
    def preprocess(self, images) -> torch.Tensor:
        """PIL images, uint8 arrays or paths -> float32 `[N, C, S, S]`."""
        out = []
        for item in images:
            if isinstance(item, torch.Tensor):  # already pixels
                out.append(item.float())
                continue
            if isinstance(item, (str, os.PathLike)):
                with Image.open(item) as img:
                    item = img.copy()
            elif isinstance(item, np.ndarray):
                item = Image.fromarray(item)
            img = item.convert("RGB" if self.channels == 3 else "L")
            img = img.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
            x = np.asarray(img, dtype=np.float32).reshape(self.image_size, self.image_size, self.channels) / 255.0
            out.append(torch.from_numpy((x - self.image_mean) / self.image_std).permute(2, 0, 1))
        return torch.stack(out)

    # ----------------------------------------------------------------- text
    def _ids(self, text):
        return self.tokenizer.encode(text, add_special_tokens=False) if text else []

    def _token(self, name):
        return self.tokenizer.convert_tokens_to_ids(name)

    def _encode(self, text, images, videos):
        """(ids, images, insertion points) of one text."""
        ids, out, points, group = [], [], [], []
        images, videos = iter(images), iter(videos)

        def close():  # a group of images: prefix, the images at one point, gist
            if group:
                if self.image_prefix:
                    ids.append(self._token(self.image_prefix))
                out.extend(group)
                points.extend([len(ids)] * len(group))
                if self.gist_token:
                    ids.append(self._token(self.gist_token))
                group.clear()

        for piece in _SPLIT.split(text):
            if not piece:  # between two placeholders: they stay one group
                continue
            if piece == IMAGE:
                group.append(next(images))
                continue
            close()
            if piece == VIDEO:
                for frame in next(videos):
                    group.append(frame)
                    close()
            else:
                ids += self._ids(piece)
        close()
        return ids, out, points

    def __call__(self, text=None, images=None, videos=None, return_tensors="pt", **kwargs):
        """`input_ids [B, T]`, `attention_mask`, and with images `pixel_values [N, C, S, S]` and
        `insertion_points [N]` (one text per call when it has images)."""
        if text is None:
            raise ValueError("CasaProcessor: give text= with an '<image>' where each image goes, e.g. "
                             "processor.apply_chat_template(messages, add_generation_prompt=True)")
        texts = [text] if isinstance(text, str) else list(text)
        images = [] if images is None else [images] if not isinstance(images, (list, tuple)) else list(images)
        if videos is not None and len(videos) and not isinstance(videos[0], (list, tuple)):
            videos = [videos]
        videos = list(videos or [])
        wanted = (sum(t.count(IMAGE) for t in texts), sum(t.count(VIDEO) for t in texts))
        if wanted != (len(images), len(videos)):
            raise ValueError(f"CasaProcessor: the text has {wanted[0]} '<image>' and {wanted[1]} '<video>' "
                             f"placeholder(s); got {len(images)} image(s) and {len(videos)} video(s)")
        if (images or videos) and len(texts) > 1:
            raise ValueError("CasaProcessor: one text per call when it has images (a stream is a row)")
        rows = [self._encode(t, images, videos) for t in texts]
        width = max(len(r[0]) for r in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        data = {"input_ids": [r[0] + [pad] * (width - len(r[0])) for r in rows],
                "attention_mask": [[1] * len(r[0]) + [0] * (width - len(r[0])) for r in rows]}
        if rows[0][1]:
            data["pixel_values"] = self.preprocess(rows[0][1])
            data["insertion_points"] = rows[0][2]
        return BatchFeature(data, tensor_type=return_tensors)

    def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=False, **kwargs):
        """A conversation as text with `<image>` / `<video>` placeholders (`tokenize=True`: the inputs)."""
        flat, images, videos = [], [], []
        for m in messages:
            content = m["content"]
            if isinstance(content, str):
                content = [{"type": "text", "text": content}]
            text = ""
            for part in content:
                if part["type"] == "text":
                    text += part["text"]
                elif part["type"] == "image":
                    text += IMAGE
                    images.append(part.get("image", part.get("path", part.get("url"))))
                elif part["type"] == "video":
                    text += VIDEO
                    videos.append(part.get("frames", part.get("video")))
            flat.append({"role": m["role"], "content": text})
        rendered = self.tokenizer.apply_chat_template(flat, tokenize=False, add_generation_prompt=add_generation_prompt)
        if not tokenize:
            return rendered
        return self(text=rendered, images=images or None, videos=videos or None)

    # ----------------------------------------------------------------- out
    def batch_decode(self, sequences, **kwargs):
        return self.tokenizer.batch_decode(sequences, **kwargs)

    def decode(self, ids, **kwargs):
        return self.tokenizer.decode(ids, **kwargs)
