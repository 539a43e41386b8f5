"""casa.core.loss: which next-token predictions count, and the cross-entropy over them."""

import math

import torch

from casa.core.batch import Batch
from casa.core.loss import lm_loss, loss_sum, target_mask

# two rows of 6 tokens: row 0 packs two documents (2 + 4 tokens), row 1 holds one
IDS = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])
DOC_LENS = [[2, 4], [6]]
# tokens that are targets, per row; the first token of every document never is
TARGETS_NO_MASK = [[False, True, False, True, True, True], [False, True, True, True, True, True]]
LOSS_MASK = torch.tensor([[1, 1, 1, 0, 1, 1], [0, 0, 1, 1, 0, 1]], dtype=torch.bool)
TARGETS_MASKED = [[False, True, False, False, True, True], [False, False, True, True, False, True]]


def batch(loss_mask=None) -> Batch:
    return Batch(IDS, doc_lens=DOC_LENS, loss_mask=loss_mask)


def predictions(targets):
    """The (row, position) pairs whose prediction counts: position t predicts token t + 1."""
    return [(b, t) for b, row in enumerate(targets) for t in range(len(row) - 1) if row[t + 1]]


def test_target_mask_excludes_document_starts():
    # token 2 of row 0 starts the second document: the prediction made at token 1 (the
    # first document's last token) must not count, though no loss_mask excludes it
    got = target_mask(batch())
    assert got.dtype == torch.bool and got.shape == (2, 5)
    assert got.tolist() == [row[1:] for row in TARGETS_NO_MASK]
    assert got.tolist() == [[True, False, True, True, True], [True, True, True, True, True]]


def test_target_mask_follows_the_loss_mask():
    got = target_mask(batch(LOSS_MASK))
    assert got.tolist() == [row[1:] for row in TARGETS_MASKED]
    # the loss mask marks token 2 of row 0 as a target, the document start overrides it
    assert LOSS_MASK[0, 2] and not got[0, 1]


def test_loss_is_the_hand_computed_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 20, generator=g) * 3
    for mask, targets in ((None, TARGETS_NO_MASK), (LOSS_MASK, TARGETS_MASKED)):
        pairs = predictions(targets)
        want = 0.0
        for b, t in pairs:  # -log softmax(logits)[next token], written out
            row = logits[b, t].double()
            want += math.log(row.exp().sum()) - float(row[IDS[b, t + 1]])
        total, count = loss_sum(logits, batch(mask))
        assert count == len(pairs)
        assert total.dtype == torch.float32 and abs(float(total) - want) < 1e-4
        assert abs(float(lm_loss(logits, batch(mask))) - want / len(pairs)) < 1e-5


def test_bf16_logits_give_the_fp32_loss_of_their_values():
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(2, 6, 20, generator=g) * 3).bfloat16()
    got = lm_loss(logits, batch(LOSS_MASK))
    want = lm_loss(logits.float(), batch(LOSS_MASK))
    assert got.dtype == torch.float32 and float(got) == float(want)
