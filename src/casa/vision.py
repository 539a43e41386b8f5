"""The image side: preprocessing, an encoder, token reduction, a projector.

Design decisions:
- Preprocessing is Pillow + numpy + torch only: convert to RGB, one bicubic
  resize straight to `image_size` x `image_size` (no crop, aspect ratio is not
  kept), scale to [0, 1], normalise with the config's mean / std.
- Two encoders behind one interface (`forward(pixels) -> [N, grid*grid, width]`,
  `out_width`, `blocks`, `tail_modules()`): the small pre-norm `ViT` for
  from-scratch training on CPU, and `hf_vision.HFVisionEncoder`, which wraps a
  transformers SigLIP / CLIP / Qwen2.5-VL vision model read from a local
  directory (re-exported here). The config is the single source of truth: for
  kind="hf", `vision_config_from_hf` fills it from the directory, and
  `HFVisionEncoder` refuses a config that disagrees with the checkpoint.
- Freezing "all but the last k blocks" (`VisionTower.freeze_encoder`) keeps
  trainable what follows those blocks on the way to the output (the final
  norm, Qwen2.5-VL's merger) and the projector.
- Token reduction treats the patches as a g x g grid and works on r x r groups:
  "unshuffle" concatenates them (space-to-depth, width r*r*d, lossless), "pool"
  averages them (width d).
- `Projector` is a 2-layer GELU MLP from the reduced width to the LM width.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange, reduce
from PIL import Image

from .config import VisionConfig

# -----------------------------------------------------------------------------
# preprocessing


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


def preprocess(images, cfg: VisionConfig) -> torch.Tensor:
    """Images (list of PIL images, uint8 HxWxC arrays or paths) -> float32 [N, C, S, S]."""
    if isinstance(images, (Image.Image, str, os.PathLike)) or (isinstance(images, np.ndarray) and images.ndim < 4):
        images = [images]
    images = list(images)
    if not images:
        raise ValueError("preprocess: got no images")
    modes = {3: "RGB", 1: "L"}
    if cfg.channels not in modes:
        raise ValueError(f"preprocess: channels={cfg.channels} is not supported, expected 1 or 3")
    if len(cfg.image_mean) != cfg.channels or len(cfg.image_std) != cfg.channels:
        raise ValueError(f"preprocess: image_mean / image_std must have {cfg.channels} entries")
    size = cfg.image_size
    out = np.empty((len(images), size, size, cfg.channels), dtype=np.float32)
    for i, item in enumerate(images):
        where = f"image {i}" + (f" ({str(item)!r})" if isinstance(item, (str, os.PathLike)) else "")
        img = _load_image(item, where).convert(modes[cfg.channels])
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


# -----------------------------------------------------------------------------
# the built-in ViT


class Attention(nn.Module):
    """Non-causal multi-head self-attention."""

    def __init__(self, *, d_model: int, n_heads: int):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"Attention: d_model={d_model} is not divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x), "n t (three h d) -> three n h t d", three=3, h=self.n_heads)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=False)
        return self.proj(rearrange(y, "n h t d -> n t (h d)"))


class MLP(nn.Module):
    def __init__(self, *, d_model: int, d_ff: int):
        super().__init__()
        self.fc = nn.Linear(d_model, d_ff)
        self.proj = nn.Linear(d_ff, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class ViTBlock(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, *, d_model: int, n_heads: int, d_ff: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d_model)
        self.attn = Attention(d_model=d_model, n_heads=n_heads)
        self.ln_2 = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model=d_model, d_ff=d_ff)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


def sincos_positions(grid: int, width: int) -> torch.Tensor:
    """2-D sin-cos position table `[grid * grid, width]` (x then y, zero-padded).

    The built-in ViT starts its learned positions here: from a small random
    init, a ViT trained from scratch takes thousands of steps to tell where
    things are (left/right questions are not learned in the demo's budget);
    from sin-cos, spatial questions are learned about as fast as colour.
    """
    ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(width // 4) / (width // 4))
    parts = []
    for v in (xs.flatten(), ys.flatten()):
        angle = v[:, None].float() * omega[None]
        parts += [angle.sin(), angle.cos()]
    table = torch.cat(parts, 1)
    return torch.cat([table, table.new_zeros(grid * grid, width - table.shape[1])], 1)


class ViT(nn.Module):
    """Small pre-norm ViT: linear patch embedding, learned positions, blocks, final LayerNorm."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        p, c, d = cfg.patch_size, cfg.channels, cfg.d_model
        self.patch_embed = nn.Linear(p * p * c, d)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.grid * cfg.grid, d))
        self.blocks = nn.ModuleList(
            [ViTBlock(d_model=d, n_heads=cfg.n_heads, d_ff=cfg.d_ff) for _ in range(cfg.n_layers)]
        )
        self.ln_f = nn.LayerNorm(d)
        self.apply(self._init_weights)
        with torch.no_grad():
            self.pos_embed.copy_(sincos_positions(cfg.grid, d)[None])

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)

    @property
    def out_width(self) -> int:
        return self.cfg.d_model

    def tail_modules(self) -> list[nn.Module]:
        return [self.ln_f]

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """[N, C, S, S] -> [N, grid*grid, d_model]."""
        check_pixels(pixels, self.cfg, "ViT")
        p = self.cfg.patch_size
        x = rearrange(pixels, "n c (h p1) (w p2) -> n (h w) (p1 p2 c)", p1=p, p2=p)
        x = self.patch_embed(x) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)


