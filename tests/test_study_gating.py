"""The per-token gating analysis (`casa.study.gate_tokens`: token_attention, sample_gates, summarise, section,
plot_gate_heatmaps): shares are probabilities, hand-forced attention gives the expected shares and maps,
localisation equals the area for uniform attention, and section's verdicts follow the rule."""

import math

import pytest
import torch

from casa.data import make_sample
from casa.data.tasks import difficulty
from casa.study.gate_tokens import (
    localisation,
    plot_gate_heatmaps,
    sample_gates,
    section,
    shape_patches,
    summarise,
    token_attention,
    verdict,
)
from casa.study.gating import attention_shares
from casa.study.run import SIZES

TASKS = ("color", "count", "position", "compare")
D = difficulty({"image_size": 48, "relative": False})
SCALE = 0.15  # random q/k weights of this size give image shares from ~0.01 to ~0.6 across heads and tokens


def _model(peaked: bool = True):
    """The quick study's model (4 heads, 2 kv heads, 16 image tokens on a 4 x 4 grid, fusion in blocks 0 and 1);
    `peaked`: random q/k projections in the fusion layers, so that attention is far from uniform."""
    from casa.config import ModelConfig
    from casa.core.model import CasaModel

    torch.manual_seed(0)
    model = CasaModel(ModelConfig.from_dict({**SIZES["quick"]["model"], "fusion": {"variant": "casa"}})).eval()
    if peaked:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for block in model.blocks:
                for proj in (block.fusion.attn.q_proj, block.fusion.attn.k_proj):
                    proj.weight.copy_(torch.randn(proj.weight.shape, generator=g) * SCALE)
    return model


def _processor(model):
    from casa.data import Processor
    from casa.pretrained.tokenizer import ByteTokenizer

    return Processor(ByteTokenizer(), model.config.vision)


def _samples(tasks=TASKS, n=2):
    return [make_sample(t, 0, i, D) for t in tasks for i in range(n)]


@pytest.fixture(scope="module")
def records():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = _model()
        return sample_gates(model, _processor(model), _samples(), per_batch=3)
    finally:
        torch.set_num_threads(threads)


def test_shares_are_probabilities_per_layer_and_head(records):
    assert [r["task"] for r in records] == [t for t in TASKS for _ in range(2)]
    for r in records:
        a, q = r["gate"]["answer"], r["gate"]["question"]
        assert r["blocks"] == [0, 1] and a["image"].shape == (2, 4) and q["image"].shape[1:] == (2, 4)
        assert len(q["image"]) == 3 and a["patches"].shape == (2, 4, 1, 16) and r["shape"].shape == (1, 4, 4)
        for g in (a, q):
            for x in (g["image"], g["text"], g["uniform"]):
                assert ((x >= 0) & (x <= 1 + 1e-6)).all()
            torch.testing.assert_close(g["image"] + g["text"], torch.ones_like(g["image"]))
            assert (g["own"] <= g["text"] + 1e-6).all()
        # the heatmap of a token sums to its image share, in every layer and head
        torch.testing.assert_close(a["patches"].sum((-1, -2)), a["image"])
        assert 0.05 < float(a["image"].mean()) < 0.95 and a["image"].std() > 0  # peaked: a real, head-dependent mix


def test_token_attention_agrees_with_attention_shares(one_thread):
    """Over the answer's own tokens (`loss_mask`), heads and queries averaged: `attention_shares`' numbers,
    which tests/test_study.py checks against a softmax written out key by key."""
    from casa.data import pack_row

    model = _model()
    proc = _processor(model)
    batch = pack_row([proc.encode(s) for s in _samples(("color", "count"))])
    queries = [(0, int(t)) for t in batch.loss_mask[0].nonzero()[:, 0]]
    ta = token_attention(model, batch, queries)
    shares = attention_shares(model, batch)
    for j, layer in enumerate(ta.blocks):
        assert float(ta.image[:, j].mean()) == pytest.approx(shares[layer]["answer_image"], abs=1e-5)
        assert float(ta.own[:, j].mean()) == pytest.approx(shares[layer]["answer_self"], abs=1e-5)


