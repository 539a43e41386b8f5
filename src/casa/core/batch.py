"""The interleaved batch: text, images and where the images go.

Images occupy no text positions: image `i` sits before text index
`insertion_points[i]` of row `image_rows[i]` (docs/design.md §2). Rows may pack
several documents; `doc_lens[b]` lists their lengths and must add up to the
row length (padding, if any, is a document of its own whose loss is masked).

Design decisions:
- `validate()` is called by the model before any work, so that a malformed
  batch fails with a message that names the field and the offending value
  instead of a shape error deep inside attention (`BatchError`, a ValueError).
- Defaults cover the common cases: one document per row, and for a one-row
  batch every image in row 0.
- The batch only describes; `layout()` / `splice()` turn it into the
  windows of `core/layout.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from casa.core.layout import Layout, Splice, build_layout, build_memory, build_splice

__all__ = ["Batch", "BatchError"]


class BatchError(ValueError):
    """An interleaved batch that breaks the rules of docs/design.md §2."""


@dataclass
class Batch:
    """Text, images and where the images go (see the module docstring)."""

    input_ids: torch.Tensor  # [B, T] long
    # [N, C, H, W] float pixels, or (dynamic resolution) a list of N items, [C, H, W] images / [F, C, H, W] videos
    images: torch.Tensor | list[torch.Tensor] | None = None
    # [N, n, D] precomputed LM-width image tokens, or a list of N [n_i, D] (images of their own sizes)
    image_embeds: torch.Tensor | list[torch.Tensor] | None = None
    image_grids: torch.Tensor | None = None  # [N, 3] long (gt, gh, gw) in LM tokens, for M-RoPE (core/positions.py)
    image_rows: torch.Tensor | None = None  # [N] long, row of each image
    insertion_points: torch.Tensor | None = None  # [N] long, text index before which it sits
    doc_lens: list[list[int]] | None = None  # per row, lengths of packed documents
    loss_mask: torch.Tensor | None = None  # [B, T] bool, True where the token is a training target
    # [N] float, M-RoPE temporal step between a video's temporal tokens (1 for images; core/positions.py)
    time_steps: torch.Tensor | None = None

    def __post_init__(self):
        if self.doc_lens is None and isinstance(self.input_ids, torch.Tensor) and self.input_ids.dim() == 2:
            self.doc_lens = [[self.input_ids.shape[1]] for _ in range(self.input_ids.shape[0])]
        n = self.n_images
        if self.image_rows is None and n:
            if self.input_ids.dim() == 2 and self.input_ids.shape[0] == 1:
                self.image_rows = torch.zeros(n, dtype=torch.long)
        if self.insertion_points is None and n == 0:
            self.insertion_points = torch.zeros(0, dtype=torch.long)
        if self.image_rows is None and n == 0:
            self.image_rows = torch.zeros(0, dtype=torch.long)

    @property
    def n_images(self) -> int:
        for x in (self.image_embeds, self.images):
            if x is not None:
                return len(x) if isinstance(x, (list, tuple)) else int(x.shape[0])
        return 0 if self.insertion_points is None else int(self.insertion_points.numel())

    def validate(self, *, image_size: int | None = None, channels: int | None = None,
                 image_tokens: int | None = None, d_model: int | None = None) -> "Batch":
        ids = self.input_ids
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype != torch.long:
            raise BatchError(f"input_ids: expected a [B, T] long tensor, got {_describe(ids)}")
        B, T = ids.shape
        if B == 0 or T == 0:
            raise BatchError(f"input_ids: empty batch of shape {tuple(ids.shape)}")
        if len(self.doc_lens) != B:
            raise BatchError(f"doc_lens: {len(self.doc_lens)} rows for a batch of {B}")
        for b, lens in enumerate(self.doc_lens):
            if any(int(x) <= 0 for x in lens):
                raise BatchError(f"doc_lens[{b}] = {list(lens)}: empty document (every length must be >= 1)")
            if sum(lens) != T:
                raise BatchError(f"doc_lens[{b}] = {list(lens)} adds up to {sum(lens)}, row length is {T}")
        if self.images is not None and self.image_embeds is not None:
            raise BatchError("images and image_embeds: give one or the other, not both")
        n = self.n_images
        pts, rows = self.insertion_points, self.image_rows
        if pts is None or rows is None:
            raise BatchError(f"{n} images but no {'insertion_points' if pts is None else 'image_rows'}")
        for name, x in (("insertion_points", pts), ("image_rows", rows)):
            if not isinstance(x, torch.Tensor) or x.dim() != 1 or x.dtype != torch.long:
                raise BatchError(f"{name}: expected a 1-D long tensor, got {_describe(x)}")
            if x.numel() != n:
                raise BatchError(f"{name}: {x.numel()} entries for {n} images")
        if n:
            if int(rows.min()) < 0 or int(rows.max()) >= B:
                raise BatchError(f"image_rows: {rows.tolist()} out of range for a batch of {B} rows")
            if int(pts.min()) < 0 or int(pts.max()) >= T:
                bad = pts[(pts < 0) | (pts >= T)].tolist()
                raise BatchError(f"insertion_points: {bad} out of range [0, {T - 1}] for rows of {T} text tokens")
            key = rows * (T + 1) + pts
            if bool((key[1:] < key[:-1]).any()):
                raise BatchError(
                    "insertion_points: images must be sorted by (row, insertion point); "
                    f"got rows {rows.tolist()}, points {pts.tolist()}"
                )
        if isinstance(self.images, (list, tuple)):
            for i, x in enumerate(self.images):
                if not isinstance(x, torch.Tensor) or x.dim() not in (3, 4) or not x.is_floating_point() \
                        or (channels is not None and x.shape[-3] != channels):
                    raise BatchError(f"images[{i}]: expected [C, H, W] or [F, C, H, W] floating pixels with "
                                     f"C={channels}, got {_describe(x)}")
        elif self.images is not None:
            x = self.images
            if x.dim() != 4 or not x.is_floating_point():
                raise BatchError(f"images: expected [N, C, H, W] floating pixels, got {_describe(x)}")
            want = (channels, image_size, image_size)
            if image_size is not None and tuple(x.shape[1:]) != want:
                raise BatchError(f"images: shape {tuple(x.shape)}, expected [N, {want[0]}, {want[1]}, {want[2]}]")
        if isinstance(self.image_embeds, (list, tuple)):
            for i, x in enumerate(self.image_embeds):
                if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_floating_point() \
                        or (d_model is not None and x.shape[1] != d_model):
                    raise BatchError(f"image_embeds[{i}]: expected [tokens, {d_model}] floats, got {_describe(x)}")
        elif self.image_embeds is not None:
            x = self.image_embeds
            if x.dim() != 3 or not x.is_floating_point():
                raise BatchError(f"image_embeds: expected [N, tokens, d_model] floats, got {_describe(x)}")
            if image_tokens is not None and x.shape[1] != image_tokens:
                raise BatchError(f"image_embeds: {x.shape[1]} tokens per image, the model expects {image_tokens}")
            if d_model is not None and x.shape[2] != d_model:
                raise BatchError(f"image_embeds: width {x.shape[2]}, the model's d_model is {d_model}")
        if self.image_grids is not None and (not isinstance(self.image_grids, torch.Tensor)
                                             or tuple(self.image_grids.shape) != (n, 3)):
            raise BatchError(f"image_grids: expected a [{n}, 3] long tensor, got {_describe(self.image_grids)}")
        if self.time_steps is not None and (not isinstance(self.time_steps, torch.Tensor)
                                            or tuple(self.time_steps.shape) != (n,)):
            raise BatchError(f"time_steps: expected a [{n}] tensor (one per image), got {_describe(self.time_steps)}")
        if self.loss_mask is not None and tuple(self.loss_mask.shape) != (B, T):
            raise BatchError(f"loss_mask: shape {tuple(self.loss_mask.shape)}, expected {(B, T)}")
        return self

    def layout(self, tokens_per_image: int | torch.Tensor) -> Layout:
        """The windows of this batch (`core.layout.build_layout`)."""
        return build_layout(self.input_ids.shape[1], self.doc_lens, self.image_rows, self.insertion_points,
                            tokens_per_image, device=self.input_ids.device)

    def splice(self, tokens_per_image: int | torch.Tensor) -> Splice:
        """Where tokens land when images are spliced into the text (`insertion`)."""
        return build_splice(self.input_ids.shape[1], self.doc_lens, self.image_rows, self.insertion_points,
                            tokens_per_image, device=self.input_ids.device)

    def memory(self, tokens_per_image: int | torch.Tensor, memory: int) -> tuple[Splice, Layout]:
        """Where `memory` tokens per image land in the text stream, and the windows of the longer rows
        (`FusionConfig.frame_memory`; `core.layout.build_memory`)."""
        return build_memory(self.input_ids.shape[1], self.doc_lens, self.image_rows, self.insertion_points,
                            tokens_per_image, memory, device=self.input_ids.device)

    def to(self, device) -> "Batch":
        move = {k: getattr(self, k).to(device) for k in
                ("input_ids", "images", "image_embeds", "image_rows", "insertion_points", "loss_mask", "time_steps")
                if isinstance(getattr(self, k), torch.Tensor)}
        for k in ("images", "image_embeds"):
            if isinstance(getattr(self, k), (list, tuple)):
                move[k] = [x.to(device) for x in getattr(self, k)]
        return replace(self, **move)


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return type(x).__name__