# -----------------------------------------------------------------------------
# token reduction, projector, tower


def reduce_tokens(x: torch.Tensor, mode: str, r: int) -> torch.Tensor:
    """[N, g*g, d] -> [N, (g/r)^2, d'] with d' = r*r*d ("unshuffle"), d ("pool") or unchanged ("none")."""
    if mode == "none":
        return x
    g = math.isqrt(x.shape[1])
    if g * g != x.shape[1]:
        raise ValueError(f"reduce_tokens: {x.shape[1]} tokens do not form a square grid")
    if g % r:
        raise ValueError(f"reduce_tokens: patch grid {g} is not divisible by reduction_factor={r}")
    pattern = "n (h r1 w r2) d -> n (h w)"
    if mode == "unshuffle":
        return rearrange(x, pattern + " (r1 r2 d)", h=g // r, w=g // r, r1=r, r2=r)
    if mode == "pool":
        return reduce(x, pattern + " d", "mean", h=g // r, w=g // r, r1=r, r2=r)
    raise ValueError(f"reduce_tokens: mode={mode!r}, expected 'none', 'unshuffle' or 'pool'")


def reduced_width(width: int, mode: str, r: int) -> int:
    """Token width after `reduce_tokens`."""
    return width * r * r if mode == "unshuffle" else width


class Projector(nn.Module):
    """Linear -> GELU -> Linear, from the vision width to the LM width."""

    def __init__(self, *, in_dim: int, out_dim: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or out_dim
        self.fc = nn.Linear(in_dim, hidden)
        self.proj = nn.Linear(hidden, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class VisionTower(nn.Module):
    """Encoder + token reduction + projector: pixels [N, C, S, S] -> [N, tokens_per_image, lm_d_model]."""

    def __init__(self, cfg: VisionConfig, *, lm_d_model: int):
        super().__init__()
        self.cfg = cfg
        self.n_tokens = cfg.tokens_per_image  # validates grid vs reduction_factor early
        if cfg.kind == "vit":
            self.encoder = ViT(cfg)
        else:
            from .hf_vision import HFVisionEncoder

            self.encoder = HFVisionEncoder(cfg)
        self.reduced_width = reduced_width(self.encoder.out_width, cfg.token_reduction, cfg.reduction_factor)
        self.projector = Projector(in_dim=self.reduced_width, out_dim=lm_d_model)

    @property
    def out_width(self) -> int:
        """Width of the encoder's features (before reduction and projection)."""
        return self.encoder.out_width

    def encoder_blocks(self) -> list[nn.Module]:
        """The encoder's transformer blocks, first to last (e.g. to freeze all but the last k)."""
        return list(self.encoder.blocks)

    def trainable_tail(self, k: int) -> list[nn.Module]:
        """The last `k` encoder blocks and, if k > 0, the modules after them on the output path."""
        if k <= 0:
            return []
        return self.encoder_blocks()[-k:] + list(self.encoder.tail_modules())

    def freeze_encoder(self, k: int) -> None:
        """Encoder frozen but its last `k` blocks (and what follows them); k < 0: all trainable.
        The projector is never frozen here."""
        if k < 0:
            self.encoder.requires_grad_(True)
            return
        self.encoder.requires_grad_(False)
        for module in self.trainable_tail(k):
            module.requires_grad_(True)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.encoder(pixels)
        x = reduce_tokens(x, self.cfg.token_reduction, self.cfg.reduction_factor)
        if x.shape[1] != self.n_tokens:
            raise ValueError(f"VisionTower: encoder gave {x.shape[1]} tokens, config expects {self.n_tokens}")
        return self.projector(x)


def __getattr__(name):  # HF adapters live in hf_vision (imports transformers lazily)
    if name in ("HFVisionEncoder", "vision_config_from_hf", "HF_MODEL_TYPES", "load_vision_weights"):
        from . import hf_vision

        return getattr(hf_vision, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
