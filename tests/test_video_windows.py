"""A video part is one window per frame, each closed by its gist token
(docs/design.md §2): the processor's rendering, the model's windows, cached
decoding, evaluation (blind included), export, live chat, and the refusal of
a processor that has no gist token."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_generate import Recorder, uncached_next

from casa.config import ModelConfig, VisionConfig
from casa.core.model import CasaModel
from casa.data import (
    DataError,
    Processor,
    Sample,
    check_sample,
    pack_row,
    read_jsonl,
    write_jsonl,
)
from casa.eval.decode import greedy_decode, greedy_decode_uncached
from casa.eval.synthetic import questions
from casa.inference.generate import Chat, Sampling
from casa.inference.session import Session
from casa.pretrained.tokenizer import ByteTokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

TOK = ByteTokenizer()
GIST, PREFIX = TOK.token_id("<|gist|>"), TOK.token_id("<|image|>")
VISION = VisionConfig(image_size=16, patch_size=8, d_model=32, n_layers=1, n_heads=4, d_ff=64)


def frames(n=3, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)) for _ in range(n)]


def video_sample(clip, *, before=(), source="<memory>"):
    """A user turn: `before` parts, the clip as one video part, a question; then the answer."""
    return check_sample({"messages": [
        {"role": "user", "content": [*before, {"type": "video", "frames": clip}, {"type": "text", "text": "Where?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "left"}]}]}, source)


def model_for(variant):
    torch.manual_seed(0)
    m = CasaModel(ModelConfig.from_dict({
        "lm": {"vocab_size": 264, "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_ff": 64},
        "vision": {"image_size": 16, "patch_size": 8, "d_model": 32, "n_layers": 1, "n_heads": 4, "d_ff": 64},
        "fusion": {"variant": variant}})).eval()
    with torch.no_grad():  # weights far from the init, so that every path shows in the logits
        for name, p in m.named_parameters():
            if p.dim() == 2 and "vision" not in name:
                p.normal_(0, 0.3)
    return m


# ------------------------------------------------------------- rendering
def test_each_frame_is_a_group_of_its_own_with_its_gist():
    enc = Processor(TOK, VISION).encode(video_sample(frames()))
    assert TOK.decode(enc.ids, skip_special=False).startswith("<bos><|user|><|gist|><|gist|><|gist|>Where?<|end|>")
    assert enc.points == [2, 3, 4]  # three insertion points: three windows
    assert [enc.ids[p] for p in enc.points] == [GIST] * 3  # each frame read first by its own gist token
    assert enc.pixels.shape == (3, 3, 16, 16)
    # with a prefix token: [prefix] frame [gist] per frame
    enc = Processor(TOK, VISION, image_prefix="<|image|>").encode(video_sample(frames()))
    assert enc.points == [3, 5, 7]
    assert [(enc.ids[p - 1], enc.ids[p]) for p in enc.points] == [(PREFIX, GIST)] * 3


def test_image_parts_still_share_a_window_before_a_video():
    a, b = frames(2, seed=1)
    images = [{"type": "image", "image": a}, {"type": "image", "image": b}]
    enc = Processor(TOK, VISION, image_prefix="<|image|>").encode(video_sample(frames(2), before=images))
    assert TOK.decode(enc.ids, skip_special=False).startswith(
        "<bos><|user|><|image|><|gist|><|image|><|gist|><|image|><|gist|>Where?")
    assert enc.points == [3, 3, 5, 7]  # two images in one group, then a group per frame


def test_windows_of_the_model_put_each_frame_in_its_own_window():
    enc = Processor(TOK, VISION).encode(video_sample(frames(), before=[{"type": "text", "text": "Clip:"}]))
    layout = pack_row([enc]).layout(4)
    windows = layout.image_window.tolist()
    assert len(set(windows)) == 3 and layout.n_windows == 4  # the text before the clip, then one per frame
    text_window = layout.text_window[0]
    for p, w in zip(enc.points, windows):
        assert text_window[p] == w and enc.ids[p] == GIST
        assert int((text_window == w).sum()) == (1 if w != windows[-1] else len(enc.ids) - p)  # the gist alone
    # the last frame's window runs to the end: the question and the answer read that frame only


def test_a_processor_without_gist_refuses_a_video_part(tmp_path):
    sample = video_sample(frames(), source="clips.jsonl:7")
    for proc in (Processor(TOK, VISION, gist=False), Processor(TOK, VISION, gist=False, image_prefix="<|image|>")):
        with pytest.raises(DataError, match=r"^clips\.jsonl:7: message 0: a video part needs a gist token after "
                                            r"each frame .* \(gist=False\)"):
            proc.encode(sample)
    # image parts are fine without a gist token
    one = check_sample({"messages": [{"role": "user", "content": [{"type": "image", "image": frames(1)[0]}, "?"]},
                                     {"role": "assistant", "content": "x"}]})
    assert Processor(TOK, VISION, gist=False).encode(one).points == [2]
    # live chat refuses at once, before anything is recorded
    chat = Chat(Session(model_for("casa")), Processor(TOK, VISION, gist=False))
    with pytest.raises(ValueError, match=r"^Chat\.user\(video=\.\.\.\): a video part needs a gist token"):
        chat.user("Where?", video=frames())
    assert chat.new == [] and chat.turns == 0


def test_dynamic_resolution_frames_are_images_not_a_temporal_clip():
    """With Qwen2.5-VL's dynamic resolution each frame is its own `[C, H, W]` item (gt = 1,
    a window each), never one `[F, C, H, W]` clip whose frames merge in temporal pairs."""
    vc = VisionConfig(image_size=56, patch_size=28, min_pixels=28 * 28, max_pixels=56 * 56)
    enc = Processor(TOK, vc).encode(video_sample(frames(3)))
    assert [tuple(x.shape) for x in enc.pixels] == [(3, 28, 28)] * 3
    assert enc.grids == [(1, 1, 1)] * 3 and enc.points == [2, 3, 4]


# ------------------------------------------------------- cached decoding
@pytest.mark.parametrize("variant", ["casa", "insertion"])
def test_cached_session_equals_uncached_forward_on_a_video_part(variant):
    m = model_for(variant)
    enc = Processor(TOK, m.config.vision).encode(video_sample(frames(), before=[{"type": "text", "text": "Hi"}]))
    batch = pack_row([enc])
    with torch.no_grad():
        want = m(batch, backend="reference")[0]
    s, out, fed = Session(m, backend="reference"), [], 0
    for i, p in enumerate(enc.points):
        if p > fed:
            out.append(s.forward_text(enc.ids[fed:p]))
            fed = p
        s.add_images(enc.pixels[i:i + 1])
    out += [s.forward_text([t]) for t in enc.ids[fed:]]  # token by token after the last frame
    torch.testing.assert_close(torch.cat(out), want, atol=1e-5, rtol=1e-5)
    # the check can fail: the old layout (the three frames in one window) gives other logits
    one_window = replace(batch, insertion_points=torch.full((3,), enc.points[0]))
    with torch.no_grad():
        shared = m(one_window, backend="reference")[0]
    assert (shared - want).abs().max() > 1e-3


@pytest.mark.parametrize("variant", ["casa", "insertion"])
def test_evaluation_of_a_video_question_cached_equals_uncached(variant):
    m = model_for(variant)
    proc = Processor(TOK, m.config.vision)
    samples = [video_sample(frames(3, seed=s)) for s in range(2)] + [video_sample(frames(1, seed=5))]
    items, _ = questions(samples, proc)
    assert [q.prompt.n_images for q in items] == [3, 3, 1] and len(set(items[0].prompt.points)) == 3
    prompts = [q.prompt for q in items]
    proc.stop_ids = set()
    plain = greedy_decode_uncached(m, prompts, proc, max_new_tokens=5)
    assert plain[0] != plain[1]  # the frames matter
    assert greedy_decode(m, prompts, proc, max_new_tokens=5) == plain


def test_blind_questions_drop_every_frame_and_its_markers():
    proc = Processor(TOK, VISION, image_prefix="<|image|>")
    sample = video_sample(frames(), before=[{"type": "image", "image": frames(1, seed=3)[0]}])
    [seen], _ = questions([sample], proc)
    [blind], _ = questions([sample], proc, blind=True)
    assert seen.prompt.n_images == 4 and seen.prompt.ids.count(GIST) == 4  # the image, then each frame
    assert blind.prompt.n_images == 0 and blind.prompt.pixels is None
    assert GIST not in blind.prompt.ids and PREFIX not in blind.prompt.ids
    assert TOK.decode(blind.prompt.ids, skip_special=False) == "<bos><|user|>Where?<|end|><|assistant|>"
    assert (blind.answer, blind.question) == (seen.answer, seen.question) == ("left", "Where?")


# ------------------------------------------------------ export, live chat
def test_export_and_read_back_keep_the_video_part(tmp_path):
    clip = frames(3, seed=2)
    sample = Sample(video_sample(clip).messages, meta={"task": "clips"})
    path = write_jsonl([sample], tmp_path, name="clips.jsonl")
    [back], skipped = read_jsonl(path)
    part = back.messages[0]["content"][0]
    assert skipped == 0 and part["type"] == "video" and back.meta == {"task": "clips"}
    assert [Path(f).relative_to(tmp_path).as_posix() for f in part["frames"]] == [
        f"images/clips/000000_{i}.png" for i in range(3)]
    assert [np.asarray(Image.open(f)).tolist() for f in part["frames"]] == [np.asarray(x).tolist() for x in clip]
    proc = Processor(TOK, VISION)
    a, b = proc.encode(sample), proc.encode(back)
    assert a.ids == b.ids and a.points == b.points == [2, 3, 4]
    assert torch.equal(a.pixels, b.pixels)


def test_chat_feeds_a_video_as_the_processor_renders_it():
    """`Chat.user(video=...)` feeds one window per frame, a gist after each: the stream of
    evaluation's prompt for the same sample; then a plain image turn still opens one window."""
    m = model_for("casa")
    proc = Processor(TOK, m.config.vision)
    clip = frames()
    s = Recorder(m)
    chat = Chat(s, proc, sampling=Sampling(max_new_tokens=3))
    first = chat.ask("Where?", video=clip)
    enc = proc.encode(video_sample(clip), pixels=False)
    prompt = enc.prefix(enc.turns[0][0])
    assert s.ids[: len(prompt.ids)] == prompt.ids and s.points == prompt.points == [2, 3, 4]
    assert s.images == 3 and uncached_next(m, s, len(prompt.ids)) == first.tokens[0]  # the reply reads all frames
    chat.ask("", images=frames(2, seed=9))  # two images of one turn: one window
    assert s.points[3] == s.points[4] > s.points[2] and s.ids[s.points[3]] == GIST