def test_zero_queries_spread_evenly_over_the_keys(one_thread):
    """q = 0: every score is 0, so a query at offset j of a window with N image tokens gives each of its
    N + j + 1 keys 1 / (N + j + 1): image share N / (N + j + 1), a flat heatmap."""
    from conftest import make_batch

    model = _model()
    with torch.no_grad():
        for block in model.blocks:
            block.fusion.attn.q_proj.weight.zero_()
    T, points, N = 12, [3, 8], 16  # windows [0, 3) without an image, [3, 8) image 0, [8, 12) image 1
    batch = make_batch(torch.arange(T) + 40, points, image_size=32)
    queries = [(0, t) for t in range(T)]
    ta = token_attention(model, batch, queries)
    for t in range(T):
        if t < 3:  # no image in the window: all mass on the text
            assert ta.images[t].tolist() == [-1] and torch.all(ta.image[t] == 0) and torch.allclose(ta.text[t],
                                                                                                   torch.ones(2, 4))
            continue
        start = 3 if t < 8 else 8
        want = N / (N + t - start + 1)
        assert ta.images[t].tolist() == [0 if t < 8 else 1]
        torch.testing.assert_close(ta.image[t], torch.full((2, 4), want))
        assert float(ta.uniform[t]) == pytest.approx(want)
        torch.testing.assert_close(ta.patches[t], torch.full((2, 4, 1, N), want / N))
        frac, area = localisation(ta.patches[t], torch.eye(4, dtype=torch.bool)[None])
        torch.testing.assert_close(frac, torch.full((2, 4), area))


def test_identical_image_tokens_give_a_flat_heatmap_and_the_area_baseline(one_thread):
    """The vision projector's output zeroed: every image key of an image is the same, so each head splits its
    image share evenly over the patches (while image vs text stays peaked), and localisation is the area."""
    model = _model()
    with torch.no_grad():
        model.vision.projector.proj.weight.zero_()
        model.vision.projector.proj.bias.zero_()
    recs = sample_gates(model, _processor(model), _samples(("color", "count", "position")))
    for r in recs:
        a = r["gate"]["answer"]
        torch.testing.assert_close(a["patches"], (a["image"] / 16)[..., None, None].expand(2, 4, 1, 16))
        assert not torch.allclose(a["image"], a["uniform"].expand(2, 4), atol=1e-3)
    summary = summarise(recs)
    for t, row in summary["tasks"].items():
        loc = row["localisation"]
        assert 0 < loc["area"] < 1 and loc["pooled"] == pytest.approx(loc["area"], abs=1e-6), t
        assert all(x == pytest.approx(loc["area"], abs=1e-6) for x in loc["layers"])


def _overlaps(patch: int, cell: int) -> bool:
    """Patch `patch` of 12 pixels overlaps cell `cell` of 16 pixels (along one axis)."""
    return patch * 12 < (cell + 1) * 16 and (patch + 1) * 12 > cell * 16


def test_shape_patches_lie_in_the_captioned_cell():
    """`rc02`-style captions: colour, kind, column, row in a 3 x 3 grid of the 48-pixel image; the 4 x 4 patches
    (12 pixels) holding drawn pixels are among those overlapping that cell (16 pixels)."""
    from PIL import Image

    for i in range(12):
        s = make_sample("color", 0, i, D)
        img = s.messages[0]["content"][0]["image"]
        c, r = int(s.meta["captions"][0][2]), int(s.meta["captions"][0][3])
        allowed = torch.tensor([[_overlaps(y, r) and _overlaps(x, c) for x in range(4)] for y in range(4)])
        got = shape_patches(img, 4)
        assert got.any() and not (got & ~allowed).any(), (i, s.meta["captions"])
    assert not shape_patches(Image.new("RGB", (48, 48), (255, 255, 255)), 4).any()


def test_localisation_of_uniform_peaked_and_empty_attention():
    shape = torch.zeros(1, 4, 4, dtype=torch.bool)
    shape[0, 1:3, 2] = True
    frac, area = localisation(torch.full((3, 1, 16), 0.02), shape)
    assert area == 2 / 16 and torch.allclose(frac, torch.full((3,), area))
    peaked = torch.zeros(1, 16)
    peaked[0, 6] = 0.3  # patch (1, 2)
    assert float(localisation(peaked, shape)[0]) == 1.0
    assert math.isnan(float(localisation(torch.zeros(1, 16), shape)[0]))


