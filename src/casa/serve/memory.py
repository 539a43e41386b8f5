"""The server process's memory: resident set now and at its peak, and handing
freed heap back to the system.

Design decisions:
- Figures come from `/proc/self/status` (`VmRSS`, `VmHWM`): what the machine
  pays, allocator slack and the runtime included. Elsewhere they are None.
- When the last session ends, the server calls glibc's `malloc_trim(0)`: a
  session's KV cache and activations are freed by then (reference counting:
  no garbage collection pass, which takes ~0.2 s with torch loaded and holds
  the interpreter lock all along), but glibc keeps freed pages of its
  per-thread arenas mapped, and a long-running server would otherwise sit at
  its busiest footprint forever. It takes about a millisecond and is done
  only when idle, so a busy server pays nothing for it.
"""

from __future__ import annotations

import ctypes
import re

__all__ = ["peak_rss_bytes", "release_freed_memory", "rss_bytes"]


def _status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            text = f.read()
    except OSError:
        return None
    m = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(m.group(1)) * 1024 if m else None


def rss_bytes() -> int | None:
    """Resident set size of this process now, in bytes."""
    return _status_bytes("VmRSS")


def peak_rss_bytes() -> int | None:
    """Largest resident set size this process has had, in bytes."""
    return _status_bytes("VmHWM")


def release_freed_memory() -> None:
    """Return the heap's free pages to the system (glibc only)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass
