"""How many CPU threads torch should use.

Design decisions:
- By default casa uses the cores that are *free* (all cores minus the
  1-minute load average), not torch's default of all cores. OpenMP threads
  that share a core with another busy process spin at barriers: on a busy
  2-core machine that made time to first token go from ~10 ms to ~1.8 s per
  frame and training 6x slower.
- Every long-running command takes `--threads N` to override it, and calls
  `set_threads` once, at start-up, before any tensor work.
"""

from __future__ import annotations

import os

__all__ = ["free_cores", "set_threads"]


def free_cores() -> int:
    """Cores not busy with other work (at least 1)."""
    n = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0]
    except OSError:
        busy = 0.0
    return max(1, min(n, int(n - busy + 0.5)))


def set_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads to `threads`, or to `free_cores()` when None; returns the number set."""
    import torch

    n = threads if threads else free_cores()
    torch.set_num_threads(n)
    return n
