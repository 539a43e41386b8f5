import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from casa.config import FusionConfig, LMConfig, ModelConfig, VisionConfig
from casa.core.batch import Batch


def tiny_config(variant="casa", placement="parallel", **fusion) -> ModelConfig:
    return ModelConfig(
        lm=LMConfig(vocab_size=61, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=64),
        vision=VisionConfig(image_size=16, patch_size=8, d_model=16, n_layers=1, n_heads=2, d_ff=32),
        fusion=FusionConfig(variant=variant, placement=placement, **fusion),
    )


def make_batch(ids, points, rows=None, doc_lens=None, *, images=None, seed=0, image_size=16) -> Batch:
    ids = torch.as_tensor(ids)
    if ids.dim() == 1:
        ids = ids[None]
    points = torch.as_tensor(points, dtype=torch.long)
    rows = torch.zeros_like(points) if rows is None else torch.as_tensor(rows, dtype=torch.long)
    if images is None:
        g = torch.Generator().manual_seed(seed)
        images = torch.randn(len(points), 3, image_size, image_size, generator=g)
    return Batch(ids, images=images, image_rows=rows, insertion_points=points, doc_lens=doc_lens)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Tiny models: one thread is fastest and immune to a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
