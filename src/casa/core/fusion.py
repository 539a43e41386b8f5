"""Fusion layers: how text queries read image tokens (docs/design.md §3).

One class covers every variant but `insertion` (which needs no layer, only a
spliced stream). The variant decides three things:

- whose projections: its own (`ca`, `casa`, `ca_ffn`, `gated_ca`) or the
  block's SA (`ca_shared`, `casa_shared`, passed in at call time so that the
  weights exist once in the state dict);
- which keys: the window's image tokens only (`ca*`, and `casa` with
  `text_keys=False`), or images then the window's text up to the query
  (`casa`), in one softmax;
- positions: `casa` applies RoPE to text and gives each image key the position
  of its insertion point; `ca` has no positional encoding. Hence `casa`
  without text keys computes exactly `ca`.

`gated_ca` (Flamingo) adds tanh gates, initialised at 0, on the attention and
on a fusion-owned FFN.

Design decisions:
- The shared variants get the block's SA module as an argument at every call
  (`sa=`) instead of holding a reference, so the state dict has one copy of
  those weights and no module appears twice in the module tree.
- The image K/V are computed once per image and layer (`image_kv`), in the
  forward and when a stream's frame arrives; queries never recompute them.
- `forward` (whole batch) and `step` (new tokens of one stream) share the
  projections and the gate; they differ only in the attention call
  (`fusion_attend` vs `cached_attend`).
- `probe` is an optional observer for analysis (`study/gating.py`); it sees
  queries and keys and cannot change the output.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from casa.config import FusionConfig, LMConfig
from casa.core.attention import cached_attend, fusion_attend
from casa.core.caches import StepCache
from casa.core.layout import Layout
from casa.core.lm import MLP, Attention, RMSNorm, Rotary

__all__ = ["FusionLayer"]


class FusionLayer(nn.Module):
    """How text queries of a block read image tokens (see the module docstring).

    Shapes: text states `[B, T, d]`, flat image tokens `[N_tok, d]`, keys and
    values `[..., Hkv, D]`; the parameters' float dtype throughout.
    """

    def __init__(self, *, lm: LMConfig, fusion: FusionConfig, own_norm: bool):
        super().__init__()
        self.variant = fusion.variant
        self.text_keys = fusion.uses_text_keys
        self.probe = None  # optional callable(q, k_txt, k_img, layout, text_keys): analysis (gating.py)
        self.positional = self.text_keys  # RoPE only where text keys give it a meaning
        self.norm = RMSNorm(dim=lm.d_model, eps=lm.norm_eps) if own_norm else None
        self.attn = None
        if not fusion.shares_sa_projections:
            self.attn = Attention(d_model=lm.d_model, n_heads=lm.n_heads, n_kv_heads=lm.n_kv_heads,
                                  head_dim=lm.head_dim, qkv_bias=lm.qkv_bias)
        if self.variant == "gated_ca":
            self.attn_gate = nn.Parameter(torch.zeros(1))
            self.ffn_gate = nn.Parameter(torch.zeros(1))
            self.ffn_norm = RMSNorm(dim=lm.d_model, eps=lm.norm_eps)
            self.ffn = MLP(d_model=lm.d_model, d_ff=lm.d_ff)

    def init_from_block(self, block) -> None:
        """Start as a copy of the block's SA (and norms, and FFN with closed gates for gated_ca)."""
        if self.attn is not None:
            self.attn.load_state_dict(block.attn.state_dict())
        if self.norm is not None:
            self.norm.load_state_dict(block.input_layernorm.state_dict())
        if self.variant == "gated_ca":
            self.ffn.load_state_dict(block.mlp.state_dict())
            self.ffn_norm.load_state_dict(block.post_attention_layernorm.state_dict())
            # closed gates are part of the construction (a model built on the meta device has no init yet)
            self.attn_gate.zero_()
            self.ffn_gate.zero_()

    def image_kv(self, image_tokens, *, norm: nn.Module, sa: Attention, image_rotary: Rotary | None):
        """Keys/values of flat image tokens.

        Args:
            image_tokens: `[N_tok, d]`.
            norm: the input norm to apply (own, or the block's for `replace`).
            sa: the block's SA (its projections serve the shared variants).
            image_rotary: RoPE at each token's position, `[N_tok]` (`casa` only; None otherwise).
        Returns:
            `(k, v)`, each `[N_tok, Hkv, D]`.
        """
        attn = self.attn if self.attn is not None else sa
        k, v = attn.kv(norm(image_tokens))
        if self.positional:
            k = image_rotary.apply(k)
        return k, v

    def forward(self, h, image_kv, *, norm: nn.Module, sa: Attention, rotary: Rotary, layout: Layout,
                backend: str):
        """Residual update of text states from the window's image K/V (and text).

        Args:
            h: `[B, T, d]` text states (before the norm).
            image_kv: `(k, v)` of all image tokens, each `[N_tok, Hkv, D]` (from `image_kv`).
            rotary: RoPE at the text positions, `[B, T]`.
            layout: the batch's windows.
        Returns:
            `[B, T, d]`: the update (zero for a query whose window has no key).
        """
        attn = self.attn if self.attn is not None else sa
        x = norm(h)
        q = attn.q(x)
        k_txt = v_txt = None
        if self.text_keys:
            k_txt, v_txt = attn.kv(x)
        if self.positional:
            q, k_txt = rotary.apply(q), rotary.apply(k_txt)
        k_img, v_img = image_kv
        if self.probe is not None:
            self.probe(q, k_txt, k_img, layout, self.text_keys)
        out = attn.out(fusion_attend(q, k_txt, v_txt, k_img, v_img, layout,
                                     text_keys=self.text_keys, backend=backend))
        return self._gate(h, out)

    def _gate(self, h, out):
        if self.variant == "gated_ca":
            out = torch.tanh(self.attn_gate) * out
            out = out + torch.tanh(self.ffn_gate) * self.ffn(self.ffn_norm(h + out))
        return out

    def step(self, h, window: StepCache, *, norm: nn.Module, sa: Attention, rotary: Rotary):
        """Residual update of new text states of one stream from its window state.

        Args:
            h: `[1, t, d]` states of the new tokens.
            window: a `KVCache` whose prefix is the window's image K/V; `casa`
                appends the new tokens' K/V to it.
            rotary: RoPE at the new tokens' positions, `[1, t]`.
        Returns:
            `[1, t, d]`, as `forward` would give for these tokens.
        """
        attn = self.attn if self.attn is not None else sa
        if self.text_keys:  # the window's text joins its keys: a cached attention step over the window
            return self._gate(h, attn.step(h, norm=norm, rotary=rotary if self.positional else None, cache=window))
        q = attn.q(norm(h))
        keys, values, mask = window.prefix_keys()
        if keys is None:  # no image in this window: zero update, as in forward()
            return self._gate(h, torch.zeros_like(h))
        return self._gate(h, attn.out(cached_attend(q, keys, values, mask=mask)))
