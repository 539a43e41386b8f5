"""Llama / Qwen2-family building blocks: RMSNorm, RoPE, attention, SwiGLU.

Design decisions:
- Parameter names follow Hugging Face (`q_proj`, `gate_proj`, ...) so that
  checkpoint loading is a rename of prefixes, not of every tensor.
- RoPE uses the "rotate half" convention of those checkpoints and is computed
  from explicit positions, so text positions can skip image tokens.
- Projections return token-major heads (`[..., H, D]`): every attention entry
  point of `core/attention.py` takes that layout.
- Multimodal RoPE (Qwen2.5-VL's M-RoPE, docs/design.md §5) is the same
  rotation with 3-component positions `(t, h, w)`: `mrope_section` splits the
  frequencies into three runs, each rotated by one component. With equal
  components (text) it is exactly 1-D RoPE.
- RMSNorm computes in fp32 and casts back before the weight, as HF does, so
  bf16 logits match transformers'.
- Plain PyTorch throughout: the reference the kernel path of `core/decode.py`
  is tested against. Only the projections ask `core.decode` for their packed
  layouts while a stream decodes (`use_packed`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from casa.core.attention import cached_attend, causal_attend
from casa.core.caches import StepCache
from casa.core.decode import packed_linear, packed_swiglu, use_packed
from casa.core.layout import Layout

__all__ = ["MLP", "Attention", "RMSNorm", "Rotary", "mrope_angles"]


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
    def at(cls, positions: torch.Tensor, *, head_dim: int, theta: float, dtype=torch.float32,
           mrope_section: tuple[int, ...] | list[int] | None = None) -> "Rotary":
        """RoPE at long `positions`: any shape `[...]`, or `[..., 3]` (t, h, w) with `mrope_section`
        (frequency counts per component, adding up to head_dim / 2); cos/sin `[..., head_dim]`."""
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
        if mrope_section is None:
            angles = positions.float()[..., None] * inv_freq
        else:
            angles = mrope_angles(positions, inv_freq, mrope_section)
        angles = torch.cat([angles, angles], dim=-1)
        return cls(angles.cos().to(dtype), angles.sin().to(dtype))

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate `x: [..., H, D]` whose leading dims match the positions'."""
        cos, signed_sin = self.tables(x.dtype)
        # HF's rotate_half(x) * sin is roll(x, D/2) * [-sin, sin] (the halves of sin are equal):
        # the same products, in three ops instead of six (a decode step applies this 2-4x per layer)
        return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin

    def tables(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """`(cos, [-sin, sin])` as `[..., 1, D]` in `dtype` (cast as HF does), built once per dtype:
        every layer applies the same positions."""
        tables = self.__dict__.setdefault("_by_dtype", {})
        if dtype not in tables:
            half = self.sin.shape[-1] // 2
            signed = torch.cat([-self.sin[..., :half], self.sin[..., half:]], dim=-1)
            tables[dtype] = (self.cos[..., None, :].to(dtype), signed[..., None, :].to(dtype))
        return tables[dtype]


def mrope_angles(positions: torch.Tensor, inv_freq: torch.Tensor, mrope_section) -> torch.Tensor:
    """M-RoPE angles: frequency j turns with component `c(j)` of the position, where the
    components own consecutive runs of frequencies (`mrope_section`, e.g. t 16, h 24, w 24).

    Args:
        positions: `[..., 3]` long (t, h, w).
        inv_freq: `[head_dim / 2]` float.
    Returns:
        `[..., head_dim / 2]` fp32.
    """
    if positions.shape[-1] != 3:
        raise ValueError(f"M-RoPE: positions of shape {tuple(positions.shape)}, expected [..., 3] (t, h, w)")
    if sum(mrope_section) != inv_freq.numel():
        raise ValueError(f"M-RoPE: mrope_section {list(mrope_section)} does not add up to {inv_freq.numel()}")
    component = torch.repeat_interleave(torch.arange(len(mrope_section), device=inv_freq.device) % 3,
                                        torch.tensor(list(mrope_section), device=inv_freq.device))
    return positions.float()[..., component] * inv_freq


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
        q = packed_linear(x, self, "q", (self.q_proj,)) if use_packed(x) else self.q_proj(x)
        return self._heads(q, self.n_heads)

    def kv(self, x):
        """Keys and values `[..., d] -> 2 x [..., Hkv, D]`."""
        if use_packed(x):
            k, v = packed_linear(x, self, "kv", (self.k_proj, self.v_proj)).chunk(2, dim=-1)
        else:
            k, v = self.k_proj(x), self.v_proj(x)
        return self._heads(k, self.n_kv_heads), self._heads(v, self.n_kv_heads)

    def qkv(self, x):
        """Queries, keys and values of the same states, `[..., d] -> ([..., H, D], 2 x [..., Hkv, D])`
        (one fused product when decoding, `core.decode`)."""
        if not use_packed(x):
            return (self.q(x), *self.kv(x))
        kv_width = self.n_kv_heads * self.head_dim
        q, k, v = packed_linear(x, self, "qkv", (self.q_proj, self.k_proj, self.v_proj)).split(
            [self.n_heads * self.head_dim, kv_width, kv_width], dim=-1)
        return self._heads(q, self.n_heads), self._heads(k, self.n_kv_heads), self._heads(v, self.n_kv_heads)

    def _heads(self, x, n: int):
        # `[..., (n D)] -> [..., n, D]`; unflatten rather than einops: a decode step makes
        # ~100 of these reshapes, and einops' parsing costs more than the op itself
        return x.unflatten(-1, (n, self.head_dim))

    def out(self, o):
        """Output projection of attended heads `[..., H, D] -> [..., d]`."""
        o = o.flatten(-2)
        return packed_linear(o, self, "o", (self.o_proj,)) if use_packed(o) else self.o_proj(o)

    def forward(self, x, *, rotary: Rotary, layout: Layout, backend: str):
        """Causal SA within each packed document: normed states `x: [B, T, d]`
        (RoPE at `[B, T]` positions) -> `[B, T, d]`."""
        q = rotary.apply(self.q(x))
        k, v = self.kv(x)
        k = rotary.apply(k)
        return self.out(causal_attend(q, k, v, layout, backend=backend))

    def step(self, x, *, norm: nn.Module, rotary: Rotary | None, cache: StepCache):
        """Attention of new tokens of one stream against its cache, which they join (the
        block's causal SA, and `casa`'s fusion layer over its window).

        Args:
            x: `[1, t, d]` states of the new tokens, before `norm`; `rotary` at `[1, t]`
                positions, or None (no RoPE).
            cache: the stream's cache (`core.caches.StepCache`; the new keys/values are appended).
        Returns:
            `[1, t, d]`.
        """
        q, k, v = self.qkv(norm(x))
        if rotary is not None:
            q, k = rotary.apply(q), rotary.apply(k)
        keys, values, mask = cache.extend(k, v)
        return self.out(cached_attend(q, keys, values, mask=mask))


class MLP(nn.Module):
    """SwiGLU feed-forward: `down(silu(gate(x)) * up(x))`, `[..., d] -> [..., d]`."""

    def __init__(self, *, d_model: int, d_ff: int):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_ff, bias=False)
        self.up_proj = nn.Linear(d_model, d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x):
        if use_packed(x):  # decoding: gate and up in one packed product, or all of it in one kernel (core.decode)
            return packed_swiglu(x, self, self.gate_proj, self.up_proj, self.down_proj)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
