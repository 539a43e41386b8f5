"""Evaluation: how well a casa model answers.

- `decode`: batched greedy decoding, and the prompt-length check.
- `synthetic`: chat samples (synthetic tasks or JSONL) turned into questions,
  answered and scored; the blind prior.
- `run`: the `casa eval` runner (checkpoint, inputs checked before compute,
  atomic JSON result), for synthetic data and standard benchmarks.
- `stdbench`: the paper's standard benchmarks from local copies.
- `lmms`: the lmms-eval model plugin.

Design decisions:
- One decoder for every caller (eval, trainer, study, benchmarks, plugin),
  one scoring home (`casa.data.metrics`), so a number means the same thing
  wherever it is printed.
- Submodules are imported explicitly; importing `casa.eval` loads nothing.
"""

__all__: list[str] = []
