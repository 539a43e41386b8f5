import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json

import pytest
import torch
from PIL import Image

from casa.config import ModelConfig, VisionConfig
from casa.core.loss import loss_sum
from casa.core.model import CasaModel
from casa.data import (
    TASKS,
    DataError,
    Packer,
    Processor,
    SyntheticSource,
    check_sample,
    make_sample,
    pack_row,
    read_jsonl,
    stack_rows,
    write_jsonl,
)
from casa.data.tasks import difficulty
from casa.pretrained.tokenizer import ByteTokenizer

VISION = VisionConfig(image_size=16, patch_size=8, d_model=32, n_layers=1, n_heads=4, d_ff=64)


def processor(**kw):
    return Processor(ByteTokenizer(), VISION, **kw)


def tiny_model(variant="casa"):
    torch.manual_seed(0)
    return CasaModel(ModelConfig.from_dict({
        "lm": {"vocab_size": 264, "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_ff": 64},
        "vision": {"image_size": 16, "patch_size": 8, "d_model": 32, "n_layers": 1, "n_heads": 4, "d_ff": 64},
        "fusion": {"variant": variant}})).eval()


def chat(*parts, answer="yes"):
    return {"messages": [{"role": "user", "content": list(parts)},
                         {"role": "assistant", "content": [{"type": "text", "text": answer}]}]}


# ------------------------------------------------------------ processor
def test_template_targets_and_insertion_points():
    tok = ByteTokenizer()
    img = Image.new("RGB", (20, 20), "red")
    enc = processor().encode(chat({"type": "image", "image": img}, {"type": "text", "text": "Hi?"}, answer="ok"))
    text = tok.decode(enc.ids, skip_special=False)
    assert text == "<bos><|user|><|gist|>Hi?<|end|><|assistant|>ok<|end|>"
    assert enc.points == [2]  # before the gist token, which reads the image
    targets = tok.decode([i for i, t in zip(enc.ids, enc.targets) if t], skip_special=False)
    assert targets == "ok<|end|>"  # loss on the assistant's tokens only
    assert enc.pixels.shape == (1, 3, 16, 16)
    assert enc.turns == [(len(enc.ids) - 3, len(enc.ids))]


def test_consecutive_images_share_a_window_and_prefix_token():
    imgs = [{"type": "image", "image": Image.new("RGB", (8, 8), c)} for c in ("red", "blue")]
    enc = processor(gist=False, image_prefix="<|image|>").encode(chat(*imgs, {"type": "text", "text": "Q"}))
    tok = ByteTokenizer()
    assert tok.decode(enc.ids, skip_special=False).startswith("<bos><|user|><|image|>Q")
    assert enc.points == [3, 3]


def test_video_frames_and_multi_turn():
    s = make_sample("video", 0, 0, difficulty({"frames": 3}))
    enc = processor().encode(s)
    assert len(enc.turns) == 3 and enc.n_images == 3
    assert len(set(enc.points)) == 3  # one window per frame
    video = chat({"type": "video", "frames": [Image.new("RGB", (8, 8))] * 4}, {"type": "text", "text": "?"})
    assert processor().encode(video).points == [2, 3, 4, 5]  # a video part too (tests/test_video_windows.py)


def test_literal_special_text_in_user_content_stays_bytes():
    enc = processor().encode(chat({"type": "text", "text": "<|end|>"}))
    assert ByteTokenizer().token_id("<|end|>") not in enc.ids[2:9]


# -------------------------------------------------------------- tasks
@pytest.mark.parametrize("task", sorted(TASKS))
def test_tasks_are_deterministic_and_encode(task):
    a, b = make_sample(task, 3, 5), make_sample(task, 3, 5)
    assert a.messages[-1] == b.messages[-1]
    imgs = lambda s: [im.tobytes() for m in s.messages for p in m["content"]  # noqa: E731
                      for im in ([p["image"]] if p["type"] == "image" else p.get("frames", []))]
    assert imgs(a) == imgs(b) and imgs(a)
    assert len(a.meta["captions"]) == len(imgs(a)) and all(a.meta["captions"])  # one caption per image
    assert imgs(make_sample(task, 4, 5)) != imgs(a)
    enc = processor().encode(a)
    n_answers = sum(m["role"] == "assistant" for m in a.messages)
    assert len(enc.turns) == n_answers and enc.pixels.shape == (len(imgs(a)), 3, 16, 16)


