"""Qwen2.5-VL, faithfully: dynamic resolution, M-RoPE and logit parity with transformers.

A tiny random Qwen2.5-VL is created and saved by transformers itself (with its
Qwen2-VL image processor, the PIL one: no torchvision here); casa builds its
models from that directory and must agree with transformers' model on it.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from PIL import Image

from casa.config import FusionConfig
from casa.core.batch import Batch
from casa.pretrained.build import build
from casa.pretrained.build_config import BuildConfig
from casa.vision.dynamic import patchify, preprocess_dynamic

pytestmark = pytest.mark.usefixtures("one_thread")

IMAGE, VIDEO, START, END = 290, 291, 292, 293  # the tiny vocabulary's vision tokens
MIN_PIXELS, MAX_PIXELS = 56 * 56, 28 * 28 * 40


def _pil_processor(**kw):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    return Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, **kw)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """(transformers model, its directory): weights far from their init, so that a wrong copy shows."""
    cfg = transformers.Qwen2_5_VLConfig(
        text_config=dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=4, out_hidden_size=64,
                           window_size=56, fullatt_block_indexes=[2]),
        image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=START, vision_end_token_id=END,
        bos_token_id=None, eos_token_id=None)
    torch.manual_seed(0)
    model = transformers.Qwen2_5_VLForConditionalGeneration(cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.3 * noise if "norm" in name else 0.3 * noise if p.dim() == 1 else noise / p.shape[-1] ** 0.5)
    path = tmp_path_factory.mktemp("qwen25vl") / "vl"
    model.save_pretrained(path)
    _pil_processor().save_pretrained(path)
    return model, path


@pytest.fixture(scope="module")
def insertion(qwen):
    return build(BuildConfig(lm=str(qwen[1]), vision=str(qwen[1]), fusion=FusionConfig(variant="insertion"),
                             tokenizer="byte")).model.eval()


def _image(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _hf_inputs(segments):
    """transformers' token stream for `segments` (lists of text ids, or ("image", n) / ("video", n)),
    and casa's: (hf ids [1, L], mm_token_type_ids [1, L], text ids [1, T], insertion points [N])."""
    hf, kinds, text, points = [], [], [], []
    for seg in segments:
        if isinstance(seg, tuple):
            kind, n = seg
            hf += [START] + [IMAGE if kind == "image" else VIDEO] * n + [END]
            kinds += [0] + [1 if kind == "image" else 2] * n + [0]
            text.append(START)
            points.append(len(text))
            text.append(END)
        else:
            hf += seg
            kinds += [0] * len(seg)
            text += seg
    as_row = lambda x: torch.tensor([x])  # noqa: E731
    return as_row(hf), as_row(kinds).int(), as_row(text), torch.tensor(points)


