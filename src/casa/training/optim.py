"""What the trainer optimises and how fast: parameter groups, AdamW, the learning-rate schedule.

Design decisions:
- Two kinds of parameters: "new" (fusion layers and projector, and every
  parameter when nothing was loaded, i.e. a model from scratch) and
  "pretrained" (weights loaded from `init` / `lm_init` / an HF vision
  encoder). They learn at `lr_new` and `lr_pretrained`: the paper's recipe
  (new layers fast, pretrained weights slowly).
- Weight decay on matrices only (`dim >= 2`), never on norms and biases;
  hence four groups at most, named `new`, `new_nodecay`, `pretrained`,
  `pretrained_nodecay`.
- Frozen parameters (`requires_grad=False`) are left out of the optimizer.
  Which parameters are frozen is `casa.pretrained.freeze`'s rule, shared
  with `casa build` (build cannot import the trainer, so the rule lives
  there).
- Schedule: linear warmup over `warmup_steps`, then cosine decay to
  `min_lr_ratio` times the peak at `steps`.
"""

from __future__ import annotations

import math

import torch

from casa.core.model import CasaModel
from casa.training.config import TrainConfig

__all__ = ["lr_lambda", "make_optimizer", "make_scheduler", "new_parameter_names"]


def new_parameter_names(model: CasaModel, pretrained: set[str]) -> set[str]:
    """Names of the parameters that learn at `lr_new`: fusion layers, projector, and whatever was not loaded."""
    fusion = {id(p) for p in model.fusion_parameters()} | {id(p) for p in model.vision.projector.parameters()}
    return {n for n, p in model.named_parameters() if id(p) in fusion or n not in pretrained}


def make_optimizer(model: CasaModel, cfg: TrainConfig, new_names: set[str]) -> torch.optim.AdamW:
    """AdamW over the trainable parameters of `model`, in the groups of the module docstring."""
    groups = {}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        kind = "new" if n in new_names else "pretrained"
        decay = p.dim() >= 2
        groups.setdefault((kind, decay), []).append(p)
    params = [{"params": ps, "lr": cfg.lr_new if kind == "new" else cfg.lr_pretrained,
               "weight_decay": cfg.weight_decay if decay else 0.0, "name": f"{kind}{'' if decay else '_nodecay'}"}
              for (kind, decay), ps in sorted(groups.items())]
    if not params:
        raise ValueError("train: every parameter is frozen (freeze_lm / vision_trainable_blocks); nothing to train")
    return torch.optim.AdamW(params, betas=cfg.betas)


def lr_lambda(cfg: TrainConfig):
    """step -> multiplier of each group's peak learning rate (warmup, then cosine to `min_lr_ratio`)."""
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return f


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule of `lr_lambda`, stepped once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
