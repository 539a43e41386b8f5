"""The built-in vision transformer, for from-scratch training on CPU.

Design decisions:
- A small pre-norm ViT with 2-D sin-cos initial positions.
- It honours the encoder interface shared with `casa.vision.hf.HFVisionEncoder`:
  `forward(pixels [N, C, S, S]) -> [N, grid*grid, width]`, `out_width`,
  `blocks`, `tail_modules()`.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from casa.config import VisionConfig
from casa.vision.preprocess import check_pixels

__all__ = ["MLP", "Attention", "ViT", "ViTBlock", "sincos_positions"]


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
