"""Sample sources: index -> Sample, deterministic, endless; and the data
spec (`data=...` of a training config) that names one.

A source is anything with `__getitem__(i) -> Sample` for every `i >= 0`, so
the position in the data is one integer that a checkpoint stores.
- `SyntheticSource` interleaves tasks round-robin; sample `i` is sample
  `i // n_tasks` of task `tasks[i % n_tasks]` (see `tasks.make_sample`).
- `JsonlSource` walks a JSONL file in epochs, each in a fresh order drawn
  from `(seed, epoch)`.

Design decisions:
- One rule reads a data spec (`parse_data_spec`), for training and
  evaluation data alike: names of synthetic tasks, or a file. A value that
  looks like a path (a suffix such as `.json`, a path separator, or an
  existing file) is a file, never taken for a task name; a file must be
  JSONL (`.jsonl`), and an unknown name is refused with the list of tasks.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

from casa.data.sample import DataError, Sample, read_jsonl
from casa.data.tasks import TASKS, Difficulty, check_tasks, make_sample

__all__ = ["JsonlSource", "SyntheticSource", "make_source", "parse_data_spec"]


def parse_data_spec(spec: str) -> Path | list[str]:
    """A JSONL file (a `Path`, not yet read) or a list of synthetic task names.

    Raises:
        DataError: a file that is not `.jsonl`, or names that are no tasks.
    """
    names = [n.strip() for n in str(spec).split(",")]
    if names and all(n in TASKS for n in names):
        return names
    looks_like_path = bool(Path(spec).suffix) or os.sep in spec or "/" in spec or os.path.exists(spec)
    if not looks_like_path:
        bad = [n for n in names if n not in TASKS]
        raise DataError(f"data {spec!r}: unknown task(s) {bad}; expected comma-separated names from "
                        f"{sorted(TASKS)}, or a .jsonl file")
    path = Path(spec)
    if path.suffix != ".jsonl":
        raise DataError(f"data {spec!r}: expected a JSONL file (suffix .jsonl, one JSON sample per line) "
                        "or comma-separated synthetic task names")
    return path


class SyntheticSource:
    """Synthetic samples of `tasks`, round-robin, drawn from `seed` (endless).

    A task named k times in `tasks` is drawn k times as often (`digits,digits,color`:
    two digits samples per color sample), each draw a fresh sample of that task.
    """

    def __init__(self, tasks, *, seed: int = 0, difficulty: Difficulty | None = None):
        self.tasks = check_tasks(tasks)
        self.seed = seed
        self.difficulty = difficulty or Difficulty()
        # entry p of the list is the rank[p]-th of its task's repeats[task] entries, so the
        # sample indices of one task run 0, 1, 2, ... however often it is listed
        self._rank = [self.tasks[:p].count(t) for p, t in enumerate(self.tasks)]
        self._repeats = {t: self.tasks.count(t) for t in self.tasks}

    def __getitem__(self, i: int) -> Sample:
        n = len(self.tasks)
        task = self.tasks[i % n]
        index = (i // n) * self._repeats[task] + self._rank[i % n]
        return make_sample(task, self.seed, index, self.difficulty)


class JsonlSource:
    """The samples of a JSONL file, in a fresh order every epoch (endless)."""

    def __init__(self, path, *, seed: int = 0, skip_bad: bool = False, shuffle: bool = True):
        self.samples, self.skipped = read_jsonl(path, skip_bad=skip_bad)
        self.seed, self.shuffle = seed, shuffle
        self._orders: dict[int, list[int]] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Sample:
        n = len(self.samples)
        epoch, j = divmod(i, n)
        if not self.shuffle:
            return self.samples[j]
        if epoch not in self._orders:
            order = list(range(n))
            random.Random(f"{self.seed}:epoch:{epoch}").shuffle(order)
            self._orders = {epoch: order}
        return self.samples[self._orders[epoch][j]]


def make_source(spec: str, *, seed: int = 0, difficulty: Difficulty | None = None, skip_bad: bool = False):
    """The source a data spec names (`parse_data_spec`): a JSONL file or synthetic tasks."""
    parsed = parse_data_spec(spec)
    if isinstance(parsed, Path):
        return JsonlSource(parsed, seed=seed, skip_bad=skip_bad)
    return SyntheticSource(parsed, seed=seed, difficulty=difficulty)
