"""casa.bench.train and casa.bench.memory: the benchmark's batch is what its
config says, bad settings are refused before a variant runs, and the peak-memory
probe sees an allocation of known size."""

from pathlib import Path

import pytest
import torch

from casa.bench.memory import PeakMemory
from casa.bench.train import bench_config, check_variants, packed_batch


def test_packed_batch_layout():
    cfg = bench_config(text_tokens=40, image_ratio=4, tokens_per_image=16, d_model=32, n_layers=1, repeats=1)
    assert cfg["image_tokens"] == 160 and cfg["n_heads"] == 1 and cfg["d_ff"] == 80
    batch = packed_batch(cfg, "cpu").validate()
    # 160 image tokens = 10 images of 16; 40 text tokens = 10 documents of 4, image after each first token
    assert batch.input_ids.shape == (1, 40) and batch.image_embeds.shape == (10, 16, 32)
    assert batch.doc_lens == [[4] * 10] and batch.insertion_points.tolist() == list(range(1, 40, 4))
    interleaved = packed_batch({**cfg, "layout": "interleaved"}, "cpu").validate()
    assert interleaved.doc_lens == [[40]] and torch.equal(interleaved.input_ids, batch.input_ids)


def test_bad_settings_are_refused_before_any_variant_runs():
    with pytest.raises(ValueError, match=r"unknown variant\(s\) \['cassa'\]; expected names from insertion, ca"):
        check_variants(["casa", "cassa"])
    assert check_variants(("insertion", "casa")) == ["insertion", "casa"]
    with pytest.raises(ValueError, match="--d-model 8: expected at least 16"):
        bench_config(d_model=8)
    with pytest.raises(ValueError, match="less than one image"):
        bench_config(text_tokens=8, image_ratio=1, tokens_per_image=16)
    with pytest.raises(ValueError, match="too few for 16 images"):
        bench_config(text_tokens=16, image_ratio=16, tokens_per_image=16)
    with pytest.raises(ValueError, match="layout='zigzag'"):
        bench_config(layout="zigzag")


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_peak_memory_sees_a_freed_allocation():
    """The CPU peak is reset on entry (the idle block after a big one reads ~0) and counts memory
    that was touched then freed inside the block."""
    size = 96 * 2**20
    with PeakMemory("cpu") as pm:
        x = torch.ones(size // 4)  # touched pages: resident
        del x  # freed before the end: the peak still counts it
    assert pm.bytes >= 0.9 * size
    with PeakMemory("cpu") as idle:
        pass
    assert idle.bytes < 0.1 * size