@pytest.mark.parametrize("task", ["digits", "bars", "table"])
def test_fine_grained_ladder_levels(task):
    """`level` fixes the difficulty (digits to read, bars, table columns 2, 3, 3 with headers out of order at
    level 3); 0 draws one per sample."""
    for level in (1, 2, 3):
        s = make_sample(task, 0, 7, difficulty({"level": level, "image_size": 48}))
        caption, answer = s.meta["captions"][0], s.messages[1]["content"][0]["text"]
        assert s.meta["level"] == level
        if task == "digits":
            assert answer == caption and len(answer) == level and answer.isdigit()
        elif task == "bars":
            assert len(caption.split()) == level + 1 and answer in {c[1:] for c in caption.split()}
        else:
            pairs = dict(p for p in caption.split())  # "A3 B5" -> {"A": "3", "B": "5"}
            heads = [p[0] for p in caption.split()]
            asked = s.messages[0]["content"][1]["text"].removeprefix("What is in column ").rstrip("?")
            assert len(pairs) == len(heads) == min(level + 1, 3) and answer == pairs[asked] and answer.isdigit()
            assert heads == list("ABC"[: len(heads)]) if level < 3 else set(heads) <= set("ABCDEF")
    drawn = {make_sample(task, 0, i, difficulty({"level": 0})).meta["level"] for i in range(30)}
    assert drawn == {1, 2, 3}


def test_motion_is_one_video_part_moving_one_way():
    s = make_sample("motion", 0, 3, difficulty({"frames": 3}))
    [video] = [p for p in s.messages[0]["content"] if p["type"] == "video"]
    cells = [(int(c[2]), int(c[3])) for c in s.meta["captions"]]
    step = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[s.messages[1]["content"][0]["text"]]
    assert len(video["frames"]) == 3 and (cells[1][0] - cells[0][0], cells[1][1] - cells[0][1]) == step
    assert processor().encode(s).points == [2, 3, 4]  # one window per frame, each closed by its gist token


def test_difficulty_knobs_and_unknown_key():
    s = make_sample("docvqa", 0, 0, difficulty({"image_size": 96, "text_len": 7}))
    img = s.messages[0]["content"][0]["image"]
    assert img.size == (96, 96) and len(s.messages[1]["content"][0]["text"]) == 7
    assert make_sample("count", 0, 1, difficulty({"max_shapes": 1})).messages[1]["content"][0]["text"] == "1"
    with pytest.raises(ValueError, match="unknown keys.*'shapes'"):
        difficulty({"shapes": 3})
    for knob, value, expected in (("bars", 0, "must be >= 1"), ("bars", 27, "must be <= 26"),
                                  ("fields", 2.5, "expected a whole number"), ("noise", 1.5, "must be <= 1.0"),
                                  ("relative", "no", "expected true or false"),
                                  ("max_value", "9", "expected a whole number")):
        with pytest.raises(ValueError, match=rf"^difficulty\.{knob}={value!r}: {expected}$"):
            difficulty({knob: value})
    assert make_sample("chartqa", 0, 0, difficulty({"bars": 26})).messages[1]["content"][0]["text"].isdigit()


# ------------------------------------------------------------ JSONL
def test_export_roundtrip(tmp_path):
    samples = [make_sample("compare", 0, i) for i in range(3)]
    path = write_jsonl(samples, tmp_path)
    back, skipped = read_jsonl(path)
    assert skipped == 0 and len(back) == 3 and back[1].meta == samples[1].meta
    assert back[1].meta["task"] == "compare" and len(back[1].meta["captions"]) == 2
    a, b = processor().encode(samples[1]), processor().encode(back[1])
    assert a.ids == b.ids and a.points == b.points
    assert torch.allclose(a.pixels, b.pixels)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.png"))[:2] == [
        "images/data/000000_0.png", "images/data/000000_1.png"]


