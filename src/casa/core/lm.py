"""Llama / Qwen2-family building blocks: RMSNorm, RoPE, attention, SwiGLU.

Design decisions:
- Parameter names follow Hugging Face (`q_proj`, `gate_proj`, ...) so that
  checkpoint loading is a rename of prefixes, not of every tensor.
- RoPE uses the "rotate half" convention of those checkpoints and is computed
  from explicit positions, so text positions can skip image tokens.
- Projections return token-major heads (`[..., H, D]`): every attention entry
  point of `core/attention.py` takes that layout.
- RMSNorm computes in fp32 and casts back before the weight, as HF does, so
  bf16 logits match transformers'.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from casa.core.attention import cached_attend, causal_attend
from casa.core.layout import Layout

__all__ = ["MLP", "Attention", "RMSNorm", "Rotary"]


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dim, with a learned scale; shape and dtype preserved."""

    def __init__(self, *, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


@dataclass
class Rotary:
    """cos/sin of RoPE for a set of positions, `[..., head_dim]`."""

    cos: torch.Tensor
    sin: torch.Tensor

    @classmethod
    def at(cls, positions: torch.Tensor, *, head_dim: int, theta: float, dtype=torch.float32) -> "Rotary":
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
        angles = positions.float()[..., None] * inv_freq
        angles = torch.cat([angles, angles], dim=-1)
        return cls(angles.cos().to(dtype), angles.sin().to(dtype))

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate `x: [..., H, D]` whose leading dims match the positions'."""
        cos, sin = self.cos[..., None, :].to(x.dtype), self.sin[..., None, :].to(x.dtype)  # as HF does
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention(nn.Module):
    """q/k/v/o projections with grouped-query heads; `forward` is causal text SA.

    Fusion layers reuse this class for their own projections (so that they
    can be initialised by copying a block's SA), and the `_shared` variants
    reuse the block's instance itself.
    """

    def __init__(self, *, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int, qkv_bias: bool = False):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.q_proj = nn.Linear(d_model, n_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(n_heads * head_dim, d_model, bias=False)

    def q(self, x):
        """Queries `[..., d] -> [..., H, D]`."""
        return rearrange(self.q_proj(x), "... (h d) -> ... h d", h=self.n_heads)

    def kv(self, x):
        """Keys and values `[..., d] -> 2 x [..., Hkv, D]`."""
        k = rearrange(self.k_proj(x), "... (h d) -> ... h d", h=self.n_kv_heads)
        v = rearrange(self.v_proj(x), "... (h d) -> ... h d", h=self.n_kv_heads)
        return k, v

    def out(self, o):
        """Output projection of attended heads `[..., H, D] -> [..., d]`."""
        return self.o_proj(rearrange(o, "... h d -> ... (h d)"))

    def forward(self, x, *, rotary: Rotary, layout: Layout, backend: str):
        """Causal SA within each packed document: normed states `x: [B, T, d]`
        (RoPE at `[B, T]` positions) -> `[B, T, d]`."""
        q = rotary.apply(self.q(x))
        k, v = self.kv(x)
        k = rotary.apply(k)
        return self.out(causal_attend(q, k, v, layout, backend=backend))

    def step(self, x, *, rotary: Rotary, cache, backend: str):
        """Causal SA of new tokens of one stream against its cache, which they join.

        Args:
            x: `[1, t, d]` normed states of the new tokens; `rotary` at `[1, t]` positions.
            cache: an `inference.cache.KVCache` (the new keys/values are appended).
        Returns:
            `[1, t, d]`.
        """
        q = rotary.apply(self.q(x))
        k, v = self.kv(x)
        keys, values, mask = cache.extend(rotary.apply(k), v)
        return self.out(cached_attend(q, keys, values, mask=mask, backend=backend))


class MLP(nn.Module):
    """SwiGLU feed-forward: `down(silu(gate(x)) * up(x))`, `[..., d] -> [..., d]`."""

    def __init__(self, *, d_model: int, d_ff: int):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_ff, bias=False)
        self.up_proj = nn.Linear(d_model, d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
