"""The study's work as units with dependencies, run on `--jobs` worker processes.

A `casa study` is a few hundred core-minutes of independent-ish pieces: the
stage-0 parts, one training run per (arm, seed), the cross-image experiment's
own stage 0 and arms. `run_units` runs them on N processes and keeps every
process busy until the end.

Design decisions:
- A unit is a module-level function and its arguments (picklable), the keys of
  the units it needs first (`after`), and its expected cost in core-minutes.
  Whenever a worker is free, the costliest unit whose dependencies are done
  starts (longest-first: the last minutes are not one long run on one core
  while the other idles). Whole seeds as jobs, the second edition's way, left
  a 5-seed plan of unequal seeds on one core for its last quarter.
- A unit that needs another's output reads it from disk (every unit writes
  its result atomically before it returns), so arguments are fixed when the
  unit is planned, not when it starts.
- `jobs == 1` runs the units in the same order in this process: the quick
  size and the tests pay no process start-up.
- A failure ends the run at once: the pool terminates the other workers
  (`casa.workers.process_pool`); what they had finished is on disk for a
  rerun.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, wait
from dataclasses import dataclass

from casa.threads import set_threads
from casa.workers import process_pool

__all__ = ["Unit", "run_units"]


@dataclass(frozen=True)
class Unit:
    key: str  # "stage0/s0", "casa_s1", "crossimage/casa+m4_s0"
    fn: Callable
    args: tuple = ()
    after: tuple[str, ...] = ()  # keys of the units whose output this one reads
    cost: float = 1.0  # expected core-minutes: among the ready units, the costliest starts first


def _call(fn: Callable, args: tuple, threads: int):
    """A unit in a worker process, on its share of the threads."""
    set_threads(threads)
    return fn(*args)


def _next(pending: dict[str, Unit], done: set[str]) -> Unit | None:
    ready = [u for u in pending.values() if all(k in done for k in u.after)]
    return max(ready, key=lambda u: u.cost) if ready else None  # max keeps the first of equal costs


def run_units(units: list[Unit], *, jobs: int = 1, threads: int = 1) -> dict[str, object]:
    """Run `units` (in an order their `after` allows), at most `jobs` at once in worker processes of
    `threads // jobs` threads each (at least one); `jobs == 1` runs them here, one after another.

    Returns:
        `{key: what the unit's function returned}`.
    """
    keys = [u.key for u in units]
    if len(set(keys)) != len(keys):
        raise ValueError(f"run_units: duplicate unit keys in {keys}")
    unknown = {k for u in units for k in u.after} - set(keys)
    if unknown:
        raise ValueError(f"run_units: units depend on {sorted(unknown)}, which are not planned")
    pending = {u.key: u for u in units}
    done: set[str] = set()
    results: dict[str, object] = {}
    if jobs == 1:
        while pending:
            unit = _next(pending, done)
            if unit is None:
                raise ValueError(f"run_units: a dependency cycle among {sorted(pending)}")
            del pending[unit.key]
            results[unit.key] = unit.fn(*unit.args)
            done.add(unit.key)
        return results
    with process_pool(jobs) as pool:
        running = {}
        while pending or running:
            while len(running) < jobs and (unit := _next(pending, done)) is not None:
                del pending[unit.key]
                running[pool.submit(_call, unit.fn, unit.args, max(1, threads // jobs))] = unit.key
            if not running:
                raise ValueError(f"run_units: a dependency cycle among {sorted(pending)}")
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                key = running.pop(future)
                results[key] = future.result()  # a failure raises here; the pool ends the others
                done.add(key)
    return results
