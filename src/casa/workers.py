"""Worker processes that end when the process that started them ends.

Design decisions:
- casa's long commands run parts in spawned worker processes: `casa study --jobs N`
  trains whole seeds in them (15 minutes and more each), and the benchmarks isolate
  every variant in one. Ctrl-C reaches the whole process group, but a `kill` (SIGTERM,
  SIGKILL, a scheduler's time limit) reaches only the parent: without a guard its
  workers went on training for minutes, holding the cores, writing into a run whose
  report would never be written.
- Each worker starts a daemon thread that checks once a second whether its parent is
  still the process that started it, and ends the worker at once when not (the kernel
  hands an orphan to another parent). Polling works wherever Python does; Linux's
  `prctl(PR_SET_PDEATHSIG)` would fire when the *thread* that spawned the worker ends,
  which a pool's management thread can be.
- What a worker has finished is already on disk (atomic files); what it was writing
  when it ended is not, so a rerun in the same directory redoes exactly that part.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

__all__ = ["ORPHAN_EXIT_CODE", "exit_with_parent", "process_pool"]

ORPHAN_EXIT_CODE = 143  # as if the parent's SIGTERM had reached the worker too (128 + 15)


def _watch(parent: int, interval: float) -> None:
    while True:
        time.sleep(interval)
        if os.getppid() != parent:
            os._exit(ORPHAN_EXIT_CODE)  # no cleanup: the parent that would read our results is gone


def exit_with_parent(parent: int, interval: float = 1.0) -> None:
    """In a worker: end this process within `interval` seconds of `parent` (a pid) ending."""
    threading.Thread(target=_watch, args=(parent, interval), daemon=True, name="casa-exit-with-parent").start()


def process_pool(workers: int) -> ProcessPoolExecutor:
    """A pool of `workers` spawned processes (no fork: torch's threads do not survive one) that end with
    this process."""
    return ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"), initializer=exit_with_parent,
                               initargs=(os.getpid(),))
