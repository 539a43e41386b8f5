"""The freeze policy: which parameters of a CasaModel train.

Two knobs, set by `casa build` (and recorded in the model directory's
config.json "build" section) or by the trainer's config:

- `freeze_lm`: the LM is frozen except its fusion layers;
- `vision_trainable_blocks=k`: the vision encoder is frozen except its last
  k blocks and what follows them (k < 0: the whole encoder trains).

The projector always trains (it is new in every model that has one).

Design decisions:
- One rule for `casa build` and `casa train`: both call `apply_freeze`, so a
  model built with a policy and a model trained with it are frozen alike.
- `resolve_policy` is the one precedence rule: a value given explicitly wins,
  then the value recorded by `casa build` in the init directory, then the
  defaults (nothing frozen).
- Parameters are matched by identity with `model.fusion_parameters()`, not by
  name, so renaming a module cannot silently unfreeze or freeze it.
"""

from __future__ import annotations

from dataclasses import dataclass

from casa.core.model import CasaModel
from casa.pretrained.model_dir import read_config

__all__ = ["FreezePolicy", "apply_freeze", "read_policy", "resolve_policy", "trainable_summary"]


@dataclass(frozen=True)
class FreezePolicy:
    freeze_lm: bool = False
    vision_trainable_blocks: int = -1  # -1: the whole encoder trains


def apply_freeze(model: CasaModel, policy: FreezePolicy) -> dict:
    """Set `requires_grad` of every parameter by `policy`; returns {"trainable": n, "total": n} parameter counts."""
    fusion = {id(p) for p in model.fusion_parameters()}
    for name, p in model.named_parameters():
        if not name.startswith("vision."):
            p.requires_grad_(not policy.freeze_lm or id(p) in fusion)
    model.vision.freeze_encoder(policy.vision_trainable_blocks)
    model.vision.projector.requires_grad_(True)
    params = list(model.parameters())
    return {"trainable": sum(p.numel() for p in params if p.requires_grad), "total": sum(p.numel() for p in params)}


def trainable_summary(model: CasaModel) -> list[tuple[str, int, int]]:
    """`(part, trainable, total)` parameter counts for the fusion layers, the vision encoder,
    the projector, the rest of the LM, and all of them (`casa build` prints it)."""
    fusion = {id(p) for p in model.fusion_parameters()}
    encoder = {id(p) for p in model.vision.encoder.parameters()}
    projector = {id(p) for p in model.vision.projector.parameters()}
    parts = {"fusion layers": [], "vision encoder": [], "projector": [], "language model": []}
    for p in model.parameters():  # shared parameters are listed once
        part = ("fusion layers" if id(p) in fusion else "vision encoder" if id(p) in encoder
                else "projector" if id(p) in projector else "language model")
        parts[part].append(p)
    rows = [(name, sum(p.numel() for p in ps if p.requires_grad), sum(p.numel() for p in ps))
            for name, ps in parts.items()]
    return rows + [("total", sum(r[1] for r in rows), sum(r[2] for r in rows))]


def read_policy(path) -> dict:
    """The freeze policy recorded by `casa build` in a model directory ({} if none): its given keys only."""
    b = read_config(path).get("build", {})
    return {k: b[k] for k in ("freeze_lm", "vision_trainable_blocks") if k in b}


def resolve_policy(freeze_lm: bool | None = None, vision_trainable_blocks: int | None = None, *,
                   init=None) -> FreezePolicy:
    """The policy in force: each knob as given, else as recorded in the `init` directory, else the default."""
    recorded = read_policy(init) if init else {}
    given = {"freeze_lm": freeze_lm, "vision_trainable_blocks": vision_trainable_blocks}
    return FreezePolicy(**{**recorded, **{k: v for k, v in given.items() if v is not None}})
