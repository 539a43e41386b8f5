"""Qwen2.5-VL's dynamic resolution: each image (or video) at its own size.

Design decisions:
- The resizing rule is transformers' `smart_resize` (Qwen2-VL image
  processor): both sides rounded to multiples of `factor` (patch x merge,
  28), then scaled down to at most `max_pixels` or up to at least
  `min_pixels`, keeping the aspect ratio as closely as the rounding allows.
  One bicubic resize (Pillow, on 8-bit pixels), then scale and normalise, as
  `vision.preprocess` does for fixed-size images: so for a square image whose
  side is already a multiple of 28 both paths give the same pixels.
- Patch order (`patchify`) is transformers': frames in groups of the
  temporal patch (2), then merge group by merge group, then within a group
  row-major; a patch's vector is `(channel, frame, row, column)`. A still
  image is one frame repeated over the temporal patch; a video with an odd
  number of frames repeats its last one (transformers' video processor does
  the same). So a video of F frames gives `ceil(F / 2)` temporal tokens.
- Items are `[C, H, W]` (an image) or `[F, C, H, W]` (a video's frames, all
  resized to the size of the first): `grid_of` gives their grid in LM tokens
  `(gt, gh, gw)`, whose product is their number of image tokens. A clip item
  is one image, so one window, as transformers' Qwen2.5-VL video; it reaches
  a model only from callers that build one (`Session.add_images`, a `Batch`).
  The processor never does: a video part's frames are separate `[C, H, W]`
  items, a window each (docs/design.md §2), not merged in temporal pairs.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from einops import rearrange

from casa.config import VisionConfig
from casa.vision.preprocess import load_rgb, preprocess

__all__ = ["grid_of", "patchify", "preprocess_dynamic", "preprocess_images", "smart_resize"]


def smart_resize(height: int, width: int, *, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(height, width) after Qwen2.5-VL's resizing rule (see the module docstring); ValueError
    for an aspect ratio beyond 200, as transformers."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"image of {height}x{width} pixels: aspect ratio beyond 200 is not supported")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def _pixels(img, size: tuple[int, int], cfg: VisionConfig) -> np.ndarray:
    """One PIL image resized to `size` (h, w), scaled and normalised: `[C, h, w]` float32."""
    from PIL import Image

    h, w = size
    img = img.resize((w, h), Image.Resampling.BICUBIC)
    x = np.asarray(img, dtype=np.float32).reshape(h, w, cfg.channels) / 255.0
    x = (x - np.asarray(cfg.image_mean, dtype=np.float32)) / np.asarray(cfg.image_std, dtype=np.float32)
    return x.transpose(2, 0, 1)


def preprocess_dynamic(items, cfg: VisionConfig) -> list[torch.Tensor]:
    """Images at their own size (the model's dynamic-resolution rule).

    Args:
        items: a list of images (PIL, uint8 arrays or paths) and videos (lists of such frames).
        cfg: the vision config (`patch_size` is the side of one LM token, `min_pixels` / `max_pixels`).
    Returns:
        per item, float32 `[C, H, W]` (an image) or `[F, C, H, W]` (a video), H and W multiples of
        `cfg.patch_size`.
    """
    out = []
    for i, item in enumerate(items):
        frames = list(item) if isinstance(item, (list, tuple)) else [item]
        if not frames:
            raise ValueError(f"preprocess: item {i}: a video with no frames")
        pil = [load_rgb(f, cfg, f"item {i}" + (f" frame {j}" if len(frames) > 1 else "")) for j, f in enumerate(frames)]
        w0, h0 = pil[0].size
        size = smart_resize(h0, w0, factor=cfg.patch_size, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
        x = torch.from_numpy(np.stack([_pixels(p, size, cfg) for p in pil]))
        out.append(x if isinstance(item, (list, tuple)) else x[0])
    return out


def preprocess_images(images, cfg: VisionConfig):
    """The config's preprocessing, the one choice point: a float32 `[N, C, S, S]` tensor (fixed size),
    or with dynamic resolution a list of `[C, H, W]` items (`preprocess_dynamic`)."""
    return preprocess_dynamic(list(images), cfg) if cfg.dynamic else preprocess(images, cfg)


def grid_of(item: torch.Tensor, *, merge_side: int, temporal: int = 2) -> tuple[int, int, int]:
    """`(gt, gh, gw)` in LM tokens of an image `[C, H, W]` or video `[F, C, H, W]` whose LM
    token covers `merge_side` x `merge_side` pixels."""
    frames = item.shape[0] if item.dim() == 4 else 1
    gt = math.ceil(frames / temporal) if item.dim() == 4 else 1
    return gt, item.shape[-2] // merge_side, item.shape[-1] // merge_side


def patchify(item: torch.Tensor, *, patch: int, merge: int, temporal: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An image `[C, H, W]` or video `[F, C, H, W]` -> (flat patches `[gt*gh*gw, C*temporal*patch*patch]`,
    grid_thw `[3]` long in patches), in Qwen2.5-VL's order (module docstring)."""
    frames = item[None] if item.dim() == 3 else item
    frames = frames.expand(temporal, -1, -1, -1) if item.dim() == 3 else frames
    if pad := -frames.shape[0] % temporal:
        frames = torch.cat([frames, frames[-1:].expand(pad, -1, -1, -1)])
    flat = rearrange(frames, "(gt tp) c (bh mh ph) (bw mw pw) -> (gt bh bw mh mw) (c tp ph pw)",
                     tp=temporal, mh=merge, mw=merge, ph=patch, pw=patch)
    gt, gh, gw = frames.shape[0] // temporal, item.shape[-2] // patch, item.shape[-1] // patch
    return flat, torch.tensor([gt, gh, gw], dtype=torch.long)
