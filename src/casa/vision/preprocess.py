"""Image preprocessing: Pillow + numpy + torch only.

Design decisions:
- Convert to RGB, one bicubic resize straight to `image_size` x `image_size`
  (no crop, the aspect ratio is not kept), scale to [0, 1], normalise with the
  config's mean / std.
- High-bit-depth images are scaled to 8 bits before anything else
  (`to_8bit`), since Pillow's own conversion clips them (a 16-bit PNG would
  come out nearly all white): 16-bit modes (`I;16*`) by their full range
  65535; 32-bit integer images (`I`) by that same range when their values fit
  in it (the usual content: 16-bit data), else from their min to their max;
  float images (`F`) as [0, 1] when their values lie there, else from their
  min to their max (NaN as 0).
- Arrays must be uint8 (an array carries no mode saying what its range is).
- `check_pixels` is the one shape/dtype check every consumer of pixels calls.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

from casa.config import VisionConfig

__all__ = ["check_pixels", "load_rgb", "preprocess", "to_8bit"]


def _load_image(item, where: str) -> Image.Image:
    """One input (PIL image, uint8 HxW[xC] array, or path) as a PIL image."""
    if isinstance(item, Image.Image):
        return item
    if isinstance(item, np.ndarray):
        if item.dtype != np.uint8:
            raise ValueError(f"preprocess: {where}: array dtype is {item.dtype}, expected uint8")
        if not (item.ndim == 2 or (item.ndim == 3 and item.shape[2] in (1, 3, 4))):
            raise ValueError(f"preprocess: {where}: array shape is {item.shape}, expected HxW or HxWxC with C in 1, 3, 4")
        if item.shape[0] == 0 or item.shape[1] == 0:
            raise ValueError(f"preprocess: {where}: array shape is {item.shape}, the image is empty")
        return Image.fromarray(item[:, :, 0] if item.ndim == 3 and item.shape[2] == 1 else item)
    if isinstance(item, (str, os.PathLike)):
        try:
            with Image.open(item) as img:
                img.load()  # decode now, so that a truncated file fails here
                return img.copy()
        except Exception as e:  # missing, unreadable, corrupt, truncated, decompression bomb
            raise ValueError(f"preprocess: {where}: cannot read image file: {e}") from e
    raise ValueError(f"preprocess: {where}: unsupported type {type(item).__name__}, expected PIL image, uint8 array or path")


def _stretch(values: np.ndarray) -> np.ndarray:
    """Min..max -> 0..255 (a constant image becomes 0)."""
    lo, hi = float(values.min()), float(values.max())
    return (values - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(values)


def to_8bit(img: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit integer or float image as an 8-bit greyscale one (`L`),
    scaled as the module docstring says; other modes pass through unchanged."""
    if not (img.mode.startswith("I") or img.mode == "F"):
        return img
    values = np.asarray(img).astype(np.float64)
    if img.mode == "F":
        values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
        in_unit = values.size and values.min() >= 0 and values.max() <= 1
        values = values * 255.0 if in_unit else _stretch(values)
    elif img.mode.startswith("I;16") or (values.size and values.min() >= 0 and values.max() <= 65535):
        values = values * (255.0 / 65535.0)
    else:
        values = _stretch(values)
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))  # 2-D uint8: mode L


_MODES = {3: "RGB", 1: "L"}


def load_rgb(item, cfg: VisionConfig, where: str) -> Image.Image:
    """One input (PIL image, uint8 array or path) decoded, scaled to 8 bits and converted to the
    config's channels (RGB or L); ValueError naming `where` otherwise."""
    if cfg.channels not in _MODES:
        raise ValueError(f"preprocess: channels={cfg.channels} is not supported, expected 1 or 3")
    return to_8bit(_load_image(item, where)).convert(_MODES[cfg.channels])


def preprocess(images, cfg: VisionConfig) -> torch.Tensor:
    """Images (list of PIL images, uint8 HxWxC arrays or paths) -> float32 [N, C, S, S]."""
    if isinstance(images, (Image.Image, str, os.PathLike)) or (isinstance(images, np.ndarray) and images.ndim < 4):
        images = [images]
    images = list(images)
    if not images:
        raise ValueError("preprocess: got no images")
    if cfg.channels not in _MODES:
        raise ValueError(f"preprocess: channels={cfg.channels} is not supported, expected 1 or 3")
    if len(cfg.image_mean) != cfg.channels or len(cfg.image_std) != cfg.channels:
        raise ValueError(f"preprocess: image_mean / image_std must have {cfg.channels} entries")
    size = cfg.image_size
    out = np.empty((len(images), size, size, cfg.channels), dtype=np.float32)
    for i, item in enumerate(images):
        where = f"image {i}" + (f" ({str(item)!r})" if isinstance(item, (str, os.PathLike)) else "")
        img = load_rgb(item, cfg, where)
        img = img.resize((size, size), Image.Resampling.BICUBIC)
        out[i] = np.asarray(img, dtype=np.float32).reshape(size, size, cfg.channels) / 255.0
    mean = np.asarray(cfg.image_mean, dtype=np.float32)
    std = np.asarray(cfg.image_std, dtype=np.float32)
    out = (out - mean) / std
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def check_pixels(pixels: torch.Tensor, cfg: VisionConfig, who: str) -> None:
    """ValueError unless `pixels` is a floating [N, channels, image_size, image_size] tensor."""
    expected = (cfg.channels, cfg.image_size, cfg.image_size)
    if not torch.is_tensor(pixels) or pixels.ndim != 4 or tuple(pixels.shape[1:]) != expected:
        got = tuple(pixels.shape) if torch.is_tensor(pixels) else type(pixels).__name__
        raise ValueError(f"{who}: pixels have shape {got}, expected [N, {', '.join(map(str, expected))}]")
    if not pixels.is_floating_point():
        raise ValueError(f"{who}: pixels have dtype {pixels.dtype}, expected a floating dtype")
