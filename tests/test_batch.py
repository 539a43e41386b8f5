"""Malformed interleaved batches fail early with a message naming the field."""

import pytest
import torch
from conftest import tiny_config

from casa.core.batch import Batch, BatchError
from casa.core.model import CasaModel

IDS = torch.randint(0, 61, (2, 8))


def imgs(n, size=16, channels=3, dtype=torch.float32):
    return torch.randn(n, channels, size, size).to(dtype)


CASES = [
    (dict(input_ids=IDS, images=imgs(2), image_rows=torch.tensor([0, 1]), insertion_points=torch.tensor([3, 8])),
     r"insertion_points: \[8\] out of range \[0, 7\]"),
    (dict(input_ids=IDS, images=imgs(1), image_rows=torch.tensor([0]), insertion_points=torch.tensor([-1])),
     r"insertion_points: \[-1\] out of range"),
    (dict(input_ids=IDS, images=imgs(2), image_rows=torch.tensor([0, 0]), insertion_points=torch.tensor([5, 2])),
     r"sorted by \(row, insertion point\)"),
    (dict(input_ids=IDS, images=imgs(2), image_rows=torch.tensor([1, 0]), insertion_points=torch.tensor([1, 2])),
     r"sorted by \(row, insertion point\)"),
    (dict(input_ids=IDS, images=imgs(3), image_rows=torch.tensor([0, 1]), insertion_points=torch.tensor([1, 2])),
     r"insertion_points: 2 entries for 3 images"),
    (dict(input_ids=IDS, images=imgs(2), image_rows=torch.tensor([0, 2]), insertion_points=torch.tensor([1, 2])),
     r"image_rows: \[0, 2\] out of range for a batch of 2 rows"),
    (dict(input_ids=IDS, images=imgs(1, size=32), image_rows=torch.tensor([0]), insertion_points=torch.tensor([1])),
     r"images: shape \(1, 3, 32, 32\), expected \[N, 3, 16, 16\]"),
    (dict(input_ids=IDS, images=imgs(1, dtype=torch.uint8), image_rows=torch.tensor([0]),
          insertion_points=torch.tensor([1])), r"images: expected \[N, C, H, W\] floating pixels"),
    (dict(input_ids=IDS, image_embeds=torch.randn(1, 5, 32), image_rows=torch.tensor([0]),
          insertion_points=torch.tensor([1])), r"image_embeds: 5 tokens per image, the model expects 4"),
    (dict(input_ids=IDS, image_embeds=torch.randn(1, 4, 8), image_rows=torch.tensor([0]),
          insertion_points=torch.tensor([1])), r"image_embeds: width 8, the model's d_model is 32"),
    (dict(input_ids=IDS, doc_lens=[[4, 0, 4], [8]]), r"doc_lens\[0\] = \[4, 0, 4\]: empty document"),
    (dict(input_ids=IDS, doc_lens=[[4, 3], [8]]), r"doc_lens\[0\] = \[4, 3\] adds up to 7, row length is 8"),
    (dict(input_ids=IDS, doc_lens=[[8]]), r"doc_lens: 1 rows for a batch of 2"),
    (dict(input_ids=torch.zeros(1, 0, dtype=torch.long)), r"input_ids: empty batch"),
    (dict(input_ids=IDS.float()), r"input_ids: expected a \[B, T\] long tensor"),
    (dict(input_ids=IDS, images=imgs(1), image_rows=torch.tensor([0]), insertion_points=torch.tensor([1.0])),
     r"insertion_points: expected a 1-D long tensor"),
    (dict(input_ids=IDS, images=imgs(1), image_embeds=torch.randn(1, 4, 32), image_rows=torch.tensor([0]),
          insertion_points=torch.tensor([1])), r"give one or the other"),
    (dict(input_ids=IDS, loss_mask=torch.ones(2, 7, dtype=torch.bool)), r"loss_mask: shape \(2, 7\)"),
]


@pytest.mark.parametrize("fields,message", CASES)
def test_bad_batches_are_rejected_by_name(fields, message):
    model = CasaModel(tiny_config("casa"))
    with pytest.raises(BatchError, match=message):
        model(Batch(**fields))


def test_image_rows_default_to_row_zero_for_single_row_batches():
    b = Batch(IDS[:1], images=imgs(2), insertion_points=torch.tensor([0, 3]))
    assert b.image_rows.tolist() == [0, 0]
    CasaModel(tiny_config("casa"))(b)


def test_missing_insertion_points_are_named():
    with pytest.raises(BatchError, match="2 images but no insertion_points"):
        Batch(IDS[:1], images=imgs(2)).validate()
