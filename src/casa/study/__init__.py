"""The variant comparison and the demo, built on training, evaluation and the benchmarks.

- `run`: `casa study` (every fusion variant trained, evaluated, benchmarked).
- `gating`: the implicit-gating analysis of fusion layers.
- `report`: claims checked against the paper, tables and plots.
- `demo`: `casa demo` (one small CASA model, trained and shown).

Design decisions:
- The top layer of the library: it may use everything below it and nothing
  imports it but the command line.
- Submodules are imported explicitly; importing `casa.study` loads nothing.
"""

__all__: list[str] = []
