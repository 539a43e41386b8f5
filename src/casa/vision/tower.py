"""The vision tower: an encoder, token reduction and a projector.

Design decisions:
- Two encoders behind one interface (`forward(pixels) -> [N, grid*grid, width]`,
  `out_width`, `blocks`, `tail_modules()`): the built-in `ViT` and
  `casa.vision.hf.HFVisionEncoder` (transformers SigLIP / CLIP / Qwen2.5-VL).
  The config is the single source of truth: for kind="hf",
  `vision_config_from_hf` fills it from the directory, and `HFVisionEncoder`
  refuses a config that disagrees with the checkpoint.
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

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange, reduce

from casa.config import VisionConfig
from casa.vision.vit import ViT

__all__ = ["Projector", "VisionTower", "make_projector", "reduce_tokens", "reduced_width"]


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


def make_projector(cfg: VisionConfig, *, in_dim: int, out_dim: int) -> nn.Module:
    """The config's projector: a fresh `Projector`, or identity for an encoder whose output already
    is the LM's input (Qwen2.5-VL's merger with its own LM; ValueError if the widths differ)."""
    if cfg.projector == "identity":
        if in_dim != out_dim:
            raise ValueError(f"VisionConfig.projector='identity': encoder width {in_dim} != LM width {out_dim}")
        return nn.Identity()
    return Projector(in_dim=in_dim, out_dim=out_dim)


class VisionTower(nn.Module):
    """Encoder + token reduction + projector: pixels [N, C, S, S] -> [N, tokens_per_image, lm_d_model]."""

    def __init__(self, cfg: VisionConfig, *, lm_d_model: int):
        super().__init__()
        self.cfg = cfg
        self.n_tokens = cfg.tokens_per_image  # validates grid vs reduction_factor early
        if cfg.kind == "vit":
            self.encoder = ViT(cfg)
        else:
            from casa.vision.hf import HFVisionEncoder

            self.encoder = HFVisionEncoder(cfg)
        self.reduced_width = reduced_width(self.encoder.out_width, cfg.token_reduction, cfg.reduction_factor)
        self.projector = make_projector(cfg, in_dim=self.reduced_width, out_dim=lm_d_model)

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

    def encode_items(self, items: list[torch.Tensor]) -> list[torch.Tensor]:
        """Dynamic resolution: images `[C, H, W]` / videos `[F, C, H, W]` -> per item `[n_i, lm_d_model]`
        (n_i = gt * gh * gw, `vision.dynamic.grid_of`)."""
        if self.cfg.token_reduction != "none":
            raise ValueError("VisionTower: token_reduction needs fixed-size images (no dynamic resolution)")
        if not hasattr(self.encoder, "encode_items"):
            raise ValueError("VisionTower: the built-in ViT takes fixed-size images only")
        parts = self.encoder.encode_items(items)
        return list(self.projector(torch.cat(parts)).split([len(p) for p in parts]))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.encoder(pixels)
        x = reduce_tokens(x, self.cfg.token_reduction, self.cfg.reduction_factor)
        if x.shape[1] != self.n_tokens:
            raise ValueError(f"VisionTower: encoder gave {x.shape[1]} tokens, config expects {self.n_tokens}")
        return self.projector(x)