def test_two_exports_into_one_directory_keep_each_other(tmp_path):
    """A second export (another name) must not overwrite the first one's images."""
    first = write_jsonl([make_sample("color", 0, i) for i in range(2)], tmp_path, name="color.jsonl")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    write_jsonl([make_sample("count", 0, i) for i in range(3)], tmp_path, name="count.jsonl")
    assert all(p.read_bytes() == data for p, data in before.items())
    colors, _ = read_jsonl(first)
    again = [make_sample("color", 0, i) for i in range(2)]
    for s, t in zip(colors, again):
        assert torch.equal(processor().encode(s).pixels, processor().encode(t).pixels)
    # exporting the same name again replaces that export only, and leaves no temporary file
    write_jsonl([make_sample("count", 0, 0)], tmp_path, name="count.jsonl")
    assert sorted(p.name for p in (tmp_path / "images" / "count").iterdir()) == ["000000_0.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["color.jsonl", "count.jsonl", "images"]
    assert all(p.read_bytes() == data for p, data in before.items())


def test_cli_data_export(tmp_path, capsys):
    from casa.cli import main

    assert main(["data", "export", "--task", "chartqa", "--n", "2", "--difficulty", "bars=3", str(tmp_path)]) == 0
    lines = (tmp_path / "chartqa.jsonl").read_text().splitlines()
    assert len(lines) == 2 and (tmp_path / json.loads(lines[0])["messages"][0]["content"][0]["path"]).is_file()
    assert main(["data", "export", "--task", "nope", "--n", "1", str(tmp_path)]) == 2
    assert "unknown task" in capsys.readouterr().err


# ------------------------------------------------------------ bad input
def _write(tmp_path, lines):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_bad_lines_name_file_and_line(tmp_path):
    good = json.dumps(chat({"type": "text", "text": "hi"}))
    no_answer = json.dumps({"messages": [{"role": "user", "content": "hi"}]})
    path = _write(tmp_path, [good, "{not json", no_answer, good])
    with pytest.raises(DataError, match=rf"{path}:2: malformed JSON"):
        read_jsonl(path)
    with pytest.raises(DataError, match=rf"{path}:2: sample has no assistant turn"):
        read_jsonl(_write(tmp_path, [good, no_answer]))
    samples, skipped = read_jsonl(_write(tmp_path, [good, "{not json", no_answer, good]), skip_bad=True)
    assert len(samples) == 2 and skipped == 2
    with pytest.raises(DataError, match="unknown content part type 'audio'"):
        check_sample(chat({"type": "audio"}))
    with pytest.raises(DataError, match=r"x.jsonl:3: unknown metric 'bleu' \(expected one of exact, anls, relaxed\)"):
        check_sample({**chat({"type": "text", "text": "hi"}), "metric": "bleu"}, "x.jsonl:3")
    assert check_sample({**chat({"type": "text", "text": "hi"}), "metric": "anls"}).meta == {"metric": "anls"}


def test_files_without_samples_are_refused(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="empty.jsonl: the file holds no sample"):
        read_jsonl(tmp_path / "empty.jsonl")
    (tmp_path / "bad.jsonl").write_text("{no\n")
    with pytest.raises(DataError, match=r"bad.jsonl: no usable sample \(1 bad line\(s\) skipped\)"):
        read_jsonl(tmp_path / "bad.jsonl", skip_bad=True)
    with pytest.raises(DataError, match="is a directory, not a JSONL data file"):
        read_jsonl(tmp_path)
    (tmp_path / "image.jsonl").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    with pytest.raises(DataError, match=r"image.jsonl:1: not UTF-8 text \(invalid start byte at byte 0\)"):
        read_jsonl(tmp_path / "image.jsonl")
    with pytest.raises(FileNotFoundError, match="no such data file"):
        read_jsonl(tmp_path / "absent.jsonl")


def test_missing_and_corrupt_images(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    lines = [json.dumps(chat({"type": "image", "path": p}, {"type": "text", "text": "?"}))
             for p in ("ok.png", "missing.png", "bad.png")]
    path = _write(tmp_path, lines)
    samples, _ = read_jsonl(path)
    proc = processor()
    proc.encode(samples[0])
    with pytest.raises(DataError, match=rf"{path}:2: .*missing.png.*cannot read image"):
        proc.encode(samples[1])
    with pytest.raises(DataError, match=rf"{path}:3: .*bad.png"):
        proc.encode(samples[2])
    packer = Packer(samples, proc, text_tokens=512, image_tokens=512, skip_bad=True)
    packs = list(packer.packs(0))
    assert packer.skipped == 2 and sum(len(p.docs) for p in packs) == 1


def test_over_budget_sample(tmp_path):
    long = json.dumps(chat({"type": "text", "text": "x" * 300}))
    path = _write(tmp_path, [json.dumps(chat({"type": "text", "text": "hi"})), long])
    samples, _ = read_jsonl(path)
    with pytest.raises(DataError, match=rf"{path}:2: sample needs \d+ sequence tokens.*over the budget of 128"):
        list(Packer(samples, processor(), text_tokens=128, image_tokens=64).packs(0))
    packer = Packer(samples, processor(), text_tokens=128, image_tokens=64, skip_bad=True)
    assert len(list(packer.packs(0))) == 1 and packer.skipped == 1


# ------------------------------------------------------------- packing
def test_packs_respect_budgets_and_are_deterministic():
    src = SyntheticSource(["color", "compare", "video"], seed=1)
    proc = processor()
    tpi = VISION.tokens_per_image
    for splice in (False, True):
        packer = Packer(src, proc, text_tokens=300, image_tokens=10 * tpi, splice_images=splice)
        packs = list(packer.packs(0, limit=6))
        for p in packs:
            n_img = sum(d.n_images for d in p.docs)
            seq = sum(len(d.ids) for d in p.docs) + (n_img * tpi if splice else 0)
            assert seq <= 300 and n_img * tpi <= 10 * tpi
            b = pack_row(p.docs).validate()
            assert b.doc_lens == [[len(d.ids) for d in p.docs]]
        assert [p.start for p in packs[1:]] == [p.end for p in packs[:-1]]
        again = list(packer.packs(packs[3].start, limit=2))
        assert [d.ids for d in again[0].docs] == [d.ids for d in packs[3].docs]


def test_insertion_counts_image_tokens_in_sequence():
    src = SyntheticSource(["color"], seed=0)
    proc = Processor(ByteTokenizer(), VisionConfig(image_size=32, patch_size=8))  # 16 tokens per image
    plain = Packer(src, proc, text_tokens=400, image_tokens=10_000)
    spliced = Packer(src, proc, text_tokens=400, image_tokens=10_000, splice_images=True)
    n_plain = len(next(plain.packs(0)).docs)
    n_spliced = len(next(spliced.packs(0)).docs)
    assert n_spliced < n_plain


def test_frame_memory_tokens_count_in_the_sequence_budget():
    src = SyntheticSource(["compare"], seed=0)  # two images a sample
    proc = Processor(ByteTokenizer(), VisionConfig(image_size=32, patch_size=8))
    enc = proc.encode(src[0])
    plain, memory = (Packer(src, proc, text_tokens=400, image_tokens=10_000, memory_tokens=k) for k in (0, 4))
    assert memory.cost(enc)[0] == plain.cost(enc)[0] + 2 * 4 == len(enc.ids) + 8
    for p in memory.packs(0, limit=3):
        assert sum(len(d.ids) + 4 * d.n_images for d in p.docs) <= 400
    tight = Packer(src, proc, text_tokens=len(enc.ids) + 7, image_tokens=10_000, memory_tokens=4)
    with pytest.raises(DataError, match="4 memory tokens per image in the sequence"):
        tight._encode(0)
    from casa.eval.decode import PromptTooLong, check_lengths  # evaluation counts them against the limit too

    check_lengths([enc], proc, max_new_tokens=2, limit=len(enc.ids) + 10, splice_images=False, memory_tokens=4)
    with pytest.raises(PromptTooLong, match="8 memory tokens"):
        check_lengths([enc], proc, max_new_tokens=2, limit=len(enc.ids) + 9, splice_images=False, memory_tokens=4)


@pytest.mark.parametrize("variant", ["casa", "insertion"])
def test_no_leak_between_packed_samples(variant):
    """Changing one packed sample (text and image) changes no other sample's logits or loss."""
    model = tiny_model(variant)
    proc = processor()
    docs = [proc.encode(make_sample(t, 0, i)) for i, t in enumerate(["color", "compare", "video", "count"])]
    other = proc.encode(make_sample("position", 9, 9))
    changed = list(docs)
    changed[1] = other
    with torch.no_grad():
        a, b = pack_row(docs), pack_row(changed)
        la, lb = model(a), model(b)
    for k in (0, 2, 3):
        sa = sum(len(d.ids) for d in docs[:k])
        sb = sum(len(d.ids) for d in changed[:k])
        n = len(docs[k].ids)
        torch.testing.assert_close(la[:, sa: sa + n], lb[:, sb: sb + n], atol=1e-5, rtol=1e-5)
        # ... and equal to the sample alone
        alone = model(pack_row([docs[k]]))
        torch.testing.assert_close(la[:, sa: sa + n], alone, atol=1e-5, rtol=1e-5)
    # per-sample loss: the packed sum is the sum of the samples' losses
    total, count = loss_sum(la, a)
    parts = [loss_sum(model(pack_row([d])), pack_row([d])) for d in docs]
    assert count == sum(c for _, c in parts)
    torch.testing.assert_close(total, sum(l for l, _ in parts), atol=1e-4, rtol=1e-5)


def test_stack_rows_pads_with_a_document():
    proc = processor()
    docs = [proc.encode(make_sample("color", 0, i)) for i in range(2)] + [proc.encode(make_sample("video", 0, 0))]
    b = stack_rows(docs, ByteTokenizer().pad_id, extra=3).validate()
    T = b.input_ids.shape[1]
    assert T == max(len(d.ids) for d in docs) + 3
    assert all(sum(lens) == T and len(lens) == 2 for lens in b.doc_lens)
    assert b.image_rows.tolist() == [0, 1, 2, 2, 2, 2] and not b.loss_mask[:, -3:].any()


# ------------------------------------------------- HF tokenizer + chat template
def hf_tokenizer_dir(path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|im_start|>", "<|im_end|>", "<|vision_end|>", "[UNK]"]
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["what colour is the shape? red blue green user assistant"], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|im_end|>",
                                   unk_token="[UNK]", additional_special_tokens=["<|im_start|>", "<|vision_end|>"])
    fast.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    fast.save_pretrained(str(path))
    return path


def test_hf_tokenizer_with_its_chat_template(tmp_path):
    from casa.pretrained.tokenizer import HFTokenizer, load_tokenizer

    tok = HFTokenizer(hf_tokenizer_dir(tmp_path / "tok"))
    proc = Processor(tok, VISION, gist_token="<|vision_end|>")
    sample = chat({"type": "image", "image": Image.new("RGB", (8, 8))}, {"type": "text", "text": "what colour?"},
                  answer="red")
    enc = proc.encode(sample)
    target_text = tok.decode([i for i, t in zip(enc.ids, enc.targets) if t], skip_special=False)
    assert target_text == "red<|im_end|>\n"
    prompt = tok.decode(enc.ids[: enc.turns[0][0]], skip_special=False)
    assert prompt == "<|im_start|>user\n<|vision_end|>what colour?<|im_end|>\n<|im_start|>assistant\n"
    assert enc.ids[enc.points[0]] == tok.token_id("<|vision_end|>")
    assert tok.eos_id in proc.stop_ids
    # a model directory keeps it
    tok.save(tmp_path / "model")
    again = load_tokenizer(tmp_path / "model")
    assert again.encode("what colour?") == tok.encode("what colour?")


def test_a_task_listed_twice_is_drawn_twice_as_often_with_fresh_samples():
    plain = SyntheticSource(["color", "digits"], seed=3)
    weighted = SyntheticSource(["color", "digits", "digits"], seed=3)
    drawn = [weighted[i] for i in range(12)]
    assert [s.meta["task"] for s in drawn].count("digits") == 8
    # each task's samples are its indices 0, 1, 2, ... in order, none repeated
    assert [s.source for s in drawn if s.meta["task"] == "digits"] == [
        f"digits[seed=3, index={k}]" for k in range(8)]
    assert [s.source for s in drawn if s.meta["task"] == "color"] == [f"color[seed=3, index={k}]" for k in range(4)]
    # a list without repeats draws what it always drew
    assert [plain[i].source for i in range(4)] == ["color[seed=3, index=0]", "digits[seed=3, index=0]",
                                                   "color[seed=3, index=1]", "digits[seed=3, index=1]"]


def test_shape_captions_are_in_reading_order():
    for i in range(20):
        s = make_sample("count", 0, i, difficulty({"max_shapes": 4}))
        cells = [(int(c[3]), int(c[2])) for c in s.meta["captions"][0].split()]  # (row, col)
        assert cells == sorted(cells) and len(cells) == int(s.messages[1]["content"][0]["text"])


def test_digits_are_written_in_fixed_slots():
    """Digit i of a number always lies in slot i (a quarter of the width; the three slots centred)."""
    import numpy as np

    from casa.data.tasks import Difficulty, make_sample

    for level in (1, 2, 3):
        for index in range(6):
            s = make_sample("digits", 0, index, Difficulty(image_size=48, font_size=16, level=level))
            ink = np.asarray(s.messages[0]["content"][0]["image"].convert("L")) < 128
            columns = np.flatnonzero(ink.any(axis=0))
            slots = set(((columns - 6) // 12).tolist())  # slot i spans [6 + 12 i, 18 + 12 i)
            assert len(s.meta["captions"][0]) == level and slots == set(range(level)), (level, index, slots)


def test_table_cells_are_digits_glyphs_under_their_headers():
    """Table cell i is drawn pixel for pixel as `digits` draws its digit i (the same slot, so the same cut
    by the 8-pixel patches), its header letter alone above it, nothing right of the last column; the
    answer is the digit under the asked header."""
    import numpy as np

    from casa.data.tasks import Difficulty, make_sample

    def pixels(s):
        return np.asarray(s.messages[0]["content"][0]["image"].convert("L"))

    d = Difficulty(image_size=48, font_size=16)
    glyph = {}  # (slot, digit) -> that slot's columns below the header band, as digits draws them
    for index in range(300):
        s = make_sample("digits", 0, index, Difficulty(image_size=48, font_size=16, level=3))
        for k, v in enumerate(s.meta["captions"][0]):
            glyph.setdefault((k, v), pixels(s)[16:, 6 + 12 * k: 18 + 12 * k])
    for level in (1, 2, 3):
        for index in range(10):
            s = make_sample("table", 0, index, Difficulty(**{**vars(d), "level": level}))
            pairs = s.meta["captions"][0].split()
            img = pixels(s)
            for k, (head, value) in enumerate(pairs):
                assert np.array_equal(img[16:, 6 + 12 * k: 18 + 12 * k], glyph[(k, value)]), (level, index, k)
                header = img[:16, 6 + 12 * k: 18 + 12 * k] < 128
                assert header.any() and not header[14:].any()  # the letter sits in the band above the digit
            assert (img[:, 6 + 12 * len(pairs):] == 255).all()
            asked = s.messages[0]["content"][1]["text"].removeprefix("What is in column ").rstrip("?")
            assert s.messages[1]["content"][0]["text"] == dict(pairs)[asked]
