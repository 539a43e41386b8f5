"""The language-model loss: next-token cross-entropy on target tokens.

Design decisions:
- One rule for which tokens are targets (`target_mask`), used by the trainer
  (summed, to average over a whole accumulated step) and by `lm_loss` (mean).
- A token is a target where `Batch.loss_mask` is set (everywhere without
  one), except the first token of each packed document: nothing before it in
  its own document may predict it, and the token before it belongs to another
  document.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from casa.core.batch import Batch

__all__ = ["lm_loss", "loss_sum", "target_mask"]


def target_mask(batch: Batch) -> torch.Tensor:
    """Which next-token predictions count.

    Returns:
        `[B, T-1]` bool: entry `t` is True where token `t+1` is a target of the
        prediction made at token `t`.
    """
    B, T = batch.input_ids.shape
    target = batch.loss_mask.bool().clone() if batch.loss_mask is not None else torch.ones(B, T, dtype=torch.bool)
    target = target.to(batch.input_ids.device)
    for b, lens in enumerate(batch.doc_lens):
        starts = torch.tensor([0, *lens[:-1]]).cumsum(0)
        target[b, starts] = False
    return target[:, 1:]


def loss_sum(logits: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over target tokens.

    Args:
        logits: `[B, T, V]`, any float dtype (the loss is computed in fp32).
    Returns:
        (scalar fp32 sum, number of target tokens).
    """
    mask = target_mask(batch)
    loss = F.cross_entropy(logits[:, :-1][mask].float(), batch.input_ids[:, 1:][mask], reduction="sum")
    return loss, int(mask.sum())


def lm_loss(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Mean cross-entropy over target tokens: `logits [B, T, V]` -> scalar fp32."""
    total, count = loss_sum(logits, batch)
    return total / count
