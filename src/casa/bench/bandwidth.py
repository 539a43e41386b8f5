"""The memory-bandwidth bound of one decoded token.

Decoding one token reads every weight the token passes through and every
cached key/value it attends to; nothing else of that size is touched, so
`bytes read / streaming bandwidth` is a lower bound on the time per token.
This module measures both terms; `bench/stream.py` reports the measured
decode time against the bound, per turn.

Design decisions:
- The bandwidth is measured in the run that it bounds (same process, same
  thread count, same load on a shared machine; `bench stream` measures it
  again before every turn, so that the bound follows the load): a
  read-only reduction over a buffer far larger than the caches
  (`torch.sum`, the best of several passes), so the figure is what one
  thread can stream, not a datasheet number.
- Bytes per token count each weight once (tied or shared weights too) and
  leave out what a decode step does not read: the vision tower, the
  embedding table (one row is read), and, for the fusion variants without
  text keys, the fusion layer's key/value projections (used only when
  images arrive). The cache term is `Session.cache_bytes()`.
"""

from __future__ import annotations

import time

import torch

__all__ = ["decode_weight_bytes", "read_bandwidth"]


def read_bandwidth(*, nbytes: int = 256 * 2**20, repeats: int = 5, buffer: torch.Tensor | None = None) -> float:
    """Streaming read bandwidth of this process, bytes/s (best of `repeats` passes
    of `torch.sum` over an fp32 buffer of `nbytes`, or over `buffer` when given:
    reused across measurements, it is allocated and first touched once)."""
    buf = buffer
    if buf is None:
        buf = torch.ones(max(1, nbytes // 4), dtype=torch.float32)
        buf.sum()  # first touch and thread-pool start-up out of the timing
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - t0)
    return buf.nbytes / best


def decode_weight_bytes(model) -> int:
    """Bytes of the weights one decoded token reads (see the module docstring).

    Args:
        model: a `CasaModel`.
    Returns:
        bytes, in the parameters' dtypes.
    """
    skip = set()
    for block in model.blocks:
        fusion = block.fusion
        if fusion is not None and not fusion.text_keys and fusion.attn is not None:
            skip |= {id(p) for p in (*fusion.attn.k_proj.parameters(), *fusion.attn.v_proj.parameters())}
    seen, total = set(), 0
    for module in (model.blocks, model.norm, model.lm_head):
        for p in module.parameters():
            if id(p) in seen or id(p) in skip:
                continue
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total + model.embed.weight[0].numel() * model.embed.weight.element_size()
