"""Pretrained models in and out: Hugging Face checkpoints, casa model directories, `casa build`,
tokenizers, training run directories (as their readers see them).

Design decisions:
- Modules are imported by their full name (`casa.pretrained.directory`), not
  through this package: importing it costs nothing, and `model_dir` and
  `build_config` stay importable without torch (the CLI checks its inputs
  with them before loading anything).
"""

__all__: list[str] = []
