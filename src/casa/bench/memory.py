"""Peak-memory measurement shared by the benchmarks (`PeakMemory`).

Design decisions:
- CUDA: the caching allocator's peak (`max_memory_allocated`) above what was
  allocated on entry.
- CPU: the process's resident-set high-water mark (`VmHWM`), reset on entry
  through `/proc/self/clear_refs`, above the resident set on entry. Freed
  heap memory is handed back to the system first (`malloc_trim`), so that
  new allocations that reuse it still count. The figure counts everything
  the process touched (allocator slack included), which is what a user's
  machine pays.
- Where neither is available (no `/proc`), the figure is None, never a
  made-up number; reports print "n/a".
"""

from __future__ import annotations

import ctypes
import gc
import re

import torch

__all__ = ["PeakMemory", "resident_bytes"]


def _trim_heap() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _status_bytes(field: str) -> int | None:
    try:
        text = open("/proc/self/status").read()
    except OSError:
        return None
    m = re.search(rf"{field}:\s+(\d+) kB", text)
    return int(m.group(1)) * 1024 if m else None


def resident_bytes() -> int | None:
    """The process's resident set now (`VmRSS`; None without `/proc`)."""
    return _status_bytes("VmRSS")


def _reset_cpu_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """`with PeakMemory(device) as pm: ...` then `pm.bytes` (None where unmeasurable)."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.bytes: int | None = None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            _trim_heap()
            self._ok = _reset_cpu_peak()
            self._base = _status_bytes("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        elif self._ok and self._base is not None:
            self.bytes = max(0, _status_bytes("VmHWM") - self._base)
        return False

