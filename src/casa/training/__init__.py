"""Training: the config (`config`), ranks and collectives (`distributed`), what is optimised and how
fast (`optim`), checkpoints (`checkpoint`) and the loop (`trainer`).

Design decisions:
- One concept per module; modules are imported by their full name, so that
  `casa.training.config` (which `casa train` reads first, to refuse a bad
  config at once) does not import torch.
"""

__all__: list[str] = []
