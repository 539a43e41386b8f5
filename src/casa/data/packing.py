"""Packing: samples -> one row of several documents, within token budgets.

A pack is a single row holding whole samples (documents) back to back, with
`doc_lens` marking them, so that attention never crosses a sample boundary
(the layout builds windows and causal masks per document). A pack closes when
the next sample would exceed the text-token budget or the image-token budget
(the paper: 2048 text + 20480 image tokens per GPU). With `splice_images`
(the `insertion` variant), image tokens sit in the sequence, so they count
against the text budget too. Packs never pad: one row needs no padding.

Design decisions:
- The stream is deterministic from a sample position, so a trainer resumes
  from one integer.
- A sample that alone exceeds a budget, or whose image cannot be read, is a
  `DataError` naming it, or a counted skip with `skip_bad`.
- How many sequence tokens a sample costs (`sequence_tokens`) is one rule,
  shared with evaluation, which refuses a prompt longer than the budget the
  model was trained with (`casa.eval.decode.check_lengths`).
- `stack_rows` (one document per row, right-padded) serves batched
  evaluation; the padding is a document of its own, outside the loss, so it
  can never be attended to by a real token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from casa.core.batch import Batch
from casa.data.processor import Encoded, Processor
from casa.data.sample import DataError

__all__ = ["Pack", "Packer", "pack_row", "sequence_tokens", "stack_rows"]


@dataclass
class Pack:
    """One packed row's documents and the sample positions it covers."""

    docs: list[Encoded]
    start: int  # position of its first sample
    end: int  # position after its last sample (where the next pack starts)


def sequence_tokens(enc: Encoded, tokens_per_image: int, *, splice_images: bool, memory_tokens: int = 0) -> int:
    """Positions a sample occupies in the LM's sequence: its text tokens, plus
    its image tokens when they are spliced into the stream (`insertion`; an
    image's own count where its grid is known (dynamic resolution), else
    `tokens_per_image`), plus `memory_tokens` per image (`FusionConfig.frame_memory`:
    pooled image tokens kept in the stream)."""
    images = enc.image_tokens if enc.image_tokens is not None else enc.n_images * tokens_per_image
    return len(enc.ids) + (images if splice_images else 0) + enc.n_images * memory_tokens


def _images(docs: list[Encoded]) -> dict:
    """The documents' pixels as Batch fields: one `[N, C, S, S]` tensor, or (dynamic resolution)
    the list of items and their grids."""
    pixels = [d.pixels for d in docs if d.pixels is not None]
    if not pixels:
        return {"images": None}
    if isinstance(pixels[0], list):
        grids = [g for d in docs if d.grids is not None for g in d.grids]
        return {"images": [x for p in pixels for x in p], "image_grids": torch.tensor(grids, dtype=torch.long)}
    return {"images": torch.cat(pixels)}


def pack_row(docs: list[Encoded]) -> Batch:
    """Documents back to back in one row.

    Returns:
        a `Batch` with `input_ids [1, T]` long (T = the documents' total length),
        `loss_mask [1, T]` bool, `images [N, C, H, W]` float (None without images;
        with dynamic resolution a list of items and `image_grids [N, 3]`),
        `insertion_points [N]` long shifted to the row, and `doc_lens [[len, ...]]`.
    """
    ids, mask, points = [], [], []
    for d in docs:
        points += [len(ids) + p for p in d.points]
        ids += d.ids
        mask += d.targets
    n = len(points)
    return Batch(
        input_ids=torch.tensor([ids], dtype=torch.long),
        **_images(docs),
        image_rows=torch.zeros(n, dtype=torch.long),
        insertion_points=torch.tensor(points, dtype=torch.long),
        doc_lens=[[len(d.ids) for d in docs]],
        loss_mask=torch.tensor([mask], dtype=torch.bool),
    )


def stack_rows(docs: list[Encoded], pad_id: int, *, extra: int = 0) -> Batch:
    """One document per row, right-padded with `pad_id` to the longest row plus
    `extra` slots (the padding is a document of its own, outside the loss).

    Returns:
        a `Batch` with `input_ids [B, T]` long, `loss_mask [B, T]` bool (False on
        padding), `images [N, C, H, W]` float, `image_rows [N]` and
        `insertion_points [N]` long, `doc_lens [[len, pad], ...]`.
    """
    T = max(len(d.ids) for d in docs) + extra
    ids = torch.full((len(docs), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(docs), T, dtype=torch.bool)
    rows, points, doc_lens = [], [], []
    for b, d in enumerate(docs):
        ids[b, : len(d.ids)] = torch.tensor(d.ids)
        mask[b, : len(d.ids)] = torch.tensor(d.targets, dtype=torch.bool)
        rows += [b] * d.n_images
        points += d.points
        doc_lens.append([len(d.ids)] + ([T - len(d.ids)] if T > len(d.ids) else []))
    return Batch(input_ids=ids, **_images(docs),
                 image_rows=torch.tensor(rows, dtype=torch.long),
                 insertion_points=torch.tensor(points, dtype=torch.long),
                 doc_lens=doc_lens, loss_mask=mask)


class Packer:
    """Samples of a source, encoded and packed into rows within the text and image token budgets."""

    def __init__(self, source, processor: Processor, *, text_tokens: int = 2048, image_tokens: int = 20480,
                 splice_images: bool = False, memory_tokens: int = 0, skip_bad: bool = False):
        self.source, self.processor = source, processor
        self.text_tokens, self.image_tokens = text_tokens, image_tokens
        self.splice_images, self.memory_tokens, self.skip_bad = splice_images, memory_tokens, skip_bad
        self.skipped = 0

    def cost(self, enc: Encoded) -> tuple[int, int]:
        """(sequence tokens, image tokens) of one sample."""
        img = self.processor.image_tokens(enc)
        return sequence_tokens(enc, self.processor.tokens_per_image, splice_images=self.splice_images,
                               memory_tokens=self.memory_tokens), img

    def _encode(self, i: int) -> Encoded | None:
        sample = self.source[i]
        try:
            enc = self.processor.encode(sample)
            seq, img = self.cost(enc)
            if seq > self.text_tokens or img > self.image_tokens:
                raise DataError(
                    f"{sample.source}: sample needs {seq} sequence tokens and {img} image tokens, over the "
                    f"budget of {self.text_tokens} text + {self.image_tokens} image tokens per pack"
                    + (" (insertion counts image tokens in the sequence)" if self.splice_images else "")
                    + (f" ({self.memory_tokens} memory tokens per image in the sequence)" if self.memory_tokens
                       else ""))
            return enc
        except DataError:
            if not self.skip_bad:
                raise
            self.skipped += 1
            return None

    def packs(self, position: int = 0, *, limit: int | None = None):
        """Packs from sample `position` on (endless for endless sources)."""
        made, i, pending = 0, position, None
        while limit is None or made < limit:
            start, docs, seq, img = i, [], 0, 0
            while True:
                if pending is None:
                    try:
                        self.source[i]
                    except IndexError:
                        break
                    pending = self._encode(i)
                    if pending is None:  # skipped
                        i += 1
                        continue
                s, m = self.cost(pending)
                if docs and (seq + s > self.text_tokens or img + m > self.image_tokens):
                    break
                docs.append(pending)
                seq, img, pending, i = seq + s, img + m, None, i + 1
            if not docs:
                return
            yield Pack(docs, start, i)
            made += 1
