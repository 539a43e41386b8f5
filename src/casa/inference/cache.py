"""Key/value caches for incremental inference (docs/design.md §5), one stream.

One class, `KVCache`, serves every cache of a `Session`:

- a block's self-attention cache: text tokens only for the fused variants,
  text and image tokens for `insertion`;
- a fusion layer's window state: the window's image K/V as an always-visible
  *prefix* (written once, when the images arrive), then, for `casa`, the
  window's text K/V so far as tokens. `reset()` starts a new window.

Keys are stored after RoPE, at their original positions, and never rotated
again.

Bounded history (`History(sink, window)`, an option): a token at absolute
index `q` sees the prefix, the first `sink` tokens (the attention sink) and
the `window` most recent tokens, itself included; nothing else is kept. The
window part is a ring buffer, so memory is constant once it is full and no
token is ever copied to evict another. The rule is exact whatever the chunk
size: a chunk of `t` tokens is attended with an explicit mask over
`[kept tokens ; chunk]` before the chunk is written, so chunked prefill and
token-by-token decode give the same result. Positions are not recycled: a
query far into a stream sees the sink at its true, large distance (unlike
StreamingLLM, which re-numbers positions inside the cache); that keeps keys
valid after eviction and costs nothing per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class History:
    """Attention sink + sliding window over a text cache."""

    sink: int = 4
    window: int = 1024

    def __post_init__(self):
        if self.sink < 0:
            raise ValueError(f"History.sink={self.sink}: must be >= 0")
        if self.window < 1:
            raise ValueError(f"History.window={self.window}: must be >= 1")


class KVCache:
    """Keys/values of one attention layer: a prefix, then tokens.

    Stored head-major, `[1, Hkv, capacity, D]`, so that the keys of a step are
    a strided view that SDPA reads in place (token-major storage would be
    copied by every decode step). `extend` and `add_prefix` take token-major
    `[1, t, Hkv, D]`, as the projections produce them.
    """

    def __init__(self, *, history: History | None = None):
        self.history = history
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.n_prefix = 0  # always-visible entries at the front (a window's image tokens)
        self.n_slots = 0  # token entries held after the prefix
        self.seen = 0  # tokens ever appended: the absolute index of the next one
        self.slot_abs: torch.Tensor | None = None  # bounded: absolute index held by each token slot

    # ------------------------------------------------------------ accounting
    @property
    def tokens(self) -> int:
        """Entries held (prefix + tokens)."""
        return self.n_prefix + self.n_slots

    @property
    def nbytes(self) -> int:
        """Bytes of the keys and values held (not of the spare capacity)."""
        if self.k is None:
            return 0
        per_entry = self.k[0, :, 0].numel() * self.k.element_size()
        return 2 * self.tokens * per_entry

    @property
    def allocated_bytes(self) -> int:
        return 0 if self.k is None else 2 * self.k.numel() * self.k.element_size()

    # -------------------------------------------------------------- storage
    def _reserve(self, k: torch.Tensor, size: int) -> None:
        """Room for `size` entries (amortised doubling; a bounded cache grows only
        up to prefix + sink + window)."""
        if self.k is not None and self.k.shape[2] >= size:
            return
        cap = size if self.k is None else max(size, 2 * self.k.shape[2])
        if self.history is not None:
            cap = max(size, min(cap, self.n_prefix + self.history.sink + self.history.window))
        new_k = k.new_empty(1, k.shape[2], cap, k.shape[3])
        new_v = k.new_empty(1, k.shape[2], cap, k.shape[3])
        if self.k is not None and self.tokens:
            new_k[:, :, : self.tokens] = self.k[:, :, : self.tokens]
            new_v[:, :, : self.tokens] = self.v[:, :, : self.tokens]
        self.k, self.v = new_k, new_v

    def reset(self) -> None:
        """Forget everything (a new window); the buffer is kept for reuse."""
        self.n_prefix = self.n_slots = self.seen = 0
        self.slot_abs = None

    def add_prefix(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append always-visible entries (image K/V); only before any token."""
        if self.seen:
            raise RuntimeError("KVCache.add_prefix: tokens were already appended; reset() first")
        n = k.shape[1]
        self._reserve(k, self.n_prefix + n)
        self.k[:, :, self.n_prefix : self.n_prefix + n] = k.transpose(1, 2)
        self.v[:, :, self.n_prefix : self.n_prefix + n] = v.transpose(1, 2)
        self.n_prefix += n

    def prefix(self):
        """`(keys, values)` of the prefix alone, `[1, Hkv, P, D]` (None when empty)."""
        if not self.n_prefix:
            return None, None
        return self.k[:, :, : self.n_prefix], self.v[:, :, : self.n_prefix]

    # --------------------------------------------------------------- append
    def extend(self, k: torch.Tensor, v: torch.Tensor):
        """Append `t` tokens `[1, t, Hkv, D]`; return `(keys, values, mask)` for
        their queries: keys/values `[1, Hkv, S, D]`; mask None when every key is
        visible to every query, else a boolean `[t, S]` (True = attend)."""
        if self.history is None:
            return self._extend_full(k, v)
        return self._extend_bounded(k, v)

    def _extend_full(self, k, v):
        t, start = k.shape[1], self.tokens
        self._reserve(k, start + t)
        self.k[:, :, start : start + t] = k.transpose(1, 2)
        self.v[:, :, start : start + t] = v.transpose(1, 2)
        before = self.n_slots
        self.n_slots += t
        self.seen += t
        keys, values = self.k[:, :, : self.tokens], self.v[:, :, : self.tokens]
        if t == 1:
            return keys, values, None
        col = torch.arange(self.n_slots, device=k.device)
        row = torch.arange(t, device=k.device)
        token_part = col[None, :] <= before + row[:, None]
        prefix_part = torch.ones(t, self.n_prefix, dtype=torch.bool, device=k.device)
        return keys, values, torch.cat([prefix_part, token_part], dim=1)

    def _slot(self, a: torch.Tensor) -> torch.Tensor:
        s, w = self.history.sink, self.history.window
        return torch.where(a < s, a, s + (a - s) % w)

    def _write(self, k, v, absolute: torch.Tensor) -> None:
        """Write tokens at `absolute` indices into their slots (sink or ring)."""
        slots = self._slot(absolute)
        self.k[:, :, self.n_prefix + slots] = k.transpose(1, 2)
        self.v[:, :, self.n_prefix + slots] = v.transpose(1, 2)
        self.slot_abs[slots] = absolute

    def _extend_bounded(self, k, v):
        s, w = self.history.sink, self.history.window
        t, dev = k.shape[1], k.device
        self._reserve(k, self.n_prefix + min(self.seen + t, s + w))
        if self.slot_abs is None:
            self.slot_abs = torch.full((s + w,), -1, dtype=torch.long, device=dev)
        absolute = torch.arange(self.seen, self.seen + t, device=dev)
        if t == 1:
            # the slot overwritten (if any) holds the one token this query no longer sees
            self._write(k, v, absolute)
            self.seen += 1
            self.n_slots = min(self.seen, s + w)
            return self.k[:, :, : self.tokens], self.v[:, :, : self.tokens], None
        held_k, held_v = self.k[:, :, : self.tokens], self.v[:, :, : self.tokens]
        keys = torch.cat([held_k, k.transpose(1, 2)], dim=2)
        values = torch.cat([held_v, v.transpose(1, 2)], dim=2)
        key_abs = torch.cat([self.slot_abs[: self.n_slots], absolute])
        q = absolute[:, None]
        b = key_abs[None, :]
        token_part = (b <= q) & ((b < s) | (q - b < w))
        prefix_part = torch.ones(t, self.n_prefix, dtype=torch.bool, device=dev)
        mask = torch.cat([prefix_part, token_part], dim=1)
        last = self.seen + t
        keep = (absolute < s) | (absolute >= last - w)  # survivors of this chunk
        self._write(k[:, keep], v[:, keep], absolute[keep])
        self.seen = last
        self.n_slots = min(last, s + w)
        return keys, values, mask
