"""Training-free image-token compression (`casa.study.compression`): exact values on tiny models."""

import math
from dataclasses import replace

import pytest
import torch
from conftest import make_batch

from casa.config import ModelConfig
from casa.core.lm import Rotary
from casa.core.model import CasaModel
from casa.data import Processor
from casa.eval.decode import greedy_decode, greedy_decode_uncached
from casa.eval.synthetic import eval_samples, evaluate, questions
from casa.pretrained.tokenizer import ByteTokenizer
from casa.study.compression import (
    compress,
    compressed_images,
    frame_kv_bytes,
    image_scores,
    mean_over_seeds,
    plot_compression,
    pool_shape,
    run_compression,
    section,
    verdict,
)
from casa.vision.tower import reduce_tokens

# 2 blocks of width 32, 32x32 images in 8x8 patches: 16 image tokens (a 4 x 4 grid), byte vocabulary
MODEL = {"lm": {"vocab_size": 264, "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_ff": 64},
         "vision": {"image_size": 32, "patch_size": 8, "d_model": 16, "n_layers": 1, "n_heads": 2, "d_ff": 32}}
T, POINTS = 10, [3, 7]  # windows [0, 3) without an image, [3, 7) image 0, [7, 10) image 1


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _model(variant: str, *, peaked: bool = False) -> CasaModel:
    torch.manual_seed(0)
    fusion = {"variant": variant} if variant == "insertion" else {"variant": variant, "placement": "parallel"}
    model = CasaModel(ModelConfig.from_dict({**MODEL, "fusion": fusion})).eval()
    if peaked:  # random, larger q/k projections in the first attention that reads images: distinct scores
        g = torch.Generator().manual_seed(1)
        first = model.blocks[0]
        attn = first.attn if variant == "insertion" else first.fusion.attn
        with torch.no_grad():
            for proj in (attn.q_proj, attn.k_proj):
                proj.weight.copy_(torch.randn(proj.weight.shape, generator=g) * 0.6)
    return model


def _batch():
    g = torch.Generator().manual_seed(2)
    return make_batch(torch.randint(0, 250, (1, T), generator=g), POINTS, image_size=32, seed=3)


# ------------------------------------------------------------------ compress
def test_pooling_a_known_grid_gives_its_block_averages():
    x = torch.arange(16.0).reshape(1, 16, 1)  # a 4 x 4 grid, row-major: row r holds 4r .. 4r + 3
    assert [pool_shape(16, f) for f in (2, 4, 8, 16)] == [(1, 2), (2, 2), (2, 4), (4, 4)]
    assert compress(x, "pool", 2).flatten().tolist() == [0.5, 2.5, 4.5, 6.5, 8.5, 10.5, 12.5, 14.5]
    assert compress(x, "pool", 4).flatten().tolist() == [2.5, 4.5, 10.5, 12.5]  # 2 x 2 blocks
    assert compress(x, "pool", 8).flatten().tolist() == [3.5, 11.5]  # 2 x 4: the top and the bottom half
    assert compress(x, "pool", 16).flatten().tolist() == [7.5]
    for f, r in ((4, 2), (16, 4)):  # square blocks: the vision tower's own pooling
        assert torch.equal(compress(x, "pool", f), reduce_tokens(x, "pool", r))
    assert compress(x, "pool", 1) is x
    # not a square grid: consecutive groups; one image `[n, d]` keeps its rank
    assert compress(torch.arange(6.0)[:, None], "pool", 2).flatten().tolist() == [0.5, 2.5, 4.5]
    with pytest.raises(ValueError, match="cannot be pooled 4x"):
        compress(torch.arange(6.0)[:, None], "pool", 4)
    with pytest.raises(ValueError, match="factor 32"):
        compress(x, "pool", 32)


