"""Key/value caches for incremental inference (docs/design.md §5), one stream.

One class, `KVCache`, serves every cache of a `Session`:

- a block's self-attention cache: text tokens only for the fused variants,
  text and image tokens for `insertion`;
- a fusion layer's window state: the window's image K/V as an always-visible
  *prefix* (written once, when the images arrive), then, for `casa`, the
  window's text K/V so far as tokens. `reset()` starts a new window.

Design decisions:
- Which cached key a query sees is decided by `core.layout.cached_mask` (the
  §4 rule, incrementally) and, with a bounded history, `History.sees`; this
  module only stores entries and hands out views of them.
- Keys are stored after RoPE, at their original positions, and never rotated
  again.
- Storage is head-major, `[1, Hkv, capacity, D]`, so that the keys of a step
  are a strided view that SDPA reads in place (token-major storage would be
  copied by every decode step). Capacity grows by doubling.
- Bounded history (`History(sink, window)`, an option): the cache holds the
  first `sink` tokens and a ring buffer of the `window` most recent ones, so
  memory is constant once it is full and no token is ever copied to evict
  another. The rule is exact whatever the chunk size: a chunk of `t` tokens
  is attended with an explicit mask over `[held tokens ; chunk]` before the
  chunk is written, so chunked prefill and token-by-token decode give the
  same result. Positions are not recycled: a query far into a stream sees
  the sink at its true, large distance (unlike StreamingLLM, which
  re-numbers positions inside the cache); that keeps keys valid after
  eviction and costs nothing per step.
- int8 storage (`quantized=True`, an option): each entry's key and value
  are stored per head as int8 with one fp32 scale (`quantize`: max|x| / 127,
  round half to even), a quarter of fp32's bytes (half of bf16's) plus 4 per
  row and head. casa's CPU kernels (one decoded token at one thread,
  `core.decode`) read the int8 rows in place and fold the scales into their
  sums: that is where the smaller cache is faster. Every other path gets
  dequantized copies in the entries' dtype (`held`, `prefix`), made anew at
  every step: the same values, at a cost above a plain cache's. A chunk's
  own keys are seen as stored (quantized), as the same tokens decoded one by
  one see them.
"""

from __future__ import annotations

import torch

from casa.core import cpu_kernels
from casa.core.caches import RowWriter
from casa.core.layout import History, cached_mask

