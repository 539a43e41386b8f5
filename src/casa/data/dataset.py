"""Sample sources: index -> Sample, deterministic, endless.

A source is anything with `__getitem__(i) -> Sample` for every `i >= 0`, so
the position in the data is one integer that a checkpoint stores.
- `SyntheticSource` interleaves tasks round-robin; sample `i` is sample
  `i // n_tasks` of task `tasks[i % n_tasks]` (see `tasks.make_sample`).
- `JsonlSource` walks a JSONL file in epochs, each in a fresh order drawn
  from `(seed, epoch)`.
"""

from __future__ import annotations

import random

from casa.data.sample import Sample, read_jsonl
from casa.data.tasks import Difficulty, check_tasks, make_sample


class SyntheticSource:
    def __init__(self, tasks, *, seed: int = 0, difficulty: Difficulty | None = None):
        self.tasks = check_tasks(tasks)
        self.seed = seed
        self.difficulty = difficulty or Difficulty()

    def __getitem__(self, i: int) -> Sample:
        n = len(self.tasks)
        return make_sample(self.tasks[i % n], self.seed, i // n, self.difficulty)


class JsonlSource:
    def __init__(self, path, *, seed: int = 0, skip_bad: bool = False, shuffle: bool = True):
        self.samples, self.skipped = read_jsonl(path, skip_bad=skip_bad)
        if not self.samples:
            raise ValueError(f"{str(path)!r}: no usable samples")
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
    """`spec` is a JSONL path or comma-separated synthetic task names."""
    if spec.endswith(".jsonl"):
        return JsonlSource(spec, seed=seed, skip_bad=skip_bad)
    return SyntheticSource(spec.split(","), seed=seed, difficulty=difficulty)