@pytest.mark.parametrize("size", [(90, 150), (200, 60), (28, 28), (500, 400), (20, 900), (56, 56)])
def test_dynamic_resolution_matches_transformers_processor(qwen, insertion, size):
    """Pixel values, grid and image-token count equal transformers' processor, for sizes and aspect
    ratios that scale up, down, and round each side."""
    img = _image(*size, seed=size[0])
    ref = _pil_processor()(images=[Image.fromarray(img)], return_tensors="pt")
    items = preprocess_dynamic([img], insertion.config.vision)
    flat, grid = patchify(items[0], patch=14, merge=2, temporal=2)
    assert torch.equal(grid, ref["image_grid_thw"][0])
    torch.testing.assert_close(flat, ref["pixel_values"], atol=1e-5, rtol=0)
    tokens = insertion.vision.encode_items(items)[0]
    assert tokens.shape == (int(ref["image_grid_thw"].prod()) // 4, 64)


def test_insertion_one_image_logits_equal_transformers(qwen, insertion):
    hf, _ = qwen
    img = _image(90, 150)
    ref = _pil_processor()(images=[Image.fromarray(img)], return_tensors="pt")
    n = int(ref["image_grid_thw"].prod()) // 4
    ids, kinds, text, points = _hf_inputs([[5, 6, 7], ("image", n), [8, 9, 10, 11]])
    with torch.no_grad():
        want = hf(input_ids=ids, mm_token_type_ids=kinds, pixel_values=ref["pixel_values"],
                  image_grid_thw=ref["image_grid_thw"]).logits[0, kinds[0] == 0]
        got = insertion(Batch(text, images=preprocess_dynamic([img], insertion.config.vision),
                              insertion_points=points), backend="reference")[0]
    assert want.abs().mean() > 0.5
    assert (got - want).abs().max() < 1e-4


def _video_frames(n, h, w, seed=5):
    return [_image(h, w, seed + i) for i in range(n)]




def _parity_case(hf, model, case):
    """(casa batch, transformers kwargs, mask of text positions) for the named case."""
    vc = model.config.vision
    if case == "two_images":
        imgs = [_image(90, 150, 1), _image(130, 70, 2)]
        ref = _pil_processor()(images=[Image.fromarray(x) for x in imgs], return_tensors="pt")
        n = (ref["image_grid_thw"].prod(-1) // 4).tolist()
        assert n[0] != n[1]
        ids, kinds, text, points = _hf_inputs([[5, 6], ("image", n[0]), [7, 8, 9], ("image", n[1]), [10, 11]])
        kw = dict(pixel_values=ref["pixel_values"], image_grid_thw=ref["image_grid_thw"])
        batch = Batch(text, images=preprocess_dynamic(imgs, vc), insertion_points=points)
    else:  # a short video: 5 frames (the last one repeated to make 3 temporal tokens), 2 fps
        frames = _video_frames(5, 60, 100)
        item = preprocess_dynamic([frames], vc)[0]
        flat, grid = patchify(item, patch=14, merge=2, temporal=2)
        seconds = 2 / 2.0
        ids, kinds, text, points = _hf_inputs([[5, 6], ("video", int(grid.prod()) // 4), [7, 8, 9, 10]])
        kw = dict(pixel_values_videos=flat, video_grid_thw=grid[None], second_per_grid_ts=torch.tensor([seconds]))
        step = hf.config.vision_config.tokens_per_second * seconds
        batch = Batch(text, images=[item], insertion_points=points, time_steps=torch.tensor([step]))
    return batch, dict(input_ids=ids, mm_token_type_ids=kinds, **kw), kinds[0] == 0


@pytest.mark.parametrize("case", ["two_images", "video"])
def test_insertion_logits_equal_transformers(qwen, insertion, case):
    """Two images of different sizes, and a video whose frames go in pairs (temporal patch 2)
    with M-RoPE's temporal step: same logits as transformers at every text token."""
    hf, _ = qwen
    batch, kw, text = _parity_case(hf, insertion, case)
    with torch.no_grad():
        want = hf(**kw).logits[0, text]
        got = insertion(batch, backend="reference")[0]
    assert want.abs().mean() > 0.5
    assert (got - want).abs().max() < 1e-4


@pytest.mark.parametrize("case", ["two_images", "video"])
def test_insertion_greedy_continuation_equals_transformers(qwen, insertion, case):
    """transformers' `generate` (its cache, `rope_deltas`) and casa's Session (image tokens in the
    stream, as `insertion` puts them) continue greedily with the same tokens, from the same logits
    at every step (a random model repeats itself, so the logits are what tells them apart)."""
    from casa.inference.session import Session

    hf, _ = qwen
    batch, kw, _ = _parity_case(hf, insertion, case)
    with torch.no_grad():
        out = hf.generate(**kw, max_new_tokens=6, do_sample=False, pad_token_id=0, output_logits=True,
                          return_dict_in_generate=True)
    want_tokens = out.sequences[0, kw["input_ids"].shape[1]:].tolist()
    session = Session(insertion, backend="reference")
    text, points = batch.input_ids[0].tolist(), batch.insertion_points.tolist()
    start = 0
    for i, p in enumerate(points):
        if p > start:
            session.forward_text(text[start:p])
        steps = batch.time_steps[i:i + 1] if batch.time_steps is not None else None
        session.add_images([batch.images[i]], time_steps=steps)
        start = p
    logits = session.forward_text(text[start:])[-1]
    tokens, errors = [], []
    for want in out.logits:
        errors.append(float((logits - want[0]).abs().max()))
        tokens.append(int(logits.argmax()))
        logits = session.forward_text([tokens[-1]])[-1]
    assert tokens == want_tokens
    assert max(errors) < 1e-4, errors


def _feed(session, batch):
    """Feed `batch` (one row) to `session` piece by piece; the logits of every text token `[T, vocab]`."""
    text, points = batch.input_ids[0].tolist(), batch.insertion_points.tolist()
    out, start = [], 0
    for i, p in enumerate(points + [len(text)]):
        if p > start:
            out.append(session.forward_text(text[start:p]))
            start = p
        if i < len(points):
            steps = batch.time_steps[i:i + 1] if batch.time_steps is not None else None
            session.add_images([batch.images[i]], time_steps=steps)
    return torch.cat(out)


@pytest.fixture(scope="module")
def fused(qwen):
    """CASA models built from the Qwen2.5-VL directory, fusion layers initialised from SA."""
    def make(variant, placement="parallel"):
        return build(BuildConfig(lm=str(qwen[1]), vision=str(qwen[1]), tokenizer="byte",
                                 fusion=FusionConfig(variant=variant, placement=placement))).model.eval()
    return make


@pytest.mark.parametrize("variant", ["insertion", "casa"])
@pytest.mark.parametrize("case", ["two_images", "video"])
def test_cached_session_equals_uncached_forward(qwen, fused, variant, case):
    """M-RoPE positions survive the incremental path: images of different sizes (and a video) fed to a
    Session give the logits of one uncached forward, for `insertion` and `casa`."""
    from casa.inference.session import Session

    model = fused(variant)
    batch, _, _ = _parity_case(qwen[0], model, case)
    with torch.no_grad():
        want = model(batch, backend="reference")[0]
    got = _feed(Session(model, backend="reference"), batch)
    assert (got - want).abs().max() < 1e-4


@pytest.mark.parametrize("variant", ["insertion", "casa"])
def test_processor_video_part_is_a_window_per_frame_cached_equals_uncached(fused, variant):
    """A video part through the processor at dynamic resolution: each frame its own `[C, H, W]` item
    (grid gt = 1, never merged in temporal pairs) at its own insertion point, the gist after it; the
    Session fed frame by frame gives the uncached forward's logits (M-RoPE positions included)."""
    from casa.data import Processor, check_sample, pack_row
    from casa.inference.session import Session
    from casa.pretrained.tokenizer import ByteTokenizer

    model = fused(variant)
    sample = check_sample({"messages": [
        {"role": "user", "content": [{"type": "video", "frames": _video_frames(3, 60, 100)}, "Where?"]},
        {"role": "assistant", "content": "left"}]})
    enc = Processor(ByteTokenizer(), model.config.vision).encode(sample)
    assert [tuple(x.shape) for x in enc.pixels] == [(3, 56, 112)] * 3 and enc.grids == [(1, 2, 4)] * 3
    assert enc.points == [2, 3, 4]
    batch = pack_row([enc])
    with torch.no_grad():
        want = model(batch, backend="reference")[0]
    got = _feed(Session(model, backend="reference"), batch)
    assert (got - want).abs().max() < 1e-4


def test_fusion_from_sa_zero_output_where_the_construction_gives_one(qwen, fused):
    """Built from SA, `gated_ca` adds nothing at init (tanh gates at 0): the model is Qwen's LM on the
    text alone. CASA `replace` is the LM exactly on the text before the first image (its window is
    the document so far: same keys, same positions as SA) and differs after it (it reads images)."""
    hf, _ = qwen
    batch, _, _ = _parity_case(hf, fused("insertion"), "two_images")
    with torch.no_grad():
        lm_alone = hf(input_ids=batch.input_ids).logits[0]
        gated = fused("gated_ca")(batch, backend="reference")[0]
        replace = fused("casa", "replace")(batch, backend="reference")[0]
    assert (gated - lm_alone).abs().max() < 1e-4
    first = int(batch.insertion_points[0])
    assert (replace[:first] - lm_alone[:first]).abs().max() < 1e-4
    assert (replace[first:] - lm_alone[first:]).abs().max() > 0.1


@pytest.fixture(scope="module")
def built_dir(qwen, tmp_path_factory):
    """`casa build --lm DIR --vision DIR` (the paper's Qwen recipe) and the summary it printed."""
    import contextlib
    import io

    from casa.cli import main

    out, err = tmp_path_factory.mktemp("built") / "casa_qwen", io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(["build", "--lm", str(qwen[1]), "--vision", str(qwen[1]), "--out", str(out), "--fusion", "casa",
                     "--tokenizer", "byte", "--dtype", "float32"]) == 0
    return out, err.getvalue()


def test_build_is_the_papers_qwen_recipe(qwen, built_dir):
    """LM frozen; CASA layers, the last 2 vision blocks and the merger train; no new projector;
    the summary names each part's counts."""
    hf, _ = qwen
    _, summary = built_dir
    visual = hf.model.visual
    count = lambda mods: sum(p.numel() for m in mods for p in m.parameters())  # noqa: E731
    vision_trainable = count([*visual.blocks[-2:], visual.merger])
    lm_total = count([hf.model.language_model, hf.lm_head])
    lines = {line.split("  ")[1].strip(): line for line in summary.splitlines() if line.startswith("  ")}
    assert f"{vision_trainable:,} of {count([visual]):,} trainable" in " ".join(lines["vision encoder"].split())
    assert f"0 of {lm_total:,} trainable" in " ".join(lines["language model"].split())
    assert "0 of 0 trainable" in " ".join(lines["projector"].split())
    fusion = " ".join(lines["fusion layers"].split()).split()
    assert fusion[2] == fusion[4] and int(fusion[2].replace(",", "")) > 0  # all of them
    assert "dynamic resolution (3,136..31,360 pixels, 28px per token); projector identity" in summary


def test_caption_chat_and_eval_at_non_square_sizes(built_dir, tmp_path):
    """`casa caption` on a real non-square video (PyAV), and a chat turn with two images of different
    sizes whose reply is evaluation's greedy answer to the same question."""
    import json

    from test_stream import encode_video

    from casa.cli import main
    from casa.data.sample import Sample
    from casa.eval.decode import greedy_decode
    from casa.inference.generate import Chat, Sampling
    from casa.inference.session import Session
    from casa.pretrained.directory import load

    out, _ = built_dir
    video = encode_video(tmp_path / "wide.mp4", 6, fps=4, size=(48, 112))
    jsonl = tmp_path / "captions.jsonl"
    assert main(["caption", str(video), "--checkpoint", str(out), "--jsonl", str(jsonl), "--fps", "2",
                 "--max-new-tokens", "3", "--min-new-tokens", "1", "--threads", "1", "--quiet"]) == 0
    lines = [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines()]
    assert lines[-1]["frames"] == 3 and [c["time"] for c in lines[:-1]] == [0.0, 0.5, 1.0]
    assert all(c["tokens"] >= 1 for c in lines[:-1])

    model, tok, proc = load(out)
    images = [_image(90, 150, 1), _image(130, 70, 2)]
    chat = Chat(Session(model), proc, sampling=Sampling(max_new_tokens=5))
    reply = chat.ask("What differs?", images=images)
    sample = Sample([{"role": "user", "content": [*({"type": "image", "image": x} for x in images),
                                                  {"type": "text", "text": "What differs?"}]},
                     {"role": "assistant", "content": [{"type": "text", "text": "a"}]}])
    enc = proc.pixels(proc.encode(sample))
    assert enc.grids == [(1, 3, 5), (1, 5, 2)]  # 15 and 10 image tokens
    want = greedy_decode(model, [enc.prefix(enc.turns[0][0])], proc, max_new_tokens=5)[0]
    got = reply.tokens[:-1] if reply.generation.stop_reason == "stop_token" else reply.tokens
    assert got == want and len(want) >= 1


@pytest.mark.parametrize("variant", ["insertion", "casa"])
def test_packed_documents_equal_each_alone(qwen, fused, variant):
    """Packing with dynamic resolution: the packer counts each image's real tokens, a packed row
    carries items and grids, and M-RoPE positions restart per document (each document's logits are
    its own forward's)."""
    from casa.data.packing import Packer, pack_row
    from casa.data.processor import Processor
    from casa.data.sample import Sample
    from casa.pretrained.tokenizer import ByteTokenizer

    model = fused(variant)
    proc = Processor(ByteTokenizer(), model.config.vision, gist=False)
    samples = [Sample([{"role": "user", "content": [{"type": "image", "image": _image(h, w, h)},
                                                    {"type": "text", "text": "hi"}]},
                       {"role": "assistant", "content": [{"type": "text", "text": "ok"}]}])
               for h, w in [(90, 150), (200, 60)]]
    packer = Packer(samples, proc, text_tokens=512, image_tokens=1000, splice_images=variant == "insertion")
    docs = next(packer.packs()).docs
    assert [proc.image_tokens(d) for d in docs] == [15, 14] and len(docs) == 2
    row = pack_row(docs)
    assert row.image_grids.tolist() == [[1, 3, 5], [1, 7, 2]]
    with torch.no_grad():
        packed = model(row, backend="reference")[0]
        alone = torch.cat([model(pack_row([d]), backend="reference")[0] for d in docs])
    assert (packed - alone).abs().max() < 1e-4
