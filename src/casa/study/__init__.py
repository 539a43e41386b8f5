"""The variant comparison and the demo, built on training, evaluation and the benchmarks.

- `run`: `casa study` (the protocol: seeds, arms, baselines, benchmarks).
- `schedule`: the run's units (stage 0, each arm of each seed) on `--jobs` worker processes.
- `stage0`: the pretrained text LM and vision encoder every arm of a seed starts from.
- `stage1`: one arm (variant x regime x matching) trained from stage 0 and evaluated.
- `gating`: the implicit gate of fusion layers: attention shares per layer and task.
- `gate_tokens`: the gate per token: answer and question tokens' shares, heatmaps, localisation.
- `compression`: trained arms with their image tokens pooled or pruned, training-free.
- `frequency`: how often fusion layers occur, accuracy against memory and decode time.
- `crossimage`: questions on non-adjacent frames; gist token vs frame memory, and its cache cost.
- `stats`: means, 95% intervals, paired differences, learning curves.
- `claims`: each claim of the paper, its rule, its verdict and the likely reason.
- `plots`, `report`: the figures and report.md / docs/study.md.
- `demo`: `casa demo` (one small CASA model, trained and shown).

Design decisions:
- The top layer of the library: it may use everything below it and nothing
  imports it but the command line.
- Submodules are imported explicitly; importing `casa.study` loads nothing.
"""

__all__: list[str] = []
