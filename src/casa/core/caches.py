"""What a decoding step needs from a key/value cache: the contract, owned by `core`.

The blocks' incremental paths (`Block.step`, `Attention.step`,
`FusionLayer.step`) and the one-call block plan (`core.decode.BlockSteps`)
read and write caches that live in `casa.inference` (`KVCache` for one
stream, `rows.RowCache` for batched rows). `core` cannot import them (it
sits below `inference`), so it states here what it calls; the caches declare
that they implement it by subclassing these protocols, and a type checker
(or a reader) sees the seam.

Design decisions:
- Two protocols, because two kinds of step use a cache: `StepCache` is what
  every PyTorch step calls (append and attend, read a window's prefix);
  `RowWriter` adds the in-place row API of the kernel path: the kernel
  writes one decoded token's key/value straight into the cache's buffers,
  so it needs their pointers, the row to write and how many rows to attend.
- No `runtime_checkable`: `isinstance` against a protocol with data members
  walks its members, and the kernel path asks once per token and layer
  (`core.decode._cache_takes` tests the one attribute it needs).

Shapes: keys/values handed out are head-major `[1, Hkv, S, D]` (`B` rows for
a `RowCache`); what a step appends is token-major `[1, t, Hkv, D]`.
"""

from __future__ import annotations

from typing import Protocol

import torch

__all__ = ["RowWriter", "StepCache"]


class StepCache(Protocol):
    """A cache a PyTorch step appends to and attends over."""

    def extend(self, k: torch.Tensor, v: torch.Tensor):
        """Append `t` tokens' `k, v: [B, t, Hkv, D]`; return `(keys, values, mask)` their queries
        attend to: keys/values `[B, Hkv, S, D]`, mask None (all visible) or bool `[t, S]`
        (`[B, 1, t, S]` for rows)."""
        ...

    def prefix_keys(self):
        """`(keys, values, mask)` of a window's image prefix alone (the `ca` family reads it
        without joining it), or `(None, None, None)` when the window holds none."""
        ...


class RowWriter(StepCache, Protocol):
    """A one-stream cache the kernel path writes one token's row into, in place."""

    k: torch.Tensor | None  # [1, Hkv, capacity, D] (int8 when quantized)
    v: torch.Tensor | None
    k_scale: torch.Tensor | None  # quantized: [1, Hkv, capacity] fp32, else None
    v_scale: torch.Tensor | None
    quantized: bool
    dtype: torch.dtype | None  # the entries' dtype (None before the first)
    n_prefix: int  # always-visible entries at the front (a window's image K/V)
    n_slots: int  # token entries held after the prefix

    def next_row(self, like: torch.Tensor, *, heads: int, width: int) -> tuple[int, int]:
        """`(row, held)`: write the next token's key/value at `row`, attend rows `[0, held)`;
        then `commit_row()`. Until then the cache is unchanged but for spare capacity."""
        ...

    def commit_row(self) -> None:
        """Count the row written at `next_row()` as held."""
        ...