def _records(task, share, uniform, *, on_shape=0.25, n=8, noise=0.01):
    """Synthetic `sample_gates` records: image share `share` (+ noise per sample; a list: one per sample),
    uniform share `uniform`, `on_shape` of the image mass on 4 of 16 patches (area 0.25); question tokens
    at the uniform share."""
    g = torch.Generator().manual_seed(0)
    shares = share if isinstance(share, list) else [share] * n
    shape = torch.zeros(1, 4, 4, dtype=torch.bool)
    shape[0, :2, :2] = True
    w = torch.where(shape.reshape(-1), on_shape / 4, (1 - on_shape) / 12)
    out = []
    for mean in shares:
        img = (mean + noise * torch.randn(2, 4, generator=g)).clamp(0, 1)
        q = torch.full((3, 2, 4), uniform)
        out.append({"task": task, "blocks": [0, 1], "shape": shape,
                    "gate": {"answer": {"image": img, "text": 1 - img, "own": 0.1 * (1 - img),
                                        "patches": img[..., None, None] * w.reshape(1, 16),
                                        "uniform": torch.tensor(uniform)},
                             "question": {"image": q, "text": 1 - q, "own": 0.1 * (1 - q),
                                          "uniform": torch.full((3,), uniform)}}})
    return out


@pytest.mark.parametrize("case, dependent", [
    ({"color": (0.40, 0.30), "count": (0.30, 0.30)}, True),  # excess 0.10 vs 0.00
    ({"color": (0.33, 0.30), "count": (0.30, 0.30)}, False),  # a difference under 0.05
    ({"color": (0.45, 0.30), "count": (0.30, 0.15)}, False),  # shares differ by 0.15, all of it the key counts
    ({"color": (0.99, 0.90), "count": (0.93, 0.90)}, False),  # a difference, but one task always open
])
def test_section_input_dependence_follows_the_rule(case, dependent):
    recs = [r for t, (share, uniform) in case.items() for r in _records(t, share, uniform)]
    text = section(summarise(recs))
    assert verdict(summarise(recs))["input_dependent"] is dependent
    assert ("the gate is input-dependent" in text) is dependent
    assert ("the gate is not input-dependent" in text) is not dependent
    assert text.index("**Rule") < text.index("| task")  # the rule comes before any number


def test_section_input_dependence_needs_more_than_noise():
    recs = _records("color", [0.1, 0.7], 0.3) + _records("count", [0.1, 0.5], 0.3)  # means 0.40 and 0.30
    v = verdict(summarise(recs))
    assert v["spread"] == pytest.approx(0.1, abs=0.01) and v["spread"] < 2 * v["se"] and v["input_dependent"] is False
    v = verdict(summarise(_records("color", [0.39, 0.41], 0.3) + _records("count", [0.29, 0.31], 0.3)))
    assert v["spread"] == pytest.approx(0.1, abs=0.01) and v["input_dependent"] is True


@pytest.mark.parametrize("on_shape, localises", [(0.6, True), (0.4, False)])  # 2.4x and 1.6x the area 0.25
def test_section_localisation_follows_the_rule(on_shape, localises):
    recs = _records("color", 0.4, 0.3, on_shape=on_shape) + _records("count", 0.4, 0.3, on_shape=0.9)
    summary = summarise(recs)
    assert summary["tasks"]["color"]["localisation"]["area"] == 0.25
    assert summary["tasks"]["color"]["localisation"]["pooled"] == pytest.approx(on_shape)
    assert summary["tasks"]["color"]["localisation"]["peak"] == (1.0 if on_shape / 4 > (1 - on_shape) / 12 else 0.0)
    text = section(summary, figure="gate.png")
    assert ("; it localises" in text) is localises and ("does not localise" in text) is not localises
    assert f"color {on_shape / 0.25:.2f}x" in text and "](gate.png)" in text


def test_plot_gate_heatmaps_writes_one_png(records, tmp_path):
    pytest.importorskip("matplotlib")
    items = [next(r for r in records if r["task"] == t) for t in TASKS]
    path = plot_gate_heatmaps(items, tmp_path / "gate.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