# History is defined with the other mask rules, in core.layout
__all__ = ["History", "KVCache", "dequantize", "entry_bytes", "quantize", "quantize_reference"]


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of `x` as int8 with one fp32 scale each (symmetric, per row; the one home of the rule:
    `quantize_reference` in PyTorch ops, and `cpu_kernels.c`'s `quantize_row`, bit-equal to it,
    which this calls on CPU where the kernels are built. On other devices PyTorch may divide by
    127 through a reciprocal, a last-bit difference in the scale).

    Args:
        x: `[..., D]`, finite, any float dtype (rounded from fp32 values).
    Returns:
        `(q, scale)`: `q [..., D]` int8 = round_half_even(x / scale) in [-127, 127], `scale [...]`
        fp32 = max|x| / 127 (0 for an all-zero row, whose q is 0).
    """
    if x.is_cpu and x.dtype in (torch.float32, torch.bfloat16) and cpu_kernels.available():
        return cpu_kernels.quantize(x)  # one call instead of seven ops (a frame quantizes 2 x layers prefixes)
    return quantize_reference(x)


def quantize_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize` in PyTorch ops: `x [..., D]` -> `(q [..., D] int8, scale [...] fp32)`; the
    reference the kernel is tested against."""
    x = x.float()
    scale = x.abs().amax(-1) / 127
    q = torch.round(x / torch.where(scale > 0, scale, 1.0)[..., None]).clamp_(-127, 127)
    return q.to(torch.int8), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`q [..., D]` int8 times `scale [...]` (fp32), as `dtype`: what `quantize` stored."""
    return (q.float() * scale[..., None]).to(dtype)


def entry_bytes(*, heads: int, width: int, dtype: torch.dtype, quantized: bool) -> int:
    """Bytes of one cached entry: its key and value in `heads` heads of `width` elements of
    `dtype`, or, quantized, of one byte each plus a 4-byte scale per head."""
    return 2 * heads * (width + 4 if quantized else width * dtype.itemsize)


def _head_major(x: torch.Tensor) -> torch.Tensor:
    """Token-major `[1, t, Hkv, D]` (as projections give them) -> head-major `[1, Hkv, t, D]`."""
    return x.transpose(1, 2)  # a view; einops' parsing would cost more than the copy it feeds


class KVCache(RowWriter):
    """Keys/values of one attention layer of one stream: a prefix, then tokens (core's
    `RowWriter` contract: a step appends, the kernel path writes rows in place).

    Shapes: stored `k, v: [1, Hkv, capacity, D]` (int8 when `quantized`, with
    `k_scale, v_scale: [1, Hkv, capacity]` fp32); `extend` and `add_prefix`
    take token-major `[1, t, Hkv, D]`; views handed out are head-major
    `[1, Hkv, S, D]`, in the dtype of the entries written (`dtype`).
    """

    def __init__(self, *, history: History | None = None, quantized: bool = False):
        self.history = history
        self.quantized = quantized
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.k_scale: torch.Tensor | None = None  # quantized: one per row and head
        self.v_scale: torch.Tensor | None = None
        self.dtype: torch.dtype | None = None  # the entries' dtype (of the views handed out)
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
        return self.tokens * self._row_bytes()

    @property
    def allocated_bytes(self) -> int:
        """Bytes of the buffers, spare capacity included."""
        return 0 if self.k is None else self.k.shape[2] * self._row_bytes()

    def _row_bytes(self) -> int:
        """Bytes of one entry: its key and value in every head (and their scales)."""
        return entry_bytes(heads=self.k.shape[1], width=self.k.shape[3], dtype=self.k.dtype, quantized=self.quantized)

    # -------------------------------------------------------------- storage
    def _reserve(self, k: torch.Tensor, size: int, *, heads: int | None = None, width: int | None = None) -> None:
        """Room for `size` entries of `k`'s dtype and device, `heads x width` each (by default
        `k`'s: token-major `[1, t, Hkv, D]`) (amortised doubling; a bounded cache grows only
        up to prefix + sink + window)."""
        if self.k is not None and self.k.shape[2] >= size:
            return
        cap = size if self.k is None else max(size, 2 * self.k.shape[2])
        if self.history is not None:
            cap = max(size, min(cap, self.n_prefix + self.history.sink + self.history.window))
        heads, width = heads or k.shape[2], width or k.shape[3]
        self.dtype = k.dtype
        stored = torch.int8 if self.quantized else k.dtype
        new = [k.new_empty(1, heads, cap, width, dtype=stored) for _ in range(2)]
        if self.quantized:
            new += [k.new_empty(1, heads, cap, dtype=torch.float32) for _ in range(2)]
        old = [self.k, self.v, self.k_scale, self.v_scale]
        if self.k is not None and self.tokens:
            for n, o in zip(new, old):
                n[:, :, : self.tokens] = o[:, :, : self.tokens]
        self.k, self.v = new[:2]
        self.k_scale, self.v_scale = new[2:] if self.quantized else (None, None)

    def _store(self, at, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write token-major `k, v` `[1, t, Hkv, D]` at rows `at` (a slice or index tensor)."""
        if not self.quantized:
            self.k[:, :, at] = _head_major(k)
            self.v[:, :, at] = _head_major(v)
            return
        for buf, scales, x in ((self.k, self.k_scale, k), (self.v, self.v_scale, v)):
            q, s = quantize(x)  # token-major: contiguous as the projections give it
            buf[:, :, at] = _head_major(q)
            scales[:, :, at] = s.transpose(1, 2)

    def _rows(self, stop: int):
        """Head-major `(keys, values)` `[1, Hkv, stop, D]` of rows `[0, stop)`: views, or
        dequantized copies of an int8 cache."""
        if not self.quantized:
            return self.k[:, :, :stop], self.v[:, :, :stop]
        return (dequantize(self.k[:, :, :stop], self.k_scale[:, :, :stop], self.dtype),
                dequantize(self.v[:, :, :stop], self.v_scale[:, :, :stop], self.dtype))

    def _as_stored(self, x: torch.Tensor) -> torch.Tensor:
        """`x [..., D]` as the cache would hand it back once written (quantized and back, or itself)."""
        return dequantize(*quantize(x), x.dtype) if self.quantized else x

    def held(self):
        """Head-major `[1, Hkv, prefix + tokens, D]` of everything held (`_rows`)."""
        return self._rows(self.tokens)

    def reset(self) -> None:
        """Forget everything (a new window); the buffer is kept for reuse."""
        self.n_prefix = self.n_slots = self.seen = 0
        self.slot_abs = None

    def add_prefix(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append always-visible entries (image K/V, `[1, n, Hkv, D]`); only before any token."""
        if self.seen:
            raise RuntimeError("KVCache.add_prefix: tokens were already appended; reset() first")
        n = k.shape[1]
        self._reserve(k, self.n_prefix + n)
        self._store(slice(self.n_prefix, self.n_prefix + n), k, v)
        self.n_prefix += n

    def prefix(self):
        """`(keys, values)` of the prefix alone, `[1, Hkv, P, D]` each (None, None when empty)."""
        if not self.n_prefix:
            return None, None
        return self._rows(self.n_prefix)

    def prefix_keys(self):
        """`(keys, values, mask)` a query of the window reads when the window holds
        only its prefix (`ca`): the prefix views and mask None (all visible), or
        `(None, None, None)` when empty. `inference.rows.RowCache` answers the
        same call with padded rows and a mask."""
        keys, values = self.prefix()
        return keys, values, None

    # --------------------------------------------------------------- append
    def extend(self, k: torch.Tensor, v: torch.Tensor):
        """Append `t` tokens and return what their queries attend to.

        Args:
            k, v: `[1, t, Hkv, D]` keys (after RoPE) and values of the new tokens.
        Returns:
            `(keys, values, mask)`: keys/values `[1, Hkv, S, D]` (head-major views
            or, for a bounded chunk, copies); mask None when every key is visible
            to every query (one new token), else bool `[t, S]` (True = attend).
        """
        if self.history is None:
            return self._extend_full(k, v)
        return self._extend_bounded(k, v)

    def _extend_full(self, k, v):
        t, start = k.shape[1], self.tokens
        self._reserve(k, start + t)
        self._store(slice(start, start + t), k, v)
        self.n_slots += t
        self.seen += t
        keys, values = self.held()
        if t == 1:  # one query sees every key held (the rule's newest entry)
            return keys, values, None
        new = torch.arange(self.seen - t, self.seen, device=k.device)
        held = torch.arange(self.seen, device=k.device)
        return keys, values, cached_mask(new, held, n_prefix=self.n_prefix, history=None)

    def next_row(self, like: torch.Tensor, *, heads: int, width: int) -> tuple[int, int]:
        """Room for one more token, written by the caller in place (a fused decode kernel).

        Args:
            like: a tensor of the entries' dtype and device.
        Returns:
            `(row, held)`: write the token's key/value at `row` of `k`/`v` (`[1, heads, capacity,
            width]`, contiguous; quantized: int8 rows and their scales at `row` of `k_scale` /
            `v_scale`, by `quantize`'s rule), then attend rows `[0, held)`, which is what `extend`
            would return for it (one token sees every entry held); then call `commit_row()`.
            Until then the cache is unchanged but for spare capacity.
        """
        if self.history is None:
            row, held = self.tokens, self.tokens + 1
        else:
            row = self.n_prefix + self._slot(self.seen)
            held = self.n_prefix + min(self.seen + 1, self.history.sink + self.history.window)
        self._reserve(like, held, heads=heads, width=width)
        return row, held

    def commit_row(self) -> None:
        """Count the token written at `next_row()`'s row as held."""
        if self.history is None:
            self.n_slots += 1
        else:
            self._slot_map(self.k.device)[self._slot(self.seen)] = self.seen
            self.n_slots = min(self.seen + 1, self.history.sink + self.history.window)
        self.seen += 1

    def _slot_map(self, device) -> torch.Tensor:
        """`slot_abs`, created (every slot empty: -1) on first use."""
        if self.slot_abs is None:
            self.slot_abs = torch.full((self.history.sink + self.history.window,), -1, dtype=torch.long,
                                       device=device)
        return self.slot_abs

    def _slot(self, a):
        """Token slot of absolute index `a` (an int, or a long tensor of them): its own in the
        sink, else a place in the ring."""
        s, w = self.history.sink, self.history.window
        if isinstance(a, int):
            return a if a < s else s + (a - s) % w
        return torch.where(a < s, a, s + (a - s) % w)

    def _write(self, k, v, absolute: torch.Tensor) -> None:
        """Write tokens `[1, t, Hkv, D]` at `absolute` indices into their slots (sink or ring)."""
        slots = self._slot(absolute)
        self._store(self.n_prefix + slots, k, v)
        self.slot_abs[slots] = absolute

    def _extend_bounded(self, k, v):
        s, w = self.history.sink, self.history.window
        t, dev = k.shape[1], k.device
        self._reserve(k, self.n_prefix + min(self.seen + t, s + w))
        self._slot_map(dev)
        absolute = torch.arange(self.seen, self.seen + t, device=dev)
        last = self.seen + t
        if t == 1:
            # The slot this token overwrites (if any) holds the one entry it no
            # longer sees, so afterwards it sees every entry held: no mask.
            self._write(k, v, absolute)
            self.seen, self.n_slots = last, min(last, s + w)
            keys, values = self.held()
            return keys, values, None
        held_k, held_v = self.held()
        keys = torch.cat([held_k, self._as_stored(_head_major(k))], dim=2)
        values = torch.cat([held_v, self._as_stored(_head_major(v))], dim=2)
        key_abs = torch.cat([self.slot_abs[: self.n_slots], absolute])
        mask = cached_mask(absolute, key_abs, n_prefix=self.n_prefix, history=self.history)
        # Keep rule: hold what the chunk's newest token sees (the sink and the
        # last `window` tokens); each later token overwrites the one it no longer sees.
        keep = self.history.sees(absolute, absolute[-1])
        self._write(k[:, keep], v[:, keep], absolute[keep])
        self.seen, self.n_slots = last, min(last, s + w)
        return keys, values, mask
