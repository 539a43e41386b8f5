"""Batched decode of several streams: one token per stream per step, one forward.

Evaluation decodes many prompts of different lengths and layouts. Each prompt
is prefilled in its own `Session` (so every variant, window and insertion
point is handled by the tested incremental path); then `RowDecoder` gathers
their caches into padded, batched caches and decodes one token of every row
per step through the same `Block.step` code as a single stream.

Design decisions:
- Rows are left where their prompt ended (right-padded caches): row `b`
  holds its `n_b` entries in slots `[0, n_b)` of a `[B, Hkv, capacity, D]`
  buffer and writes its next token at slot `n_b`. A key is visible to a
  row's query iff its slot is below the row's count: with one new token and
  no bounded history, every entry a stream holds is visible to it (the rule
  of `KVCache.extend` for `t == 1`), so padding is the only thing masked.
- A fusion window without any key for a row (`ca` text before the row's
  first image) reads one zero key/value at slot 0: its attention output is
  exactly zero, the update `FusionLayer.step` gives a window without images.
- Positions are per row (each stream's own `Session.position`): RoPE is
  applied at `[B, 1]` positions.
- Rows keep decoding until every row is done (finished rows compute a
  discarded token): the step is one batched forward, and dropping rows would
  copy every cache.
- Unbounded history only (`Session(history=None)`), as evaluation uses.
"""

from __future__ import annotations

import torch

from casa.core.caches import StepCache
from casa.core.decode import decoding
from casa.inference.cache import KVCache
from casa.inference.session import Session

__all__ = ["RowCache", "RowDecoder"]


class RowCache(StepCache):
    """The caches of one layer for `B` streams, padded into one buffer.

    Implements core's `StepCache` contract (`extend`, `prefix_keys`), which `Attention.step`
    and `FusionLayer.step` use for one decoded token of every row.

    Args:
        caches: one `KVCache` per row (unbounded; copied, not modified).
        room: token slots to reserve beyond the longest row.
        n_kv_heads, head_dim: the layer's key/value heads and head size.
        dtype, device: of the buffer (the model's).
    """

    def __init__(self, caches: list[KVCache], *, room: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        if any(c.history is not None for c in caches):
            raise ValueError("RowCache: bounded-history caches are not supported")
        if any(c.quantized for c in caches):  # its new rows would be written unquantized
            raise ValueError("RowCache: int8 caches are not supported")
        self.counts = torch.tensor([c.tokens for c in caches], dtype=torch.long, device=device)  # [B]
        capacity = max(1, int(self.counts.max()) + room)
        # zeros: padding and the zero key/value of a row without any entry (see the module docstring)
        self.k = torch.zeros(len(caches), n_kv_heads, capacity, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        for b, c in enumerate(caches):
            if c.tokens:
                held_k, held_v = c.held()
                self.k[b, :, : c.tokens] = held_k[0]
                self.v[b, :, : c.tokens] = held_v[0]
        self.rows = torch.arange(len(caches), device=device)

    def _visible(self):
        """Keys/values `[B, Hkv, S, D]` up to the longest row, and the mask
        `[B, 1, 1, S]` (None when every row holds `S` entries)."""
        S = max(1, int(self.counts.max()))
        mask = None
        if bool((self.counts != S).any()):
            slots = torch.arange(S, device=self.k.device)
            # a row without any entry sees slot 0, a zero key/value: a zero update
            mask = (slots[None] < self.counts.clamp(min=1)[:, None])[:, None, None]
        return self.k[:, :, :S], self.v[:, :, :S], mask

    def extend(self, k: torch.Tensor, v: torch.Tensor):
        """Append one token per row.

        Args:
            k, v: `[B, 1, Hkv, D]` keys (after RoPE) and values of the new tokens.
        Returns:
            `(keys, values, mask)`: `[B, Hkv, S, D]` views and bool `[B, 1, 1, S]`
            (True = attend) or None.
        """
        if k.shape[1] != 1:
            raise ValueError(f"RowCache.extend: one token per row, got {k.shape[1]}")
        if int(self.counts.max()) >= self.k.shape[2]:
            raise RuntimeError("RowCache.extend: the reserved room is used up")
        self.k[self.rows, :, self.counts] = k[:, 0]
        self.v[self.rows, :, self.counts] = v[:, 0]
        self.counts += 1
        return self._visible()

    def prefix_keys(self):
        """`(keys, values, mask)` of what a window holds (its image K/V; `ca` never
        adds tokens); shapes as `extend`'s."""
        return self._visible()


class RowDecoder:
    """Greedy-style decoding of several prefilled streams, one token per row per step.

    Args:
        sessions: one prefilled `Session` per row, all over the same model and
            without a bounded history (they are not modified).
        max_new_tokens: the most tokens each row will be fed.
    """

    def __init__(self, sessions: list[Session], *, max_new_tokens: int):
        model = sessions[0].model
        self.model, self.decode = model, sessions[0].decode
        lm = model.config.lm
        param = model.embed.weight

        def rows(caches):
            return RowCache(caches, room=max_new_tokens, n_kv_heads=lm.n_kv_heads, head_dim=lm.head_dim,
                            dtype=param.dtype, device=param.device)

        self.sa = [rows([s.sa[i] for s in sessions]) for i in range(len(model.blocks))]
        self.windows = [rows([s.windows[i] for s in sessions]) if block.fusion is not None else None
                        for i, block in enumerate(model.blocks)]
        self.positions = torch.tensor([s.position for s in sessions], dtype=torch.long, device=param.device)

    @torch.inference_mode()
    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """Feed one token per row.

        Args:
            ids: `[B]` long, the next token of each row.
        Returns:
            `[B, vocab]` logits, the model's dtype.
        """
        h = self.model.embed(ids.to(self.positions.device))[:, None]  # [B, 1, d]
        rotary = self.model.text_rotary(self.positions[:, None])  # [B, 1]
        with decoding(self.decode):  # packed weight layouts (core/decode.py), the sessions' path
            for block, sa, window in zip(self.model.blocks, self.sa, self.windows):
                h = block.step(h, rotary=rotary, sa_cache=sa, window=window)
        self.positions += 1
        return self.model.lm_head(self.model.norm(h))[:, 0]