def test_topk_keeps_the_highest_scores_in_their_original_order():
    x = torch.arange(6.0)[:, None] * torch.ones(1, 3)
    scores = torch.tensor([0.1, 0.9, 0.3, 0.8, 0.0, 0.5])
    assert compress(x, "topk", 2, scores=scores)[:, 0].tolist() == [1.0, 3.0, 5.0]
    assert compress(x, "topk", 6, scores=scores)[:, 0].tolist() == [1.0]
    with pytest.raises(ValueError, match="needs scores"):
        compress(x, "topk", 2)


# ----------------------------------------------------------- on a model
@pytest.mark.parametrize("variant", ["casa", "insertion"])
def test_factor_one_gives_the_uncompressed_logits_exactly(variant):
    model, batch = _model(variant), _batch()
    with torch.no_grad():
        ref = model(batch)
        for method in ("pool", "topk"):
            with compressed_images(model, method, 1):
                assert torch.equal(model(batch), ref)
    assert "encode_images" not in model.__dict__


def _hand_casa_scores(model, batch):
    """Per image token: attention probability from the window's text queries in the first fusion layer,
    one query, head and key at a time (keys: the window's images, then its text up to the query)."""
    captured = {}
    layer = model.blocks[0].fusion
    layer.probe = lambda q, k_txt, k_img, layout, text_keys: captured.update(q=q[0], kt=k_txt[0], ki=k_img)
    try:
        with torch.no_grad():
            model(batch)
    finally:
        layer.probe = None
    q, kt, ki = captured["q"], captured["kt"], captured["ki"]
    n, H, D = model.tokens_per_image, q.shape[1], q.shape[2]
    group = H // kt.shape[1]
    scores = torch.zeros(len(POINTS) * n)
    bounds = POINTS + [T]
    for i in range(len(POINTS)):
        start, end = bounds[i], bounds[i + 1]
        img = ki[i * n:(i + 1) * n]
        for t in range(start, end):
            for h in range(H):
                keys = torch.cat([img[:, h // group], kt[start:t + 1, h // group]])
                p = torch.softmax(keys @ q[t, h] / math.sqrt(D), dim=0)
                scores[i * n:(i + 1) * n] += p[:n] / H
    return scores


def _hand_insertion_scores(model, batch):
    """The same for insertion: the spliced row built by hand (text[0:3], image 0, text[3:7], image 1,
    text[7:10]; positions count image tokens), block 0's causal self-attention, window text as queries."""
    n = model.tokens_per_image
    with torch.no_grad():
        images = model.vision(batch.images)  # [2, n, d]
        text = model.embed(batch.input_ids[0])
        parts, text_at, image_at = [], [], []
        bounds = [0] + POINTS + [T]
        for i in range(len(bounds) - 1):
            if i:
                image_at.append(list(range(sum(len(p) for p in parts), sum(len(p) for p in parts) + n)))
                parts.append(images[i - 1])
            start = sum(len(p) for p in parts)
            text_at += list(range(start, start + bounds[i + 1] - bounds[i]))
            parts.append(text[bounds[i]:bounds[i + 1]])
        h = torch.cat(parts)
        block, lm = model.blocks[0], model.config.lm
        x = block.input_layernorm(h)
        rot = Rotary.at(torch.arange(len(h)), head_dim=lm.head_dim, theta=lm.rope_theta)
        q, k = rot.apply(block.attn.q(x)), rot.apply(block.attn.kv(x)[0])
    H, D, group = q.shape[1], q.shape[2], q.shape[1] // k.shape[1]
    scores = torch.zeros(len(POINTS) * n)
    for i in range(len(POINTS)):
        for t in range(POINTS[i], ([*POINTS, T])[i + 1]):
            s = text_at[t]
            for hd in range(H):
                p = torch.softmax(k[: s + 1, hd // group] @ q[s, hd] / math.sqrt(D), dim=0)
                scores[i * n:(i + 1) * n] += p[image_at[i]] / H
    return scores


@pytest.mark.parametrize("variant", ["casa", "insertion"])
def test_topk_keeps_exactly_the_tokens_with_the_most_attention(variant):
    model, batch = _model(variant, peaked=True), _batch()
    n = model.tokens_per_image
    hand = (_hand_casa_scores if variant == "casa" else _hand_insertion_scores)(model, batch)
    got = image_scores(model, batch)
    assert torch.allclose(got, hand, atol=1e-5)
    per_image = hand.view(2, n)
    assert (per_image.sum(1) > 0.05).all()  # the images are attended to, the ranking is not of zeros
    with torch.no_grad():
        raw = model.vision(batch.images)
        with compressed_images(model, "topk", 4):
            kept = model.encode_images(batch)
    for i in range(2):
        top = sorted(per_image[i].topk(n // 4).indices.tolist())
        assert sorted(per_image[i].argsort(descending=True)[: n // 4].tolist()) == top
        assert torch.equal(kept[i], raw[i, top])


@pytest.mark.parametrize("variant", ["casa", "insertion"])
@pytest.mark.parametrize("method,factor", [("pool", 4), ("topk", 2)])
def test_a_compressed_forward_equals_a_forward_given_the_compressed_tokens(variant, method, factor):
    model, batch = _model(variant, peaked=True), _batch()
    with torch.no_grad():
        raw = model.vision(batch.images)
        scores = image_scores(model, batch).view(2, -1) if method == "topk" else None
        direct = model(replace(batch, images=None, image_embeds=list(compress(raw, method, factor, scores=scores))))
        with compressed_images(model, method, factor):
            out = model(batch)
    assert torch.equal(out, direct)
    with torch.no_grad():
        assert not torch.allclose(model(batch), out)  # compression did change the logits


@pytest.mark.parametrize("variant", ["casa", "insertion"])
def test_cached_decoding_of_compressed_windows_equals_the_uncached_forward(variant):
    """`evaluate` decodes through sessions: they take compressed windows as the forward does."""
    model = _model(variant)
    proc = Processor(ByteTokenizer(), model.config.vision)
    items, _ = questions(eval_samples(["color", "count"], 2, difficulty={"image_size": 32}), proc)
    prompts = [q.prompt for q in items]
    for method in ("pool", "topk"):
        with compressed_images(model, method, 4):
            assert greedy_decode(model, prompts, proc, max_new_tokens=5) == \
                   greedy_decode_uncached(model, prompts, proc, max_new_tokens=5)


def test_kv_bytes_per_frame_scale_with_the_tokens_for_insertion_only():
    lm = MODEL["lm"]
    per_token_layer = 2 * lm["n_kv_heads"] * (lm["d_model"] // lm["n_heads"]) * 4  # K and V, fp32
    ins, casa = _model("insertion"), _model("casa")
    for f in (1, 2, 4, 8):
        m = 16 // f
        assert frame_kv_bytes(ins, m) == {"kv_bytes_per_frame": m * lm["n_layers"] * per_token_layer,
                                          "image_kv_peak_bytes": m * lm["n_layers"] * per_token_layer}
        # CASA: nothing enters the LM cache; its windows hold the image K/V of each fusion layer meanwhile
        assert frame_kv_bytes(casa, m) == {"kv_bytes_per_frame": 0, "image_kv_peak_bytes": m * 2 * per_token_layer}


def test_run_compression_from_model_directories(tmp_path):
    from casa.pretrained.directory import save_pretrained

    for v in ("casa", "insertion"):
        save_pretrained(_model(v), tmp_path / "models" / v, tokenizer=ByteTokenizer())
    diff = {"image_size": 32}
    res = run_compression(tmp_path / "models", tasks=["color", "count"], n=2, difficulty=diff, factors=(1, 2, 8),
                          latency_prompts=1, repeats=1, out=tmp_path / "out")
    assert list(res["variants"]) == ["casa", "insertion"]
    proc = Processor(ByteTokenizer(), _model("casa").config.vision)
    for name, r in res["variants"].items():
        assert [(x["method"], x["factor"], x["tokens_per_window"]) for x in r["rows"]] == [
            ("none", 1, 16), ("pool", 2, 8), ("pool", 8, 2), ("topk", 2, 8), ("topk", 8, 2)]
        # factor 1 is the uncompressed model: evaluate's scores
        plain = evaluate(_model(name), proc, eval_samples(["color", "count"], 2, difficulty=diff))
        assert r["rows"][0]["tasks"] == {t: v["score"] for t, v in plain["tasks"].items()}
        assert r["rows"][0]["ttft_ratio"] == 1.0 and all(x["ttft_ms"] > 0 for x in r["rows"])
        kv = [x["kv_bytes_per_frame"] for x in r["rows"]]
        assert kv == ([0] * 5 if name == "casa" else [kv[0], kv[0] // 2, kv[0] // 8, kv[0] // 2, kv[0] // 8])
    assert (tmp_path / "out" / "compression.json").is_file()
    assert (tmp_path / "out" / "compression.md").read_text().startswith("## Image-token compression")
    with pytest.raises(ValueError, match="factor 32"):
        run_compression({"casa": (_model("casa"), proc)}, tasks=["color"], n=1, factors=(1, 32))


# -------------------------------------------------------------- report
def _results(casa: tuple[float, float], insertion: tuple[float, float]) -> dict:
    def rows(a0, a4):
        def row(method, f, acc):
            return {"method": method, "factor": f, "tokens_per_window": 16 // f, "accuracy": acc, "tasks": {},
                    "kv_bytes_per_frame": 0, "image_kv_peak_bytes": 1024 // f, "ttft_ms": 2.0, "ttft_ratio": 1.0}
        return [row("none", 1, a0), row("pool", 4, a4), row("topk", 4, a0)]

    return {"variants": {"casa": {"questions": 30, "rows": rows(*casa)},
                         "insertion": {"questions": 30, "rows": rows(*insertion)}}}


@pytest.mark.parametrize("casa,insertion,combines,why", [
    ((0.90, 0.85), (0.90, 0.88), True, ""),  # keeps 94%, drop 5 <= 2 + 5
    ((1.00, 0.90), (1.00, 0.95), True, ""),  # on both edges: keeps 90%, drop 10 = 5 + 5
    ((0.90, 0.80), (0.90, 0.70), False, "keeps 89% < 90%"),
    ((0.90, 0.83), (0.90, 0.90), False, "drop 7.0 pts > insertion's 0.0 + 5"),
])
def test_the_verdict_follows_the_rule_stated_before_the_numbers(casa, insertion, combines, why):
    res = _results(casa, insertion)
    assert verdict(res)["combines"] is combines
    md = section(res)
    rule, table, finding = md.index("**Rule**"), md.index("| variant |"), md.index("**Finding**")
    assert rule < table < finding
    line = md[finding:].splitlines()[0]
    said = "at 4x pool, CASA " + ("combines with compression" if combines else
                                  f"does not combine with compression ({why})")
    assert said in line, line
    assert f"{casa[1] / casa[0]:.0%} of its accuracy ({casa[0]:.3f} -> {casa[1]:.3f}" in line
    assert "not judged" in section({"variants": {"casa": res["variants"]["casa"]}})


def test_plot_writes_both_panels(tmp_path):
    pytest.importorskip("matplotlib")
    path = plot_compression(_results((0.9, 0.85), (0.9, 0.8)), tmp_path / "c.png")
    assert path.is_file() and path.stat().st_size > 10_000


def test_mean_over_seeds_averages_accuracy_and_keeps_each_seed():
    a, b = _results((0.9, 0.8), (0.9, 0.7))["variants"]["casa"], _results((0.7, 0.6), (0.9, 0.7))["variants"]["casa"]
    m = mean_over_seeds([a, b])
    assert m["seeds"] == 2 and m["questions"] == 60
    assert [r["accuracy"] for r in m["rows"]] == pytest.approx([0.8, 0.7, 0.8])
    assert m["rows"][1]["accuracy_seeds"] == [0.8, 0.6]
