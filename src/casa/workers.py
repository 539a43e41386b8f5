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
- Ctrl-C is the parent's to handle: workers ignore SIGINT, and a pool left by an
  exception (KeyboardInterrupt included) terminates its workers and returns at once,
  instead of waiting, as `ProcessPoolExecutor` does, for the tasks running to end
  (minutes of training, seen as a Ctrl-C ignored for 50 s).
"""

from __future__ import annotations

import os
import signal
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
    """In a worker: end this process within `interval` seconds of `parent` (a pid) ending; leave Ctrl-C
    (SIGINT, sent to the whole process group) to the parent."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_watch, args=(parent, interval), daemon=True, name="casa-exit-with-parent").start()


class _Pool(ProcessPoolExecutor):
    """A `ProcessPoolExecutor` whose `with` block, left by an exception, terminates the workers first."""

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            for process in list((self._processes or {}).values()):
                process.terminate()
            self.shutdown(wait=True, cancel_futures=True)
            return False
        return super().__exit__(exc_type, exc, tb)


def process_pool(workers: int) -> ProcessPoolExecutor:
    """A pool of `workers` spawned processes (no fork: torch's threads do not survive one) that end with
    this process, ignore Ctrl-C and are terminated when the `with` block ends with an exception."""
    return _Pool(max_workers=workers, mp_context=get_context("spawn"), initializer=exit_with_parent,
                 initargs=(os.getpid(),))
